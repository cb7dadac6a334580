"""The dispatcher seam: how a run's rows reach a gateway, and the local dispatcher.

A run hands its `Dispatcher` the rows still to send (an async iterator, from `feed.py`) and
its `Recorder`; the dispatcher sends them its own way and gives every answer to the recorder.
It returns when the rows run out or the run stops (`RunState.stop_event`). Everything else
(the input, the checkpoint, the cache lookups, the output, the report) is the run's, and the
same whichever dispatcher sends. The implementations:

- `LocalDispatcher` (here): a fixed set of worker tasks on this machine, each taking rows
  from a bounded queue to a `RowProcessor` (bounded concurrency, pacing, retries);
- `engine/ray/driver.py`'s `RayDispatcher`: blocks of rows to Ray actors, each of which runs
  a `LocalDispatcher` of its own over its block and returns the results.
- `engine/fleet.py`'s `FleetDispatcher`: a `LocalDispatcher` over several endpoints, each
  with its own workers and `RowProcessor`, taking rows from one shared queue.
- `engine/batch/dispatcher.py`'s `BatchDispatcher`: the rows as the provider's Batch API
  request files, submitted as batches, polled, and their answer lines recorded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Protocol

from batchrunner.engine.processor import RowProcessor
from batchrunner.engine.recorder import Recorder
from batchrunner.engine.shared import RunState
from batchrunner.engine.state import EXIT_STOPPED
from batchrunner.results import Row
from batchrunner.transport.client import Client
from batchrunner.transport.limits import Deadline
from batchrunner.transport.pacing import Pacer

__all__ = ["Dispatcher", "LocalDispatcher", "STOP_GRACE_SECONDS"]

log = logging.getLogger("batchrunner.engine.runner")

STOP_GRACE_SECONDS = 5.0  # in-flight requests get this long to finish after Ctrl-C or a deadline


class Dispatcher(Protocol):
    """Sends a run's rows and gives their results to the recorder."""

    #: True when rows are sent one by one and each answer comes back as it is made (then
    #: `--order prefix` can hold a group's rows until its first is answered).
    row_by_row: bool

    async def dispatch(self, rows: AsyncIterator[Row], recorder: Recorder) -> None:
        """Send `rows` until they run out or the run stops; record every answer."""
        ...


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


class LocalDispatcher:
    """Rows sent from this machine by `concurrency` worker tasks to one endpoint."""

    row_by_row = True

    def __init__(self, state: RunState, api_key: str, deadline: Deadline | None = None) -> None:
        self.state = state
        self._api_key = api_key
        self.deadline = deadline
        self.busy = 0  # rows being processed right now

    async def dispatch(self, rows: AsyncIterator[Row], recorder: Recorder) -> None:
        state = self.state
        config = state.config
        queue = _RowQueue(2 * config.concurrency)
        pacer = Pacer(config.concurrency, config.rpm, config.tpm)
        async with Client(
            state.base_url, self._api_key, concurrency=config.concurrency, timeout=config.timeout
        ) as client:
            processor = RowProcessor(state, client, pacer)
            workers = [
                asyncio.create_task(self._worker(queue, processor, recorder))
                for _ in range(config.concurrency)
            ]
            feeder = asyncio.create_task(self._feed(rows, queue))
            try:
                await self._run_tasks(feeder, workers)
            finally:
                processor.close()

    async def _run_tasks(
        self, feeder: asyncio.Task[None], workers: list[asyncio.Task[None]],
        *others: asyncio.Task[None],
    ) -> None:
        """Run the feeder and workers with the stop and deadline watchers until the workers
        end; a task that raised is the run's crash. Every task is ended on the way out."""
        state = self.state
        watchers = [asyncio.create_task(self._watch_stop(workers))]
        if self.deadline is not None:
            watchers.append(asyncio.create_task(self._watch_deadline(self.deadline)))
        tasks = (feeder, *workers, *watchers, *others)
        for task in tasks:
            task.add_done_callback(state.on_task_done)
        try:
            await asyncio.gather(*workers, return_exceptions=True)
            if state.crash is not None:
                raise state.crash
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _feed(self, rows: AsyncIterator[Row], queue: _RowQueue) -> None:
        async for row in rows:
            if self.state.stop_event.is_set():
                return
            await queue.put(row)
        for _ in range(self.state.config.concurrency):
            await queue.put(None)

    async def _worker(
        self, queue: _RowQueue, processor: RowProcessor, recorder: Recorder
    ) -> None:
        stop_event = self.state.stop_event
        while True:
            row = await queue.get()
            if row is None or stop_event.is_set():
                return
            self.busy += 1
            try:
                sent = await processor.process(row)
                if sent is not None:
                    recorder.record_answer(sent, row)
                else:
                    recorder.answered(row, None)
            finally:
                self.busy -= 1

    async def _watch_deadline(self, deadline: Deadline) -> None:
        await asyncio.sleep(deadline.remaining())
        log.warning("deadline reached: no new requests are sent")
        self.state.control.stop("deadline", EXIT_STOPPED)

    async def _watch_stop(self, workers: list[asyncio.Task[None]]) -> None:
        """Once a stop is asked, let in-flight rows finish (within a grace period), then end."""
        state = self.state
        control = state.control
        await state.stop_event.wait()
        if control.reason in ("interrupted", "terminated"):
            busy = self.busy
            waiting = (
                f"waiting for {busy} request{'s' if busy != 1 else ''} in flight "
                f"(at most {STOP_GRACE_SECONDS:g} s)" if busy else "no request in flight"
            )
            again = "; Ctrl-C again to quit now" if control.reason == "interrupted" else ""
            log.warning("stopping: %s%s", waiting, again)
        state.gate.release()
        if control.reason == "budget":
            grace = math.inf  # what is in flight is being paid for: let it finish
        elif control.reason == "auth":
            grace = 0.0
        else:
            grace = STOP_GRACE_SECONDS
        limit = time.monotonic() + grace
        while self.busy and time.monotonic() < limit and not control.hurrying:
            await asyncio.sleep(0.05)
        for task in workers:
            task.cancel()
