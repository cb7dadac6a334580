"""The `run` options, described once: name, flags, type, help, check, commands, job key, path-ness.

`OPTIONS` drives the click options of `run` and `estimate` (cli.py builds its decorators from
it), the keys a job file may hold and their checks (jobs.py), and RunConfig's validation
(config.py). A new option is one `Option` here and its typed field, with its default, in
RunConfig (a test holds the two together). Plain data and checker functions: no click.

    >>> OPTION_BY_NAME["concurrency"].check(16)
    16
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchrunner.config.durations import parse_deadline
from batchrunner.config.endpoints import ENDPOINT_KEYS, Endpoint
from batchrunner.config.paths import is_uri
from batchrunner.errors import UsageError

__all__ = [
    "OPTIONS",
    "OPTION_BY_NAME",
    "InvalidValue",
    "Option",
    "checked_base_url",
    "json_value",
    "path_value",
    "type_name",
]


class InvalidValue(Exception):
    """A value a checker refuses; the message completes "`key` must be ..."."""


# --- value checkers: each takes a parsed value and returns it typed, or raises InvalidValue -----


def type_name(value: object) -> str:
    """What a TOML (or Python) value is, in words, without showing the value itself."""
    names: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        ((list, tuple), "an array"),
        (dict, "a table"),
        (dt.datetime, "a date-time"),
        (dt.date, "a date"),
        (dt.time, "a time"),
    ]
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _wrong(expected: str, value: object) -> InvalidValue:
    # The value is never echoed: a misplaced API key must not end up in an error message.
    return InvalidValue(f"must be {expected}, not {type_name(value)}")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _wrong("a string", value)
    return value


def _nonempty_string(value: object) -> str:
    text = _string(value)
    if text == "":
        raise InvalidValue("must not be empty")
    return text


def path_value(value: object) -> Path | str:
    """A local path (user-expanded), or an object-store URI kept as text."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _wrong("a path (a string)", value)
    if value == "":
        raise InvalidValue("must not be empty")
    if is_uri(value):
        return value  # s3://bucket/key: a Path would fold its "//"
    return Path(value).expanduser()


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _wrong("true or false", value)
    return value


def _integer(minimum: int | None = None) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong("an integer", value)
        if minimum is not None and value < minimum:
            raise InvalidValue(f"must be at least {minimum}, not {value}")
        return value

    return check


def _number(
    low: float | None = None, high: float | None = None, *, positive: bool = False
) -> Callable[[object], float]:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong("a number", value)
        number = float(value)
        if not math.isfinite(number):
            raise InvalidValue("must be a finite number")
        if positive and number <= 0:
            raise InvalidValue(f"must be positive, not {value}")
        if low is not None and number < low:
            raise InvalidValue(f"must be at least {low:g}, not {value}")
        if high is not None and number > high:
            raise InvalidValue(f"must be at most {high:g}, not {value}")
        return number

    return check


