"""The retry policy: what is retried, how often, and how long it waits (no real waiting)."""

from __future__ import annotations

import asyncio

import pytest

from batchrunner.errors import (
    AttemptTimeout,
    ConnectionFailed,
    InvalidResponse,
    PermanentError,
    RateLimited,
    ServerError,
)
from batchrunner.transport.retry import retry_policy


def run_policy(failures: list[Exception], max_attempts: int = 6) -> tuple[int, list[float], object]:
    """Feed a sequence of failures (then success) through the policy; record attempts, sleeps."""
    sleeps: list[float] = []
    attempts = 0

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def go() -> object:
        nonlocal attempts
        async for attempt in retry_policy(max_attempts, sleep=fake_sleep):
            with attempt:
                attempts += 1
                if attempts <= len(failures):
                    raise failures[attempts - 1]
                return "answer"
        return None

    outcome: object
    try:
        outcome = asyncio.run(go())
    except Exception as exc:  # the last failure, re-raised
        outcome = exc
    return attempts, sleeps, outcome


@pytest.mark.parametrize(
    "failure",
    [ConnectionFailed("reset"), AttemptTimeout("slow"), ServerError("boom", http_status=503),
     RateLimited("slow down"), InvalidResponse("cut short")],
    ids=["connection", "timeout", "5xx", "429", "invalid-body"],
)
def test_retryable_errors_are_retried_until_success(failure: Exception) -> None:
    attempts, sleeps, outcome = run_policy([failure, failure])
    assert outcome == "answer"
    assert attempts == 3
    assert len(sleeps) == 2


def test_permanent_errors_are_not_retried() -> None:
    error = PermanentError("HTTP 400: bad temperature", http_status=400)
    attempts, sleeps, outcome = run_policy([error])
    assert attempts == 1 and sleeps == []
    assert outcome is error


def test_at_most_max_attempts_then_the_last_error() -> None:
    errors = [ServerError(f"boom {i}", http_status=500) for i in range(10)]
    attempts, sleeps, outcome = run_policy(errors, max_attempts=4)
    assert attempts == 4
    assert len(sleeps) == 3
    assert outcome is errors[3]


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    errors = [ServerError("boom", http_status=500) for _ in range(5)]
    _, sleeps, _ = run_policy(errors, max_attempts=6)
    # initial 0.5 s doubling, plus jitter of at most 0.5 s
    for n, slept in enumerate(sleeps):
        assert 0.5 * 2**n <= slept <= 0.5 * 2**n + 0.5


def test_retry_after_is_a_minimum() -> None:
    attempts, sleeps, outcome = run_policy([RateLimited("slow", retry_after=12.0)])
    assert outcome == "answer" and attempts == 2
    assert sleeps[0] >= 12.0
    _, sleeps, _ = run_policy([ServerError("busy", http_status=503, retry_after=3.0)])
    assert sleeps[0] >= 3.0
    # a Retry-After shorter than the backoff does not shorten it
    errors = [ServerError("boom", http_status=500)] * 4 + [RateLimited("slow", retry_after=0.1)]
    _, sleeps, _ = run_policy(errors)
    assert sleeps[4] >= 0.5 * 2**4


def test_call_with_retries_follows_the_policy_exactly() -> None:
    from batchrunner.transport.retry import call_with_retries

    sleeps: list[float] = []
    calls = 0
    failures = [RateLimited("slow", retry_after=3.0), ServerError("boom", http_status=500),
                ServerError("boom", http_status=500)]

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def send() -> str:
        nonlocal calls
        calls += 1
        if calls <= len(failures):
            raise failures[calls - 1]
        return "answer"

    assert asyncio.run(call_with_retries(send, 6, sleep=fake_sleep)) == "answer"
    assert calls == 4
    assert sleeps[0] >= 3.0  # the Retry-After of the first failure
    assert 1.0 <= sleeps[1] <= 1.5 and 2.0 <= sleeps[2] <= 2.5  # the policy's 2nd and 3rd steps
    calls = 0
    with pytest.raises(ServerError):
        asyncio.run(call_with_retries(send, 2, sleep=fake_sleep))
    assert calls == 2
    calls = 0
    with pytest.raises(RateLimited):
        asyncio.run(call_with_retries(send, 1, sleep=fake_sleep))
    assert calls == 1
