"""Scored results per group, and paired comparisons of groups (docs/evaluations.md).

`compare(paths, by="model")` reads the scored result files, groups their rows (by a column, or
by file with `by="file"`), and for every pair of groups pairs the rows by `id`: wins, ties and
losses, the paired mean difference with its 95% interval and, for 0/1 scores, the exact McNemar
p-value. `score_summary` gives the per-group part alone, for `batchrunner summary`.

    report = compare(["out/nightly-eval-2026-12-01.parquet"])
    print(render_table(report))
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.errors import UsageError
from batchrunner.reports.result_files import expand_paths
from batchrunner.reports.stats import (
    Interval,
    is_binary,
    mcnemar_exact,
    mean_interval,
    paired_difference,
)
from batchrunner.store.scored import read_result_batches

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Comparison",
    "GroupScore",
    "PairComparison",
    "compare",
    "render_table",
    "score_summary",
    "to_csv",
    "to_json",
]

_FILE = "file"
_COLUMNS = ("id", "status", "score", "cost_usd", "total_tokens", "latency_ms", "model")


@dataclass(frozen=True)
class GroupScore:
    """The scored rows of one group: mean score with its 95% CI, cost, tokens, latency."""

    key: Any
    rows: int
    scored: int
    score: Interval
    correct: float  # the sum of the scores (the count of correct answers, for 0/1 scores)
    cost_usd: float
    total_tokens: int
    latency_p50_ms: float | None

    @property
    def cost_per_correct(self) -> float | None:
        """Dollars per correct answer (per unit of score): None with no correct answer."""
        return self.cost_usd / self.correct if self.correct > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"group": _plain(self.key), "rows": self.rows, "scored": self.scored,
                **self.score.to_dict(), "correct": self.correct, "cost_usd": self.cost_usd,
                "cost_per_correct": self.cost_per_correct, "total_tokens": self.total_tokens,
                "latency_p50_ms": self.latency_p50_ms}


@dataclass(frozen=True)
class PairComparison:
    """Group `a` against group `b` on the ids both answered (both have a score)."""

    a: Any
    b: Any
    paired: int
    only_a: int  # ids scored in a but not in b: left out of the pairing
    only_b: int
    wins: int  # a scored higher
    ties: int
    losses: int
    difference: Interval  # mean of score_a - score_b, t interval
    mcnemar_p: float | None  # exact, for 0/1 scores

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        diff = self.difference
        return {"a": _plain(self.a), "b": _plain(self.b), "paired": self.paired,
                "only_a": self.only_a, "only_b": self.only_b, "wins": self.wins,
                "ties": self.ties, "losses": self.losses, "mean_difference": diff.mean,
                "ci_low": diff.low, "ci_high": diff.high, "mcnemar_p": self.mcnemar_p}


@dataclass(frozen=True)
class Comparison:
    """Groups and every pair of them."""

    by: str
    files: tuple[str, ...]
    groups: tuple[GroupScore, ...]
    pairs: tuple[PairComparison, ...]
    binary: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"by": self.by, "files": list(self.files), "binary_scores": self.binary,
                "groups": [g.to_dict() for g in self.groups],
                "pairs": [p.to_dict() for p in self.pairs]}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _schema(path: Path) -> pa.Schema:
    """A results file's schema (.parquet, or .jsonl / .csv as the output writes them)."""
    if not _parquet(path):
        return read_result_batches(path)[0]
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None


def _table(path: Path, columns: list[str]) -> pa.Table:
    if _parquet(path):
        return pq.read_table(path, columns=columns)
    schema, batches = read_result_batches(path)
    try:
        return pa.Table.from_batches(list(batches), schema).select(columns)
    except pa.ArrowException as exc:
        raise UsageError(f"{path}: cannot be read ({exc})") from None


