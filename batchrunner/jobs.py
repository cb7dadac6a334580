"""Job files: TOML holding the `run` options, validated and folded with the command line.

A job file's keys are the `run` options with `_` for `-` (the field names of RunConfig), and a
table `[params]` holds request body fields. The common request fields (`temperature`, `top_p`,
`max_tokens`, `stop`, `n`, `seed`) may also be written at the top level. Relative paths resolve
against the job file's folder; options given on the command line override the file.

`restart` and `retry_failed` are not job keys: they decide what one invocation does with an
existing checkpoint, and a job file that discarded its results on every cron run would be a trap.

    job = load_job(Path("jobs/nightly-eval.toml"))
    config = build_config(job, {"limit": 10, "params": {"temperature": 0.2}})
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import UsageError
from .durations import parse_deadline
from .storage import is_uri

__all__ = [
    "JOB_KEYS",
    "PATH_KEYS",
    "REQUEST_KEYS",
    "build_config",
    "load_job",
    "param_value",
]

logger = logging.getLogger(__name__)


class _Invalid(Exception):
    """A value a checker refuses; the message completes "`key` must be ..."."""


# --- value checkers: each takes a parsed value and returns it typed, or raises _Invalid -------


def _type_name(value: object) -> str:
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


def _wrong(expected: str, value: object) -> _Invalid:
    # The value is never echoed: a misplaced API key must not end up in an error message.
    return _Invalid(f"must be {expected}, not {_type_name(value)}")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _wrong("a string", value)
    return value


def _nonempty_string(value: object) -> str:
    text = _string(value)
    if text == "":
        raise _Invalid("must not be empty")
    return text


def _path(value: object) -> Path | str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _wrong("a path (a string)", value)
    if value == "":
        raise _Invalid("must not be empty")
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
            raise _Invalid(f"must be at least {minimum}, not {value}")
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
            raise _Invalid("must be a finite number")
        if positive and number <= 0:
            raise _Invalid(f"must be positive, not {value}")
        if low is not None and number < low:
            raise _Invalid(f"must be at least {low:g}, not {value}")
        if high is not None and number > high:
            raise _Invalid(f"must be at most {high:g}, not {value}")
        return number

    return check


def _choice(*options: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _string(value)
        if text not in options:
            raise _Invalid(f"must be one of {', '.join(options)}, not {text!r}")
        return text

    return check


def _url(value: object) -> str:
    text = _string(value)
    if not re.match(r"https?://[^/\s]", text):
        raise _Invalid("must be an http:// or https:// URL")
    return text


def _env_name(value: object) -> str:
    text = _string(value)
    # One NAME, or several separated by commas: the keys the Ray engine's actors share out.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*", text):
        # Most likely the key itself was pasted here; say so without repeating it.
        raise _Invalid(
            "must be the NAME of an environment variable (such as RU_LLM_API_KEY), "
            "not the key itself"
        )
    return text


def _deadline(value: object) -> str:
    # A TOML local time (`deadline = 06:00:00`) is as natural as the string "06:00".
    expected = 'a duration such as "45m" or a time of day such as "06:00"'
    if isinstance(value, dt.time):
        return value.strftime("%H:%M" if value.second == 0 else "%H:%M:%S")
    if isinstance(value, (dt.datetime, dt.date)):
        raise _Invalid(f"must be {expected}, not a date")
    if not isinstance(value, str):
        raise _wrong(expected, value)
    try:
        parse_deadline(value, dt.datetime(2000, 1, 1))
    except UsageError:
        raise _Invalid(f"must be {expected}, not {value!r}") from None
    return value.strip()


def _metric(value: object) -> str:
    from .scoring import parse_metric  # checked here so a bad metric stops before sending

    text = _nonempty_string(value)
    try:
        parse_metric(text)
    except UsageError as exc:
        raise _Invalid(f"must be a metric: {exc}") from None
    return text


def _models(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _wrong("a non-empty array of model names", value)
    if not all(isinstance(v, str) and v for v in value):
        raise _Invalid("must hold model names (non-empty strings)")
    return tuple(value)


def _cache(value: object) -> bool | Path:
    # `cache = true` (the default file), `cache = false`, or `cache = "path/to/cache.sqlite"`.
    if isinstance(value, bool):
        return value
    try:
        return _path(value)
    except _Invalid:
        raise _wrong("true, false or a path (a string)", value) from None


def _stop(value: object) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _wrong("a string or a non-empty array of strings", value)


def _json_value(value: object) -> Any:
    """Any request body field: what JSON can carry (TOML dates and NaN cannot)."""
    if isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("must be a finite number (JSON has no nan or inf)")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    raise _wrong("a value JSON can carry (string, number, boolean, array or table)", value)


def _schema_source(value: object) -> Path | dict[str, Any]:
    """`json_schema`: a schema file, or the schema written inline as a table."""
    if isinstance(value, dict):
        return _json_value(value)
    if isinstance(value, (str, os.PathLike)):
        return _path(value)
    raise _wrong("a path or a table", value)


# --- the keys ------------------------------------------------------------------------------

#: The checker of every option that may be a RunConfig field.
_OPTION_CHECKS: dict[str, Callable[[object], Any]] = {
    "input": _path,
    "output": _path,
    "model": _nonempty_string,
    "system": _string,
    "template": _nonempty_string,
    "prompt_column": _nonempty_string,
    "messages_column": _nonempty_string,
    "id_column": _nonempty_string,
    "stream": _boolean,
    "limit": _integer(minimum=0),
    "concurrency": _integer(minimum=1),
    "rpm": _number(positive=True),
    "tpm": _number(positive=True),
    "max_attempts": _integer(minimum=1),
    "timeout": _number(positive=True),
    "max_cost": _number(positive=True),
    "deadline": _deadline,
    "checkpoint_every": _integer(minimum=1),
    "base_url": _url,
    "api_key_env": _env_name,
    "local": _boolean,
    "prices": _path,
    "quiet": _boolean,
    "log_format": _choice("text", "json"),
    "summary_json": _path,
    "score": _metric,
    "reference_column": _nonempty_string,
    "models": _models,
    "preflight": _boolean,
    "cache": _cache,
    "cache_mode": _choice("read-write", "read-only", "write-only", "refresh"),
    "json_schema": _schema_source,
    "invalid_retries": _integer(minimum=0),
    "engine": _choice("local", "ray"),
    "ray_address": _nonempty_string,
    "ray_actors": _integer(minimum=1),
}

_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))

#: Job keys: the options RunConfig has (a key follows its field in and out of RunConfig).
_RUN_KEYS = {key: check for key, check in _OPTION_CHECKS.items() if key in _FIELDS}

#: Request body fields that may be top-level keys as well as `[params]` entries.
_REQUEST_CHECKS: dict[str, Callable[[object], Any]] = {
    "temperature": _number(0.0, 2.0),
    "top_p": _number(0.0, 1.0),
    "max_tokens": _integer(minimum=1),
    "stop": _stop,
    "n": _integer(minimum=1),
    "seed": _integer(),
}

#: RunConfig fields that only the command line sets (one invocation, not the job).
_INVOCATION_KEYS = {
    key: check
    for key, check in {"restart": _boolean, "retry_failed": _boolean, "progress": _boolean}.items()
    if key in _FIELDS
}

JOB_KEYS: frozenset[str] = frozenset(_RUN_KEYS) | frozenset(_REQUEST_CHECKS) | {"params"}
"""Every key a job file may hold at the top level."""

REQUEST_KEYS: frozenset[str] = frozenset(_REQUEST_CHECKS)
"""Request body fields that may be written as top-level job keys (or as options)."""

PATH_KEYS: frozenset[str] = frozenset(k for k, check in _RUN_KEYS.items() if check is _path)
"""Job keys holding paths, resolved against the job file's folder when relative."""

