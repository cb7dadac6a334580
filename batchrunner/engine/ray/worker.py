"""One Ray actor: runs batchrunner's own engine on the blocks of rows the driver hands it.

A block arrives as built requests (`Row`s, whose bodies the driver made with the job's
settings). The actor writes them to a scratch folder as OpenAI Batch API lines, so the block
is an ordinary input to `engine._Run`: bounded concurrency, pacing, the shared 429 pause,
retries, the budget and the deadline all work in the actor exactly as on one machine. The
results come back to the driver, which alone writes the run's checkpoint and output.

The API key is read here, from the actor's own environment, by the *name* of its variable:
no key ever travels through Ray (its object store, its task arguments or its logs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from batchrunner.config.settings import RunConfig, resolve_api_key
from batchrunner.errors import BatchrunnerError
from batchrunner.results import Result, Row

__all__ = ["BlockOutcome", "BlockWorker", "LOCAL_KEY"]

#: The key actors send to the in-process simulator of `--local` (it takes any sk-ru- key):
#: a fixed, worthless value, so that not even a throwaway key goes through Ray.
LOCAL_KEY = "sk-ru-local-ray"


@dataclass(frozen=True)
class BlockOutcome:
    """How one block ended in an actor, besides its results."""

    exit_code: int
    reason: str
    message: str
    sent: int  # HTTP attempts made
    cost_usd: float  # spent on the block's results


@dataclass(frozen=True)
class WorkerSettings:
    """What one actor is given when it starts: its share of the limits and its key's name."""

    config: RunConfig
    base_url: str
    key_env: str | None  # None: the default variables; LOCAL_KEY is used when `local`
    local: bool
    concurrency: int
    rpm: float | None
    tpm: float | None


class BlockWorker:
    """The body of the Ray actor (made remote by the driver, so Ray stays an optional extra)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._control = None
        logging.getLogger("batchrunner").setLevel(logging.ERROR)  # the driver reports the run

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def stop(self, reason: str, exit_code: int) -> None:
        """Stop the block being processed: no new requests; in-flight ones get the grace."""
        if self._control is not None:
            self._control.stop(reason, exit_code)

    async def process(
        self, rows: list[Row], max_cost: float | None, deadline_seconds: float | None
    ) -> tuple[list[Result], BlockOutcome]:
        """Send a block's rows; return their results (row numbers of the whole input)."""
        from batchrunner.engine import (  # the engine is what an actor runs
            execution,
            state,
        )

        settings = self._settings
        try:
            key = LOCAL_KEY if settings.local else resolve_api_key(settings.key_env)
        except BatchrunnerError as exc:
            return [], BlockOutcome(exc.exit_code, "usage", str(exc), 0, 0.0)
        folder = Path(tempfile.mkdtemp(prefix="batchrunner-block-"))
        try:
            source = folder / "block.jsonl"
            with source.open("w", encoding="utf-8") as f:
                # Positions as ids: in a sweep a row's id repeats, once per model.
                for position, row in enumerate(rows):
                    f.write(json.dumps({"custom_id": str(position), "body": row.body}) + "\n")
            config = _block_config(settings, source, max_cost, deadline_seconds)
            results: list[Result] = []
            self._control = control = state.RunControl()
            run = execution._Run(
                config, settings.base_url, key, lambda r, _t: results.append(r), control
            )
            try:
                report = await run.execute()
            except BatchrunnerError as exc:
                return [], BlockOutcome(exc.exit_code, "usage", str(exc), 0, 0.0)
            finally:
                self._control = None
            # Positions in the block become the rows' numbers in the whole input.
            placed = [
                dataclasses.replace(r, index=rows[r.index].index, id=rows[r.index].id)
                for r in results
            ]
            cost = sum(r.cost_usd or 0.0 for r in results)
            # A refused key: the gateway's words, which the driver's own message wraps.
            message = str(run.auth_error) if run.auth_error is not None else report.message
            if report.reason == "outage" and run.outage.cause is not None:
                message = run.outage.cause  # the driver's own message says the rest
            outcome = BlockOutcome(report.exit_code, report.reason, message, report.sent, cost)
            return placed, outcome
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _block_config(
    settings: WorkerSettings,
    source: Path,
    max_cost: float | None,
    deadline_seconds: float | None,
) -> RunConfig:
    """The settings of one block's run: the job's, with this actor's share of the limits.

    The bodies are already built, so the columns and the template no longer apply (the
    Batch API lines carry `custom_id` and `body`); every other setting is kept.
    """
    deadline = None
    if deadline_seconds is not None:
        deadline = f"{max(deadline_seconds, 0.001):.3f}s"
    return settings.config.replace(
        input=source,
        output=source.with_name("block.parquet"),
        template=None,
        prompt_column=None,
        messages_column=None,
        id_column=None,
        limit=None,
        concurrency=settings.concurrency,
        rpm=settings.rpm,
        tpm=settings.tpm,
        max_cost=max_cost,
        deadline=deadline,
        restart=True,
        retry_failed=False,
        base_url=settings.base_url,
        api_key_env=settings.key_env,
        local=False,
        quiet=True,
        summary_json=None,
        progress=False,
        preflight=False,  # the driver checked the models once, for the whole run
        engine="local",
        ray_address=None,
        ray_actors=None,
        models=(),  # the driver already made a sweep's slots, each body with its model
        score=None,  # the driver scores the whole output
        reference_column=None,
    )
