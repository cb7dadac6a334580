"""The retry policy of a request, built from tenacity's parts.

Retried: every `RetryableError` (connection errors, timeouts, 408, 409, 429, 5xx, bodies that
are not a valid answer), at most `max_attempts` attempts per row, with exponential backoff and
full jitter; a `Retry-After` from the gateway is the minimum wait. Not retried: everything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from batchrunner.errors import RetryableError

__all__ = ["call_with_retries", "retry_policy", "wait_retry_after"]

T = TypeVar("T")


class wait_retry_after(wait_base):  # noqa: N801 - named like tenacity's own waits
    """Wait as `fallback` says, but never less than the Retry-After the gateway sent."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.fallback(retry_state)
        outcome = retry_state.outcome
        if outcome is not None and outcome.failed:
            retry_after = getattr(outcome.exception(), "retry_after", None)
            if retry_after is not None:
                wait = max(wait, float(retry_after))
        return wait


def retry_policy(
    max_attempts: int,
    *,
    initial: float = 0.5,
    maximum: float = 30.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncRetrying:
    """The per-row retry policy; `sleep` is injectable so tests need not wait.

    >>> async for attempt in retry_policy(6):
    ...     with attempt:
    ...         answer = await client.complete(body)
    """
    return AsyncRetrying(
        retry=retry_if_exception_type(RetryableError),
        stop=stop_after_attempt(max_attempts),
        wait=wait_retry_after(
            wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial)
        ),
        sleep=sleep,
        reraise=True,
    )


async def call_with_retries(
    send: Callable[[], Awaitable[T]],
    max_attempts: int,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """`await send()` under `retry_policy`, with the first attempt outside tenacity.

    Most rows succeed at once, and tenacity's per-attempt bookkeeping costs more CPU than the
    rest of a request's handling here, so the first attempt is a plain call. After a retryable
    failure the policy takes over from the start: its first attempt re-raises that failure
    (nothing is sent), so waits, stops and the attempt count are exactly the policy's.
    """
    try:
        return await send()
    except RetryableError as exc:
        if max_attempts <= 1:
            raise
        first_failure: RetryableError | None = exc
    async for attempt in retry_policy(max_attempts, sleep=sleep):
        with attempt:
            if first_failure is not None:
                failure, first_failure = first_failure, None
                raise failure
            return await send()
    raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover
