"""Usage and cost reports over result files, and cost estimates before a run (docs/cost.md).

    >>> report = summarize(["out/*.parquet"], by="model", prices=PriceTable.load())
    >>> print(render_table(report))
    >>> plot_summary(["out/*.parquet"], Path("usage.png"))
    >>> print(render_estimate(estimate(config, prices=PriceTable.load())))

One module a concept: `result_files` (finding and reading result files and checkpoints),
`summary` (their aggregation), `estimate` (the pre-run estimate and its calibration), `render`
(table, JSON and CSV text of both), `plots` (matplotlib charts, imported lazily) and `compare`
(scored groups compared, docs/evaluations.md).
The renderers return text and print nothing; the CLI decides where it goes.
"""

from __future__ import annotations

from batchrunner.inputs.requests import CHARS_PER_TOKEN
from batchrunner.reports.estimate import (
    CALIBRATED_MIN_MARGIN,
    CALIBRATION_MAX_ROWS,
    Calibration,
    Estimate,
    ModelEstimate,
    Range,
    estimate,
)
from batchrunner.reports.plots import plot_summary
from batchrunner.reports.render import (
    estimate_to_json,
    render_estimate,
    render_table,
    to_csv,
    to_json,
)
from batchrunner.reports.result_files import expand_paths
from batchrunner.reports.summary import (
    GroupSummary,
    SummaryReport,
    summarize,
    summarize_days,
)

__all__ = [
    "CALIBRATION_MAX_ROWS",
    "CALIBRATED_MIN_MARGIN",
    "CHARS_PER_TOKEN",
    "Calibration",
    "Estimate",
    "GroupSummary",
    "ModelEstimate",
    "Range",
    "SummaryReport",
    "estimate",
    "estimate_to_json",
    "expand_paths",
    "plot_summary",
    "render_estimate",
    "render_table",
    "summarize",
    "summarize_days",
    "to_csv",
    "to_json",
]
