"""One row's way through the run: budget, pacing, the client, retries, structured re-asks.

`RowProcessing` is a part of `engine._Run` (a mixin: the state is the run's): `_process(row)`
returns the row's Result, or None when the run stops before the row is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from typing import Any

from .client import Answer
from .errors import (
    AttemptTimeout,
    AuthRefused,
    ConnectionFailed,
    InvalidResponse,
    PermanentError,
    RateLimited,
    RequestError,
    RetryableError,
)
from .requests import CHARS_PER_TOKEN, MESSAGE_TOKENS, REPLY_TOKENS
from .results import Result, Row
from .retry import call_with_retries
from .runstate import EXIT_AUTH, EXIT_STOPPED, Abandon
from .structured import ReaskStopped, ask_until_valid, names_function

log = logging.getLogger("batchrunner.engine")

BUDGET_MAX_TOKENS_GUESS = 4096  # worst case per request for --max-cost when max_tokens is unset

_MAYBE_BILLED = (AttemptTimeout, ConnectionFailed, InvalidResponse, asyncio.CancelledError)


class RowProcessing:
    """`_Run`'s per-row part: one row from its request body to its Result."""

    # The run's state this part reads and updates (set by `_Run.__init__`).
    config: Any
    client: Any
    pacer: Any
    budget: Any
    prices: Any
    gate: Any
    tally: Any
    control: Any
    cache: Any
    schema: Any
    stop_event: asyncio.Event
    completion_guess: float
    auth_error: AuthRefused | None
    _failure_keys: dict[int, Any]
    _warned_budget: set[str]

    async def _process(self, row: Row) -> Result | None:
        body = row.body
        assert body is not None
        model = row.model
        estimate, prompt_bound = _prompt_tokens(body)
        completion_bound = _completion_bound(body)
        tokens_estimate = estimate + (
            completion_bound if completion_bound is not None else int(self.completion_guess)
        )
        attempts = 0
        started = time.perf_counter()

        async def send() -> Answer:
            nonlocal attempts, started, reserved
            if self.stop_event.is_set():
                raise Abandon()
            reserved = await self._reserve_budget(model, prompt_bound, completion_bound)
            await self.gate.admit()  # at most one checkpoint interval waits to be durable
            if self.stop_event.is_set():
                if self.budget is not None:
                    self.budget.settle(reserved, 0.0)
                raise Abandon()
            attempts += 1
            self.tally.sent += 1
            started = time.perf_counter()
            try:
                with self.gate.sending():
                    return await self._attempt(body, tokens_estimate)
            except BaseException as exc:
                if self.budget is not None:
                    # An answer cut short may still be billed: count the worst case.
                    billed = None if isinstance(exc, _MAYBE_BILLED) else 0.0
                    self.budget.settle(reserved, billed)
                raise

        async def answered() -> Result:  # SPEC 17: one answer, to check against the schema
            answer = await call_with_retries(
                send, self.config.max_attempts, sleep=self._retry_sleep
            )
            return self._ok_result(row, answer, attempts, reserved)

        reserved = 0.0
        result: Result | None = None
        try:
            if self.schema is not None:
                try:
                    checked = await ask_until_valid(
                        answered, self.schema, self.config.invalid_retries, names_function(body)
                    )
                except ReaskStopped as stopped:  # answers paid for are kept, as a failed re-ask
                    checked = stopped.result
                    if isinstance(stopped.cause, AuthRefused):
                        self._refused(stopped.cause)
                result = dataclasses.replace(checked, attempts=attempts)  # a failed re-ask's too
                return result
            answer = await call_with_retries(
                send, self.config.max_attempts, sleep=self._retry_sleep
            )
            result = self._ok_result(row, answer, attempts, reserved)
            return result
        except Abandon:
            return None
        except AuthRefused as exc:
            self._refused(exc)
            return None
        except RequestError as exc:
            failed = Result(
                index=row.index,
                id=row.id,
                status="error",
                model=model,
                attempts=attempts,
                latency_ms=(time.perf_counter() - started) * 1000,
                http_status=exc.http_status,
                error=str(exc),
            )
            if isinstance(exc, PermanentError):  # for the systematic-failure stop
                self._failure_keys[id(failed)] = (exc.http_status, exc.code)
            return failed
        finally:
            if self.cache is not None:  # stores an answer it may; forgets the row's key anyway
                self.cache.offer(row, result)

    def _refused(self, exc: AuthRefused) -> None:
        self.auth_error = exc
        self.control.stop("auth", EXIT_AUTH)

    async def _attempt(self, body: dict[str, Any], tokens_estimate: int) -> Answer:
        async with self.pacer.slot(tokens_estimate) as slot:
            try:
                answer = await self.client.complete(body)
            except RateLimited as exc:
                slot.rate_limited(exc.retry_after, exc.rate_headers)
                raise
            except RetryableError:
                slot.failed()
                raise
            except RequestError:
                slot.failed()
                raise
            slot.succeeded(answer.usage.total_tokens, answer.rate_headers)
            return answer

    def _ok_result(self, row: Row, answer: Answer, attempts: int, reserved: float) -> Result:
        usage = answer.usage
        cost = self.prices.cost(
            row.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens or 0
        )
        if self.budget is not None:
            self.budget.settle(reserved, cost if cost is not None else 0.0)
        if usage.completion_tokens is not None:
            # A slow-moving mean of completion length, for tpm estimates without max_tokens.
            self.completion_guess += 0.05 * (usage.completion_tokens - self.completion_guess)
        return Result(
            index=row.index,
            id=row.id,
            status="ok",
            model=row.model,
            content=answer.content,
            choices=answer.choices,
            finish_reason=answer.finish_reason,
            response_model=answer.response_model,
            usage=usage,
            cost_usd=cost,
            attempts=attempts,
            latency_ms=answer.latency_ms,
            ttft_ms=answer.ttft_ms,
            http_status=answer.http_status,
            response_id=answer.response_id,
            refusal=answer.refusal,
            tool_calls=answer.tool_calls,
            logprobs=answer.logprobs,
            choices_tool_calls=answer.choices_tool_calls,
        )

    async def _reserve_budget(
        self, model: str | None, prompt_tokens: int, bound: int | None
    ) -> float:
        if self.budget is None:
            return 0.0
        if bound is None and "max_tokens" not in self._warned_budget:
            self._warned_budget.add("max_tokens")
            log.warning(
                "--max-cost without max_tokens: assuming at most %d completion tokens a request",
                BUDGET_MAX_TOKENS_GUESS,
            )
        worst = self.prices.worst_case(model, prompt_tokens, bound or BUDGET_MAX_TOKENS_GUESS)
        if worst is None:
            if model not in self._warned_budget:
                self._warned_budget.add(str(model))
                log.warning("no price for model %s: --max-cost cannot bound its spending", model)
            worst = 0.0
        if not await self.budget.acquire(worst):
            if "reached" not in self._warned_budget:  # once a run, not once a worker
                self._warned_budget.add("reached")
                log.warning(
                    "budget of $%.4f reached: no new requests are sent", self.config.max_cost
                )
            self.control.stop("budget", EXIT_STOPPED)
            raise Abandon()
        return worst

    async def _retry_sleep(self, seconds: float) -> None:
        """tenacity's sleep: cut short when the run is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop_event.wait()


def _prompt_tokens(body: dict[str, Any]) -> tuple[int, int]:
    """An estimate and an upper bound of a request's prompt tokens.

    The estimate (requests.py's rule, the one `batchrunner estimate` uses) paces --tpm; the
    bound (one token per UTF-8 byte at most, as byte-level tokenizers guarantee) keeps
    --max-cost a promise.
    """
    chars = 0
    size = 0
    messages = body.get("messages") or ()
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            content = "" if content is None else json.dumps(content)
        chars += len(content)
        size += len(content.encode())
    framing = MESSAGE_TOKENS * len(messages) + REPLY_TOKENS
    return math.ceil(chars / CHARS_PER_TOKEN) + framing, size + 2 * framing


def _completion_bound(body: dict[str, Any]) -> int | None:
    bound = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(bound, int):
        return None
    n = body.get("n") or 1
    return bound * (n if isinstance(n, int) and n > 0 else 1)
