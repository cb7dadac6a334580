"""The Ray engine's driver: the run, with its rows sent by Ray actors (`RayDispatcher`).

The run is the local engine's (`execution.Run`) with another dispatcher. Reading the input,
skipping finished rows, building requests, the response cache, the checkpoint, the output and
the summary are the run's, so the output has the same schema, order and content, and a job may
be resumed on either engine. The dispatcher cuts the rows still to send into blocks and hands
each to a free actor; an actor sends its block with a local dispatcher of its own and returns
the results, which the driver records and checkpoints as they come. Only finished blocks are ever written, so a killed actor costs
a retry of its block (Ray restarts the actor and runs the call again) and a killed driver,
run again, repeats at most the blocks that were in flight.

Limits are shared out so the totals hold: the concurrency is divided among the actors; the
actors are given the run's endpoints in turn (several keys on one base URL are several
endpoints), each endpoint's rpm and tpm divided among the actors that use it; the budget is handed out block by block from
what is left, never more in all than remains.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from batchrunner.config.endpoints import Endpoint
from batchrunner.config.settings import RunConfig, resolve_api_key, resolve_endpoints
from batchrunner.engine.endpoint import local_gateway
from batchrunner.engine.execution import ResultCallback, Run
from batchrunner.engine.ray.worker import BlockOutcome, BlockWorker, WorkerSettings
from batchrunner.engine.recorder import Recorder
from batchrunner.engine.shared import RunState
from batchrunner.engine.state import EXIT_AUTH, EXIT_STOPPED, RunControl, RunReport
from batchrunner.errors import AuthRefused, BatchrunnerError, UsageError
from batchrunner.results import Row
from batchrunner.transport.limits import Deadline

__all__ = ["RayDispatcher", "arun_on_ray"]

log = logging.getLogger(__name__)

MAX_BLOCK_ROWS = 2000  # a block is the unit of retry: small enough to redo, large to amortise
ACTOR_RESTARTS = 4  # a killed actor is restarted, and its block run again, this many times
_MIN_ALLOWANCE = 1e-9  # dollars: below this a block could not pay for one request


class ClusterError(BatchrunnerError):
    """The Ray cluster failed the run (an actor died more often than it is restarted)."""

    exit_code = 70


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--engine ray needs Ray: pip install 'batchrunner[ray]' "
            "(from a checkout: pip install -e '.[ray]')"
        ) from None
    return ray


async def arun_on_ray(
    config: RunConfig,
    *,
    on_result: ResultCallback | None = None,
    control: RunControl | None = None,
) -> RunReport:
    """`engine.arun` on a Ray cluster: `config.ray_address`, else RAY_ADDRESS, else local."""
    ray = _import_ray()
    control = control or RunControl()
    endpoints: tuple[Endpoint, ...] = ()
    if not config.local:
        # every endpoint's key variable must be set: a usage error before anything starts
        endpoints = resolve_endpoints(config)
        for e in endpoints:
            resolve_api_key(e.api_key_env)
    started_here = not ray.is_initialized()
    if started_here:
        with _signal_handlers_kept():
            ray.init(
                address=config.ray_address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )

    def on_ray(state: RunState, deadline: Deadline | None) -> RayDispatcher:
        return RayDispatcher(state, ray, deadline, endpoints)

    try:
        if config.local:
            async with local_gateway() as (base_url, _key):  # the driver holds no key
                return await Run(config, base_url, "", on_result, control,
                                 dispatcher=on_ray).execute()
        base_url = endpoints[0].base_url
        return await Run(config, base_url, "", on_result, control, dispatcher=on_ray).execute()
    finally:
        if started_here:
            ray.shutdown()


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep the run's Ctrl-C and SIGTERM handling: `ray.init` installs handlers of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


class RayDispatcher:
    """Blocks of rows to Ray actors; their results to the run's recorder."""

    row_by_row = False  # a block's answers come back together

    def __init__(
        self, state: RunState, ray: Any, deadline: Deadline | None,
        endpoints: tuple[Endpoint, ...] = (),
    ) -> None:
        """`endpoints`: the run's (resolved: limits filled); none: the run's base URL with
        the default key variables (`--local`: the simulator's)."""
        self.state = state
        self.config = state.config
        self.base_url = state.base_url
        self.control = state.control
        self.stop_event = state.stop_event
        self.budget = state.budget
        self.tally = state.tally
        self.deadline = deadline
        self._ray = ray
        self.endpoints = endpoints or (Endpoint(state.base_url),)

    async def dispatch(self, rows: AsyncIterator[Row], recorder: Recorder) -> None:
        actors = self._start_actors()
        try:
            await self._drive(rows, recorder, actors)
        finally:
            for actor in actors:
                with contextlib.suppress(Exception):
                    self._ray.kill(actor)

    # -- actors ----------------------------------------------------------------------------

    def _actor_count(self) -> int:
        config = self.config
        if config.ray_actors is not None:
            wanted = config.ray_actors
        else:
            wanted = max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        return max(1, min(wanted, config.concurrency))  # each actor has a request in flight

    def _start_actors(self) -> list[Any]:
        """Actors given endpoints in turn, each with its share of its endpoint's limits.

        Several key variables on one base URL (`--api-key-env KEY_A,KEY_B`) are several
        endpoints too (`resolve_endpoints`): each key's rpm and tpm are divided among the
        actors that use it. The concurrency is the run's, divided among all actors, unless
        the endpoints declare their own: then each endpoint's among its actors.
        """
        config = self.config
        count = self._actor_count()
        endpoints = self.endpoints
        chosen = [i % len(endpoints) for i in range(count)]
        sharing = collections.Counter(chosen)
        own_concurrency = any(e.concurrency is not None for e in config.endpoints)
        several = len(endpoints) > 1
        remote = self._ray.remote(BlockWorker).options(
            num_cpus=0.5, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
            max_concurrency=4,  # `stop` must get through while `process` runs
        )
        actors = []
        for i, which in enumerate(chosen):
            endpoint, share = endpoints[which], sharing[which]
            rpm = config.rpm if endpoint.rpm is None else endpoint.rpm
            tpm = config.tpm if endpoint.tpm is None else endpoint.tpm
            if own_concurrency and endpoint.concurrency is not None:
                nth = chosen[:i].count(which)
                concurrency = endpoint.concurrency // share + (nth < endpoint.concurrency % share)
            else:
                concurrency = config.concurrency // count + (i < config.concurrency % count)
            settings = WorkerSettings(
                config=config,
                base_url=endpoint.base_url,
                key_env=None if config.local else endpoint.api_key_env,
                local=config.local,
                concurrency=max(1, concurrency),
                rpm=None if rpm is None else rpm / share,
                tpm=None if tpm is None else tpm / share,
                endpoint=endpoint.name if several else None,
            )
            actors.append(remote.remote(settings))
        log.info("ray: %d actors, %d endpoint(s)", count, len(sharing))
        return actors

    # -- blocks ----------------------------------------------------------------------------

    async def _blocks(self, rows: AsyncIterator[Row], size: int) -> AsyncIterator[list[Row]]:
        """The rows to send (a sweep's slots too), in blocks of `size`."""
        block: list[Row] = []
        async for row in rows:
            block.append(row)
            if len(block) >= size:
                yield block
                block = []
        if block:
            yield block

    def _block_size(self, actors: int) -> int:
        pending = max(1, self.tally.rows - self.tally.resumed)
        return max(1, min(MAX_BLOCK_ROWS, math.ceil(pending / (4 * actors))))

    async def _drive(
        self, rows: AsyncIterator[Row], recorder: Recorder, actors: list[Any]
    ) -> None:
        """Keep every actor busy with a block until the rows run out or the run stops."""
        deadline = self.deadline
        blocks = self._blocks(rows, self._block_size(len(actors)))
        again: collections.deque[list[Row]] = collections.deque()  # rows a stopped block left
        free = list(range(len(actors)))
        in_flight: dict[asyncio.Future[Any], tuple[int, list[Row], float]] = {}
        left = None if self.budget is None else self.budget.max_cost - self.budget.spent
        told_to_stop = False
        stop_wait = asyncio.ensure_future(self.stop_event.wait())
        try:
            while True:
                while free and not self.stop_event.is_set():
                    if deadline is not None and deadline.remaining() <= 0:
                        log.warning("deadline reached: no new requests are sent")
                        self.control.stop("deadline", EXIT_STOPPED)
                        break
                    allowance = None
                    if left is not None:
                        allowance = left / len(free)
                        if allowance < _MIN_ALLOWANCE:
                            break
                    block = again.popleft() if again else await anext(blocks, None)
                    if block is None:
                        break
                    slot = free.pop()
                    remaining = None if deadline is None else deadline.remaining()
                    ref = actors[slot].process.remote(block, allowance, remaining)
                    in_flight[asyncio.wrap_future(ref.future())] = (slot, block, allowance or 0)
                    if left is not None:
                        left -= allowance or 0
                if not in_flight:
                    if left is not None and left < _MIN_ALLOWANCE and not self.stop_event.is_set():
                        self._budget_reached()
                    return
                finished, _ = await asyncio.wait(
                    [*in_flight, stop_wait], return_when=asyncio.FIRST_COMPLETED
                )
                if self.stop_event.is_set() and not told_to_stop:
                    told_to_stop = True
                    reason = self.control.reason or "interrupted"
                    code = self.control.exit_code or EXIT_STOPPED
                    for slot, _block, _a in in_flight.values():
                        actors[slot].stop.remote(reason, code)
                for future in finished:
                    if future is stop_wait:
                        continue
                    slot, block, allowance = in_flight.pop(future)
                    results, outcome = self._block_result(future)
                    self._record(recorder, block, results)
                    self.tally.sent += outcome.sent
                    if left is not None:
                        left += max(0.0, allowance - outcome.cost_usd)
                    self._settle(outcome, block, results, again)
                    free.append(slot)
        finally:
            stop_wait.cancel()

    def _record(self, recorder: Recorder, block: list[Row], results: list[Any]) -> None:
        """A block's results into the run, each with its body's hash, as the local engine
        does; the response cache stores what it may, and forgets the rows with no answer."""
        cache = self.state.cache
        by_index = {result.index: result for result in results}
        for row in block:
            result = by_index.get(row.index)
            if cache is not None:
                cache.offer(row, result)
            if result is not None:
                recorder.record(result, body=row.body)

    def _block_result(self, future: asyncio.Future[Any]) -> tuple[list[Any], BlockOutcome]:
        try:
            return future.result()
        except self._ray.exceptions.RayActorError as exc:
            self.control.stop("crashed", ClusterError.exit_code)
            raise ClusterError(
                f"a Ray actor died {ACTOR_RESTARTS + 1} times on one block ({type(exc).__name__}); "
                "finished blocks are checkpointed: run the same command again to go on"
            ) from None

    def _settle(
        self,
        outcome: BlockOutcome,
        block: list[Row],
        results: list[Any],
        again: collections.deque[list[Row]],
    ) -> None:
        """Act on how a block ended: stop the run where the block's run stopped for good."""
        code, reason = outcome.exit_code, outcome.reason
        if code in (0, 1):
            return
        if code == EXIT_AUTH:
            self.state.refused(AuthRefused(outcome.message))
        elif reason == "budget":
            # This block's share ran out: the rows it left wait for a share of what is left,
            # and when a whole share bought nothing, the budget is spent.
            answered = {r.index for r in results}
            rest = [row for row in block if row.index not in answered]
            if rest:
                again.append(rest)
            if not results:
                self._budget_reached()
        elif reason in ("interrupted", "terminated", "deadline"):
            return  # the driver asked for it, or the deadline passed: the run is stopping
        elif code == 2:
            self.control.stop("usage", 2)
            raise UsageError(outcome.message)
        else:
            if reason == "outage" and self.state.outage.cause is None:
                self.state.outage.cause = outcome.message  # the gateway is unreachable or down
            self.control.stop(reason, code)

    def _budget_reached(self) -> None:
        if not self.control.stopping:
            log.warning("budget of $%.4f reached: no new requests are sent", self.config.max_cost)
            self.control.stop("budget", EXIT_STOPPED)
