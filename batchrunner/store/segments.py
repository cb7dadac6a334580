"""The checkpoint's segments: the result schema, results as record batches, segments read back.

A segment (`part-NNNNN.arrows`, named and listed by `layout.py`) is an Arrow IPC stream of record batches of `_SEGMENT_SCHEMA`;
a torn last batch is skipped on reading. `_load` reduces every segment to a small summary (row
number, id, status, usage) and where each batch lies. Reading only: the writing is in
`checkpoint.Checkpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.answers.structured import METADATA_KEY
from batchrunner.results import Result
from batchrunner.store.layout import segments

log = logging.getLogger("batchrunner.store.checkpoint")

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("content", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("finish_reason", pa.string()),
        ("model", pa.string()),
        ("response_model", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("attempts", pa.int32()),
        ("latency_ms", pa.float64()),
        ("ttft_ms", pa.float64()),
        ("http_status", pa.int32()),
        ("error", pa.string()),
        ("response_id", pa.string()),
        ("cache_hit", pa.bool_()),
        # structured output (docs/structured.md); dropped from the output of a run without a schema
        ("parsed", pa.string()),
        ("reasks", pa.int32()),
        ("reask_cost_usd", pa.float64()),
        ("refusal", pa.string()),  # the first choice's message.refusal
        # an answer kept whole: tool calls and logprobs (JSON text), reasoning tokens
        ("tool_calls", pa.string()),
        ("reasoning_tokens", pa.int64()),
        ("logprobs", pa.string()),
        ("choices_tool_calls", pa.list_(pa.string())),
        # which endpoint answered (a run of several; docs/endpoints.md), which batch (--engine batch)
        ("endpoint", pa.string()),
        ("batch_id", pa.string()),
    ]
)

_STRUCTURED_COLUMNS = ("parsed", "reasks", "reask_cost_usd")

JSON_SCHEMA_METADATA = METADATA_KEY  # a structured run's output records its schema

# `_hash`: a hash of the row's request body (null for an input error), so that a row edited in
# the input is told from one left alone (an incremental run); `_ihash`: of the input
# values the body was built from (rowhash.py; null for JSONL inputs and older checkpoints),
# which tells most rows unchanged without building their bodies again.
_SEGMENT_SCHEMA = pa.schema(
    [("_row", pa.int64()), *RESULT_SCHEMA, ("_hash", pa.int64()), ("_ihash", pa.int64())]
)

_SUMMARY_SCHEMA = pa.schema(  # what a checkpoint keeps in memory of each result
    [
        ("_row", pa.int64()),
        ("id", pa.string()),
        ("ok", pa.bool_()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("cache_hit", pa.bool_()),
        ("_hash", pa.int64()),
        ("_ihash", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("reasoning_cut", pa.bool_()),  # ok, but reasoning used up the limit: no answer
    ]
)


def _summarize(batches: list[pa.RecordBatch], names: Sequence[str] | None = None) -> pa.Table:
    """The summary columns of some segment batches (or just `names` of them), copied out of
    them (so they can go)."""
    table = pa.Table.from_batches(batches, _SEGMENT_SCHEMA)
    schema = _SUMMARY_SCHEMA if names is None else pa.schema(
        [_SUMMARY_SCHEMA.field(name) for name in names]
    )
    columns = [
        pc.equal(table.column("status"), "ok") if name == "ok"
        else _reasoning_cut(table) if name == "reasoning_cut"
        else table.column(name)
        for name in schema.names
    ]
    summary = pa.Table.from_arrays(columns, schema=schema)
    return summary.take(pa.array(np.arange(summary.num_rows), pa.int64()))


def _reasoning_cut(table: pa.Table) -> pa.ChunkedArray:
    """Ok rows whose answer is empty because reasoning used up the completion limit:
    finish_reason length, and every completion token a reasoning token."""
    reasoning = pc.fill_null(table.column("reasoning_tokens"), 0)
    return pc.fill_null(pc.and_(
        pc.and_(pc.equal(table.column("status"), "ok"),
                pc.equal(table.column("finish_reason"), "length")),
        pc.and_(pc.greater(reasoning, 0),
                pc.greater_equal(reasoning, pc.fill_null(table.column("completion_tokens"), 0))),
    ), False)


@dataclass(frozen=True)
class _BatchRef:
    """Where one checkpointed record batch lies, and which rows it covers."""

    segment: Path
    offset: int  # where its IPC message starts in the segment
    first_row: int
    last_row: int
    schema: pa.Schema | None = None  # the segment's own layout, when older than this one's


@dataclass
class _Loaded:
    """The checkpoint's results, reduced to the last result of each row."""

    batches: list[_BatchRef] = field(default_factory=list)
    summary: pa.Table | None = field(default_factory=_SUMMARY_SCHEMA.empty_table)


