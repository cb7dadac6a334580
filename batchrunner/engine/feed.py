"""The rows a run still has to send, as every dispatcher takes them.

`rows_to_send` reads the rows with no checkpointed result (of the input, or of a sweep's
slots), records the ones that need no request (an input error, an answer the response cache
holds) and yields the others, lazily, in output order. The cache is read in batches, one
looked up (on the cache's thread) while the one before is served, so that sending never waits
for it. An input that breaks part-way stops the run (its error is the run's); what is done
is kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from batchrunner.cache.session import LOOKUP_ROWS
from batchrunner.config.settings import RunConfig
from batchrunner.engine.recorder import Recorder
from batchrunner.engine.shared import RunState
from batchrunner.engine.sweep import Sweep, sweep_rows
from batchrunner.errors import UsageError
from batchrunner.inputs.formats import detect_format
from batchrunner.inputs.readers import iter_hashed_records
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.results import Result, Row
from batchrunner.store.resume import DoneSet

__all__ = ["input_error_result", "pending_rows", "rows_to_send"]


def pending_rows(
    config: RunConfig, builder: RequestBuilder, done: DoneSet, sweep: Sweep | None
) -> Iterator[Row]:
    """The rows still to send, in output order: of the input, or of the sweep's slots."""
    if sweep is not None:
        return sweep_rows(config, builder, done, sweep)
    return _input_rows(config, builder, done)


async def rows_to_send(
    state: RunState, recorder: Recorder, rows: Iterator[Row]
) -> AsyncIterator[Row]:
    """The rows of `rows` that need a request; the others are recorded on the way."""
    cache = state.cache if state.cache is not None and state.cache.reads else None
    lookups: list[Row] = []
    looking: tuple[list[Row], asyncio.Future[Any]] | None = None
    try:
        for row in rows:
            if state.stop_event.is_set():
                return
            if row.body is None:  # an input error: recorded, never sent
                recorder.record(input_error_result(row, row.model or state.config.model))
                continue
            if cache is None:
                yield row
                continue
            lookups.append(row)  # looked up in batches; only the misses are sent
            if len(lookups) >= LOOKUP_ROWS:
                started = asyncio.ensure_future(cache.lookup(lookups))
                previous, looking, lookups = looking, (lookups, started), []
                if previous is not None:
                    async for miss in _serve(state, recorder, *previous):
                        yield miss
        if lookups and cache is not None:
            previous, looking = looking, (lookups, asyncio.ensure_future(cache.lookup(lookups)))
            if previous is not None:
                async for miss in _serve(state, recorder, *previous):
                    yield miss
        if looking is not None:
            last, looking = looking, None
            async for miss in _serve(state, recorder, *last):
                yield miss
    except UsageError as exc:  # the input broke part-way: keep what is done, stop
        state.feed_error = exc
        state.control.stop("input", exc.exit_code)
    finally:
        if looking is not None:
            looking[1].cancel()


async def _serve(
    state: RunState, recorder: Recorder, rows: list[Row], lookup: asyncio.Future[Any]
) -> AsyncIterator[Row]:
    """Record the rows the response cache holds; yield the others, to be sent."""
    assert state.cache is not None
    answers, hashes = await lookup
    for row, answer, row_hash in zip(rows, answers, hashes):
        if state.stop_event.is_set():
            return
        if answer is not None:
            recorder.record(state.cache.hit_result(row, answer), row_hash=row_hash,
                            input_hash=row.input_hash)
        else:
            yield row


def _input_rows(config: RunConfig, builder: RequestBuilder, done: DoneSet) -> Iterator[Row]:
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


def input_error_result(row: Row, model: str | None) -> Result:
    """The result of a row whose input could not be made into a request."""
    return Result(
        index=row.index, id=row.id, status="error", model=model, attempts=0, error=row.error
    )
