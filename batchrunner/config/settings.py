"""Run settings: options, job files and environment folded into one frozen RunConfig."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from batchrunner.config.durations import (
    format_duration,
    parse_deadline,
    parse_duration,
)
from batchrunner.config.endpoints import Endpoint, endpoint_name
from batchrunner.config.options import (
    OPTION_BY_NAME,
    OPTIONS,
    InvalidValue,
    checked_base_url,
)
from batchrunner.config.paths import expand_date
from batchrunner.errors import UsageError
from batchrunner.redaction import remember_key

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_REQUESTS",
    "DEFAULT_BASE_URL",
    "Endpoint",
    "RunConfig",
    "endpoint_name",
    "endpoints_from_options",
    "format_duration",
    "key_env_names",
    "parse_deadline",
    "parse_duration",
    "resolve_api_key",
    "resolve_base_url",
    "resolve_endpoints",
]

DEFAULT_BASE_URL = "https://api.ru-llm.relay2.xyz/v1"
API_KEY_ENVS = ("RU_LLM_API_KEY", "OPENAI_API_KEY")
BASE_URL_ENVS = ("RU_LLM_BASE_URL", "OPENAI_BASE_URL")
#: The Batch API's limits per batch (OpenAI's: 50,000 requests and 200 MB a file), with room.
BATCH_MAX_REQUESTS = 50_000
BATCH_MAX_BYTES = 190_000_000


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, with its defaults (docs/run.md).

    `{date}` and `{date:STRFTIME}` in `output` and `summary_json` are replaced by the local
    date the config was made (the run's start), once.

    The API key is deliberately absent: only the name of the variable that holds it is kept,
    so a config can be printed, logged or pickled without leaking it.

    >>> RunConfig(input=Path("prompts.jsonl"), output=Path("out.parquet"), model="gpt-4o")
    """

    input: Path
    output: Path
    model: str | None = None
    # request building (docs/input.md)
    system: str | None = None
    template: str | None = None
    # None means the default: "prompt"; "messages" where present; "id", else
    # "custom_id", else the 0-based row number. A column named explicitly must exist.
    prompt_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None
    # request body fields (temperature, top_p, max_tokens, stop, n, seed and any --param)
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    limit: int | None = None
    # flow control (docs/run.md)
    concurrency: int = 16
    rpm: float | None = None
    tpm: float | None = None
    max_attempts: int = 6
    timeout: float = 120.0
    max_cost: float | None = None
    deadline: str | None = None
    # checkpoint and resume (docs/resume.md)
    checkpoint_every: int = 100
    restart: bool = False
    retry_failed: bool = False
    # endpoint and credentials (docs/gateway.md)
    base_url: str | None = None
    api_key_env: str | None = None
    # several gateways (docs/run.md): none means the one of base_url and api_key_env
    endpoints: tuple[Endpoint, ...] = ()
    local: bool = False
    # cost (docs/cost.md)
    prices: Path | None = None
    # response cache (docs/cache.md): True for the default file, a path for another; off when None
    cache: bool | Path | None = None
    cache_mode: str = "read-write"
    # progress and logs (docs/run.md)
    quiet: bool = False
    log_format: str = "text"
    summary_json: Path | None = None
    progress: bool | None = None  # None: a bar when stderr is a terminal
    # evaluations (docs/evaluations.md): a metric spec, the column of references; a sweep
    score: str | None = None
    reference_column: str | None = None
    models: tuple[str, ...] = ()
    # fail fast: check the run's models against GET /models before sending
    preflight: bool = True
    # structured output (docs/structured.md): a schema file, or the schema (a job's inline table)
    json_schema: Path | dict[str, Any] | None = None
    invalid_retries: int = 2
    # the order rows are sent in (docs/run.md): "prefix", rows sharing a cacheable prompt
    # prefix together (inputs/prefixes.py); "input", input order. The output's order is the same.
    order: str = "prefix"
    # where the rows are processed (docs/engines.md)
    # "local": this process; "ray": actors on a Ray cluster; "batch": the provider's Batch API
    engine: str = "local"
    batch_poll: float = 30.0  # --engine batch: seconds between polls of a batch
    batch_max_requests: int = BATCH_MAX_REQUESTS  # --engine batch: lines per batch, at most
    batch_max_bytes: int = BATCH_MAX_BYTES  # --engine batch: bytes of a request file, at most
    ray_address: str | None = None  # None: the RAY_ADDRESS cluster, else a local instance
    ray_actors: int | None = None  # None: one actor per CPU of the cluster

    def __post_init__(self) -> None:
        # {date} in the output paths: resolved once, here, so everything follows one path
        started = datetime.now().astimezone()
        for name in ("output", "summary_json"):
            value = getattr(self, name)
            if value is not None and "{" in str(value):
                flag = "--" + name.replace("_", "-")
                object.__setattr__(self, name, expand_date(value, now=started, what=flag))
        if self.endpoints and not (
            type(self.endpoints) is tuple and all(type(e) is Endpoint for e in self.endpoints)
        ):  # a library caller's list of tables
            object.__setattr__(self, "endpoints", _checked_endpoints(self.endpoints))
        _check_options(self)
        _check_combinations(self)
        if self.score is not None and not self.reference_column:
            raise UsageError("--score needs --reference-column COL (job key `reference_column`)")
        if self.models and len(set(self.models)) != len(self.models):
            raise UsageError("--model: a model is given twice in the sweep")
        if self.engine == "ray" and self.cache not in (None, False):
            raise UsageError("--cache works with the local engine only, not with --engine ray")
        if self.restart and self.retry_failed:
            raise UsageError("--restart and --retry-failed cannot be used together")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def sweep(self) -> tuple[str, ...]:
        """The models every row is sent to: the sweep's, else the one `model` (or none)."""
        if self.models:
            return self.models
        return (self.model,) if self.model else ()

    def request_settings(self) -> dict[str, Any]:
        """Every setting that changes what is sent: the checkpoint fingerprint covers these."""
        return {
            "model": self.model,
            "system": self.system,
            "template": self.template,
            "prompt_column": self.prompt_column,
            "messages_column": self.messages_column,
            "id_column": self.id_column,
            "params": self.params,
            "stream": self.stream,
            **({"models": list(self.models)} if len(self.models) > 1 else {}),
        } | self._schema_settings()

    def _schema_settings(self) -> dict[str, Any]:
        if self.json_schema is None:
            return {}  # absent, not None: checkpoints made before --json-schema stay valid
        from batchrunner.answers.structured import load_schema

        return {"json_schema": load_schema(self.json_schema).settings()}


