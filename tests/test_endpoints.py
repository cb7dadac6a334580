"""Several endpoints (docs/run.md, "Several endpoints"): rows shared out among gateways, one
that stops answering taken out, its rows sent by the others.

Real simulators on loopback: in-process ones (`start_gateway`), and `batchrunner gateway`
subprocesses where one must be SIGKILLed; the run as a user runs it (the CLI in a subprocess)
where its exit code and its warnings are the point.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from scripted_server import Reply, Request, scripted_server

from batchrunner import RunConfig, run
from batchrunner.config.endpoints import Endpoint

REPO = Path(__file__).resolve().parents[1]
KEY_A = "sk-ru-endpoint-a-4f1e9d2c7b"
KEY_B = "sk-ru-endpoint-b-8a3c6e0f5d"
BAD_KEY = "sk-ru-refused-key-1b2c3d4e5f"


def write_input(path: Path, rows: int, models: list[str] | None = None) -> Path:
    with open(path, "w") as handle:
        for i in range(rows):
            record: dict[str, Any] = {"id": f"r{i:04d}", "prompt": f"Say {i}."}
            if models:
                record["model"] = models[i % len(models)]
            handle.write(json.dumps(record) + "\n")
    return path


def run_cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("OPENAI_API_KEY", "RU_LLM_API_KEY", "RU_LLM_BASE_URL", "OPENAI_BASE_URL")}
    full.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "batchrunner", *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rows_of(output: Path) -> list[dict[str, Any]]:
    return pq.read_table(output).to_pylist()


def assert_every_row_once_ok(rows: list[dict[str, Any]], n: int) -> None:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {f"r{i:04d}" for i in range(n)}
    assert {r["status"] for r in rows} == {"ok"}


def no_key_in(tmp_path: Path, *texts: str) -> None:
    for key in (KEY_A, KEY_B, BAD_KEY):
        for text in texts:
            assert key not in text
        for path in tmp_path.rglob("*"):
            if path.is_file() and path.suffix != ".jsonl":
                assert key.encode() not in path.read_bytes(), path


# -- sharing ------------------------------------------------------------------------------


def test_rows_are_shared_out_and_each_names_its_endpoint(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = start_gateway(latency_ms=5), start_gateway(latency_ms=5)
    monkeypatch.setenv("KEY_A", KEY_A)
    monkeypatch.setenv("KEY_B", KEY_B)
    source = write_input(tmp_path / "in.jsonl", 200)
    config = RunConfig(
        input=source, output=tmp_path / "out.parquet", model="gpt-4o-mini", concurrency=4,
        endpoints=(Endpoint(a.base_url, "KEY_A"), Endpoint(b.base_url, "KEY_B")),
    )
    report = run(config, handle_signals=False)
    assert report.exit_code == 0
    rows = rows_of(config.output)
    assert_every_row_once_ok(rows, 200)
    by = Counter(r["endpoint"] for r in rows)
    assert set(by) == {a.base_url, b.base_url}
    assert min(by.values()) > 40, by  # both took a real share
    assert a.stats.by_status.get(200, 0) + b.stats.by_status.get(200, 0) == 200
    shares = {e.endpoint: e.rows for e in report.endpoints}
    assert shares == dict(by)
    summary = run_cli("summary", str(config.output), "--by", "endpoint", "--format", "json",
                      env={})
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.count(a.base_url) and summary.stdout.count(b.base_url)
    no_key_in(tmp_path)


def test_two_rate_limited_endpoints_take_about_half_the_time_of_one(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two endpoints each limited to 600 requests a minute: 400 rows at about 1,200 a minute
    (20 s), where one endpoint's pacing allows at most 600 (40 s); no 429 came back."""
    rpm, rows = 600, 400
    a, b = start_gateway(rpm=rpm), start_gateway(rpm=rpm)
    monkeypatch.setenv("KEY_A", KEY_A)
    monkeypatch.setenv("KEY_B", KEY_B)
    source = write_input(tmp_path / "in.jsonl", rows)
    config = RunConfig(
        input=source, output=tmp_path / "out.parquet", model="gpt-4o-mini", concurrency=8,
        endpoints=(Endpoint(a.base_url, "KEY_A", rpm=rpm), Endpoint(b.base_url, "KEY_B", rpm=rpm)),
    )
    report = run(config, handle_signals=False)
    assert report.exit_code == 0
    assert_every_row_once_ok(rows_of(config.output), rows)
    per_minute = rows / report.wall_seconds * 60
    # one endpoint can never exceed its rpm (600); two reach well over 1.5 times that
    assert per_minute > 1.5 * rpm, per_minute
    assert per_minute < 2.2 * rpm, per_minute  # and each kept to its own limit
    for gateway in (a, b):
        assert gateway.stats.by_status.get(429, 0) == 0, gateway.stats.by_status
        assert gateway.stats.by_status.get(200, 0) > 0.4 * rows


