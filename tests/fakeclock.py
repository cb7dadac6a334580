"""Virtual time for tests: a `Clock` whose sleep() costs no real time."""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["FakeClock"]


class FakeClock:
    """Virtual time for tests: sleep() costs no real time and sleepers wake in time order.

    Time moves only when every task on the loop is blocked, and then straight to the earliest
    wake-up, so concurrent tasks share one consistent timeline. Use one FakeClock per event loop
    (two would each wait for the other to go idle); asyncio's own timeouts still run in real time.

    >>> clock = FakeClock()
    >>> asyncio.run(clock.sleep(3600)); clock.monotonic()
    3600.0
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._driver: asyncio.Task[None] | None = None

    def monotonic(self) -> float:
        """The virtual time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time on by hand, for code that reads the clock without sleeping."""
        if seconds < 0:
            raise ValueError(f"time cannot go back ({seconds})")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Return once virtual time has reached now + seconds (at once for seconds <= 0)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), wake))
        driver = self._driver
        if driver is None or driver.done() or driver.get_loop() is not loop:
            self._driver = loop.create_task(self._drive())
        await wake

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        sleepers = self._sleepers
        while True:
            await _until_idle(loop)
            # A cancelled sleeper, or one from a finished loop, must not move time.
            while sleepers and (sleepers[0][2].done() or sleepers[0][2].get_loop() is not loop):
                heapq.heappop(sleepers)
            if not sleepers:
                return
            self._now = max(self._now, sleepers[0][0])
            while sleepers and sleepers[0][0] <= self._now:
                wake = heapq.heappop(sleepers)[2]
                if not wake.done():
                    wake.set_result(None)


async def _until_idle(loop: asyncio.AbstractEventLoop) -> None:
    """Yield until no other callback is ready to run: every task is blocked."""
    await asyncio.sleep(0)
    ready = getattr(loop, "_ready", None)  # CPython's run queue; other loops get a fixed number
    if ready is None:
        for _ in range(100):
            await asyncio.sleep(0)
        return
    while ready:
        await asyncio.sleep(0)
