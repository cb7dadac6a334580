"""Charts of summaries: cost and tokens per group and per day, drawn with matplotlib (Agg).

    >>> plot_summary(["out/*.parquet"], "usage.png", by="dataset")

matplotlib is imported when a chart is drawn, never at import: it is an optional extra.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batchrunner.config.pricing import PriceTable
from batchrunner.errors import UsageError
from batchrunner.reports.render import _key_text
from batchrunner.reports.result_files import _DAY, expand_paths
from batchrunner.reports.summary import GroupSummary, _aggregate
from batchrunner.store.durability import write_error

__all__ = ["plot_summary"]

_PLOT_MAX_BARS = 20  # more groups than this: the largest by tokens, the rest as one bar


def plot_summary(
    paths: Sequence[str | Path],
    out_png: str | Path,
    *,
    by: str = "model",
    prices: PriceTable | None = None,
) -> Path:
    """Draw cost and tokens per group (bar charts) into the PNG file `out_png`, and return it.

    When the files span several days, a second row of charts shows cost and tokens per day:
    the UTC day of each row's `created` column where the files have one, else of each file's
    modification time. Costs are as in `summarize` (a hatched bar is a lower bound: the group
    has unpriced rows). Needs matplotlib (`pip install 'batchrunner[plot]'`); draws with Agg.

    >>> plot_summary(["out/*.parquet"], "usage.png", by="dataset")
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'batchrunner[plot]'") from None

    files = expand_paths(paths)
    report = _aggregate(files, by, prices)
    per_day = _aggregate(files, _DAY, prices)  # as summarize_days
    panels = [report] + ([per_day] if len(per_day.groups) > 1 else [])
    out = Path(out_png)

    fig = Figure(figsize=(13, 4.8 * len(panels)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (cost_ax, token_ax), rep in zip(axes, panels, strict=True):
        groups = _plot_groups(rep.groups)
        labels = [_plot_label(g.key) for g in groups]
        x = np.arange(len(groups))
        known = np.array([g.cost_usd_known for g in groups])
        partial = [g.cost_usd is None for g in groups]
        bars = cost_ax.bar(x, known, color="#4C72B0")
        for bar, lower_bound in zip(bars, partial, strict=True):
            if lower_bound:  # the known part of a cost that is a lower bound, marked as such
                bar.set_hatch("//")
                bar.set_facecolor("#B0B8C8")
                mark = ">=" if bar.get_height() > 0 else "?"
                cost_ax.annotate(mark, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                 ha="center", va="bottom")
        cost_ax.set_title(f"Cost (USD) by {_plot_label(rep.by)}")
        cost_ax.set_ylabel("USD" + (" (hatched: lower bound, unpriced rows)" if any(partial)
                                    else ""))
        uncached = np.array([g.prompt_tokens - g.cached_tokens for g in groups], float)
        cached = np.array([g.cached_tokens for g in groups], float)
        completion = np.array([g.completion_tokens for g in groups], float)
        token_ax.bar(x, uncached, label="prompt (uncached)", color="#4C72B0")
        token_ax.bar(x, cached, bottom=uncached, label="prompt (cached)", color="#8FB3E0")
        token_ax.bar(x, completion, bottom=uncached + cached, label="completion",
                     color="#DD8452")
        token_ax.set_title(f"Tokens by {_plot_label(rep.by)}")
        token_ax.yaxis.set_major_formatter(EngFormatter())
        token_ax.legend(loc="upper right", fontsize="small")
        for ax in (cost_ax, token_ax):
            ax.set_xticks(x, labels, rotation=30 if len(groups) > 3 else 0,
                          ha="right" if len(groups) > 3 else "center")
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
    sources = f"{len(files)} file{'s' if len(files) != 1 else ''}"
    costs = "recomputed from prices" if prices is not None else "from the files' cost_usd"
    fig.suptitle(f"batchrunner summary: {report.total.rows:,} rows, {sources}; cost {costs}")
    try:
        with warnings.catch_warnings():
            # A label in a script the default font lacks draws as boxes: cosmetic, not an error.
            warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()  # what a full disk took of it
        raise write_error(exc, out) from None
    return out


def _plot_groups(groups: Sequence[GroupSummary]) -> list[GroupSummary]:
    if len(groups) <= _PLOT_MAX_BARS:
        return list(groups)
    ranked = sorted(groups, key=lambda g: g.total_tokens, reverse=True)
    shown, rest = ranked[: _PLOT_MAX_BARS - 1], ranked[_PLOT_MAX_BARS - 1 :]
    other = GroupSummary(
        key=f"({len(rest)} others)",
        rows=sum(g.rows for g in rest),
        ok=sum(g.ok for g in rest),
        errors=sum(g.errors for g in rest),
        prompt_tokens=sum(g.prompt_tokens for g in rest),
        cached_tokens=sum(g.cached_tokens for g in rest),
        completion_tokens=sum(g.completion_tokens for g in rest),
        total_tokens=sum(g.total_tokens for g in rest),
        cost_usd=None if any(g.cost_usd is None for g in rest) else
        sum(g.cost_usd_known for g in rest),
        cost_usd_known=sum(g.cost_usd_known for g in rest),
        unpriced_rows=sum(g.unpriced_rows for g in rest),
        latency_p50_ms=None,
        latency_p95_ms=None,
    )
    return [*shown, other]


def _plot_label(value: Any) -> str:
    text = _key_text(value)
    text = text if len(text) <= 40 else text[:39] + "…"
    return text.replace("$", r"\$")  # a "$" would start mathtext