# -- an endpoint that stops answering -----------------------------------------------------


def _serve(port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "batchrunner", "gateway", "--port", str(port),
                             *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    limit = time.monotonic() + 30
    while time.monotonic() < limit:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the gateway did not start")


def test_an_endpoint_killed_mid_run_its_rows_go_to_the_other(tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    a = _serve(port_a, "--latency-ms", "100")
    b = _serve(port_b, "--latency-ms", "100")
    url_a, url_b = f"http://127.0.0.1:{port_a}/v1", f"http://127.0.0.1:{port_b}/v1"
    try:
        rows = 500
        source = write_input(tmp_path / "in.jsonl", rows)
        output = tmp_path / "out.parquet"
        full = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RU_LLM_API_KEY")}
        full.update(KEY_A=KEY_A, KEY_B=KEY_B, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o", str(output),
             "-m", "gpt-4o-mini", "--concurrency", "4", "--endpoint", url_a, "--api-key-env",
             "KEY_A", "--endpoint", url_b, "--api-key-env", "KEY_B", "-q"],
            env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        served, limit = 0, time.monotonic() + 60
        while served < 60 and time.monotonic() < limit:  # a share of the rows went to A
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port_a}/_simulator/stats") as r:
                    served = int(json.load(r)["requests"])
        a.send_signal(signal.SIGKILL)
        a.wait()
        out, err = proc.communicate(timeout=120)
    finally:
        for gateway in (a, b):
            gateway.kill()
            gateway.wait()
    assert proc.returncode == 0, err
    table = rows_of(output)
    assert_every_row_once_ok(table, rows)
    by = Counter(r["endpoint"] for r in table)
    assert by[url_a] > 20 and by[url_b] > by[url_a], by
    taken_out = [line for line in err.splitlines() if "taken out" in line]
    assert len(taken_out) == 1 and url_a in taken_out[0], err
    no_key_in(tmp_path, out, err)


def test_an_endpoint_refusing_its_key_is_taken_out_with_one_warning(
    tmp_path: Path, start_gateway: Any
) -> None:
    a = start_gateway(keys=(KEY_A,))  # the key its variable holds is not this one: 401
    b = start_gateway()
    source = write_input(tmp_path / "in.jsonl", 120)
    output = tmp_path / "out.parquet"
    result = run_cli("run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini",
                     "--concurrency", "4", "--endpoint", a.base_url, "--api-key-env", "BAD",
                     "--endpoint", b.base_url, "--api-key-env", "KEY_B",
                     env={"BAD": BAD_KEY, "KEY_B": KEY_B})
    assert result.returncode == 0, result.stderr
    table = rows_of(output)
    assert_every_row_once_ok(table, 120)
    assert {r["endpoint"] for r in table} == {b.base_url}
    taken_out = [line for line in result.stderr.splitlines() if "taken out" in line]
    assert len(taken_out) == 1 and a.base_url in taken_out[0], result.stderr
    assert "refused" in taken_out[0]
    assert "endpoints (rows answered this session" in result.stderr  # the final summary
    assert re.search(rf"{re.escape(b.base_url)}\s+120 rows", result.stderr), result.stderr
    assert a.stats.by_status.get(401, 0) >= 1
    no_key_in(tmp_path, result.stdout, result.stderr)


def test_every_endpoint_down_is_an_outage_exit_3_with_the_rows_pending(tmp_path: Path) -> None:
    urls = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]  # nobody listens
    source = write_input(tmp_path / "in.jsonl", 30)
    output = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    result = run_cli("run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini", "-q",
                     "--endpoint", urls[0], "--api-key-env", "KEY_A", "--endpoint", urls[1],
                     "--api-key-env", "KEY_B", "--summary-json", str(summary),
                     env={"KEY_A": KEY_A, "KEY_B": KEY_B})
    assert result.returncode == 3, result.stderr
    assert "every endpoint is out" in result.stderr
    figures = json.loads(summary.read_text())
    assert figures["pending"] == 30 and figures["failed"] == 0
    no_key_in(tmp_path, result.stdout, result.stderr)


