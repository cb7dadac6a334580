"""The checkpoint's lock and manifest: one live run per output, and what the run is.

`LockAndManifest` is the part of a `Checkpoint` that opens it: it holds the flock()ed `lock`
file and the run's `Manifest`, checks the manifest against the run's fingerprint (or has a
changed input reconciled, `incremental.py`), and writes it back. The manifest's file and
format are `layout.py`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from batchrunner.errors import CheckpointMismatch, OutputLocked, UsageError
from batchrunner.store import incremental, layout
from batchrunner.store.layout import Manifest, read_manifest, trusted_manifest
from batchrunner.store.segments import _holds_results

if TYPE_CHECKING:
    from batchrunner.store.incremental import CurrentInput

# `read_manifest` is layout.py's; its old address here is kept (engine/execution.py uses it).
__all__ = ["LockAndManifest", "describe_changes", "is_locked", "read_manifest"]


class LockAndManifest:
    """The lock of one output's checkpoint folder and the manifest of the run that holds it.

    >>> part = LockAndManifest(Path("out.parquet"))
    >>> part.lock(); part.check(fingerprint, rows=1000); part.manifest.finished
    False
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.directory = layout.checkpoint_dir(output)
        self.manifest = Manifest.new({}, 0)  # what `check` finds or makes
        self._lock_file: IO[str] | None = None

    @property
    def first_segment(self) -> int:
        """Segments numbered below this one were folded into it by an incremental run."""
        return self.manifest.first_segment

    def lock(self) -> None:
        """Take the output: OutputLocked when another live run holds it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the checkpoint folder {self.directory}: {exc.strerror}")
        handle = open(self.directory / layout.LOCK, "a+")  # noqa: SIM115 (held until `unlock`)
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

    def unlock(self) -> None:
        """Release the lock (again: nothing)."""
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def discard(self) -> None:
        """Empty the folder but for the lock, and remove the output (--restart)."""
        for path in self.directory.iterdir():
            if path.name != layout.LOCK:
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.output.unlink()

    def write(self) -> None:
        """Write the manifest as it is now (`layout.write_manifest`)."""
        layout.write_manifest(self.directory, self.manifest)

    def check(
        self,
        fingerprint: dict[str, Any],
        rows: int,
        current: CurrentInput | None = None,
    ) -> None:
        """Trust the folder's manifest for this run, or make a new one, and write it.

        CheckpointMismatch when the settings changed, or the input did and `current` is not
        given; with `current`, a changed input alone is reconciled (`incremental.reconcile`).
        """
        found = trusted_manifest(self.directory)
        if found is None:
            self.manifest = Manifest.new(fingerprint, rows)
            self.write()
            return
        manifest = self.manifest = Manifest.of(found)
        incremental.finish_compaction(self.directory, manifest.first_segment)
        old = manifest.fingerprint
        changes = describe_changes(old, fingerprint)
        if changes and current is not None and old.get("settings") == fingerprint.get("settings"):
            # Only the input changed: keep the results of the rows left as they were.
            incremental.reconcile(self, fingerprint, rows, current)
            return
        if changes and not _holds_results(self.directory, manifest.first_segment):
            # Nothing was kept under the old settings (a run stopped early because every
            # row failed the same way, say): nothing to protect, so the new ones rule.
            changes, manifest.fingerprint = [], fingerprint
        if changes:
            raise CheckpointMismatch(
                f"{self.output}: the checkpoint was made with other settings: "
                + "; ".join(changes)
                + ". Run with --restart to discard it and start again, "
                "or write to another --output."
            )
        manifest.rows = rows
        self.write()


def is_locked(lock_path: Path) -> bool:
    """True while a live run holds this lock file."""
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
