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
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import UsageError
from batchrunner.results import Result
from batchrunner.store import durability
from batchrunner.store.assembly import OutputAssembly, _join
from batchrunner.store.durability import read_fault
from batchrunner.store.export import TableWriter, open_table_writer, output_format
from batchrunner.store.failures import ErrorCount
from batchrunner.store.manifest import (
    LockAndManifest,
    _is_locked,
    read_manifest,
)
from batchrunner.store.resume import (
    DoneSet,
    DoneState,
    _done_of,
    _last_results,
    _Progress,
    _top_errors,
)
from batchrunner.store.segments import (
    _SEGMENT_SCHEMA,
    RESULT_SCHEMA,
    _BatchRef,
    _last_positions,
    _load,
    _Loaded,
    _read_batches,
    _segment_number,
    _segments,
    _totals,
    results_to_batch,
)

__all__ = [
    "Checkpoint",
    "CheckpointStatus",
    "check_output_apart",
    "checkpoint_dir",
    "checkpoint_results",
    "open_checkpoint",
    "read_done",
    "read_status",
]

log = logging.getLogger(__name__)


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


def check_output_apart(input: Path | str, output: Path | str) -> None:
    """Refuse (UsageError) an output that would overwrite the input or a checkpoint.

    Refused before anything is sent: the output is the input itself (the same path, or the
    same file through a symbolic or hard link), or lies inside the input's checkpoint folder
    or another output's (a `*.checkpoint` folder with a manifest or a lock); and an input
    inside the output's checkpoint folder, which `--restart` would empty.
    """
    if isinstance(input, str) or isinstance(output, str):  # object-store URIs: text only
        if str(input) == str(output):
            raise UsageError(f"--output {output} is the input itself: it would be overwritten; "
                             "write the results to another file")
        return
    source, target = Path(input), Path(output)
    same = source.resolve() == target.resolve()
    if not same and source.exists() and target.exists():
        with contextlib.suppress(OSError):
            same = os.path.samefile(source, target)  # a hard link: same device and inode
    if same:
        raise UsageError(f"--output {output} is the input {input} itself: it would be "
                         "overwritten; write the results to another file")
    folders = [checkpoint_dir(source).resolve()]
    for folder in target.resolve().parents:
        if folder in folders or (
            folder.name.endswith(".checkpoint")
            and ((folder / "manifest.json").exists() or (folder / "lock").exists())
        ):
            raise UsageError(f"--output {output} lies inside the checkpoint folder {folder}: "
                             "write the results outside it")
    own = checkpoint_dir(target).resolve()
    if own in source.resolve().parents:
        raise UsageError(f"--input {input} lies inside the output's checkpoint folder {own}, "
                         "which the run owns (--restart empties it): move the input out")


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
    reasoning_tokens: int = 0  # inside completion_tokens
    reasoning_cut_rows: int = 0  # ok rows left empty: reasoning used up the completion limit

    @property
    def pending(self) -> int:
        """Rows with no checkpointed result yet."""
        return max(0, self.rows - self.done)


class Checkpoint(LockAndManifest, DoneState, OutputAssembly):
    """The checkpoint of one output: lock, manifest, segments, final assembly.

    Its parts: `manifest.py` (opening: lock, manifest, load), `resume.py` (what is done),
    `assembly.py` (results by row range for the output); here, the writes: the segment
    writer, the manifest and the final file.

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
        self._input_hashes: list[int | None] = []

    def _finish_compaction(self) -> None:
        """Complete an incremental run's compaction that a crash interrupted."""
        _finish_compaction(self.directory, self._first_segment())

    def _reconcile_input(
        self,
        fingerprint: dict[str, Any],
        rows: int,
        current: CurrentInput,
    ) -> None:
        """Keep the results of the rows a changed input left as they were (`_reconcile`)."""
        _reconcile(self, fingerprint, rows, current)

    def _write_manifest(self) -> None:
        durability.write_atomically(
            self.directory / "manifest.json",
            json.dumps(self._manifest, indent=2, sort_keys=True, default=str).encode(),
        )

    # -- writing -------------------------------------------------------------------------

    def append(
        self, result: Result, request_hash: int | None = None, input_hash: int | None = None
    ) -> None:
        """Buffer one result (and the hashes of its request body and of the input values it
        was built from); `take_batch` + `write_batch` keep it."""
        self._buffer.append(result)
        self._hashes.append(request_hash)
        self._input_hashes.append(input_hash)

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
        input_hashes, self._input_hashes = self._input_hashes, []
        return results_to_batch(results, hashes, input_hashes)

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
        durability.fsync_dir(self.directory)

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
        fmt = output_format(self.output)  # .parquet, .jsonl or .csv, by the extension
        writer: TableWriter | None = None
        start = 0
        with durability.replaced_atomically(self.output, durable=True) as tmp:
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
            finally:
                if writer is not None:
                    writer.close()
        self._manifest["finished"] = True
        self._write_manifest()


