"""Structured output (docs/structured.md): JSON-schema requests and the validation of answers.

A run with `--json-schema FILE` asks every request for JSON matching the schema
(`response_format: {type: json_schema, json_schema: {name, schema, strict: true}}`, unless the
row or `--param` already sets a `response_format`), parses and validates each answer with
`jsonschema`, and re-asks an invalid one up to `--invalid-retries` times. The row's `parsed`
column holds the valid answer as canonical JSON text (sorted keys, compact); `reasks` counts
the answers sent again (0: valid at the first answer) and `reask_cost_usd` what they cost.
`batchrunner.answers.flatten` turns `parsed` into typed columns derived from the schema.

>>> schema = load_schema(Path("jobs/entities.schema.json"))
>>> schema.check('{"entities": []}').parsed
'{"entities":[]}'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.errors import RequestError, UsageError
from batchrunner.results import Result, Usage

__all__ = [
    "DEFAULT_INVALID_RETRIES",
    "METADATA_KEY",
    "Check",
    "ReaskStopped",
    "Schema",
    "StructuredSummary",
    "ask_until_valid",
    "load_schema",
    "summarize_files",
]

log = logging.getLogger(__name__)

DEFAULT_INVALID_RETRIES = 2
METADATA_KEY = b"batchrunner.json_schema"
"""Parquet schema metadata of a structured run's output: the JSON Schema, as JSON text."""

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_FENCE = re.compile(r"\A```(?:json)?\s*\n(.*?)\n?```\Z", re.DOTALL | re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_REASON = 300  # characters of a validation message kept in `error`
_OPENAI_WRAPPER = {"name", "schema", "strict", "description"}


# -- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One answer checked against the schema: `parsed` when valid, else `error`."""

    parsed: str | None = None
    error: str | None = None

    @property
    def valid(self) -> bool:
        """True when the answer is JSON valid against the schema."""
        return self.parsed is not None


@dataclass(frozen=True)
class Schema:
    """A checked JSON Schema with its `response_format` name and where it came from."""

    name: str
    document: dict[str, Any]
    source: str
    _validator: Any = field(repr=False, compare=False, default=None)

    def response_format(self) -> dict[str, Any]:
        """The request body's `response_format` for this schema (strict mode)."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": self.document, "strict": True},
        }

    def settings(self) -> dict[str, Any]:
        """What the checkpoint fingerprint records of the schema (any change is a change)."""
        return {"name": self.name, "schema": self.document}

    def check(self, content: str | None, finish_reason: str | None = None) -> Check:
        """Parse `content` as JSON and validate it; the error starts with `schema:`."""
        if content is None:
            return Check(error="schema: no content in the answer")
        text = content.strip()
        fenced = _FENCE.match(text)  # ```json ... ``` from gateways without strict mode
        if fenced:
            text = fenced.group(1)
        try:
            value = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:
            cut = " (cut at max_tokens)" if finish_reason == "length" else ""
            return Check(error=f"schema: not JSON{cut}: {_short(str(exc))}")
        from jsonschema.exceptions import best_match  # imported once a run has a schema

        error = best_match(self._validator.iter_errors(value))
        if error is not None:
            where = json_path(error.absolute_path)
            return Check(error=f"schema: {where}: {_short(error.message)}")
        return Check(parsed=canonical(value))

    def check_answer(self, answer: Any, by_tool: bool = False) -> Check:
        """Check a Result (or a cached answer): its content, or with `by_tool` its first tool
        call's arguments."""
        if not by_tool:
            return self.check(answer.content, answer.finish_reason)
        try:
            calls = json.loads(answer.tool_calls) if answer.tool_calls else None
            arguments = calls[0]["function"]["arguments"]
        except (ValueError, TypeError, LookupError):
            return Check(error="schema: no tool call in the answer")
        return self.check(arguments, answer.finish_reason)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _short(text: str) -> str:
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


def canonical(value: Any) -> str:
    """JSON text with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_path(parts: Iterable[str | int]) -> str:
    """A location in a JSON document as a JSONPath: `$.entities[0].type`."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def load_schema(source: Path | str | Mapping[str, Any], *, where: str | None = None) -> Schema:
    """A Schema from a JSON or TOML file, or from a mapping (a job file's inline table).

    Raises UsageError naming the file (or `where`) and the problem: unreadable, not JSON or
    TOML, or not a valid JSON Schema (jsonschema's `check_schema`). A file holding OpenAI's
    `{name, schema, strict}` object is taken as its `schema`, with its `name`.
    """
    if isinstance(source, Mapping):
        label = where or "json_schema"
        document: Any = _plain(source)
        stem = "response"
    else:
        path = Path(source)
        label = where or str(path)
        document = _read_document(path)
        stem = path.name.split(".")[0]
    if not isinstance(document, dict):
        raise UsageError(f"{label}: a JSON Schema must be an object, not {_kind(document)}")
    name = None
    if set(document) <= _OPENAI_WRAPPER and isinstance(document.get("schema"), dict):
        name = document.get("name") if isinstance(document.get("name"), str) else None
        document = document["schema"]
    name = _response_name(name or document.get("title") or stem)
    return Schema(name, document, label, _validator(document, label))


@functools.lru_cache(maxsize=16)
def _checked_validator(text: str) -> Any:
    """A validator for the schema in `text` (check_schema is slow: a run loads it thrice)."""
    # jsonschema is imported here, when a run has a schema: at the top it cost every run 0.1 s.
    import jsonschema

    document = json.loads(text)
    validator_class = jsonschema.validators.validator_for(
        document, default=jsonschema.Draft202012Validator
    )
    validator_class.check_schema(document)
    _check_refs(document)
    return validator_class(document)


class _UnresolvedRef(Exception):
    """A `$ref` of the schema that points nowhere: where it is, and what it says."""

    def __init__(self, ref: str, path: list[str | int]) -> None:
        super().__init__(ref)
        self.ref, self.path = ref, path


# Keywords whose values are data, not subschemas: a `$ref` key inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "examples", "default"})


def _check_refs(document: dict[str, Any]) -> None:
    """Resolve every `$ref` of `document` as the validator would (the `referencing` library,
    with the JSON Schema meta-schemas known); raise _UnresolvedRef at the first that fails.

    A validator resolves a `$ref` only when an answer reaches it, so a reference to nowhere
    would otherwise be found after requests were paid for. Nothing is fetched: a reference to
    another document, not embedded here, does not resolve.
    """
    from jsonschema_specifications import REGISTRY
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012, specification_with

    dialect = document.get("$schema")
    specification = specification_with(dialect if isinstance(dialect, str) else "",
                                       default=DRAFT202012)
    root = specification.create_resource(document)
    base = root.id() or ""
    registry = REGISTRY.with_resource(base, root).crawl()  # embedded `$id`s too

    def walk(node: Any, resolver: Any, path: list[str | int]) -> None:
        if isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, resolver, [*path, index])
            return
        if not isinstance(node, dict):
            return
        if path and isinstance(node.get("$id"), str):
            resolver = resolver.in_subresource(specification.create_resource(node))
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                resolver.lookup(ref)
            except Unresolvable:
                raise _UnresolvedRef(ref, path) from None
        for key, value in node.items():
            if key not in _DATA_KEYWORDS:
                walk(value, resolver, [*path, key])

    walk(document, registry.resolver(base_uri=base), [])


