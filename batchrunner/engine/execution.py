"""The run's state and its setup: scan, plan, pre-flight, cache, checkpoint, resumed counts.

`_Run` is one run; its other parts live in their own modules: `dispatch.py` (feeder, workers,
flusher, watchers), `processor.py` (one row: budget, pacing, client, retries, structured
re-asks) and `recorder.py` (results into the checkpoint, the end and the report). A feeder
streams rows from the input into a bounded queue; a fixed set of workers takes rows from it;
results are buffered and written to the checkpoint by one flusher task; when every row has a
result the output is assembled. Memory is proportional to the concurrency, not to the input.
The entry points (`arun`, `run`) and the choice of engine are in `runner.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any

from batchrunner.answers.scoring import Metric, check_reference_column, parse_metric
from batchrunner.answers.structured import load_schema
from batchrunner.cache.responses import request_hash
from batchrunner.cache.session import CacheSession
from batchrunner.config.pricing import PriceTable
from batchrunner.config.settings import RunConfig, resolve_api_key
from batchrunner.engine import preflight
from batchrunner.engine.dispatch import Dispatch
from batchrunner.engine.processor import RowProcessing
from batchrunner.engine.recorder import Recording, input_state
from batchrunner.engine.state import RunControl, RunReport, Tally
from batchrunner.engine.sweep import Sweep
from batchrunner.errors import AuthRefused, RequestError, UsageError
from batchrunner.inputs import rowhash
from batchrunner.inputs.columns import resolve_columns
from batchrunner.inputs.formats import detect_format
from batchrunner.inputs.readers import iter_column_batches, iter_records
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.inputs.scan import InputInfo, fingerprint_input, scan_input
from batchrunner.results import Result
from batchrunner.store.checkpoint import (
    Checkpoint,
    checkpoint_dir,
    open_checkpoint,
)
from batchrunner.store.durability import CheckpointWriter, DurabilityGate
from batchrunner.store.export import check_output, check_writable
from batchrunner.store.manifest import read_manifest
from batchrunner.transport.client import Client
from batchrunner.transport.limits import Budget, Deadline
from batchrunner.transport.pacing import Pacer

__all__ = ["ChangedInput", "check_models"]


log = logging.getLogger(__name__)

DEFAULT_COMPLETION_GUESS = 256  # tokens, for tpm pacing before any usage has come back
PREFLIGHT_ROWS = 10_000  # the models of this many first rows are checked before sending


ResultCallback = Callable[[Result, Tally], None]
StartCallback = Callable[[Tally], None]


class _Run(Dispatch, RowProcessing, Recording):
    """The state of one run and its setup; lives for one `arun` call."""

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
        self.outage = preflight.Outage(base_url)
        # id() of a failed Result whose every attempt got no answer, until it is recorded
        self._no_answer: set[int] = set()
        self._outage_timer: asyncio.TimerHandle | None = None  # the unreachable window's end
        # id() of a failed Result -> its non-retryable failure, until the result is recorded
        self._failure_keys: dict[int, preflight.FailureKey] = {}
        # id() of a sent row's Result -> the hashes of its body and of its input values
        self._held_hashes: dict[int, tuple[int | None, int | None]] = {}
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
        self._input_state: tuple[int, int] | None = None  # the input's size and mtime at start
        self.crash: BaseException | None = None  # the first task of the run that raised (a bug)
        self.auth_error: AuthRefused | None = None
        self.budget_note: str | None = None  # why the budget bought nothing, where it did not
        self.completion_guess = float(DEFAULT_COMPLETION_GUESS)
        self._warned_budget: set[str] = set()
        self.cache: CacheSession | None = None
        self.schema = load_schema(config.json_schema) if config.json_schema is not None else None

    def __repr__(self) -> str:
        return f"_Run({self.config.output})"

    # -- the run as a whole --------------------------------------------------------------

    async def execute(self) -> RunReport:
        config = self.config
        check_output(config.output)  # nothing is paid for that cannot be written
        if config.summary_json is not None:  # nor a run whose monitoring file cannot be
            check_writable(config.summary_json, what="--summary-json")
        deadline = self._deadline()
        if len(config.models) > 1:  # a sweep: rows are built for the first model, then each
            config = self.config = config.replace(model=config.models[0])
        self._input_state = input_state(config.input)  # compared at the end
        info = scan_input(config)
        if info.rows == 0:  # not an error (a nightly export can be empty), but said
            log.warning("%s: the input has no rows: nothing to send; the output is written "
                        "empty (exit 0)", config.input)
        builder = RequestBuilder(config, info.columns)
        self.id_column = resolve_columns(config, info.columns).id_column
        self.metric = _check_scoring(config, info.columns)
        self.sweep = Sweep.plan(config, info.columns, info.rows) if len(config.models) > 1 else None
        fingerprint = {
            "input": fingerprint_input(config.input),
            "settings": config.request_settings(),
        }
        self.tally.rows = self.sweep.total if self.sweep is not None else info.rows
        if config.preflight and not _finished_before(config.output):
            await self._check_models(builder)
        key_url = "batchrunner:local" if config.local else self.base_url  # --local: any port
        self.cache = CacheSession.open(config.cache, config.cache_mode, key_url)
        if self.cache is not None:
            self.cache.schema = self.schema  # a hit of a structured run must pass it too
        try:
            return await self._execute(config, info, builder, fingerprint, deadline)
        finally:
            if self.cache is not None:
                await self.cache.close()

    async def _execute(
        self,
        config: RunConfig,
        info: InputInfo,
        builder: RequestBuilder,
        fingerprint: dict[str, Any],
        deadline: Deadline | None,
    ) -> RunReport:
        total = self.sweep.total if self.sweep is not None else info.rows  # output rows
        # A sweep's checkpoint is numbered by slot, not input row: no incremental remapping.
        current = None if self.sweep is not None else ChangedInput(config, builder)
        with open_checkpoint(
            config.output, fingerprint, rows=total, restart=config.restart,
            current=current,
        ) as ckpt:
            self.writer = CheckpointWriter(ckpt)  # a failed write stops the run (exit 74)
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
        """The pre-flight: the run's models against GET /models, before anything is sent."""
        note = await check_models(self.config, builder, self.base_url, self._api_key)
        if note is not None:
            log.debug("pre-flight: %s", note)

    def _deadline(self) -> Deadline | None:
        """--deadline resolved now, and said: a time of day already past means tomorrow's."""
        if not self.config.deadline:
            return None
        deadline = Deadline.from_text(self.config.deadline, now=_wall_now())
        if deadline.tomorrow:  # likely not what was meant: said even with --quiet
            log.warning("--deadline %s: that time has passed today: sending %s",
                        self.config.deadline, deadline.text)
        else:
            log.info("--deadline %s: sending %s", self.config.deadline, deadline.text)
        return deadline

    def _count_resumed(self, ckpt: Checkpoint, *, retry_failed: bool) -> None:
        totals = ckpt.done_totals()
        tally = self.tally
        if not retry_failed:
            self._use_totals(totals)
        else:
            # Only the ok rows are kept; their figures are a lower bound shown until the end.
            tally.ok, tally.failed, tally.cost_usd = totals["ok"], 0, 0.0
        tally.resumed = tally.ok + tally.failed
        if self.budget is not None:
            self.budget.add_spent(totals["cost_usd"])