# -- status of a checkpoint, for `batchrunner status` ---------------------------------------


def read_status(output: Path) -> CheckpointStatus:
    """What the checkpoint of `output` says, whether a run is live, interrupted or finished."""
    directory = checkpoint_dir(output)
    manifest = read_manifest(directory, missing_ok=True)
    if manifest is None:
        raise UsageError(f"{output}: no checkpoint found at {directory}")
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
    manifest = read_manifest(directory, missing_ok=True)
    if manifest is None:
        raise UsageError(f"{output}: no result file and no checkpoint at {directory}")
    rows = int(manifest.get("rows", 0))
    first = int(manifest.get("first_segment", 0))
    return _last_results(directory, columns, rows or None, first), rows


def read_done(output: Path) -> tuple[DoneSet, dict[str, Any]] | None:
    """The rows of `output` that have a checkpointed result, and the checkpoint's fingerprint;
    None when there is no checkpoint. Takes no lock: a run may be going on."""
    directory = checkpoint_dir(output)
    try:
        manifest = read_manifest(directory, missing_ok=True)
    except UsageError:
        return None
    if manifest is None:
        return None
    first = int(manifest.get("first_segment", 0))
    return _done_of(directory, first), manifest.get("fingerprint", {})


def open_checkpoint(
    output: Path,
    fingerprint: dict[str, Any],
    *,
    rows: int,
    restart: bool = False,
    current: Any = None,
) -> Checkpoint:
    """`Checkpoint.open`, then reserve the fault record; a write that fails there is an error.

    Nothing has been sent yet: a full disk or an I/O error is a StorageError (exit 74), a
    folder that cannot be written a UsageError (exit 2).
    """
    try:
        ckpt = Checkpoint.open(output, fingerprint, rows=rows, restart=restart, current=current)
    except OSError as exc:
        raise durability._open_error(exc, checkpoint_dir(output)) from None
    try:
        durability._reserve(ckpt.directory)
    except OSError as exc:
        ckpt.close()
        raise durability._open_error(exc, ckpt.directory) from None
    return ckpt


def _check_same_file(path: Path, handle: Any) -> None:
    """Raise ENOENT when `path` no longer names the open file (its folder was removed).

    Writes to a deleted file succeed on POSIX, into an inode nobody will ever read.
    """
    if os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
        raise FileNotFoundError(errno.ENOENT, "the checkpoint segment was replaced", str(path))


# -- incremental inputs (docs/resume.md) ----------------------------------------------------


class CurrentInput(Protocol):
    """The changed input an incremental run folds the checkpoint onto (engine/execution.py: ChangedInput)."""

    def rows(self) -> tuple[pa.Array, np.ndarray | None]:
        """Every row's id, and the hash of its input values (None where not available)."""

    def body_hashes(self, wanted: np.ndarray) -> np.ndarray:
        """The request body hashes of the rows where `wanted` is True (0 elsewhere)."""