def _read_batches(segment: Path) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(offset, batch) for each complete batch of a segment; a torn tail is skipped.

    Read with plain reads, not a memory map: a map would keep every page it touched resident
    until the whole segment was read, and the summary columns touch nearly all of them.
    """
    try:
        source = pa.OSFile(str(segment))
    except OSError as exc:
        log.warning("checkpoint: cannot read %s (%s); ignored", segment.name, exc)
        return
    with source:
        try:
            reader = pa.ipc.MessageReader.open_stream(source)
            schema = pa.ipc.read_schema(reader.read_next_message())
        except (pa.ArrowInvalid, OSError, StopIteration):
            log.warning("checkpoint: %s holds no complete batch; ignored", segment.name)
            return
        if schema != _SEGMENT_SCHEMA and not _readable(schema):
            log.warning("checkpoint: %s has an unknown layout; ignored", segment.name)
            return
        kept = 0
        while True:
            offset = source.tell()
            try:
                batch = pa.ipc.read_record_batch(reader.read_next_message(), schema)
            except StopIteration:
                return
            except (pa.ArrowInvalid, OSError):
                log.warning(
                    "checkpoint: ignored a torn last write in %s (%d complete batches kept)",
                    segment.name,
                    kept,
                )
                return
            kept += 1
            yield offset, _conform(batch)


def _holds_results(directory: Path, first_segment: int = 0) -> bool:
    """True when some segment of the checkpoint holds at least one result."""
    for segment in segments(directory, first_segment):
        for _offset, batch in _read_batches(segment):
            if batch.num_rows:
                return True
    return False


def _readable(schema: pa.Schema) -> bool:
    """True for an older layout: some of today's columns, none unknown (new ones are null)."""
    current = {f.name: f.type for f in _SEGMENT_SCHEMA}
    return "_row" in schema.names and all(current.get(f.name) == f.type for f in schema)


def _conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of an older layout in today's: the columns it lacks are null."""
    if batch.schema == _SEGMENT_SCHEMA:
        return batch
    names = batch.schema.names
    columns = [
        batch.column(f.name) if f.name in names else pa.nulls(batch.num_rows, f.type)
        for f in _SEGMENT_SCHEMA
    ]
    return pa.RecordBatch.from_arrays(columns, schema=_SEGMENT_SCHEMA)


def _segment_layout(segment: Path) -> pa.Schema | None:
    """The schema a segment was written with, when it is not today's (None when it is)."""
    try:
        with pa.OSFile(str(segment)) as source:
            schema = pa.ipc.read_schema(pa.ipc.read_message(source))
    except (pa.ArrowInvalid, OSError, EOFError):  # EOFError: killed before its schema was in
        return None
    return None if schema == _SEGMENT_SCHEMA else schema


def _load(
    directory: Path, first_segment: int = 0, names: Sequence[str] | None = None
) -> _Loaded:
    """Read every segment's row numbers, ids, statuses and usage (or just the summary columns
    `names`); remember batch extents."""
    loaded = _Loaded()
    pieces: list[pa.Table] = []
    # Batches are summarised a few hundred at a time (cheaper per row), and never more than
    # ~32k rows at once: a batch holds whole answers, and memory must not grow with a segment.
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for segment in segments(directory, first_segment):
        layout = _segment_layout(segment)
        for offset, batch in _read_batches(segment):
            rows = batch.column(0)
            if not batch.num_rows:
                continue
            loaded.batches.append(
                _BatchRef(segment, offset, pc.min(rows).as_py(), pc.max(rows).as_py(), layout)
            )
            pending.append(batch)
            pending_rows += batch.num_rows
            if len(pending) >= 256 or pending_rows >= 32_768:
                pieces.append(_summarize(pending, names))
                pending, pending_rows = [], 0
    if pending:
        pieces.append(_summarize(pending, names))
    if pieces:
        loaded.summary = pa.concat_tables(pieces)
    pa.default_memory_pool().release_unused()  # the segments' answers, read and let go
    return loaded


