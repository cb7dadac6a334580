"""Where a run starts: `arun` and `run`, the choice of engine, the checks made before sending.

`arun` runs a job: object-store inputs and outputs staged, `--engine ray` sent to the Ray
driver (`ray/`), every other run to `execution.Run`: with the local dispatcher against its
endpoint (`endpoint.py`: the configured gateway, or the simulator of `--local`); with
`--engine batch`, the Batch API's (`batch/`); when it names several endpoints, with the
dispatcher of `fleet.py` over them all. `check_job` and `list_models` are what
`validate`, `estimate` and `models` share with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from batchrunner.answers.structured import load_schema
from batchrunner.config.pricing import PriceTable
from batchrunner.config.settings import RunConfig, resolve_api_key
from batchrunner.engine.endpoint import endpoint, run_endpoint, run_endpoints
from batchrunner.engine.execution import (
    ResultCallback,
    Run,
    StartCallback,
    _check_scoring,
)
from batchrunner.engine.fleet import Fleet
from batchrunner.engine.state import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    RunControl,
    RunReport,
)
from batchrunner.inputs import storage
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.inputs.scan import InputInfo, scan_input
from batchrunner.store.checkpoint import check_output_apart
from batchrunner.store.export import check_output, check_writable
from batchrunner.transport.client import Client
from batchrunner.transport.limits import parse_deadline
from batchrunner.transport.openfiles import ensure_room_for

__all__ = ["arun", "check_job", "list_models", "run"]

log = logging.getLogger(__name__)


async def arun(
    config: RunConfig,
    *,
    on_result: ResultCallback | None = None,
    control: RunControl | None = None,
    on_start: StartCallback | None = None,
) -> RunReport:
    """Run a job to the end, or until stopped; return its RunReport.

    `on_start(tally)` is called once, as sending starts (resumed rows already counted);
    `on_result(result, tally)` once a row has a result.

    >>> report = await arun(RunConfig(input=Path("prompts.jsonl"),
    ...                               output=Path("out.parquet"), model="gpt-4o", local=True))
    >>> report.exit_code
    0
    """
    control = control or RunControl()
    check_output_apart(config.input, config.output)  # the input is never overwritten
    if storage.is_uri(config.input) or storage.is_uri(config.output):
        # Object-store paths: the run works on local copies kept in step with the store.
        return await storage.staged_run(
            config,
            lambda local: arun(local, on_result=on_result, control=control, on_start=on_start),
        )
    if config.engine == "ray":
        from batchrunner.engine.ray import (
            arun_on_ray,  # Ray is an extra: imported only when asked for
        )

        return await arun_on_ray(config, on_result=on_result, control=control)
    config, several = run_endpoints(config)
    if several:  # rows shared out among them (fleet.py)
        keys = [resolve_api_key(e.api_key_env) for e in several]
        fleet = Fleet(several, keys)
        return await Run(config, several[0].base_url, keys[0], on_result, control, on_start,
                         fleet=fleet).execute()
    async with run_endpoint(config) as (base_url, key):  # --local: the simulator's (local.py)
        dispatcher = None
        if config.engine == "batch":  # the provider's Batch API
            from batchrunner.engine.batch import batch_dispatcher

            dispatcher = batch_dispatcher(key)
        return await Run(config, base_url, key, on_result, control, on_start,
                         dispatcher=dispatcher).execute()


def run(
    config: RunConfig,
    *,
    on_result: ResultCallback | None = None,
    control: RunControl | None = None,
    handle_signals: bool = True,
    on_start: StartCallback | None = None,
) -> RunReport:
    """Synchronous `arun`: Ctrl-C and SIGTERM stop the run cleanly (exit 130 / 143).

    A second Ctrl-C gives the requests in flight no more time, writes the answers already
    received to the checkpoint and exits; a third exits at once (the checkpoint stays readable).
    """
    control = control or RunControl()

    async def main() -> RunReport:
        if handle_signals and threading.current_thread() is threading.main_thread():
            _install_signal_handlers(control)
        return await arun(config, on_result=on_result, control=control, on_start=on_start)

    with _rarer_young_collections(), asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
        return runner.run(main())


YOUNG_GC_THRESHOLD = 20_000  # allocations between young collections while a run goes


@contextlib.contextmanager
def _rarer_young_collections() -> Iterator[None]:
    """Python's cyclic garbage collector, run less often while the run goes.

    A run's objects are freed by reference counting (almost none are in cycles), but with a
    hundred requests in flight the number alive swings by thousands, and at Python's default
    threshold (700) that set off a young collection every 14 rows and a full one every 0.7 s:
    a seventh of the run's CPU, about 60 µs a row (bench/README.md). Above the swing,
    collections are rare; the few cycles are still collected. The thresholds are put back
    afterwards: `run` is also called from other programs.
    """
    before = gc.get_threshold()
    if before[0] == 0:  # the program turned collection off: leave it so
        yield
        return
    gc.set_threshold(max(before[0], YOUNG_GC_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency, but not on Windows).

    It takes about a sixth off the CPU each request costs (bench/README.md); nothing else
    changes, so its absence costs only speed.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _install_signal_handlers(control: RunControl) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(reason: str, code: int) -> None:
        if control.stopping and reason == "interrupted":
            if control.hurrying:  # a third Ctrl-C: the checkpoint write itself is not awaited
                log.warning("interrupted a third time: quitting now; what was checkpointed "
                            "is kept: run the same command again to resume")
                os._exit(code)
            again = " again" if control.reason == "interrupted" else ""
            log.warning(
                "interrupted%s: not waiting for the requests in flight; writing the answers "
                "received to the checkpoint, then quitting (Ctrl-C again to quit without "
                "writing them)", again
            )
            control.hurry(reason, code)
            return
        control.stop(reason, code)

    loop.add_signal_handler(signal.SIGINT, on_signal, "interrupted", EXIT_SIGINT)
    loop.add_signal_handler(signal.SIGTERM, on_signal, "terminated", EXIT_SIGTERM)


def check_job(config: RunConfig) -> InputInfo:
    """Everything `run` checks before sending, without sending: the input, template, prices.

    Raises UsageError (or InputError) on the first problem; returns what the input holds.
    """
    if config.deadline:
        parse_deadline(config.deadline, datetime.now().astimezone())
    PriceTable.load(config.prices)
    check_output(config.output)
    check_output_apart(config.input, config.output)
    if config.summary_json is not None:
        check_writable(config.summary_json, what="--summary-json")
    if config.json_schema is not None:  # compiled, its $refs resolved, as the run does
        load_schema(config.json_schema)
    if len(config.models) > 1:
        config = config.replace(model=config.models[0])
    if storage.is_uri(config.input):
        config = config.replace(input=storage.stage_input(str(config.input)))
    ensure_room_for(config.concurrency)  # the open-file limit, as the client checks it
    info = scan_input(config)
    RequestBuilder(config, info.columns)
    _check_scoring(config, info.columns)
    return info


async def list_models(
    *, base_url: str | None = None, api_key_env: str | None = None, local: bool = False
) -> list[dict[str, Any]]:
    """The models the gateway lists (GET /models)."""
    async with endpoint(local, base_url, api_key_env) as (url, key):
        async with Client(url, key, concurrency=1, timeout=30) as client:
            return await client.models()
