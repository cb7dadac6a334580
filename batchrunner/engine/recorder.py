"""A result's way into the checkpoint and the tally, and the run's end: output and report.

`Recording` is a part of `engine._Run` (a mixin: the state is the run's): `_record` and
`_record_answer` (with the systematic-failure streak) take results; `_finish` assembles the
output when every row has one, scores it, and makes the RunReport and `--summary-json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from batchrunner.answers.scoring import Metric, TableScorer
from batchrunner.cache.responses import request_hash
from batchrunner.engine.state import (
    EXIT_OK,
    EXIT_ROW_ERRORS,
    EXIT_STOPPED,
    EXIT_SYSTEMATIC,
    RunReport,
)
from batchrunner.errors import AuthRefused, StorageError
from batchrunner.inputs.readers import iter_tables
from batchrunner.results import Result, Row
from batchrunner.store.checkpoint import Checkpoint
from batchrunner.store.durability import replaced_atomically
from batchrunner.store.scored import score_results

log = logging.getLogger("batchrunner.engine.runner")


class Recording:
    """`_Run`'s recording part: results into the checkpoint and tally; the end of the run."""

    def _record_answer(self, ckpt: Checkpoint, result: Result, row: Row | None = None) -> None:
        """Record a sent row's result, unless it extends a streak of identical failures or of
        rows the gateway did not answer (then it is held back, and dropped if the streak trips:
        the row stays pending)."""
        key = self._failure_keys.pop(id(result), None)
        if row is not None and row.body is not None:
            self._held_hashes[id(result)] = (request_hash(row.body), row.input_hash)
        else:
            self._held_hashes[id(result)] = (None, None)
        if id(result) in self._no_answer:
            self._no_answer.discard(id(result))
            if self.outage.tripped:  # dropped: it stays pending
                self._held_hashes.pop(id(result), None)
            if self.outage.hold(result):
                self._stop_for_outage()
            return
        for held in self.outage.release():  # an answer: the rows held before it did fail
            self._record(ckpt, held, *self._held_hashes.pop(id(held), (None, None)))
        was_tripped = self.streak.tripped
        for ready in self.streak.observe(result, key):
            self._record(ckpt, ready, *self._held_hashes.pop(id(ready), (None, None)))
        if self.streak.tripped and not was_tripped:
            log.warning(
                "stopping: the last %d answered rows all failed the same way: %s; "
                "no new requests are sent", self.streak.count, self.streak.error()
            )
            self.control.stop("systematic", EXIT_SYSTEMATIC)

    def _stop_for_outage(self) -> None:
        """The gateway is unreachable or down: no new requests; the rows held stay pending."""
        for dropped in self.outage.take_dropped():
            self._held_hashes.pop(id(dropped), None)
        log.warning("stopping: %s; no new requests are sent", self.outage.cause)
        self.control.stop("outage", EXIT_SYSTEMATIC)

    def _record(
        self,
        ckpt: Checkpoint,
        result: Result,
        row_hash: int | None = None,
        input_hash: int | None = None,
        *,
        body: dict[str, Any] | None = None,
    ) -> None:
        """Keep a result; `row_hash` is its body's (made from `body` when not given)."""
        if row_hash is None and body is not None:
            row_hash = request_hash(body)
        ckpt.append(result, row_hash, input_hash)
        self.gate.received()
        self.tally.add(result)
        # A write starts when half an interval waits: the other half may arrive while it is
        # written, so the durability gate (interval + in flight) holds requests back only when
        # the disk is slower than that, not at every write.
        if ckpt.buffered >= max(1, self.config.checkpoint_every // 2):
            self.flush_event.set()
        if self.on_result is not None:
            self.on_result(result, self.tally)

    def _finish(self, ckpt: Checkpoint, rows: int, input_rows: int | None = None) -> RunReport:
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
            if reason == "budget" and self.budget_note is not None:
                message = f"stopped: {self.budget_note}"
            elif reason == "systematic" and self.streak.tripped:
                message = self.streak.describe()
            elif reason == "outage":
                pending = rows - self.tally.ok - self.tally.failed
                message = (
                    f"stopped early: {self.outage.cause or 'the gateway is unreachable or down'}"
                    f"; {pending:,} row{'s' if pending != 1 else ''} with no answer stay pending:"
                    " run the same command again once the gateway is back"
                )
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
        before = getattr(self, "_input_state", None)
        if before is None or input_state(self.config.input) == before:
            return False
        log.warning(
            "the input %s changed while the run went on (its size or modification time differ "
            "from the start): the next run compares it with the checkpoint and sends the rows "
            "that changed", self.config.input,
        )
        return True

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