def _last_positions(row_numbers: np.ndarray) -> np.ndarray:
    """Positions of the last occurrence of each row number, in row-number order."""
    if not len(row_numbers):
        return np.zeros(0, dtype=np.int64)
    reversed_rows = row_numbers[::-1]
    _, first_in_reversed = np.unique(reversed_rows, return_index=True)
    return (len(row_numbers) - 1 - first_in_reversed).astype(np.int64)


def _totals(summary: pa.Table, rows: int | None = None) -> dict[str, Any]:
    """Counts, tokens and cost over the last result of each row (of the first `rows` rows)."""
    row_numbers = summary.column("_row").to_numpy()
    positions = _last_positions(row_numbers)
    if rows is not None:
        positions = positions[row_numbers[positions] < rows]

    def column(name: str, fill: float | bool = 0) -> np.ndarray:
        values = summary.column(name).fill_null(fill)
        return values.to_numpy(zero_copy_only=False)[positions]

    ok = int(column("ok", False).sum())
    hit = column("cache_hit", False).astype(bool)
    costs = column("cost_usd")
    cost = summary.column("cost_usd")
    unpriced = pc.and_(pc.is_null(cost), pc.is_valid(summary.column("total_tokens")))
    return {
        "done": len(positions),
        "ok": ok,
        "failed": len(positions) - ok,
        "prompt_tokens": int(column("prompt_tokens").sum()),
        "completion_tokens": int(column("completion_tokens").sum()),
        "cached_tokens": int(column("cached_tokens").sum()),
        "total_tokens": int(column("total_tokens").sum()),
        "cost_usd": float(costs[~hit].sum()),  # paid: what the cache served is not spending
        "unpriced_rows": int(_bools(unpriced)[positions].sum()) if len(positions) else 0,
        "cache_hits": int(hit.sum()),
        "reused_cost_usd": float(costs[hit].sum()),
        "reasoning_tokens": int(column("reasoning_tokens").sum()),
        "reasoning_cut_rows": int(column("reasoning_cut", False).sum()),
    }


def _bools(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow column as a numpy array (nulls as False)."""
    return values.fill_null(False).to_numpy(zero_copy_only=False)


def results_to_batch(
    results: Sequence[Result],
    hashes: Sequence[int | None] | None = None,
    input_hashes: Sequence[int | None] | None = None,
) -> pa.RecordBatch:
    """Results as one record batch of the segment schema (columnar, no per-cell objects)."""
    usages = [r.usage for r in results]
    columns = [
        [r.index for r in results],
        [r.id for r in results],
        [r.status for r in results],
        [r.content for r in results],
        [None if r.choices is None else list(r.choices) for r in results],
        [r.finish_reason for r in results],
        [r.model for r in results],
        [r.response_model for r in results],
        [u.prompt_tokens for u in usages],
        [u.completion_tokens for u in usages],
        [u.total_tokens for u in usages],
        [u.cached_tokens for u in usages],
        [r.cost_usd for r in results],
        [r.attempts for r in results],
        [r.latency_ms for r in results],
        [r.ttft_ms for r in results],
        [r.http_status for r in results],
        [r.error for r in results],
        [r.response_id for r in results],
        [r.cache_hit for r in results],
        [r.parsed for r in results],
        [r.reasks for r in results],
        [r.reask_cost_usd for r in results],
        [r.refusal for r in results],
        [r.tool_calls for r in results],
        [u.reasoning_tokens for u in usages],
        [r.logprobs for r in results],
        [None if r.choices_tool_calls is None else list(r.choices_tool_calls) for r in results],
        [r.endpoint for r in results],
        [r.batch_id for r in results],
        list(hashes) if hashes is not None else [None] * len(results),
        list(input_hashes) if input_hashes is not None else [None] * len(results),
    ]
    return pa.RecordBatch.from_arrays(
        [pa.array(values, type=f.type) for values, f in zip(columns, _SEGMENT_SCHEMA)],
        schema=_SEGMENT_SCHEMA,
    )
