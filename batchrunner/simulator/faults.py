"""The faults the simulator injects: latency, 500/503 errors, dropped connections, 429 limits.

Random faults come from one `random.Random(fault_seed)` that draws the same five numbers for
every request that gets that far, whichever faults fire, so a seed replays the same faults for
the same sequence of requests.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from batchrunner.config.durations import format_duration
from batchrunner.simulator.config import GatewayConfig

__all__ = ["FaultPlan", "Faults", "InvalidJsonPlan", "RateLimiter", "format_duration"]

WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class Faults:
    """What happens to one request: a delay, then an error status or a drop, or neither."""

    delay_s: float = 0.0
    error_status: int | None = None  # 500 or 503
    drop_at: float | None = None  # fraction of the answer sent before the connection drops


NO_FAULTS = Faults()


class FaultPlan:
    """Draws the faults of each request from the config's rates and seed."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self._rng = random.Random(config.fault_seed)
        self.active = bool(
            config.latency_ms or config.jitter_ms or config.error_rate or config.drop_rate
        )

    def draw(self) -> Faults:
        """The faults of the next request."""
        if not self.active:
            return NO_FAULTS
        config = self._config
        rand = self._rng.random
        u_delay, u_error, u_status, u_drop, u_cut = rand(), rand(), rand(), rand(), rand()
        delay_ms = config.latency_ms + (2 * u_delay - 1) * config.jitter_ms
        return Faults(
            delay_s=max(delay_ms, 0.0) / 1000,
            error_status=(500 if u_status < 0.5 else 503) if u_error < config.error_rate else None,
            drop_at=u_cut if u_drop < config.drop_rate else None,
        )


class InvalidJsonPlan:
    """Which json_schema answers are made invalid (`invalid_json_rate`), and how.

    Its own random stream, seeded from `fault_seed`: turning it on changes no other fault.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self._rate = config.invalid_json_rate
        seed = None if config.fault_seed is None else f"{config.fault_seed}:invalid-json"
        self._rng = random.Random(seed)

    def draw(self) -> float | None:
        """None for a valid answer, else a number in [0, 1) choosing how it is spoiled."""
        u_spoil, u_how = self._rng.random(), self._rng.random()
        return u_how if u_spoil < self._rate else None


class RateLimiter:
    """Requests and tokens per sliding 60-second window; what is refused is not counted.

    `acquire` admits a request or says how long to wait (Retry-After: until the window next
    frees capacity). `x-ratelimit-reset-*` is, as OpenAI documents it, the time until the
    limit is back to its initial state: until the newest entry leaves the window.
    """

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        clock: Callable[[], float] = time.monotonic,
        window: float = WINDOW_SECONDS,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.window = window
        self._clock = clock
        self._window: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def _expire(self, now: float) -> None:
        window = self._window
        horizon = now - self.window
        while window and window[0][0] <= horizon:
            self._tokens -= window.popleft()[1]

    def acquire(self, tokens: int) -> tuple[str, float] | None:
        """Admit a request of `tokens` tokens, or return (kind, seconds to wait) if over a limit.

        `kind` is "requests" or "tokens", the limit that refused it.
        """
        now = self._clock()
        self._expire(now)
        window = self._window
        if self.rpm is not None and len(window) >= self.rpm:
            return "requests", window[len(window) - self.rpm][0] + self.window - now
        if self.tpm is not None and self._tokens + tokens > self.tpm:
            if tokens > self.tpm:
                return "tokens", self.window
            freed = self._tokens + tokens - self.tpm
            for moment, spent in window:
                freed -= spent
                if freed <= 0:
                    return "tokens", moment + self.window - now
            return "tokens", self.window  # unreachable: an empty window admits it
        window.append((now, tokens))
        self._tokens += tokens
        return None

    def used(self) -> tuple[int, int]:
        """Requests and tokens in the current window."""
        self._expire(self._clock())
        return len(self._window), self._tokens

    def headers(self) -> dict[str, str]:
        """The `x-ratelimit-*` headers of the current window."""
        now = self._clock()
        self._expire(now)
        # As OpenAI documents it: the time until the limit is back to its initial state, i.e.
        # until the newest request leaves the window (Retry-After says when the next one may go).
        reset = format_duration(self._window[-1][0] + self.window - now if self._window else 0)
        headers = {}
        if self.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(self.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(self.rpm - len(self._window), 0))
            headers["x-ratelimit-reset-requests"] = reset
        if self.tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(self.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(self.tpm - self._tokens, 0))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers
