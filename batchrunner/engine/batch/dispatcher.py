"""`BatchDispatcher`: a run's rows sent through the provider's Batch API (`--engine batch`).

The run is the local engine's (`execution.Run`): the feed gives the rows with no result (input
errors and response-cache hits already recorded), the recorder keeps the answers. Here the
rows become request files (`files.py`), each uploaded and submitted as a batch, every step
written to the output's ledger (`store/batches.py`) before the next is taken; then the batches
are polled every `batch_poll` seconds and, once finished (completed, expired, cancelled or
failed), their output and error files are read a line at a time into results (`lines.py`),
made durable in the checkpoint, and only then marked collected. Lines that failed in a way
another attempt may cure (429, 5xx, expired or cancelled before they ran, missing) go into a
following batch, up to `max_attempts` submissions of a row.

A run started again reads the ledger: its unfinished batches are taken up where they were
(a file written is uploaded, a file uploaded is submitted unless a batch of it exists, a batch
submitted is polled and collected), never submitted twice; the feed's rows they hold are not
written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson

from batchrunner.config.endpoints import endpoint_name
from batchrunner.engine.batch.files import Claims, RequestFiles, retry_file, rows_of
from batchrunner.engine.batch.lines import LineReader
from batchrunner.engine.recorder import Recorder
from batchrunner.engine.shared import RunState
from batchrunner.engine.state import EXIT_STOPPED, EXIT_SYSTEMATIC
from batchrunner.errors import AuthRefused, RequestError
from batchrunner.results import Row
from batchrunner.store.batches import BatchEntry, BatchRows, Ledger
from batchrunner.store.layout import checkpoint_dir
from batchrunner.transport.batch_api import BatchApi
from batchrunner.transport.client import Client
from batchrunner.transport.limits import Deadline

__all__ = ["BatchDispatcher", "batch_dispatcher", "metadata_of"]

log = logging.getLogger("batchrunner.engine.runner")

FINISHED = frozenset({"completed", "expired", "cancelled", "failed"})
PROGRESS_SECONDS = float(os.environ.get("BATCHRUNNER_LOG_SECONDS", "5"))
FIND_PAGES = 20  # pages of GET /batches looked through for a batch made of a file


def batch_dispatcher(api_key: str) -> Any:
    """The factory `execution.Run` takes: a BatchDispatcher for the run's state."""

    def make(state: RunState, deadline: Deadline | None) -> BatchDispatcher:
        return BatchDispatcher(state, api_key, deadline)

    return make


def metadata_of(state: RunState, entry: BatchEntry) -> dict[str, str]:
    """A batch's metadata: which output and which of its files (never the key)."""
    return {"batchrunner_output": str(state.config.output)[-500:],
            "batchrunner_file": str(entry.number)}


