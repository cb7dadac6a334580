"""What stops a run early: `Budget` (--max-cost) and `Deadline` (--deadline).

They stand beside the pacer: the engine asks them before it takes a slot, so a worker waiting on
the budget holds no concurrency.

    budget = Budget(5.00)
    deadline = Deadline.from_text("2h30m")
    if not deadline.passed and await budget.acquire(worst_case):
        ...
        budget.settle(worst_case, actual_cost)
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from batchrunner.clock import SYSTEM_CLOCK, Clock
from batchrunner.config.durations import parse_deadline, parse_duration

__all__ = ["Budget", "Deadline", "describe_deadline", "parse_deadline"]


def describe_deadline(at: datetime, now: datetime) -> str:
    """`until 06:00 tomorrow, in 6 h 4 min`: when a deadline falls, seen from `now`."""
    days = (at.date() - now.date()).days
    day = "" if days == 0 else " tomorrow" if days == 1 else f" on {at:%Y-%m-%d}"
    clock = f"{at:%H:%M:%S}" if at.second else f"{at:%H:%M}"
    return f"until {clock}{day}, in {_span(at.timestamp() - now.timestamp())}"


def _span(seconds: float) -> str:
    """`6 h 4 min`, `45 min`, `30 s`: a wait, to the minute past a minute."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


class Budget:
    """--max-cost: no request starts whose worst case could take the spending past the budget.

    Spending so far plus the worst case of every request in flight stays within the budget, as
    long as each worst case (from max_tokens) is a true upper bound of what the request costs.

    >>> budget = Budget(5.00)
    >>> if await budget.acquire(worst):     # False: stop sending
    ...     budget.settle(worst, actual_cost)
    """

    def __init__(self, max_cost_usd: float) -> None:
        if not max_cost_usd > 0:
            raise ValueError(f"budget must be positive, not {max_cost_usd}")
        self.max_cost = float(max_cost_usd)
        self._ceiling = self.max_cost * (1 + 1e-12)  # exact fits must not fail on float rounding
        self._spent = 0.0
        self._reserved = 0.0
        self._in_flight = 0
        self._exhausted = False
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def spent(self) -> float:
        """USD settled so far."""
        return self._spent

    @property
    def reserved(self) -> float:
        """USD held for requests in flight (their worst cases)."""
        return self._reserved

    @property
    def exhausted(self) -> bool:
        """True once a request could not be started: the run stops sending."""
        return self._exhausted

    def reserve(self, worst_case_usd: float) -> bool:
        """Hold the worst case of one request if it fits beside spending and what is in flight.

        False if it does not fit now; `exhausted` turns True when it never can (spending alone
        leaves no room), or after acquire() gave up.
        """
        if worst_case_usd < 0:
            raise ValueError(f"a cost cannot be negative ({worst_case_usd})")
        if self._exhausted:
            return False
        if self._spent + self._reserved + worst_case_usd > self._ceiling:
            if self._spent + worst_case_usd > self._ceiling:
                self._exhausted = True
            return False
        self._reserved += worst_case_usd
        self._in_flight += 1
        return True

    async def acquire(self, worst_case_usd: float) -> bool:
        """Reserve, waiting for requests in flight to settle if that may make room.

        False: the budget is exhausted and the run stops sending (and every later call is False).
        """
        while not self.reserve(worst_case_usd):
            if self._exhausted:
                return False
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        return True

    def add_spent(self, usd: float) -> None:
        """Count spending made outside this budget's reservations (earlier sessions of a run)."""
        self._spent += usd
        if self._spent > self._ceiling:
            self._exhausted = True

    def settle(self, reserved_usd: float, actual_usd: float | None) -> None:
        """A reserved request ended: release its hold and add what it cost.

        `actual_usd` None means unknown and charges the whole reservation; pass 0.0 for an
        attempt known not to be billed (a 429, a 4xx, a refused connection).
        """
        self._in_flight -= 1
        self._reserved = self._reserved - reserved_usd if self._in_flight else 0.0
        self._spent += reserved_usd if actual_usd is None else actual_usd
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Deadline:
    """The moment the run stops sending, on the monotonic clock.

    >>> deadline = Deadline.from_text("2h30m")
    >>> deadline.passed, deadline.remaining()
    (False, 9000.0)
    """

    def __init__(self, seconds_from_now: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self.at = clock.monotonic() + seconds_from_now
        """Monotonic time of the deadline."""
        self.text = f"in {_span(seconds_from_now)}"
        """When it falls, for a person: `until 06:00 tomorrow, in 6 h 4 min`."""
        self.tomorrow = False
        """True for a time of day already past today, which means tomorrow's."""

    @classmethod
    def from_text(
        cls, text: str, clock: Clock = SYSTEM_CLOCK, now: datetime | None = None
    ) -> Deadline:
        """Parse --deadline against the local wall clock (or `now`)."""
        if now is None:
            now = datetime.now()
        at = parse_deadline(text, now)
        # .timestamp() reads naive datetimes as local time, so a DST change overnight is counted.
        deadline = cls(at.timestamp() - now.timestamp(), clock)
        deadline.text = describe_deadline(at, now)
        is_duration = parse_duration(text.strip().lower().replace(" ", "")) is not None
        deadline.tomorrow = at.date() > now.date() and not is_duration
        return deadline

    def remaining(self) -> float:
        """Seconds left (0.0 once passed)."""
        return max(0.0, self.at - self._clock.monotonic())

    @property
    def passed(self) -> bool:
        """True from the deadline on: start nothing more."""
        return self._clock.monotonic() >= self.at