def _validator(document: dict[str, Any], label: str) -> Any:
    from jsonschema.exceptions import SchemaError

    try:
        return _checked_validator(json.dumps(document, sort_keys=True, default=str))
    except SchemaError as exc:
        at = json_path(exc.absolute_path)
        raise UsageError(
            f"{label}: not a valid JSON Schema: at {at}: {_short(exc.message)}"
        ) from None
    except _UnresolvedRef as exc:
        raise UsageError(
            f"{label}: the $ref {exc.ref!r} at {json_path(exc.path)} does not resolve: "
            "it points to nothing in the schema"
        ) from None


def _read_document(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"schema file not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read schema file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not JSON or TOML: the file is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return _toml(path, text)
    if suffix == ".json":
        return _json(path, text)
    try:  # another extension: whichever of the two it is
        return json.loads(text)
    except ValueError:
        pass
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise UsageError(
            f"{path}: not JSON or TOML (name it .json or .toml to see where it breaks)"
        ) from None


def _json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path}: not valid JSON: {exc.msg} (at line {exc.lineno}, column {exc.colno})"
        ) from None


def _toml(path: Path, text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a value")


def _response_name(text: str) -> str:
    """A `json_schema.name` the API accepts: `[A-Za-z0-9_-]{1,64}`."""
    name = _NAME_CHARS.sub("_", str(text)).strip("_")[:64]
    return name or "response"


# -- asking until the answer is valid --------------------------------------------------------


class ReaskStopped(Exception):
    """A re-ask not answered because the run is stopping (budget, deadline, Ctrl-C, a refused
    key): `result` combines the answers already paid for, as a failed re-ask does; `cause` is
    what stopped it."""

    def __init__(self, result: Result, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.result = result
        self.cause = cause


def names_function(body: Mapping[str, Any] | None) -> bool:
    """True when a request's `tool_choice` names a function: the schema then checks that
    function's arguments (`tool_calls[0].function.arguments`) instead of the content."""
    choice = body.get("tool_choice") if body else None
    return (
        isinstance(choice, Mapping)
        and isinstance(choice.get("function"), Mapping)
        and bool(choice["function"].get("name"))
    )


async def ask_until_valid(
    ask: Callable[[], Awaitable[Result]], schema: Schema, retries: int, by_tool: bool = False
) -> Result:
    """Ask, and ask again while the answer fails the schema, at most `retries` more times.

    `ask` makes one request (with its own transport retries) and returns an ok Result; its
    errors on the first ask propagate. The Result returned sums the usage and cost of every
    answer, counts every attempt, and is ok with `parsed`, or an error `schema: ...` keeping
    the last answer's content. With `by_tool` the first tool call's arguments are checked
    instead of the content. A re-ask that fails at the transport level ends the re-asking;
    one stopped by the run (any other exception) raises ReaskStopped with that Result.
    """
    results = [await ask()]
    check = schema.check_answer(results[0], by_tool)
    while not check.valid and len(results) <= retries:
        try:
            results.append(await ask())
        except RequestError as exc:
            log.info("row %s: a re-ask for the schema failed (%s)", results[0].id, exc)
            break
        except Exception as exc:  # the run is stopping: what was paid for is kept
            raise ReaskStopped(_combined(results, check), exc) from exc
        check = schema.check_answer(results[-1], by_tool)
    return _combined(results, check)


def _combined(results: Sequence[Result], check: Check) -> Result:
    last = results[-1]
    usage = Usage(
        prompt_tokens=_sum(r.usage.prompt_tokens for r in results),
        completion_tokens=_sum(r.usage.completion_tokens for r in results),
        total_tokens=_sum(r.usage.total_tokens for r in results),
        cached_tokens=_sum(r.usage.cached_tokens for r in results),
    )
    reask_cost = _sum(r.cost_usd for r in results[1:]) if len(results) > 1 else 0.0
    if len(results) > 1 and any(r.cost_usd is None for r in results[1:]):
        reask_cost = None
    return dataclasses.replace(
        last,
        status="ok" if check.valid else "error",
        error=check.error,
        usage=usage,
        cost_usd=None if any(r.cost_usd is None for r in results) else _sum(
            r.cost_usd for r in results
        ),
        parsed=check.parsed,
        reasks=len(results) - 1,
        reask_cost_usd=reask_cost,
    )


def _sum(values: Iterable[Any]) -> Any:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


# -- summary -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructuredSummary:
    """How structured answers went: rows answered, valid at the first answer, re-asks, cost."""

    answered: int  # rows with at least one answer checked against the schema
    valid_first: int  # rows whose first answer was valid
    valid: int  # rows valid in the end (after re-asking)
    reasks: int  # answers asked again
    reask_cost_usd: float | None  # what the re-asks cost; None where a re-asked row is unpriced

    @property
    def valid_first_share(self) -> float | None:
        """The share of answered rows valid at the first answer."""
        return self.valid_first / self.answered if self.answered else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        data = dataclasses.asdict(self)
        data["valid_first_share"] = self.valid_first_share
        return data

    def render(self) -> str:
        """One line for the summary table's notes."""
        share = self.valid_first_share
        cost = "?" if self.reask_cost_usd is None else f"${self.reask_cost_usd:,.6f}"
        return (
            f"structured: {self.valid_first:,} of {self.answered:,} answered rows valid at the "
            f"first answer ({'-' if share is None else f'{share:.1%}'}), {self.valid:,} valid "
            f"in the end; {self.reasks:,} re-asks cost {cost}"
        )


_SUMMARY_COLUMNS = ("status", "reasks", "reask_cost_usd")


def summarize_files(paths: Sequence[Path]) -> StructuredSummary | None:
    """The structured figures of result files, or None when none is from a structured run."""
    answered = valid_first = valid = reasks = 0
    cost = 0.0
    unpriced = False
    seen = False
    for path in paths:
        try:
            names = pq.read_schema(path).names
        except (OSError, pa.ArrowException):
            continue  # the main summary has already said what is wrong with it
        if not set(_SUMMARY_COLUMNS) <= set(names):
            continue
        table = pq.read_table(path, columns=list(_SUMMARY_COLUMNS))
        seen = True
        for status, count, spent in zip(
            table["status"].to_pylist(),
            table["reasks"].to_pylist(),
            table["reask_cost_usd"].to_pylist(),
            strict=True,
        ):
            if count is None:
                continue
            answered += 1
            valid += status == "ok"
            valid_first += status == "ok" and count == 0
            reasks += count
            if spent is None:
                unpriced = True
            elif not math.isnan(spent):
                cost += spent
    if not seen:
        return None
    return StructuredSummary(answered, valid_first, valid, reasks, None if unpriced else cost)
