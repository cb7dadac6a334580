"""The pipeline of one run: read -> skip done -> build -> dispatch -> checkpoint -> output.

The one module that knows the whole run. A feeder streams rows from the input into a bounded
queue; a fixed set of workers takes rows from it, each row going through the retry policy and
the pacer to the client; results are buffered and written to the checkpoint by one flusher
task; when every row has a result the output is assembled. Memory is proportional to the
concurrency, not to the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import inputs, preflight, storage
from .cache import LOOKUP_ROWS, CacheSession, request_hash
from .checkpoint import Checkpoint, DoneSet, checkpoint_dir
from .client import Answer, Client
from .config import RunConfig, resolve_api_key, resolve_base_url
from .errors import (
    AttemptTimeout,
    AuthRefused,
    ConnectionFailed,
    InvalidResponse,
    PermanentError,
    RateLimited,
    RequestError,
    RetryableError,
    StorageError,
    UsageError,
)
from .openfiles import ensure_room_for
from .export import check_output
from .failures import ErrorCount
from .limits import Budget, Deadline, parse_deadline
from .pacing import Pacer
from .pricing import PriceTable
from .requests import CHARS_PER_TOKEN, MESSAGE_TOKENS, REPLY_TOKENS, RequestBuilder
from .results import Result, Row
from .retry import call_with_retries
from .scoring import Metric, TableScorer, check_reference_column, parse_metric, score_results
from .sweep import Sweep, sweep_rows
from .durability import CheckpointWriter, DurabilityGate, open_checkpoint
from .structured import ask_until_valid, load_schema

__all__ = ["RunControl", "RunReport", "Tally", "arun", "run"]

log = logging.getLogger(__name__)

FLUSH_SECONDS = 2.0  # at most this much finished work waits for the next checkpoint write
STOP_GRACE_SECONDS = 5.0  # in-flight requests get this long to finish after Ctrl-C or a deadline
DEFAULT_COMPLETION_GUESS = 256  # tokens, for tpm pacing before any usage has come back
BUDGET_MAX_TOKENS_GUESS = 4096  # worst case per request for --max-cost when max_tokens is unset

EXIT_OK, EXIT_ROW_ERRORS, EXIT_AUTH, EXIT_STOPPED = 0, 1, 4, 5
EXIT_SYSTEMATIC = 3  # every answered row failed the same way (SPEC section 6)
PREFLIGHT_ROWS = 10_000  # the models of this many first rows are checked before sending
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


@dataclass
class Tally:
    """Running counts of a run, read by progress displays (mutated only by the engine)."""

    rows: int = 0
    resumed: int = 0
    ok: int = 0
    failed: int = 0
    sent: int = 0  # HTTP attempts this session
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0  # paid: what the response cache served is in reused_cost_usd
    started: float = dataclasses.field(default_factory=time.monotonic)
    cache_hits: int = 0
    reused_cost_usd: float = 0.0

    @property
    def done(self) -> int:
        """Rows with a result, resumed ones included."""
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def add(self, result: Result) -> None:
        """Count one result."""
        if result.ok:
            self.ok += 1
        else:
            self.failed += 1
        usage = result.usage
        self.prompt_tokens += usage.prompt_tokens or 0
        self.completion_tokens += usage.completion_tokens or 0
        self.cached_tokens += usage.cached_tokens or 0
        self.total_tokens += usage.total_tokens or 0
        if result.cache_hit:
            self.cache_hits += 1
            self.reused_cost_usd += result.cost_usd or 0.0
        else:
            self.cost_usd += result.cost_usd or 0.0


@dataclass(frozen=True)
class RunReport:
    """How a run ended: the figures of SPEC section 13 and the exit code of section 11."""

    exit_code: int
    reason: str  # complete, budget, deadline, interrupted, terminated, auth
    output: Path
    rows: int
    ok: int
    failed: int
    resumed: int
    sent: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost_usd: float
    wall_seconds: float
    message: str = ""
    errors: tuple[ErrorCount, ...] = ()  # the most frequent errors, most first
    cache_hits: int = 0  # rows served from the response cache, this run and earlier ones
    reused_cost_usd: float = 0.0  # what they cost when first paid (not in cost_usd)

    @property
    def pending(self) -> int:
        """Rows with no result yet (resumable)."""
        return max(0, self.rows - self.ok - self.failed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, as `--summary-json` writes it."""
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        data["pending"] = self.pending
        data["cost_usd"] = round(self.cost_usd, 10)
        data["reused_cost_usd"] = round(self.reused_cost_usd, 10)
        data["wall_seconds"] = round(self.wall_seconds, 3)
        data["errors"] = [e.to_dict() for e in self.errors]
        return data


