"""The dispatch of a run: a feeder (with the response cache), workers, a flusher, watchers.

`Dispatch` is a part of `engine._Run` (a mixin: the state is the run's). The feeder streams
rows into a bounded queue, serving what the response cache holds; a fixed set of workers takes
rows from it to `RowProcessing._process`; one flusher task writes the buffered results to the
checkpoint; watchers end the run at a deadline or a stop. The Ray driver replaces `_dispatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from batchrunner.cache.session import LOOKUP_ROWS
from batchrunner.config.settings import RunConfig
from batchrunner.engine.state import EXIT_STOPPED
from batchrunner.engine.sweep import sweep_rows
from batchrunner.errors import StorageError, UsageError
from batchrunner.inputs.formats import detect_format
from batchrunner.inputs.readers import iter_hashed_records
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.results import Result, Row
from batchrunner.store.checkpoint import Checkpoint
from batchrunner.store.resume import DoneSet
from batchrunner.transport.client import Client

if TYPE_CHECKING:
    from batchrunner.transport.limits import Deadline

log = logging.getLogger("batchrunner.engine.runner")

FLUSH_SECONDS = 2.0  # at most this much finished work waits for the next checkpoint write
STOP_GRACE_SECONDS = 5.0  # in-flight requests get this long to finish after Ctrl-C or a deadline
CRASH_EXIT = 70  # a task of the run raised: a bug (crash.py's EXIT_INTERNAL)


class _RowQueue:
    """The rows waiting for a worker, at most `size`; the feeder refills it by halves.

    An asyncio.Queue bounded at `size` wakes its waiting feeder for every row a worker takes:
    one more task step for the event loop per row. Here a full queue's feeder waits until half
    of it is free and then fills it again in one go: one wake-up per `size / 2` rows.
    """

    def __init__(self, size: int) -> None:
        self._rows: asyncio.Queue[Row | None] = asyncio.Queue()  # the bound is kept here
        self._size = size
        self._room = asyncio.Event()

    async def put(self, row: Row | None) -> None:
        if self._rows.qsize() >= self._size:
            self._room.clear()
            await self._room.wait()
        self._rows.put_nowait(row)

    async def get(self) -> Row | None:
        row = await self._rows.get()
        if self._rows.qsize() <= self._size // 2:
            self._room.set()
        return row


class Dispatch:
    """`_Run`'s dispatch part: feeds rows to the workers and the results to the checkpoint."""

    async def _dispatch(
        self, ckpt: Checkpoint, builder: RequestBuilder, done: DoneSet, deadline: Deadline | None
    ) -> None:
        config = self.config
        queue = _RowQueue(2 * config.concurrency)
        async with Client(
            self.base_url, self._api_key, concurrency=config.concurrency, timeout=config.timeout
        ) as client, self._checkpointing(ckpt):
            self.client = client
            workers = [
                asyncio.create_task(self._worker(queue, ckpt)) for _ in range(config.concurrency)
            ]
            feeder = asyncio.create_task(self._feed(queue, ckpt, builder, done))
            watchers = [asyncio.create_task(self._watch_stop(workers))]
            if deadline is not None:
                watchers.append(asyncio.create_task(self._watch_deadline(deadline)))
            for task in (feeder, *workers, *watchers):
                task.add_done_callback(self._on_task_done)
            try:
                await asyncio.gather(*workers, return_exceptions=True)
                if self.crash is not None:
                    raise self.crash
            finally:
                for task in (feeder, *workers, *watchers):
                    task.cancel()
                await asyncio.gather(feeder, *workers, *watchers, return_exceptions=True)
                self._end_streaks(ckpt)

    def _end_streaks(self, ckpt: Checkpoint) -> None:
        """The rows the streaks still hold as the dispatch ends.

        A failure streak that did not trip: its rows are real results. Rows the gateway did not
        answer (fewer than the outage's limit): failed rows when every row was sent; pending
        when the run stops for another reason (they got no answer: the next run sends them).
        """
        if self._outage_timer is not None:
            self._outage_timer.cancel()
            self._outage_timer = None
        for held in self.streak.release():
            self._record(ckpt, held, *self._held_hashes.pop(id(held), (None, None)))
        for held in self.outage.release():
            hashes = self._held_hashes.pop(id(held), (None, None))
            if not self.control.stopping:
                self._record(ckpt, held, *hashes)

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        """A task of the run that raised is a bug: the run stops and ends with it (exit 70).

        Whichever task it was (the feeder, a worker, a watcher, the flusher), the others are not
        left waiting for it: the stop ends them, and `_dispatch` raises the first such error
        once what is done is checkpointed.
        """
        if task.cancelled() or task.exception() is None:
            return
        if self.crash is None:
            self.crash = task.exception()
        self.control.stop("crashed", CRASH_EXIT)

    @contextlib.asynccontextmanager
    async def _checkpointing(self, ckpt: Checkpoint) -> AsyncIterator[None]:
        """The flusher while the body runs; at the end, everything that finished made durable.

        Both engines' dispatch run inside it (the Ray driver's too).
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        flusher = asyncio.create_task(self._flush_loop(ckpt, executor))
        flusher.add_done_callback(self._on_task_done)
        try:
            yield
            if self.crash is not None:
                raise self.crash
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            # The last write, and the last attempt at what a failed write left behind.
            self._writes.append(executor.submit(self.writer.write, ckpt.take_batch()))
            self._writes.append(executor.submit(self.writer.last_attempt))
            executor.shutdown(wait=True)
            for write in self._writes:
                write.result()  # a failed checkpoint write is an error, never a silent loss

    async def _feed(
        self,
        queue: _RowQueue,
        ckpt: Checkpoint,
        builder: RequestBuilder,
        done: DoneSet,
    ) -> None:
        cached = self.cache is not None and self.cache.reads
        lookups: list[Row] = []
        # One batch is looked up (in the cache's thread) while the one before is served, so
        # that the workers never wait for the cache.
        looking: tuple[list[Row], asyncio.Future[Any]] | None = None
        try:
            for row in self._rows(builder, done):
                if self.stop_event.is_set():
                    return
                if row.body is None:  # an input error: recorded, never sent
                    self._record(ckpt, _input_error_result(row, row.model or self.config.model))
                    continue
                if cached:  # looked up in batches; only the misses are queued
                    lookups.append(row)
                    if len(lookups) >= LOOKUP_ROWS:
                        looking = await self._look_up(lookups, looking, queue, ckpt)
                        lookups = []
                    continue
                await queue.put(row)
            if lookups:
                looking = await self._look_up(lookups, looking, queue, ckpt)
            if looking is not None:
                await self._serve_cached(*looking, queue, ckpt)
                looking = None
        except UsageError as exc:  # the input broke part-way: keep what is done, stop
            self.feed_error = exc
            self.control.stop("input", exc.exit_code)
            return
        finally:
            if looking is not None:
                looking[1].cancel()
        for _ in range(self.config.concurrency):
            await queue.put(None)

    def _rows(self, builder: RequestBuilder, done: DoneSet) -> Iterator[Row]:
        """The rows still to send, in output order: of the input, or of the sweep's slots."""
        if self.sweep is None:
            return _rows_to_send(self.config, builder, done)
        return sweep_rows(self.config, builder, done, self.sweep)

    async def _look_up(
        self,
        rows: list[Row],
        previous: tuple[list[Row], asyncio.Future[Any]] | None,
        queue: _RowQueue,
        ckpt: Checkpoint,
    ) -> tuple[list[Row], asyncio.Future[Any]]:
        """Start looking `rows` up, then serve the batch looked up before; return the new one."""
        assert self.cache is not None
        started = asyncio.ensure_future(self.cache.lookup(rows))
        if previous is not None:
            try:
                await self._serve_cached(*previous, queue, ckpt)
            except BaseException:
                started.cancel()
                raise
        return rows, started

    async def _serve_cached(
        self,
        rows: list[Row],
        lookup: asyncio.Future[Any],
        queue: _RowQueue,
        ckpt: Checkpoint,
    ) -> None:
        """Record the rows the response cache holds; queue the others to be sent."""
        assert self.cache is not None
        answers, hashes = await lookup
        for row, answer, row_hash in zip(rows, answers, hashes):
            if self.stop_event.is_set():
                return
            if answer is not None:
                self._record(ckpt, self.cache.hit_result(row, answer), row_hash=row_hash,
                             input_hash=row.input_hash)
            else:
                await queue.put(row)

    async def _worker(self, queue: _RowQueue, ckpt: Checkpoint) -> None:
        while True:
            row = await queue.get()
            if row is None or self.stop_event.is_set():
                return
            self.busy += 1
            try:
                result = await self._process(row)
                if result is not None:
                    self._record_answer(ckpt, result, row)
            finally:
                self.busy -= 1

    async def _flush_loop(self, ckpt: Checkpoint, executor: ThreadPoolExecutor) -> None:
        """Write the buffered results every half `checkpoint_every` rows or FLUSH_SECONDS."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # lands as the event fires, and this task would then never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_SECONDS):
                    await self.flush_event.wait()
            self.flush_event.clear()
            batch = ckpt.take_batch()
            if batch is None:
                continue
            write = executor.submit(self.writer.write, batch)
            self._writes.append(write)
            # Shielded: cancelling this task at the end must not cancel a write whose rows
            # have already left the buffer (they would be lost); the end waits for it instead.
            await asyncio.shield(asyncio.wrap_future(write))
            self._writes = [w for w in self._writes if not w.done() or w.exception()]
            if self.writer.fault is not None:  # no new request from now on
                self.control.stop("storage", StorageError.exit_code)
                return
            self.gate.written(batch.num_rows)

    async def _watch_deadline(self, deadline: Deadline) -> None:
        await asyncio.sleep(deadline.remaining())
        log.warning("deadline reached: no new requests are sent")
        self.control.stop("deadline", EXIT_STOPPED)

    async def _watch_stop(self, workers: list[asyncio.Task[None]]) -> None:
        """Once a stop is asked, let in-flight rows finish (within a grace period), then end."""
        await self.stop_event.wait()
        if self.control.reason in ("interrupted", "terminated"):
            busy = self.busy
            waiting = (
                f"waiting for {busy} request{'s' if busy != 1 else ''} in flight "
                f"(at most {STOP_GRACE_SECONDS:g} s)" if busy else "no request in flight"
            )
            again = "; Ctrl-C again to quit now" if self.control.reason == "interrupted" else ""
            log.warning("stopping: %s%s", waiting, again)
        self.gate.release()
        if self.control.reason == "budget":
            grace = math.inf  # what is in flight is being paid for: let it finish
        elif self.control.reason == "auth":
            grace = 0.0
        else:
            grace = STOP_GRACE_SECONDS
        limit = time.monotonic() + grace
        while self.busy and time.monotonic() < limit and not self.control.hurrying:
            await asyncio.sleep(0.05)
        for task in workers:
            task.cancel()


def _rows_to_send(config: RunConfig, builder: RequestBuilder, done: DoneSet) -> Iterator[Row]:
    """Rows with no checkpointed result, built into requests, lazily and in input order."""
    skip = done.mask if len(done) else None
    records = iter_hashed_records(config, columns=builder.columns, skip=skip)
    # Finished Parquet and CSV rows are skipped in bulk; JSONL rows are checked here.
    one_by_one = skip is not None and detect_format(config.input) == "jsonl"
    for index, record, error, input_hash in records:
        row = builder.build(index, record, error, input_hash)
        if one_by_one and done.contains(index, row.id):
            continue
        yield row


def _input_error_result(row: Row, model: str | None) -> Result:
    return Result(
        index=row.index, id=row.id, status="error", model=model, attempts=0, error=row.error
    )