def _finish_compaction(directory: Path, first: int) -> None:
    """Complete an incremental rewrite that a crash interrupted after its manifest was written."""
    if not first:
        return
    target = directory / f"part-{first:05d}.arrows"
    pending = directory / f"compact-{first:05d}.tmp"
    if not target.exists() and pending.exists():
        os.replace(pending, target)
        durability.fsync_dir(directory)
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
    current: CurrentInput,
) -> None:
    """Fold the checkpoint onto a changed input: keep each result whose id and body are unchanged.

    `current` is the new input (`ChangedInput` in engine/execution.py): its ids and input-value hashes, and
    the body hashes of the rows whose values do not match (0 for a row that cannot be
    sent). The kept results are rewritten, renumbered, into one new segment, written and
    fsynced under a temporary name; the manifest (the new input, and that older segments are
    gone) is the commit point; then the segment is renamed and the old ones removed. A crash at
    any point leaves either the old checkpoint or the new one.
    """
    directory = ckpt.directory
    first = ckpt._first_segment()
    summary = _load(directory, first, ("_row", "id", "_hash", "_ihash")).summary
    assert summary is not None
    old_rows = summary.column("_row").to_numpy()
    positions = _last_positions(old_rows)
    picked = pa.array(positions, pa.int64())
    last_rows = old_rows[positions]
    old_ids = summary.column("id").take(picked).combine_chunks()
    old_hashes = summary.column("_hash").take(picked).combine_chunks()
    old_inputs = summary.column("_ihash").take(picked).combine_chunks()
    del summary
    pa.default_memory_pool().release_unused()
    new_ids, new_inputs = current.rows()
    pa.default_memory_pool().release_unused()  # each batch's Python strings, let go
    where = pc.index_in(old_ids, value_set=new_ids).fill_null(-1).to_numpy(zero_copy_only=False)
    matched = where >= 0
    # First the input values: a row whose values hash as they did has the same body (the
    # settings are the same), so no request is built for it.
    same = np.zeros(len(where), dtype=bool)
    if new_inputs is not None:
        same = matched & old_inputs.is_valid().to_numpy(zero_copy_only=False)
        same[same] = old_inputs.fill_null(0).to_numpy()[same] == new_inputs[where[same]]
    # The others (values edited, or hashed by an older version or not at all): their bodies.
    hashed = old_hashes.is_valid().to_numpy(zero_copy_only=False)
    unsure = matched & hashed & ~same
    if unsure.any():
        wanted = np.zeros(len(new_ids), dtype=bool)
        wanted[where[unsure]] = True
        bodies = current.body_hashes(wanted)
        same[unsure] = old_hashes.fill_null(0).to_numpy()[unsure] == bodies[where[unsure]]
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
        return
    mapping = np.full(int(old_rows.max(initial=-1)) + 2, -1, dtype=np.int64)
    mapping[last_rows[same]] = where[same]
    del old_ids, old_hashes, old_inputs, new_ids, new_inputs, where

    number = max((_segment_number(p) for p in directory.glob("part-*.arrows")), default=0) + 1
    pending = directory / f"compact-{number:05d}.tmp"
    with open(pending, "wb") as handle:
        handle.write(_SEGMENT_SCHEMA.serialize())
        _fold_point("rewriting")
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
    _fold_point("committed")
    _finish_compaction(directory, number)
    _say_what_changed(ckpt.output, counts)


def _fold_point(name: str) -> None:
    """A test's hook: with BATCHRUNNER_FOLD_PAUSE=DIR/NAME, the fold stops at point NAME.

    The file DIR/NAME appears when the fold gets there, and the fold waits, so that a test's
    SIGKILL lands at that point of the rewrite (tests/test_incremental.py), not at a guess.
    """
    marker = os.environ.get("BATCHRUNNER_FOLD_PAUSE")
    if marker and Path(marker).name == name:
        Path(marker).touch()
        time.sleep(120)


def _say_what_changed(output: Path, counts: dict[str, int]) -> None:
    log.info(
        "%s: the input changed: kept %s, new %s, changed %s, removed %s",
        output, f"{counts['kept']:,}", f"{counts['new']:,}", f"{counts['changed']:,}",
        f"{counts['removed']:,}",
    )
