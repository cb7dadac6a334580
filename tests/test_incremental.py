"""Incremental inputs (docs/resume.md): a changed input keeps the results of the rows left as they were.

Runs go through the library against the gateway simulator; its request counters say what was
really sent.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from batchrunner import RunConfig, run
from batchrunner.errors import CheckpointMismatch

KEY = "sk-ru-incremental-tests-4c1d7e9a2b5f8c3e"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"q{i:04d}", "prompt": f"Question number {i}: why is the sky blue?"}
            for i in range(start, start + n)]


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix == ".csv":
        pacsv.write_csv(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def go(source: Path, output: Path, base_url: str, **settings: Any):  # type: ignore[no-untyped-def]
    settings.setdefault("model", "gpt-4o-mini")
    report = run(RunConfig(input=source, output=output, base_url=base_url, **settings),
                 handle_signals=False)
    return report, pq.read_table(output).to_pylist()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_added_edited_and_removed_rows(tmp_path: Path, gateway, suffix: str,  # type: ignore[no-untyped-def]
                                       caplog: pytest.LogCaptureFixture) -> None:
    source, output = tmp_path / f"in{suffix}", tmp_path / "out.parquet"
    first = rows(20)
    write(source, first)
    _, before = go(source, output, gateway.base_url)
    by_id = {r["id"]: r for r in before}

    edited = [dict(r) for r in first]
    edited[4]["prompt"] = "An edited question: why is grass green?"
    edited[11]["prompt"] = "Another edited question: what is a prime?"
    del edited[15], edited[7], edited[0]  # three removed
    edited.insert(5, rows(1, 500)[0])  # one new row in the middle...
    edited += rows(4, 100)  # ...and four at the end
    write(source, edited)
    gateway.stats.reset()
    with caplog.at_level(logging.INFO, logger="batchrunner"):
        report, after = go(source, output, gateway.base_url)
    assert gateway.stats.requests == 5 + 2  # the new and the edited rows, nothing else
    assert report.exit_code == 0 and report.rows == len(edited) == 22
    assert [r["id"] for r in after] == [r["id"] for r in edited]  # the current input, in order
    assert [r["prompt"] for r in after] == [r["prompt"] for r in edited]
    changed = {"q0004", "q0011"}
    for row in after:
        old = by_id.get(row["id"])
        if old is not None and row["id"] not in changed:
            assert row["response_id"] == old["response_id"]  # kept, not sent again
            assert row["content"] == old["content"]
    assert any("kept 15, new 5, changed 2, removed 3" in r.getMessage() for r in caplog.records)

    # The rewritten checkpoint resumes as any other: nothing more to send.
    gateway.stats.reset()
    report, again = go(source, output, gateway.base_url)
    assert gateway.stats.requests == 0 and again == after

    # And a second edit folds the already folded checkpoint once more.
    write(source, edited[:10])
    gateway.stats.reset()
    report, cut = go(source, output, gateway.base_url)
    assert gateway.stats.requests == 0 and [r["id"] for r in cut] == [r["id"] for r in edited[:10]]
    assert cut == after[:10]


def test_changed_settings_are_still_refused(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    write(source, rows(6))
    go(source, output, gateway.base_url)
    write(source, rows(8))
    with pytest.raises(CheckpointMismatch, match="model"):
        go(source, output, gateway.base_url, model="gpt-4o")
    with pytest.raises(CheckpointMismatch, match="params"):
        go(source, output, gateway.base_url, params={"temperature": 0.3})
    gateway.stats.reset()
    report, out = go(source, output, gateway.base_url, model="gpt-4o", restart=True)
    assert gateway.stats.requests == 8 and len(out) == 8


def test_a_failed_row_stays_failed_unless_retried(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(error_rate=1.0, fault_seed=3)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    write(source, rows(3))
    report, out = go(source, output, gw.base_url, max_attempts=1)
    assert report.failed == 3
    write(source, rows(4))
    gw.stats.reset()
    report, out = go(source, output, gw.base_url, max_attempts=1)
    assert gw.stats.requests == 1  # only the new row: errors are results too
    assert [r["status"] for r in out] == ["error"] * 4


def test_sigkill_while_folding_a_changed_input_loses_nothing(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import subprocess
    import sys
    import time

    from batchrunner.store.checkpoint import checkpoint_dir

    gw = start_gateway()
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    first = rows(3000)
    write(source, first)
    _, before = go(source, output, gw.base_url, concurrency=32)
    kept_ids = {r["id"]: r["response_id"] for r in before}
    edited = first[1:] + rows(200, 5000)  # one removed, 200 appended
    write(source, edited)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "RU_LLM_API_KEY": KEY, "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o", str(output),
           "-m", "gpt-4o-mini", "--base-url", gw.base_url, "-q"]
    gw.stats.reset()
    # Killed at each point of the fold the checkpoint's hook names: while the kept results
    # are being rewritten, then just after the new manifest (the commit point) was written.
    marks = tmp_path / "fold-marks"
    marks.mkdir()
    for point in ("rewriting", "committed"):
        proc = subprocess.Popen(cmd, env={**env, "BATCHRUNNER_FOLD_PAUSE": str(marks / point)},
                                stderr=subprocess.DEVNULL)
        limit = time.monotonic() + 60
        while not (marks / point).exists() and proc.poll() is None and time.monotonic() < limit:
            time.sleep(0.02)
        assert (marks / point).exists(), f"the fold never reached {point}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if point == "rewriting":
            assert sorted(p.name for p in checkpoint_dir(output).glob("compact-*.tmp"))
    done = subprocess.run(cmd, env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = pq.read_table(output).to_pylist()
    assert [r["id"] for r in after] == [r["id"] for r in edited]
    for row in after:
        if row["id"] in kept_ids:
            assert row["response_id"] == kept_ids[row["id"]]  # kept, never sent again
    # The fold comes before any request: killed in it, nothing was sent; the run after it
    # sends the 200 new rows and no other.
    assert gw.stats.requests == 200


def test_rows_only_appended_keep_their_segments(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    from batchrunner.store.checkpoint import checkpoint_dir

    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write(source, rows(30))
    _, before = go(source, output, gateway.base_url)
    segments = sorted(p.name for p in checkpoint_dir(output).glob("part-*.arrows"))
    write(source, rows(30) + rows(6, 30))
    gateway.stats.reset()
    _, after = go(source, output, gateway.base_url)
    assert gateway.stats.requests == 6 and after[:30] == before
    # No rewrite: the first session's segment is still there, the new rows in a segment of their own.
    now = sorted(p.name for p in checkpoint_dir(output).glob("part-*.arrows"))
    assert now[: len(segments)] == segments and len(now) == len(segments) + 1


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row numbers RequestBuilder.build is asked for, from now on."""
    from batchrunner.inputs.requests import RequestBuilder

    built: list[int] = []
    original = RequestBuilder.build

    def build(self, index, record, error, input_hash=None):  # type: ignore[no-untyped-def]
        built.append(index)
        return original(self, index, record, error, input_hash)

    monkeypatch.setattr(RequestBuilder, "build", build)
    return built


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_unchanged_rows_are_told_by_their_values_without_building_them(
    tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch, suffix: str  # type: ignore[no-untyped-def]
) -> None:
    source, output = tmp_path / f"in{suffix}", tmp_path / "out.parquet"
    first = rows(40)
    write(source, first)
    go(source, output, gateway.base_url)
    edited = [dict(r) for r in first] + rows(5, 40)
    edited[7]["prompt"] = "An edited question: why is grass green?"
    write(source, edited)
    built = count_builds(monkeypatch)
    gateway.stats.reset()
    report, after = go(source, output, gateway.base_url)
    assert gateway.stats.requests == 6 and report.exit_code == 0
    # Built: the edited row twice (compared, then sent) and the five new ones, nothing else.
    assert sorted(built) == [7, 7, 40, 41, 42, 43, 44]
    assert after[7]["prompt"] == edited[7]["prompt"]


