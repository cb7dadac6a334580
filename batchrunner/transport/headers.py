"""Pacing to the gateway's x-ratelimit-remaining-*/reset-* headers, before it says 429.

`HeaderPacer` spreads the starts that remain over the time until the reset, holds starts when
nothing remains, and probes after a hold; `parse_reset` reads the reset values. On an
injected `Clock`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from batchrunner.clock import SYSTEM_CLOCK, Clock
from batchrunner.config.durations import parse_duration

__all__ = ["HeaderPacer", "parse_reset"]

_MAX_RESET = 86400.0  # a reset further off than a day is not a duration we understand


def parse_reset(text: str) -> float | None:
    """Seconds from an x-ratelimit-reset-* value ("1s", "6m0s", "250ms", "1.5"); None if unreadable.

    >>> parse_reset("6m0s"), parse_reset("250ms"), parse_reset("1.5")
    (360.0, 0.25, 1.5)
    """
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parsed = parse_duration(text)  # the Go-style values are a subset of the one grammar
        if parsed is None:
            return None
        seconds = parsed
    if not 0 <= seconds <= _MAX_RESET:  # also rejects nan
        return None
    return seconds


def _parse_remaining(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 else None  # also rejects nan


class HeaderPacer:
    """Paces to x-ratelimit-remaining-*/reset-* so the run slows before the gateway says 429.

    When what remains (in requests, or in tokens divided by the tokens a request takes) falls
    below `low_water`, the remaining starts are spread over the time until the reset: one start
    every reset/remaining seconds until then. Nothing left: no start until the reset. The newest
    headers replace older ones, except that a hold is never shortened.
    """

    PROBE_GAP = 0.2  # seconds between starts after a hold, until fresh headers arrive

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._interval = 0.0  # seconds between starts while _interval_until is ahead
        self._interval_until = -math.inf
        self._next = -math.inf  # no start before this
        # After "nothing left" the limit frees up gradually (a sliding window), not all at
        # once: releasing every waiting worker at the reset would meet a wall of 429s. So
        # starts after a hold are probes, PROBE_GAP apart, until an answer says what remains.
        self._probing = False

    @property
    def interval(self) -> float:
        """Seconds between starts the headers ask for now (0.0: none)."""
        return self._interval if self._interval_until > self._clock.monotonic() else 0.0

    def observe(
        self, headers: Mapping[str, str], *, low_water: float, tokens_per_request: float = 1.0
    ) -> bool:
        """Read one response's headers (lower-case keys); True if they slow the run."""
        interval = 0.0
        until = -math.inf
        now = self._clock.monotonic()
        informed = False
        hold = False
        for kind, per_request in (("requests", 1.0), ("tokens", max(tokens_per_request, 1.0))):
            remaining = _parse_remaining(headers.get(f"x-ratelimit-remaining-{kind}"))
            if remaining is None:
                continue
            informed = True
            starts_left = remaining / per_request
            if starts_left >= low_water:
                continue
            reset_text = headers.get(f"x-ratelimit-reset-{kind}")
            reset = None if reset_text is None else parse_reset(reset_text)
            if reset is None:
                continue
            if starts_left < 1:
                self._next = max(self._next, now + reset)
                hold = True
            else:
                interval = max(interval, reset / starts_left)
                until = max(until, now + reset)
        if informed:  # a response without these headers says nothing about the limits
            self._interval = interval
            self._interval_until = until
            self._probing = hold
        return self.interval > 0 or self._next > now or self._probing

    def delay(self, now: float) -> float:
        """Seconds until the next start the headers allow."""
        return self._next - now

    def take(self, now: float) -> None:
        """Record a start now."""
        if self._probing:
            self._next = max(self._next, now + self.PROBE_GAP)
        elif self._interval and now < self._interval_until:
            self._next = max(self._next, now + self._interval)
