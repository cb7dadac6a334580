"""store/layout.py: the checkpoint folder's names, and manifest.json read, refused and written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchrunner.store import layout


def test_a_manifest_is_written_back_as_it_was_read(tmp_path: Path) -> None:
    """Keys this version does not know survive a rewrite; first_segment only once there is one."""
    raw = {"version": 1, "fingerprint": {"settings": {"model": "m"}}, "rows": 3,
           "finished": True, "first_segment": 4, "later": {"x": 1}}
    (tmp_path / layout.MANIFEST).write_text(json.dumps(raw))
    manifest = layout.load_manifest(tmp_path)
    assert manifest is not None and (manifest.rows, manifest.first_segment) == (3, 4)
    layout.write_manifest(tmp_path, manifest)
    assert layout.read_manifest(tmp_path) == raw
    layout.write_manifest(tmp_path, layout.Manifest.new({"input": {}}, 5))
    assert json.loads((tmp_path / layout.MANIFEST).read_text()) == {
        "version": 1, "fingerprint": {"input": {}}, "rows": 5, "finished": False}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"version": 1}'])
def test_a_manifest_not_batchrunners_is_refused_by_run_and_skipped_by_the_viewer(
    tmp_path: Path, text: str
) -> None:
    (tmp_path / layout.MANIFEST).write_text(text)
    with pytest.raises(layout.UntrustedCheckpoint, match="--restart"):
        layout.trusted_manifest(tmp_path)
    assert layout.peek_manifest(tmp_path) == (None if text != '{"version": 1}' else {"version": 1})


def test_segments_are_numbered_and_listed_in_the_order_they_were_written(tmp_path: Path) -> None:
    for number in (2, 10, 1):
        layout.segment_path(tmp_path, number).touch()
    layout.compaction_path(tmp_path, 11).touch()
    assert [p.name for p in layout.segments(tmp_path)] == [
        "part-00001.arrows", "part-00002.arrows", "part-00010.arrows"]
    assert [layout.segment_number(p) for p in layout.segments(tmp_path, first=2)] == [2, 10]
    assert layout.next_segment_number(tmp_path) == 11
    output = tmp_path / "out.parquet"
    assert layout.output_of(layout.checkpoint_dir(output)) == output
