"""An incremental run's checkpoint: the results of a changed input's unchanged rows kept.

When only the input changed (docs/resume.md), `reconcile` folds the checkpoint onto it: each
result whose row id and request body are unchanged is kept, renumbered to its new row; the
others go. `finish_compaction` completes a fold that a crash interrupted after its commit
point (the manifest). File names are `layout.py`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.store import durability, layout
from batchrunner.store.segments import (
    _SEGMENT_SCHEMA,
    _last_positions,
    _load,
    _read_batches,
)

if TYPE_CHECKING:
    from batchrunner.store.manifest import LockAndManifest

__all__ = ["CurrentInput", "finish_compaction", "reconcile"]

log = logging.getLogger(__name__)


class CurrentInput(Protocol):
    """The changed input an incremental run folds the checkpoint onto (engine/execution.py: ChangedInput)."""

    def rows(self) -> tuple[pa.Array, np.ndarray | None]:
        """Every row's id, and the hash of its input values (None where not available)."""

    def body_hashes(self, wanted: np.ndarray) -> np.ndarray:
        """The request body hashes of the rows where `wanted` is True (0 elsewhere)."""


def finish_compaction(directory: Path, first: int) -> None:
    """Complete an incremental rewrite that a crash interrupted after its manifest was written."""
    if not first:
        return
    target = layout.segment_path(directory, first)
    pending = layout.compaction_path(directory, first)
    if not target.exists() and pending.exists():
        os.replace(pending, target)
        durability.fsync_dir(directory)
    for path in directory.glob(layout.SEGMENT_GLOB):
        if layout.segment_number(path) < first:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    for path in directory.glob(layout.COMPACTION_GLOB):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def reconcile(
    part: LockAndManifest,
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
    directory = part.directory
    first = part.first_segment
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
        _update(part, fingerprint, rows, part.first_segment)
        part.write()
        _say_what_changed(part.output, counts)
        return
    mapping = np.full(int(old_rows.max(initial=-1)) + 2, -1, dtype=np.int64)
    mapping[last_rows[same]] = where[same]
    del old_ids, old_hashes, old_inputs, new_ids, new_inputs, where

    number = layout.next_segment_number(directory)
    pending = layout.compaction_path(directory, number)
    with open(pending, "wb") as handle:
        handle.write(_SEGMENT_SCHEMA.serialize())
        _fold_point("rewriting")
        for segment in layout.segments(directory, first):
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
    _update(part, fingerprint, rows, number)
    part.write()  # the commit point
    _fold_point("committed")
    finish_compaction(directory, number)
    _say_what_changed(part.output, counts)


def _update(part: LockAndManifest, fingerprint: dict[str, Any], rows: int, first: int) -> None:
    """The manifest of the changed input: its fingerprint and rows, results to be assembled."""
    manifest = part.manifest
    manifest.fingerprint, manifest.rows, manifest.finished = fingerprint, rows, False
    manifest.first_segment = first


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