def _choice(*options: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _string(value)
        if text not in options:
            raise InvalidValue(f"must be one of {', '.join(options)}, not {text!r}")
        return text

    check.choices = options  # type: ignore[attr-defined]  # click's Choice reads them
    return check


def checked_base_url(url: str) -> str:
    """The one base-URL rule: http(s) with a host; returned stripped, without a trailing `/`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidValue("must be an http:// or https:// URL with a host")
    return url.strip().rstrip("/")


def _url(value: object) -> str:
    text = _string(value)
    checked_base_url(text)
    return text  # kept as given; resolve_base_url normalizes it


def _env_name(value: object) -> str:
    text = _string(value)
    # One NAME, or several separated by commas: the keys the Ray engine's actors share out.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*", text):
        # Most likely the key itself was pasted here; say so without repeating it.
        raise InvalidValue(
            "must be the NAME of an environment variable (such as RU_LLM_API_KEY), "
            "not the key itself"
        )
    return text


def _one_env_name(value: object) -> str:
    text = _env_name(value)
    if "," in text:
        raise InvalidValue("must name one variable (an endpoint has one key)")
    return text


def _endpoints(value: object) -> tuple[Endpoint, ...]:
    """`endpoints`: an array of tables {base_url, api_key_env, rpm, tpm, concurrency}."""
    if isinstance(value, Endpoint):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _wrong("a non-empty array of tables such as "
                     '{ base_url = "https://...", api_key_env = "KEY_A" }', value)
    checks: dict[str, Callable[[object], Any]] = {
        "base_url": _url, "api_key_env": _one_env_name, "rpm": _number(positive=True),
        "tpm": _number(positive=True), "concurrency": _integer(minimum=1),
    }
    endpoints = []
    for i, entry in enumerate(value):
        if isinstance(entry, Endpoint):
            entry = entry.to_dict()
        if not isinstance(entry, dict):
            raise InvalidValue(f"[{i}] must be a table, not {type_name(entry)}")
        unknown = sorted(set(entry) - set(ENDPOINT_KEYS))
        if unknown:
            raise InvalidValue(f"[{i}]: unknown key `{unknown[0]}` (the keys are: "
                               f"{', '.join(ENDPOINT_KEYS)})")
        if "base_url" not in entry:
            raise InvalidValue(f"[{i}] has no `base_url`")
        fields: dict[str, Any] = {}
        for key, item in entry.items():
            try:
                fields[key] = checks[key](item)
            except InvalidValue as exc:
                raise InvalidValue(f"[{i}].{key} {exc}") from None
        fields["base_url"] = checked_base_url(fields["base_url"])
        endpoints.append(Endpoint(**fields))
    return tuple(endpoints)


def _deadline(value: object) -> str:
    # A TOML local time (`deadline = 06:00:00`) is as natural as the string "06:00".
    expected = 'a duration such as "45m" or a time of day such as "06:00"'
    if isinstance(value, dt.time):
        return value.strftime("%H:%M" if value.second == 0 else "%H:%M:%S")
    if isinstance(value, (dt.datetime, dt.date)):
        raise InvalidValue(f"must be {expected}, not a date")
    if not isinstance(value, str):
        raise _wrong(expected, value)
    try:
        parse_deadline(value, dt.datetime(2000, 1, 1))
    except UsageError:
        raise InvalidValue(f"must be {expected}, not {value!r}") from None
    return value.strip()


def _metric(value: object) -> str:
    from batchrunner.answers.scoring import (
        parse_metric,  # checked here so a bad metric stops before sending
    )

    text = _nonempty_string(value)
    try:
        parse_metric(text)
    except UsageError as exc:
        raise InvalidValue(f"must be a metric: {exc}") from None
    return text


def _models(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _wrong("a non-empty array of model names", value)
    if not all(isinstance(v, str) and v for v in value):
        raise InvalidValue("must hold model names (non-empty strings)")
    return tuple(value)


def _cache(value: object) -> bool | Path | str:
    # `cache = true` (the default file), `cache = false`, or `cache = "path/to/cache.sqlite"`.
    if isinstance(value, bool):
        return value
    try:
        return path_value(value)
    except InvalidValue:
        raise _wrong("true, false or a path (a string)", value) from None


def _stop(value: object) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _wrong("a string or a non-empty array of strings", value)


def json_value(value: object) -> Any:
    """Any request body field: what JSON can carry (TOML dates and NaN cannot)."""
    if isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue("must be a finite number (JSON has no nan or inf)")
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    raise _wrong("a value JSON can carry (string, number, boolean, array or table)", value)


def _schema_source(value: object) -> Path | str | dict[str, Any]:
    """`json_schema`: a schema file, or the schema written inline as a table."""
    if isinstance(value, dict):
        return json_value(value)  # type: ignore[no-any-return]
    if isinstance(value, (str, os.PathLike)):
        return path_value(value)
    raise _wrong("a path or a table", value)


# --- the table -----------------------------------------------------------------------------

RUN = frozenset({"run"})
BOTH = frozenset({"run", "estimate"})


@dataclass(frozen=True)
class Option:
    """One `run` option: its command-line form, its job key and its check.

    `name` is the RunConfig field and the job key (or, with `request`, a request body field
    that goes to `params`). `kind` says how the command line takes it: "text", "int", "float",
    "path" (a path or an object-store URI), "file" (a local file), "choice" (from the check's
    choices), "flag" (on when given), "switch" (`--x/--no-x`), "many" (repeatable) or
    "optional" (a flag with an optional value). No `flags`: not on the command line.
    """

    name: str
    flags: tuple[str, ...] = ()
    check: Callable[[object], Any] | None = None
    kind: str = "text"
    help: str | None = None
    metavar: str | None = None
    commands: frozenset[str] = BOTH
    job: bool = True  # a job file may set it
    relative: bool = False  # a path in a job file is relative to the file's folder
    request: bool = False  # a request body field: top-level job key and option -> params
    dest: str | None = None  # the click parameter's name, when not `name`

    @property
    def flag(self) -> str:
        """How messages name the option: `--` and the name with `-` for `_`."""
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...]:
        """The values a "choice" option takes."""
        return tuple(getattr(self.check, "choices", ()))


_CACHE_MODES = ("read-write", "read-only", "write-only", "refresh")

#: Every `run` option, in the order of `run --help`.
OPTIONS: tuple[Option, ...] = (
    Option("input", ("-i", "--input"), path_value, "path", relative=True, dest="input_",
           help="Prompts: .jsonl/.ndjson (optionally .gz), .parquet or .csv "
                "(a path, or s3://bucket/key)."),
    Option("output", ("-o", "--output"), path_value, "path", relative=True,
           help="Results: .parquet, .jsonl or .csv (may hold {date}); the checkpoint "
                "lives beside it."),
    Option("model", ("-m", "--model"), _nonempty_string, "many",
           help="Model for rows without a `model` column; repeat it for a sweep."),
    Option("system", ("--system",), _string,
           help="System message added first to every request."),
    Option("template", ("--template",), _nonempty_string,
           help="User message from row columns, e.g. 'Translate: {text}'."),
    Option("prompt_column", ("--prompt-column",), _nonempty_string,
           help="Column holding the prompt [default: prompt]."),
    Option("messages_column", ("--messages-column",), _nonempty_string,
           help="Column holding chat messages [default: messages]."),
    Option("id_column", ("--id-column",), _nonempty_string,
           help="Column holding row ids [default: id, else custom_id]."),
    Option("temperature", ("--temperature",), _number(0.0, 2.0), "float", request=True),
    Option("top_p", ("--top-p",), _number(0.0, 1.0), "float", request=True),
    Option("max_tokens", ("--max-tokens",), _integer(minimum=1), "int", request=True),
    Option("stop", ("--stop",), _stop, "many", request=True, help="Stop sequence (repeatable)."),
    Option("n", ("--n",), _integer(minimum=1), "int", request=True, help="Choices per request."),
    Option("seed", ("--seed",), _integer(), "int", request=True),
    # `--param KEY=JSON` and the job's [params] table: checked entry by entry in jobs.py
    Option("params", ("--param",), None, "many", metavar="KEY=JSON", dest="param",
           help="Any other request body field (repeatable)."),
    Option("stream", ("--stream/--no-stream",), _boolean, "switch",
           help="Ask for SSE streaming."),
    Option("limit", ("--limit",), _integer(minimum=0), "int",
           help="Only the first N rows (a smoke test)."),
    Option("concurrency", ("-c", "--concurrency"), _integer(minimum=1), "int",
           help="Requests in flight at most [16]."),
    Option("rpm", ("--rpm",), _number(positive=True), "float",
           help="Requests started per minute, at most."),
    Option("tpm", ("--tpm",), _number(positive=True), "float",
           help="Estimated tokens started per minute, at most."),
    Option("max_attempts", ("--max-attempts",), _integer(minimum=1), "int",
           help="HTTP attempts per row [6]."),
    Option("timeout", ("--timeout",), _number(positive=True), "float",
           help="Seconds per attempt [120]."),
    Option("max_cost", ("--max-cost",), _number(positive=True), "float", metavar="USD",
           help="Stop before the spending on this output passes USD; counts every "
                "run that built it (resumes included)."),
    Option("deadline", ("--deadline",), _deadline,
           help="Stop sending at a time: '45m', '2h', '06:00'."),
    Option("checkpoint_every", ("--checkpoint-every",), _integer(minimum=1), "int",
           help="Answers that may wait for a checkpoint write [100] (a write starts at half)."),
    Option("base_url", ("--base-url",), _url,
           help="Gateway base URL [RU_LLM_BASE_URL, OPENAI_BASE_URL]."),
    Option("api_key_env", ("--api-key-env",), _env_name, "many", metavar="NAME",
           help="Environment variable holding the key [RU_LLM_API_KEY, OPENAI_API_KEY]; "
                "with --endpoint, one per endpoint in the same order."),
    Option("endpoints", ("--endpoint",), _endpoints, "many", metavar="URL", dest="endpoint",
           help="Send to several gateways (repeatable; job key `endpoints` also takes each "
                "one's rpm, tpm and concurrency)."),
    Option("local", ("--local",), _boolean, "flag",
           help="Run against the built-in gateway simulator; no key, no network."),
    Option("prices", ("--prices",), path_value, "file", relative=True,
           help="TOML price table adding or overriding models."),
    Option("score", ("--score",), _metric, metavar="METRIC",
           help="Score answers: exact, normalized, contains, regex:P, numeric[:TOL], "
                "choice, json:FIELD, f1, python:MODULE:FUNC."),
    Option("reference_column", ("--reference-column",), _nonempty_string, metavar="COL",
           help="Column of reference answers."),
    Option("cache", ("--cache",), _cache, "optional", metavar="[PATH]", relative=True,
           help="Serve repeated requests from the response cache "
                "[$BATCHRUNNER_CACHE, else ~/.cache/batchrunner/responses.sqlite]."),
    Option("cache_mode", ("--cache-mode",), _choice(*_CACHE_MODES), "choice",
           help="How --cache is used [read-write]; refresh sends and replaces."),
    Option("json_schema", ("--json-schema",), _schema_source, "file", metavar="FILE",
           relative=True, help="Ask for JSON matching this schema (JSON or TOML)."),
    Option("invalid_retries", ("--invalid-retries",), _integer(minimum=0), "int", metavar="N",
           help="Re-asks of an answer that fails the schema [2]."),
    Option("order", ("--order",), _choice("prefix", "input"), "choice",
           help="Sending order: rows sharing a cacheable prompt prefix together, or input "
                "order [prefix]; the output's order is the input's either way."),
    # run only, after the options estimate shares
    Option("restart", ("--restart",), _boolean, "flag", commands=RUN, job=False,
           help="Discard the checkpoint; send all."),
    Option("retry_failed", ("--retry-failed",), _boolean, "flag", commands=RUN, job=False,
           help="Send error rows again."),
    Option("quiet", ("-q", "--quiet"), _boolean, "flag", commands=RUN,
           help="Only warnings and the summary."),
    Option("log_format", ("--log-format",), _choice("text", "json"), "choice", commands=RUN,
           help="Log lines format; json shapes error lines too."),
    Option("preflight", ("--preflight/--no-preflight",), _boolean, "switch", commands=RUN,
           help="Check the run's models against GET /models before sending [on]."),
    Option("summary_json", ("--summary-json",), path_value, "file", commands=RUN,
           relative=True,
           help="Also write the final figures, with the exit code, to this JSON file."),
    Option("engine", ("--engine",), _choice("local", "ray", "batch"), "choice", commands=RUN,
           help="Where rows are processed: this process, actors on a Ray cluster, or the "
                "provider's Batch API (half the price, answers within 24 hours) [local]."),
    Option("batch_poll", ("--batch-poll",), _number(positive=True), "float",
           metavar="SECONDS", commands=RUN,
           help="--engine batch: seconds between polls of a batch's state [30]."),
    Option("batch_max_requests", ("--batch-max-requests",), _integer(minimum=1), "int",
           metavar="N", commands=RUN,
           help="--engine batch: request lines per batch at most [50,000]."),
    Option("batch_max_bytes", ("--batch-max-bytes",), _integer(minimum=1), "int",
           metavar="BYTES", commands=RUN,
           help="--engine batch: bytes of a batch's request file at most [190000000]."),
    Option("ray_address", ("--ray-address",), _nonempty_string, metavar="ADDR", commands=RUN,
           help="Ray cluster to join [RAY_ADDRESS, else a local instance]."),
    Option("ray_actors", ("--ray-actors",), _integer(minimum=1), "int", commands=RUN,
           help="Ray actors [one per CPU of the cluster]."),
    # not on the command line
    Option("models", (), _models),  # a sweep: job key `models`, or `--model` repeated
    Option("progress", (), _boolean, job=False),  # library callers: None, a bar on a terminal
)

OPTION_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
"""The options by name (RunConfig field, job key or request field)."""