def _checked_endpoints(value: Any) -> tuple[Endpoint, ...]:
    try:
        return OPTION_BY_NAME["endpoints"].check(value)  # type: ignore[misc,no-any-return]
    except InvalidValue as exc:
        raise UsageError(f"`endpoints` {exc}") from None


def _check_combinations(config: RunConfig) -> None:
    """Options that make no sense together: a usage error naming both."""
    endpoints = config.endpoints
    if endpoints:
        if config.base_url:
            raise UsageError("--base-url and --endpoint (job keys `base_url` and `endpoints`) "
                             "are both given: name every gateway in `endpoints`, or one with "
                             "`base_url`")
        if config.api_key_env:
            raise UsageError("--api-key-env without --endpoint, with job key `endpoints`: give "
                             "each endpoint its `api_key_env` (or one --api-key-env per "
                             "--endpoint, in the same order)")
        if config.local:
            raise UsageError("--local runs against the built-in gateway simulator: it takes no "
                             "--endpoint (job key `endpoints`)")
        seen: dict[tuple[str, str | None], int] = {}
        for i, e in enumerate(endpoints):
            same = (endpoint_name(e.base_url), e.api_key_env)
            if same in seen:
                key = f" with the same key variable {e.api_key_env}" if e.api_key_env else ""
                raise UsageError(
                    f"`endpoints` [{seen[same]}] and [{i}] are the same endpoint "
                    f"({same[0]}{key}): name each gateway (or each key of one) once"
                )
            seen[same] = i
    if config.engine == "batch":
        if len(resolved_key_names(config)) > 1:
            raise UsageError("--engine batch sends to one endpoint: give one --endpoint "
                             "(or `base_url`) and one key variable")
        if config.stream:
            raise UsageError("--stream does not apply to --engine batch: a batch's answers "
                             "come whole, in its output file")
        if config.ray_address or config.ray_actors is not None:
            raise UsageError("--ray-address and --ray-actors apply to --engine ray, "
                             "not --engine batch")
        if config.json_schema is not None:
            raise UsageError("--json-schema is not supported with --engine batch yet (its "
                             "re-asks would need a following batch): run it online")


