"""The comparisons' old address: they live in `batchrunner.reports.compare` (SPEC section 15).

`from batchrunner.compare import compare` keeps working for the CLI and for code written
before `reports/` became a package.
"""

from __future__ import annotations

from .reports.compare import (
    Comparison,
    GroupScore,
    PairComparison,
    compare,
    render_groups,
    render_table,
    score_summary,
    to_csv,
    to_json,
)

__all__ = [
    "Comparison",
    "GroupScore",
    "PairComparison",
    "compare",
    "render_groups",
    "render_table",
    "score_summary",
    "to_csv",
    "to_json",
]
