"""The Ray engine (docs/ray.md) on a local Ray instance: same output as the local engine, faults.

One Ray instance serves the module (starting one takes seconds). The keys the tests use are
put in the environment before it starts, so its worker processes inherit them, as the
workers of a real cluster would find them in their nodes' environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from optional import require

from batchrunner.config.settings import RunConfig
from batchrunner.engine import runner as engine
from batchrunner.simulator.stats import key_label

ray = require("ray", "test-ray", "the Ray engine's tests")

KEY_A = "sk-ru-" + "a" * 8 + "-ray-test-key-one"
KEY_B = "sk-ru-" + "b" * 8 + "-ray-test-key-two"
VOLATILE = ["latency_ms", "ttft_ms", "response_id"]  # timings and the gateway's random ids


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in ("BR_KEY_A", "BR_KEY_B")}
    os.environ["BR_KEY_A"], os.environ["BR_KEY_B"] = KEY_A, KEY_B
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _input(path: Path, rows: int, *, broken: tuple[int, ...] = ()) -> Path:
    with path.open("w") as f:
        for i in range(rows):
            if i in broken:
                f.write("{not json\n")
            else:
                f.write(json.dumps({"id": f"r{i}", "prompt": f"Question {i}?", "topic": i % 3}) + "\n")
    return path


def _config(tmp_path: Path, source: Path, name: str, **fields: Any) -> RunConfig:
    fields.setdefault("model", "gpt-4o-mini")
    fields.setdefault("api_key_env", "BR_KEY_A")
    return RunConfig(input=source, output=tmp_path / f"{name}.parquet", **fields)


def _stable(path: Path) -> pa.Table:
    return pq.read_table(path).drop_columns(VOLATILE)


def test_output_equals_the_local_engines_row_by_row(
    ray_cluster: None, gateway: Any, tmp_path: Path
) -> None:
    source = _input(tmp_path / "in.jsonl", 300, broken=(7, 150))
    common = dict(base_url=gateway.base_url, concurrency=8, params={"max_tokens": 20})
    local = engine.run(_config(tmp_path, source, "local", **common), handle_signals=False)
    sent_locally = gateway.stats.requests
    gateway.stats.reset()
    on_ray = engine.run(
        _config(tmp_path, source, "ray", engine="ray", ray_actors=2, **common),
        handle_signals=False,
    )
    assert gateway.stats.requests == sent_locally == 298  # the two broken lines are not sent
    assert (on_ray.exit_code, local.exit_code) == (1, 1)  # two input errors
    a, b = _stable(tmp_path / "ray.parquet"), _stable(tmp_path / "local.parquet")
    assert a.schema == b.schema
    assert a.to_pylist() == b.to_pylist()
    assert a.column("id").to_pylist()[:3] == ["r0", "r1", "r2"]
    figures = ("rows", "ok", "failed", "prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(on_ray, f) for f in figures] == [getattr(local, f) for f in figures]
    assert on_ray.cost_usd == pytest.approx(local.cost_usd)


def test_several_keys_are_shared_out_and_never_reach_ray(
    ray_cluster: None, gateway: Any, tmp_path: Path
) -> None:
    source = _input(tmp_path / "in.jsonl", 200)
    config = _config(
        tmp_path, source, "keys", engine="ray", ray_actors=2, api_key_env="BR_KEY_A,BR_KEY_B",
        base_url=gateway.base_url, concurrency=4,
    )
    report = engine.run(config, handle_signals=False)
    assert report.exit_code == 0
    by_key = gateway.stats.by_key
    assert set(by_key) == {key_label(KEY_A), key_label(KEY_B)}
    assert sum(by_key.values()) == 200 and min(by_key.values()) > 0
    # Neither key is in anything Ray keeps on disk (its session logs) or the checkpoint.
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    written = [p for p in session.rglob("*") if p.is_file()]
    written += [p for p in (tmp_path / "keys.parquet.checkpoint").rglob("*") if p.is_file()]
    written.append(tmp_path / "keys.parquet")
    assert written
    for path in written:
        data = path.read_bytes()
        assert KEY_A.encode() not in data and KEY_B.encode() not in data, path


def test_rpm_is_shared_so_the_total_holds(
    ray_cluster: None, start_gateway: Any, tmp_path: Path
) -> None:
    # Two actors on one key: each gets half the rpm, so the gateway's own limit of the
    # same rpm (on a 2 s window) never answers 429.
    gw = start_gateway(rpm=120, rate_window_s=2.0)  # 4 requests per 2 s window
    source = _input(tmp_path / "in.jsonl", 12)
    config = _config(
        tmp_path, source, "rpm", engine="ray", ray_actors=2, base_url=gw.base_url,
        concurrency=4, rpm=120,
    )
    report = engine.run(config, handle_signals=False)
    assert report.exit_code == 0
    assert gw.stats.by_status == {200: 12}


def test_refused_key_stops_every_actor_with_exit_4(
    ray_cluster: None, start_gateway: Any, tmp_path: Path
) -> None:
    gw = start_gateway(keys=(KEY_B,))  # BR_KEY_A's key is refused
    source = _input(tmp_path / "in.jsonl", 400)
    config = _config(
        tmp_path, source, "auth", engine="ray", ray_actors=2, base_url=gw.base_url, concurrency=4
    )
    report = engine.run(config, handle_signals=False)
    assert report.exit_code == 4
    assert "refused the API key" in report.message and KEY_A not in report.message
    assert gw.stats.requests <= 2 * 4  # each actor stops at its first refusal


def test_a_gateway_answering_500_stops_the_cluster_with_exit_3_rows_pending(
    ray_cluster: None, start_gateway: Any, tmp_path: Path
) -> None:
    down = start_gateway(error_rate=1.0)
    source = _input(tmp_path / "in.jsonl", 200)
    config = _config(tmp_path, source, "outage", engine="ray", ray_actors=2,
                     base_url=down.base_url, concurrency=4, max_attempts=1)
    report = engine.run(config, handle_signals=False)
    assert report.exit_code == 3 and report.reason == "outage", report.message
    assert f"the gateway at {down.base_url} answered none of the last 20 rows" in report.message
    assert report.ok == report.failed == 0 and report.pending == 200
    back = start_gateway()
    again = engine.run(config.replace(base_url=back.base_url), handle_signals=False)
    assert again.exit_code == 0 and back.stats.requests == 200


def test_budget_stops_the_cluster_with_exit_5_within_the_budget(
    ray_cluster: None, gateway: Any, tmp_path: Path
) -> None:
    source = _input(tmp_path / "in.jsonl", 400)
    config = _config(
        tmp_path, source, "budget", engine="ray", ray_actors=2, base_url=gateway.base_url,
        concurrency=4, params={"max_tokens": 50}, max_cost=0.002,
    )
    report = engine.run(config, handle_signals=False)
    assert report.exit_code == 5 and report.reason == "budget"
    assert 0 < report.ok < 400
    assert report.cost_usd <= 0.002
    # Resumable: a larger budget finishes the job, sending only the rows left.
    sent_before = gateway.stats.requests
    done = engine.run(config.replace(max_cost=1.0), handle_signals=False)
    assert done.exit_code == 0 and done.resumed == report.ok
    assert gateway.stats.requests - sent_before == 400 - report.ok


def test_deadline_stops_the_cluster_with_exit_5(
    ray_cluster: None, start_gateway: Any, tmp_path: Path
) -> None:
    gw = start_gateway(latency_ms=100)
    source = _input(tmp_path / "in.jsonl", 2000)
    config = _config(
        tmp_path, source, "deadline", engine="ray", ray_actors=2, base_url=gw.base_url,
        concurrency=4, deadline="3s",
    )
    report = engine.run(config, handle_signals=False)
    assert report.exit_code == 5 and report.reason == "deadline"
    assert 0 < report.ok < 2000 and report.pending == 2000 - report.ok


def _block_workers(root: int) -> list[int]:
    """Process ids of the live BlockWorker actors under process `root` (Ray names them so).

    Only this test's Ray session's workers: they descend from the process that started it
    (its raylet is that process's child), so another Ray on the machine is never touched.
    """
    parents: dict[int, int] = {}
    names: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            names[int(entry.name)] = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False
    return sorted(pid for pid, cmdline in names.items()
                  if cmdline.startswith(b"ray::BlockWorker") and descends(pid))


def test_the_workers_of_another_ray_on_the_machine_are_not_ours() -> None:
    # A process named as a Ray actor but not of this session (reparented, as another user's
    # Ray's would be): never listed, so never killed nor waited for.
    script = "(exec -a ray::BlockWorker sleep 60 >/dev/null 2>&1 &\n echo $!)"
    decoy = int(subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                               check=True).stdout)
    try:
        time.sleep(0.2)
        assert Path(f"/proc/{decoy}/cmdline").read_bytes().startswith(b"ray::BlockWorker")
        assert decoy not in _block_workers(os.getpid())
        assert _block_workers(decoy) == []
    finally:
        os.kill(decoy, signal.SIGKILL)


def _alive(pids: list[int]) -> list[int]:
    """The processes of `pids` still running (a zombie is not)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_a_killed_actor_costs_a_retry_of_its_block_and_loses_nothing(
    ray_cluster: None, start_gateway: Any, tmp_path: Path
) -> None:
    gw = start_gateway(latency_ms=40)
    rows = 600
    source = _input(tmp_path / "in.jsonl", rows)
    config = _config(
        tmp_path, source, "kill", engine="ray", ray_actors=2, base_url=gw.base_url, concurrency=4
    )
    outcome: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(report=engine.run(config, handle_signals=False))
    )
    thread.start()
    limit = time.monotonic() + 60
    while gw.stats.requests < 60 and time.monotonic() < limit:
        time.sleep(0.05)
    workers = _block_workers(os.getpid())
    assert gw.stats.requests >= 60 and workers, "the run never got going"
    os.kill(workers[0], signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    report = outcome["report"]
    assert report.exit_code == 0 and report.ok == rows
    table = pq.read_table(tmp_path / "kill.parquet")
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(rows)]
    assert set(table.column("status").to_pylist()) == {"ok"}
    # The killed actor's unfinished block is sent again; an actor killed between two blocks
    # had nothing unfinished (seen once on a loaded machine: exactly 600 requests), so the
    # bound is 'at least every row', and exactly-once is asserted on the output above.
    assert gw.stats.requests >= rows


