"""A result's way into the run's store and tally, past the streaks that may hold it back.

The `Recorder` owns what happens to results once a dispatcher has them: the failure streak
and the outage hold (rows held back while a streak lasts, dropped if it trips, so that they
stay pending), the tally, the `on_result` callback, and, for a run with a checkpoint, the
checkpoint writer and the flusher task that writes buffered results every half interval.
A Ray actor records into `CollectedResults` instead: it keeps no checkpoint of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from batchrunner.cache.responses import request_hash
from batchrunner.engine.preflight import FailureStreak
from batchrunner.engine.processor import Sent
from batchrunner.engine.shared import RunState, log
from batchrunner.engine.state import EXIT_SYSTEMATIC, Tally
from batchrunner.errors import StorageError
from batchrunner.results import Result, Row
from batchrunner.store.checkpoint import Checkpoint
from batchrunner.store.durability import CheckpointWriter

__all__ = ["CollectedResults", "FLUSH_SECONDS", "Recorder", "ResultCallback", "ResultStore"]

FLUSH_SECONDS = 2.0  # at most this much finished work waits for the next checkpoint write

ResultCallback = Callable[[Result, Tally], None]
AnswerCallback = Callable[[Row, "Result | None"], None]  # a sent row's result, or None: given up


class ResultStore(Protocol):
    """Where recorded results go: a run's Checkpoint, or a Ray block's list."""

    @property
    def buffered(self) -> int: ...  # results kept but not yet written

    def append(self, result: Result, row_hash: int | None, input_hash: int | None) -> None: ...


class CollectedResults:
    """The results of a Ray block, in the order they came; nothing is written."""

    buffered = 0

    def __init__(self) -> None:
        self.results: list[Result] = []

    def append(self, result: Result, row_hash: int | None, input_hash: int | None) -> None:
        self.results.append(result)


@dataclass(frozen=True)
class Held:
    """A result a streak holds back, with the hashes its checkpoint row is written with."""

    result: Result
    row_hash: int | None = None
    input_hash: int | None = None

    # What the streaks read of a result.
    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def http_status(self) -> int | None:
        return self.result.http_status

    @property
    def error(self) -> str | None:
        return self.result.error


class Recorder:
    """Results into the store and the tally: the run's one place where a result is kept."""

    def __init__(
        self,
        state: RunState,
        store: ResultStore,
        on_result: ResultCallback | None = None,
        writer: CheckpointWriter | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.on_result = on_result
        self.writer = writer  # None: results are not checkpointed (a Ray block)
        self.streak: FailureStreak[Held] = FailureStreak()
        self._flush = asyncio.Event()
        self._writes: list[Future[None]] = []  # checkpoint writes not yet known to succeed
        self._listeners: list[AnswerCallback] = []

    @classmethod
    def for_checkpoint(
        cls, state: RunState, ckpt: Checkpoint, on_result: ResultCallback | None
    ) -> Recorder:
        """A run's recorder: results into `ckpt`, written by its own writer (exit 74 on a
        failed write)."""
        return cls(state, ckpt, on_result, CheckpointWriter(ckpt))

    def listen(self, callback: AnswerCallback) -> None:
        """Have `callback(row, result)` called once a sent row has its result (or is given up:
        None), as it comes back, before any streak holds it."""
        self._listeners.append(callback)

    def answered(self, row: Row, result: Result | None) -> None:
        """Tell the listeners that a sent row came back (a dispatcher calls this)."""
        for callback in self._listeners:
            callback(row, result)

    def record_answer(self, sent: Sent, row: Row) -> None:
        """Record a sent row's result, unless it extends a streak of identical failures or of
        rows the gateway did not answer (then it is held back, and dropped if the streak trips:
        the row stays pending)."""
        self.answered(row, sent.result)
        state = self.state
        row_hash = request_hash(row.body) if row.body is not None else None
        held = Held(sent.result, row_hash, row.input_hash)
        if sent.no_answer:
            if state.outage.hold(held):
                state.stop_for_outage()
            return
        for earlier in state.outage.release():  # an answer: the rows held before it did fail
            self._keep(earlier)
        was_tripped = self.streak.tripped
        for ready in self.streak.observe(held, sent.failure_key):
            self._keep(ready)
        if self.streak.tripped and not was_tripped:
            log.warning(
                "stopping: the last %d answered rows all failed the same way: %s; "
                "no new requests are sent", self.streak.count, self.streak.error()
            )
            state.control.stop("systematic", EXIT_SYSTEMATIC)

    def end_streaks(self) -> None:
        """The rows the streaks still hold as the dispatch ends.

        A failure streak that did not trip: its rows are real results. Rows the gateway did not
        answer (fewer than the outage's limit): failed rows when every row was sent; pending
        when the run stops for another reason (they got no answer: the next run sends them).
        """
        for held in self.streak.release():
            self._keep(held)
        for held in self.state.outage.release():
            if not self.state.control.stopping:
                self._keep(held)

    def _keep(self, held: Held) -> None:
        self.record(held.result, held.row_hash, held.input_hash)

    def record(
        self,
        result: Result,
        row_hash: int | None = None,
        input_hash: int | None = None,
        *,
        body: dict[str, Any] | None = None,
    ) -> None:
        """Keep a result; `row_hash` is its body's (made from `body` when not given)."""
        if row_hash is None and body is not None:
            row_hash = request_hash(body)
        state = self.state
        self.store.append(result, row_hash, input_hash)
        if self.writer is None:  # nothing to wait for: kept is durable here
            state.gate.received()
            state.gate.written(1)
        else:
            state.gate.received()
        state.tally.add(result)
        # A write starts when half an interval waits: the other half may arrive while it is
        # written, so the durability gate (interval + in flight) holds requests back only when
        # the disk is slower than that, not at every write.
        if self.store.buffered >= max(1, state.config.checkpoint_every // 2):
            self._flush.set()
        if self.on_result is not None:
            self.on_result(result, state.tally)

    async def durable(self) -> bool:
        """Wait until every result recorded so far is in the checkpoint (a write is asked for
        at once); False when a checkpoint write failed. For a dispatcher that must know its
        answers are kept before it takes the next step (the Batch API's ledger)."""
        if self.writer is None:
            return True
        self._flush.set()
        while self.state.gate.undurable > 0:
            if self.writer.fault is not None or self.state.crash is not None:
                return False
            await asyncio.sleep(0.01)
        return self.writer.fault is None

    # -- the checkpoint ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def checkpointing(self) -> AsyncIterator[None]:
        """The flusher while the body runs; at the end, everything that finished made durable.

        Every dispatcher runs inside it; without a writer it does nothing.
        """
        if self.writer is None:
            yield
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        flusher = asyncio.create_task(self._flush_loop(executor))
        flusher.add_done_callback(self.state.on_task_done)
        try:
            yield
            if self.state.crash is not None:
                raise self.state.crash
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            # The last write, and the last attempt at what a failed write left behind.
            self._writes.append(executor.submit(self.writer.write, self._take_batch()))
            self._writes.append(executor.submit(self.writer.last_attempt))
            executor.shutdown(wait=True)
            for write in self._writes:
                write.result()  # a failed checkpoint write is an error, never a silent loss

    def _take_batch(self) -> Any:
        assert self.writer is not None
        return self.writer.ckpt.take_batch()

    async def _flush_loop(self, executor: ThreadPoolExecutor) -> None:
        """Write the buffered results every half `checkpoint_every` rows or FLUSH_SECONDS."""
        assert self.writer is not None
        state = self.state
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # lands as the event fires, and this task would then never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_SECONDS):
                    await self._flush.wait()
            self._flush.clear()
            batch = self._take_batch()
            if batch is None:
                continue
            write = executor.submit(self.writer.write, batch)
            self._writes.append(write)
            # Shielded: cancelling this task at the end must not cancel a write whose rows
            # have already left the buffer (they would be lost); the end waits for it instead.
            await asyncio.shield(asyncio.wrap_future(write))
            self._writes = [w for w in self._writes if not w.done() or w.exception()]
            if self.writer.fault is not None:  # no new request from now on
                state.control.stop("storage", StorageError.exit_code)
                return
            state.gate.written(batch.num_rows)