class RunControl:
    """A handle to stop a run from outside: signals, a UI, a test."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.exit_code: int | None = None
        self._event: asyncio.Event | None = None

    def bind(self, event: asyncio.Event) -> None:
        """Attach to the running engine's stop event (done by the engine)."""
        self._event = event
        if self.reason is not None:
            event.set()

    def stop(self, reason: str, exit_code: int) -> None:
        """Ask the run to stop sending; the first reason given wins."""
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code
        if self._event is not None:
            self._event.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked."""
        return self.reason is not None


_MAYBE_BILLED = (AttemptTimeout, ConnectionFailed, InvalidResponse, asyncio.CancelledError)


class _Abandon(Exception):
    """A row given up without a result because the run is stopping; it stays pending."""


ResultCallback = Callable[[Result, Tally], None]
StartCallback = Callable[[Tally], None]


async def arun(
    config: RunConfig,
    *,
    on_result: ResultCallback | None = None,
    control: RunControl | None = None,
    on_start: StartCallback | None = None,
) -> RunReport:
    """Run a job to the end, or until stopped; return its RunReport.

    `on_start(tally)` is called once, as sending starts (resumed rows already counted);
    `on_result(result, tally)` once a row has a result.

    >>> report = await arun(RunConfig(input=Path("prompts.jsonl"),
    ...                               output=Path("out.parquet"), model="gpt-4o", local=True))
    >>> report.exit_code
    0
    """
    control = control or RunControl()
    if storage.is_uri(config.input) or storage.is_uri(config.output):
        # Object-store paths: the run works on local copies kept in step with the store.
        return await storage.staged_run(
            config,
            lambda local: arun(local, on_result=on_result, control=control, on_start=on_start),
        )
    if config.engine == "ray":
        from .distributed import arun_on_ray  # Ray is an extra: imported only when asked for

        return await arun_on_ray(config, on_result=on_result, control=control)
    if config.local:
        async with _local_gateway() as (base_url, key):
            return await _Run(config, base_url, key, on_result, control, on_start).execute()
    base_url = resolve_base_url(config.base_url)
    key = resolve_api_key(config.api_key_env)
    return await _Run(config, base_url, key, on_result, control, on_start).execute()


def run(
    config: RunConfig,
    *,
    on_result: ResultCallback | None = None,
    control: RunControl | None = None,
    handle_signals: bool = True,
    on_start: StartCallback | None = None,
) -> RunReport:
    """Synchronous `arun`: Ctrl-C and SIGTERM stop the run cleanly (exit 130 / 143).

    A second Ctrl-C exits at once; the checkpoint stays readable.
    """
    control = control or RunControl()

    async def main() -> RunReport:
        if handle_signals and threading.current_thread() is threading.main_thread():
            _install_signal_handlers(control)
        return await arun(config, on_result=on_result, control=control, on_start=on_start)

    with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
        return runner.run(main())


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency, but not on Windows).

    It takes about a sixth off the CPU each request costs (bench/README.md); nothing else
    changes, so its absence costs only speed.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _install_signal_handlers(control: RunControl) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(reason: str, code: int) -> None:
        if control.stopping and reason == "interrupted":
            log.warning(
                "interrupted again: quitting now, without waiting; what was checkpointed is "
                "kept: run the same command again to resume"
            )
            os._exit(code)  # the second Ctrl-C: leave now; segments are fsynced per batch
        control.stop(reason, code)

    loop.add_signal_handler(signal.SIGINT, on_signal, "interrupted", EXIT_SIGINT)
    loop.add_signal_handler(signal.SIGTERM, on_signal, "terminated", EXIT_SIGTERM)


@contextlib.asynccontextmanager
async def _local_gateway() -> AsyncIterator[tuple[str, str]]:
    from .gateway import GatewayConfig, running_gateway  # server side: only for --local

    async with running_gateway(GatewayConfig(port=0)) as gateway:
        yield gateway.base_url, "sk-ru-local-" + secrets.token_hex(12)


class _Run:
    """The state of one run; lives for one `arun` call."""

    def __init__(
        self,
        config: RunConfig,
        base_url: str,
        api_key: str,
        on_result: ResultCallback | None,
        control: RunControl,
        on_start: StartCallback | None = None,
    ) -> None:
        self.on_start = on_start
        self.streak = preflight.FailureStreak()
        # id() of a failed Result -> its non-retryable failure, until the result is recorded
        self._failure_keys: dict[int, preflight.FailureKey] = {}
        self._held_hashes: dict[int, int | None] = {}  # id() of a sent row's Result -> its hash
        self.config = config
        self.base_url = base_url
        self._api_key = api_key
        self.on_result = on_result
        self.control = control
        self.tally = Tally()
        self.prices = PriceTable.load(config.prices)
        self.budget = Budget(config.max_cost) if config.max_cost is not None else None
        self.pacer = Pacer(config.concurrency, config.rpm, config.tpm)
        self.stop_event = asyncio.Event()
        self.flush_event = asyncio.Event()
        self.busy = 0  # rows being processed right now
        self.gate = DurabilityGate(config.checkpoint_every + config.concurrency)
        self._writes: list[Future[None]] = []  # checkpoint writes not yet known to succeed
        self.id_column: str | None = None
        self.metric: Metric | None = None
        self.sweep: Sweep | None = None
        self.feed_error: UsageError | None = None
        self.auth_error: AuthRefused | None = None
        self.completion_guess = float(DEFAULT_COMPLETION_GUESS)
        self._warned_budget: set[str] = set()
        self.cache: CacheSession | None = None
        self.schema = load_schema(config.json_schema) if config.json_schema is not None else None

    def __repr__(self) -> str:
        return f"_Run({self.config.output})"

    # -- the run as a whole --------------------------------------------------------------

    async def execute(self) -> RunReport:
        config = self.config
        check_output(config.output)  # nothing is paid for that cannot be written (SPEC 7)
        deadline = self._deadline()
        if len(config.models) > 1:  # a sweep: rows are built for the first model, then each
            config = self.config = config.replace(model=config.models[0])
        info = inputs.scan_input(config)
        builder = RequestBuilder(config, info.columns)
        self.id_column = inputs.resolve_columns(config, info.columns).id_column
        self.metric = _check_scoring(config, info.columns)
        self.sweep = Sweep.plan(config, info.columns, info.rows) if len(config.models) > 1 else None
        fingerprint = {
            "input": inputs.fingerprint_input(config.input),
            "settings": config.request_settings(),
        }
        self.tally.rows = self.sweep.total if self.sweep is not None else info.rows
        if config.preflight and not _finished_before(config.output):
            await self._check_models(builder)
        key_url = "batchrunner:local" if config.local else self.base_url  # --local: any port
        self.cache = CacheSession.open(config.cache, config.cache_mode, key_url)
        try:
            return await self._execute(config, info, builder, fingerprint, deadline)
        finally:
            if self.cache is not None:
                await self.cache.close()

    async def _execute(
        self,
        config: RunConfig,
        info: inputs.InputInfo,
        builder: RequestBuilder,
        fingerprint: dict[str, Any],
        deadline: Deadline | None,
    ) -> RunReport:
        total = self.sweep.total if self.sweep is not None else info.rows  # output rows
        # A sweep's checkpoint is numbered by slot, not input row: no incremental remapping.
        current = None if self.sweep is not None else (lambda: _current_rows(config, builder))
        with open_checkpoint(
            config.output, fingerprint, rows=total, restart=config.restart,
            current=current,
        ) as ckpt:
            self.writer = CheckpointWriter(ckpt)  # a failed write stops the run (SPEC 8)
            done = ckpt.done_set(retry_failed=config.retry_failed)
            self._count_resumed(ckpt, retry_failed=config.retry_failed)
            if len(done) < total or not ckpt.complete(total):
                self.control.bind(self.stop_event)
                if self.on_start is not None:
                    self.on_start(self.tally)
                await self._dispatch(ckpt, builder, done, deadline)
            del done  # a million rows' ids: not needed to write the output
            if self.feed_error is not None:
                raise self.feed_error
            return self._finish(ckpt, total, info.rows)

    async def _check_models(self, builder: RequestBuilder) -> None:
        """SPEC 6's pre-flight: the run's models against GET /models, before anything is sent.

        The models are --model and those the first PREFLIGHT_ROWS rows ask for (a `model`
        column, Batch API bodies); a gateway that does not answer is not an error.
        """
        models = self._run_models(builder)
        if not models:
            return
        key = self._api_key
        if not key:  # a driver that holds no key (the Ray engine's) asks with the job's own
            try:
                key = resolve_api_key(self.config.api_key_env)
            except UsageError:
                return
        try:
            async with Client(
                self.base_url, key, concurrency=1, timeout=min(self.config.timeout, 30)
            ) as client:
                listed = await client.models()
        except (RequestError, AuthRefused) as exc:
            log.debug("pre-flight: GET /models did not answer (%s); models not checked", exc)
            return
        preflight.check_models(models, listed)

    def _run_models(self, builder: RequestBuilder) -> set[str]:
        models = {self.config.model} if self.config.model else set()
        models.update(self.config.models)  # a sweep's
        plan = inputs.resolve_columns(self.config, builder.columns)
        if plan.model_column is None and not plan.batch_api:
            return models
        records = inputs.iter_records(self.config, columns=builder.columns)
        for index, record, error in records:
            if index >= PREFLIGHT_ROWS:
                break
            model = builder.build(index, record, error).model
            if isinstance(model, str):
                models.add(model)
        return models

    def _deadline(self) -> Deadline | None:
        return Deadline.from_text(self.config.deadline) if self.config.deadline else None

    def _count_resumed(self, ckpt: Checkpoint, *, retry_failed: bool) -> None:
        totals = ckpt.done_totals()
        tally = self.tally
        tally.ok = totals["ok"]
        tally.failed = 0 if retry_failed else totals["failed"]
        tally.resumed = tally.ok + tally.failed
        if not retry_failed:
            tally.prompt_tokens = totals["prompt_tokens"]
            tally.completion_tokens = totals["completion_tokens"]
            tally.cached_tokens = totals["cached_tokens"]
            tally.total_tokens = totals["total_tokens"]
            tally.cost_usd = totals["cost_usd"]
            tally.cache_hits = totals.get("cache_hits", 0)
            tally.reused_cost_usd = totals.get("reused_cost_usd", 0.0)
        else:
            # Only the ok rows are kept; their figures are a lower bound shown until the end.
            tally.cost_usd = 0.0
        if self.budget is not None:
            self.budget.add_spent(totals["cost_usd"])

    async def _dispatch(
        self, ckpt: Checkpoint, builder: RequestBuilder, done: DoneSet, deadline: Deadline | None
    ) -> None:
        config = self.config
        queue: asyncio.Queue[Row | None] = asyncio.Queue(maxsize=2 * config.concurrency)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        async with Client(
            self.base_url, self._api_key, concurrency=config.concurrency, timeout=config.timeout
        ) as client:
            self.client = client
            workers = [
                asyncio.create_task(self._worker(queue, ckpt)) for _ in range(config.concurrency)
            ]
            feeder = asyncio.create_task(self._feed(queue, ckpt, builder, done))
            flusher = asyncio.create_task(self._flush_loop(ckpt, executor))
            watchers = [asyncio.create_task(self._watch_stop(workers))]
            if deadline is not None:
                watchers.append(asyncio.create_task(self._watch_deadline(deadline)))
            try:
                outcomes = await asyncio.gather(*workers, return_exceptions=True)
                failures = [
                    o for o in outcomes
                    if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)
                ]
                if failures:
                    raise failures[0]
            finally:
                for task in (feeder, *workers, *watchers, flusher):
                    task.cancel()
                await asyncio.gather(feeder, *workers, *watchers, flusher, return_exceptions=True)
                for held in self.streak.release():  # a streak that did not trip: real results
                    self._record(ckpt, held, row_hash=self._held_hashes.pop(id(held), None))
                # The last write: everything that finished is made durable before we return.
                self._writes.append(executor.submit(self.writer.write, ckpt.take_batch()))
                self._writes.append(executor.submit(self.writer.last_attempt))
                executor.shutdown(wait=True)
                for write in self._writes:
                    write.result()  # a failed checkpoint write is an error, never a silent loss

    async def _feed(
        self,
        queue: asyncio.Queue[Row | None],
        ckpt: Checkpoint,
        builder: RequestBuilder,
        done: DoneSet,
    ) -> None:
        cached = self.cache is not None and self.cache.reads
        lookups: list[Row] = []
        # One batch is looked up (in the cache's thread) while the one before is served, so
        # that the workers never wait for the cache.
        looking: tuple[list[Row], asyncio.Future[Any]] | None = None
        try:
            for row in self._rows(builder, done):
                if self.stop_event.is_set():
                    return
                if row.body is None:  # an input error: recorded, never sent
                    self._record(ckpt, _input_error_result(row, row.model or self.config.model))
                    continue
                if cached:  # looked up in batches; only the misses are queued
                    lookups.append(row)
                    if len(lookups) >= LOOKUP_ROWS:
                        looking = await self._look_up(lookups, looking, queue, ckpt)
                        lookups = []
                    continue
                await queue.put(row)
            if lookups:
                looking = await self._look_up(lookups, looking, queue, ckpt)
            if looking is not None:
                await self._serve_cached(*looking, queue, ckpt)
                looking = None
        except UsageError as exc:  # the input broke part-way: keep what is done, stop
            self.feed_error = exc
            self.control.stop("input", exc.exit_code)
            return
        finally:
            if looking is not None:
                looking[1].cancel()
        for _ in range(self.config.concurrency):
            await queue.put(None)

    def _rows(self, builder: RequestBuilder, done: DoneSet) -> Iterator[Row]:
        """The rows still to send, in output order: of the input, or of the sweep's slots."""
        if self.sweep is None:
            return _rows_to_send(self.config, builder, done)
        return sweep_rows(self.config, builder, done, self.sweep)

    async def _look_up(
        self,
        rows: list[Row],
        previous: tuple[list[Row], asyncio.Future[Any]] | None,
        queue: asyncio.Queue[Row | None],
        ckpt: Checkpoint,
    ) -> tuple[list[Row], asyncio.Future[Any]]:
        """Start looking `rows` up, then serve the batch looked up before; return the new one."""
        assert self.cache is not None
        started = asyncio.ensure_future(self.cache.lookup(rows))
        if previous is not None:
            try:
                await self._serve_cached(*previous, queue, ckpt)
            except BaseException:
                started.cancel()
                raise
        return rows, started

    async def _serve_cached(
        self,
        rows: list[Row],
        lookup: asyncio.Future[Any],
        queue: asyncio.Queue[Row | None],
        ckpt: Checkpoint,
    ) -> None:
        """Record the rows the response cache holds; queue the others to be sent."""
        assert self.cache is not None
        answers, hashes = await lookup
        for row, answer, row_hash in zip(rows, answers, hashes):
            if self.stop_event.is_set():
                return
            if answer is not None:
                self._record(ckpt, self.cache.hit_result(row, answer), row_hash=row_hash)
            else:
                await queue.put(row)

    async def _worker(self, queue: asyncio.Queue[Row | None], ckpt: Checkpoint) -> None:
        while True:
            row = await queue.get()
            if row is None or self.stop_event.is_set():
                return
            self.busy += 1
            try:
                result = await self._process(row)
                if result is not None:
                    self._record_answer(ckpt, result, row.body)
            except Exception:
                self.control.stop("crashed", 70)  # a bug: stop the others, keep what is done
                raise
            finally:
                self.busy -= 1

    def _record_answer(
        self, ckpt: Checkpoint, result: Result, body: dict[str, Any] | None = None
    ) -> None:
        """Record a sent row's result, unless it extends a streak of identical failures."""
        key = self._failure_keys.pop(id(result), None)
        self._held_hashes[id(result)] = None if body is None else request_hash(body)
        was_tripped = self.streak.tripped
        for ready in self.streak.observe(result, key):
            self._record(ckpt, ready, row_hash=self._held_hashes.pop(id(ready), None))
        if self.streak.tripped and not was_tripped:
            log.warning(
                "stopping: the last %d answered rows all failed the same way: %s; "
                "no new requests are sent", self.streak.count, self.streak.error()
            )
            self.control.stop("systematic", EXIT_SYSTEMATIC)

    async def _flush_loop(self, ckpt: Checkpoint, executor: ThreadPoolExecutor) -> None:
        """Write the buffered results every `checkpoint_every` rows or FLUSH_SECONDS."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # lands as the event fires, and this task would then never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_SECONDS):
                    await self.flush_event.wait()
            self.flush_event.clear()
            batch = ckpt.take_batch()
            if batch is None:
                continue
            write = executor.submit(self.writer.write, batch)
            self._writes.append(write)
            # Shielded: cancelling this task at the end must not cancel a write whose rows
            # have already left the buffer (they would be lost); the end waits for it instead.
            await asyncio.shield(asyncio.wrap_future(write))
            self._writes = [w for w in self._writes if not w.done() or w.exception()]
            if self.writer.fault is not None:  # no new request from now on (SPEC 8)
                self.control.stop("storage", StorageError.exit_code)
                return
            self.gate.written(batch.num_rows)

    async def _watch_deadline(self, deadline: Deadline) -> None:
        await asyncio.sleep(deadline.remaining())
        log.warning("deadline reached: no new requests are sent")
        self.control.stop("deadline", EXIT_STOPPED)

    async def _watch_stop(self, workers: list[asyncio.Task[None]]) -> None:
        """Once a stop is asked, let in-flight rows finish (within a grace period), then end."""
        await self.stop_event.wait()
        if self.control.reason in ("interrupted", "terminated"):
            busy = self.busy
            waiting = (
                f"waiting for {busy} request{'s' if busy != 1 else ''} in flight "
                f"(at most {STOP_GRACE_SECONDS:g} s)" if busy else "no request in flight"
            )
            again = "; Ctrl-C again to quit now" if self.control.reason == "interrupted" else ""
            log.warning("stopping: %s%s", waiting, again)
        self.gate.release()
        if self.control.reason == "budget":
            grace = math.inf  # what is in flight is being paid for: let it finish
        elif self.control.reason == "auth":
            grace = 0.0
        else:
            grace = STOP_GRACE_SECONDS
        limit = time.monotonic() + grace
        while self.busy and time.monotonic() < limit:
            await asyncio.sleep(0.05)
        for task in workers:
            task.cancel()

    def _record(
        self,
        ckpt: Checkpoint,
        result: Result,
        body: dict[str, Any] | None = None,
        row_hash: int | None = None,
    ) -> None:
        if row_hash is None and body is not None:
            row_hash = request_hash(body)
        ckpt.append(result, row_hash)
        self.gate.received()
        self.tally.add(result)
        if ckpt.buffered >= self.config.checkpoint_every:
            self.flush_event.set()
        if self.on_result is not None:
            self.on_result(result, self.tally)

    # -- one row ---------------------------------------------------------------------------

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
                raise _Abandon()
            reserved = await self._reserve_budget(model, prompt_bound, completion_bound)
            await self.gate.admit()  # at most one checkpoint interval waits to be durable
            if self.stop_event.is_set():
                if self.budget is not None:
                    self.budget.settle(reserved, 0.0)
                raise _Abandon()
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
        try:
            if self.schema is not None:
                checked = await ask_until_valid(answered, self.schema, self.config.invalid_retries)
                return dataclasses.replace(checked, attempts=attempts)  # a failed re-ask's too
            answer = await call_with_retries(
                send, self.config.max_attempts, sleep=self._retry_sleep
            )
        except _Abandon:
            return None
        except AuthRefused as exc:
            self.auth_error = exc
            self.control.stop("auth", EXIT_AUTH)
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
        result = self._ok_result(row, answer, attempts, reserved)
        if self.cache is not None:
            self.cache.offer(row, result)
        return result

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
            raise _Abandon()
        return worst

    async def _retry_sleep(self, seconds: float) -> None:
        """tenacity's sleep: cut short when the run is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop_event.wait()

    # -- the end ---------------------------------------------------------------------------

    def _finish(self, ckpt: Checkpoint, rows: int, input_rows: int | None = None) -> RunReport:
        control = self.control
        complete = ckpt.complete(rows)
        reason = control.reason
        fault = self.writer.fault
        scorer = _scorer(self.metric, self.config.reference_column)
        if complete and reason != "auth" and fault is None and not ckpt.finished:
            # 32,768-row chunks: the peak of writing a million rows stays under 300 MB
            tables = inputs.iter_tables(self.config, batch_rows=32768)
            fault = self.writer.finalize(
                tables, rows if input_rows is None else input_rows, id_column=self.id_column,
                sweep=self.sweep, transform=scorer,
            )
            if scorer is not None and fault is None:
                scorer.warnings.warn(scorer.metric)
        elif complete and reason != "auth" and fault is None and scorer is not None:
            # finished before: scoring it again (another metric, say) costs no request
            score_results(self.config.output, scorer.metric, scorer.reference_column)
        if fault is not None:  # a write failed: whatever else stopped the run, this is exit 74
            self._use_totals(ckpt.done_totals())
            code, reason, message = StorageError.exit_code, "storage", self.writer.message(rows)
            self.writer.record(rows)
        elif complete and reason != "auth":
            self._use_totals(ckpt.done_totals())
            code = EXIT_OK if self.tally.failed == 0 else EXIT_ROW_ERRORS
            reason = "complete"
            message = ""
        else:
            self._use_totals(ckpt.done_totals())
            code = control.exit_code if control.exit_code is not None else EXIT_STOPPED
            reason = reason or "stopped"
            message = _stop_message(reason, self.auth_error)
            if reason == "systematic" and self.streak.tripped:
                message = self.streak.describe()
        report = RunReport(
            exit_code=code,
            reason=reason,
            output=self.config.output,
            rows=rows,
            ok=self.tally.ok,
            failed=self.tally.failed,
            resumed=self.tally.resumed,
            sent=self.tally.sent,
            prompt_tokens=self.tally.prompt_tokens,
            completion_tokens=self.tally.completion_tokens,
            cached_tokens=self.tally.cached_tokens,
            total_tokens=self.tally.total_tokens,
            cost_usd=self.tally.cost_usd,
            wall_seconds=self.tally.elapsed,
            message=message,
            errors=ckpt.top_errors(),
            cache_hits=self.tally.cache_hits,
            reused_cost_usd=self.tally.reused_cost_usd,
        )
        if self.config.summary_json is not None:
            summary = report.to_dict()
            if fault is not None:
                summary["storage_fault"] = self.writer.details(rows)
            try:
                write_summary_json(self.config.summary_json, summary)
            except OSError as exc:  # the monitoring file: said, but it changes no result
                note = f"cannot write --summary-json {self.config.summary_json}: {exc.strerror}"
                if fault is None:
                    log.warning("%s", note)
                else:  # the run ends with one line: keep it one
                    report = dataclasses.replace(report, message=f"{report.message}; {note}")
        return report

    def _use_totals(self, totals: dict[str, Any]) -> None:
        tally = self.tally
        tally.ok, tally.failed = totals["ok"], totals["failed"]
        tally.prompt_tokens = totals["prompt_tokens"]
        tally.completion_tokens = totals["completion_tokens"]
        tally.cached_tokens = totals["cached_tokens"]
        tally.total_tokens = totals["total_tokens"]
        tally.cost_usd = totals["cost_usd"]
        tally.cache_hits = totals.get("cache_hits", 0)
        tally.reused_cost_usd = totals.get("reused_cost_usd", 0.0)


