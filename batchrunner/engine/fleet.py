"""Several endpoints: rows shared out among gateways, an endpoint that stops answering taken out.

A run that names several endpoints (docs/run.md, "Several endpoints") is the ordinary run with
this dispatcher. Each endpoint is a `Lane`: its own client (its own key, read by the name of
its variable), its own `Pacer` (concurrency, rpm, tpm, 429 pause, adaptive limit), its own
outage watch and its own `RowProcessor`, with as many worker tasks as its concurrency. The
rows wait in one shared queue (`SharedRows`) from which every lane's workers take them: a
faster endpoint, or one with higher limits, simply takes more.

An endpoint that stops answering is taken out of rotation: its outage trips (no connection for
TAKE_OUT_SECONDS, or a run of rows that got no answer: timeouts, 5xx), or it refuses its key
(401/403). The run says so once, naming the endpoint (never the key); the rows it had in flight
and those it held without an answer go back to the queue for the others (nothing about them is
recorded as failed); after COOL_DOWN_SECONDS it is tried again. When every endpoint is out, the
run stops as in an outage (exit 3, the rows pending), or, when every endpoint refused its key,
as a refused key (exit 4).

Pre-flight asks each endpoint's GET /models: a model an endpoint does not list is sent only to
those that list it (or do not list models at all); one that no endpoint lists is a usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from batchrunner.clock import SYSTEM_CLOCK, Clock
from batchrunner.config.endpoints import Endpoint
from batchrunner.config.settings import RunConfig
from batchrunner.engine import preflight
from batchrunner.engine.dispatch import LocalDispatcher
from batchrunner.engine.preflight import Outage
from batchrunner.engine.processor import RowProcessor, Sent
from batchrunner.engine.recorder import Recorder
from batchrunner.engine.shared import RunState
from batchrunner.engine.state import EXIT_SYSTEMATIC
from batchrunner.errors import AuthRefused, RequestError, UsageError
from batchrunner.results import Row
from batchrunner.transport.client import Client
from batchrunner.transport.limits import Deadline
from batchrunner.transport.pacing import Pacer

__all__ = ["COOL_DOWN_SECONDS", "TAKE_OUT_SECONDS", "Fleet", "FleetDispatcher", "SharedRows"]

log = logging.getLogger("batchrunner.engine.runner")

#: An endpoint taken out of rotation is tried again after this long.
COOL_DOWN_SECONDS = 30.0
#: No connection to an endpoint for this long (at least 3 attempts): it is taken out. Shorter
#: than a one-endpoint run's outage window: here the other endpoints take its rows meanwhile.
TAKE_OUT_SECONDS = 5.0


class Fleet:
    """The endpoints of a run of several, with their keys: the run's dispatcher factory.

    `Run(..., fleet=Fleet(endpoints, keys))`: the run checks its models with `check_models`,
    keys its response cache with `cache_url`, and makes its dispatcher by calling the fleet.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        keys: Sequence[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        cool_down: float | None = None,
    ) -> None:
        assert len(endpoints) == len(keys) and endpoints
        self.endpoints = tuple(endpoints)
        self._keys = tuple(keys)
        self.clock = clock
        self.cool_down = COOL_DOWN_SECONDS if cool_down is None else cool_down
        #: per endpoint, the model ids its GET /models lists (None: not asked, or no list)
        self.models: list[frozenset[str] | None] = [None] * len(self.endpoints)

    @property
    def cache_url(self) -> str:
        """The response cache's key for every endpoint of the run: their names, sorted.

        One key for all: an answer stored from any endpoint serves the same request whichever
        endpoint it would go to (the endpoints of one run are declared interchangeable: the
        same models behind them), and the same job run again hits whatever answered it."""
        return "endpoints:" + ",".join(sorted({e.name for e in self.endpoints}))

    def __call__(self, state: RunState, deadline: Deadline | None) -> FleetDispatcher:
        return FleetDispatcher(state, self, deadline)

    async def check_models(self, config: RunConfig, models: set[str]) -> None:
        """Each endpoint's GET /models: where each model may go; UsageError (exit 2) for one
        that no endpoint lists. An endpoint that does not answer or lists nothing may take
        any model."""
        if not models:
            return

        async def listed(endpoint: Endpoint, key: str) -> list[dict[str, Any]] | None:
            try:
                async with Client(
                    endpoint.base_url, key, concurrency=1, timeout=min(config.timeout, 30)
                ) as client:
                    return await client.models()
            except (RequestError, AuthRefused) as exc:
                log.debug("pre-flight: GET /models of %s did not answer (%s)", endpoint.name, exc)
                return None

        lists = await asyncio.gather(*(listed(e, k) for e, k in zip(self.endpoints, self._keys)))
        for i, data in enumerate(lists):
            ids = [str(m["id"]) for m in data or () if isinstance(m, dict) and m.get("id")]
            self.models[i] = frozenset(ids) if ids else None
        if any(m is None for m in self.models):
            return  # an endpoint that does not list models may serve any of them
        known = sorted(set().union(*(m for m in self.models if m is not None)))
        for model in sorted(models):
            where = [e.name for e, m in zip(self.endpoints, self.models) if m and model in m]
            if not where:
                close = preflight.closest_models(model, known)
                hint = f"; the closest: {', '.join(close)}" if close else ""
                raise UsageError(
                    f"model {model!r} is not one any endpoint lists (GET /models of each){hint}. "
                    "Nothing was sent; --no-preflight skips this check"
                )
            if len(where) < len(self.endpoints):
                log.info("model %s is sent only to %s (the endpoints that list it)",
                         model, ", ".join(where))


@dataclass(frozen=True)
class _Held:
    """A row an endpoint did not answer, held by its outage watch (what the watch reads)."""

    sent: Sent
    row: Row

    @property
    def ok(self) -> bool:
        return False

    @property
    def http_status(self) -> int | None:
        return self.sent.result.http_status

    @property
    def error(self) -> str | None:
        return self.sent.result.error


class Lane:
    """One endpoint of the run: its processor, its stop, whether it is in rotation."""

    def __init__(self, endpoint: Endpoint, processor: RowProcessor, clock: Clock) -> None:
        self.endpoint = endpoint
        self.name = endpoint.name
        self.label = self.name  # in messages; with its key's variable where names repeat
        self.processor = processor
        self.clock = clock
        self.concurrency = endpoint.concurrency or 1
        self.models: frozenset[str] | None = None
        self.out = False
        self.refused = False  # taken out for its key (401/403)
        self.cause: str | None = None
        self.warned = False
        self.back = asyncio.Event()  # set while in rotation
        self.back.set()

    @property
    def outage(self) -> Outage[_Held]:
        return self.processor.outage

    def new_outage(self) -> None:
        self.processor.close()
        self.processor.outage = Outage(
            self.endpoint.base_url, clock=self.clock, windows=(TAKE_OUT_SECONDS, TAKE_OUT_SECONDS)
        )


class SharedRows:
    """The rows waiting for a worker of any endpoint, at most `size` from the feed.

    A worker takes the first row its endpoint may send (`accepts(model)`); rows an endpoint
    gave back go to the front. It returns None when the feed is over, no row waits and none
    is being sent (a row being sent may yet come back), after `on_idle` had its say.
    """

    def __init__(self, size: int, *, wake_all: bool = False) -> None:
        self._rows: deque[Row] = deque()
        self._size = size
        self._wake_all = wake_all  # some endpoint takes only some models: every waiter looks
        self._room = asyncio.Event()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._fed = False
        self.taken = 0  # rows being sent
        self.over = False

    async def put(self, row: Row) -> None:
        while len(self._rows) >= self._size:
            self._room.clear()
            await self._room.wait()
        self._rows.append(row)
        self._wake(self._wake_all)

    def put_back(self, row: Row) -> None:
        self._rows.appendleft(row)
        self._wake(True)

    def end(self) -> None:
        self._fed = True
        self._wake(True)

    def done(self) -> None:
        self.taken -= 1
        if self.taken == 0 and self._fed:
            self._wake(True)

    async def get(self, accepts: Callable[[str | None], bool], on_idle: Callable[[], bool]) -> (
        Row | None
    ):
        while True:
            if self.over:
                return None
            for i, row in enumerate(self._rows):
                if accepts(row.model):
                    del self._rows[i]
                    self.taken += 1
                    if len(self._rows) <= self._size // 2:
                        self._room.set()
                    return row
            if self._fed and not self._rows and self.taken == 0 and not on_idle():
                self.over = True
                self._wake(True)
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _wake(self, everyone: bool) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return


