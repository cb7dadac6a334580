"""Flow control composed: the adaptive concurrency limit, the shared 429 pause, and `Pacer`.

Each concern is one small object on an injected `Clock` (the rpm/tpm windows in rates.py, the
x-ratelimit-* header pacing in headers.py), so pacing and backoff are tested on a
virtual clock (tests/fakeclock.py) without waiting. `Pacer` only composes them for the engine's workers:

    pacer = Pacer(concurrency=16, rpm=500, tpm=200_000)
    async with pacer.slot(tokens_estimate) as slot:  # prompt + completion tokens, for tpm
        try:
            answer = await send(body)
        except RateLimited as error:
            slot.rate_limited(error.retry_after)
            raise
        slot.succeeded(answer.usage.total_tokens, answer.headers)

What stops a run early, the budget and the deadline, lives in `limits.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from collections.abc import Mapping
from types import TracebackType

from batchrunner.clock import SYSTEM_CLOCK, Clock, SystemClock
from batchrunner.transport.headers import HeaderPacer
from batchrunner.transport.rates import MIN_SLEEP, Grant, RateLimiter, _sleep_unless

__all__ = [
    "SYSTEM_CLOCK",
    "AdaptiveConcurrency",
    "Clock",
    "Pacer",
    "SharedPause",
    "Slot",
    "SystemClock",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- concurrency


class AdaptiveConcurrency:
    """An AIMD limit on requests in flight: halve it on a 429, +1 per `limit` successes.

    One burst of 429s counts once: a 429 for a request sent at or before the last decrease came
    from the same window and is ignored. The limit starts at `maximum` and stays within
    [minimum, maximum]. Waiters are served first come first served.

    >>> concurrency = AdaptiveConcurrency(16)
    >>> async with concurrency:
    ...     concurrency.on_success()
    """

    def __init__(self, maximum: int, minimum: int = 1, clock: Clock = SYSTEM_CLOCK) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, not {minimum} and {maximum}")
        self.maximum = maximum
        self.minimum = minimum
        self._clock = clock
        self._limit = maximum
        self._in_flight = 0
        self._successes = 0
        self._last_decrease = -math.inf
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Requests in flight now."""
        return self._in_flight

    def try_acquire(self) -> bool:
        """Take a place at once if one is free and nobody is queued before us."""
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a place in flight."""
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake()  # the queue may hold only cancelled waiters
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, then cancelled before it could run: give it back
            raise

    def release(self) -> None:
        """Give a place back."""
        self._in_flight -= 1
        self._wake()

    def on_success(self) -> None:
        """Additive increase: +1 once `limit` requests have succeeded since the last change."""
        self._successes += 1
        if self._successes >= self._limit:
            self._successes = 0
            if self._limit < self.maximum:
                self._limit += 1
                self._wake()

    def on_rate_limited(self, sent_at: float | None = None) -> bool:
        """Multiplicative decrease (x0.5) unless the request was sent before the last one.

        Returns whether the limit was lowered (or would have been, were it not at the minimum).
        """
        if sent_at is not None and sent_at <= self._last_decrease:
            return False
        self._last_decrease = self._clock.monotonic()
        self._successes = 0
        self._limit = max(self.minimum, self._limit // 2)
        return True

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self._in_flight < self._limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)

    async def __aenter__(self) -> AdaptiveConcurrency:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class SharedPause:
    """One pause for the whole run: every worker waits it out together.

    >>> pause = SharedPause()
    >>> pause.pause_for(5.0)                # a 429 asked for Retry-After: 5
    >>> await pause.wait()                  # every worker returns here 5 s later
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self.until = -math.inf
        """Monotonic time at which the pause ends (in the past: no pause)."""

    def pause_for(self, seconds: float) -> None:
        """Pause until now + seconds, unless a pause already lasts longer."""
        self.until = max(self.until, self._clock.monotonic() + seconds)

    def remaining(self) -> float:
        """Seconds of pause left (0.0: none)."""
        return max(0.0, self.until - self._clock.monotonic())

    async def wait(self) -> None:
        """Return when no pause is in force (a pause extended meanwhile is waited out too)."""
        clock = self._clock
        while (left := self.until - clock.monotonic()) > 0:
            await clock.sleep(max(left, MIN_SLEEP))


# ----------------------------------------------------------------------------------------- pacer