# Body fields batchrunner sets itself: a [params] entry for one of them would fight the option.
_RESERVED_PARAMS = {
    "model": "use the top-level `model` key",
    "stream": "use the top-level `stream` key",
    "messages": "messages come from the input (a messages column, `template` or `prompt_column`)",
}

# Fields of CreateChatCompletionRequest in tests/data/openai-chat-schema.json: used to tell a
# misplaced request field from a typo, never to refuse a field (gateways add their own).
_OPENAI_REQUEST_FIELDS = frozenset(
    """audio frequency_penalty function_call functions logit_bias logprobs max_completion_tokens
    max_tokens messages metadata modalities model moderation n parallel_tool_calls prediction
    presence_penalty prompt_cache_key prompt_cache_options prompt_cache_retention
    reasoning_effort response_format safety_identifier seed service_tier stop store stream
    stream_options temperature tool_choice tools top_logprobs top_p user verbosity
    web_search_options""".split()
)

# --- loading -------------------------------------------------------------------------------


def load_job(path: Path) -> dict[str, Any]:
    """Read and check a job file: its settings keyed by RunConfig field names.

    Only the keys the file gives are present; request fields, top-level or from `[params]`,
    are merged into "params"; relative paths are made absolute against the file's folder.
    Any problem is a UsageError naming the file and the key.

    >>> load_job(Path("jobs/quickstart.toml"))["model"]
    'gpt-4o-mini'
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"job file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line L, column C)".
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read job file {path}: {e.strerror or e}") from None

    folder = Path(os.path.abspath(path)).parent
    job: dict[str, Any] = {}
    params: dict[str, Any] = {}

    for key, value in data.items():
        if key == "params":
            continue
        if key in _RUN_KEYS:
            job[key] = _checked(_RUN_KEYS[key], value, f"{path}: `{key}`")
        elif key in _REQUEST_CHECKS:
            params[key] = _checked(_REQUEST_CHECKS[key], value, f"{path}: `{key}`")
        else:
            raise UsageError(f"{path}: {_unknown_key(key)}")

    if "params" in data:
        table = data["params"]
        if not isinstance(table, dict):
            raise UsageError(f"{path}: `params` must be a table, not {_type_name(table)}")
        for key, value in table.items():
            where = f"{path}: `params.{key}`"
            if key in _RESERVED_PARAMS:
                raise UsageError(f"{where} is not allowed: {_RESERVED_PARAMS[key]}")
            if key in params:
                raise UsageError(
                    f"{path}: `{key}` is given twice, at the top level and in [params]"
                )
            params[key] = _checked(_REQUEST_CHECKS.get(key, _json_value), value, where)
            _warn_if_typo(key, where)

    for key in PATH_KEYS & job.keys():
        if isinstance(job[key], Path):  # object-store URIs are absolute already
            job[key] = Path(os.path.normpath(folder / job[key]))
    if isinstance(job.get("json_schema"), Path):
        job["json_schema"] = Path(os.path.normpath(folder / job["json_schema"]))
    elif "json_schema" in job:  # an inline schema is checked here, where the file is known
        from .structured import load_schema

        load_schema(job["json_schema"], where=f"{path}: `json_schema`")
    if isinstance(job.get("cache"), Path):
        job["cache"] = Path(os.path.normpath(folder / job["cache"]))
    if params:
        job["params"] = params
    return job


def _checked(check: Callable[[object], Any], value: object, where: str) -> Any:
    try:
        return check(value)
    except _Invalid as e:
        raise UsageError(f"{where} {e}") from None


def _unknown_key(key: str) -> str:
    if key in ("restart", "retry_failed"):
        flag = "--" + key.replace("_", "-")
        return (
            f"`{key}` is not a job key: it applies to one invocation, "
            f"so give {flag} on the command line"
        )
    if key in ("api_key", "key"):
        return (
            f"`{key}` is not a job key: the API key never goes in a file; set `api_key_env` "
            "to the name of the environment variable that holds it"
        )
    if key in _OPENAI_REQUEST_FIELDS:
        return f"unknown key `{key}`: it is a request field, so put it under [params]"
    known = sorted(JOB_KEYS)
    underscored = key.replace("-", "_")
    close = [underscored] if underscored in JOB_KEYS else difflib.get_close_matches(key, known, 1)
    if close:
        return f"unknown key `{key}` (did you mean `{close[0]}`?)"
    return f"unknown key `{key}`; the keys are: {', '.join(known)}"


def _warn_if_typo(key: str, where: str) -> None:
    if key in _OPENAI_REQUEST_FIELDS:
        return
    close = difflib.get_close_matches(key, sorted(_OPENAI_REQUEST_FIELDS), 1, cutoff=0.8)
    if close:
        logger.warning("%s is sent as is; did you mean `%s`?", where, close[0])


# --- folding with the command line ---------------------------------------------------------


def param_value(key: str, text: str) -> Any:
    """The value of `--param KEY=TEXT`: TEXT must be JSON (SPEC section 6).

    A bare word is refused rather than guessed at, since `{type:json}` or `0.5.1` sent as a
    string would reach the gateway unnoticed; the message shows how to quote a string.

    >>> param_value("seed", "7"), param_value("user", '"batch-7"')
    (7, 'batch-7')
    """
    try:
        return json.loads(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:37] + "..."
        if text.lstrip().startswith(("{", "[")):
            hint = (
                "in an object or array, keys and strings need double quotes, e.g. "
                """--param 'response_format={"type": "json_object"}'"""
            )
        else:
            hint = f"""a string needs JSON quotes inside the shell's: --param '{key}="{shown}"'"""
        raise UsageError(f"--param {key}: {shown!r} is not JSON; {hint}") from None