def test_ctrl_c_then_a_killed_driver_then_the_same_command_finishes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "BR_KEY_A": KEY_A}
    # 60 ms a request, 8 in flight: ~130 rows/s, so the kill below lands seconds before the
    # end even when each `status` poll (a process of its own) takes a second on a busy machine.
    gateway = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "gateway", "--port", "0", "--latency-ms", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        base_url = _served_url(gateway)
        source = _input(tmp_path / "in.jsonl", 1000)
        output = tmp_path / "driver.parquet"
        command = [
            sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o", str(output),
            "-m", "gpt-4o-mini", "--base-url", base_url, "--api-key-env", "BR_KEY_A",
            "--engine", "ray", "--ray-actors", "2", "-c", "4", "--checkpoint-every", "10",
        ]

        def start_and_wait_for(rows: int) -> subprocess.Popen[str]:
            driver = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
            limit = time.monotonic() + 90
            while _status(output, env).get("done", 0) < rows and time.monotonic() < limit:
                time.sleep(0.2)
            return driver

        # Ctrl-C: Ray's own handlers do not replace the run's; the actors stop, 130.
        driver = start_and_wait_for(100)
        driver.send_signal(signal.SIGINT)
        _out, err = driver.communicate(timeout=60)
        assert driver.returncode == 130, err
        assert "run the same command again to resume" in err
        # SIGKILL of the driver mid-run.
        driver = start_and_wait_for(_status(output, env)["done"] + 200)
        workers = _block_workers(driver.pid)  # this driver's actors, no other Ray's
        assert workers, "the driver's actors were not found"
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=30)
        # The dead driver's actors go with it; their last requests must not count as the
        # next run's.
        limit = time.monotonic() + 60
        while (_alive(workers) or _stats(base_url)["in_flight"]) and time.monotonic() < limit:
            time.sleep(0.2)
        assert not _alive(workers), "the killed driver's actors outlived it"
        done_before = _status(output, env)["done"]
        assert 300 <= done_before < 1000, "the driver was not killed mid-run"
        sent_before = _stats(base_url)["requests"]
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr
        sent_again = _stats(base_url)["requests"] - sent_before
        # Only the rows with no checkpointed result are sent: nothing finished is repeated.
        assert sent_again == 1000 - done_before
        table = pq.read_table(output)
        assert table.column("id").to_pylist() == [f"r{i}" for i in range(1000)]
    finally:
        gateway.terminate()
        gateway.wait(10)
        assert gateway.stdout is not None
        gateway.stdout.close()


