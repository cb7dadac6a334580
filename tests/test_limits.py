"""What stops a run early, on a FakeClock: the budget (--max-cost) and the deadline (--deadline)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from fakeclock import FakeClock

from batchrunner.errors import UsageError
from batchrunner.transport.limits import Budget, Deadline, parse_deadline


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())


# --------------------------------------------------------------------------------------- budget


def test_budget_never_exceeded_under_concurrent_reservations() -> None:
    clock = FakeClock()
    budget = Budget(1.00)
    rng = random.Random(11)
    started = 0
    highest = 0.0

    async def worker() -> None:
        nonlocal started, highest
        while True:
            worst = rng.choice([0.01, 0.03, 0.07])
            if not await budget.acquire(worst):
                return
            started += 1
            highest = max(highest, budget.spent + budget.reserved)
            await clock.sleep(rng.uniform(0.1, 2))
            budget.settle(worst, rng.choice([worst * 0.2, worst, 0.0, None]))

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(16)))

    run(main)
    assert budget.exhausted
    assert highest <= 1.00 + 1e-9
    assert budget.spent <= 1.00 + 1e-9
    assert budget.spent > 0.9  # waiting for settlements uses the budget, not stop at first miss
    assert started > 30 and budget.reserved == 0.0


def test_budget_reserve_is_the_non_blocking_check() -> None:
    budget = Budget(0.10)
    assert budget.reserve(0.06)
    assert not budget.reserve(0.06)  # 0.12 with the one in flight
    assert not budget.exhausted  # it may fit once the first settles
    budget.settle(0.06, 0.02)
    assert budget.reserve(0.06)
    budget.settle(0.06, None)  # unknown cost: the worst case is charged
    assert budget.spent == pytest.approx(0.08)
    assert not budget.reserve(0.05)
    assert budget.exhausted and not budget.reserve(0.001)


# ------------------------------------------------------------------------------------- deadline

NOW = datetime(2024, 5, 1, 5, 0, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45m", NOW + timedelta(minutes=45)),
        ("90s", NOW + timedelta(seconds=90)),
        ("2h", NOW + timedelta(hours=2)),
        ("1h30m", NOW + timedelta(minutes=90)),
        ("2H30M", NOW + timedelta(minutes=150)),
        ("1.5h", NOW + timedelta(minutes=90)),
        ("06:00", datetime(2024, 5, 1, 6, 0)),
        ("6:00:30", datetime(2024, 5, 1, 6, 0, 30)),
        ("04:59", datetime(2024, 5, 2, 4, 59)),
        ("05:00", datetime(2024, 5, 2, 5, 0)),  # now is not "next"
        ("0:00", datetime(2024, 5, 2, 0, 0)),
    ],
)
def test_parse_deadline(text: str, expected: datetime) -> None:
    assert parse_deadline(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "soon", "45", "0s", "-5m", "25:00", "6:60", "6:00:61", "m"])
def test_parse_deadline_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--deadline") as caught:
        parse_deadline(text, NOW)
    assert repr(text) in str(caught.value)


def test_deadline_on_the_monotonic_clock() -> None:
    clock = FakeClock(1000.0)
    deadline = Deadline.from_text("90s", clock, now=NOW)
    assert deadline.remaining() == 90 and not deadline.passed
    clock.advance(90)
    assert deadline.passed and deadline.remaining() == 0.0
    assert Deadline.from_text("06:00", clock, now=NOW).remaining() == 3600


def test_a_deadline_says_when_it_falls_a_past_time_of_day_being_tomorrow() -> None:
    clock = FakeClock()
    now = datetime(2026, 12, 7, 23, 56)
    passed = Deadline.from_text("23:51", clock, now=now)
    assert passed.tomorrow and passed.text == "until 23:51 tomorrow, in 23 h 55 min"
    assert passed.remaining() == 23 * 3600 + 55 * 60
    morning = Deadline.from_text("06:00", clock, now=now)
    assert morning.text == "until 06:00 tomorrow, in 6 h 4 min" and morning.tomorrow
    later = Deadline.from_text("23:59:30", clock, now=now)
    assert later.text == "until 23:59:30, in 3 min" and not later.tomorrow
    soon = Deadline.from_text("45m", clock, now=now)  # a duration crossing midnight
    assert soon.text == "until 00:41 tomorrow, in 45 min" and not soon.tomorrow
    assert Deadline.from_text("30s", clock, now=now).text.endswith("in 30 s")
