"""Flow control on a FakeClock: windows, smoothness, shared pause, AIMD, headers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fakeclock import FakeClock

from batchrunner.transport.headers import HeaderPacer, parse_reset
from batchrunner.transport.pacing import AdaptiveConcurrency, Pacer, SharedPause
from batchrunner.transport.rates import WINDOW, RateLimiter


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())


def max_in_window(starts: list[tuple[float, float]], width: float) -> float:
    """The largest total amount started in any half-open window [s, s + width)."""
    starts = sorted(starts)
    times = [t for t, _ in starts]
    prefix = [0.0]
    for _, amount in starts:
        prefix.append(prefix[-1] + amount)
    worst = 0.0
    for i, (t, _) in enumerate(starts):
        # every start t' with t' - t < width, computed the way the limiter expires entries
        j = i
        while j < len(times) and times[j] - t < width:
            j += 1
        worst = max(worst, prefix[j] - prefix[i])
    return worst


# ---------------------------------------------------------------------------------- fake clock


def test_fake_clock_wakes_sleepers_in_time_order_on_one_timeline() -> None:
    clock = FakeClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, *naps: float) -> None:
        for nap in naps:
            await clock.sleep(nap)
        woke.append((name, clock.monotonic()))

    async def main() -> None:
        await asyncio.gather(
            sleeper("c", 3), sleeper("a", 1), sleeper("b", 0.5, 1.5), sleeper("d", 2, 2)
        )

    run(main)
    assert woke == [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)]


def test_fake_clock_ignores_cancelled_sleepers() -> None:
    clock = FakeClock()

    async def main() -> None:
        long = asyncio.ensure_future(clock.sleep(1000))
        await clock.sleep(1)
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)
        await clock.sleep(1)

    run(main)
    assert clock.monotonic() == 2.0


# --------------------------------------------------------------------------------- rate limiter


def test_rpm_never_exceeded_in_any_60s_window_with_many_tasks() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=40, rpm=120, clock=clock)
    rng = random.Random(7)
    starts: list[tuple[float, float]] = []

    async def worker() -> None:
        for _ in range(12):
            async with pacer.slot() as slot:
                starts.append((clock.monotonic(), 1))
                await clock.sleep(rng.uniform(0.1, 3))
                slot.succeeded()
            # idle gaps let the bucket refill, the worst case for a window
            await clock.sleep(rng.choice([0, 0, 0, 45, 90]))

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(40)))

    run(main)
    assert len(starts) == 480
    assert max_in_window(starts, WINDOW) <= 120
    assert max_in_window(starts, WINDOW) >= 100  # and the limit is actually used


def test_bucket_alone_would_overrun_the_window_so_the_log_holds_it() -> None:
    """Burst, then steady rate: a 60 s window sees burst + rate unless the log stops it."""
    clock = FakeClock()
    limiter = RateLimiter(60, burst=10, clock=clock)
    starts: list[tuple[float, float]] = []

    async def main() -> None:
        for _ in range(200):
            await limiter.acquire()
            starts.append((clock.monotonic(), 1))

    run(main)
    assert max_in_window(starts, WINDOW) == 60
    assert [t for t, _ in starts[:10]] == [0.0] * 10  # the burst was allowed


def test_starts_are_smooth_no_burst_beyond_the_bucket() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=50, rpm=600, clock=clock)  # 10 a second, burst 10
    starts: list[tuple[float, float]] = []

    async def worker() -> None:
        for _ in range(10):
            async with pacer.slot() as slot:
                starts.append((clock.monotonic(), 1))
                await clock.sleep(0.05)
                slot.succeeded()

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(50)))

    run(main)
    burst, per_second = 10, 10
    assert max_in_window(starts, 1.0) <= burst + per_second
    times = sorted(t for t, _ in starts)
    gaps = [b - a for a, b in zip(times[burst:], times[burst + 1 :])]
    assert min(gaps) >= 0.1 - 1e-9  # after the burst: one start every 0.1 s, never two at once


def test_tpm_with_varying_amounts_never_exceeds_the_window() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=20, tpm=6000, clock=clock)  # burst 100 tokens
    rng = random.Random(3)
    starts: list[tuple[float, float]] = []

    async def worker() -> None:
        for _ in range(15):
            amount = rng.choice([20, 80, 300, 900, 2500])
            async with pacer.slot(amount) as slot:
                starts.append((clock.monotonic(), amount))
                await clock.sleep(1)
                slot.succeeded(amount)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(20)))

    run(main)
    assert len(starts) == 300
    assert max_in_window(starts, WINDOW) <= 6000
    total = sum(a for _, a in starts)
    elapsed = max(t for t, _ in starts)
    # Big amounts are neither starved nor halved. A strict window cannot reach the full rate with
    # big pieces (two 2500s fill it: 5000/min at most), so the mix runs at about 0.78.
    assert total / (elapsed / 60) > 0.7 * 6000


def test_tpm_correction_credits_back_unused_tokens() -> None:
    def simulate(used_fraction: float) -> tuple[int, float]:
        clock = FakeClock()
        pacer = Pacer(concurrency=10, tpm=10_000, clock=clock)
        starts: list[tuple[float, float]] = []

        async def worker() -> None:
            while clock.monotonic() < 300:
                async with pacer.slot(1000) as slot:
                    starts.append((clock.monotonic(), 1000 * used_fraction))
                    await clock.sleep(0.5)
                    slot.succeeded(int(1000 * used_fraction))

        async def main() -> None:
            await asyncio.gather(*(worker() for _ in range(10)))

        run(main)
        return len(starts), max_in_window(starts, WINDOW)

    full, full_window = simulate(1.0)
    quarter, quarter_window = simulate(0.25)
    assert full_window <= 10_000 and quarter_window <= 10_000  # real usage stays in the limit
    assert quarter > 3 * full  # what was not used was given back


def test_correction_charges_extra_usage() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6000, clock=clock)

    async def main() -> None:
        grant = await limiter.acquire(100)
        limiter.correct(100, 5000, grant)
        assert limiter.in_window == 5000
        assert limiter.delay(1000) > 0  # 5000 + 1000 would pass the limit
        limiter.correct(100, 700)  # no grant: logged now
        assert limiter.in_window == 5600

    run(main)


def test_amount_larger_than_the_limit_still_starts_in_an_empty_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock)
    times: list[float] = []

    async def main() -> None:
        for amount in (10, 5000, 10):
            await limiter.acquire(amount)
            times.append(clock.monotonic())

    run(main)
    assert times[0] == 0.0
    assert times[1] >= 60.0  # waited for the first start to leave the window
    assert times[2] >= times[1] + 60.0


# ------------------------------------------------------------------------------- shared pause


def test_a_429_pauses_every_worker_for_retry_after() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=8, clock=clock)
    starts: list[float] = []

    async def worker(number: int) -> None:
        for attempt in range(4):
            async with pacer.slot() as slot:
                starts.append(clock.monotonic())
                await clock.sleep(1)
                if number == 0 and attempt == 1:
                    slot.rate_limited(retry_after=5)  # at t=2
                else:
                    slot.succeeded()

    async def main() -> None:
        await asyncio.gather(*(worker(n) for n in range(8)))

    run(main)
    assert not [t for t in starts if 2 < t < 7]
    assert min(t for t in starts if t > 2) == 7.0


def test_a_pause_that_starts_while_waiting_in_the_queue_still_holds() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=1, rpm=60, clock=clock)  # one a second
    starts: dict[str, float] = {}

    async def attempt(name: str, outcome: float | None) -> None:
        async with pacer.slot() as slot:
            starts[name] = clock.monotonic()
            await clock.sleep(0.5)
            if outcome is None:
                slot.succeeded()
            else:
                slot.rate_limited(retry_after=outcome)

    async def main() -> None:
        # b queues for the place in flight, c for the rpm pace, while a gets its 429
        await asyncio.gather(attempt("a", 5.0), attempt("b", None), attempt("c", None))

    run(main)
    assert starts["a"] == 0.0
    assert starts["b"] == 5.5 and starts["c"] >= 6.0


def test_a_storm_of_429s_is_one_pause_and_one_decrease() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=16, clock=clock, rng=random.Random(1))

    async def attempt(answer_at: float) -> float:
        async with pacer.slot() as slot:
            started = clock.monotonic()
            await clock.sleep(answer_at)
            slot.rate_limited(retry_after=None)
            return started

    async def main() -> None:
        await asyncio.gather(*(attempt(1 + i / 100) for i in range(16)))
        first_pause_end = pacer._pause.until
        assert pacer.concurrency_limit == 8
        assert first_pause_end <= 1.15 + 1.0  # backoff of the first strike: at most 1 s
        await pacer._pause.wait()
        # a fresh request after the pause is a new storm: a longer backoff, another halving
        await attempt(0.5)
        assert pacer.concurrency_limit == 4
        assert 1.0 <= pacer.pause_remaining() <= 2.0

    run(main)


def test_shared_pause_only_extends() -> None:
    clock = FakeClock()
    pause = SharedPause(clock)
    pause.pause_for(10)
    pause.pause_for(3)
    assert pause.remaining() == 10
    clock.advance(4)
    pause.pause_for(8)
    assert pause.remaining() == 8

    async def main() -> None:
        await pause.wait()

    run(main)
    assert clock.monotonic() == 12.0


# ------------------------------------------------------------------------------------------ AIMD


def test_aimd_halves_on_429_and_grows_back_linearly() -> None:
    clock = FakeClock()
    concurrency = AdaptiveConcurrency(16, minimum=2, clock=clock)
    assert concurrency.limit == 16
    clock.advance(1)
    assert concurrency.on_rate_limited(sent_at=0.5)
    assert concurrency.limit == 8
    assert not concurrency.on_rate_limited(sent_at=0.9)  # same window: counted once
    assert concurrency.limit == 8

    curve = []
    for _ in range(8 + 9 + 10):
        concurrency.on_success()
        curve.append(concurrency.limit)
    assert curve[6] == 8 and curve[7] == 9  # +1 after `limit` successes
    assert curve[7 + 9] == 10 and curve[-1] == 11

    for _ in range(500):
        concurrency.on_success()
    assert concurrency.limit == 16  # never above the maximum

    for step in range(10):
        clock.advance(1)
        concurrency.on_rate_limited(sent_at=clock.monotonic())
    assert concurrency.limit == 2  # never below the minimum


def test_in_flight_follows_the_lowered_limit_and_recovers_one_per_round() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=8, clock=clock)
    seen: list[tuple[float, int, int]] = []  # (time, in flight, limit) at each start

    async def worker(number: int) -> None:
        for attempt in range(10):
            async with pacer.slot() as slot:
                seen.append((clock.monotonic(), pacer.in_flight, pacer.concurrency_limit))
                await clock.sleep(1)
                if number == 0 and attempt == 0:
                    slot.rate_limited(retry_after=2)  # at t=1: halve to 4, pause to t=3
                else:
                    slot.succeeded()

    async def main() -> None:
        await asyncio.gather(*(worker(n) for n in range(8)))

    run(main)
    assert all(in_flight <= limit for _, in_flight, limit in seen)
    assert not [t for t, _, _ in seen if 1 <= t < 3]
    # each second is one round trip: the limit climbs back by one per round, not at once
    peak = {t: max(n for u, n, _ in seen if u == t) for t in (3.0, 4.0, 5.0, 6.0)}
    assert peak == {3.0: 5, 4.0: 6, 5.0: 7, 6.0: 8}


def test_non_adaptive_pacer_keeps_its_limit() -> None:
    async def main() -> None:
        pacer = Pacer(concurrency=8, clock=FakeClock(), adaptive=False)
        async with pacer.slot() as slot:
            slot.rate_limited(retry_after=0)
        assert pacer.concurrency_limit == 8

    run(main)


def test_cancelled_slot_gives_its_place_back() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=1, rpm=60, clock=clock)

    async def hold() -> None:
        async with pacer.slot():
            await clock.sleep(10)

    async def main() -> None:
        first = asyncio.ensure_future(hold())
        second = asyncio.ensure_future(hold())
        await clock.sleep(1)
        second.cancel()  # waiting for the place in flight
        await asyncio.gather(first, second, return_exceptions=True)
        assert pacer.in_flight == 0
        async with pacer.slot():
            assert pacer.in_flight == 1

    run(main)


# -------------------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("250ms", 0.25), ("1.5", 1.5), ("1h2m3.5s", 3723.5),
     ("20ms", 0.02), (" 7 ", 7.0)],
)
def test_parse_reset(text: str, seconds: float) -> None:
    assert parse_reset(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1", "nan", "5x", "1s2", "1e9"])
def test_parse_reset_rejects(text: str) -> None:
    assert parse_reset(text) is None


def test_low_remaining_requests_spread_over_the_reset() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=4, clock=clock)
    starts: list[float] = []
    low = {"x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "10s"}
    plenty = {"x-ratelimit-remaining-requests": "500", "x-ratelimit-reset-requests": "1s"}

    async def worker() -> None:
        for _ in range(3):
            async with pacer.slot() as slot:
                starts.append(clock.monotonic())
                await clock.sleep(0.1)
                slot.succeeded(headers=low if clock.monotonic() < 1 else plenty)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(4)))

    run(main)
    assert starts[:4] == [0.0] * 4
    paced = sorted(starts[4:])
    assert paced[0] >= 0.1  # one may go at once: the pacing is spacing, not a pause
    assert paced[1] >= paced[0] + 5.0  # 2 left in 10 s: one every 5 s
    assert paced[-1] - paced[-2] < 1.0  # plenty left again: no more spacing


def test_nothing_remaining_holds_until_the_reset() -> None:
    clock = FakeClock()
    pacer = Pacer(concurrency=4, clock=clock)
    starts: list[float] = []

    async def main() -> None:
        async with pacer.slot() as slot:
            slot.succeeded(
                headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"}
            )

        async def one() -> None:
            async with pacer.slot() as slot:
                starts.append(clock.monotonic())
                slot.succeeded()

        await asyncio.gather(*(one() for _ in range(3)))

    run(main)
    assert min(starts) == 3.0


def test_low_remaining_tokens_pace_by_request_size() -> None:
    clock = FakeClock()
    headers = HeaderPacer(clock)
    slows = headers.observe(
        {"x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "20s"},
        low_water=8,
        tokens_per_request=500,
    )
    assert slows and headers.interval == pytest.approx(10.0)  # 2 requests' worth in 20 s
    slows = headers.observe(
        {"x-ratelimit-remaining-tokens": "90000", "x-ratelimit-reset-tokens": "20s"},
        low_water=8,
        tokens_per_request=500,
    )
    assert not slows and headers.interval == 0.0
    low = {"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "4s"}
    assert headers.observe(low, low_water=8) and headers.interval == 4.0
    assert headers.observe({"content-type": "application/json"}, low_water=8)  # still paced
    assert headers.interval == 4.0


def test_after_a_hold_starts_are_probes_until_fresh_headers_arrive() -> None:
    """A sliding window frees up gradually: the reset must not release every worker at once."""
    from batchrunner.transport.headers import HeaderPacer

    clock = FakeClock()
    pacer = HeaderPacer(clock)
    pacer.observe({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"},
                  low_water=32)
    now = clock.monotonic()
    assert pacer.delay(now) == pytest.approx(2.0)
    later = now + 2.0
    assert pacer.delay(later) <= 0
    pacer.take(later)  # the probe
    assert pacer.delay(later) == pytest.approx(HeaderPacer.PROBE_GAP)  # the others wait
    # the probe's answer says plenty is left: pacing stops
    pacer.observe({"x-ratelimit-remaining-requests": "500", "x-ratelimit-reset-requests": "1s"},
                  low_water=32)
    pacer.take(later)
    assert pacer.delay(later) == pytest.approx(HeaderPacer.PROBE_GAP)  # the probe gap stands
    pacer.take(later + 1)
    assert pacer.delay(later + 1) <= 0
