"""A checkpoint folder on disk: its paths, its segments' numbering, and its manifest.

The one module that knows what the folder beside an output holds, and the one place
`manifest.json` is read, checked (trusted or refused) and written:

    OUT.parquet.checkpoint/
        manifest.json      what the run is: input fingerprint, request settings, row count,
                           whether the output was written, the first live segment
        lock               flock()ed by the live run; the kernel drops it when the process dies
        part-00001.arrows  results of the first session, an Arrow IPC stream of record batches
        part-00002.arrows  results of the session after the first interruption, and so on
        compact-00003.tmp  an incremental run's rewrite of the kept results, before its rename
        storage-fault      4 KiB reserved for the record of a failed write (durability.py
                           owns it and its name)
        crash.log          the traceback of a bug in the command (cli/crash.py)
        batches.json       --engine batch: the ledger of the output's batches (store/batches.py)
        batch-00001.jsonl  --engine batch: a request file, until its batch is collected
        batch-00001.rows.arrow  the rows of that file's lines (index, id, hashes)

Everything that reads a checkpoint (resume, `status`, `summary`, the viewer, object-store
staging) finds these files through this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrunner.errors import CheckpointMismatch, UsageError
from batchrunner.store import durability
from batchrunner.store.durability import FAULT_FILE

__all__ = [
    "CHECKPOINT_SUFFIX",
    "CRASH_LOG",
    "FAULT_FILE",
    "LOCK",
    "MANIFEST",
    "MANIFEST_VERSION",
    "SEGMENT_GLOB",
    "Manifest",
    "UntrustedCheckpoint",
    "batch_ledger_path",
    "batch_request_path",
    "batch_rows_path",
    "checkpoint_dir",
    "compaction_path",
    "has_manifest",
    "holds_more_than_a_lock",
    "is_checkpoint_dir",
    "load_manifest",
    "next_segment_number",
    "output_of",
    "peek_manifest",
    "read_manifest",
    "segment_number",
    "segment_path",
    "segments",
    "trusted_manifest",
    "write_manifest",
]

CHECKPOINT_SUFFIX = ".checkpoint"
MANIFEST = "manifest.json"
LOCK = "lock"
CRASH_LOG = "crash.log"
SEGMENT_GLOB = "part-*.arrows"
COMPACTION_GLOB = "compact-*.tmp"
MANIFEST_VERSION = 1
BATCH_LEDGER = "batches.json"

# What a checkpoint folder may hold before its manifest is written: the lock (taken first),
# the crash log of a bug in the command, the reserved fault record.
_BEFORE_THE_MANIFEST = frozenset({LOCK, CRASH_LOG, FAULT_FILE})


# -- paths ------------------------------------------------------------------------------------


def checkpoint_dir(output: Path) -> Path:
    """Where the checkpoint of `output` lives: `OUTPUT.checkpoint/` beside it."""
    return output.with_name(output.name + CHECKPOINT_SUFFIX)


def output_of(directory: Path) -> Path:
    """The output whose checkpoint folder is `directory` (`checkpoint_dir`'s inverse)."""
    return directory.with_name(directory.name[: -len(CHECKPOINT_SUFFIX)])


def is_checkpoint_dir(folder: Path) -> bool:
    """True for a folder a run made: named `*.checkpoint`, holding a manifest or a lock."""
    return folder.name.endswith(CHECKPOINT_SUFFIX) and (
        (folder / MANIFEST).exists() or (folder / LOCK).exists()
    )


def has_manifest(directory: Path) -> bool:
    """True when the folder holds a manifest (a checkpoint, trusted or not)."""
    return (directory / MANIFEST).is_file()


def batch_ledger_path(directory: Path) -> Path:
    """The ledger of the output's Batch API batches (`--engine batch`)."""
    return directory / BATCH_LEDGER


def batch_request_path(directory: Path, number: int) -> Path:
    """The Batch API request file numbered `number`."""
    return directory / f"batch-{number:05d}.jsonl"


def batch_rows_path(directory: Path, number: int) -> Path:
    """The rows of request file `number`, line by line."""
    return directory / f"batch-{number:05d}.rows.arrow"


def segment_path(directory: Path, number: int) -> Path:
    """The segment numbered `number`."""
    return directory / f"part-{number:05d}.arrows"


def compaction_path(directory: Path, number: int) -> Path:
    """Where an incremental run writes segment `number` before renaming it into place."""
    return directory / f"compact-{number:05d}.tmp"


def segment_number(path: Path) -> int:
    """The number of a segment (or of a compaction file); 0 for a name not numbered."""
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return 0


def segments(directory: Path, first: int = 0) -> list[Path]:
    """The live segments (numbered `first` and up), in the order they were written."""
    found = sorted(directory.glob(SEGMENT_GLOB), key=segment_number)
    return [p for p in found if segment_number(p) >= first]


def next_segment_number(directory: Path) -> int:
    """The number of the next segment a session (or a compaction) starts."""
    return max((segment_number(p) for p in directory.glob(SEGMENT_GLOB)), default=0) + 1


def holds_more_than_a_lock(directory: Path) -> bool:
    """True when the folder holds anything a run writes after its manifest (results)."""
    return any(not (p.name in _BEFORE_THE_MANIFEST or p.name.startswith("."))
               for p in directory.iterdir())


# -- the manifest -----------------------------------------------------------------------------


class UntrustedCheckpoint(CheckpointMismatch):
    """A checkpoint folder whose manifest is missing, unreadable or not batchrunner's."""


def _refusal(what: str) -> str:
    return (f"the checkpoint's {what}, so what it holds cannot be trusted. Run with --restart "
            "to discard the folder and start again, or write to another --output.")


@dataclass
class Manifest:
    """What `manifest.json` says of a run, typed; `extra` keeps keys this version does not know."""

    fingerprint: dict[str, Any]
    rows: int = 0
    finished: bool = False
    first_segment: int = 0  # segments numbered below were folded into it (incremental runs)
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, fingerprint: dict[str, Any], rows: int) -> Manifest:
        """The manifest of a new checkpoint."""
        return cls(fingerprint=fingerprint, rows=rows)

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Manifest:
        """A manifest read as JSON (already checked by `read_manifest`)."""
        known = {"version", "fingerprint", "rows", "finished", "first_segment"}
        return cls(
            fingerprint=raw.get("fingerprint", {}),
            rows=int(raw.get("rows", 0)),
            finished=bool(raw.get("finished")),
            first_segment=int(raw.get("first_segment", 0) or 0),
            version=int(raw["version"]),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def as_json(self) -> dict[str, Any]:
        """The manifest as it is written (`first_segment` only once there is one)."""
        raw: dict[str, Any] = {
            **self.extra,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "finished": self.finished,
        }
        if self.first_segment:
            raw["first_segment"] = self.first_segment
        return raw

    @property
    def settings(self) -> dict[str, Any]:
        """The request settings the run was made with."""
        return self.fingerprint.get("settings", {})


def read_manifest(directory: Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """The `manifest.json` of a checkpoint folder, or None where there is none and
    `missing_ok`; UntrustedCheckpoint (exit 2, naming the folder) where it is unreadable,
    not JSON or not batchrunner's (an object with a version and a fingerprint)."""
    path = directory / MANIFEST
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


def load_manifest(directory: Path, *, missing_ok: bool = False) -> Manifest | None:
    """`read_manifest`, typed."""
    raw = read_manifest(directory, missing_ok=missing_ok)
    return None if raw is None else Manifest.of(raw)


def trusted_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder `run` may use, None for a new (or no) folder;
    UntrustedCheckpoint (exit 2, naming the folder and --restart) for one it must not trust."""
    manifest = read_manifest(directory, missing_ok=True)
    if manifest is None and directory.is_dir() and holds_more_than_a_lock(directory):
        raise UntrustedCheckpoint(f"{directory}: {_refusal('manifest.json is missing')}")
    return manifest


def peek_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest as a reader beside a run sees it (the viewer): None where there is none,
    or it cannot be read or parsed as an object right now; never an error."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Replace the folder's manifest, atomically and durably: the commit point of a change."""
    durability.write_atomically(  # looked up on the module: the fault tests replace it
        directory / MANIFEST,
        json.dumps(manifest.as_json(), indent=2, sort_keys=True, default=str).encode(),
    )
