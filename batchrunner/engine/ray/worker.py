"""One Ray actor: sends the blocks of rows the driver hands it, with batchrunner's own engine.

A block arrives as built requests (`Row`s, whose bodies the driver made with the job's
settings, numbered as in the whole input). The actor sends them with a `LocalDispatcher` of
its own: bounded concurrency, pacing, the shared 429 pause, retries, the budget, the deadline
and the failure and outage streaks all work in the actor exactly as on one machine. Its
recorder collects the results in memory and they go back to the driver, which alone writes
the run's checkpoint and output: an actor writes no file.

The API key is read here, from the actor's own environment, by the *name* of its variable:
no key ever travels through Ray (its object store, its task arguments or its logs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchrunner.answers.structured import load_schema
from batchrunner.config.settings import RunConfig, resolve_api_key
from batchrunner.errors import BatchrunnerError
from batchrunner.results import Result, Row
from batchrunner.transport.limits import Deadline

if TYPE_CHECKING:
    from batchrunner.engine.recorder import Recorder
    from batchrunner.engine.shared import RunState

__all__ = ["BlockOutcome", "BlockWorker", "LOCAL_KEY"]

#: The key actors send to the in-process simulator of `--local` (it takes any sk-ru- key):
#: a fixed, worthless value, so that not even a throwaway key goes through Ray.
LOCAL_KEY = "sk-ru-local-ray"


@dataclass(frozen=True)
class BlockOutcome:
    """How one block ended in an actor, besides its results."""

    exit_code: int
    reason: str
    message: str
    sent: int  # HTTP attempts made
    cost_usd: float  # spent on the block's results


@dataclass(frozen=True)
class WorkerSettings:
    """What one actor is given when it starts: its share of the limits and its key's name."""

    config: RunConfig
    base_url: str
    key_env: str | None  # None: the default variables; LOCAL_KEY is used when `local`
    local: bool
    concurrency: int
    rpm: float | None
    tpm: float | None
    endpoint: str | None = None  # a run of several endpoints: the name its results carry


class BlockWorker:
    """The body of the Ray actor (made remote by the driver, so Ray stays an optional extra)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._control = None
        logging.getLogger("batchrunner").setLevel(logging.ERROR)  # the driver reports the run

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def stop(self, reason: str, exit_code: int) -> None:
        """Stop the block being processed: no new requests; in-flight ones get the grace."""
        if self._control is not None:
            self._control.stop(reason, exit_code)

    async def process(
        self, rows: list[Row], max_cost: float | None, deadline_seconds: float | None
    ) -> tuple[list[Result], BlockOutcome]:
        """Send a block's rows; return their results (row numbers of the whole input)."""
        from batchrunner.engine import (  # the engine is what an actor runs
            dispatch,
            recorder,
            shared,
            state,
        )

        settings = self._settings
        try:
            key = LOCAL_KEY if settings.local else resolve_api_key(settings.key_env)
            config = _block_config(settings, max_cost)
            run = shared.RunState.for_run(config, settings.base_url, state.RunControl())
            if config.json_schema is not None:
                run.schema = load_schema(config.json_schema)
        except BatchrunnerError as exc:
            return [], BlockOutcome(exc.exit_code, "usage", str(exc), 0, 0.0)
        deadline = None if deadline_seconds is None else Deadline(max(deadline_seconds, 0.001))
        collected = recorder.CollectedResults()
        kept = recorder.Recorder(run, collected)
        self._control = run.control
        run.control.bind(run.stop_event)
        try:
            await dispatch.LocalDispatcher(run, key, deadline).dispatch(_each(rows), kept)
        finally:
            kept.end_streaks()
            self._control = None
        if run.crash is not None:
            raise run.crash
        results = collected.results
        if settings.endpoint is not None:
            results = [dataclasses.replace(r, endpoint=settings.endpoint) for r in results]
        cost = sum(r.cost_usd or 0.0 for r in results)
        code, reason, message = _ending(run, kept)
        return results, BlockOutcome(code, reason, message, run.tally.sent, cost)


async def _each(rows: list[Row]) -> AsyncIterator[Row]:
    for row in rows:
        yield row


def _ending(run: RunState, kept: Recorder) -> tuple[int, str, str]:
    """How a block's sending ended: its exit code, reason and the one line that says why."""
    from batchrunner.engine.ending import stop_message

    control = run.control
    if not control.stopping:
        return (1 if run.tally.failed else 0), "complete", ""
    reason = control.reason or "stopped"
    code = control.exit_code if control.exit_code is not None else 5
    if run.auth_error is not None:
        message = str(run.auth_error)  # the gateway's words, which the driver's message wraps
    elif reason == "outage" and run.outage.cause is not None:
        message = run.outage.cause  # the driver's own message says the rest
    elif reason == "systematic" and kept.streak.tripped:
        message = kept.streak.describe()
    elif reason == "budget" and run.budget_note is not None:
        message = f"stopped: {run.budget_note}"
    else:
        message = stop_message(reason, run.auth_error)
    return code, reason, message


def _block_config(settings: WorkerSettings, max_cost: float | None) -> RunConfig:
    """The settings of one block: the job's, with this actor's share of the limits."""
    return settings.config.replace(
        concurrency=settings.concurrency,
        rpm=settings.rpm,
        tpm=settings.tpm,
        max_cost=max_cost,
        deadline=None,  # the driver's, handed over as seconds left
        base_url=settings.base_url,
        api_key_env=settings.key_env,
        endpoints=(),  # this actor's one endpoint: the base URL and key variable above
        local=False,
        cache=None,  # the driver reads and writes the response cache
    )
