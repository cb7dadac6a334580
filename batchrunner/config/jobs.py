"""Job files: TOML holding the `run` options, validated and folded with the command line.

A job file's keys are the `run` options with `_` for `-` (the field names of RunConfig), and a
table `[params]` holds request body fields. The common request fields (`temperature`, `top_p`,
`max_tokens`, `stop`, `n`, `seed`) may also be written at the top level. Relative paths resolve
against the job file's folder; options given on the command line override the file.

`restart` and `retry_failed` are not job keys: they decide what one invocation does with an
existing checkpoint, and a job file that discarded its results on every cron run would be a trap.
The keys, their checks and which of them are paths come from options.py, as the CLI's do.

    job = load_job(Path("jobs/nightly-eval.toml"))
    config = build_config(job, {"limit": 10, "params": {"temperature": 0.2}})
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from batchrunner.config.options import (
    OPTION_BY_NAME,
    OPTIONS,
    InvalidValue,
    json_value,
    path_value,
    type_name,
)
from batchrunner.config.settings import RunConfig
from batchrunner.errors import UsageError

__all__ = [
    "JOB_KEYS",
    "PATH_KEYS",
    "REQUEST_KEYS",
    "build_config",
    "load_job",
    "param_value",
]

logger = logging.getLogger(__name__)


# The keys and their checks come from the one description of each option (options.py).

#: Job keys that go to RunConfig, with their checks (a key follows its field in and out).
_RUN_KEYS: dict[str, Callable[[object], Any]] = {
    o.name: o.check for o in OPTIONS if o.job and not o.request and o.check is not None
}

#: Request body fields that may be top-level keys as well as `[params]` entries.
_REQUEST_CHECKS: dict[str, Callable[[object], Any]] = {
    o.name: o.check for o in OPTIONS if o.request and o.check is not None
}

#: RunConfig fields that only the command line (or a library caller) sets: one invocation.
_INVOCATION_KEYS: dict[str, Callable[[object], Any]] = {
    o.name: o.check for o in OPTIONS if not o.job and o.check is not None
}

#: Job keys holding a path relative to the job file's folder (or an object-store URI).
_RELATIVE_KEYS = frozenset(o.name for o in OPTIONS if o.job and o.relative)

JOB_KEYS: frozenset[str] = frozenset(o.name for o in OPTIONS if o.job)
"""Every key a job file may hold at the top level."""

REQUEST_KEYS: frozenset[str] = frozenset(_REQUEST_CHECKS)
"""Request body fields that may be written as top-level job keys (or as options)."""

PATH_KEYS: frozenset[str] = frozenset(k for k, check in _RUN_KEYS.items() if check is path_value)
"""Job keys holding paths, resolved against the job file's folder when relative."""

# Body fields batchrunner sets itself: a [params] entry for one of them would fight the option.
_RESERVED_PARAMS = {
    "model": "use the top-level `model` key",
    "stream": "use the top-level `stream` key",
    "messages": "messages come from the input (a messages column, `template` or `prompt_column`)",
}
# The same, said to the command line (`--param model=gpt-4o`): the option to use instead.
_RESERVED_FLAGS = {
    "model": "use --model (-m), e.g. -m gpt-4o; repeat it for a sweep",
    "stream": "use --stream or --no-stream",
    "messages": "messages come from the input (a messages column, --template or --prompt-column)",
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

    if "model" in data and "models" in data:
        raise UsageError(f"{path}: `model` and `models` are both given: keep `model` for one "
                         "model, or `models` for a sweep over several")
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
            raise UsageError(f"{path}: `params` must be a table, not {type_name(table)}")
        for key, value in table.items():
            where = f"{path}: `params.{key}`"
            if key in _RESERVED_PARAMS:
                raise UsageError(f"{where} is not allowed: {_RESERVED_PARAMS[key]}")
            if key in params:
                raise UsageError(
                    f"{path}: `{key}` is given twice, at the top level and in [params]"
                )
            params[key] = _checked(_REQUEST_CHECKS.get(key, json_value), value, where)
            _warn_if_typo(key, where)

    for key in _RELATIVE_KEYS & job.keys():
        if isinstance(job[key], Path):  # object-store URIs are absolute already
            job[key] = Path(os.path.normpath(folder / job[key]))
    if "json_schema" in job and not isinstance(job["json_schema"], Path):
        # an inline schema is checked here, where the file is known
        from batchrunner.answers.structured import load_schema

        load_schema(job["json_schema"], where=f"{path}: `json_schema`")
    if params:
        job["params"] = params
    return job


def _checked(check: Callable[[object], Any], value: object, where: str) -> Any:
    try:
        return check(value)
    except InvalidValue as e:
        raise UsageError(f"{where} {e}") from None


def _unknown_key(key: str) -> str:
    option = OPTION_BY_NAME.get(key)
    if option is not None and not option.job and option.flags:
        flag = option.flag
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
    """The value of `--param KEY=TEXT`: TEXT must be JSON (docs/run.md).

    A bare word is refused rather than guessed at, since `{type:json}` or `0.5.1` sent as a
    string would reach the gateway unnoticed; the message shows how to quote a string.

    >>> param_value("seed", "7"), param_value("user", '"batch-7"')
    (7, 'batch-7')
    """
    if key in _RESERVED_FLAGS:  # advice on quoting first would lead to a second refusal
        raise UsageError(f"--param {key} is not allowed: {_RESERVED_FLAGS[key]}")
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
    # The command line's gateways replace the job file's, whichever way either names them.
    if overrides.get("endpoints"):
        settings.pop("base_url", None)
        settings.pop("api_key_env", None)
    elif overrides.get("base_url"):
        settings.pop("endpoints", None)
    for key, value in overrides.items():
        if value is None or (key == "stop" and isinstance(value, (list, tuple)) and not value):
            continue
        flag = "--" + key.replace("_", "-")  # `models` too: named by its field
        if key == "params":
            for name, item in dict(value).items():
                where = f"--param {name}"
                if name in _RESERVED_FLAGS:
                    raise UsageError(f"{where} is not allowed: {_RESERVED_FLAGS[name]}")
                given_params[name] = _checked(_REQUEST_CHECKS.get(name, json_value), item, where)
                _warn_if_typo(name, where)
        elif key in _REQUEST_CHECKS:
            named_params[key] = _checked(_REQUEST_CHECKS[key], value, flag)
        elif key in _RUN_KEYS or key in _INVOCATION_KEYS:
            check = _RUN_KEYS.get(key) or _INVOCATION_KEYS[key]
            settings[key] = _checked(check, value, flag)
        else:
            raise TypeError(f"build_config() got an unknown option {key!r}")

    if overrides.get("model") is not None and overrides.get("models") is not None:
        raise UsageError("`model` and `models` are both given: keep `model` for one model, "
                         "or `models` for a sweep over several")
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