def build_config(job: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> RunConfig:
    """One RunConfig from a job (from load_job, or None) and the options the user gave.

    `overrides` are keyed by RunConfig field name, plus the request fields of REQUEST_KEYS
    (--temperature ...) and "params" (--param KEY=JSON); a None value, or an empty `stop`,
    means "not given". Options win over the job file; params are merged key by key. Paths in
    `overrides` are taken as given (relative to the working directory).

    >>> build_config(load_job(Path("jobs/quickstart.toml")), {"limit": 5}).limit
    5
    """
    job = dict(job or {})
    params: dict[str, Any] = dict(job.pop("params", None) or {})
    settings: dict[str, Any] = job

    given_params: dict[str, Any] = {}
    named_params: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None or (key == "stop" and isinstance(value, (list, tuple)) and not value):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "params":
            for name, item in dict(value).items():
                where = f"--param {name}"
                if name in _RESERVED_PARAMS:
                    raise UsageError(f"{where} is not allowed: {_RESERVED_PARAMS[name]}")
                given_params[name] = _checked(_REQUEST_CHECKS.get(name, _json_value), item, where)
                _warn_if_typo(name, where)
        elif key in _REQUEST_CHECKS:
            named_params[key] = _checked(_REQUEST_CHECKS[key], value, flag)
        elif key in _RUN_KEYS or key in _INVOCATION_KEYS:
            check = _RUN_KEYS.get(key) or _INVOCATION_KEYS[key]
            settings[key] = _checked(check, value, flag)
        else:
            raise TypeError(f"build_config() got an unknown option {key!r}")

    clash = sorted(named_params.keys() & given_params.keys())
    if clash:
        name = clash[0]
        raise UsageError(f"--{name.replace('_', '-')} and --param {name} are both given")
    params.update(given_params)
    params.update(named_params)

    if overrides.get("model") is not None and overrides.get("models") is None:
        settings.pop("models", None)  # one --model on the command line replaces a job's sweep
    if len(settings.get("models", ())) == 1:
        settings["model"] = settings.pop("models")[0]
    elif settings.get("models"):
        settings["model"] = settings["models"][0]  # a sweep: rows are checked and built with it
    if "input" not in settings:
        raise UsageError("no input: give --input or `input` in the job file")
    if "output" not in settings:
        raise UsageError("no output: give --output or `output` in the job file")
    return RunConfig(params=params, **settings)
