"""Where the library reads the time and waits: the `Clock` protocol and the real clock.

Pacing, limits and retries take a `Clock`, so tests inject a virtual one (tests/fakeclock.py)
and timing logic is tested without waiting.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    """Where pacing reads the time and waits: the real clock in a run, a FakeClock in tests."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait this many seconds."""
        ...


class SystemClock:
    """The real clock: time.monotonic and asyncio.sleep."""

    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        """Wait this many real seconds."""
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