def resolved_key_names(config: RunConfig) -> tuple[str | None, ...]:
    """The key variable of each endpoint the run sends to (None: the default variables)."""
    if config.endpoints:
        return tuple(e.api_key_env for e in config.endpoints)
    return key_env_names(config.api_key_env) or (None,)


def endpoints_from_options(
    urls: tuple[str, ...] | list[str], key_envs: tuple[str, ...] | list[str]
) -> tuple[Endpoint, ...]:
    """`--endpoint URL` repeated, with `--api-key-env NAME` repeated in the same order.

    No --api-key-env: every endpoint takes the default variables; otherwise one per endpoint.

    >>> endpoints_from_options(["https://a.example/v1", "https://b.example/v1"], ["KEY_A", "KEY_B"])
    """
    if key_envs and len(key_envs) != len(urls):
        raise UsageError(
            f"{len(urls)} --endpoint and {len(key_envs)} --api-key-env: give one "
            "--api-key-env per --endpoint, in the same order (or none, for the default "
            "RU_LLM_API_KEY / OPENAI_API_KEY)"
        )
    entries: list[dict[str, Any]] = []
    for i, url in enumerate(urls):
        entry: dict[str, Any] = {"base_url": url}
        if key_envs:
            if "," in key_envs[i]:
                raise UsageError(f"--api-key-env {key_envs[i]}: with --endpoint, one variable "
                                 "per --api-key-env (repeat the option)")
            entry["api_key_env"] = key_envs[i]
        entries.append(entry)
    try:
        return OPTION_BY_NAME["endpoints"].check(entries)  # type: ignore[misc,no-any-return]
    except InvalidValue as exc:
        # "[1].base_url must be ..." said as the option: "--endpoint 2 must be ..."
        text = str(exc)
        if text.startswith("["):
            index, _, rest = text[1:].partition("]")
            field, _, rest = rest.lstrip(".").partition(" ")
            flag = "--endpoint" if field == "base_url" else "--api-key-env"
            raise UsageError(f"{flag} #{int(index) + 1} {rest}") from None
        raise UsageError(f"--endpoint {text}") from None


