"""The --rpm and --tpm limits: a log of the starts of the last 60 seconds, per limit.

`RateLimiter` admits a start (or a number of tokens) only while the sliding `WINDOW` holds room
for it, and corrects a token estimate once the answer's usage is known. On an injected `Clock`.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from batchrunner.clock import SYSTEM_CLOCK, Clock

__all__ = ["MIN_SLEEP", "WINDOW", "Grant", "RateLimiter"]

WINDOW = 60.0
"""Seconds over which --rpm and --tpm are counted: no window this long holds more."""

# A wait shorter than this still sleeps this long: float rounding must never make a wait loop spin.
MIN_SLEEP = 1e-6


class Grant:
    """One admitted start in a RateLimiter's 60-second log: when, and how many units."""

    __slots__ = ("amount", "at")

    def __init__(self, at: float, amount: float) -> None:
        self.at = at
        self.amount = amount

    def __repr__(self) -> str:
        return f"Grant(at={self.at!r}, amount={self.amount!r})"


class RateLimiter:
    """At most `rate_per_minute` units (requests or tokens) started in any 60 s, paced smoothly.

    Two rules must both allow a start. A GCRA bucket, refilled at rate/60 per second and holding
    `burst` (default one second's worth, at least 1), spreads starts evenly: any span of w
    seconds admits at most burst + rate*w/60. A bucket alone lets burst + rate through in 60 s,
    so a log of the starts of the last 60 s makes the window limit exact. An amount above the
    burst waits for a full bucket and leaves it in debt (borrowing); one above the whole limit
    waits for an empty window, the only way it can ever start.

    `delay()` and `take()` let a caller combine several limiters into one atomic admission;
    `acquire()` is the standalone form.

    >>> limiter = RateLimiter(600)          # 10 a second, burst 10
    >>> grant = await limiter.acquire(1)
    """

    def __init__(
        self, rate_per_minute: float, burst: float | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        if not rate_per_minute > 0:
            raise ValueError(f"rate must be positive, not {rate_per_minute}")
        if burst is not None and not burst > 0:
            raise ValueError(f"burst must be positive, not {burst}")
        self.rate_per_minute = float(rate_per_minute)
        self.burst = max(1.0, self.rate_per_minute / 60.0) if burst is None else float(burst)
        self._clock = clock
        self._interval = WINDOW / self.rate_per_minute  # seconds per unit
        self._tat = -math.inf  # GCRA "theoretical arrival time": the bucket is full from then on
        self._log: deque[Grant] = deque()
        self._in_window = 0.0
        self._lock = asyncio.Lock()
        self._credit_waiters: list[asyncio.Future[None]] = []

    @property
    def in_window(self) -> float:
        """Units started in the last 60 seconds (after corrections)."""
        self._expire(self._clock.monotonic())
        return self._in_window

    def delay(self, amount: float = 1, now: float | None = None) -> float:
        """Seconds until `amount` may start (0.0: now); nothing is taken."""
        if now is None:
            now = self._clock.monotonic()
        wait = self._tat - max(self.burst - amount, 0.0) * self._interval - now
        self._expire(now)
        excess = self._in_window + amount - self.rate_per_minute
        if excess > 0 and self._log:
            freed = 0.0
            for grant in self._log:
                freed += grant.amount
                if freed >= excess:
                    break
            # (without a break, `grant` is the newest: the amount needs an empty window).
            # Written as _expire's test is, so float rounding cannot admit what it keeps.
            wait = max(wait, WINDOW - (now - grant.at))
        return wait if wait > 0.0 else 0.0

    def take(self, amount: float = 1, now: float | None = None) -> Grant:
        """Record a start of `amount` now, whether or not delay() allowed it."""
        if now is None:
            now = self._clock.monotonic()
        self._tat = max(self._tat, now) + amount * self._interval
        grant = Grant(now, amount)
        self._log.append(grant)
        self._in_window += amount
        return grant

    async def acquire(self, amount: float = 1) -> Grant:
        """Wait until `amount` may start, first come first served, and take it."""
        clock = self._clock
        async with self._lock:
            while True:
                now = clock.monotonic()
                wait = self.delay(amount, now)
                if wait <= 0:
                    return self.take(amount, now)
                await _sleep_unless(clock, max(wait, MIN_SLEEP), self.credited())

    def credited(self) -> asyncio.Future[None]:
        """A future resolved at the next credit, which may let a waiting start go sooner."""
        waiters = self._credit_waiters = [w for w in self._credit_waiters if not w.done()]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        return waiter

    def correct(self, estimated: float, actual: float, grant: Grant | None = None) -> None:
        """Charge or credit the difference once the real amount is known (usage came back).

        With the start's `grant`, the 60-second log is corrected in place; without it an extra
        charge is logged now and a credit only refills the bucket.
        """
        diff = actual - estimated
        if not diff:
            return
        now = self._clock.monotonic()
        if diff > 0:
            self._tat = max(self._tat, now) + diff * self._interval
        else:
            if self._tat > now:
                self._tat = max(now, self._tat + diff * self._interval)
            waiters, self._credit_waiters = self._credit_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if grant is None:
            if diff > 0:
                self._log.append(Grant(now, diff))
                self._in_window += diff
        elif now - grant.at < WINDOW:  # still in the log (expiry uses the same test)
            change = max(diff, -grant.amount)
            grant.amount += change
            self._in_window += change

    def _expire(self, now: float) -> None:
        log = self._log
        while log and now - log[0].at >= WINDOW:
            self._in_window -= log.popleft().amount
        if not log:
            self._in_window = 0.0  # no float residue from corrections


async def _sleep_unless(clock: Clock, seconds: float, signal: asyncio.Future[None]) -> None:
    """Sleep, or return early once `signal` resolves."""
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait((sleeper, signal), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        signal.cancel()
