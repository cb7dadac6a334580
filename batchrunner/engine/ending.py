"""The end of a run: the output assembled when every row has a result, and the RunReport.

`finish` scores and writes the output of a complete run, settles the exit code and the one
line that says why a run stopped (docs/exit-codes.md), and writes `--summary-json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrunner.answers.scoring import Metric, TableScorer
from batchrunner.engine.recorder import Recorder
from batchrunner.engine.shared import RunState
from batchrunner.engine.state import (
    EXIT_OK,
    EXIT_ROW_ERRORS,
    EXIT_STOPPED,
    EndpointFigures,
    RunReport,
    Tally,
)
from batchrunner.engine.sweep import Sweep
from batchrunner.errors import AuthRefused, StorageError
from batchrunner.inputs.readers import iter_tables
from batchrunner.store.checkpoint import Checkpoint
from batchrunner.store.durability import replaced_atomically
from batchrunner.store.scored import score_results

__all__ = [
    "Ending", "input_state", "pending_batches_note", "stop_message", "use_totals",
    "write_summary_json",
]

log = logging.getLogger("batchrunner.engine.runner")


@dataclass
class Ending:
    """What the end of a run needs besides its state and recorder (set while it starts)."""

    metric: Metric | None = None
    id_column: str | None = None
    sweep: Sweep | None = None
    input_state: tuple[int, int] | None = None  # the input's size and mtime at the start

def finish(
    state: RunState,
    recorder: Recorder,
    ending: Ending,
    ckpt: Checkpoint,
    rows: int,
    input_rows: int | None = None,
) -> RunReport:
    """The output, when every row has a result, and the run's report."""
    return _Finisher(state, recorder, ending).finish(ckpt, rows, input_rows)


class _Finisher:
    def __init__(self, state: RunState, recorder: Recorder, ending: Ending) -> None:
        self.state = state
        self.config = state.config
        self.control = state.control
        self.tally = state.tally
        self.recorder = recorder
        assert recorder.writer is not None
        self.writer = recorder.writer
        self.metric = ending.metric
        self.id_column = ending.id_column
        self.sweep = ending.sweep
        self._input_state = ending.input_state

    def finish(self, ckpt: Checkpoint, rows: int, input_rows: int | None = None) -> RunReport:
        control = self.control
        complete = ckpt.complete(rows)
        reason = control.reason
        fault = self.writer.fault
        scorer = _scorer(self.metric, self.config.reference_column)
        if complete and reason != "auth" and fault is None and not ckpt.finished:
            # 32,768-row chunks: the peak of writing a million rows stays under 300 MB
            tables = iter_tables(self.config, batch_rows=32768)
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
            use_totals(self.tally, ckpt.done_totals())
            code, reason, message = StorageError.exit_code, "storage", self.writer.message(rows)
            self.writer.record(rows)
        elif complete and reason != "auth":
            use_totals(self.tally, ckpt.done_totals())
            code = EXIT_OK if self.tally.failed == 0 else EXIT_ROW_ERRORS
            reason = "complete"
            message = ""
        else:
            use_totals(self.tally, ckpt.done_totals())
            code = control.exit_code if control.exit_code is not None else EXIT_STOPPED
            reason = reason or "stopped"
            message = stop_message(reason, self.state.auth_error)
            if reason == "budget" and self.state.budget_note is not None:
                message = f"stopped: {self.state.budget_note}"
            elif reason == "systematic" and self.recorder.streak.tripped:
                message = self.recorder.streak.describe()
            elif reason == "outage":
                pending = rows - self.tally.ok - self.tally.failed
                message = (
                    f"stopped early: {self.state.outage.cause or 'the gateway is unreachable or down'}"
                    f"; {pending:,} row{'s' if pending != 1 else ''} with no answer stay pending:"
                    " run the same command again once the gateway is back"
                )
            if self.state.pending_batches:
                message += "; " + pending_batches_note(self.state.pending_batches)
        input_changed = self._input_changed()
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
            timed_out_after_sending=self.tally.timed_out_after_sending,
            input_changed=input_changed,
            endpoints=tuple(
                EndpointFigures.of(name, part)
                for name, part in sorted(self.tally.by_endpoint.items())
            ),
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

    def _input_changed(self) -> bool:
        """True, and said, when the input's size or mtime differ now from the run's start."""
        before = self._input_state
        if before is None or input_state(self.config.input) == before:
            return False
        log.warning(
            "the input %s changed while the run went on (its size or modification time differ "
            "from the start): the next run compares it with the checkpoint and sends the rows "
            "that changed", self.config.input,
        )
        return True


def use_totals(tally: Tally, totals: dict[str, Any]) -> None:
    """The tally's figures replaced by the checkpoint's totals."""
    tally.ok, tally.failed = totals["ok"], totals["failed"]
    tally.prompt_tokens = totals["prompt_tokens"]
    tally.completion_tokens = totals["completion_tokens"]
    tally.cached_tokens = totals["cached_tokens"]
    tally.total_tokens = totals["total_tokens"]
    tally.cost_usd = totals["cost_usd"]
    tally.cache_hits = totals.get("cache_hits", 0)
    tally.reused_cost_usd = totals.get("reused_cost_usd", 0.0)


def _scorer(metric: Metric | None, reference_column: str | None) -> TableScorer | None:
    if metric is None or reference_column is None:
        return None
    return TableScorer(metric, reference_column)


def input_state(path: Path) -> tuple[int, int] | None:
    """The input's size and modification time (ns), to tell whether it changed; None: unknown."""
    try:
        stat = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return stat.st_size, stat.st_mtime_ns


def write_summary_json(path: Path, report: RunReport | dict[str, Any]) -> None:
    """Write the final figures for monitoring, atomically."""
    data = report.to_dict() if isinstance(report, RunReport) else report
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def pending_batches_note(count: int) -> str:
    """What a run stopped while its Batch API batches run says of them."""
    batches = "1 batch is" if count == 1 else f"{count:,} batches are"
    return (f"{batches} pending at the gateway (paid for either way): run the same command "
            "again to collect them")


def stop_message(reason: str, auth_error: AuthRefused | None) -> str:
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
