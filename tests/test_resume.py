"""Never pay twice: crashes, signals, resume, fingerprints, the lock and `status`.

Runs are real subprocesses of the CLI, stopped with real signals, against the gateway
simulator on loopback; the simulator's counters say how many requests were really sent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchrunner.simulator import complete
from batchrunner.store.checkpoint import checkpoint_dir

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-ru-resume-tests-0b7e3c9d1f2a4e6b8c0d"
MODEL = "gpt-4o-mini"


def write_input(path: Path, rows: int) -> Path:
    words = ["harbour", "lattice", "meadow", "quartz", "saffron", "tundra", "vector", "willow"]
    with open(path, "w") as handle:
        for i in range(rows):
            prompt = f"Write about {words[i % 8]} and {words[(i * 3) % 8]}, take {i}."
            handle.write(json.dumps({"id": f"r{i:05d}", "prompt": prompt}) + "\n")
    return path


def command(source: Path, output: Path, base_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o", str(output),
            "-m", MODEL, "--base-url", base_url, *extra]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY",)}
    env["RU_LLM_API_KEY"] = KEY
    return env


def start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=environment(), capture_output=True, text=True,
                          timeout=timeout)


def wait_for_progress(output: Path, at_least_rows: int = 1, timeout: float = 30) -> None:
    """Block until the checkpoint holds some results (so a kill lands mid-run)."""
    directory = checkpoint_dir(output)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.stat().st_size > 2000 for p in directory.glob("part-*.arrows")):
            return
        time.sleep(0.05)
    raise AssertionError("the run made no checkpoint in time")


def assert_exact_output(output: Path, source: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    out = pq.read_table(output).to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in rows], "one row per input row, in order"
    for source_row, result in zip(rows, out):
        expected = complete({"model": MODEL,
                             "messages": [{"role": "user", "content": source_row["prompt"]}]})
        assert result["status"] == "ok"
        assert result["content"] == expected.texts[0]
        assert result["completion_tokens"] == expected.usage.completion_tokens
    return out


def status(output: Path) -> dict[str, Any]:
    done = finish([sys.executable, "-m", "batchrunner", "status", str(output), "--format",
                   "json"])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_sigkill_at_random_moments_loses_nothing_and_repeats_little(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(latency_ms=20, jitter_ms=10)
    rows, concurrency, every, kills = 600, 8, 20, 4
    source = write_input(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.parquet"
    cmd = command(source, output, gw.base_url, "--concurrency", str(concurrency),
                  "--checkpoint-every", str(every))
    rng = random.Random(11)
    for _ in range(kills):
        proc = start(cmd)
        wait_for_progress(output)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert (checkpoint_dir(output) / "lock").exists()  # left behind, and must not block
    state = status(output)
    assert not state["live"] and not state["finished"] and state["pending"] > 0
    done = finish(cmd)
    assert done.returncode == 0, done.stderr
    assert_exact_output(output, source)
    extra = gw.stats.requests - rows
    assert 0 <= extra <= kills * (concurrency + every), f"{extra} requests sent twice"
    print(f"SIGKILL x{kills}: {extra} requests repeated (bound {kills * (concurrency + every)})")
    # run again: nothing is sent, same exit
    before = gw.stats.requests
    again = finish(cmd)
    assert again.returncode == 0 and gw.stats.requests == before


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_checkpoint_and_say_how_to_resume(
    tmp_path: Path, start_gateway, sig: int, code: int  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(latency_ms=40)
    rows, concurrency = 400, 8
    source = write_input(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.parquet"
    cmd = command(source, output, gw.base_url, "--concurrency", str(concurrency))
    proc = start(cmd)
    wait_for_progress(output)
    started = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - started < 8, "stops within a few seconds"
    assert proc.returncode == code, stderr
    assert "run the same command again" in stderr
    assert "Traceback" not in stderr
    state = status(output)
    assert 0 < state["done"] < rows and not state["live"]
    sent_before = gw.stats.requests
    done = finish(cmd)
    assert done.returncode == 0, done.stderr
    assert_exact_output(output, source)
    # everything answered before the signal was checkpointed: nothing is asked twice
    assert gw.stats.requests - rows <= concurrency
    assert gw.stats.requests >= sent_before


def test_a_second_ctrl_c_exits_at_once_with_a_readable_checkpoint(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    # In-flight requests of 8 s would hold the first Ctrl-C for its whole 5 s grace period:
    # the second must end the process well before that, even on two busy cores.
    gw = start_gateway(latency_ms=8000)
    source = write_input(tmp_path / "in.jsonl", 50)
    output = tmp_path / "out.parquet"
    cmd = command(source, output, gw.base_url, "--concurrency", "4")
    proc = start(cmd)
    deadline = time.monotonic() + 30
    while gw.stats.in_flight < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    # the precondition, or the test would prove nothing: four requests are being answered
    assert gw.stats.in_flight == 4, f"only {gw.stats.in_flight} requests in flight after 30 s"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # the first Ctrl-C waits for what is in flight
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)
    assert time.monotonic() - started < 3
    assert proc.returncode == 130
    gw.stats.reset()
    fast = start_gateway()
    done = finish(command(source, output, fast.base_url))
    assert done.returncode == 0, done.stderr
    assert_exact_output(output, source)


# The CLI with every result the run records noted in a file as it is recorded (before it is
# written to the checkpoint): the answers the run had received when it was stopped.
NOTING = """
import os, sys
import batchrunner.engine.recorder as engine
trace = os.open(os.environ["NOTED_RESULTS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
original = engine.Recorder.record
def noting(self, result, *args, **kwargs):
    original(self, result, *args, **kwargs)
    os.write(trace, (result.id + "\\n").encode())
engine.Recorder.record = noting
from batchrunner.cli.commands import main
sys.argv[0] = "batchrunner"
main()
"""


def test_a_second_ctrl_c_keeps_the_answers_already_received(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    """The second Ctrl-C gives what is in flight no more time, but the answers received and
    not yet written (the checkpoint is written every 2 s here) are written before it exits."""
    gw = start_gateway(latency_ms=2500, jitter_ms=2450)  # answers keep arriving, some slow
    rows = 400
    source = write_input(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.parquet"
    noted = tmp_path / "noted.txt"
    args = command(source, output, gw.base_url, "--concurrency", "16",
                   "--checkpoint-every", "100000")[3:]  # `run ...`; only the 2-second writes
    env = environment() | {"NOTED_RESULTS": str(noted), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", NOTING, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        not noted.exists() or len(noted.read_text().split()) < 10
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # the first Ctrl-C waits for what is in flight
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "writing the answers received to the checkpoint" in stderr
    assert "run the same command again" in stderr and "Traceback" not in stderr
    received = noted.read_text().split()
    state = status(output)
    assert state["done"] == len(received), (state["done"], len(received))  # before: fewer
    gw.stats.reset()
    fast = start_gateway()
    done = finish(command(source, output, fast.base_url))
    assert done.returncode == 0, done.stderr
    assert fast.stats.requests == rows - len(received)  # the rest, and only the rest
    assert_exact_output(output, source)


def test_a_changed_setting_is_refused_unless_restart(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    source = write_input(tmp_path / "in.jsonl", 20)
    output = tmp_path / "out.parquet"
    assert finish(command(source, output, gateway.base_url)).returncode == 0
    # a changed setting
    changed = command(source, output, gateway.base_url, "--temperature", "0.5")
    refused = finish(changed)
    assert refused.returncode == 2
    assert "temperature" in refused.stderr and "--restart" in refused.stderr
    # a changed input with a changed setting: still refused (docs/resume.md#running-again)
    with open(source, "a") as handle:
        handle.write(json.dumps({"id": "extra", "prompt": "one more"}) + "\n")
    refused = finish(changed)
    assert refused.returncode == 2 and "input file changed" in refused.stderr
    assert "temperature" in refused.stderr
    # a changed input alone is incremental: only the new row is sent (tests/test_incremental.py)
    gateway.stats.reset()
    incremental = finish(command(source, output, gateway.base_url))
    assert incremental.returncode == 0, incremental.stderr
    assert gateway.stats.requests == 1 and "kept 20, new 1, changed 0, removed 0" in incremental.stderr
    gateway.stats.reset()
    restarted = finish(command(source, output, gateway.base_url, "--restart"))
    assert restarted.returncode == 0, restarted.stderr
    assert gateway.stats.requests == 21
    assert pq.read_table(output).num_rows == 21


def test_retry_failed_sends_only_the_error_rows(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    broken = start_gateway(error_rate=1.0)
    # fewer rows than an outage takes (20 in a row with no answer stop the run, pending)
    source = write_input(tmp_path / "in.jsonl", 15)
    output = tmp_path / "out.parquet"
    first = finish(command(source, output, broken.base_url, "--max-attempts", "1"))
    assert first.returncode == 1
    assert {r["status"] for r in pq.read_table(output).to_pylist()} == {"error"}
    healthy = start_gateway()
    again = finish(command(source, output, healthy.base_url))
    assert again.returncode == 1 and healthy.stats.requests == 0  # finished: exits as it did
    retried = finish(command(source, output, healthy.base_url, "--retry-failed"))
    assert retried.returncode == 0, retried.stderr
    assert healthy.stats.requests == 15
    assert_exact_output(output, source)


def test_a_second_run_on_the_same_output_is_refused_at_once(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    # 200 rows of 1 s at 4 in flight: the first run lasts 50 s, far longer than starting two
    # more processes takes on two busy cores (at 200 ms it was 10 s, and sometimes over)
    gw = start_gateway(latency_ms=1000)
    source = write_input(tmp_path / "in.jsonl", 200)
    output = tmp_path / "out.parquet"
    cmd = command(source, output, gw.base_url, "--concurrency", "4")
    first = start(cmd)
    try:
        wait_for_progress(output)
        assert status(output)["live"] is True
        started = time.monotonic()
        second = finish(cmd, timeout=30)
        assert second.returncode == 2
        assert "another run" in second.stderr
        assert time.monotonic() - started < 10
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 143


def test_a_torn_checkpoint_write_is_ignored(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(latency_ms=20)
    source = write_input(tmp_path / "in.jsonl", 300)
    output = tmp_path / "out.parquet"
    cmd = command(source, output, gw.base_url, "--concurrency", "8", "--checkpoint-every", "10")
    proc = start(cmd)
    wait_for_progress(output)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    segment = sorted(checkpoint_dir(output).glob("part-*.arrows"))[-1]
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 37])  # the last batch torn mid-write
    (checkpoint_dir(output) / "part-00099.arrows").write_bytes(b"\xff\xff\xff\xff\x10\x00")
    state = status(output)
    assert state["done"] > 0
    done = finish(cmd)
    assert done.returncode == 0, done.stderr
    assert_exact_output(output, source)


def test_status_after_the_end(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = write_input(tmp_path / "in.jsonl", 25)
    output = tmp_path / "out.parquet"
    assert finish(command(source, output, gateway.base_url)).returncode == 0
    state = status(output)
    assert state["finished"] and not state["live"]
    assert (state["rows"], state["done"], state["ok"], state["pending"]) == (25, 25, 25, 0)
    table = pq.read_table(output)
    assert state["total_tokens"] == sum(table.column("total_tokens").to_pylist())
    text = finish([sys.executable, "-m", "batchrunner", "status", str(output)])
    assert "finished" in text.stdout and "25" in text.stdout
    missing = finish([sys.executable, "-m", "batchrunner", "status", str(tmp_path / "no.parquet")])
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr


@pytest.mark.parametrize("damage", ["deleted", "corrupt", "not ours"])
def test_a_checkpoint_whose_manifest_cannot_be_trusted_is_refused_unless_restart(
    tmp_path: Path, gateway, damage: str  # type: ignore[no-untyped-def]
) -> None:
    source = write_input(tmp_path / "in.jsonl", 10)
    output = tmp_path / "out.parquet"
    assert finish(command(source, output, gateway.base_url)).returncode == 0
    manifest = checkpoint_dir(output) / "manifest.json"
    if damage == "deleted":
        manifest.unlink()
    else:
        manifest.write_text('{"finished": tr' if damage == "corrupt" else '[1, 2, 3]')
    gateway.stats.reset()
    other = command(source, output, gateway.base_url, "--max-tokens", "50")
    refused = finish(other)
    assert refused.returncode == 2, refused.stderr
    assert str(checkpoint_dir(output)) in refused.stderr and "--restart" in refused.stderr
    assert "Traceback" not in refused.stderr and gateway.stats.requests == 0
    for reader in (["status", str(output)], ["summary", str(output)], ["status", str(output),
                                                                       "--format", "json"]):
        read = finish([sys.executable, "-m", "batchrunner", *reader])
        assert read.returncode in (0, 2) and "Traceback" not in read.stderr, read.stderr
        assert "internal error" not in read.stderr
    output.unlink()  # no file to read instead: summary names the folder it cannot trust
    read = finish([sys.executable, "-m", "batchrunner", "summary", str(output)])
    assert read.returncode == 2 and "Traceback" not in read.stderr
    if damage != "deleted":  # with no manifest the folder is no checkpoint: "no file matches"
        assert str(checkpoint_dir(output)) in read.stderr, read.stderr
    validate = tmp_path / "job.toml"
    validate.write_text(f'input = "{source}"\noutput = "{output}"\nmodel = "{MODEL}"\n')
    checked = finish([sys.executable, "-m", "batchrunner", "validate", str(validate),
                      "--base-url", gateway.base_url])
    assert checked.returncode == 2 and str(checkpoint_dir(output)) in checked.stderr
    restarted = finish([*other, "--restart"])
    assert restarted.returncode == 0, restarted.stderr
    assert gateway.stats.requests == 10
