"""What one run shares with its callers: the running Tally, the final RunReport, RunControl.

Values and the exit codes (docs/exit-codes.md); no I/O. The engine's parts (engine.py, dispatch.py,
row.py, recording.py) and the progress display read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrunner.results import Result
from batchrunner.store.failures import ErrorCount

__all__ = ["Abandon", "EndpointFigures", "RunControl", "RunReport", "Tally"]

EXIT_OK, EXIT_ROW_ERRORS, EXIT_AUTH, EXIT_STOPPED = 0, 1, 4, 5
EXIT_SYSTEMATIC = 3  # every answered row failed the same way, or the gateway is down
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


@dataclass
class Tally:
    """Running counts of a run, read by progress displays (mutated only by the engine)."""

    rows: int = 0
    resumed: int = 0
    ok: int = 0
    failed: int = 0
    sent: int = 0  # HTTP attempts this session that reached the gateway
    timed_out_after_sending: int = 0  # of those, attempts that timed out: maybe billed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0  # paid: what the response cache served is in reused_cost_usd
    started: float = dataclasses.field(default_factory=time.monotonic)
    cache_hits: int = 0
    reused_cost_usd: float = 0.0
    #: a run of several endpoints: this session's figures per endpoint that answered
    by_endpoint: dict[str, Tally] = dataclasses.field(default_factory=dict)

    @property
    def done(self) -> int:
        """Rows with a result, resumed ones included."""
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def add(self, result: Result) -> None:
        """Count one result (and under its endpoint, in a run of several)."""
        self._count(result)
        if result.endpoint is not None:
            part = self.by_endpoint.get(result.endpoint)
            if part is None:
                part = self.by_endpoint[result.endpoint] = Tally()
            part._count(result)

    def _count(self, result: Result) -> None:
        if result.ok:
            self.ok += 1
        else:
            self.failed += 1
        usage = result.usage
        self.prompt_tokens += usage.prompt_tokens or 0
        self.completion_tokens += usage.completion_tokens or 0
        self.cached_tokens += usage.cached_tokens or 0
        self.total_tokens += usage.total_tokens or 0
        if result.cache_hit:
            self.cache_hits += 1
            self.reused_cost_usd += result.cost_usd or 0.0
        else:
            self.cost_usd += result.cost_usd or 0.0


@dataclass(frozen=True)
class EndpointFigures:
    """One endpoint's share of a run of several: the rows it answered this session, their
    tokens and cost."""

    endpoint: str
    ok: int
    failed: int
    total_tokens: int
    cost_usd: float

    @classmethod
    def of(cls, endpoint: str, tally: Tally) -> EndpointFigures:
        return cls(endpoint, tally.ok, tally.failed, tally.total_tokens, tally.cost_usd)

    @property
    def rows(self) -> int:
        return self.ok + self.failed


@dataclass(frozen=True)
class RunReport:
    """How a run ended: its figures and its exit code (docs/exit-codes.md)."""

    exit_code: int
    reason: str  # complete, budget, deadline, interrupted, terminated, auth, systematic, outage
    output: Path
    rows: int
    ok: int
    failed: int
    resumed: int
    sent: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost_usd: float
    wall_seconds: float
    message: str = ""
    errors: tuple[ErrorCount, ...] = ()  # the most frequent errors, most first
    cache_hits: int = 0  # rows served from the response cache, this run and earlier ones
    reused_cost_usd: float = 0.0  # what they cost when first paid (not in cost_usd)
    timed_out_after_sending: int = 0  # attempts that timed out once sent: the gateway may bill
    input_changed: bool = False  # the input's size or mtime differ at the end from the start
    endpoints: tuple[EndpointFigures, ...] = ()  # a run of several endpoints: each one's share

    @property
    def pending(self) -> int:
        """Rows with no result yet (resumable)."""
        return max(0, self.rows - self.ok - self.failed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, as `--summary-json` writes it."""
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        data["pending"] = self.pending
        data["cost_usd"] = round(self.cost_usd, 10)
        data["reused_cost_usd"] = round(self.reused_cost_usd, 10)
        data["wall_seconds"] = round(self.wall_seconds, 3)
        data["errors"] = [e.to_dict() for e in self.errors]
        return data


class RunControl:
    """A handle to stop a run from outside: signals, a UI, a test, another thread.

    `stop` may be called from any thread (a notebook's cell while the run goes on in another):
    the run's event is set on the run's own event loop. `hurry` is the second Ctrl-C: requests
    in flight are given no more time; what was received is still written to the checkpoint.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.exit_code: int | None = None
        self.hurrying = False
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, event: asyncio.Event) -> None:
        """Attach to the running engine's stop event (done by the engine, on its loop)."""
        self._event = event
        self._loop = asyncio.get_running_loop()
        if self.reason is not None:
            event.set()

    def stop(self, reason: str, exit_code: int) -> None:
        """Ask the run to stop sending; the first reason given wins."""
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code
        self._wake()

    def hurry(self, reason: str, exit_code: int) -> None:
        """Stop now: no grace for requests in flight; this reason and code replace the first."""
        self.reason, self.exit_code = reason, exit_code
        self.hurrying = True
        self._wake()

    def _wake(self) -> None:
        event, loop = self._event, self._loop
        if event is None or loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        elif not loop.is_closed():
            # asyncio's objects belong to their loop: set it there, not from this thread
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the run ended
                loop.call_soon_threadsafe(event.set)

    @property
    def stopping(self) -> bool:
        """True once a stop was asked."""
        return self.reason is not None


class Abandon(Exception):
    """A row given up without a result because the run is stopping; it stays pending."""