def _read(paths: Sequence[str | Path], by: str) -> tuple[pd.DataFrame, list[Path]]:
    import pandas as pd

    files = expand_paths(paths)
    frames = []
    for path in files:
        schema = _schema(path)
        if by != _FILE and by not in schema.names:
            raise UsageError(f"{path}: no column {by!r} to group by (--by)")
        if "id" not in schema.names:
            raise UsageError(f"{path}: no column 'id' (is it a batchrunner result file?)")
        wanted = [c for c in _COLUMNS if c in schema.names]
        if by != _FILE and by not in wanted:
            wanted.append(by)
        frame = _table(path, wanted).to_pandas()
        for name in _COLUMNS:
            if name not in frame:
                frame[name] = {"status": "ok", "model": None}.get(name, np.nan)
        frame["__group__"] = str(path) if by == _FILE else frame[by]
        frames.append(frame[[*_COLUMNS, "__group__"]])
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_COLUMNS)
    if data["score"].notna().sum() == 0:
        raise UsageError(
            "no scores in these results: score them first "
            "(batchrunner score RESULTS --metric M --reference-column COL) or run with --score"
        )
    data["score"] = data["score"].astype("float64")
    return data, files


def _group_score(key: Any, rows: pd.DataFrame, binary: bool) -> GroupScore:
    scores = rows["score"].dropna().to_numpy(dtype=np.float64)
    ok = rows[rows["status"] == "ok"]["latency_ms"].dropna().to_numpy(dtype=np.float64)
    cost = rows["cost_usd"].dropna()
    return GroupScore(
        key=key,
        rows=len(rows),
        scored=len(scores),
        score=mean_interval(scores, binary=binary),
        correct=float(scores.sum()),
        cost_usd=float(cost.sum()),
        total_tokens=int(rows["total_tokens"].fillna(0).sum()),
        latency_p50_ms=float(np.median(ok)) if len(ok) else None,
    )


def _groups(data: pd.DataFrame, binary: bool) -> list[GroupScore]:
    import pandas as pd

    out = []
    for key, rows in data.groupby("__group__", sort=True, dropna=False):
        out.append(_group_score(None if pd.isna(key) else key, rows, binary))
    return out


def _pair(a: Any, b: Any, left: pd.Series, right: pd.Series, binary: bool) -> PairComparison:
    import pandas as pd

    joined = pd.concat([left.rename("a"), right.rename("b")], axis=1, join="inner")
    x, y = joined["a"].to_numpy(np.float64), joined["b"].to_numpy(np.float64)
    wins, losses = int((x > y).sum()), int((x < y).sum())
    return PairComparison(
        a=a, b=b, paired=len(joined),
        only_a=int(len(left) - len(joined)), only_b=int(len(right) - len(joined)),
        wins=wins, ties=int(len(joined) - wins - losses), losses=losses,
        difference=paired_difference(x, y),
        mcnemar_p=mcnemar_exact(wins, losses) if binary else None,
    )


def compare(paths: Sequence[str | Path], *, by: str = "model") -> Comparison:
    """Per group scores and every pair of groups compared on the ids both answered.

    `by` is a column of the results (`model` for a sweep) or "file" (one group per file).
    A row counts as answered when it has a score; an id repeated within a group keeps its last
    row (a later file wins), except where groups are sweeps (an id with a row per model, when
    grouping by file or another column): rows are then paired by id and model.

    >>> report = compare(["out/eval-a.parquet", "out/eval-b.parquet"], by="file")
    """
    import pandas as pd

    data, files = _read(paths, by)
    scored = data["score"].dropna().to_numpy()
    binary = is_binary(scored)
    groups = _groups(data, binary)
    answered = data[data["score"].notna()].copy()
    answered["__key__"] = answered["id"].astype(str)
    if by != "model" and answered.duplicated(["__group__", "id"]).any():
        # Groups that are sweeps (files, say): an id has a row per model, so pair by both.
        answered["__key__"] += "\x1f" + answered["model"].astype(str)
    series: dict[Any, pd.Series] = {}
    for key, rows in answered.groupby("__group__", sort=True):
        rows = rows.drop_duplicates("__key__", keep="last")
        series[key] = pd.Series(rows["score"].to_numpy(), index=rows["__key__"].to_numpy())
    pairs = [
        _pair(a, b, series[a], series[b], binary)
        for a, b in itertools.combinations(sorted(series, key=str), 2)
    ]
    return Comparison(by, tuple(map(str, files)), tuple(groups), tuple(pairs), binary)