class BatchDispatcher:
    """Rows to Batch API batches; their answers to the run's recorder."""

    row_by_row = False  # a batch's answers come back together, hours later

    def __init__(self, state: RunState, api_key: str, deadline: Deadline | None) -> None:
        self.state = state
        self.config = state.config
        self.deadline = deadline
        self._api_key = api_key
        self.ledger = Ledger.open(checkpoint_dir(state.config.output))
        self._rows: dict[int, BatchRows] = {}
        self._expected: dict[int, np.ndarray] = {}
        self._reserved: dict[int, float] = {}  # batch number -> worst case held in the budget
        self._last_seen: tuple[Any, ...] = ()
        self._next_line = 0.0

    # -- the run ---------------------------------------------------------------------------

    async def dispatch(self, rows: AsyncIterator[Row], recorder: Recorder) -> None:
        state = self.state
        async with Client(state.base_url, self._api_key, concurrency=4,
                          timeout=self.config.timeout) as client:
            api = BatchApi(client, max_attempts=self.config.max_attempts, sleep=self._sleep)
            try:
                await api.probe()  # UsageError (exit 2) before anything is uploaded
                await self._run(api, rows, recorder)
            except AuthRefused as exc:
                state.refused(exc)
            except RequestError as exc:  # the Batch API failed after every retry
                if state.outage.cause is None:
                    state.outage.cause = f"the Batch API failed: {exc}"
                log.warning("stopping: %s", state.outage.cause)
                state.control.stop("outage", EXIT_SYSTEMATIC)
            finally:
                self._say_pending()

    async def _run(self, api: BatchApi, rows: AsyncIterator[Row], recorder: Recorder) -> None:
        state = self.state
        ledger = self.ledger
        ledger.base_url = endpoint_name(state.base_url)
        earlier = ledger.unfinished()
        claims = Claims([(entry, rows_of(ledger, entry)) for entry in earlier])
        for (entry, held), expected in zip(claims.batches, claims.expected):
            self._rows[entry.number] = held
            self._expected[entry.number] = expected
            if entry.pending and state.budget is not None:  # paid for either way
                if state.budget.reserve(entry.worst_cost):
                    self._reserved[entry.number] = entry.worst_cost
        if earlier:
            log.info("taking up %d batch%s of an earlier run", len(earlier),
                     "" if len(earlier) == 1 else "es")
        files = RequestFiles(ledger, self.config.batch_max_requests, self.config.batch_max_bytes,
                             state.prices if state.budget is not None else None)
        try:
            async for row in rows:
                if state.stop_event.is_set():
                    break
                if self.deadline is not None and self.deadline.passed:
                    log.warning("deadline reached: no new batches are submitted")
                    state.control.stop("deadline", EXIT_STOPPED)
                    break
                if claims and claims.take(row):
                    continue
                if state.cache is not None:
                    state.cache.offer(row, None)  # its key, kept since the lookup, goes
                closed = files.add(row)
                if closed is not None:
                    self._new(closed)
                    await self._submit(api, closed)
            if not state.stop_event.is_set():
                closed = files.close()
                if closed is not None:
                    self._new(closed)
        finally:
            files.abandon()
        for entry in ledger.unfinished():
            if state.stop_event.is_set():
                break
            if entry.state in ("written", "uploaded"):
                await self._submit(api, entry)
        await self._wait(api, recorder)

    def _new(self, entry: BatchEntry) -> None:
        held = rows_of(self.ledger, entry)
        self._rows[entry.number] = held
        self._expected[entry.number] = np.ones(len(held), dtype=bool)

    # -- submitting ------------------------------------------------------------------------

    async def _submit(self, api: BatchApi, entry: BatchEntry) -> None:
        """Upload and create `entry`'s batch, each step in the ledger before the next."""
        state = self.state
        ledger = self.ledger
        if state.stop_event.is_set():
            return
        if entry.state == "written":
            entry.file_id = await api.upload(ledger.request_path(entry.number))
            entry.state = "uploaded"
            ledger.save()
        if entry.state != "uploaded" or state.stop_event.is_set():
            return
        if not self._within_budget(entry):
            return
        assert entry.file_id is not None
        batch = await self._made_from(api, entry.file_id)
        if batch is None:
            batch = await api.create(entry.file_id, metadata_of(state, entry))
        entry.batch_id = batch["id"]
        entry.status = batch.get("status")
        entry.state = "submitted"
        ledger.save()
        log.info("batch %s submitted: %s request%s (file %d)", entry.batch_id,
                 f"{entry.rows:,}", "" if entry.rows == 1 else "s", entry.number)

    def _within_budget(self, entry: BatchEntry) -> bool:
        budget = self.state.budget
        if budget is None:
            return True
        if budget.reserve(entry.worst_cost):
            self._reserved[entry.number] = entry.worst_cost
            return True
        note = (f"the --max-cost budget of ${budget.max_cost:,.4f}: the next batch "
                f"({entry.rows:,} requests) could cost up to ${entry.worst_cost:,.4f} at batch "
                f"prices, and ${max(0.0, budget.max_cost - budget.spent - budget.reserved):,.4f} "
                "is left; it was not submitted: run again with a larger budget to go on")
        if self.state.budget_note is None:
            self.state.budget_note = note
            log.warning("%s", note)
        self.state.control.stop("budget", EXIT_STOPPED)
        return False

    async def _made_from(self, api: BatchApi, file_id: str) -> dict[str, Any] | None:
        """A batch the gateway already made of `file_id` (an earlier run's create whose answer
        was lost), looked for among the newest pages of GET /batches."""
        after = None
        for _ in range(FIND_PAGES):
            page = await api.list(limit=100, after=after)
            for batch in page.get("data") or ():
                if isinstance(batch, dict) and batch.get("input_file_id") == file_id:
                    return batch
            if not page.get("has_more") or not page.get("last_id"):
                return None
            after = page["last_id"]
        return None

    # -- waiting and collecting ------------------------------------------------------------

    def _waiting(self) -> list[BatchEntry]:
        return [entry for entry in self.ledger.batches if entry.pending]

    def _stopping_now(self) -> bool:
        """A stop that ends the waiting (a budget stop still collects what was submitted)."""
        control = self.state.control
        return control.stopping and control.reason != "budget"

    async def _wait(self, api: BatchApi, recorder: Recorder) -> None:
        state = self.state
        while True:
            waiting = self._waiting()
            if not waiting or self._stopping_now():
                return
            if self.deadline is not None and self.deadline.passed:
                log.warning("deadline reached: no longer waiting for the batches")
                state.control.stop("deadline", EXIT_STOPPED)
                return
            for entry in waiting:
                assert entry.batch_id is not None
                batch = await api.retrieve(entry.batch_id)
                self._note(entry, batch)
                if entry.status in FINISHED:
                    await self._collect(api, entry, batch, recorder)
                if self._stopping_now():
                    return
            if any(entry.state in ("written", "uploaded") for entry in self.ledger.batches):
                for entry in self.ledger.unfinished():
                    if entry.state in ("written", "uploaded"):
                        await self._submit(api, entry)
            if self._waiting():
                self.ledger.save()  # the statuses and counts `status` shows
                self._progress(self._waiting())
                await self._pause()

    async def _pause(self) -> None:
        wait = self.config.batch_poll
        if self.deadline is not None:
            wait = min(wait, self.deadline.remaining())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.state.stop_event.wait()
                if self.state.control.reason == "budget":  # keeps collecting: wait the poll
                    await asyncio.sleep(wait)

    def _note(self, entry: BatchEntry, batch: dict[str, Any]) -> None:
        """Keep the batch's status and counts (the ledger is saved at the next step)."""
        counts = batch.get("request_counts") or {}
        entry.status = batch.get("status")
        entry.counts = {k: int(v) for k, v in counts.items() if isinstance(v, int)}

    def _progress(self, waiting: list[BatchEntry]) -> None:
        """One line of the batches' request_counts, when they changed, at most every few
        seconds (the CLI's log lines; none with --quiet)."""
        total = sum(e.counts.get("total") or e.rows for e in waiting)
        done = sum(e.counts.get("completed", 0) + e.counts.get("failed", 0) for e in waiting)
        failed = sum(e.counts.get("failed", 0) for e in waiting)
        statuses = sorted({str(e.status) for e in waiting})
        seen = (total, done, failed, tuple(statuses))
        now = time.monotonic()
        if seen == self._last_seen or now < self._next_line:
            return
        self._last_seen, self._next_line = seen, now + PROGRESS_SECONDS
        if self.config.log_format == "json":  # as the CLI's progress lines are
            log.info("batches", extra={"fields": {
                "batches": len(waiting), "statuses": statuses, "requests": total,
                "done": done, "failed": failed}})
            return
        log.info("batches: %d waiting (%s), %s/%s requests done, %s failed",
                 len(waiting), ", ".join(statuses), f"{done:,}", f"{total:,}", f"{failed:,}")

    async def _collect(
        self, api: BatchApi, entry: BatchEntry, batch: dict[str, Any], recorder: Recorder
    ) -> None:
        """A finished batch's answers into the checkpoint; then the rows to send again into a
        following file; then, only once the answers are durable, the batch marked collected."""
        state = self.state
        held = self._rows.get(entry.number)
        if held is None:
            held = self._rows[entry.number] = rows_of(self.ledger, entry)
        expected = self._expected.get(entry.number)
        if expected is None:
            expected = np.zeros(len(held), dtype=bool)
        reader = LineReader(state, held, expected, entry.batch_id or "", recorder)
        started = time.monotonic()
        every = max(1, self.config.checkpoint_every)
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if file_id:
                async with contextlib.aclosing(api.lines(file_id)) as lines:
                    read = 0
                    async for line in lines:
                        reader.read(orjson.loads(line))
                        read += 1
                        if read % every == 0:
                            await asyncio.sleep(0)  # the flusher writes as lines are read
        again = reader.finish(entry.status or "failed", _batch_errors(batch))
        if not await recorder.durable():
            return  # a checkpoint write failed: the batch stays to collect (exit 74)
        log.info("batch %s (%s): %s lines read into the checkpoint in %.1f s",
                 entry.batch_id, entry.status, f"{int(reader.seen.sum()):,}",
                 time.monotonic() - started)
        if state.budget is not None:
            reserved = self._reserved.pop(entry.number, None)
            if reserved is not None:
                state.budget.settle(reserved, reader.cost)
            else:
                state.budget.add_spent(reader.cost)
        state.tally.sent += reader.answered
        follow = retry_file(self.ledger, entry, held, again,
                            state.prices if state.budget is not None else None)
        if follow is not None:
            self._new(follow)
            log.info("batch %s: %s request%s to send again, in a following batch",
                     entry.batch_id, f"{follow.rows:,}", "" if follow.rows == 1 else "s")
        entry.state = "collected"
        self.ledger.save()
        self.ledger.forget_files(entry)
        self._rows.pop(entry.number, None)
        self._expected.pop(entry.number, None)
        if follow is not None and not self._stopping_now():
            await self._submit(api, follow)

    async def _sleep(self, seconds: float) -> None:
        """The Batch API calls' backoff: cut short when the run is stopping."""
        if self._stopping_now():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.state.stop_event.wait()

    def _say_pending(self) -> None:
        unfinished = self.ledger.unfinished()
        self.state.pending_batches = len(unfinished)


def _batch_errors(batch: dict[str, Any]) -> str | None:
    """The first of a failed batch's `errors` (why the gateway refused its file), as text."""
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    if not data or not isinstance(data[0], dict):
        return None
    first = data[0]
    line = f" (line {first['line']})" if first.get("line") is not None else ""
    return f"{first.get('message') or first.get('code')}{line}"