class FleetDispatcher(LocalDispatcher):
    """Rows sent to several endpoints, each with its own workers, from one shared queue."""

    def __init__(self, state: RunState, fleet: Fleet, deadline: Deadline | None = None) -> None:
        super().__init__(state, "", deadline)
        self.fleet = fleet
        self.lanes: list[Lane] = []
        self._rows = SharedRows(1)
        self._recorder: Recorder | None = None
        self._retried: set[int] = set()  # rows already given another endpoint at the end
        self._timers: list[asyncio.Task[None]] = []
        self._known: frozenset[str] = frozenset()

    async def dispatch(self, rows: AsyncIterator[Row], recorder: Recorder) -> None:
        state = self.state
        config = state.config
        fleet = self.fleet
        self._recorder = recorder
        async with contextlib.AsyncExitStack() as stack:
            for endpoint, key, models in zip(fleet.endpoints, fleet._keys, fleet.models):
                concurrency = endpoint.concurrency or config.concurrency
                client = await stack.enter_async_context(Client(
                    endpoint.base_url, key, concurrency=concurrency, timeout=config.timeout
                ))
                index = len(self.lanes)
                processor = RowProcessor(
                    state, client, Pacer(concurrency, endpoint.rpm, endpoint.tpm),
                    stop_event=asyncio.Event(),
                    on_outage=lambda i=index: self._take_out(self.lanes[i]),
                    on_refused=lambda exc, i=index: self._refused(self.lanes[i], exc),
                )
                lane = Lane(dataclasses.replace(endpoint, concurrency=concurrency), processor,
                            fleet.clock)
                lane.models = models
                lane.new_outage()
                self.lanes.append(lane)
            names = Counter(lane.name for lane in self.lanes)
            for lane in self.lanes:
                if names[lane.name] > 1 and lane.endpoint.api_key_env:
                    lane.label = f"{lane.name} (key ${lane.endpoint.api_key_env})"
            self._known = frozenset().union(*(m for m in fleet.models if m is not None))
            total = sum(lane.concurrency for lane in self.lanes)
            state.gate.limit = config.checkpoint_every + total  # every endpoint's in flight
            self._rows = SharedRows(
                2 * total, wake_all=any(lane.models is not None for lane in self.lanes)
            )
            workers = [
                asyncio.create_task(self._lane_worker(lane, recorder))
                for lane in self.lanes for _ in range(lane.concurrency)
            ]
            feeder = asyncio.create_task(self._feed_shared(rows))
            relay = asyncio.create_task(self._relay_stop())
            try:
                await self._run_tasks(feeder, workers, relay)
            finally:
                for timer in self._timers:
                    timer.cancel()
                await asyncio.gather(*self._timers, return_exceptions=True)
                for lane in self.lanes:
                    lane.processor.close()

    async def _feed_shared(self, rows: AsyncIterator[Row]) -> None:
        async for row in rows:
            if self.state.stop_event.is_set():
                return
            await self._rows.put(row)
        self._rows.end()

    async def _relay_stop(self) -> None:
        """The run's stop ends every endpoint's retries."""
        await self.state.stop_event.wait()
        for lane in self.lanes:
            lane.processor.stop_event.set()
            lane.back.set()  # workers waiting for a cool-down end too
        self._rows.over = True
        self._rows.end()

    def _accepts(self, lane: Lane) -> Callable[[str | None], bool]:
        known = self._known

        def accepts(model: str | None) -> bool:
            return lane.models is None or model in lane.models or model not in known

        return accepts

    async def _lane_worker(self, lane: Lane, recorder: Recorder) -> None:
        stop_event = self.state.stop_event
        accepts = self._accepts(lane)
        while True:
            await lane.back.wait()
            if stop_event.is_set() or self._rows.over:
                return
            row = await self._rows.get(accepts, self._on_idle)
            if row is None:
                return
            self.busy += 1
            try:
                if stop_event.is_set():
                    continue  # not sent: stays pending
                sent = await lane.processor.process(row)
                self._settle(lane, row, sent, recorder)
            finally:
                self.busy -= 1
                self._rows.done()

    def _settle(self, lane: Lane, row: Row, sent: Sent | None, recorder: Recorder) -> None:
        """What becomes of a row an endpoint was given."""
        stopping = self.state.stop_event.is_set()
        if sent is None:
            if stopping:
                recorder.answered(row, None)  # given up: pending
            else:
                self._rows.put_back(row)  # its endpoint was taken out: another sends it
            return
        sent = dataclasses.replace(
            sent, result=dataclasses.replace(sent.result, endpoint=lane.name)
        )
        if sent.no_answer:
            if stopping:
                recorder.answered(row, None)
            elif lane.out:
                self._rows.put_back(row)
            elif lane.outage.hold(_Held(sent, row)):
                self._take_out(lane)
            return
        for held in lane.outage.release():  # it answered: those rows did fail
            recorder.record_answer(dataclasses.replace(held.sent, no_answer=False), held.row)
        recorder.record_answer(sent, row)

    def _on_idle(self) -> bool:
        """Every row is sent: rows an endpoint held without an answer get one more endpoint
        (True: some went back), then they are failed rows."""
        again = False
        for lane in self.lanes:
            for held in lane.outage.release():
                if held.row.index in self._retried or len(self.lanes) < 2:
                    assert self._recorder is not None
                    self._recorder.record_answer(
                        dataclasses.replace(held.sent, no_answer=False), held.row
                    )
                else:
                    self._retried.add(held.row.index)
                    self._rows.put_back(held.row)
                    again = True
        if not again:  # the rows are over: workers waiting for a cool-down end too
            for lane in self.lanes:
                lane.back.set()
        return again

    # -- taking an endpoint out, and back -------------------------------------------------

    def _refused(self, lane: Lane, exc: AuthRefused) -> None:
        lane.refused = True
        self._take_out(lane, f"it refused the API key ({exc})")

    def _take_out(self, lane: Lane, cause: str | None = None) -> None:
        state = self.state
        if lane.out or state.stop_event.is_set() or self._rows.over:
            return
        lane.out = True
        lane.cause = cause or lane.outage.cause or "it stopped answering"
        lane.processor.stop_event.set()  # its retries end; its rows come back
        lane.back.clear()
        for held in [*lane.outage.take_dropped(), *lane.outage.release()]:
            self._rows.put_back(held.row)
        if all(other.out for other in self.lanes):
            self._all_out()
            return
        if lane.warned:
            log.info("endpoint %s taken out again: %s", lane.label, lane.cause)
        else:
            lane.warned = True
            log.warning("endpoint %s taken out of rotation: %s; its rows go to the other "
                        "endpoints; tried again in %g s", lane.label, lane.cause,
                        self.fleet.cool_down)
        timer = asyncio.create_task(self._cool_down(lane))
        timer.add_done_callback(state.on_task_done)
        self._timers.append(timer)

    async def _cool_down(self, lane: Lane) -> None:
        await self.fleet.clock.sleep(self.fleet.cool_down)
        if self.state.stop_event.is_set():
            return
        lane.new_outage()
        lane.out = lane.refused = False
        lane.processor.stop_event.clear()
        lane.back.set()
        log.info("endpoint %s back in rotation", lane.label)

    def _all_out(self) -> None:
        """Every endpoint is out: the run stops, its rows pending (exit 4 if every endpoint
        refused its key, else exit 3)."""
        state = self.state
        causes = "; ".join(f"{lane.label}: {lane.cause}" for lane in self.lanes)
        if all(lane.refused for lane in self.lanes):
            state.refused(AuthRefused(f"every endpoint refused its key: {causes}"))
            return
        state.outage.cause = f"every endpoint is out ({causes})"
        log.warning("stopping: %s; no new requests are sent", state.outage.cause)
        state.control.stop("outage", EXIT_SYSTEMATIC)