def test_every_key_refused_is_exit_4(tmp_path: Path, start_gateway: Any) -> None:
    a, b = start_gateway(keys=(KEY_A,)), start_gateway(keys=(KEY_B,))
    source = write_input(tmp_path / "in.jsonl", 30)
    output = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    result = run_cli("run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini", "-q",
                     "--endpoint", a.base_url, "--api-key-env", "BAD",
                     "--endpoint", b.base_url, "--api-key-env", "BAD",
                     "--summary-json", str(summary), env={"BAD": BAD_KEY})
    assert result.returncode == 4, result.stderr
    assert json.loads(summary.read_text())["pending"] == 30
    no_key_in(tmp_path, result.stdout, result.stderr)


# -- pre-flight ---------------------------------------------------------------------------


def _lists_only(models: list[str]) -> Any:
    """A gateway that lists `models` and answers chat completions for them."""

    def handler(request: Request) -> Reply:
        if request.method == "GET" and request.path.endswith("/models"):
            return Reply(json={"object": "list",
                               "data": [{"id": m, "object": "model"} for m in models]})
        body = request.json()
        if body["model"] not in models:
            return Reply(status=404, json={"error": {"message": "no such model",
                                                     "code": "model_not_found"}})
        return Reply(json={
            "id": "c", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        })

    return handler


def test_a_model_one_endpoint_lacks_goes_only_to_those_that_list_it(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = start_gateway()  # lists every model of the simulator
    monkeypatch.setenv("KEY_A", KEY_A)
    monkeypatch.setenv("KEY_B", KEY_B)
    with scripted_server(_lists_only(["gpt-4o-mini"])) as a:
        source = write_input(tmp_path / "in.jsonl", 60, models=["gpt-4o-mini", "gpt-4o"])
        config = RunConfig(
            input=source, output=tmp_path / "out.parquet", concurrency=2,
            endpoints=(Endpoint(a.base_url, "KEY_A"), Endpoint(b.base_url, "KEY_B")),
        )
        report = run(config, handle_signals=False)
        sent_to_a = [r.json()["model"] for r in a.requests if r.method == "POST"]
    assert report.exit_code == 0
    table = rows_of(config.output)
    assert_every_row_once_ok(table, 60)
    assert {r["endpoint"] for r in table if r["model"] == "gpt-4o"} == {b.base_url}
    assert set(sent_to_a) == {"gpt-4o-mini"}
    assert sum(r["endpoint"] == a.base_url for r in table) > 5  # A took its share


def test_a_model_no_endpoint_lists_is_exit_2_before_anything_is_sent(tmp_path: Path) -> None:
    with scripted_server(_lists_only(["gpt-4o-mini"])) as a, \
            scripted_server(_lists_only(["gpt-4o"])) as b:
        source = write_input(tmp_path / "in.jsonl", 10)
        result = run_cli("run", "-i", str(source), "-o", str(tmp_path / "out.parquet"),
                         "-m", "gpt-4o-mni", "--endpoint", a.base_url, "--api-key-env", "KEY_A",
                         "--endpoint", b.base_url, "--api-key-env", "KEY_B",
                         env={"KEY_A": KEY_A, "KEY_B": KEY_B})
        posts = [r for s in (a, b) for r in s.requests if r.method == "POST"]
    assert result.returncode == 2, result.stderr
    assert "not one any endpoint lists" in result.stderr and "gpt-4o-mini" in result.stderr
    assert posts == []


def test_an_endpoint_taken_out_is_tried_again_after_the_cool_down(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from batchrunner.engine import fleet

    monkeypatch.setattr(fleet, "COOL_DOWN_SECONDS", 1.0)
    refused = {"left": 2}  # the first two requests: 401, the rest answered
    answer = _lists_only(["gpt-4o-mini"])

    def handler(request: Request) -> Reply:
        if refused["left"] and request.method == "POST":
            refused["left"] -= 1
            return Reply(status=401, json={"error": {"message": "bad key",
                                                     "code": "invalid_api_key"}})
        return answer(request)

    b = start_gateway(latency_ms=40)
    monkeypatch.setenv("KEY_A", KEY_A)
    monkeypatch.setenv("KEY_B", KEY_B)
    with scripted_server(handler) as a:
        source = write_input(tmp_path / "in.jsonl", 300)
        config = RunConfig(
            input=source, output=tmp_path / "out.parquet", model="gpt-4o-mini", concurrency=2,
            endpoints=(Endpoint(a.base_url, "KEY_A"), Endpoint(b.base_url, "KEY_B")),
        )
        with caplog.at_level("INFO", logger="batchrunner"):
            report = run(config, handle_signals=False)
    assert report.exit_code == 0
    table = rows_of(config.output)
    assert_every_row_once_ok(table, 300)
    assert sum(r["endpoint"] == a.base_url for r in table) > 20  # back in rotation
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if "taken out" in w]) == 1, warnings
    assert any("back in rotation" in r.getMessage() for r in caplog.records)


