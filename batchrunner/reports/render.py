"""Renderers of summaries and estimates: text tables for people, JSON and CSV for programs.

    >>> print(render_table(summarize(["out/*.parquet"])))
    >>> print(render_estimate(estimate(config, prices=PriceTable.load())))

The renderers return text and print nothing; the CLI decides where it goes.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from batchrunner.reports.estimate import (
    _RULE,
    CALIBRATED_MIN_MARGIN,
    SPREAD_SIGMAS,
    Estimate,
    Range,
)
from batchrunner.reports.summary import (
    _FIGURES,
    GroupSummary,
    SummaryReport,
    _json_value,
)
from batchrunner.store.failures import render_errors

__all__ = [
    "estimate_to_json",
    "prompt_cache_notes",
    "render_estimate",
    "render_table",
    "to_csv",
    "to_json",
]

_TABLE_COLUMNS = (
    ("rows", "rows"),
    ("ok", "ok"),
    ("errors", "errors"),
    ("prompt_tokens", "prompt"),
    ("cached_tokens", "cached"),
    ("completion_tokens", "completion"),
    ("reasoning_tokens", "reasoning"),
    ("total_tokens", "total"),
    ("cost_usd", "cost_usd"),
    ("unpriced_rows", "unpriced"),
    ("latency_p50_ms", "p50_ms"),
    ("latency_p95_ms", "p95_ms"),
)
_COST_DIGITS = 6
_LATENCY_DIGITS = 1


def render_table(report: SummaryReport) -> str:
    """An aligned text table for people: one line per group, then the total, then notes.

    Tokens are whole numbers with thousands separators, cost in USD to 6 decimals, latencies
    in ms to 1 decimal. A cost shown as `>=X` is a lower bound: the group has unpriced rows and
    X is the cost of its priced rows (`cost_usd` is null in JSON and CSV, `cost_usd_known` is X).
    """
    columns = _TABLE_COLUMNS
    if not report.total.reasoning_tokens:  # shown beside completion where a model reasoned
        columns = tuple(c for c in columns if c[0] != "reasoning_tokens")
    header = [report.by, *(title for _, title in columns)]
    lines = [[_key_text(g.key), *_cells(g, columns)] for g in report.groups]
    lines.append(["TOTAL", *_cells(report.total, columns)])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out = [fmt(header), *(fmt(r) for r in lines[:-1])]
    out.append("  ".join("-" * w for w in widths))
    out.append(fmt(lines[-1]))
    out.append("")
    out.extend(_notes(report))
    return "\n".join(out).rstrip()


def _cells(g: GroupSummary, columns: tuple[tuple[str, str], ...] = _TABLE_COLUMNS) -> list[str]:
    cells = []
    for name, _ in columns:
        value = getattr(g, name)
        if name == "cost_usd":
            cells.append(_cost_text(g))
        elif name.startswith("latency"):
            cells.append("-" if value is None else f"{value:,.{_LATENCY_DIGITS}f}")
        else:
            cells.append(f"{value:,}")
    return cells


def _cost_text(g: GroupSummary) -> str:
    if g.cost_usd is not None:
        return f"{g.cost_usd:,.{_COST_DIGITS}f}"
    if g.cost_usd_known > 0:
        return f">={g.cost_usd_known:,.{_COST_DIGITS}f}"
    return "?"


def _key_text(key: Any) -> str:
    return "(null)" if key is None else str(key)


def _notes(report: SummaryReport) -> list[str]:
    if report.cost_source == "prices":
        extra = f", overlaid by {report.prices_file}" if report.prices_file else ""
        notes = [
            f"cost: recomputed from the usage columns with the prices of {report.prices_as_of}"
            f"{extra}"
        ]
    else:
        notes = ["cost: the cost_usd column of the result files"]
    if report.total.unpriced_rows:
        models = ", ".join(_key_text(m) for m in report.unpriced_models) or "?"
        notes.append(
            f"{_plural(report.total.unpriced_rows, 'row')} reported usage but "
            f"{'has' if report.total.unpriced_rows == 1 else 'have'} no cost (a model with "
            f"no price, or no prompt or completion count), of: {models}; '>=' marks the cost "
            "of the priced rows alone, '?' a cost wholly unknown"
        )
    if report.total.cache_hits:
        notes.append(
            f"cost is what was paid; {report.total.cache_hits:,} rows came from the response "
            f"cache, reused ${report.total.reused_cost_usd:,.{_COST_DIGITS}f} paid before "
            "(not counted again)"
        )
    notes.extend(prompt_cache_notes(report.total))
    notes.extend(reasoning_notes(report))
    files = len(report.files)
    notes.append(f"{files} file{'s' if files != 1 else ''}; latency over ok rows")
    for output in report.from_checkpoint:
        notes.append(f"{output}: not finished: its results so far, read from its checkpoint")
    if report.errors:
        notes.append("most frequent errors (rows, error):")
        notes.extend(render_errors(report.errors))
    if report.structured is not None:
        notes.append(report.structured.render())
    return notes


def prompt_cache_notes(total: GroupSummary) -> list[str]:
    """The gateway's prompt cache (its share of prompt tokens, what it saved) and the rows paid
    at batch prices."""
    notes = []
    if total.cached_tokens and total.cached_share is not None:
        saved = ("an unknown sum (a model with cached tokens has no price)"
                 if total.cache_saving_usd is None
                 else f"${total.cache_saving_usd:,.{_COST_DIGITS}f}")
        notes.append(
            f"prompt cache: {total.cached_share:.1%} of prompt tokens were cached "
            f"({total.cached_tokens:,}), which saved {saved} against no caching"
        )
    if total.batch_rows:
        notes.append(
            f"{_plural(total.batch_rows, 'row')} answered through the Batch API "
            f"({'its' if total.batch_rows == 1 else 'their'} batch_id is set), priced at "
            "batch prices"
        )
    return notes


def reasoning_notes(report: SummaryReport) -> list[str]:
    """What reasoning cost (its share of completion tokens, per group: already inside them),
    and the rows it left empty, with what to raise."""
    notes = []
    if report.total.reasoning_tokens:
        shares = ", ".join(
            f"{_key_text(g.key)} {g.reasoning_share:.0%}"
            for g in report.groups if g.reasoning_tokens and g.reasoning_share is not None
        )
        notes.append(
            f"reasoning: {report.total.reasoning_tokens:,} of the completion tokens "
            f"(already counted in them and in the cost); share of completion tokens by "
            f"{report.by}: {shares}"
        )
    cut = report.total.reasoning_cut_rows
    if cut:
        notes.append(reasoning_cut_advice(cut))
    return notes


def reasoning_cut_advice(rows: int) -> str:
    """The line that says some answers were used up by reasoning, and what to raise."""
    return (
        f"{_plural(rows, 'row')} came back empty (finish_reason length): reasoning used up "
        "the completion limit before any answer; raise max_completion_tokens (--max-tokens, "
        "or --param max_completion_tokens=N)"
    )


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def to_json(report: SummaryReport | Estimate) -> str:
    """The report as one JSON document (full precision; unknown figures are null)."""
    return json.dumps(report.to_dict(), indent=2, allow_nan=False)


def to_csv(report: SummaryReport) -> str:
    """The report as CSV: one line per group and a last line with `level` = total.

    Columns: `level` (group or total), the `by` column (named after it), then every figure of
    `GroupSummary` at full precision; an unknown figure is an empty cell.
    """
    key_name = report.by if report.by not in ("level", *_FIGURES) else f"by_{report.by}"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["level", key_name, *_FIGURES])
    for level, g in [*(("group", g) for g in report.groups), ("total", report.total)]:
        key = "" if level == "total" or g.key is None else _json_value(g.key)
        writer.writerow([level, key, *(_csv_cell(getattr(g, f)) for f in _FIGURES)])
    return buf.getvalue().rstrip("\n")


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


def render_estimate(est: Estimate) -> str:
    """The estimate as text for people: totals as low .. high ranges, then one line per model."""
    sent = f"{est.rows_to_send:,} to send"
    if est.checkpoint is not None:
        sent = f"{est.done_rows:,} done (checkpoint of {est.checkpoint}), " + sent
    if est.cached_rows:
        sent += f", {est.cached_rows:,} in the response cache (not sent, no cost)"
    if est.input_errors:
        sent += f", {est.input_errors:,} with input errors (not sent, no cost)"
    lines = [f"input: {est.input}: {_plural(est.rows, 'row')}, {sent}"]
    if est.checkpoint_note:
        lines.append(est.checkpoint_note)
    lines.append(f"prompt tokens:      {_range_text(est.prompt_tokens, _tokens)}")
    lines.append(f"completion tokens:  {_range_text(est.completion_tokens, _tokens)}")
    mine = " (this job)"  # the engine the job runs with says which of the two it pays
    online = f"cost (USD), online{'' if est.engine == 'batch' else mine}:"
    batch = f"cost (USD), batch{mine if est.engine == 'batch' else ''}:"
    width = max(len(online), len(batch)) + 1
    if est.cost_usd is not None and est.batch_cost_usd is not None:
        lines.append(f"{online:<{width}}{_range_text(est.cost_usd, _dollars)}")
        lines.append(f"{batch:<{width}}{_range_text(est.batch_cost_usd, _dollars)}")
    else:
        lines.append(
            f"{online:<{width}}unknown: {_plural(est.unpriced_rows, 'row')} "
            f"{'asks' if est.unpriced_rows == 1 else 'ask'} for a model with no "
            f"price; the priced rows: {_range_text(est.cost_usd_known, _dollars)}"
        )
        lines.append(f"{batch:<{width}}unknown; the priced rows: "
                     f"{_range_text(est.batch_cost_usd_known, _dollars)}")
    lines.append(_prefix_line(est))
    header = ["model", "rows", "prompt tokens", "completion tokens", "cost (USD)",
              "batch (USD)"]
    table = [
        [
            _key_text(m.model),
            f"{m.rows:,}",
            _range_text(m.prompt_tokens, _tokens, short=True),
            _range_text(m.completion_tokens, _tokens, short=True),
            "no price" if m.cost_usd is None else _range_text(m.cost_usd, _dollars, short=True),
            "no price" if m.batch_cost_usd is None
            else _range_text(m.batch_cost_usd, _dollars, short=True),
        ]
        for m in est.models
    ]
    if table:
        widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
        lines.append("")
        for r in [header, *table]:
            cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]
            lines.append("  ".join(cells).rstrip())
    lines.append("")
    if est.unbounded_rows and est.calibration is None:
        lines.append(
            f"{est.unbounded_rows:,} rows have no max_tokens: no upper bound on their "
            "completions (set max_tokens, or --calibrate with a finished run)"
        )
    cal = est.calibration
    if cal is None:
        lines.append(f"rule: {_RULE}")
        lines.append("calibrate with a finished run's results (--calibrate) for a tighter figure")
    else:
        files = len(cal.files)
        lines.append(
            f"calibrated on {cal.rows:,} rows of {files} file{'s' if files != 1 else ''}: "
            f"{cal.tokens_per_char:.4f} prompt tokens a character, completions "
            f"{cal.completion_mean:,.1f} tokens on average (sd {cal.completion_std:,.1f}), "
            f"{cal.cached_fraction:.1%} of prompt tokens cached; ranges are "
            f"+-{SPREAD_SIGMAS:g} sigma, at least +-{CALIBRATED_MIN_MARGIN:.0%}"
        )
    extra = f", overlaid by {est.prices_file}" if est.prices_file else ""
    lines.append(f"prices as of {est.prices_as_of}{extra}; nothing was sent")
    return "\n".join(lines)


def _prefix_line(est: Estimate) -> str:
    """What the prompt cache is expected to serve with --order prefix, and what it saves."""
    head = "prompt cache:       "
    if not est.prefix_cached_tokens:
        return (head + "no rows share a cacheable prefix (1,024 tokens or more): "
                "nothing expected cached")
    share = f"{est.prefix_cached_share:.1%}" if est.prefix_cached_share is not None else "?"
    if est.cache_saving_usd is None:
        saving = "saving unknown (a model with no price)"
    else:
        saving = (f"saving {_dollars(est.cache_saving_usd)} online, "
                  f"{_dollars(est.cache_saving_batch_usd or 0.0)} at batch prices, "
                  "against no caching")
    order = ("with --order prefix" if est.order == "prefix"
             else "with --order prefix (this job sends in input order: expect less)")
    return (f"{head}{share} of prompt tokens ({est.prefix_cached_tokens:,}) expected cached "
            f"{order}; {saving}")


def estimate_to_json(est: Estimate) -> str:
    """The estimate as one JSON document (the figures of `render_estimate`)."""
    return to_json(est)


def _tokens(value: float) -> str:
    return f"{value:,.0f}"


def _dollars(value: float) -> str:
    return f"${value:,.{_COST_DIGITS}f}"


def _range_text(r: Range, fmt: Any, *, short: bool = False) -> str:
    high = "no bound" if r.high is None else fmt(r.high)
    text = f"{fmt(r.low)} .. {high}"
    if r.expected is not None:
        text += f" (~{fmt(r.expected)})" if short else f"  (expected {fmt(r.expected)})"
    return text
