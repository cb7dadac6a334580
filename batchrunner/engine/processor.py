"""One row's way to its answer: budget, pacing slot, the client, retries, structured re-asks.

A `RowProcessor` sends rows to one endpoint (its client and its pacer) with the run's shared
state; `process(row)` returns what came of the row as a `Sent` (its Result and how it failed),
or None when the run stops before the row is answered. It knows nothing of checkpoints: what
becomes of a Sent is the recorder's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchrunner.answers.structured import ReaskStopped, ask_until_valid, names_function
from batchrunner.engine.preflight import FailureKey, Outage
from batchrunner.engine.shared import RunState
from batchrunner.engine.state import EXIT_STOPPED, Abandon
from batchrunner.errors import (
    AttemptTimeout,
    AuthRefused,
    ConnectionFailed,
    GatewayUnreachable,
    InvalidResponse,
    PermanentError,
    RateLimited,
    RequestError,
    ServerError,
)
from batchrunner.inputs.requests import CHARS_PER_TOKEN, MESSAGE_TOKENS, REPLY_TOKENS
from batchrunner.results import Result, Row
from batchrunner.transport.client import Client
from batchrunner.transport.completions import Answer
from batchrunner.transport.pacing import Pacer
from batchrunner.transport.retry import call_with_retries

log = logging.getLogger("batchrunner.engine.runner")

BUDGET_MAX_TOKENS_GUESS = 4096  # worst case per request for --max-cost when max_tokens is unset

_MAYBE_BILLED = (AttemptTimeout, ConnectionFailed, InvalidResponse, asyncio.CancelledError)


def _reached_gateway(exc: BaseException) -> bool:
    """False for an attempt that never reached the gateway: no connection, or none in time."""
    if isinstance(exc, GatewayUnreachable):
        return False
    return not (isinstance(exc, AttemptTimeout) and not exc.sent)


def _got_no_answer(exc: BaseException) -> bool:
    """An attempt the gateway did not answer: a timeout, a failed connection, a 5xx."""
    if isinstance(exc, (ConnectionFailed, AttemptTimeout)):
        return True
    return isinstance(exc, ServerError) and (exc.http_status or 0) >= 500


@dataclass(frozen=True)
class Sent:
    """What came of a row taken to be sent: its Result, and how it failed, where it did."""

    result: Result
    failure_key: FailureKey | None = None  # a non-retryable failure: for the systematic stop
    no_answer: bool = False  # every attempt got no answer: for the outage stop


class RowProcessor:
    """Sends rows to one endpoint: its client and pacer, the run's budget, gate and stops."""

    def __init__(
        self,
        state: RunState,
        client: Client,
        pacer: Pacer,
        *,
        outage: Outage[Any] | None = None,
        stop_event: asyncio.Event | None = None,
        on_outage: Callable[[], None] | None = None,
        on_refused: Callable[[AuthRefused], None] | None = None,
    ) -> None:
        """One endpoint's processor. By default its outage watch is the run's, the run's stop
        ends its retries, an outage stops the run and a refused key stops it (exit 4); a run
        of several endpoints (`fleet.py`) gives each endpoint its own watch, a stop of its own
        (set when the run stops or the endpoint is taken out) and callbacks that take the
        endpoint out instead."""
        self.state = state
        self.config = state.config
        self.client = client
        self.pacer = pacer
        self.outage = state.outage if outage is None else outage
        self.stop_event = state.stop_event if stop_event is None else stop_event
        self._on_outage = state.stop_for_outage if on_outage is None else on_outage
        self._on_refused = state.refused if on_refused is None else on_refused
        self._outage_timer: asyncio.TimerHandle | None = None  # the unreachable window's end

    def close(self) -> None:
        """Cancel the outage check still waiting (the dispatch is over)."""
        if self._outage_timer is not None:
            self._outage_timer.cancel()
            self._outage_timer = None

    async def process(self, row: Row) -> Sent | None:
        body = row.body
        assert body is not None
        model = row.model
        estimate, prompt_bound = _prompt_tokens(body)
        completion_bound = _completion_bound(body)
        tokens_estimate = estimate + (
            completion_bound if completion_bound is not None else int(self.state.completion_guess)
        )
        attempts = 0
        started = time.perf_counter()
        no_answer = True  # every attempt so far got no answer: a timeout, no connection, a 5xx

        async def send() -> Answer:
            nonlocal attempts, started, reserved, no_answer
            if self.stop_event.is_set():
                raise Abandon()
            reserved = await self._reserve_budget(model, prompt_bound, completion_bound)
            await self.state.gate.admit()  # at most one checkpoint interval waits to be durable
            if self.stop_event.is_set():
                if self.state.budget is not None:
                    self.state.budget.settle(reserved, 0.0)
                raise Abandon()
            attempts += 1
            started = time.perf_counter()
            try:
                with self.state.gate.sending():
                    answer = await self._attempt(body, tokens_estimate)
            except BaseException as exc:
                if not _got_no_answer(exc):
                    no_answer = False
                if self.state.budget is not None:
                    # An answer cut short may still be billed: count the worst case.
                    maybe = isinstance(exc, _MAYBE_BILLED) and _reached_gateway(exc)
                    self.state.budget.settle(reserved, None if maybe else 0.0)
                raise
            no_answer = False
            return answer

        async def answered() -> Result:  # one answer, to check against the schema
            answer = await call_with_retries(
                send, self.config.max_attempts, sleep=self._retry_sleep
            )
            return self._ok_result(row, answer, attempts, reserved)

        reserved = 0.0
        result: Result | None = None
        try:
            if self.state.schema is not None:
                try:
                    checked = await ask_until_valid(
                        answered, self.state.schema, self.config.invalid_retries, names_function(body)
                    )
                except ReaskStopped as stopped:  # answers paid for are kept, as a failed re-ask
                    checked = stopped.result
                    if isinstance(stopped.cause, AuthRefused):
                        self._on_refused(stopped.cause)
                result = dataclasses.replace(checked, attempts=attempts)  # a failed re-ask's too
                return Sent(result)
            answer = await call_with_retries(
                send, self.config.max_attempts, sleep=self._retry_sleep
            )
            result = self._ok_result(row, answer, attempts, reserved)
            return Sent(result)
        except Abandon:
            return None
        except AuthRefused as exc:
            self._on_refused(exc)
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
                return Sent(failed, failure_key=(exc.http_status, exc.code))
            # with no answer on any attempt: held back, pending if the gateway is down
            return Sent(failed, no_answer=no_answer)
        finally:
            if self.state.cache is not None:  # stores an answer it may; forgets its key anyway
                self.state.cache.offer(row, result)

    async def _attempt(self, body: dict[str, Any], tokens_estimate: int) -> Answer:
        async with self.pacer.slot(tokens_estimate) as slot:
            try:
                answer = await self.client.complete(body)
            except BaseException as exc:
                self._attempt_failed(exc)
                if isinstance(exc, RateLimited):
                    slot.rate_limited(exc.retry_after, exc.rate_headers)
                elif isinstance(exc, RequestError):
                    slot.failed()
                raise
            self.state.tally.sent += 1
            self.outage.answered()
            slot.succeeded(answer.usage.total_tokens, answer.rate_headers)
            return answer

    def _attempt_failed(self, exc: BaseException) -> None:
        """Count a failed attempt: sent or not, timed out after sending, the gateway reached."""
        if isinstance(exc, GatewayUnreachable):  # never reached the gateway: not sent
            if self.outage.unreachable(exc):
                self._on_outage()
            elif self._outage_timer is None:
                self._check_outage_later()
            return
        if isinstance(exc, AttemptTimeout):
            if exc.sent:  # the gateway had the request: it may have answered, and billed it
                self.state.tally.sent += 1
                self.state.tally.timed_out_after_sending += 1
            return
        self.state.tally.sent += 1  # an answer, a connection lost after sending, or cut off at a stop
        if getattr(exc, "http_status", None) is not None or isinstance(exc, AuthRefused):
            self.outage.answered()

    def _ok_result(self, row: Row, answer: Answer, attempts: int, reserved: float) -> Result:
        usage = answer.usage
        cost = self.state.prices.cost(
            row.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens or 0
        )
        if self.state.budget is not None:
            self.state.budget.settle(reserved, cost if cost is not None else 0.0)
        if usage.completion_tokens is not None:
            # A slow-moving mean of completion length, for tpm estimates without max_tokens.
            self.state.completion_guess += 0.05 * (usage.completion_tokens - self.state.completion_guess)
        return answer.result(
            index=row.index, id=row.id, model=row.model, cost_usd=cost, attempts=attempts
        )

    async def _reserve_budget(
        self, model: str | None, prompt_tokens: int, bound: int | None
    ) -> float:
        if self.state.budget is None:
            return 0.0
        if bound is None and "max_tokens" not in self.state.warned:
            self.state.warned.add("max_tokens")
            log.warning(
                "--max-cost without max_tokens: assuming at most %d completion tokens a request",
                BUDGET_MAX_TOKENS_GUESS,
            )
        worst = self.state.prices.worst_case(model, prompt_tokens, bound or BUDGET_MAX_TOKENS_GUESS)
        if worst is None:
            if model not in self.state.warned:
                self.state.warned.add(str(model))
                log.warning("no price for model %s: --max-cost cannot bound its spending", model)
            worst = 0.0
        if not await self.state.budget.acquire(worst):
            if "reached" not in self.state.warned:  # once a run, not once a worker
                self.state.warned.add("reached")
                if worst > self.state.budget.max_cost:  # no request of this size can ever fit
                    self.state.budget_note = _below_one_request(
                        self.state.budget.max_cost, worst, model, prompt_tokens, bound
                    )
                    log.warning("%s", self.state.budget_note)
                else:
                    log.warning(
                        "budget of $%.4f reached: no new requests are sent", self.config.max_cost
                    )
            self.state.control.stop("budget", EXIT_STOPPED)
            raise Abandon()
        return worst

    def _check_outage_later(self) -> None:
        """Check the outage when its window ends: the attempts after it may be far off (every
        row waiting out a backoff), and a gateway that refused everything for the whole window
        is unreachable then."""
        self._outage_timer = None
        delay = self.outage.seconds_to_check()
        if delay is None or self.stop_event.is_set():
            return
        if delay <= 0:  # the window is over: it trips now, or at the next attempt's failure
            if self.outage.check():
                self._on_outage()
            return
        loop = asyncio.get_running_loop()
        self._outage_timer = loop.call_later(max(delay, 0.05), self._check_outage_later)

    async def _retry_sleep(self, seconds: float) -> None:
        """tenacity's sleep: cut short when the run is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop_event.wait()


def _below_one_request(
    budget: float, worst: float, model: str | None, prompt_tokens: int, bound: int | None
) -> str:
    """Why a budget bought nothing: one request's worst case is more than all of it."""
    completion = (
        f"{bound:,} completion tokens (max_tokens)" if bound is not None
        else f"{BUDGET_MAX_TOKENS_GUESS:,} completion tokens, assumed as no max_tokens is set"
    )
    return (
        f"the --max-cost budget of ${budget:.4f} is below the worst case of one request: up to "
        f"${worst:.4f} for {model} ({prompt_tokens:,} prompt tokens at most and {completion}); "
        "nothing can be sent within it: set --max-tokens (a bound on each answer) or raise "
        "--max-cost"
    )


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
