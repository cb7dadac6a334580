"""Durable progress: checkpoint segments, resume, fingerprint, lock and the final Parquet file.

Layout, beside the output `OUT.parquet`:

    OUT.parquet.checkpoint/
        manifest.json     what the run is: input fingerprint, request settings, row count
        lock              flock()ed by the live run; the kernel drops it when the process dies
        part-00001.arrows results of the first session, an Arrow IPC stream of record batches
        part-00002.arrows results of the session after the first interruption, and so on
        storage-fault     4 KiB reserved for the record of a failed write (durability.py)

Each session appends record batches to its own segment and fsyncs after every batch, so a
SIGKILL at any instant loses at most the batch being written; a torn last batch is detected on
reading (the IPC reader fails on it) and ignored. Results are keyed by row id and row number;
the final output is assembled in input order from the input and the segments, in chunks, so
memory stays bounded by the chunk and not by the run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import CheckpointMismatch, OutputLocked, UsageError
from .failures import ErrorCount, top_errors
from .export import TableWriter, open_table_writer, output_format
from .results import Result
from .durability import read_fault

__all__ = [
    "RESULT_SCHEMA",
    "Checkpoint",
    "CheckpointStatus",
    "DoneSet",
    "checkpoint_dir",
    "checkpoint_results",
    "read_done",
    "read_status",
]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1

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
        # structured output (SPEC 17); dropped from the output of a run without a schema
        ("parsed", pa.string()),
        ("reasks", pa.int32()),
        ("reask_cost_usd", pa.float64()),
    ]
)
_STRUCTURED_COLUMNS = ("parsed", "reasks", "reask_cost_usd")
JSON_SCHEMA_METADATA = b"batchrunner.json_schema"  # a structured run's output records its schema
# `_hash`: a hash of the row's request body (null for an input error), so that a row edited in
# the input is told from one left alone (SPEC 8, incremental inputs).
_SEGMENT_SCHEMA = pa.schema([("_row", pa.int64()), *RESULT_SCHEMA, ("_hash", pa.int64())])
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
    ]
)


def _summarize(batches: list[pa.RecordBatch]) -> pa.Table:
    """The summary columns of some segment batches, copied out of them (so they can go)."""
    table = pa.Table.from_batches(batches, _SEGMENT_SCHEMA)
    columns = [
        pc.equal(table.column("status"), "ok") if name == "ok" else table.column(name)
        for name in _SUMMARY_SCHEMA.names
    ]
    summary = pa.Table.from_arrays(columns, schema=_SUMMARY_SCHEMA)
    return summary.take(pa.array(np.arange(summary.num_rows), pa.int64()))


def use_system_allocator() -> None:
    """Have Arrow allocate with the C library's malloc, which hands freed memory back.

    pyarrow's default allocator (mimalloc) keeps what it frees for reuse; over a long run that
    reads a whole input and then writes the output, that raised the peak of a 1,000,000-row
    run from about 320 MB to about 420 MB. The CLI calls this; a library user decides.
    """
    pa.set_memory_pool(pa.system_memory_pool())


def checkpoint_dir(output: Path) -> Path:
    """Where the checkpoint of `output` lives: `OUTPUT.checkpoint/` beside it."""
    return output.with_name(output.name + ".checkpoint")


@dataclass(frozen=True)
class _BatchRef:
    """Where one checkpointed record batch lies, and which rows it covers."""

    segment: Path
    offset: int  # where its IPC message starts in the segment
    first_row: int
    last_row: int
    schema: pa.Schema | None = None  # the segment's own layout, when older than this one's


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


@dataclass(frozen=True)
class CheckpointStatus:
    """What a checkpoint says of a run, as `batchrunner status` shows it."""

    output: Path
    rows: int
    done: int
    ok: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost_usd: float
    unpriced_rows: int
    live: bool
    finished: bool
    segments: int
    errors: tuple[ErrorCount, ...] = ()  # the most frequent errors, most first
    storage_fault: dict[str, Any] | None = None  # the last run's failed write (durability.py)
    cache_hits: int = 0  # rows served from the response cache (their cost is not in cost_usd)
    reused_cost_usd: float = 0.0  # what those rows cost when first paid for

    @property
    def pending(self) -> int:
        """Rows with no checkpointed result yet."""
        return max(0, self.rows - self.done)


@dataclass
class _Loaded:
    """The checkpoint's results, reduced to the last result of each row."""

    batches: list[_BatchRef] = field(default_factory=list)
    summary: pa.Table | None = field(default_factory=_SUMMARY_SCHEMA.empty_table)


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
        ok = pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False)
        inside = rows < self.rows
        self.state[rows[inside]] = np.where(ok[inside], self._OK, self._ERROR)
        self._add_sums(batch)

    def _add_sums(self, table: pa.Table | pa.RecordBatch) -> None:
        for name in self._SUMS:
            self.sums[name] += pc.sum(table.column(name)).as_py() or 0
        unpriced = pc.and_(pc.is_null(table.column("cost_usd")),
                           pc.is_valid(table.column("total_tokens")))
        self.unpriced += pc.sum(unpriced.cast(pa.int64())).as_py() or 0
        hit = table.column("cache_hit").fill_null(False)
        self.hits += pc.sum(hit.cast(pa.int64())).as_py() or 0
        self.reused += pc.sum(pc.if_else(hit, table.column("cost_usd"), None)).as_py() or 0.0

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


