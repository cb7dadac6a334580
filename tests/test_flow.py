"""Flow control end to end: the budget, the deadline, rpm pacing, against the simulator."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrunner import RunConfig, read_status, run
from batchrunner.pricing import PriceTable

KEY = "sk-ru-flow-tests-3c5e7a9b1d2f4a6c8e0b"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)


def source(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Describe the number {i}."})
                            + "\n" for i in range(rows)))
    return path


def test_max_cost_never_overspends_and_resumes(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    budget = 0.004
    config = RunConfig(input=source(tmp_path, 60), output=tmp_path / "out.parquet",
                       base_url=gateway.base_url, model="gpt-4o", concurrency=4,
                       params={"max_tokens": 60}, max_cost=budget)
    report = run(config, handle_signals=False)
    assert report.exit_code == 5 and report.reason == "budget"
    state = read_status(config.output)
    assert 0 < state.done < 60
    assert state.cost_usd <= budget
    assert report.cost_usd == pytest.approx(state.cost_usd)
    assert gateway.stats.requests == state.done  # nothing sent beyond what was paid for
    assert not config.output.exists()  # no partial output
    # a larger budget goes on from there
    more = run(config.replace(max_cost=1.0), handle_signals=False)
    assert more.exit_code == 0
    assert gateway.stats.requests == 60
    table = pq.read_table(config.output)
    assert table.num_rows == 60
    prices = PriceTable.load()
    recomputed = sum(prices.cost("gpt-4o", r["prompt_tokens"], r["completion_tokens"],
                                 r["cached_tokens"]) for r in table.to_pylist())
    assert more.cost_usd == pytest.approx(recomputed)


def test_deadline_stops_within_seconds_and_resumes(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(latency_ms=200)
    config = RunConfig(input=source(tmp_path, 200), output=tmp_path / "out.parquet",
                       base_url=gw.base_url, model="gpt-4o-mini", concurrency=2,
                       deadline="2s")
    started = time.monotonic()
    report = run(config, handle_signals=False)
    elapsed = time.monotonic() - started
    assert report.exit_code == 5 and report.reason == "deadline"
    assert elapsed < 2 + 3, f"took {elapsed:.1f} s to stop"
    assert 0 < report.ok < 200
    fast = start_gateway()
    finished = run(config.replace(deadline=None, base_url=fast.base_url, concurrency=16),
                   handle_signals=False)
    assert finished.exit_code == 0 and finished.resumed == report.ok
    assert fast.stats.requests == 200 - report.ok
    assert pq.read_table(config.output).num_rows == 200


def test_rpm_is_never_exceeded_in_a_window(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    # 120 rpm is 2 a second with a burst of about 2: 8 rows cannot finish in under ~3 s
    config = RunConfig(input=source(tmp_path, 8), output=tmp_path / "out.parquet",
                       base_url=gateway.base_url, model="gpt-4o-mini", concurrency=8, rpm=120)
    started = time.monotonic()
    report = run(config, handle_signals=False)
    assert report.exit_code == 0
    assert time.monotonic() - started >= 2.5


def test_a_limited_smoke_test_then_the_full_run_sends_each_row_once(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    config = RunConfig(input=source(tmp_path, 20), output=tmp_path / "out.parquet",
                       base_url=gateway.base_url, model="gpt-4o-mini", limit=5)
    smoke = run(config, handle_signals=False)
    assert smoke.exit_code == 0 and smoke.rows == 5 and smoke.ok == 5
    assert pq.read_table(config.output).column("id").to_pylist() == [f"r{i}" for i in range(5)]
    full = run(config.replace(limit=None), handle_signals=False)
    assert full.exit_code == 0 and full.rows == 20 and full.ok == 20 and full.resumed == 5
    assert gateway.stats.requests == 20
    assert pq.read_table(config.output).num_rows == 20
