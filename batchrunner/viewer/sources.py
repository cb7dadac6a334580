"""Where the viewer's rows come from: a finished Parquet output, or the checkpoint of a live run.

A source never holds its file in memory. It gives three things:

- `light()`: the few small columns of every row that the index keeps (status, model, tokens,
  cost, latency, score, ...), read in row-group or batch-sized pieces;
- `scan(columns)`: the named columns in row-group or batch-sized pieces, for the filters that
  look at text (a search in prompts and answers, error text);
- `read(positions, columns)`: some rows in full, reading only the row groups (or checkpoint
  batches) that hold them, a few of them cached.

Positions are physical: the n-th row of the file, or the n-th result written to the checkpoint.
`visible` says which physical positions are shown, in display order: every row of a Parquet
file; for a checkpoint, the last result of each row (a --retry-failed result replaces the
error it retried), in row order.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrunner.errors import UsageError
from batchrunner.store import layout
from batchrunner.store.segments import RESULT_SCHEMA

__all__ = ["CheckpointSource", "ParquetSource", "Source", "open_sources"]

log = logging.getLogger(__name__)

#: Result columns (docs/output.md) that are not input columns: the checkpoint's, and the
#: optional ones other features add (some may be absent from a file).
RESULT_COLUMNS = frozenset(RESULT_SCHEMA.names) | {
    "refusal", "cache_hit", "score", "parsed", "reasks", "reask_cost_usd",
}
#: What the index keeps of every row, when the file has it.
LIGHT_COLUMNS = (
    "id", "status", "model", "prompt_tokens", "completion_tokens", "total_tokens",
    "cost_usd", "latency_ms", "attempts", "error", "score", "cache_hit",
)
_DICTIONARY_COLUMNS = ("status", "model", "error", "finish_reason", "response_model")
_CACHED_PIECES = 2
_SCAN_ROWS = 16384  # decoded row groups kept for paging (each up to 65,536 rows of a few columns)


class Source(Protocol):
    """One results file or checkpoint (see the module docstring).

    The two kinds subclass it to share `light` and `manifest`.
    """

    name: str
    path: Path
    live: bool = False

    @property
    def columns(self) -> list[str]:
        """Column names, in file order."""
        ...

    @property
    def visible(self) -> np.ndarray:
        """Physical positions shown, in display order."""
        ...

    def light(self) -> Iterator[pa.RecordBatch]:
        """The light columns of every physical row, in order, in pieces."""
        return self.scan([c for c in LIGHT_COLUMNS if c in self.columns])

    def scan(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """The named columns of every physical row, in order, in pieces."""
        ...

    def read(self, positions: np.ndarray, columns: Sequence[str], *, keep: bool = True) -> pa.Table:
        """The rows at these physical positions, in the order given.

        `keep`: cache what was decoded for the next call (paging); False for a one-off.
        """
        ...

    def refresh(self) -> bool:
        """Take in what was written since the last look; True when something changed."""
        return False

    def manifest(self) -> dict[str, Any] | None:
        """The checkpoint manifest beside this output (the run's request settings), if any."""
        return layout.peek_manifest(self._checkpoint_directory())

    def _checkpoint_directory(self) -> Path:
        """The checkpoint directory beside this output."""
        ...


class ParquetSource(Source):
    """A finished output file, read row group by row group."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        try:
            # Columns of few distinct values come as Arrow dictionaries: codes, not strings.
            names = pq.read_schema(path).names
            self._file = pq.ParquetFile(
                path, read_dictionary=[c for c in _DICTIONARY_COLUMNS if c in names]
            )
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None
        metadata = self._file.metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.rows = int(self._starts[-1])
        self._columns = list(self._file.schema_arrow.names)
        self._visible = np.arange(self.rows, dtype=np.int64)
        self._cache: OrderedDict[tuple[int, tuple[str, ...]], pa.Table] = OrderedDict()
        missing = [c for c in ("id", "status") if c not in self._columns]
        if missing:
            raise UsageError(f"{path}: not a batchrunner output (no column {missing[0]!r})")

    @property
    def columns(self) -> list[str]:
        return self._columns

    @property
    def visible(self) -> np.ndarray:
        return self._visible

    def scan(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        # A quarter of a row group at a time: what a search decodes at once stays small.
        yield from self._file.iter_batches(
            batch_size=_SCAN_ROWS, columns=list(columns), use_threads=False
        )

    def read(self, positions: np.ndarray, columns: Sequence[str], *, keep: bool = True) -> pa.Table:
        columns = tuple(columns)
        groups = np.searchsorted(self._starts, positions, side="right") - 1
        pieces: list[pa.Table] = []
        order: list[np.ndarray] = []
        for group in np.unique(groups):
            where = np.flatnonzero(groups == group)
            table = self._group(int(group), columns, keep)
            local = positions[where] - self._starts[group]
            pieces.append(table.take(int64_array(local)))
            order.append(where)
        if not pieces:
            return self._file.schema_arrow.empty_table().select(list(columns))
        table = pa.concat_tables(pieces)
        back = np.argsort(np.concatenate(order), kind="stable")
        return table.take(int64_array(back))

    def _group(self, group: int, columns: tuple[str, ...], keep: bool) -> pa.Table:
        key = (group, columns)
        table = self._cache.get(key)
        if table is None:
            table = self._file.read_row_group(group, columns=list(columns))
            if not keep:
                return table
            self._cache[key] = table
            while len(self._cache) > _CACHED_PIECES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return table

    def _checkpoint_directory(self) -> Path:
        return layout.checkpoint_dir(self.path)


class CheckpointSource(Source):
    """The checkpoint of a run that is going on (or stopped): its segments, read as they grow.

    Each segment is an Arrow IPC stream of record batches appended by the run (see
    checkpoint.py); what was read is remembered by byte offset, so a refresh reads only the
    batches written since. A torn last batch (being written right now) is left for next time.
    """

    live = True

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = layout.checkpoint_dir(output)
        self.name = output.name + " (checkpoint)"
        self._reset(0)
        self.refresh()

    def _reset(self, first_segment: int) -> None:
        """Forget what was read: start again from the segments numbered `first_segment` up."""
        self._first_segment = first_segment
        self._segments: dict[Path, tuple[int, pa.Schema | None]] = {}  # next offset, schema
        self._refs: list[tuple[Path, int, pa.Schema]] = []  # one per batch read
        self._starts: list[int] = [0]  # physical position of each batch's first result
        self._rows_parts: list[np.ndarray] = []
        self._columns: list[str] = []
        self._visible = np.zeros(0, dtype=np.int64)
        self._light_parts: list[pa.RecordBatch] = []
        self._cache: OrderedDict[int, pa.RecordBatch] = OrderedDict()

    @property
    def columns(self) -> list[str]:
        return self._columns

    @property
    def visible(self) -> np.ndarray:
        return self._visible

    @property
    def rows(self) -> int:
        """Results read so far (a row retried counts each time)."""
        return self._starts[-1]

    def refresh(self) -> bool:
        changed = False
        # An incremental run folds the old segments into a new one and removes them (the
        # manifest's first_segment says from which on they count): then read afresh.
        first = int((self.manifest() or {}).get("first_segment", 0) or 0)
        if first != self._first_segment or any(not p.exists() for p in self._segments):
            self._reset(first)
            changed = True
        for segment in layout.segments(self.path, first):
            for offset, schema, batch in self._new_batches(segment):
                if not self._columns:
                    self._columns = [c for c in schema.names if c != "_row"]
                light = [c for c in LIGHT_COLUMNS if c in schema.names]
                self._refs.append((segment, offset, schema))
                self._starts.append(self._starts[-1] + batch.num_rows)
                self._rows_parts.append(batch.column("_row").to_numpy())
                self._light_parts.append(
                    pa.RecordBatch.from_arrays([batch.column(c) for c in light], names=light)
                )
                changed = True
        if changed:
            rows = np.concatenate(self._rows_parts) if self._rows_parts else np.zeros(0, np.int64)
            self._visible = _last_of_each(rows, self._models())
        return changed

    def _models(self) -> np.ndarray:
        """A small integer per model of each result, so a sweep's rows are told apart."""
        if not self._light_parts or "model" not in self._light_parts[0].schema.names:
            return np.zeros(self.rows, dtype=np.int64)
        models = pa.chunked_array([b.column("model") for b in self._light_parts], pa.string())
        return pc.dictionary_encode(models.fill_null("")).combine_chunks().indices.to_numpy()

    def _new_batches(self, segment: Path) -> Iterator[tuple[int, pa.Schema, pa.RecordBatch]]:
        offset, schema = self._segments.get(segment, (0, None))
        try:
            source = pa.OSFile(str(segment))
        except OSError:
            return
        with source:
            try:
                source.seek(0)
                reader = pa.ipc.MessageReader.open_stream(source)
                if schema is None:
                    schema = pa.ipc.read_schema(reader.read_next_message())
                    offset = source.tell()
                    self._segments[segment] = (offset, schema)
            except (pa.ArrowInvalid, OSError, StopIteration):
                return  # the schema is being written: next time
            source.seek(offset)
            reader = pa.ipc.MessageReader.open_stream(source)
            while True:
                try:
                    batch = pa.ipc.read_record_batch(reader.read_next_message(), schema)
                except (StopIteration, pa.ArrowInvalid, OSError):
                    return  # the end, or a batch still being written
                if batch.num_rows:
                    yield offset, schema, batch
                offset = source.tell()
                self._segments[segment] = (offset, schema)

    def light(self) -> Iterator[pa.RecordBatch]:
        return iter(self._light_parts)

    def scan(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        for index in range(len(self._refs)):
            batch = self._batch(index)
            yield pa.RecordBatch.from_arrays(
                [_column_or_nulls(batch, c) for c in columns], names=list(columns)
            )

    def read(self, positions: np.ndarray, columns: Sequence[str], *, keep: bool = True) -> pa.Table:
        starts = np.asarray(self._starts, dtype=np.int64)
        batches = np.searchsorted(starts, positions, side="right") - 1
        rows: list[pa.RecordBatch] = []
        for position, index in zip(positions, batches):
            batch = self._batch(int(index))
            piece = batch.slice(int(position - starts[index]), 1)
            rows.append(
                pa.RecordBatch.from_arrays(
                    [_column_or_nulls(piece, c) for c in columns], names=list(columns)
                )
            )
        if not rows:
            return pa.table({c: pa.nulls(0) for c in columns})
        return pa.Table.from_batches(rows)

    def _batch(self, index: int) -> pa.RecordBatch:
        batch = self._cache.get(index)
        if batch is None:
            segment, offset, schema = self._refs[index]
            with pa.memory_map(str(segment)) as source:
                source.seek(offset)
                batch = pa.ipc.read_record_batch(pa.ipc.read_message(source), schema)
                batch = pa.RecordBatch.from_arrays(
                    [pa.concat_arrays([c]) for c in batch.columns], schema=schema
                )  # copied out of the map, which closes here
            self._cache[index] = batch
            while len(self._cache) > 64:
                self._cache.popitem(last=False)
        return batch

    def finished(self) -> bool:
        """True when the run wrote its final output: the Parquet file takes over."""
        manifest = self.manifest() or {}
        return bool(manifest.get("finished")) and self.output.exists()

    def _checkpoint_directory(self) -> Path:
        return self.path


def open_sources(paths: Sequence[str | Path]) -> list[Source]:
    """A source for each result path (globs expanded): the Parquet file, else its checkpoint.

    A path whose run has not finished (no output yet, or a checkpoint not marked finished) is
    read from its checkpoint; `X.parquet.checkpoint` may be named directly.
    """
    sources: list[Source] = []
    for path in _expand(paths):
        sources.append(open_source(path))
    if not sources:
        raise UsageError("no results to view")
    return sources


def open_source(path: Path) -> Source:
    """The source for one output path (see `open_sources`)."""
    if path.name.endswith(layout.CHECKPOINT_SUFFIX) and path.is_dir():
        path = layout.output_of(path)
    directory = layout.checkpoint_dir(path)
    manifest = layout.peek_manifest(directory)
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".csv"):
            raise UsageError(
                f"{path}: the viewer reads Parquet results; write them as .parquet "
                f"(or view the run's checkpoint while it goes)"
            )
        if manifest is None or manifest.get("finished"):
            return ParquetSource(path)
    if directory.is_dir():
        return CheckpointSource(path)
    if path.exists():
        raise UsageError(f"{path}: not a results file")
    raise UsageError(f"{path}: no such results file, and no checkpoint at {directory}")


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for item in paths:
        text = str(item)
        if any(ch in text for ch in "*?["):
            base = Path(text).parent
            matches = sorted(base.glob(Path(text).name))
            matches = [m for m in matches if not m.name.endswith(layout.CHECKPOINT_SUFFIX)]
            if not matches:
                raise UsageError(f"{text}: no results match")
            out.extend(matches)
        else:
            out.append(Path(text))
    return out


def _last_of_each(rows: np.ndarray, models: np.ndarray) -> np.ndarray:
    """Physical positions of the last result of each (row, model), in (row, model) order."""
    if not len(rows):
        return np.zeros(0, dtype=np.int64)
    keys = rows.astype(np.int64) * 65536 + models.astype(np.int64)
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    return (len(keys) - 1 - first_in_reversed).astype(np.int64)


def int64_array(values: np.ndarray) -> pa.Array:
    """A numpy integer array as an Arrow int64 array, sharing its memory (take() indices)."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _column_or_nulls(batch: pa.RecordBatch, name: str) -> pa.Array:
    index = batch.schema.get_field_index(name)
    if index < 0:
        return pa.nulls(batch.num_rows)
    return batch.column(index)