def score_summary(paths: Sequence[str | Path], *, by: str = "model") -> Comparison | None:
    """The per-group scores of `summary` (no pairs), or None when no row has a score."""
    files = [f for f in expand_paths(paths) if f.is_file()]  # not outputs still checkpoints
    if not files or not any("score" in _schema(path).names for path in files):
        return None
    try:
        data, _ = _read(files, by)
    except UsageError:
        return None
    binary = is_binary(data["score"].dropna().to_numpy())
    groups = _groups(data, binary)
    total = _group_score("TOTAL", data, binary)
    return Comparison(by, tuple(map(str, files)), (*groups, total), (), binary)


# -- rendering --------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _ci(interval: Interval) -> str:
    if interval.low is None or interval.high is None:
        return "-"
    return f"[{interval.low:.3f}, {interval.high:.3f}]"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.1e}"


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]
        ).rstrip()

    return [fmt(header), *(fmt(r) for r in rows)]


def render_groups(report: Comparison) -> list[str]:
    """The per-group lines of a table."""
    header = [report.by, "rows", "scored", "mean", "95% CI", "cost_usd", "$/correct",
              "tokens", "p50_ms"]
    rows = [
        [str(g.key), f"{g.rows:,}", f"{g.scored:,}", _num(g.score.mean), _ci(g.score),
         f"{g.cost_usd:,.6f}", _num(g.cost_per_correct, 6), f"{g.total_tokens:,}",
         _num(g.latency_p50_ms, 1)]
        for g in report.groups
    ]
    method = "Wilson" if report.binary else "t"
    return [*_aligned(header, rows), f"(95% CI: {method} interval)"]


def render_table(report: Comparison) -> str:
    """Aligned text: the groups, then every pair compared on the ids both answered."""
    lines = render_groups(report)
    if report.pairs:
        header = ["a vs b", "paired", "only_a", "only_b", "wins", "ties", "losses",
                  "diff", "95% CI", "mcnemar_p"]
        rows = [
            [f"{p.a} vs {p.b}", f"{p.paired:,}", f"{p.only_a:,}", f"{p.only_b:,}",
             f"{p.wins:,}", f"{p.ties:,}", f"{p.losses:,}",
             "-" if p.difference.mean is None else f"{p.difference.mean:+.3f}",
             _ci(p.difference), _p(p.mcnemar_p)]
            for p in report.pairs
        ]
        lines += ["", *_aligned(header, rows),
                  "(pairs by id on rows both scored; diff = mean score of a - b, t interval; "
                  "McNemar exact, for 0/1 scores)"]
    return "\n".join(lines)


def to_json(report: Comparison) -> str:
    """The report as one JSON document."""
    return json.dumps(report.to_dict(), indent=2, allow_nan=False)


_CSV = ("level", "group", "other", "rows", "scored", "mean", "ci_low", "ci_high", "correct",
        "cost_usd", "cost_per_correct", "total_tokens", "latency_p50_ms", "paired", "only_a",
        "only_b", "wins", "ties", "losses", "mcnemar_p")


def to_csv(report: Comparison) -> str:
    """The report as CSV: `level` = group rows, then `level` = pair rows (`mean` and the CI
    are then the paired mean difference); cells that do not apply are empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for g in report.groups:
        data = g.to_dict()
        writer.writerow({**data, "level": "group", "mean": data["mean"],
                         **{k: "" if v is None else v for k, v in data.items()}})
    for p in report.pairs:
        data = p.to_dict()
        writer.writerow({"level": "pair", "group": data["a"], "other": data["b"],
                         "mean": data["mean_difference"], **{
                             k: "" if v is None else v for k, v in data.items()
                             if k in _CSV}})
    return buf.getvalue().rstrip("\n")