def _wall_now() -> datetime:
    """The local wall-clock time a deadline is resolved against (tests put in their own)."""
    return datetime.now()


def _check_scoring(config: RunConfig, columns: tuple[str, ...]) -> Metric | None:
    """The run's metric, checked with its reference column before anything is sent."""
    if config.score is None:
        return None
    metric = parse_metric(config.score)
    check_reference_column(columns, config.reference_column, str(config.input))
    return metric


def _finished_before(output: Path) -> bool:
    """True when a previous run finished this output (nothing is left to send)."""
    try:
        manifest = read_manifest(checkpoint_dir(output), missing_ok=True)
    except UsageError:  # an untrusted folder: the run refuses it, after this
        return False
    return bool(manifest and manifest.get("finished")) and output.exists()


class ChangedInput:
    """A changed input, as an incremental run compares it with the checkpoint (docs/resume.md).

    `rows()` gives every row's id and the hash of its input values (`rowhash`), a batch at a
    time without building a request; for a JSONL input those hashes are None (its lines are
    parsed one by one anyway, and its bodies are hashed in the same pass). `body_hashes(rows)`
    builds the requests of just those rows and hashes them: the exact comparison, for the
    rows whose input values do not match.
    """

    def __init__(self, config: RunConfig, builder: RequestBuilder) -> None:
        self.config = config
        self.builder = builder
        self._bodies: Any = None  # a JSONL input's body hashes, from the pass of `rows`

    def rows(self) -> tuple[Any, Any]:
        import numpy as np
        import pyarrow as pa

        if detect_format(self.config.input) == "jsonl":
            ids, bodies = [], []
            for index, record, error in iter_records(
                self.config, columns=self.builder.columns
            ):
                row = self.builder.build(index, record, error)
                ids.append(row.id)
                bodies.append(0 if row.body is None else request_hash(row.body))
            self._bodies = np.array(bodies, dtype=np.int64)
            return pa.array(ids, pa.string()), None
        # Only the columns the requests read, and the ids (the scan refused missing ones).
        id_chunks: list[pa.Array] = [pa.array([], pa.string())]
        hash_chunks: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        for batch, ids in iter_column_batches(self.config, self.builder.columns):
            columns = [c for c in self.builder.columns if c in batch.schema.names]
            id_chunks.append(ids)
            hash_chunks.append(rowhash.input_hashes(batch, columns))
        return pa.concat_arrays(id_chunks), np.concatenate(hash_chunks)

    def body_hashes(self, wanted: Any) -> Any:
        """For each current row where `wanted` is True, its request body's hash (0 when it
        cannot be sent); 0 elsewhere."""
        import numpy as np

        if self._bodies is not None:
            return np.where(wanted, self._bodies, 0)
        hashes = np.zeros(len(wanted), dtype=np.int64)
        if not wanted.any():
            return hashes

        def skip(ids: Any, first: int) -> Any:
            return ~wanted[first:first + len(ids)]

        for index, record, error in iter_records(
            self.config, columns=self.builder.columns, skip=skip
        ):
            if index < len(wanted) and wanted[index]:
                row = self.builder.build(index, record, error)
                hashes[index] = 0 if row.body is None else request_hash(row.body)
        return hashes


