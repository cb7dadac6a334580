"""Flow control end to end: the budget, the deadline, rpm pacing, against the simulator."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fakeclock import FakeClock

from batchrunner import RunConfig, build_config, load_job, read_status, run
from batchrunner.config.pricing import PriceTable
from batchrunner.engine import dispatch
from batchrunner.transport.limits import Deadline
from batchrunner.transport.pacing import Pacer, Slot
from batchrunner.transport.rates import WINDOW

REPO = Path(__file__).resolve().parents[1]

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
                       deadline="4s")
    report = run(config, handle_signals=False)
    assert report.exit_code == 5 and report.reason == "deadline"
    # A tight bound that busy cores cannot break: each request takes the gateway at least
    # 200 ms, so 2 in flight start at most 2 x (4 s / 200 ms + 1) = 42 before the deadline,
    # and none after it (a slow machine only starts fewer). The whole input is 200.
    assert 0 < gw.stats.requests <= 2 * (4 / 0.2 + 1)
    assert 0 < report.ok < 200
    fast = start_gateway()
    finished = run(config.replace(deadline=None, base_url=fast.base_url, concurrency=16),
                   handle_signals=False)
    assert finished.exit_code == 0 and finished.resumed == report.ok
    assert fast.stats.requests == 200 - report.ok
    assert pq.read_table(config.output).num_rows == 200


def paced_on_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """Have the engine pace on a FakeClock; return its starts as [time, estimate, actual].

    Every attempt's slot is recorded when the pacer grants it (the request starts), with the
    tokens it was estimated at and the total tokens its answer reported. Virtual time moves
    whenever the run waits (on the pacer, or on the simulator's answers), so minutes of pacing
    take a second or so of real time, and the windows are checked on the clock the pacer used.
    """
    clock = FakeClock()
    starts: list[list[float]] = []

    class RecordingSlot(Slot):
        async def __aenter__(self) -> RecordingSlot:
            await super().__aenter__()
            self.record = [clock.monotonic(), float(self.estimated_tokens), math.nan]
            starts.append(self.record)
            return self

        def succeeded(self, actual_tokens: int | None = None, headers: Any = None) -> None:
            self.record[2] = math.nan if actual_tokens is None else float(actual_tokens)
            super().succeeded(actual_tokens, headers)

    class RecordingPacer(Pacer):
        def __init__(self, concurrency: int, rpm: float | None = None,
                     tpm: float | None = None, **options: Any) -> None:
            super().__init__(concurrency, rpm, tpm, clock=clock, **options)

        def slot(self, estimated_tokens: int = 0) -> Slot:
            return RecordingSlot(self, estimated_tokens)

    monkeypatch.setattr(dispatch, "Pacer", RecordingPacer)
    return starts


def most_in_a_window(starts: list[tuple[float, float]]) -> float:
    """The largest amount started in any 60 s window [t, t + 60) of the start times."""
    starts = sorted(starts)
    return max(sum(a for u, a in starts if t <= u < t + WINDOW) for t, _ in starts)


def test_rpm_is_never_exceeded_in_any_window(
        tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    starts = paced_on_a_fake_clock(monkeypatch)
    config = RunConfig(input=source(tmp_path, 300), output=tmp_path / "out.parquet",
                       base_url=gateway.base_url, model="gpt-4o-mini", concurrency=16, rpm=120)
    report = run(config, handle_signals=False)
    assert report.exit_code == 0 and gateway.stats.requests == 300 == len(starts)
    times = [(t, 1.0) for t, _, _ in starts]
    assert most_in_a_window(times) <= 120
    assert most_in_a_window(times) >= 110  # and the limit is used, not undershot
    # smooth, not in bursts: a span of w seconds holds at most a second's worth (the bucket,
    # 2) plus 2 a second, where a window limit alone would let all 120 go at once
    for span in (1, 10):
        assert max(sum(1 for u, _ in times if t <= u < t + span) for t, _ in times) <= 2 + 2 * span
    # 300 requests at 120 a minute: two and a half minutes of virtual time at least
    assert starts[-1][0] - starts[0][0] >= (300 - 120) / 120 * WINDOW - 1


def test_tpm_end_to_end_never_exceeds_the_window(
        tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    starts = paced_on_a_fake_clock(monkeypatch)
    tpm = 2000
    config = RunConfig(input=source(tmp_path, 120), output=tmp_path / "out.parquet",
                       base_url=gateway.base_url, model="gpt-4o-mini", concurrency=16,
                       tpm=tpm, params={"max_tokens": 40})
    report = run(config, handle_signals=False)
    assert report.exit_code == 0 and len(starts) == 120
    table = pq.read_table(config.output)
    assert sorted(a for _, _, a in starts) == sorted(table.column("total_tokens").to_pylist())
    # The pacer counts each start at its estimate (prompt rule + max_tokens) and corrects it
    # to the usage that comes back. Every answer here used no more than its estimate, so the
    # real tokens started in any 60 s window are bounded by what the pacer admitted.
    assert all(actual <= estimate for _, estimate, actual in starts)
    real = [(t, actual) for t, _, actual in starts]
    assert most_in_a_window(real) <= tpm
    assert most_in_a_window([(t, e) for t, e, _ in starts]) >= tpm * 0.8  # the limit is used
    total = sum(a for _, a in real)
    assert total > 2 * tpm  # so the run spans several windows
    assert starts[-1][0] - starts[0][0] >= (total - tpm) / tpm * WINDOW - 1


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


# --- the shipped deadline = "06:00", a local time ---------------------------------------------


@pytest.mark.parametrize("now, hours_left", [
    (datetime(2026, 12, 1, 1, 15), 4.75),  # cron at 01:15: until 06:00 the same morning
    (datetime(2026, 12, 1, 5, 59, 30), 0.5 / 60),
    (datetime(2026, 12, 1, 6, 0), 24.0),  # at 06:00 sharp: the next one
    (datetime(2026, 12, 1, 22, 0), 8.0),  # started late in the evening: tomorrow's 06:00
])
def test_the_shipped_nightly_deadline_is_the_next_six_oclock(
        now: datetime, hours_left: float) -> None:
    config = build_config(load_job(REPO / "jobs" / "nightly-eval.toml"), {})
    assert config.deadline == "06:00"
    deadline = Deadline.from_text(config.deadline, FakeClock(), now=now)
    assert deadline.remaining() == pytest.approx(hours_left * 3600)


def test_a_local_time_deadline_stops_a_run(tmp_path: Path, start_gateway: Any) -> None:
    gw = start_gateway(latency_ms=200)
    at = (datetime.now() + timedelta(seconds=5)).strftime("%H:%M:%S")  # 4-5 s from now
    config = RunConfig(input=source(tmp_path, 200), output=tmp_path / "out.parquet",
                       base_url=gw.base_url, model="gpt-4o-mini", concurrency=2, deadline=at)
    report = run(config, handle_signals=False)
    assert report.exit_code == 5 and report.reason == "deadline"
    # At least 200 ms a request, 2 in flight: at most 2 x (5 s / 200 ms + 1) started before
    # the deadline, whatever the load (the whole input is 200 rows, 20 s).
    assert 0 < gw.stats.requests <= 2 * (5 / 0.2 + 1)
    assert 0 < report.ok < 200
