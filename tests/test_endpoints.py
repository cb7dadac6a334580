"""Several endpoints (docs/run.md, "Several endpoints"): rows shared out among gateways, one
that stops answering taken out, its rows sent by the others.

Real simulators on loopback: in-process ones (`start_gateway`), and `batchrunner gateway`
subprocesses where one must be SIGKILLed; the run as a user runs it (the CLI in a subprocess)
where its exit code and its warnings are the point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from scripted_server import Reply, Request, scripted_server

from batchrunner import RunConfig, run
from batchrunner.config.endpoints import Endpoint
from batchrunner.simulator import complete

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
    no_key_in(tmp_path)
