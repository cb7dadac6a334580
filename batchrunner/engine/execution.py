"""One run, put together: its setup, its parts, and the order they act in.

`Run` scans the input, plans the rows (a sweep's slots too), runs the pre-flight, opens the
response cache and the checkpoint, and then hands the rows still to send (`feed.py`) to a
dispatcher (`dispatch.py`: the seam; the local one by default, the Ray one from
`ray/driver.py`, the Batch API's from `batch/dispatcher.py`) with the recorder (`recorder.py`) that keeps what comes back. When every
row has a result the output is assembled (`ending.py`). The parts share one `RunState`
(`shared.py`). Memory is proportional to the concurrency, not to the input. The entry points
(`arun`, `run`) and the choice of engine are in `runner.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from batchrunner.answers.scoring import Metric, check_reference_column, parse_metric
from batchrunner.answers.structured import load_schema
from batchrunner.cache.responses import request_hash
from batchrunner.cache.session import CacheSession
from batchrunner.config.settings import RunConfig, resolve_api_key
from batchrunner.engine import preflight
from batchrunner.engine.dispatch import Dispatcher, LocalDispatcher
from batchrunner.engine.ending import Ending, finish, input_state, use_totals
from batchrunner.engine.feed import pending_rows, rows_to_send
from batchrunner.engine.fleet import Fleet
from batchrunner.engine.order import PrefixOrder
from batchrunner.engine.recorder import Recorder, ResultCallback
from batchrunner.engine.shared import RunState
from batchrunner.engine.state import RunControl, RunReport, Tally
from batchrunner.engine.sweep import Sweep
from batchrunner.errors import AuthRefused, RequestError, UsageError
from batchrunner.inputs import rowhash
from batchrunner.inputs.columns import resolve_columns
from batchrunner.inputs.formats import detect_format
from batchrunner.inputs.prefixes import prefix_key
from batchrunner.inputs.readers import iter_column_batches, iter_records
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.inputs.scan import InputInfo, fingerprint_input, scan_input
from batchrunner.results import Row
from batchrunner.store.checkpoint import Checkpoint, checkpoint_dir, open_checkpoint
from batchrunner.store.export import check_output, check_writable
from batchrunner.store.manifest import read_manifest
from batchrunner.transport.client import Client
from batchrunner.transport.limits import Deadline

__all__ = [
    "ChangedInput", "DispatcherFactory", "ResultCallback", "Run", "StartCallback", "check_models",
]


log = logging.getLogger(__name__)

PREFLIGHT_ROWS = 10_000  # the models of this many first rows are checked before sending


StartCallback = Callable[[Tally], None]
#: Makes the run's dispatcher once its state and deadline are known.
DispatcherFactory = Callable[[RunState, "Deadline | None"], Dispatcher]


class Run:
    """One run of a job against one gateway; lives for one `arun` call."""

    def __init__(
        self,
        config: RunConfig,
        base_url: str,
        api_key: str,
        on_result: ResultCallback | None,
        control: RunControl,
        on_start: StartCallback | None = None,
        dispatcher: DispatcherFactory | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        """`fleet`: a run of several endpoints (`fleet.py`): its pre-flight asks each, its
        dispatcher shares the rows out, its response cache serves them all with one key."""
        self.state = RunState.for_run(config, base_url, control)
        if config.json_schema is not None:
            self.state.schema = load_schema(config.json_schema)
        self.on_result = on_result
        self.on_start = on_start
        self._api_key = api_key
        self._dispatcher = dispatcher or (
            lambda state, deadline: LocalDispatcher(state, api_key, deadline)
        )
        self._fleet = fleet
        if fleet is not None:  # several endpoints: the fleet makes the dispatcher
            self._dispatcher = fleet
        self.ending = Ending()

    def __repr__(self) -> str:
        return f"Run({self.state.config.output})"

    async def execute(self) -> RunReport:
        state = self.state
        config = state.config
        check_output(config.output)  # nothing is paid for that cannot be written
        if config.summary_json is not None:  # nor a run whose monitoring file cannot be
            check_writable(config.summary_json, what="--summary-json")
        deadline = self._deadline()
        if len(config.models) > 1:  # a sweep: rows are built for the first model, then each
            config = state.config = config.replace(model=config.models[0])
        self.ending.input_state = input_state(config.input)  # compared at the end
        info = scan_input(config)
        if info.rows == 0:  # not an error (a nightly export can be empty), but said
            log.warning("%s: the input has no rows: nothing to send; the output is written "
                        "empty (exit 0)", config.input)
        builder = RequestBuilder(config, info.columns)
        self.ending.id_column = resolve_columns(config, info.columns).id_column
        self.ending.metric = _check_scoring(config, info.columns)
        if len(config.models) > 1:
            self.ending.sweep = Sweep.plan(config, info.columns, info.rows)
        fingerprint = {
            "input": fingerprint_input(config.input),
            "settings": config.request_settings(),
        }
        sweep = self.ending.sweep
        state.tally.rows = sweep.total if sweep is not None else info.rows
        if config.preflight and not _finished_before(config.output):
            await self._check_models(builder)
        key_url = "batchrunner:local" if config.local else state.base_url  # --local: any port
        if self._fleet is not None:
            key_url = self._fleet.cache_url
        state.cache = CacheSession.open(config.cache, config.cache_mode, key_url)
        if state.cache is not None:
            state.cache.schema = state.schema  # a hit of a structured run must pass it too
        try:
            return await self._execute(config, info, builder, fingerprint, deadline)
        finally:
            if state.cache is not None:
                await state.cache.close()

    async def _execute(
        self,
        config: RunConfig,
        info: InputInfo,
        builder: RequestBuilder,
        fingerprint: dict[str, Any],
        deadline: Deadline | None,
    ) -> RunReport:
        state = self.state
        sweep = self.ending.sweep
        total = sweep.total if sweep is not None else info.rows  # output rows
        # A sweep's checkpoint is numbered by slot, not input row: no incremental remapping.
        current = None if sweep is not None else ChangedInput(config, builder)
        with open_checkpoint(
            config.output, fingerprint, rows=total, restart=config.restart,
            current=current,
        ) as ckpt:
            # a failed write stops the run (exit 74)
            recorder = Recorder.for_checkpoint(state, ckpt, self.on_result)
            done = ckpt.done_set(retry_failed=config.retry_failed)
            self._count_resumed(ckpt, retry_failed=config.retry_failed)
            if len(done) < total or not ckpt.complete(total):
                state.control.bind(state.stop_event)
                if self.on_start is not None:
                    self.on_start(state.tally)
                rows = rows_to_send(state, recorder, pending_rows(config, builder, done, sweep))
                dispatcher = self._dispatcher(state, deadline)
                # --order prefix needs answers row by row (a dispatcher that sends blocks or
                # batches takes the rows in input order)
                if config.order == "prefix" and dispatcher.row_by_row:
                    order = PrefixOrder(
                        rows, _prefix_key, window=PrefixOrder.window_for(config.concurrency)
                    )
                    recorder.listen(order.answered)
                    rows = order.rows()
                async with recorder.checkpointing():
                    try:
                        await dispatcher.dispatch(rows, recorder)
                    finally:
                        await rows.aclose()
                        recorder.end_streaks()
            del done  # a million rows' ids: not needed to write the output
            if state.feed_error is not None:
                raise state.feed_error
            return finish(state, recorder, self.ending, ckpt, total, info.rows)

    async def _check_models(self, builder: RequestBuilder) -> None:
        """The pre-flight: the run's models against GET /models, before anything is sent."""
        state = self.state
        if self._fleet is not None:
            await self._fleet.check_models(state.config, _run_models(state.config, builder))
            return
        note = await check_models(state.config, builder, state.base_url, self._api_key)
        if note is not None:
            log.debug("pre-flight: %s", note)

    def _deadline(self) -> Deadline | None:
        """--deadline resolved now, and said: a time of day already past means tomorrow's."""
        config = self.state.config
        if not config.deadline:
            return None
        deadline = Deadline.from_text(config.deadline, now=_wall_now())
        if deadline.tomorrow:  # likely not what was meant: said even with --quiet
            log.warning("--deadline %s: that time has passed today: sending %s",
                        config.deadline, deadline.text)
        else:
            log.info("--deadline %s: sending %s", config.deadline, deadline.text)
        return deadline

    def _count_resumed(self, ckpt: Checkpoint, *, retry_failed: bool) -> None:
        totals = ckpt.done_totals()
        tally = self.state.tally
        if not retry_failed:
            use_totals(tally, totals)
        else:
            # Only the ok rows are kept; their figures are a lower bound shown until the end.
            tally.ok, tally.failed, tally.cost_usd = totals["ok"], 0, 0.0
        tally.resumed = tally.ok + tally.failed
        if self.state.budget is not None:
            self.state.budget.add_spent(totals["cost_usd"])


def _prefix_key(row: Row) -> int | None:
    """The hash of a row's cacheable prompt prefix (None: too short to be cached)."""
    return prefix_key(row.body) if row.body is not None else None


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