class Slot:
    """One HTTP attempt's place in the run: entered once every limit allows it to start.

    Report the outcome with exactly one of succeeded(), rate_limited() or failed(); leaving the
    block without one (an exception) counts as failed.
    """

    __slots__ = ("_grant", "_pacer", "_reported", "estimated_tokens", "started_at")

    def __init__(self, pacer: Pacer, estimated_tokens: int) -> None:
        self._pacer = pacer
        self.estimated_tokens = estimated_tokens
        self.started_at = math.nan
        """Monotonic time at which the slot was granted."""
        self._grant: Grant | None = None
        self._reported = False

    async def __aenter__(self) -> Slot:
        pacer = self._pacer
        if pacer._quiet and pacer._concurrency.try_acquire():
            self.started_at = pacer._now()
        else:
            await pacer._enter(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pacer._concurrency.release()

    def succeeded(
        self, actual_tokens: int | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """The attempt got an answer: grow concurrency, correct tpm to the usage, read headers."""
        if not self._reported:
            self._reported = True
            self._pacer._on_success(self, actual_tokens, headers)

    def rate_limited(
        self, retry_after: float | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """The gateway said 429: pause the whole run and lower concurrency."""
        if not self._reported:
            self._reported = True
            self._pacer._on_rate_limited(self, retry_after, headers)

    def failed(self, headers: Mapping[str, str] | None = None) -> None:
        """Any other failure: no change to pacing, beyond reading the headers if any came."""
        if not self._reported:
            self._reported = True
            if headers:
                self._pacer._observe(headers, self)


class Pacer:
    """The flow control the engine's workers share; it composes the objects above and no more.

    A slot waits for the shared 429 pause, then a place in flight (adaptive), then rpm, tpm and
    header pacing together. With no rpm/tpm and no 429 or low-remaining headers seen yet, a slot
    only counts the place in flight.

    >>> pacer = Pacer(concurrency=16, rpm=500)
    >>> async with pacer.slot(estimated_tokens=900) as slot:
    ...     slot.succeeded(actual_tokens=412, headers={"x-ratelimit-remaining-requests": "40"})
    """

    def __init__(
        self,
        concurrency: int,
        rpm: float | None = None,
        tpm: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        adaptive: bool = True,
        *,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._now = clock.monotonic
        self._adaptive = adaptive
        self._concurrency = AdaptiveConcurrency(concurrency, clock=clock)
        self._pause = SharedPause(clock)
        self._requests = None if rpm is None else RateLimiter(rpm, clock=clock)
        self._tokens = None if tpm is None else RateLimiter(tpm, clock=clock)
        self._headers = HeaderPacer(clock)
        self._gate_lock = asyncio.Lock()
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._strikes = 0  # 429 storms in a row, each one window of requests
        self._storm_at = -math.inf  # when the latest storm began
        self._quiet = rpm is None and tpm is None  # nothing to pace: the fast path

    @property
    def concurrency_limit(self) -> int:
        """Requests allowed in flight now (lowered by 429s, raised again by successes)."""
        return self._concurrency.limit

    @property
    def in_flight(self) -> int:
        """Slots held now."""
        return self._concurrency.in_flight

    def pause_remaining(self) -> float:
        """Seconds left of the shared 429 pause (0.0: none)."""
        return self._pause.remaining()

    def slot(self, estimated_tokens: int = 0) -> Slot:
        """A place for one attempt, to be entered with `async with`."""
        return Slot(self, estimated_tokens)

    async def _enter(self, slot: Slot) -> None:
        await self._pause.wait()
        await self._concurrency.acquire()
        try:
            await self._gate(slot)
        except BaseException:
            self._concurrency.release()
            raise

    async def _gate(self, slot: Slot) -> None:
        clock = self._clock
        requests, tokens, pause, headers = self._requests, self._tokens, self._pause, self._headers
        amount = slot.estimated_tokens
        async with self._gate_lock:  # first come first served, so a large tpm start is not starved
            while True:
                now = clock.monotonic()
                wait = max(pause.until - now, headers.delay(now))
                if requests is not None:
                    wait = max(wait, requests.delay(1, now))
                if tokens is not None and amount > 0:
                    wait = max(wait, tokens.delay(amount, now))
                if wait <= 0:
                    break
                if tokens is None:
                    await clock.sleep(max(wait, MIN_SLEEP))
                else:  # a correction that credits tokens back may let this start sooner
                    await _sleep_unless(clock, max(wait, MIN_SLEEP), tokens.credited())
            if requests is not None:
                requests.take(1, now)
            if tokens is not None and amount > 0:
                slot._grant = tokens.take(amount, now)
            headers.take(now)
            slot.started_at = now

    def _on_success(
        self, slot: Slot, actual_tokens: int | None, headers: Mapping[str, str] | None
    ) -> None:
        if self._adaptive:
            self._concurrency.on_success()
        if self._strikes and slot.started_at > self._storm_at:
            self._strikes = 0
        if actual_tokens is not None and slot._grant is not None and self._tokens is not None:
            self._tokens.correct(slot.estimated_tokens, actual_tokens, slot._grant)
        if headers:
            self._observe(headers, slot)

    def _on_rate_limited(
        self, slot: Slot, retry_after: float | None, headers: Mapping[str, str] | None
    ) -> None:
        self._quiet = False
        fresh = slot.started_at > self._storm_at  # sent after the last storm began: a new one
        if fresh:
            self._strikes += 1
            self._storm_at = self._now()
        if self._adaptive:
            self._concurrency.on_rate_limited(slot.started_at)
        if retry_after is not None:
            seconds = max(0.0, retry_after)
        else:
            backoff = min(self._backoff_cap, self._backoff_base * 2 ** (self._strikes - 1))
            seconds = backoff * self._rng.uniform(0.5, 1.0)
        self._pause.pause_for(seconds)
        if fresh:
            logger.info(
                "rate limited (429): all requests pause %.1f s, concurrency now %d",
                seconds,
                self._concurrency.limit,
            )
        if headers:
            self._observe(headers, slot)

    def _observe(self, headers: Mapping[str, str], slot: Slot) -> None:
        slows = self._headers.observe(
            headers,
            low_water=2 * self._concurrency.limit,
            tokens_per_request=slot.estimated_tokens,
        )
        if slows:
            self._quiet = False
