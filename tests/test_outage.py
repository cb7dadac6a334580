"""The gateway unreachable or down: the run stops early, exit 3, the rows with no answer stay
pending and the same command sends exactly them once the gateway is back.

The CLI as a user runs it (subprocesses) against a closed port, a gateway answering 500 to
everything, a slow gateway; the rule's timing with an injected clock.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fakeclock import FakeClock
from scripted_server import Reply, Request, scripted_server

from batchrunner.engine.preflight import (
    UNREACHABLE_SECONDS,
    UNREACHABLE_SECONDS_AT_START,
    Outage,
)
from batchrunner.errors import GatewayUnreachable
from batchrunner.results import Result

KEY = "sk-ru-outage-tests-5e7a9c1b3d"
REPO = Path(__file__).resolve().parents[1]


def write_input(path: Path, rows: int) -> Path:
    with open(path, "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": f"r{i:03d}", "prompt": f"Say {i}."}) + "\n")
    return path


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RU_LLM_BASE_URL")}
    env.update(RU_LLM_API_KEY=KEY, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "batchrunner", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def completion(content: str = "hello") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def checkpointed(output: Path) -> int:
    status = run_cli("status", str(output), "--format", "json")
    assert status.returncode == 0, status.stderr
    return int(json.loads(status.stdout)["done"])


# -- a gateway nobody answers at ----------------------------------------------------------


def test_a_refused_port_stops_early_with_exit_3_and_the_rows_stay_pending(
    tmp_path: Path, start_gateway: Any
) -> None:
    port = free_port()  # nothing listens there: every connection is refused
    source = write_input(tmp_path / "in.jsonl", 50)
    output = tmp_path / "out.parquet"
    args = ["run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini",
            "--base-url", f"http://127.0.0.1:{port}/v1", "-q", "--summary-json",
            str(tmp_path / "summary.json")]
    started = time.monotonic()
    down = run_cli(*args)
    elapsed = time.monotonic() - started
    assert down.returncode == 3, down.stderr
    cause = f"the gateway at http://127.0.0.1:{port}/v1 refused every connection for 10 s"
    assert f"stopping: {cause}; no new requests are sent" in down.stderr
    assert "the gateway is unreachable or down (exit 3)" in down.stderr
    assert "ok 0, failed 0, pending 50" in down.stderr
    assert "requests sent 0" in down.stderr  # not one reached a gateway
    # before: 66 s, 300 attempts, every row recorded as an error
    assert elapsed < UNREACHABLE_SECONDS_AT_START + 15, elapsed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["exit_code"], summary["reason"], summary["pending"]) == (3, "outage", 50)
    assert cause in summary["message"]
    assert checkpointed(output) == 0  # nothing about the rows was recorded as failed

    gateway = start_gateway(port=port)  # the gateway is back
    back = run_cli(*args)
    assert back.returncode == 0, back.stderr
    assert gateway.stats.requests == 50
    assert pq.read_table(output).column("status").to_pylist() == ["ok"] * 50


def test_a_gateway_answering_500_to_everything_stops_after_20_rows(tmp_path: Path) -> None:
    state = {"down": True}

    def handler(request: Request) -> Reply:
        if state["down"]:
            return Reply(status=500, json={"error": {"message": "upstream is down",
                                                     "type": "server_error"}})
        return Reply(json=completion())

    source = write_input(tmp_path / "in.jsonl", 50)
    output = tmp_path / "out.parquet"
    with scripted_server(handler) as server:
        args = ["run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini",
                "--base-url", server.base_url, "-c", "4", "--max-attempts", "2", "-q",
                "--no-preflight"]
        down = run_cli(*args)
        assert down.returncode == 3, down.stderr
        assert f"the gateway at {server.base_url} answered none of the last 20 rows" \
            in down.stderr
        assert "upstream is down" in down.stderr
        assert "ok 0, failed 0, pending 50" in down.stderr
        sent_down = len(server.requests)
        assert sent_down <= 2 * (20 + 4)  # 20 rows and those in flight, 2 attempts each
        assert checkpointed(output) == 0

        state["down"] = False
        back = run_cli(*args)
        assert back.returncode == 0, back.stderr
        assert len(server.requests) - sent_down == 50  # exactly the rows with no answer
    assert pq.read_table(output).column("status").to_pylist() == ["ok"] * 50


def test_rows_that_got_no_answer_before_an_answered_row_are_recorded_as_failed(
    tmp_path: Path,
) -> None:
    """A few rows lost to 5xx while the gateway otherwise answers: not an outage."""

    def handler(request: Request) -> Reply:
        if "Say 3." in request.body.decode() or "Say 7." in request.body.decode():
            return Reply(status=503, json={"error": {"message": "busy"}})
        return Reply(json=completion())

    source = write_input(tmp_path / "in.jsonl", 12)
    output = tmp_path / "out.parquet"
    with scripted_server(handler) as server:
        done = run_cli("run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini",
                       "--base-url", server.base_url, "-c", "1", "--max-attempts", "2", "-q",
                       "--no-preflight")
    assert done.returncode == 1, done.stderr
    statuses = pq.read_table(output).column("status").to_pylist()
    assert statuses.count("error") == 2 and statuses.count("ok") == 10


# -- attempts that timed out after sending ------------------------------------------------


def test_attempts_that_timed_out_after_sending_are_counted_as_maybe_billed(
    tmp_path: Path, start_gateway: Any
) -> None:
    gateway = start_gateway(latency_ms=300)
    source = write_input(tmp_path / "in.jsonl", 6)
    summary_path = tmp_path / "summary.json"
    done = run_cli("run", "-i", str(source), "-o", str(tmp_path / "out.parquet"),
                   "-m", "gpt-4o-mini", "--base-url", gateway.base_url, "--timeout", "0.1",
                   "--max-attempts", "2", "-q", "--summary-json", str(summary_path))
    assert done.returncode == 1, done.stderr
    attempts = gateway.stats.requests
    assert attempts == 12
    assert (f"  {attempts} attempts timed out after sending; the gateway may have billed them"
            in done.stderr.splitlines())
    summary = json.loads(summary_path.read_text())
    assert summary["timed_out_after_sending"] == attempts == summary["sent"]


def test_requests_sent_counts_only_what_reached_the_gateway(
    tmp_path: Path, start_gateway: Any
) -> None:
    """A refused key stops the run: requests still waiting for their turn (--rpm) were never
    sent, and are not counted as sent."""
    gateway = start_gateway(keys=("sk-ru-the-right-one",))
    source = write_input(tmp_path / "in.jsonl", 30)
    summary_path = tmp_path / "summary.json"
    done = run_cli("run", "-i", str(source), "-o", str(tmp_path / "out.parquet"),
                   "-m", "gpt-4o-mini", "--base-url", gateway.base_url, "--rpm", "120",
                   "-c", "16", "-q", "--summary-json", str(summary_path), "--no-preflight")
    assert done.returncode == 4, done.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["sent"] == gateway.stats.requests, (summary["sent"], gateway.stats.requests)
    assert f"requests sent {gateway.stats.requests}" in done.stderr


# -- the rule, with an injected clock ------------------------------------------------------


def refused() -> GatewayUnreachable:
    return GatewayUnreachable("cannot connect to http://h:1: Connection refused", cause="refused")


def test_unreachable_trips_after_its_window_with_enough_attempts() -> None:
    clock = FakeClock()
    outage = Outage("http://user:secret@h:1/v1?api-version=1", clock=clock)
    assert not outage.unreachable(refused())
    clock.advance(UNREACHABLE_SECONDS_AT_START)
    assert not outage.unreachable(refused())  # 2 attempts only
    assert outage.unreachable(refused())
    assert outage.tripped
    assert outage.cause == "the gateway at http://h:1/v1 refused every connection for 10 s"


def test_an_answer_restarts_the_window_and_later_ones_are_longer() -> None:
    clock = FakeClock()
    outage = Outage("http://h:1/v1", clock=clock)
    for _ in range(3):
        outage.unreachable(refused())
    clock.advance(UNREACHABLE_SECONDS_AT_START - 1)
    outage.answered()  # the gateway came up
    assert outage.seconds_to_check() is None
    for _ in range(3):
        assert not outage.unreachable(refused())
    clock.advance(UNREACHABLE_SECONDS_AT_START + 1)
    assert not outage.check()  # after an answer, a restart gets the longer window
    assert outage.seconds_to_check() == UNREACHABLE_SECONDS - UNREACHABLE_SECONDS_AT_START - 1
    clock.advance(UNREACHABLE_SECONDS)
    assert outage.check() and "for 41 s" in str(outage.cause)


def test_rows_with_no_answer_are_held_released_by_an_answer_and_dropped_by_a_trip() -> None:
    outage = Outage("http://h:1/v1", limit=3)
    lost = [Result(index=i, id=str(i), status="error", model="m", error="HTTP 500") for i in range(5)]
    assert not outage.hold(lost[0]) and not outage.hold(lost[1])
    assert outage.release() == lost[:2]  # a row got an answer: those two failed
    assert not outage.hold(lost[2]) and not outage.hold(lost[3])
    assert outage.hold(lost[4])  # the third in a row: the gateway is down
    assert outage.take_dropped() == lost[2:] and outage.release() == []
    assert not outage.hold(lost[0])  # once tripped, every later one is dropped too
    assert outage.dropped == 4
    assert "answered none of the last 3 rows" in str(outage.cause)