def resolve_endpoints(
    config: RunConfig, environ: dict[str, str] | None = None
) -> tuple[Endpoint, ...]:
    """Every endpoint the run sends to, base URLs resolved, limits filled from the run's own.

    The declared `endpoints`; else one endpoint per key variable of `api_key_env` (one, or
    several separated by commas: the Ray engine's form) at the base URL of `resolve_base_url`.
    Each endpoint's missing rpm, tpm and concurrency are the run's. Every key variable must be
    set (a UsageError naming the variable and the option, never a value); the keys themselves
    are not returned (`resolve_api_key` reads them). Not for `--local`: the run's simulator is
    its one endpoint.
    """
    environ = os.environ if environ is None else environ
    if config.endpoints:
        declared = config.endpoints
        where = "`endpoints` [{i}] ({name})"
    else:
        url = resolve_base_url(config.base_url, environ)
        declared = tuple(Endpoint(url, name) for name in key_env_names(config.api_key_env)) or (
            Endpoint(url),)
        where = "--api-key-env"
    out = []
    for i, e in enumerate(declared):
        if e.api_key_env is not None and not environ.get(e.api_key_env, "").strip():
            place = where.format(i=i, name=e.name)
            raise UsageError(f"no API key: {place} names {e.api_key_env}, which is not set "
                             "in the environment")
        if e.api_key_env is None and not any(environ.get(n, "").strip() for n in API_KEY_ENVS):
            raise UsageError(f"no API key for {e.name}: set {' or '.join(API_KEY_ENVS)} in the "
                             "environment (or use --local to try the built-in gateway)")
        out.append(Endpoint(
            base_url=checked_base_url(e.base_url),
            api_key_env=e.api_key_env,
            rpm=config.rpm if e.rpm is None else e.rpm,
            tpm=config.tpm if e.tpm is None else e.tpm,
            concurrency=config.concurrency if e.concurrency is None else e.concurrency,
        ))
    return tuple(out)


def resolve_base_url(explicit: str | None, environ: dict[str, str] | None = None) -> str:
    """--base-url, else RU_LLM_BASE_URL, else OPENAI_BASE_URL, else the ru-llm gateway."""
    environ = os.environ if environ is None else environ
    if explicit:
        return _checked_url(explicit, "--base-url")
    for name in BASE_URL_ENVS:
        if environ.get(name):
            return _checked_url(environ[name], f"${name}")
    return DEFAULT_BASE_URL


def _checked_url(url: str, source: str) -> str:
    try:
        return checked_base_url(url)
    except InvalidValue as exc:
        raise UsageError(f"{source} {exc}") from None


def _check_options(config: RunConfig) -> None:
    """Each field given a value checked as its option is (options.py), named by its flag."""
    defaults = _DEFAULTS
    for option in OPTIONS:
        if option.check is None or option.name not in defaults:
            continue
        value = getattr(config, option.name)
        default = defaults[option.name]
        if value is None or (type(value) is type(default) and value == default):
            continue  # the defaults are valid; None means "not set"
        try:
            option.check(value)
        except InvalidValue as exc:
            raise UsageError(f"{option.flag} {exc}") from None


def key_env_names(api_key_env: str | None) -> tuple[str, ...]:
    """The variables `--api-key-env` names: one, or several separated by commas (docs/ray.md).

    >>> key_env_names("KEY_A, KEY_B")
    ('KEY_A', 'KEY_B')
    """
    if not api_key_env:
        return ()
    return tuple(name.strip() for name in api_key_env.split(",") if name.strip())


def resolve_api_key(api_key_env: str | None, environ: dict[str, str] | None = None) -> str:
    """The key from the named variable, else RU_LLM_API_KEY, else OPENAI_API_KEY.

    The error names the variables, never a value.
    """
    environ = os.environ if environ is None else environ
    if len(key_env_names(api_key_env)) > 1:
        raise UsageError(
            f"--api-key-env {api_key_env}: several keys are several endpoints of a run "
            "(docs/run.md, several endpoints); this command uses one key: name one variable"
        )
    names = (api_key_env,) if api_key_env else API_KEY_ENVS
    for name in names:
        key = environ.get(name, "").strip()  # a key pasted with its newline still works
        if key:
            if not (key.isascii() and key.isprintable() and " " not in key):
                raise UsageError(f"${name} holds characters an HTTP header cannot carry")
            remember_key(key)  # masked in every error, log line and file from now on
            return key
    wanted = " or ".join(names)
    raise UsageError(
        f"no API key: set {wanted} in the environment (or use --local to try the built-in gateway)"
    )


#: Each field's default (None for the required ones); request fields are not RunConfig fields.
_DEFAULTS: dict[str, Any] = {
    f.name: None if f.default is dataclasses.MISSING else f.default
    for f in dataclasses.fields(RunConfig)
    if f.name != "params"
}