class Checkpoint:
    """The checkpoint of one output: lock, manifest, segments, final assembly.

    >>> with Checkpoint.open(Path("out.parquet"), fingerprint, rows=1000) as ckpt:
    ...     done = ckpt.done_set(retry_failed=False)
    ...     ckpt.append(result); ckpt.write_batch(ckpt.take_batch())
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.directory = checkpoint_dir(output)
        self._lock_file: Any = None
        self._manifest: dict[str, Any] = {}
        self._loaded = _Loaded()
        self._progress = _Progress(0)
        self._buffer: list[Result] = []
        self._segment_path: Path | None = None
        self._segment_file: Any = None
        self._hashes: list[int | None] = []
        self.incremental: dict[str, int] | None = None  # kept/new/changed/removed, when so

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        output: Path,
        fingerprint: dict[str, Any],
        *,
        rows: int,
        restart: bool = False,
        current: Callable[[], tuple[pa.Array, np.ndarray]] | None = None,
    ) -> Checkpoint:
        """Lock the output, check or write the manifest, and load what is done.

        Raises OutputLocked when another live run holds the output, CheckpointMismatch when
        the settings changed, or the input did and `current` is not given (unless `restart`,
        which discards everything). With `current` (the new input's ids and request hashes),
        a changed input alone is reconciled: see `_reconcile`.
        """
        ckpt = cls(output)
        ckpt._lock()
        try:
            if restart:
                ckpt._discard()
            ckpt._check_manifest(fingerprint, rows, current)
            ckpt._loaded = _load(ckpt.directory, ckpt._first_segment())
            ckpt._progress = _Progress.of(ckpt._loaded.summary, rows)
        except BaseException:
            ckpt.close()
            raise
        return ckpt

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _lock(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the checkpoint folder {self.directory}: {exc.strerror}")
        lock_path = self.directory / "lock"
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputLocked(
                f"{self.output}: another run is writing this output ({holder}); "
                "wait for it to finish or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def _discard(self) -> None:
        for path in self.directory.iterdir():
            if path.name != "lock":
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.output.unlink()

    def _check_manifest(
        self,
        fingerprint: dict[str, Any],
        rows: int,
        current: Callable[[], tuple[pa.Array, np.ndarray]] | None = None,
    ) -> None:
        path = self.directory / "manifest.json"
        if path.exists():
            try:
                manifest = json.loads(path.read_text())
            except ValueError:
                manifest = None  # torn before its atomic rename could complete: start afresh
            if manifest is not None:
                self._manifest = manifest
                _finish_compaction(self.directory, self._first_segment())
                old = manifest.get("fingerprint", {})
                changes = describe_changes(old, fingerprint)
                if (changes and current is not None
                        and old.get("settings") == fingerprint.get("settings")):
                    # Only the input changed: keep the results of the rows left as they were.
                    self.incremental = _reconcile(self, fingerprint, rows, current)
                    return
                if changes and not _holds_results(self.directory, self._first_segment()):
                    # Nothing was kept under the old settings (a run stopped early because every
                    # row failed the same way, say): nothing to protect, so the new ones rule.
                    changes, manifest["fingerprint"] = [], fingerprint
                if changes:
                    raise CheckpointMismatch(
                        f"{self.output}: the checkpoint was made with other settings: "
                        + "; ".join(changes)
                        + ". Run with --restart to discard it and start again, "
                        "or write to another --output."
                    )
                manifest["rows"] = rows
                self._manifest = manifest
                self._write_manifest()
                return
        self._manifest = {
            "version": MANIFEST_VERSION,
            "fingerprint": fingerprint,
            "rows": rows,
            "finished": False,
        }
        self._write_manifest()

    def _first_segment(self) -> int:
        """Segments numbered below this one were folded into it by an incremental run."""
        return int(self._manifest.get("first_segment", 0))

    def _write_manifest(self) -> None:
        _atomic_write_bytes(
            self.directory / "manifest.json",
            json.dumps(self._manifest, indent=2, sort_keys=True, default=str).encode(),
        )

    # -- what is done --------------------------------------------------------------------

    def done_set(self, *, retry_failed: bool) -> DoneSet:
        """Ids never to send again: every checkpointed row, or only the ok ones.

        Called once, at the start: the loaded results are released afterwards, so that what
        a run keeps in memory does not grow with the rows already done.
        """
        summary = self._loaded.summary
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
        self._loaded.summary = None
        pa.default_memory_pool().release_unused()
        return done

    def done_totals(self) -> dict[str, Any]:
        """Counts, tokens and cost over the last result of each of this run's rows."""
        return self._progress.totals()

    def top_errors(self) -> tuple[ErrorCount, ...]:
        """The most frequent errors among the written results (reads the segments' errors)."""
        if not self._progress.totals()["failed"]:
            return ()
        return _top_errors(self.directory, self._progress.rows, self._first_segment())

    # -- writing -------------------------------------------------------------------------

    def append(self, result: Result, request_hash: int | None = None) -> None:
        """Buffer one result (and its request body's hash); `take_batch` + `write_batch` keep it."""
        self._buffer.append(result)
        self._hashes.append(request_hash)

    @property
    def buffered(self) -> int:
        """Results waiting for the next write."""
        return len(self._buffer)

    def take_batch(self) -> pa.RecordBatch | None:
        """The buffered results as one record batch (None when there are none)."""
        if not self._buffer:
            return None
        results, self._buffer = self._buffer, []
        hashes, self._hashes = self._hashes, []
        return results_to_batch(results, hashes)

    def write_batch(self, batch: pa.RecordBatch | None) -> None:
        """Append a batch to this session's segment and fsync it (safe to call in a thread).

        The segment is an Arrow IPC stream written message by message (the schema, then one
        message a batch), so that where each batch starts is known and the output can later
        read just the batches it needs.
        """
        if batch is None or not batch.num_rows:
            return
        offset: int | None = None
        try:
            if self._segment_file is None:
                self._open_segment()
                if self._manifest.get("finished"):  # new results: the output must be rebuilt
                    self._manifest["finished"] = False
                    try:
                        self._write_manifest()
                    except OSError:
                        self._manifest["finished"] = True  # still so on disk: write it next time
                        raise
            offset = self._segment_file.tell()
            self._segment_file.write(batch.serialize())
            self._segment_file.flush()
            os.fsync(self._segment_file.fileno())
            _check_same_file(self._segment_path, self._segment_file)  # type: ignore[arg-type]
        except OSError:
            self._drop_segment(offset)
            raise
        rows = batch.column(0)
        self._loaded.batches.append(
            _BatchRef(
                self._segment_path,  # type: ignore[arg-type]
                offset,
                pc.min(rows).as_py(),
                pc.max(rows).as_py(),
            )
        )
        self._progress.add(batch)

    def _open_segment(self) -> None:
        numbers = [_segment_number(p) for p in self.directory.glob("part-*.arrows")]
        path = self.directory / f"part-{max(numbers, default=0) + 1:05d}.arrows"
        self._segment_file = open(path, "xb")
        self._segment_path = path
        self._segment_file.write(_SEGMENT_SCHEMA.serialize())
        self._segment_file.flush()
        os.fsync(self._segment_file.fileno())
        _fsync_dir(self.directory)

    def _drop_segment(self, offset: int | None) -> None:
        """After a failed write: cut the segment back to its last whole batch and close it.

        The next write starts a new segment. Best effort: on a vanished folder or a dead disk
        there is nothing to cut, and a torn tail is ignored on reading anyway.
        """
        handle, path = self._segment_file, self._segment_path
        self._segment_file = self._segment_path = None
        if handle is None or path is None:
            return
        try:
            ours: os.stat_result | None = os.fstat(handle.fileno())
        except OSError:
            ours = None
        with contextlib.suppress(OSError):
            handle.close()  # may flush a partial buffer: cut afterwards
        if ours is None:
            return
        with contextlib.suppress(OSError):
            now = os.stat(path)
            if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
                return  # the path names another file now (the folder was replaced): not ours
            if offset is None or not any(b.segment == path for b in self._loaded.batches):
                path.unlink()  # it holds no batch: a schema alone would only take space
            else:
                os.truncate(path, offset)

    def close(self) -> None:
        """Close the segment and release the lock (buffered results must be written first)."""
        if self._segment_file is not None:
            with contextlib.suppress(OSError):  # every batch was fsynced as it was written
                self._segment_file.close()
            self._segment_file = None
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- the final file ------------------------------------------------------------------

    def complete(self, rows: int) -> bool:
        """True when every one of the first `rows` rows has a result."""
        return self._progress.complete(rows)

    def finalize(
        self,
        input_tables: Iterable[pa.Table],
        rows: int,
        *,
        id_column: str | None = None,
        sweep: Any = None,
        transform: Any = None,
    ) -> None:
        """Write the output: input columns and results in input order, replaced atomically.

        `id_column` names the input column the ids came from; when it is `id` it becomes the
        output's `id` column rather than being carried as `input_id` beside it. With a `sweep`
        (sweep.Sweep) results are numbered by slot and each input row is repeated for its
        slots; `transform(table)` (the scorer) may add columns before a chunk is written.
        """
        pa.default_memory_pool().release_unused()  # what the run freed, before the peak
        tmp = self.output.with_name(f".{self.output.name}.tmp-{os.getpid()}")
        fmt = output_format(self.output)  # .parquet, .jsonl or .csv (SPEC section 7)
        writer: TableWriter | None = None
        start = 0
        try:
            for table in input_tables:
                stop = start + table.num_rows
                if sweep is None:
                    results = self._results_for(start, stop)
                else:
                    results = self._results_for(*sweep.span(start, stop))
                    table = table.take(pa.array(sweep.repeats(start, stop), pa.int64()))
                joined = self._structured_output(_join(table, results, id_column))
                if transform is not None:
                    joined = transform(joined)
                if writer is None:
                    writer = open_table_writer(tmp, joined.schema, fmt)
                writer.write_table(joined, row_group_size=65536)
                del table, results, joined
                pa.default_memory_pool().release_unused()  # keep the peak to one chunk's worth
                start = stop
            if writer is None:  # an empty input still gets a valid, empty file
                empty = self._structured_output(pa.Table.from_batches([], RESULT_SCHEMA))
                writer = open_table_writer(tmp, empty.schema, fmt)
            writer.close()
            writer = None
            if start != rows:
                raise UsageError(f"the input has {start} rows now, not {rows}: it changed during the run")
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.output)
            _fsync_dir(self.output.parent)
        finally:
            if writer is not None:
                writer.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._manifest["finished"] = True
        self._write_manifest()

    def _structured_output(self, table: pa.Table) -> pa.Table:
        """A structured run's output records its schema; another run's has no parsed columns."""
        schema = self._manifest.get("fingerprint", {}).get("settings", {}).get("json_schema")
        if schema is None:
            return table.drop_columns(list(_STRUCTURED_COLUMNS))
        metadata = {JSON_SCHEMA_METADATA: json.dumps(schema["schema"]).encode()}
        return table.replace_schema_metadata(metadata)

    @property
    def finished(self) -> bool:
        """True when a previous run wrote the final output and it is still there."""
        return bool(self._manifest.get("finished")) and self.output.exists()

    def _results_for(self, start: int, stop: int) -> pa.Table:
        """The last result of each row in [start, stop), in row order."""
        refs = [b for b in self._loaded.batches if b.first_row < stop and b.last_row >= start]
        pieces: list[pa.RecordBatch] = []
        by_segment: dict[Path, list[int]] = {}
        layouts: dict[Path, pa.Schema] = {}
        for ref in refs:
            by_segment.setdefault(ref.segment, []).append(ref.offset)
            layouts[ref.segment] = ref.schema or _SEGMENT_SCHEMA
        # Segment by segment in the order they were written, so later results win; only the
        # batches that hold these rows are read.
        for segment in sorted(by_segment, key=_segment_number):
            with pa.memory_map(str(segment)) as source:
                for offset in sorted(by_segment[segment]):
                    source.seek(offset)
                    batch = pa.ipc.read_record_batch(pa.ipc.read_message(source), layouts[segment])
                    batch = _conform(batch)
                    rows = batch.column(0)
                    keep = pc.and_(pc.greater_equal(rows, start), pc.less(rows, stop))
                    pieces.append(batch.filter(keep))
        table = pa.Table.from_batches(pieces, _SEGMENT_SCHEMA)
        row_numbers = table.column("_row").to_numpy()
        positions = _last_positions(row_numbers)
        picked = table.take(pa.array(positions, pa.int64()))
        got = picked.column("_row").to_numpy()
        if len(got) != stop - start or (len(got) and (got[0] != start or got[-1] != stop - 1)):
            raise UsageError(f"rows {start}..{stop - 1} are not all checkpointed; cannot finalize")
        return picked.drop_columns(["_row", "_hash"])