def _served_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    for line in process.stdout:
        if "http://" in line:
            url = line[line.index("http://"):].split()[0]
            return url if url.endswith("/v1") else url.rstrip("/") + "/v1"
    raise AssertionError("the gateway did not say where it listens")


def _status(output: Path, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "status", str(output), "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    return json.loads(done.stdout) if done.returncode == 0 else {}


def _stats(base_url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/_simulator/stats") as r:
        return json.load(r)


def test_without_ray_the_engine_says_how_to_install_it(tmp_path: Path) -> None:
    source = _input(tmp_path / "in.jsonl", 3)
    script = (
        "import sys; sys.modules['ray'] = None\n"  # what `import ray` meets without the extra
        "from batchrunner.cli.commands import main\n"
        f"main(['run', '-i', {str(source)!r}, '-o', {str(tmp_path / 'o.parquet')!r},"
        " '-m', 'gpt-4o-mini', '--local', '--engine', 'ray'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 2
    assert "pip install 'batchrunner[ray]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_input_and_output_in_a_bucket_on_ray(
    ray_cluster: None, gateway: Any, bucket: Any, tmp_path: Path
) -> None:
    s3, name = bucket
    with s3.open_output_stream(f"{name}/in.jsonl") as sink:
        sink.write(_input(tmp_path / "in.jsonl", 120).read_bytes())
    config = RunConfig(
        input=f"s3://{name}/in.jsonl",  # type: ignore[arg-type]
        output=f"s3://{name}/out.parquet",  # type: ignore[arg-type]
        model="gpt-4o-mini", base_url=gateway.base_url, api_key_env="BR_KEY_A",
        engine="ray", ray_actors=2, concurrency=4,
    )
    report = engine.run(config, handle_signals=False)
    assert report.exit_code == 0 and report.ok == 120
    with s3.open_input_file(f"{name}/out.parquet") as f:
        table = pq.read_table(f)
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(120)]


def test_a_scored_sweep_on_ray_equals_the_local_engines(
    ray_cluster: None, gateway: Any, tmp_path: Path
) -> None:
    source = tmp_path / "arith.jsonl"
    source.write_text("".join(
        json.dumps({"id": f"a{i}", "prompt": f"Calculate {i},000 + {i}.",
                    "reference": f"{i * 1000 + i:,}"}) + "\n" for i in range(1, 41)))
    common = dict(base_url=gateway.base_url, concurrency=4, models=("gpt-4o", "gpt-4o-mini"),
                  score="numeric", reference_column="reference")
    local = engine.run(_config(tmp_path, source, "local", **common), handle_signals=False)
    on_ray = engine.run(
        _config(tmp_path, source, "ray", engine="ray", ray_actors=2, **common),
        handle_signals=False,
    )
    assert local.exit_code == on_ray.exit_code == 0 and on_ray.rows == 80
    a, b = _stable(tmp_path / "ray.parquet"), _stable(tmp_path / "local.parquet")
    assert a.to_pylist() == b.to_pylist()
    assert [(r["id"], r["model"]) for r in a.to_pylist()[:4]] == [
        ("a1", "gpt-4o"), ("a1", "gpt-4o-mini"), ("a2", "gpt-4o"), ("a2", "gpt-4o-mini")]
    assert 0 < sum(a.column("score").to_pylist()) < 80