def test_a_checkpoint_without_input_hashes_is_compared_by_its_bodies(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    """A checkpoint of an older version (no `_ihash` column): nothing paid for is sent again."""
    from batchrunner.store.checkpoint import checkpoint_dir

    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    first = rows(30)
    write(source, first)
    _, before = go(source, output, gateway.base_url)
    for segment in checkpoint_dir(output).glob("part-*.arrows"):  # rewritten as the old layout
        table = pa.ipc.open_stream(segment.read_bytes()).read_all().drop_columns(["_ihash"])
        with pa.OSFile(str(segment), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
            out.write_table(table)
    edited = [dict(r) for r in first] + rows(3, 30)
    edited[2]["prompt"] = "An edited question: what is a prime?"
    write(source, edited)
    gateway.stats.reset()
    report, after = go(source, output, gateway.base_url)
    assert gateway.stats.requests == 3 + 1 and report.exit_code == 0
    kept = [r for r in after[:30] if r["id"] != "q0002"]
    assert [r["response_id"] for r in kept] == [
        r["response_id"] for r in before if r["id"] != "q0002"
    ]


def test_integer_ids_match_across_runs(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    ids = pa.array([101, 102, 103, 104], pa.int32())
    prompts = [f"Question {i}: why?" for i in range(4)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), source)
    _, before = go(source, output, gateway.base_url)
    pq.write_table(pa.table({"id": pa.array([101, 102, 103, 104, 105], pa.int64()),
                             "prompt": [*prompts, "Question 4: why?"]}), source)
    gateway.stats.reset()
    _, after = go(source, output, gateway.base_url)
    assert gateway.stats.requests == 1
    assert [r["response_id"] for r in after[:4]] == [r["response_id"] for r in before]
