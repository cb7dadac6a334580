"""What a checkpoint holds as done: the done set a run skips, and its running progress sums.

`DoneSet` (the rows never to send again), `_Progress` (per row none/ok/error and the sums of
usage and cost) and `DoneState`, the part of a `Checkpoint` that answers "what is done".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.store.failures import ErrorCount, top_errors
from batchrunner.store.layout import segments
from batchrunner.store.segments import (
    _SEGMENT_SCHEMA,
    _conform,
    _last_positions,
    _load,
    _read_batches,
)


class DoneSet:
    """Rows that already have a result and must not be sent again, matched by id.

    Held as the sorted row numbers of the checkpointed results with the id each one had, so a
    row is done only when the checkpoint has a result for its position *and* its id (the
    fingerprint already guarantees the input did not change; the id check makes resume exact
    even so). Memory: two arrays, no Python object per row.
    """

    def __init__(self, rows: np.ndarray, ids: pa.Array) -> None:
        order = np.argsort(rows, kind="stable")
        self._rows = rows[order]
        self._ids = ids.take(pa.array(order)) if len(order) else ids

    def __len__(self) -> int:
        return len(self._rows)

    def contains(self, index: int, row_id: str) -> bool:
        """True when row `index` has a checkpointed result under id `row_id`."""
        i = int(np.searchsorted(self._rows, index))
        return i < len(self._rows) and self._rows[i] == index and self._ids[i].as_py() == row_id

    def mask(self, ids: pa.Array, start: int) -> np.ndarray:
        """For the rows start, start+1, ... with these ids: True where the row is done."""
        done = np.zeros(len(ids), dtype=bool)
        lo, hi = np.searchsorted(self._rows, [start, start + len(ids)])
        if hi > lo:
            local = self._rows[lo:hi] - start
            same = pc.equal(ids.take(pa.array(local)), self._ids.slice(lo, hi - lo))
            done[local[same.to_numpy(zero_copy_only=False)]] = True
        return done


@functools.cache
def _scalar(value: Any, kind: pa.DataType) -> pa.Scalar:
    """An Arrow scalar made once (each compute call would convert a Python one again); not
    at import, where making one imports pandas."""
    return pa.scalar(value, kind)


class _Progress:
    """Per row: no result, ok or error (one byte a row); and running sums of usage and cost.

    What a run keeps of its results while it goes, so that memory does not grow with them.
    Results only ever replace an error (--retry-failed), and errors carry no usage, so the
    sums only grow.
    """

    _NONE, _OK, _ERROR = 0, 1, 2
    _SUMS = ("prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens", "cost_usd")

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.state = np.zeros(rows, dtype=np.int8)
        self.sums: dict[str, float] = dict.fromkeys(self._SUMS, 0)
        self.unpriced = 0
        self.hits = 0  # results served from the response cache
        self.reused = 0.0  # their cost, part of sums["cost_usd"] but not paid by this output

    @classmethod
    def of(cls, summary: pa.Table, rows: int) -> _Progress:
        """The progress of the first `rows` rows, from the loaded summary."""
        progress = cls(rows)
        row_numbers = summary.column("_row").to_numpy()
        positions = _last_positions(row_numbers)
        positions = positions[row_numbers[positions] < rows]
        ok = summary.column("ok").to_numpy(zero_copy_only=False)[positions]
        progress.state[row_numbers[positions]] = np.where(ok, cls._OK, cls._ERROR)
        sums = summary.select([*cls._SUMS, "cache_hit"])  # not the ids: a million strings
        progress._add_sums(sums.take(pa.array(positions, pa.int64())))
        return progress

    def add(self, batch: pa.RecordBatch) -> None:
        """Count a batch of new results (segment schema)."""
        rows = batch.column("_row").to_numpy()
        ok = pc.equal(batch.column("status"), _scalar("ok", pa.string()))
        ok = ok.to_numpy(zero_copy_only=False)
        inside = rows < self.rows
        self.state[rows[inside]] = np.where(ok[inside], self._OK, self._ERROR)
        self._add_sums(batch)

    def _add_sums(self, table: pa.Table | pa.RecordBatch) -> None:
        # Once per checkpoint write: a few compute calls, no Python scalar converted on each
        # call (that was most of their cost).
        for name in self._SUMS:
            self.sums[name] += pc.sum(table.column(name)).as_py() or 0
        cost = table.column("cost_usd")
        if cost.null_count:
            unpriced = pc.and_(pc.is_null(cost), pc.is_valid(table.column("total_tokens")))
            self.unpriced += pc.sum(unpriced).as_py() or 0
        hit = table.column("cache_hit")
        if pc.any(hit).as_py():
            hit = hit.fill_null(False)
            self.hits += pc.sum(hit).as_py() or 0
            reused = pc.if_else(hit, cost, _scalar(None, pa.float64()))
            self.reused += pc.sum(reused).as_py() or 0.0

    def complete(self, rows: int) -> bool:
        """True when each of the first `rows` rows has a result."""
        return rows <= self.rows and bool(np.all(self.state[:rows] != self._NONE))

    def totals(self) -> dict[str, Any]:
        """Counts and sums, as `_totals` gives them."""
        ok = int(np.count_nonzero(self.state == self._OK))
        failed = int(np.count_nonzero(self.state == self._ERROR))
        return {
            "done": ok + failed,
            "ok": ok,
            "failed": failed,
            **{name: int(self.sums[name]) for name in self._SUMS[:-1]},
            "cost_usd": float(self.sums["cost_usd"]) - float(self.reused),  # paid only
            "unpriced_rows": int(self.unpriced),
            "cache_hits": int(self.hits),
            "reused_cost_usd": float(self.reused),
        }


def _done_of(directory: Path, first_segment: int = 0) -> DoneSet:
    summary = _load(directory, first_segment).summary
    if summary is None or not summary.num_rows:
        return DoneSet(np.zeros(0, dtype=np.int64), pa.array([], pa.string()))
    positions = _last_positions(summary.column("_row").to_numpy())
    return DoneSet(
        summary.column("_row").to_numpy()[positions],
        summary.column("id").take(pa.array(positions, pa.int64())).combine_chunks(),
    )


def _last_results(
    directory: Path, columns: Sequence[str], rows: int | None, first_segment: int = 0
) -> pa.Table:
    """Columns of the last result of each row (of the first `rows`), from the segments."""
    wanted = ["_row", *dict.fromkeys(c for c in columns if c != "_row")]
    schema = pa.schema([_SEGMENT_SCHEMA.field(c) for c in wanted])
    # Copied out of each batch (take), so that a batch's answers are not kept alive.
    pieces = [
        pa.Table.from_batches([_conform(batch)]).select(wanted).take(np.arange(batch.num_rows))
        for segment in segments(directory, first_segment)
        for _offset, batch in _read_batches(segment)
        if batch.num_rows
    ]
    table = pa.concat_tables(pieces).combine_chunks() if pieces else schema.empty_table()
    row_numbers = table.column("_row").to_numpy()
    positions = _last_positions(row_numbers)
    if rows is not None:
        positions = positions[row_numbers[positions] < rows]
    return table.take(pa.array(positions, pa.int64())).drop_columns(["_row"])


def _top_errors(
    directory: Path, rows: int | None, first_segment: int = 0
) -> tuple[ErrorCount, ...]:
    table = _last_results(directory, ("status", "error"), rows, first_segment)
    failed = table.filter(pc.not_equal(table.column("status"), "ok"))
    return top_errors(failed.column("error"))


class DoneState:
    """What a checkpoint holds as done: the loaded results (until the done set is taken), the
    per-row progress and sums, the top errors.

    >>> loaded = _load(directory, first_segment)
    >>> state = DoneState(directory, first_segment, loaded.summary, _Progress.of(loaded.summary, rows))
    >>> done = state.done_set(retry_failed=False); state.totals()["done"]
    """

    def __init__(
        self, directory: Path, first_segment: int, summary: pa.Table | None, progress: _Progress
    ) -> None:
        self.directory = directory
        self.first_segment = first_segment
        self.progress = progress
        self._summary = summary  # the loaded results, until `done_set` lets them go

    def done_set(self, *, retry_failed: bool) -> DoneSet:
        """Ids never to send again: every checkpointed row, or only the ok ones.

        Called once, at the start: the loaded results are released afterwards, so that what
        a run keeps in memory does not grow with the rows already done.
        """
        summary = self._summary
        if summary is None:
            raise RuntimeError("done_set() is called once, before any new result is written")
        positions = _last_positions(summary.column("_row").to_numpy())
        if retry_failed and len(positions):
            positions = positions[summary.column("ok").to_numpy(zero_copy_only=False)[positions]]
        picked = pa.array(positions, pa.int64())
        done = DoneSet(
            summary.column("_row").to_numpy()[positions],
            summary.column("id").take(picked).combine_chunks(),
        )
        self._summary = None
        pa.default_memory_pool().release_unused()
        return done

    def add(self, batch: pa.RecordBatch) -> None:
        """Count a batch of new results, just written."""
        self.progress.add(batch)

    def complete(self, rows: int) -> bool:
        """True when every one of the first `rows` rows has a result."""
        return self.progress.complete(rows)

    def totals(self) -> dict[str, Any]:
        """Counts, tokens and cost over the last result of each of this run's rows."""
        return self.progress.totals()

    def top_errors(self) -> tuple[ErrorCount, ...]:
        """The most frequent errors among the written results (reads the segments' errors)."""
        if not self.progress.totals()["failed"]:
            return ()
        return _top_errors(self.directory, self.progress.rows, self.first_segment)
