"""What the parts of one run share: `RunState`, one typed value made when the run starts.

The run's parts (the row feed, a dispatcher and its row processors, the recorder, the end)
each hold the same `RunState` and nothing of one another. It carries the settings, the
running tally, the controls that stop the run (and why it stopped), the budget, the
durability gate, the response cache and the outage watch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from batchrunner.cache.session import CacheSession
from batchrunner.config.pricing import PriceTable
from batchrunner.config.settings import RunConfig
from batchrunner.engine.preflight import Outage
from batchrunner.engine.state import EXIT_AUTH, EXIT_SYSTEMATIC, RunControl, Tally
from batchrunner.errors import AuthRefused, UsageError
from batchrunner.store.durability import DurabilityGate
from batchrunner.transport.limits import Budget

__all__ = ["CRASH_EXIT", "DEFAULT_COMPLETION_GUESS", "RunState"]

log = logging.getLogger("batchrunner.engine.runner")

CRASH_EXIT = 70  # a task of the run raised: a bug (crash.py's EXIT_INTERNAL)
DEFAULT_COMPLETION_GUESS = 256  # tokens, for tpm pacing before any usage has come back


@dataclass(eq=False)
class RunState:
    """The state one run's parts share; lives for one run (or one Ray block)."""

    config: RunConfig
    control: RunControl
    base_url: str
    prices: PriceTable
    budget: Budget | None
    gate: DurabilityGate
    outage: Outage[Any]  # holds the recorder's held rows
    tally: Tally = field(default_factory=Tally)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    cache: CacheSession | None = None
    schema: Any = None  # the --json-schema's compiled Schema
    completion_guess: float = float(DEFAULT_COMPLETION_GUESS)  # a moving mean, for --tpm
    crash: BaseException | None = None  # the first task of the run that raised (a bug)
    auth_error: AuthRefused | None = None
    budget_note: str | None = None  # why the budget bought nothing, where it did not
    feed_error: UsageError | None = None  # the input broke part-way
    warned: set[str] = field(default_factory=set)  # warnings said once a run
    pending_batches: int = 0  # --engine batch: batches left at the gateway as the run ends

    @classmethod
    def for_run(cls, config: RunConfig, base_url: str, control: RunControl) -> RunState:
        """The state of a run of `config` against `base_url`."""
        return cls(
            config=config,
            control=control,
            base_url=base_url,
            prices=PriceTable.load(config.prices),
            budget=Budget(config.max_cost) if config.max_cost is not None else None,
            gate=DurabilityGate(config.checkpoint_every + config.concurrency),
            outage=Outage(base_url),
        )

    def refused(self, exc: AuthRefused) -> None:
        """The gateway refused the key: the run stops (exit 4)."""
        self.auth_error = exc
        self.control.stop("auth", EXIT_AUTH)

    def stop_for_outage(self) -> None:
        """The gateway is unreachable or down: no new requests; the rows held stay pending."""
        self.outage.take_dropped()
        log.warning("stopping: %s; no new requests are sent", self.outage.cause)
        self.control.stop("outage", EXIT_SYSTEMATIC)

    def on_task_done(self, task: asyncio.Task[Any]) -> None:
        """A task of the run that raised is a bug: the run stops and ends with it (exit 70).

        Whichever task it was (the feeder, a worker, a watcher, the flusher), the others are
        not left waiting for it: the stop ends them, and the run raises the first such error
        once what is done is checkpointed.
        """
        if task.cancelled() or task.exception() is None:
            return
        if self.crash is None:
            self.crash = task.exception()
        self.control.stop("crashed", CRASH_EXIT)