async def check_models(
    config: RunConfig, builder: RequestBuilder, base_url: str, api_key: str | None
) -> str | None:
    """The run's models against GET /models: UsageError (exit 2) for one the gateway lacks.

    The models are --model and those the first PREFLIGHT_ROWS rows ask for (a `model` column,
    Batch API bodies). A gateway that does not answer is not an error: then the reason the
    models were not checked is returned (None when they were).
    """
    models = _run_models(config, builder)
    if not models:
        return None
    key = api_key
    if not key:  # a driver that holds no key (the Ray engine's) asks with the job's own
        try:
            key = resolve_api_key(config.api_key_env)
        except UsageError as exc:
            return str(exc)
    try:
        async with Client(base_url, key, concurrency=1, timeout=min(config.timeout, 30)) as client:
            listed = await client.models()
    except (RequestError, AuthRefused) as exc:
        return f"GET /models did not answer ({exc})"
    preflight.check_models(models, listed)
    return None


def _run_models(config: RunConfig, builder: RequestBuilder) -> set[str]:
    models = {config.model} if config.model else set()
    models.update(config.models)  # a sweep's
    plan = resolve_columns(config, builder.columns)
    if plan.model_column is None and not plan.batch_api:
        return models
    records = iter_records(config, columns=builder.columns)
    for index, record, error in records:
        if index >= PREFLIGHT_ROWS:
            break
        model = builder.build(index, record, error).model
        if isinstance(model, str):
            models.add(model)
    return models
