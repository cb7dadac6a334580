"""Failing fast (docs/gateway.md#failing-fast): the models checked before sending, and the systematic stop.

The CLI as a user runs it (subprocesses) against the gateway simulator on loopback; its
counters say how many chat requests were really sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from scripted_server import Reply, Request, scripted_server

from batchrunner.engine.preflight import FailureStreak, check_models, closest_models
from batchrunner.results import Result
from batchrunner.store.checkpoint import checkpoint_dir

KEY = "sk-ru-preflight-tests-3c1d7a9e5b2f4d6c8a0e"


def write_input(path: Path, rows: int, **extra: Any) -> Path:
    with open(path, "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": f"r{i:03d}", "prompt": f"Say {i}.", **extra}) + "\n")
    return path


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RU_LLM_BASE_URL")}
    env["RU_LLM_API_KEY"] = KEY
    return subprocess.run([sys.executable, "-m", "batchrunner", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_args(source: Path, output: Path, base_url: str, *extra: str) -> list[str]:
    return ["run", "-i", str(source), "-o", str(output), "--base-url", base_url, *extra]


# -- the pre-flight check -----------------------------------------------------------------


def test_a_mistyped_model_is_exit_2_naming_the_closest_and_nothing_is_sent(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    source = write_input(tmp_path / "in.jsonl", 30)
    output = tmp_path / "out.parquet"
    done = run_cli(*run_args(source, output, gateway.base_url, "-m", "gpt-4o-mni"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'gpt-4o-mni'" in lines[0] and "gpt-4o-mini" in lines[0]
    assert "--no-preflight" in lines[0]
    assert gateway.stats.requests == 0
    # the typo left no checkpoint behind that the corrected command would trip on
    assert not (checkpoint_dir(output) / "manifest.json").exists()
    fixed = run_cli(*run_args(source, output, gateway.base_url, "-m", "gpt-4o-mini"))
    assert fixed.returncode == 0, fixed.stderr
    assert gateway.stats.requests == 30


def test_the_models_of_rows_are_checked_too(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    rows = [{"id": "a", "prompt": "hi", "model": "gpt-4o"},
            {"id": "b", "prompt": "hi", "model": "claude-3-5-sonet-20241022"},
            {"id": "c", "prompt": "hi"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_cli(*run_args(source, tmp_path / "out.parquet", gateway.base_url, "-m", "gpt-4o"))
    assert done.returncode == 2, done.stderr
    assert "claude-3-5-sonet-20241022" in done.stderr
    assert "claude-3-5-sonnet-20241022" in done.stderr
    assert gateway.stats.requests == 0


def test_no_preflight_and_the_job_key_skip_the_check(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = write_input(tmp_path / "in.jsonl", 3)
    skipped = run_cli(*run_args(source, tmp_path / "a.parquet", gateway.base_url,
                                "-m", "gpt-4o-mni", "--no-preflight"))
    assert skipped.returncode == 1, skipped.stderr  # sent, and every row failed: 404
    assert gateway.stats.requests == 3
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "b.parquet"\nmodel = "gpt-4o-mni"\n'
                   f'base_url = "{gateway.base_url}"\npreflight = false\n')
    gateway.stats.reset()
    from_job = run_cli("run", str(job))
    assert from_job.returncode == 1, from_job.stderr
    assert gateway.stats.requests == 3


@pytest.mark.parametrize("models_reply", [
    Reply(status=404, json={"error": {"message": "no such route", "code": None}}),
    Reply(json={"object": "list", "data": []}),
    Reply(status=200, body=b"<html>models?</html>", headers={"Content-Type": "text/html"}),
], ids=["404", "empty-list", "html"])
def test_a_gateway_that_lists_no_models_is_fine(tmp_path: Path, models_reply: Reply) -> None:
    def answer(request: Request) -> Reply:
        if request.method == "GET":
            return models_reply
        return Reply(json={
            "id": "c1", "object": "chat.completion", "created": 1, "model": "anything",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

    source = write_input(tmp_path / "in.jsonl", 2)
    with scripted_server(answer) as server:
        done = run_cli(*run_args(source, tmp_path / "out.parquet", server.base_url,
                                 "-m", "our-own-model"))
        paths = [(r.method, r.path) for r in server.requests]
    assert done.returncode == 0, done.stderr
    assert paths[0] == ("GET", "/v1/models")  # asked first, before any chat request
    assert sorted(paths[1:]) == [("POST", "/v1/chat/completions")] * 2


def test_check_models_names_the_closest_ids() -> None:
    listed = [{"id": i} for i in ("gpt-4o", "gpt-4o-mini", "claude-3-5-haiku-20241022")]
    check_models({"gpt-4o", "gpt-4o-mini"}, listed)
    check_models({"anything"}, [])  # lists none: nothing to check against
    with pytest.raises(Exception, match="closest: gpt-4o-mini, gpt-4o"):
        check_models({"gpt-4o-mni"}, listed)
    with pytest.raises(Exception, match="lists 3 models"):
        check_models({"llama-zzz"}, listed)
    assert closest_models("GPT-4O", ["gpt-4o", "x"]) == ["gpt-4o"]


# -- the systematic-failure stop -----------------------------------------------------------


def test_every_row_failing_the_same_way_stops_with_exit_3_and_resumes(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    source = write_input(tmp_path / "in.jsonl", 200)
    output = tmp_path / "out.parquet"
    done = run_cli(*run_args(source, output, gateway.base_url, "-m", "gpt-4o-mni",
                             "--no-preflight", "-c", "4", "--summary-json",
                             str(tmp_path / "s.json")))
    assert done.returncode == 3, done.stderr
    sent = gateway.stats.requests
    assert 20 <= sent <= 20 + 4 + 1, sent  # the streak, plus what was in flight
    assert "failed the same way" in done.stderr and "model_not_found" in done.stderr
    assert "gpt-4o-mni" in done.stderr and f"{sent} answered rows" in done.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["exit_code"] == 3 and summary["reason"] == "systematic"
    # none of those rows is marked done: they are all pending
    status = run_cli("status", str(output), "--format", "json")
    state = json.loads(status.stdout)
    assert state["done"] == 0 and state["pending"] == 200
    assert not output.exists()
    # fixed, the same command sends them all (the old settings kept no result to protect)
    gateway.stats.reset()
    fixed = run_cli(*run_args(source, output, gateway.base_url, "-m", "gpt-4o-mini", "-c", "4"))
    assert fixed.returncode == 0, fixed.stderr
    assert gateway.stats.requests == 200
    assert pq.read_table(output).num_rows == 200


def test_ok_rows_between_failures_do_not_stop_the_run(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i:03d}", "prompt": f"Say {i}.", **({"model": "gpt-9"} if i % 3 else {})}
            for i in range(90)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_cli(*run_args(source, tmp_path / "out.parquet", gateway.base_url,
                             "-m", "gpt-4o-mini", "--no-preflight", "-c", "1"))
    assert done.returncode == 1, done.stderr
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert sum(r["status"] == "error" for r in out) == 60 and len(out) == 90


def result(i: int, status: str = "error", http: int | None = 404) -> Result:
    return Result(index=i, id=str(i), status=status, model="m", http_status=http,
                  error=f"HTTP {http}: nope" if status == "error" else None)


def test_the_streak_holds_back_its_rows_until_it_breaks_or_trips() -> None:
    streak = FailureStreak(limit=3)
    key = (404, "model_not_found")
    assert streak.observe(result(0), key) == []
    assert streak.observe(result(1), key) == []
    # no answer came back: neither extends nor breaks the streak
    timeout = result(2, http=None)
    assert streak.observe(timeout, None) == [timeout]
    ok = result(3, status="ok", http=200)
    assert [r.index for r in streak.observe(ok, None)] == [0, 1, 3]  # broken: all recorded
    other = result(4, http=400)
    assert streak.observe(result(5), key) == []
    assert [r.index for r in streak.observe(other, (400, None))] == [5]  # another failure
    assert streak.observe(result(6), key) == [other]  # the 400 is a streak of its own, broken
    assert streak.observe(result(7), key) == []
    assert streak.observe(result(8), key) == [] and streak.tripped  # 3 in a row: tripped
    assert streak.release() == []  # the tripped rows stay pending
    assert streak.observe(result(9), key) == [] and streak.count == 4
    assert streak.observe(other, (400, None)) == [other]  # others are still recorded
    assert "4 answered rows" in streak.describe() and "model_not_found" in streak.describe()
