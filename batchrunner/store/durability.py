"""Storage faults: a checkpoint or output write that fails stops the run and loses little.

From the first failed write (no space left, a read-only or vanished folder, an I/O error)
no new request is sent; what is in flight gets the grace period; one last attempt
is made to write what is buffered; the run ends with exit 74 and one line saying what could
not be written, why, how many rows are safe and how many answers could not be kept
(docs/exit-codes.md).

`CheckpointWriter` wraps the run's checkpoint writes: a failure is recorded, not raised, and
the batches it could not write are kept for the last attempt. The engine polls `fault`.
`DurabilityGate` holds a new request back while a whole checkpoint interval of answers is not
yet durable, so that what a failed write (or a SIGKILL) can cost stays bounded however slow
the disk is.

The fault is also recorded in the checkpoint folder, for `batchrunner status`, in the file
`storage-fault`. A full disk may refuse even that small write, so the file is reserved when
the run starts (4 KiB of blank JSON) and the record is written over it in place, which needs no
new space on filesystems that overwrite in place (ext4, xfs, tmpfs). On copy-on-write ones
(btrfs, ZFS) that write may fail too; `status` then says only that the run stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errnos
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchrunner.errors import StorageError, UsageError

if TYPE_CHECKING:
    from batchrunner.store.checkpoint import Checkpoint

__all__ = [
    "FAULT_FILE",
    "CheckpointWriter",
    "DurabilityGate",
    "StorageFault",
    "fsync_dir",
    "read_fault",
    "replaced_atomically",
    "write_atomically",
    "write_error",
]

FAULT_FILE = "storage-fault"
_RESERVED_BYTES = 4096
_BLANK = b"{}"


@contextlib.contextmanager
def replaced_atomically(target: Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `target`, renamed over it when the block ends without error.

    A reader sees the old file or the new one, never a part. `durable`: the new file is
    fsynced before the rename and its folder after. The temporary file never outlives the block.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, durably (`replaced_atomically`)."""
    with replaced_atomically(path, durable=True) as tmp:
        tmp.write_bytes(data)


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Causes that name the folder rather than the disk: at the start they are usage errors (an
# output that cannot be written is exit 2 before anything is sent).
_NOT_WRITABLE = {errnos.EROFS, errnos.EACCES, errnos.EPERM, errnos.ENOENT, errnos.ENOTDIR}
_NO_SPACE = {errnos.ENOSPC, errnos.EDQUOT, errnos.EFBIG}
_VANISHED = {errnos.ENOENT, errnos.ENOTDIR, errnos.ESTALE}


@dataclass(frozen=True)
class StorageFault:
    """One failed write: where (`path`), why (`cause`, `errno`), and of what (`target`)."""

    path: Path
    cause: str
    errno: int | None
    target: str  # "checkpoint", "output", or "start" (opening the checkpoint)

    @classmethod
    def of(cls, exc: OSError, path: Path, target: str) -> StorageFault:
        """The fault an OSError describes, for a write of `target` under `path`."""
        code = exc.errno
        if code in _VANISHED and target == "checkpoint":
            cause = "the folder was removed during the run"
        elif code is not None:
            cause = os.strerror(code)
        else:  # pyarrow and a few others give only text
            cause = str(exc) or type(exc).__name__
        return cls(path=path, cause=cause, errno=code, target=target)

    @property
    def code(self) -> str | None:
        """The symbolic errno, such as ENOSPC."""
        return errnos.errorcode.get(self.errno) if self.errno is not None else None

    @property
    def advice(self) -> str:
        """What the user does next."""
        if self.errno in _NO_SPACE:
            return "free space and run the same command again"
        if self.errno in _VANISHED:
            return "run the same command again (rows whose results were removed are sent again)"
        if self.errno in _NOT_WRITABLE:
            return "make the folder writable and run the same command again"
        return "check the disk, then run the same command again"


def write_error(exc: OSError, path: Path | str) -> UsageError | StorageError:
    """The error of a command (export, score, a plot, stdout) whose write of `path` failed.

    A place that cannot be written (a missing or read-only folder) is a usage error (exit 2),
    as at the start of a run; a full disk or an I/O error is a StorageError (exit 74).
    """
    fault = StorageFault.of(exc, Path(path), "output")
    message = f"cannot write {path}: {fault.cause}"
    if fault.errno in _NOT_WRITABLE | {errnos.EISDIR}:
        return UsageError(message)
    return StorageError(f"{message}; {fault.advice}", path=str(path), cause=fault.cause)


class DurabilityGate:
    """Answers not yet durable plus requests in flight stay within `limit`.

    The engine sets `limit` to `checkpoint_every + concurrency`: a request starts only while
    fewer answers than one checkpoint interval wait for their write, so a failed write loses at
    most the requests in flight plus one interval. Writes start at half an interval, so a fast
    disk never holds anything back; a slow one holds the requests whose answers would
    otherwise pile up while it writes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.undurable = 0  # answers received and not yet written
        self.in_flight = 0  # requests being sent
        self._changed = asyncio.Event()
        self._released = False

    def received(self) -> None:
        """One more answer waits for the checkpoint."""
        self.undurable += 1

    def written(self, rows: int) -> None:
        """`rows` answers are durable now."""
        self.undurable -= rows
        self._changed.set()

    def release(self) -> None:
        """Let every held request go on (the run is stopping: each checks why and gives up)."""
        self._released = True
        self._changed.set()

    async def admit(self) -> None:
        """Wait until a new request may start."""
        while not self._released and self.undurable + self.in_flight >= self.limit:
            self._changed.clear()
            await self._changed.wait()

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Count a request as in flight while it is being sent."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class CheckpointWriter:
    """The run's checkpoint writes: the first failure is kept, not raised, and stops the run.

    `write` runs in the engine's one writer thread; `fault` is read by the event loop after
    each write has returned.

    >>> writer = CheckpointWriter(ckpt)
    >>> writer.write(ckpt.take_batch())
    >>> if writer.fault: writer.last_attempt()
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.fault: StorageFault | None = None
        self._unwritten: list[pa.RecordBatch] = []

    def write(self, batch: pa.RecordBatch | None) -> None:
        """Write one batch; once a write has failed, only keep batches for the last attempt."""
        if batch is None or not batch.num_rows:
            return
        if self.fault is not None:
            self._unwritten.append(batch)
            return
        try:
            self.ckpt.write_batch(batch)
        except OSError as exc:
            self.fault = StorageFault.of(exc, self.ckpt.directory, "checkpoint")
            self._unwritten.append(batch)

    def last_attempt(self) -> None:
        """After a fault, try once more to write what is kept, batch by batch, in a new segment."""
        while self._unwritten:
            try:
                self.ckpt.write_batch(self._unwritten[0])
            except OSError:
                return
            self._unwritten.pop(0)

    @property
    def lost(self) -> int:
        """Answers this run received that are not in the checkpoint."""
        return sum(batch.num_rows for batch in self._unwritten)

    def finalize(
        self, input_tables: Iterable[pa.Table], rows: int, *, id_column: str | None,
        **options: Any,
    ) -> StorageFault | None:
        """Write the output (Checkpoint.finalize, with its `sweep` and `transform` options);
        a failed write is returned as the fault."""
        try:
            self.ckpt.finalize(input_tables, rows, id_column=id_column, **options)
        except OSError as exc:
            self.fault = StorageFault.of(exc, self.ckpt.output, "output")
        return self.fault

    def safe_rows(self) -> int:
        """Rows whose result is in the checkpoint now (none when its folder is gone)."""
        if not self.ckpt.directory.is_dir():
            return 0
        return int(self.ckpt.done_totals()["done"])

    def message(self, rows: int) -> str:
        """The one line the run ends with."""
        fault = self.fault
        assert fault is not None
        what = "the output" if fault.target == "output" else "the checkpoint"
        return (
            f"cannot write {what} {fault.path}: {fault.cause}; "
            f"{self.safe_rows():,} of {rows:,} rows are safe in the checkpoint, "
            f"{self.lost:,} answers could not be kept; nothing more was sent; {fault.advice}"
        )

    def details(self, rows: int) -> dict[str, Any]:
        """The fault as JSON, for `--summary-json` and the record `status` reads."""
        fault = self.fault
        assert fault is not None
        return {
            "target": fault.target,
            "path": str(fault.path),
            "cause": fault.cause,
            "errno": fault.code,
            "rows": rows,
            "safe_rows": self.safe_rows(),
            "lost_answers": self.lost,
            "message": self.message(rows),
        }

    def record(self, rows: int) -> bool:
        """Write the fault into the checkpoint folder for `status`; False when that fails too."""
        return _write_record(self.ckpt.directory, {"time": time.time(), **self.details(rows)})


def _open_error(exc: OSError, directory: Path) -> UsageError | StorageError:
    fault = StorageFault.of(exc, directory, "start")
    if fault.errno in _NOT_WRITABLE:
        return UsageError(f"cannot write the checkpoint {directory}: {fault.cause}")
    message = (
        f"cannot write the checkpoint {directory}: {fault.cause}; nothing was sent; "
        f"{fault.advice}"
    )
    _write_record(directory, {"time": time.time(), "target": "checkpoint", "path": str(directory),
                              "cause": fault.cause, "errno": fault.code, "message": message})
    return StorageError(message, path=str(directory), cause=fault.cause)


def _reserve(directory: Path) -> None:
    """Make the record file hold 4 KiB of blank JSON: the space a fault record will reuse."""
    path = directory / FAULT_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, _BLANK.ljust(_RESERVED_BYTES), 0)
        os.ftruncate(fd, _RESERVED_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_record(directory: Path, record: dict[str, Any]) -> bool:
    """Write a fault record over the reserved blank, in place; False where it cannot be."""
    data = json.dumps(record, default=str).encode()
    if len(data) > _RESERVED_BYTES:  # a very long path: keep the line, drop the rest
        data = json.dumps({"message": str(record.get("message", ""))[:3000]}).encode()
    try:
        fd = os.open(directory / FAULT_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data.ljust(_RESERVED_BYTES), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def read_fault(directory: Path) -> dict[str, Any] | None:
    """The storage fault the last run recorded in this checkpoint folder, if any."""
    try:
        text = (directory / FAULT_FILE).read_bytes().strip()
    except OSError:
        return None
    try:
        record = json.loads(text) if text else {}
    except ValueError:  # torn on a crash mid-write: nothing reliable to say
        return None
    return record if isinstance(record, dict) and record.get("message") else None
