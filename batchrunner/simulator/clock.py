"""The simulator's time: where it waits out latency, expires cached prefixes and runs batches.

The server side keeps its own small clock type (it takes nothing from the client side but the
error tree and the duration grammar); anything with `monotonic()` and `async sleep()` will do,
so the package's `Clock` values and the tests' FakeClock fit it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["REAL_CLOCK", "Clock"]


class Clock(Protocol):
    """`monotonic()` seconds and `sleep(seconds)`: the real ones, or a test's."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class _RealClock:
    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


REAL_CLOCK: Clock = _RealClock()
