"""Durable progress: the checkpoint of one output, its writes, and what it says of a run.

A `Checkpoint` is made of parts, each with its own state: `LockAndManifest` (manifest.py: the
lock, the manifest), `DoneState` (resume.py: what is done), `OutputAssembly` (assembly.py:
where each batch lies, the output's chunks) and here `SegmentWriter`, this session's segment.
The folder's files are `layout.py`'s (the checkpoint beside `OUT.parquet` is
`OUT.parquet.checkpoint/`).

Each session appends record batches to its own segment and fsyncs after every batch, so a
SIGKILL at any instant loses at most the batch being written; a torn last batch is detected on
reading (the IPC reader fails on it) and ignored. Results are keyed by row id and row number;
the final output is assembled in input order from the input and the segments, in chunks, so
memory stays bounded by the chunk and not by the run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import UsageError
from batchrunner.results import Result
from batchrunner.store import durability, layout
from batchrunner.store.assembly import OutputAssembly, _join
from batchrunner.store.durability import read_fault
from batchrunner.store.export import TableWriter, open_table_writer, output_format
from batchrunner.store.failures import ErrorCount
from batchrunner.store.incremental import CurrentInput
from batchrunner.store.layout import checkpoint_dir, load_manifest
from batchrunner.store.manifest import LockAndManifest, is_locked
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
    _load,
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
        if folder in folders or layout.is_checkpoint_dir(folder):
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


class SegmentWriter:
    """This session's segment: made at its first batch, each batch appended and fsynced.

    The segment is an Arrow IPC stream written message by message (the schema, then one
    message a batch), so that where each batch starts is known and the output can later read
    just the batches it needs.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self._file: IO[bytes] | None = None

    @property
    def is_open(self) -> bool:
        """True once this session's segment is made (until a failed write or `close`)."""
        return self._file is not None

    def open(self) -> None:
        """Make the next segment, holding the schema, durably."""
        path = layout.segment_path(self.directory, layout.next_segment_number(self.directory))
        self._file = handle = open(path, "xb")  # noqa: SIM115 (open until `close` or `drop`)
        self.path = path
        handle.write(_SEGMENT_SCHEMA.serialize())
        handle.flush()
        os.fsync(handle.fileno())
        durability.fsync_dir(self.directory)

    def tell(self) -> int:
        """Where the next batch starts."""
        assert self._file is not None
        return self._file.tell()

    def append(self, batch: pa.RecordBatch) -> None:
        """Write one batch and fsync it; ENOENT when the folder was removed meanwhile."""
        assert self._file is not None and self.path is not None
        self._file.write(batch.serialize())
        self._file.flush()
        os.fsync(self._file.fileno())
        _check_same_file(self.path, self._file)

    def drop(self, offset: int | None, holds: Callable[[Path], bool]) -> None:
        """After a failed write: cut the segment back to its last whole batch and close it.

        `offset` is where the failed batch started (None: no batch was begun); `holds(path)`
        says whether the segment holds a batch written before. The next write starts a new
        segment. Best effort: on a vanished folder or a dead disk there is nothing to cut,
        and a torn tail is ignored on reading anyway.
        """
        handle, path = self._file, self.path
        self._file = self.path = None
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
            if offset is None or not holds(path):
                path.unlink()  # it holds no batch: a schema alone would only take space
            else:
                os.truncate(path, offset)

    def close(self) -> None:
        """Close the segment (every batch was fsynced as it was written)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class Checkpoint:
    """The checkpoint of one output: lock and manifest, what is done, segments, final output.

    Made by `Checkpoint.open` (or `open_checkpoint`), which locks the output and loads what is
    done; the parts are attributes, each holding its own state.

    >>> with Checkpoint.open(Path("out.parquet"), fingerprint, rows=1000) as ckpt:
    ...     done = ckpt.done_set(retry_failed=False)
    ...     ckpt.append(result); ckpt.write_batch(ckpt.take_batch())
    """

    def __init__(self, folder: LockAndManifest, state: DoneState, assembly: OutputAssembly) -> None:
        self.folder = folder  # the lock and the manifest
        self.state = state  # what is done: the done set, the progress, the top errors
        self.assembly = assembly  # where each batch lies; the output's chunks read back
        self.segment = SegmentWriter(folder.directory)  # this session's writes
        self._buffer: list[Result] = []
        self._hashes: list[int | None] = []
        self._input_hashes: list[int | None] = []

    @classmethod
    def open(
        cls,
        output: Path,
        fingerprint: dict[str, Any],
        *,
        rows: int,
        restart: bool = False,
        current: CurrentInput | None = None,
    ) -> Checkpoint:
        """Lock the output, check or write the manifest, and load what is done.

        Raises OutputLocked when another live run holds the output, CheckpointMismatch when
        the settings changed, or the input did and `current` is not given (unless `restart`,
        which discards everything). With `current` (the new input's ids and request hashes),
        a changed input alone is reconciled: see `incremental.reconcile`.
        """
        folder = LockAndManifest(output)
        folder.lock()
        try:
            if restart:
                folder.discard()
            folder.check(fingerprint, rows, current)
            first = folder.first_segment
            loaded = _load(folder.directory, first)
            progress = _Progress.of(loaded.summary, rows)
            state = DoneState(folder.directory, first, loaded.summary, progress)
            assembly = OutputAssembly(loaded.batches, folder.manifest.settings.get("json_schema"))
        except BaseException:
            folder.unlock()
            raise
        return cls(folder, state, assembly)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def output(self) -> Path:
        """The output this checkpoint is of."""
        return self.folder.output

    @property
    def directory(self) -> Path:
        """The checkpoint folder."""
        return self.folder.directory

    # -- what is done ----------------------------------------------------------------------

    def done_set(self, *, retry_failed: bool) -> DoneSet:
        """Ids never to send again (`DoneState.done_set`; called once, at the start)."""
        return self.state.done_set(retry_failed=retry_failed)

    def done_totals(self) -> dict[str, Any]:
        """Counts, tokens and cost over the last result of each of this run's rows."""
        return self.state.totals()

    def top_errors(self) -> tuple[ErrorCount, ...]:
        """The most frequent errors among the written results (reads the segments' errors)."""
        return self.state.top_errors()

    def complete(self, rows: int) -> bool:
        """True when every one of the first `rows` rows has a result."""
        return self.state.complete(rows)

    @property
    def finished(self) -> bool:
        """True when a previous run wrote the final output and it is still there."""
        return self.folder.manifest.finished and self.output.exists()

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

        The first batch of a session makes its segment, and marks a finished checkpoint
        unfinished: new results mean the output must be rebuilt.
        """
        if batch is None or not batch.num_rows:
            return
        manifest = self.folder.manifest
        offset: int | None = None
        try:
            if not self.segment.is_open:
                self.segment.open()
                if manifest.finished:
                    manifest.finished = False
                    try:
                        self.folder.write()
                    except OSError:
                        manifest.finished = True  # still so on disk: write it next time
                        raise
            offset = self.segment.tell()
            self.segment.append(batch)
        except OSError:
            self.segment.drop(offset, self.assembly.holds)
            raise
        assert self.segment.path is not None
        rows = batch.column(0)
        self.assembly.add(
            _BatchRef(self.segment.path, offset, pc.min(rows).as_py(), pc.max(rows).as_py())
        )
        self.state.add(batch)

    def close(self) -> None:
        """Close the segment and release the lock (buffered results must be written first)."""
        self.segment.close()
        self.folder.unlock()

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
        assembly = self.assembly
        writer: TableWriter | None = None
        start = 0
        with durability.replaced_atomically(self.output, durable=True) as tmp:
            try:
                for table in input_tables:
                    stop = start + table.num_rows
                    if sweep is None:
                        results = assembly.results_for(start, stop)
                    else:
                        results = assembly.results_for(*sweep.span(start, stop))
                        table = table.take(pa.array(sweep.repeats(start, stop), pa.int64()))
                    joined = assembly.structured_output(_join(table, results, id_column))
                    if transform is not None:
                        joined = transform(joined)
                    if writer is None:
                        writer = open_table_writer(tmp, joined.schema, fmt)
                    writer.write_table(joined, row_group_size=65536)
                    del table, results, joined
                    pa.default_memory_pool().release_unused()  # keep the peak to one chunk's worth
                    start = stop
                if writer is None:  # an empty input still gets a valid, empty file
                    empty = assembly.structured_output(pa.Table.from_batches([], RESULT_SCHEMA))
                    writer = open_table_writer(tmp, empty.schema, fmt)
                writer.close()
                writer = None
                if start != rows:
                    raise UsageError(f"the input has {start} rows now, not {rows}: it changed during the run")
            finally:
                if writer is not None:
                    writer.close()
        self.folder.manifest.finished = True
        self.folder.write()


# -- status of a checkpoint, for `batchrunner status` ---------------------------------------


def read_status(output: Path) -> CheckpointStatus:
    """What the checkpoint of `output` says, whether a run is live, interrupted or finished."""
    directory = checkpoint_dir(output)
    manifest = load_manifest(directory, missing_ok=True)
    if manifest is None:
        raise UsageError(f"{output}: no checkpoint found at {directory}")
    first, rows = manifest.first_segment, manifest.rows
    totals = _totals(_load(directory, first).summary)
    return CheckpointStatus(
        output=output,
        rows=rows,
        live=is_locked(directory / layout.LOCK),
        finished=manifest.finished and output.exists(),
        segments=len(layout.segments(directory, first)),
        errors=_top_errors(directory, rows or None, first) if totals["failed"] else (),
        storage_fault=read_fault(directory),
        **totals,
    )


def checkpoint_results(output: Path, columns: Sequence[str]) -> tuple[pa.Table, int]:
    """The last checkpointed result of each row of `output` (result columns `columns`), in
    row order, and the number of rows the run has; readable while a run is going on.

    Raises UsageError when `output` has no checkpoint.
    """
    directory = checkpoint_dir(output)
    manifest = load_manifest(directory, missing_ok=True)
    if manifest is None:
        raise UsageError(f"{output}: no result file and no checkpoint at {directory}")
    rows = manifest.rows
    return _last_results(directory, columns, rows or None, manifest.first_segment), rows


def read_done(output: Path) -> tuple[DoneSet, dict[str, Any]] | None:
    """The rows of `output` that have a checkpointed result, and the checkpoint's fingerprint;
    None when there is no checkpoint. Takes no lock: a run may be going on."""
    directory = checkpoint_dir(output)
    try:
        manifest = load_manifest(directory, missing_ok=True)
    except UsageError:
        return None
    if manifest is None:
        return None
    return _done_of(directory, manifest.first_segment), manifest.fingerprint


def open_checkpoint(
    output: Path,
    fingerprint: dict[str, Any],
    *,
    rows: int,
    restart: bool = False,
    current: CurrentInput | None = None,
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


