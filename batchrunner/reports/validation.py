"""`batchrunner validate`: the dry run of a job, every check `run` makes and the estimate.

Nothing is sent but `GET /models`: the job's options, the checkpoint's trust, the schema, the
models, every row built and its problems counted, and what the job would cost.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrunner.config.pricing import PriceTable
from batchrunner.config.settings import RunConfig, resolve_api_key, resolve_base_url
from batchrunner.engine.endpoint import run_endpoint
from batchrunner.engine.execution import _run_models, check_models
from batchrunner.engine.runner import check_job
from batchrunner.errors import UsageError
from batchrunner.inputs import storage
from batchrunner.inputs.readers import iter_records
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.inputs.scan import InputInfo
from batchrunner.reports.estimate import estimate
from batchrunner.store.layout import checkpoint_dir, trusted_manifest

__all__ = ["JobCheck", "validate_job"]

log = logging.getLogger(__name__)

PROBLEM_EXAMPLES = 5  # problem rows `validate` shows (it counts them all)


@dataclass(frozen=True)
class JobCheck:
    """What `validate_job` found, sending nothing: the input, its problem rows, the models.

    `problem_rows` are the input rows `run` would record as `error` without sending them
    (a JSONL line that is not JSON, an empty prompt, ...); `problems` are the first few of
    their errors, each naming its line or row. `models_note` says why the models were not
    checked against the gateway (unreachable, no key, --no-preflight), None when they were.
    """

    info: InputInfo
    problem_rows: int
    problems: tuple[str, ...]
    models: tuple[str, ...]
    models_note: str | None
    estimate: Any  # reports.Estimate: rows, tokens and cost, as `batchrunner estimate` says

    @property
    def ok(self) -> bool:
        """True when `run` would send every row (no problem row)."""
        return self.problem_rows == 0


def validate_job(config: RunConfig) -> JobCheck:
    """A dry run: everything `run` checks before sending, and more, with nothing sent.

    The job and its paths (`check_job`), the JSON schema compiled, the models checked against
    the gateway's GET /models (where it answers: a model it does not list is a UsageError),
    every input row built (problem rows counted), and the estimate. No chat completion is
    requested. Raises UsageError on the first error.

    >>> check = validate_job(build_config(load_job(Path("jobs/nightly-eval.toml")), {}))
    >>> check.problem_rows, check.models_note
    (0, None)
    """

    info = check_job(config)
    if not storage.is_uri(config.output):  # a checkpoint `run` would refuse to trust
        trusted_manifest(checkpoint_dir(Path(config.output)))
    checked = config.replace(model=config.models[0]) if len(config.models) > 1 else config
    if storage.is_uri(checked.input):
        checked = checked.replace(input=storage.stage_input(str(checked.input)))
    builder = RequestBuilder(checked, info.columns)
    problem_rows, problems = 0, []
    for index, record, error in iter_records(checked, columns=builder.columns):
        row = builder.build(index, record, error)
        if row.error is not None:
            problem_rows += 1
            if len(problems) < PROBLEM_EXAMPLES:
                problems.append(row.error)
    models = tuple(sorted(_run_models(checked, builder)))
    note = asyncio.run(_preflight_only(checked, builder))
    return JobCheck(
        info=info, problem_rows=problem_rows, problems=tuple(problems), models=models,
        models_note=note,
        estimate=estimate(config, prices=PriceTable.load(config.prices)),
    )


async def _preflight_only(config: RunConfig, builder: RequestBuilder) -> str | None:
    if not config.preflight:
        return "--no-preflight"
    if config.endpoints:
        from batchrunner.config.settings import resolve_endpoints

        try:  # every endpoint's key variable set: said, as a missing key is
            resolve_endpoints(config)
        except UsageError as exc:
            return str(exc)
        return (f"{len(config.endpoints)} endpoints: the run's pre-flight checks each "
                "endpoint's models")
    if not config.local:
        try:  # no key or no base URL here (validate may run where the job does not): said
            resolve_base_url(config.base_url)
            resolve_api_key(config.api_key_env)
        except UsageError as exc:
            return str(exc)
    async with run_endpoint(config) as (base_url, key):
        return await check_models(config, builder, base_url, key)
