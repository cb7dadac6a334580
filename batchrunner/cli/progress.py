"""What a person or a log shipper sees of a run: a tqdm bar, periodic lines, the final summary.

Used by the CLI only; the engine reports through a callback and never prints.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

from batchrunner.config.settings import RunConfig
from batchrunner.engine.state import RunReport, Tally
from batchrunner.results import Result
from batchrunner.store.failures import render_errors

__all__ = ["ProgressDisplay"]

log = logging.getLogger("batchrunner.cli.progress")

# Seconds between plain progress lines; the environment can shorten it (tests, demos).
LOG_EVERY_SECONDS = float(os.environ.get("BATCHRUNNER_LOG_SECONDS", "5"))


class ProgressDisplay:
    """A tqdm bar on a terminal; else a plain (or JSON) line every few seconds; quiet: none."""

    def __init__(self, config: RunConfig, stream: TextIO | None = None) -> None:
        self.config = config
        self.stream = stream or sys.stderr
        interactive = self.stream.isatty() if config.progress is None else config.progress
        self.use_bar = interactive and not config.quiet and config.log_format == "text"
        self.use_lines = not self.use_bar and not config.quiet
        self._bar: tqdm | None = None
        self._next_line = time.monotonic() + LOG_EVERY_SECONDS
        self._last_done = 0

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, tally: Tally) -> None:
        """The engine's on_start callback: the bar appears as sending starts."""
        if self.use_bar and self._bar is None:
            self._open_bar(tally)

    def _open_bar(self, tally: Tally) -> None:
        # Resumed rows are the bar's starting point, and counted there only.
        self._bar = tqdm(
            total=tally.rows,
            initial=tally.resumed,
            unit="row",
            file=self.stream,
            dynamic_ncols=True,
            mininterval=0.25,
        )
        self._last_done = tally.resumed
        self._postfix(tally, refresh=True)

    def _postfix(self, tally: Tally, *, refresh: bool = False) -> None:
        assert self._bar is not None
        self._bar.set_postfix_str(
            f"ok={tally.ok:,}, failed={tally.failed:,}, tokens={tally.total_tokens:,}, "
            f"cost=${tally.cost_usd:,.4f}",
            refresh=refresh,
        )

    def update(self, result: Result, tally: Tally) -> None:
        """The engine's on_result callback."""
        if self.use_bar:
            if self._bar is None:
                self._open_bar(tally)
            assert self._bar is not None
            self._bar.update(tally.done - self._last_done)
            self._last_done = tally.done
            self._postfix(tally)
        elif self.use_lines and time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + LOG_EVERY_SECONDS
            self._line(tally)
        if self._last_done == 0 and not self.use_bar:
            self._last_done = tally.done

    def _line(self, tally: Tally) -> None:
        elapsed = max(tally.elapsed, 1e-9)
        new_rows = tally.done - tally.resumed
        rate = new_rows / elapsed
        remaining = tally.rows - tally.done
        eta = remaining / rate if rate > 0 else None
        fields = {
            "rows": tally.rows,
            "done": tally.done,
            "ok": tally.ok,
            "failed": tally.failed,
            "rows_per_s": round(rate, 1),
            "tokens": tally.total_tokens,
            "cost_usd": round(tally.cost_usd, 6),
            "eta_s": None if eta is None else round(eta),
        }
        if self.config.log_format == "json":
            log.info("progress", extra={"fields": fields})
        else:
            pct = 100.0 * tally.done / tally.rows if tally.rows else 100.0
            eta_text = "?" if eta is None else _duration(eta)
            log.info(
                "rows %d/%d (%.1f%%), ok %d, failed %d, %.1f rows/s, %d tokens, $%.4f, eta %s",
                tally.done, tally.rows, pct, tally.ok, tally.failed, rate,
                tally.total_tokens, tally.cost_usd, eta_text,
            )

    def close(self) -> None:
        """Take the bar off the screen."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def final_summary(self, report: RunReport) -> None:
        """The short end-of-run summary (counts, tokens, cost, duration), on stderr (or one JSON line)."""
        if self.config.log_format == "json":
            figures = report.to_dict()
            record = {"time": round(time.time(), 3), "level": "info", "logger": "batchrunner",
                      "message": "summary", "detail": figures.pop("message"), **figures}
            print(json.dumps(record), file=self.stream, flush=True)
            return
        if report.reason == "storage":  # a storage failure: one line, naming the path and the cause
            print(f"batchrunner: error: {report.message}", file=self.stream, flush=True)
            return
        lines = [
            f"batchrunner: {_headline(report)}",
            f"  rows      {report.rows:,}: ok {report.ok:,}, failed {report.failed:,}, "
            f"pending {report.pending:,} (resumed {report.resumed:,}, requests sent {report.sent:,})",
            f"  tokens    {report.total_tokens:,} (prompt {report.prompt_tokens:,}, "
            f"cached {report.cached_tokens:,}, completion {report.completion_tokens:,})",
            f"  cost      ${report.cost_usd:,.4f}"
            + (f" paid; ${report.reused_cost_usd:,.4f} reused from the response cache "
               f"({report.cache_hits:,} rows)" if report.cache_hits else ""),
            f"  wall time {_duration(report.wall_seconds)}",
        ]
        lines.extend(endpoint_lines(report))
        cached = cache_line(report, self.config)
        if cached:
            lines.insert(3, cached)
        if report.timed_out_after_sending:
            lines.append(
                f"  {plural(report.timed_out_after_sending, 'attempt')} timed out after sending; "
                "the gateway may have billed them"
            )
        if report.reason == "complete":
            lines.append(f"  output    {report.output}")
        else:
            lines.append(f"  {report.message}")
        if report.errors:
            lines.append("  most frequent errors (rows, error):")
            lines.extend(render_errors(report.errors, indent="    "))
        print("\n".join(lines), file=self.stream, flush=True)


def endpoint_lines(report: RunReport) -> list[str]:
    """A run of several endpoints: the rows, tokens and cost each answered this session."""
    if not report.endpoints:
        return []
    width = max(len(e.endpoint) for e in report.endpoints)
    lines = ["  endpoints (rows answered this session, tokens, cost):"]
    for e in report.endpoints:
        failed = f" ({e.failed:,} failed)" if e.failed else ""
        lines.append(f"    {e.endpoint:<{width}}  {e.rows:>9,} rows{failed}  "
                     f"{e.total_tokens:>12,} tokens  ${e.cost_usd:,.4f}")
    return lines


def cache_line(report: RunReport, config: RunConfig) -> str | None:
    """The share of prompt tokens the gateway's prompt cache served, and what that saved.

    The saving (the cached tokens priced in full, less the cached price paid) is given where
    the run names one model with a price (at batch prices with `--engine batch`); with a sweep
    or a model column, `batchrunner summary` gives it per model.
    """
    if not report.cached_tokens or not report.prompt_tokens:
        return None
    text = (f"  cached    {report.cached_tokens / report.prompt_tokens:.1%} of prompt tokens "
            "(the gateway's prompt cache)")
    if len(config.sweep) == 1:
        from batchrunner.config.pricing import PriceTable
        from batchrunner.errors import UsageError

        try:
            price = PriceTable.load(config.prices).get(config.sweep[0])
        except UsageError:  # the run read the same file: it cannot fail here, but say nothing
            price = None
        if price is not None:
            saved = price.cache_saving(report.cached_tokens, batch=config.engine == "batch")
            text += f", saved ${saved:,.4f} against no caching"
    return text


def _headline(report: RunReport) -> str:
    if report.reason == "complete":
        return "done" if report.failed == 0 else f"done, {plural(report.failed, 'row')} failed"
    return {
        "budget": "stopped at the budget (exit 5)",
        "deadline": "stopped at the deadline (exit 5)",
        "interrupted": "interrupted (exit 130)",
        "terminated": "terminated (exit 143)",
        "auth": "the gateway refused the API key (exit 4)",
        "systematic": "stopped early: every answered row failed the same way (exit 3)",
        "outage": "stopped early: the gateway is unreachable or down (exit 3)",
    }.get(report.reason, f"stopped ({report.reason})")


def plural(count: int, noun: str) -> str:
    """`1 row`, `2 rows`, `1,000 rows`."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