# -- the Ray engine -----------------------------------------------------------------------


def test_two_endpoints_on_ray_each_actor_with_its_endpoint(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optional import require

    ray = require("ray", "test-ray", "the Ray engine's tests")
    if ray.is_initialized():
        pytest.skip("a Ray instance of another test module is running")
    a, b = start_gateway(), start_gateway()
    monkeypatch.setenv("KEY_A", KEY_A)  # set before the run starts Ray: its workers inherit it
    monkeypatch.setenv("KEY_B", KEY_B)
    source = write_input(tmp_path / "in.jsonl", 120)
    config = RunConfig(
        input=source, output=tmp_path / "out.parquet", model="gpt-4o-mini", concurrency=4,
        engine="ray", ray_actors=2,
        endpoints=(Endpoint(a.base_url, "KEY_A"), Endpoint(b.base_url, "KEY_B")),
    )
    report = run(config, handle_signals=False)
    assert report.exit_code == 0
    table = rows_of(config.output)
    assert_every_row_once_ok(table, 120)
    by = Counter(r["endpoint"] for r in table)
    assert set(by) == {a.base_url, b.base_url}, by
    assert a.stats.by_status.get(200, 0) == by[a.base_url]
    assert b.stats.by_status.get(200, 0) == by[b.base_url]


# -- the run's limits over all endpoints ---------------------------------------------------


def test_the_budget_covers_every_endpoint_together(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-cost over two endpoints: the run stops at the budget (exit 5), having spent no
    more than it in all, both endpoints having sent."""
    a, b = start_gateway(latency_ms=5), start_gateway(latency_ms=5)
    monkeypatch.setenv("KEY_A", KEY_A)
    monkeypatch.setenv("KEY_B", KEY_B)
    source = write_input(tmp_path / "in.jsonl", 400)
    budget = 0.03
    config = RunConfig(
        input=source, output=tmp_path / "out.parquet", model="gpt-4o", concurrency=4,
        max_cost=budget, params={"max_tokens": 50},
        endpoints=(Endpoint(a.base_url, "KEY_A"), Endpoint(b.base_url, "KEY_B")),
    )
    report = run(config, handle_signals=False)
    assert report.exit_code == 5, report.message
    assert 0 < report.cost_usd <= budget
    assert 20 < report.ok < 400
    assert a.stats.requests > 0 and b.stats.requests > 0


def test_one_response_cache_serves_every_endpoint(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is keyed by the run's endpoints together: answers any of them gave serve the
    same job again, whichever endpoint a row would go to, in whatever order they are named."""
    a, b = start_gateway(), start_gateway()
    monkeypatch.setenv("KEY_A", KEY_A)
    monkeypatch.setenv("KEY_B", KEY_B)
    source = write_input(tmp_path / "in.jsonl", 80)
    ends = (Endpoint(a.base_url, "KEY_A"), Endpoint(b.base_url, "KEY_B"))
    cache = tmp_path / "cache.sqlite"
    first = run(RunConfig(input=source, output=tmp_path / "one.parquet", model="gpt-4o-mini",
                          endpoints=ends, cache=cache), handle_signals=False)
    assert first.exit_code == 0 and first.cache_hits == 0
    sent = a.stats.requests + b.stats.requests
    again = run(RunConfig(input=source, output=tmp_path / "two.parquet", model="gpt-4o-mini",
                          endpoints=ends[::-1], cache=cache), handle_signals=False)
    assert again.exit_code == 0 and again.cache_hits == 80
    assert a.stats.requests + b.stats.requests == sent  # nothing sent the second time
    no_key_in(tmp_path)


# -- the shared queue, without a network ---------------------------------------------------


def test_the_shared_queue_routes_by_model_and_ends_when_nothing_can_come_back() -> None:
    import asyncio

    from batchrunner.engine.fleet import SharedRows
    from batchrunner.results import Row

    def row(i: int, model: str) -> Row:
        return Row(index=i, id=f"r{i}", body={"model": model, "messages": []})

    async def main() -> None:
        rows = SharedRows(4, wake_all=True)
        await rows.put(row(0, "only-a"))
        await rows.put(row(1, "any"))
        only_b = lambda model: model != "only-a"  # noqa: E731
        taken = await rows.get(only_b, lambda: False)
        assert taken is not None and taken.index == 1  # B skips the row it may not send
        rows.put_back(taken)  # given back: first in line again
        first = await rows.get(lambda model: True, lambda: False)
        assert first is not None and first.index == 1
        rows.end()
        waiting = asyncio.ensure_future(rows.get(only_b, lambda: False))
        await asyncio.sleep(0)
        assert not waiting.done()  # row 1 is being sent: it may come back
        rows.done()
        rows.done()  # nothing in flight; row 0 still waits for an endpoint that takes it
        await asyncio.sleep(0)
        assert not waiting.done()
        last = await rows.get(lambda model: True, lambda: False)
        assert last is not None and last.index == 0
        rows.done()
        assert await waiting is None  # fed, empty, nothing in flight: over

    asyncio.run(main())


def test_two_keys_at_one_gateway_are_two_endpoints_one_refused(
    tmp_path: Path, start_gateway: Any
) -> None:
    """`--api-key-env KEY_A --api-key-env BAD` without --endpoint: two endpoints at one base
    URL; the refused key's is taken out, named by its variable (never its value)."""
    gw = start_gateway(keys=(KEY_A,))
    source = write_input(tmp_path / "in.jsonl", 40)
    result = run_cli("run", "-i", str(source), "-o", str(tmp_path / "out.parquet"),
                     "-m", "gpt-4o-mini", "--base-url", gw.base_url,
                     "--api-key-env", "KEY_A", "--api-key-env", "BAD",
                     env={"KEY_A": KEY_A, "BAD": BAD_KEY})
    assert result.returncode == 0, result.stderr
    assert_every_row_once_ok(rows_of(tmp_path / "out.parquet"), 40)
    taken_out = [line for line in result.stderr.splitlines() if "taken out" in line]
    assert len(taken_out) == 1 and "(key $BAD)" in taken_out[0], result.stderr
    no_key_in(tmp_path, result.stdout, result.stderr)


def test_a_sweep_and_a_deadline_over_several_endpoints(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = start_gateway(latency_ms=5), start_gateway(latency_ms=5)
    monkeypatch.setenv("KEY_A", KEY_A)
    monkeypatch.setenv("KEY_B", KEY_B)
    ends = (Endpoint(a.base_url, "KEY_A"), Endpoint(b.base_url, "KEY_B"))
    source = write_input(tmp_path / "in.jsonl", 30)
    sweep = RunConfig(input=source, output=tmp_path / "sweep.parquet",
                      models=("gpt-4o-mini", "gpt-4o"), endpoints=ends, concurrency=2)
    report = run(sweep, handle_signals=False)
    assert report.exit_code == 0
    table = rows_of(sweep.output)
    assert Counter(r["model"] for r in table) == {"gpt-4o-mini": 30, "gpt-4o": 30}
    assert {r["endpoint"] for r in table} == {a.base_url, b.base_url}
    # the deadline stops every endpoint: 60 requests a minute each, 2 s
    slow = (Endpoint(a.base_url, "KEY_A", rpm=60), Endpoint(b.base_url, "KEY_B", rpm=60))
    late = RunConfig(input=source, output=tmp_path / "late.parquet", model="gpt-4o-mini",
                     endpoints=slow, deadline="2s", concurrency=2)
    stopped = run(late, handle_signals=False)
    assert stopped.exit_code == 5 and stopped.reason == "deadline"
    assert 0 < stopped.ok < 30
