"""The checkpoint's lock and manifest: one live run per output, and what the run is.

`LockAndManifest` is the part of `Checkpoint` that opens it: the flock()ed `lock` file, the
`manifest.json` checked against the run's fingerprint (or reconciled with a changed input,
by `Checkpoint._reconcile_input`), then what is done loaded from the segments.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrunner.errors import CheckpointMismatch, OutputLocked, UsageError
from batchrunner.store.resume import _Progress
from batchrunner.store.segments import _holds_results, _load

if TYPE_CHECKING:
    from batchrunner.store.checkpoint import Checkpoint, CurrentInput

MANIFEST_VERSION = 1

# What a checkpoint folder may hold before its manifest is written: the lock (taken first),
# the crash log of a bug in the command, the reserved fault record.
_BEFORE_THE_MANIFEST = frozenset({"lock", "crash.log", "storage-fault"})


class UntrustedCheckpoint(CheckpointMismatch):
    """A checkpoint folder whose manifest is missing, unreadable or not batchrunner's."""


def _refusal(what: str) -> str:
    return (f"the checkpoint's {what}, so what it holds cannot be trusted. Run with --restart "
            "to discard the folder and start again, or write to another --output.")


def read_manifest(directory: Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """The `manifest.json` of a checkpoint folder, or None where there is none and
    `missing_ok`; UntrustedCheckpoint (exit 2, naming the folder) where it is unreadable,
    not JSON or not batchrunner's (an object with a version and a fingerprint)."""
    path = directory / "manifest.json"
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UsageError(f"no checkpoint found at {directory}") from None
    except OSError as exc:
        raise UntrustedCheckpoint(f"{directory}: "
                                  + _refusal(f"manifest.json is unreadable ({exc.strerror})"))
    try:
        manifest = json.loads(text)
    except ValueError:
        raise UntrustedCheckpoint(f"{directory}: "
                                  + _refusal("manifest.json is not JSON (corrupt)")) from None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict)
            or not isinstance(manifest.get("version"), int)):
        raise UntrustedCheckpoint(f"{directory}: "
                                  + _refusal("manifest.json is not batchrunner's"))
    return manifest


def trusted_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder `run` may use, None for a new (or no) folder;
    UntrustedCheckpoint (exit 2, naming the folder and --restart) for one it must not trust."""
    manifest = read_manifest(directory, missing_ok=True)
    if manifest is None and directory.is_dir() and _holds_more_than_a_lock(directory):
        raise UntrustedCheckpoint(f"{directory}: {_refusal('manifest.json is missing')}")
    return manifest


def _holds_more_than_a_lock(directory: Path) -> bool:
    """True when the folder holds anything a run writes after its manifest (results)."""
    return any(not (p.name in _BEFORE_THE_MANIFEST or p.name.startswith("."))
               for p in directory.iterdir())


class LockAndManifest:
    """`Checkpoint`'s opening part: the lock, the manifest, the load of what is done."""

    output: Path
    directory: Path
    _lock_file: Any
    _manifest: dict[str, Any]

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
        current: CurrentInput | None = None,
    ) -> None:
        manifest = trusted_manifest(self.directory)
        if manifest is not None:
            self._manifest = manifest
            self._finish_compaction()
            old = manifest.get("fingerprint", {})
            changes = describe_changes(old, fingerprint)
            if (changes and current is not None
                    and old.get("settings") == fingerprint.get("settings")):
                # Only the input changed: keep the results of the rows left as they were.
                self._reconcile_input(fingerprint, rows, current)
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