def _check_scoring(config: RunConfig, columns: tuple[str, ...]) -> Metric | None:
    """The run's metric, checked with its reference column before anything is sent."""
    if config.score is None:
        return None
    metric = parse_metric(config.score)
    check_reference_column(columns, config.reference_column, str(config.input))
    return metric


def _scorer(metric: Metric | None, reference_column: str | None) -> TableScorer | None:
    if metric is None or reference_column is None:
        return None
    return TableScorer(metric, reference_column)
def _finished_before(output: Path) -> bool:
    """True when a previous run finished this output (nothing is left to send)."""
    try:
        manifest = json.loads((checkpoint_dir(output) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(manifest.get("finished")) and output.exists()


def write_summary_json(path: Path, report: RunReport | dict[str, Any]) -> None:
    """Write the final figures for monitoring, atomically."""
    data = report.to_dict() if isinstance(report, RunReport) else report
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _stop_message(reason: str, auth_error: AuthRefused | None) -> str:
    if reason == "auth":
        detail = f" ({auth_error})" if auth_error is not None else ""
        return f"the gateway refused the API key{detail}; finished rows are checkpointed"
    if reason == "budget":
        return "stopped at the --max-cost budget; run again with a larger budget to go on"
    if reason == "deadline":
        return "stopped at the --deadline; run the same command again to go on"
    if reason == "systematic":
        return (
            "stopped early: the answered rows all failed the same way; fix the cause and run "
            "the same command again"
        )
    return "interrupted; run the same command again to resume"


def _rows_to_send(config: RunConfig, builder: RequestBuilder, done: DoneSet) -> Iterator[Row]:
    """Rows with no checkpointed result, built into requests, lazily and in input order."""
    skip = done.mask if len(done) else None
    records = inputs.iter_records(config, columns=builder.columns, skip=skip)
    # iter_records skips finished Parquet and CSV rows in bulk; JSONL rows are checked here.
    one_by_one = skip is not None and inputs.detect_format(config.input) == "jsonl"
    for index, record, error in records:
        row = builder.build(index, record, error)
        if one_by_one and done.contains(index, row.id):
            continue
        yield row


def _current_rows(config: RunConfig, builder: RequestBuilder) -> tuple[Any, Any]:
    """Every row's id and request hash (0 where it cannot be sent), for an incremental run."""
    import numpy as np
    import pyarrow as pa

    id_chunks: list[pa.Array] = []
    hash_chunks: list[np.ndarray] = []
    ids: list[str] = []
    hashes: list[int] = []
    for index, record, error in inputs.iter_records(config, columns=builder.columns):
        row = builder.build(index, record, error)
        ids.append(row.id)
        hashes.append(0 if row.body is None else request_hash(row.body))
        if len(ids) >= 65536:  # columnar as it goes: no million Python strings at once
            id_chunks.append(pa.array(ids, pa.string()))
            hash_chunks.append(np.array(hashes, dtype=np.int64))
            ids, hashes = [], []
    id_chunks.append(pa.array(ids, pa.string()))
    hash_chunks.append(np.array(hashes, dtype=np.int64))
    return pa.concat_arrays(id_chunks), np.concatenate(hash_chunks)


def _input_error_result(row: Row, model: str | None) -> Result:
    return Result(
        index=row.index, id=row.id, status="error", model=model, attempts=0, error=row.error
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


def check_job(config: RunConfig) -> inputs.InputInfo:
    """Everything `run` checks before sending, without sending: the input, template, prices.

    Raises UsageError (or InputError) on the first problem; returns what the input holds.
    """
    if config.deadline:
        parse_deadline(config.deadline, datetime.now().astimezone())
    PriceTable.load(config.prices)
    check_output(config.output)
    if len(config.models) > 1:
        config = config.replace(model=config.models[0])
    if storage.is_uri(config.input):
        config = config.replace(input=storage.stage_input(str(config.input)))
    ensure_room_for(config.concurrency)  # the open-file limit, as the client checks it
    info = inputs.scan_input(config)
    RequestBuilder(config, info.columns)
    _check_scoring(config, info.columns)
    return info


async def list_models(
    *, base_url: str | None = None, api_key_env: str | None = None, local: bool = False
) -> list[dict[str, Any]]:
    """The models the gateway lists (GET /models)."""
    if local:
        async with _local_gateway() as (url, key):
            async with Client(url, key, concurrency=1, timeout=30) as client:
                return await client.models()
    async with Client(
        resolve_base_url(base_url), resolve_api_key(api_key_env), concurrency=1, timeout=30
    ) as client:
        return await client.models()