# -- reading segments -----------------------------------------------------------------------


def _segment_number(path: Path) -> int:
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return 0


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
    for segment in _segments(directory, first_segment):
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
    except (pa.ArrowInvalid, OSError):
        return None
    return None if schema == _SEGMENT_SCHEMA else schema


def _segments(directory: Path, first: int = 0) -> list[Path]:
    """The live segments, in the order they were written."""
    found = sorted(directory.glob("part-*.arrows"), key=_segment_number)
    return [p for p in found if _segment_number(p) >= first]


def _load(directory: Path, first_segment: int = 0) -> _Loaded:
    """Read every segment's row numbers, ids, statuses and usage; remember batch extents."""
    loaded = _Loaded()
    pieces: list[pa.Table] = []
    # Batches are summarised a few hundred at a time (cheaper per row), and never more than
    # ~32k rows at once: a batch holds whole answers, and memory must not grow with a segment.
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for segment in _segments(directory, first_segment):
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
                pieces.append(_summarize(pending))
                pending, pending_rows = [], 0
    if pending:
        pieces.append(_summarize(pending))
    if pieces:
        loaded.summary = pa.concat_tables(pieces)
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
    }


def _bools(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow column as a numpy array (nulls as False)."""
    return values.fill_null(False).to_numpy(zero_copy_only=False)


# -- building batches and the output --------------------------------------------------------


def results_to_batch(
    results: Sequence[Result], hashes: Sequence[int | None] | None = None
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
        list(hashes) if hashes is not None else [None] * len(results),
    ]
    return pa.RecordBatch.from_arrays(
        [pa.array(values, type=f.type) for values, f in zip(columns, _SEGMENT_SCHEMA)],
        schema=_SEGMENT_SCHEMA,
    )


def output_column_names(input_columns: Sequence[str]) -> list[str]:
    """Output columns: id, the input's (renamed `input_X` where they clash), then results."""
    result_names = set(RESULT_SCHEMA.names)
    carried = [f"input_{c}" if c in result_names else c for c in input_columns]
    return ["id", *carried, *RESULT_SCHEMA.names[1:]]


def _join(inputs: pa.Table, results: pa.Table, id_column: str | None) -> pa.Table:
    if id_column == "id":  # the input's own id column is the output's `id`: not carried twice
        inputs = inputs.drop_columns(["id"])
    names = output_column_names(inputs.column_names)
    columns = [results.column("id"), *inputs.columns, *results.columns[1:]]
    return pa.Table.from_arrays(columns, names=names)


# -- status of a checkpoint, for `batchrunner status` ---------------------------------------


def read_status(output: Path) -> CheckpointStatus:
    """What the checkpoint of `output` says, whether a run is live, interrupted or finished."""
    directory = checkpoint_dir(output)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise UsageError(f"{output}: no checkpoint found at {directory}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise UsageError(f"{manifest_path}: the manifest is unreadable") from None
    loaded = _load(directory, int(manifest.get("first_segment", 0)))
    totals = _totals(loaded.summary)
    rows = int(manifest.get("rows", 0))
    return CheckpointStatus(
        output=output,
        rows=rows,
        live=_is_locked(directory / "lock"),
        finished=bool(manifest.get("finished")) and output.exists(),
        segments=len(_segments(directory, int(manifest.get("first_segment", 0)))),
        errors=(_top_errors(directory, rows or None, int(manifest.get("first_segment", 0)))
                if totals["failed"] else ()),
        storage_fault=read_fault(directory),
        **totals,
    )


def checkpoint_results(output: Path, columns: Sequence[str]) -> tuple[pa.Table, int]:
    """The last checkpointed result of each row of `output` (result columns `columns`), in
    row order, and the number of rows the run has; readable while a run is going on.

    Raises UsageError when `output` has no checkpoint.
    """
    directory = checkpoint_dir(output)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise UsageError(f"{output}: no result file and no checkpoint at {directory}") from None
    except ValueError:
        raise UsageError(f"{directory / 'manifest.json'}: the manifest is unreadable") from None
    rows = int(manifest.get("rows", 0))
    first = int(manifest.get("first_segment", 0))
    return _last_results(directory, columns, rows or None, first), rows


def read_done(output: Path) -> tuple[DoneSet, dict[str, Any]] | None:
    """The rows of `output` that have a checkpointed result, and the checkpoint's fingerprint;
    None when there is no checkpoint. Takes no lock: a run may be going on."""
    directory = checkpoint_dir(output)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    first = int(manifest.get("first_segment", 0))
    return _done_of(directory, first), manifest.get("fingerprint", {})


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
        for segment in _segments(directory, first_segment)
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


def _is_locked(lock_path: Path) -> bool:
    if not lock_path.exists():
        return False
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def describe_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints."""
    changes: list[str] = []
    old_input, new_input = before.get("input", {}), after.get("input", {})
    if old_input.get("blake2b") != new_input.get("blake2b"):
        changes.append(
            f"the input file changed ({old_input.get('size')} bytes -> "
            f"{new_input.get('size')} bytes, other content)"
        )
    old_settings, new_settings = before.get("settings", {}), after.get("settings", {})
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            old, new = repr(old_settings.get(key)), repr(new_settings.get(key))
            if len(old) + len(new) > 240:  # a whole JSON schema: the key says enough
                changes.append(f"{key} changed")
                continue
            changes.append(f"{key}: {old} -> {new}")
    return changes


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_same_file(path: Path, handle: Any) -> None:
    """Raise ENOENT when `path` no longer names the open file (its folder was removed).

    Writes to a deleted file succeed on POSIX, into an inode nobody will ever read.
    """
    if os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
        raise FileNotFoundError(errno.ENOENT, "the checkpoint segment was replaced", str(path))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- incremental inputs (SPEC 8) -------------------------------------------------------------


def _finish_compaction(directory: Path, first: int) -> None:
    """Complete an incremental rewrite that a crash interrupted after its manifest was written."""
    if not first:
        return
    target = directory / f"part-{first:05d}.arrows"
    pending = directory / f"compact-{first:05d}.tmp"
    if not target.exists() and pending.exists():
        os.replace(pending, target)
        _fsync_dir(directory)
    for path in directory.glob("part-*.arrows"):
        if _segment_number(path) < first:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    for path in directory.glob("compact-*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _reconcile(
    ckpt: Checkpoint,
    fingerprint: dict[str, Any],
    rows: int,
    current: Callable[[], tuple[pa.Array, np.ndarray]],
) -> dict[str, int]:
    """Fold the checkpoint onto a changed input: keep each result whose id and body are unchanged.

    `current()` gives the new input's ids and request hashes (0 for a row that cannot be
    sent). The kept results are rewritten, renumbered, into one new segment, written and
    fsynced under a temporary name; the manifest (the new input, and that older segments are
    gone) is the commit point; then the segment is renamed and the old ones removed. A crash at
    any point leaves either the old checkpoint or the new one.
    """
    directory = ckpt.directory
    first = ckpt._first_segment()
    loaded = _load(directory, first)
    summary = loaded.summary
    assert summary is not None
    old_rows = summary.column("_row").to_numpy()
    positions = _last_positions(old_rows)
    picked = pa.array(positions, pa.int64())
    last_rows = old_rows[positions]
    old_ids = summary.column("id").take(picked).combine_chunks()
    old_hashes = summary.column("_hash").take(picked).combine_chunks()
    del summary
    new_ids, new_hashes = current()
    where = pc.index_in(old_ids, value_set=new_ids).fill_null(-1).to_numpy(zero_copy_only=False)
    matched = where >= 0
    hashed = old_hashes.is_valid().to_numpy(zero_copy_only=False)
    same = matched & hashed
    same[same] = old_hashes.fill_null(0).to_numpy()[same] == new_hashes[where[same]]
    counts = {
        "kept": int(same.sum()),
        "new": int(len(new_ids) - matched.sum()),
        "changed": int((matched & ~same).sum()),
        "removed": int((~matched).sum()),
    }
    if not counts["changed"] and not counts["removed"] and np.array_equal(where, last_rows):
        # Rows only appended: every result keeps its number, the segments stay as they are.
        ckpt._manifest.update(fingerprint=fingerprint, rows=rows, finished=False)
        ckpt._write_manifest()
        _say_what_changed(ckpt.output, counts)
        return counts
    mapping = np.full(int(old_rows.max(initial=-1)) + 2, -1, dtype=np.int64)
    mapping[last_rows[same]] = where[same]
    del old_ids, old_hashes, new_ids, new_hashes, where

    number = max((_segment_number(p) for p in directory.glob("part-*.arrows")), default=0) + 1
    pending = directory / f"compact-{number:05d}.tmp"
    with open(pending, "wb") as handle:
        handle.write(_SEGMENT_SCHEMA.serialize())
        for segment in _segments(directory, first):
            for _offset, batch in _read_batches(segment):
                renumbered = mapping[np.minimum(batch.column(0).to_numpy(), len(mapping) - 1)]
                keep = renumbered >= 0
                if not keep.any():
                    continue
                kept = batch.filter(pa.array(keep))
                columns = [pa.array(renumbered[keep], pa.int64()), *kept.columns[1:]]
                out = pa.RecordBatch.from_arrays(columns, schema=_SEGMENT_SCHEMA)
                handle.write(out.serialize())
        handle.flush()
        os.fsync(handle.fileno())
    ckpt._manifest.update(fingerprint=fingerprint, rows=rows, finished=False, first_segment=number)
    ckpt._write_manifest()  # the commit point
    _finish_compaction(directory, number)
    _say_what_changed(ckpt.output, counts)
    return counts


def _say_what_changed(output: Path, counts: dict[str, int]) -> None:
    log.info(
        "%s: the input changed: kept %s, new %s, changed %s, removed %s",
        output, f"{counts['kept']:,}", f"{counts['new']:,}", f"{counts['changed']:,}",
        f"{counts['removed']:,}",
    )
