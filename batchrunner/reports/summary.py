"""Usage and cost summaries of result files (docs/cost.md), aggregated by group or by day.

    >>> report = summarize(["out/*.parquet"], by="model", prices=PriceTable.load())

Summaries read only the columns they need and aggregate with numpy, never row by row in Python:
ten million result rows take a few seconds. An output whose run is going on or was interrupted
is read from its checkpoint (reading the files: `batchrunner.reports.result_files`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.answers.structured import StructuredSummary, summarize_files
from batchrunner.config.pricing import PRICES_AS_OF, PriceTable
from batchrunner.reports.columns import (
    as_bools,
    as_counts,
    as_floats,
    codes_of,
    day_codes,
    grouped_quantiles,
    hashable,
)
from batchrunner.reports.result_files import (
    _DAY,
    _checkpoint_batches,
    _names,
    _read_batches,
    _read_from_checkpoint,
    expand_paths,
)
from batchrunner.store.failures import ErrorCount, merge_counts, value_counts
from batchrunner.store.segments import RESULT_SCHEMA

__all__ = ["GroupSummary", "SummaryReport", "summarize", "summarize_days"]

_TOKENS = ("prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """Usage, cost and latency of the rows of one group (or of all rows, for the total).

    `cost_usd` is None when any row of the group reported usage but has no cost (a model with
    no price): the sum would silently be too low. `cost_usd_known` is then the cost of the
    priced rows alone, a lower bound, and `unpriced_rows` counts the others. Rows with no usage
    at all (input errors, requests that got no answer) cost nothing and are not unpriced.
    Latencies are over the ok rows (linear interpolation between ranks, as numpy's default);
    None where a group has no ok row with a latency.
    """

    key: Any
    rows: int
    ok: int
    errors: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    cost_usd_known: float
    unpriced_rows: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    cache_hits: int = 0  # rows served from the response cache: their cost is not in cost_usd
    reused_cost_usd: float = 0.0  # what those rows cost when first paid (the files' cost_usd)
    # completion_tokens_details.reasoning_tokens: a part of completion_tokens, not added to it
    reasoning_tokens: int = 0
    # ok rows with no answer because reasoning used up the limit (finish_reason "length",
    # every completion token a reasoning token): raise max_completion_tokens for them
    reasoning_cut_rows: int = 0
    # rows answered through the Batch API (a non-null `batch_id`): priced at batch prices
    batch_rows: int = 0
    # what the gateway's prompt cache saved: the cached prompt tokens priced in full less what
    # was paid for them (at batch prices for batch rows); None where a model with cached
    # tokens has no price
    cache_saving_usd: float | None = 0.0

    @property
    def cached_share(self) -> float | None:
        """The share of prompt tokens the gateway's prompt cache served (None: no prompt)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def reasoning_share(self) -> float | None:
        """The share of completion tokens spent reasoning (None without completion tokens)."""
        return self.reasoning_tokens / self.completion_tokens if self.completion_tokens else None


_FIGURES = tuple(f for f in GroupSummary.__slots__ if f != "key")  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class SummaryReport:
    """A summary of result files: one `GroupSummary` per value of `by`, and their total.

    `cost_source` is "prices" when costs were recomputed from the usage columns and a price
    table, "files" when the files' own `cost_usd` column was summed.
    """

    by: str
    groups: tuple[GroupSummary, ...]
    total: GroupSummary
    files: tuple[str, ...]
    cost_source: str
    unpriced_models: tuple[str | None, ...] = ()  # models of the rows counted unpriced
    prices_as_of: str | None = None  # the built-in prices' date, when costs were recomputed
    prices_file: str | None = None  # the price file overlaid on them, if any
    errors: tuple[ErrorCount, ...] = ()  # the most frequent errors, most first
    from_checkpoint: tuple[str, ...] = ()  # outputs read from their checkpoint (not finished)
    structured: StructuredSummary | None = None  # for files of --json-schema runs (docs/structured.md)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the same figures as the table, at full precision."""
        return {
            "by": self.by,
            "cost_source": self.cost_source,
            "prices_as_of": self.prices_as_of,
            "prices_file": self.prices_file,
            "files": list(self.files),
            "unpriced_models": list(self.unpriced_models),
            "errors": [e.to_dict() for e in self.errors],
            "from_checkpoint": list(self.from_checkpoint),
            "groups": [
                _plain(asdict(g) | {"reasoning_share": g.reasoning_share,
                                    "cached_share": g.cached_share})
                for g in self.groups
            ],
            "total": _plain(
                {k: v for k, v in asdict(self.total).items() if k != "key"}
                | {"reasoning_share": self.total.reasoning_share,
                   "cached_share": self.total.cached_share}
            ),
        } | ({"structured": self.structured.to_dict()} if self.structured else {})


def summarize(
    paths: Sequence[str | Path],
    *,
    by: str = "model",
    prices: PriceTable | None = None,
) -> SummaryReport:
    """Usage, cost and latency of one or many result files, per value of column `by`.

    `paths` may hold globs and folders (see `expand_paths`). `by` is any column of the files:
    `model` (the model requested), `status`, or a carried input column; a file without it is a
    UsageError naming the column and the file. With `prices`, each row's cost is recomputed
    from its usage columns and the table (a model the table lacks is warned about once and its
    rows are unpriced); without, the files' `cost_usd` column is summed, and rows with usage
    but a null `cost_usd` are unpriced. See `GroupSummary` for what each figure means.

    >>> report = summarize(["runs/2026-11-*.parquet"], by="dataset")
    """
    files = expand_paths(paths)
    report = _aggregate(files, by, prices)
    written = [f for f in files if not _read_from_checkpoint(f)]  # structured figures: files
    return replace(report, structured=summarize_files(written))


def summarize_days(
    paths: Sequence[str | Path], *, prices: PriceTable | None = None
) -> SummaryReport:
    """Like `summarize`, per UTC day (`by` is "day", keys are "YYYY-MM-DD" strings).

    A row's day is that of its `created` (or `created_at`) column where the file has one and the
    row's value is set (epoch seconds, or a timestamp); else the file's modification time, as
    result files have no timestamp column of their own.
    """
    return _aggregate(expand_paths(paths), _DAY, prices)


class _Groups:
    """Values of a grouping key seen across files, each given a dense global id."""

    def __init__(self) -> None:
        self.ids: dict[Any, int] = {}
        self.values: list[Any] = []

    def lookup(self, uniques: list[Any], codes: np.ndarray) -> np.ndarray:
        """The global id of each row, from a file's codes into its unique values."""
        used = np.bincount(codes, minlength=len(uniques)) > 0
        out = np.full(len(uniques), -1, dtype=np.int64)
        for i in np.flatnonzero(used):
            value = uniques[i]
            key = hashable(value)
            gid = self.ids.get(key)
            if gid is None:
                gid = self.ids[key] = len(self.values)
                self.values.append(value)
            out[i] = gid
        return out[codes]


# Per (group, model) sums, in this order.
_SUMS = (
    "rows",
    "ok",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
    "billable",  # rows that reported any usage
    "complete",  # rows with both prompt and completion counts: those that can be priced
    "c_prompt",
    "c_cached",
    "c_completion",
    "file_cost",  # sum of the file's non-null cost_usd
    "file_uncosted",  # billable rows whose cost_usd is null
    "hits",  # rows served from the response cache (not paid: out of every cost sum above)
    "reused",  # their cost when first paid, from the files' cost_usd
    "reasoning_tokens",
    "reasoning_cut",  # ok rows left empty by reasoning that used up the limit
    "batch",  # rows answered through the Batch API (a non-null batch_id)
    "b_prompt",  # the c_ sums of those rows: priced at batch prices (c_ holds the others)
    "b_cached",
    "b_completion",
)
# older files lack some (batch_id: outputs of runs before --engine batch)
_OPTIONAL = ("cache_hit", "cost_usd", "reasoning_tokens", "finish_reason", "batch_id")


def _aggregate(files: Sequence[Path], by: str, prices: PriceTable | None) -> SummaryReport:
    keys, models = _Groups(), _Groups()
    pair_keys: list[np.ndarray] = []
    pair_models: list[np.ndarray] = []
    pair_sums: list[np.ndarray] = []
    lat_keys: list[np.ndarray] = []
    lat_values: list[np.ndarray] = []

    needed = ["model", "status", *_TOKENS, "latency_ms", "error"]
    if prices is None:
        needed.append("cost_usd")
    error_pairs: list[tuple[str, int]] = []
    from_checkpoint: list[str] = []
    for path in files:
        if _read_from_checkpoint(path):
            from_checkpoint.append(str(path))
            # the checkpoint has every result column of its schema (cache_hit, cost_usd)
            extra = [c for c in _OPTIONAL if c not in needed and c in _CHECKPOINT_COLUMNS]
            batches = _checkpoint_batches(path, by, [*needed, *extra])
        else:
            extra = [c for c in _OPTIONAL if c in _names(path) and c not in needed]
            batches = _read_batches(path, by, [*needed, *extra])
        for table in batches:
            failed = table.filter(pc.fill_null(pc.not_equal(table.column("status"), "ok"), True))
            error_pairs.extend(value_counts(failed.column("error")))
            tally = _tally(table, path, by, prices is not None, keys, models)
            pair_keys.append(tally.pair_keys)
            pair_models.append(tally.pair_models)
            pair_sums.append(tally.sums)
            lat_keys.append(tally.latency_keys)
            lat_values.append(tally.latencies)

    nkeys = len(keys.values)
    pk = np.concatenate(pair_keys) if pair_keys else np.zeros(0, np.int64)
    pm = np.concatenate(pair_models) if pair_models else np.zeros(0, np.int64)
    sums = np.concatenate(pair_sums, axis=1) if pair_sums else np.zeros((len(_SUMS), 0))
    s = dict(zip(_SUMS, sums, strict=True))

    # Cost per (key, model) pair: linear in the token sums, so priced once per pair, not per row.
    # What the prompt cache saved needs prices too: the table given, else the built-in one.
    saving_prices = prices if prices is not None else PriceTable.builtin()
    rates = [saving_prices.get(m) for m in models.values]
    online_rates = np.array(
        [p.rates() if p else (0.0, 0.0, 0.0) for p in rates]).reshape(-1, 3)
    batch_rates = np.array(
        [p.rates(batch=True) if p else (0.0, 0.0, 0.0) for p in rates]).reshape(-1, 3)
    ro = online_rates[pm] if len(pm) else np.zeros((0, 3))
    rb = batch_rates[pm] if len(pm) else np.zeros((0, 3))
    pair_saving = (s["c_cached"] * (ro[:, 0] - ro[:, 1])
                   + s["b_cached"] * (rb[:, 0] - rb[:, 1])) / 1e6
    has_rate = np.array([p is not None for p in rates], dtype=bool)
    pair_unknown_saving = (
        (~has_rate[pm]) & ((s["c_cached"] + s["b_cached"]) > 0)
        if len(pm) else np.zeros(0, dtype=bool)
    )
    if prices is None:
        pair_cost = s["file_cost"]
        pair_unpriced = s["file_uncosted"]
        unpriced_models = {models.values[m] for m in np.unique(pm[pair_unpriced > 0])}
    else:
        # Warn (once per table) only about models that have usage to price.
        billable_by_model = np.bincount(pm, weights=s["billable"], minlength=len(models.values))
        price_of = [
            prices.get(m, warn=bool(b > 0))
            for m, b in zip(models.values, billable_by_model, strict=True)
        ]
        known = np.array([p is not None for p in price_of], dtype=bool)
        rate = np.array(
            [(p.input, p.cached_input, p.output) if p else (0.0, 0.0, 0.0) for p in price_of]
        ).reshape(-1, 3)
        r = rate[pm] if len(pm) else np.zeros((0, 3))
        pair_cost = (
            (s["c_prompt"] - s["c_cached"]) * r[:, 0]
            + s["c_cached"] * r[:, 1]
            + s["c_completion"] * r[:, 2]
            + (s["b_prompt"] - s["b_cached"]) * rb[:, 0]
            + s["b_cached"] * rb[:, 1]
            + s["b_completion"] * rb[:, 2]
        ) / 1e6
        pair_unpriced = np.where(known[pm], s["billable"] - s["complete"], s["billable"])
        unpriced_models = {models.values[m] for m in np.unique(pm[pair_unpriced > 0])}

    def per_key(values: np.ndarray) -> np.ndarray:
        return np.bincount(pk, weights=values, minlength=nkeys)

    by_key = {
        name: per_key(s[name])
        for name in ("rows", "ok", *_TOKENS, "hits", "reused", "reasoning_tokens", "reasoning_cut",
                     "batch")
    }
    by_key["saving"] = per_key(pair_saving)
    by_key["saving_unknown"] = per_key(pair_unknown_saving.astype(float))
    cost_by_key = per_key(pair_cost)
    unpriced_by_key = per_key(pair_unpriced)
    lk = np.concatenate(lat_keys) if lat_keys else np.zeros(0, np.int64)
    lv = np.concatenate(lat_values) if lat_values else np.zeros(0)
    p50, p95 = grouped_quantiles(lk, lv, nkeys, (0.50, 0.95))

    groups = [
        _group(
            keys.values[g],
            {name: by_key[name][g] for name in by_key},
            cost_by_key[g],
            unpriced_by_key[g],
            p50[g],
            p95[g],
        )
        for g in range(nkeys)
    ]
    groups.sort(key=_sort_key)
    total_p50, total_p95 = (
        (float(np.percentile(lv, 50)), float(np.percentile(lv, 95))) if len(lv) else (None, None)
    )
    total = _group(
        None,
        {name: by_key[name].sum() for name in by_key},
        float(cost_by_key.sum()),
        unpriced_by_key.sum(),
        total_p50,
        total_p95,
    )
    return SummaryReport(
        by="day" if by == _DAY else by,
        groups=tuple(groups),
        total=total,
        files=tuple(str(p) for p in files),
        cost_source="files" if prices is None else "prices",
        unpriced_models=tuple(sorted(unpriced_models, key=lambda m: (m is None, str(m)))),
        prices_as_of=None if prices is None else PRICES_AS_OF,
        prices_file=None if prices is None or prices.source is None else str(prices.source),
        errors=merge_counts(error_pairs),
        from_checkpoint=tuple(from_checkpoint),
    )


@dataclass(frozen=True, slots=True)
class _Tally:
    """The sums of one batch of rows per (key, model) pair, and its ok rows' latencies."""

    pair_keys: np.ndarray
    pair_models: np.ndarray
    sums: np.ndarray  # one row per name of _SUMS, one column per pair
    latency_keys: np.ndarray
    latencies: np.ndarray


def _tally(
    table: pa.Table, path: Path, by: str, recompute: bool, keys: _Groups, models: _Groups
) -> _Tally:
    """Vectorised sums of one batch; keys and models get global ids from `keys`, `models`."""
    n = table.num_rows
    if by == _DAY:
        kcodes, kuniques = day_codes(table, path)
    else:
        kcodes, kuniques = codes_of(table.column(by), by, path)
    mcodes, muniques = kcodes, kuniques
    if by != "model":
        mcodes, muniques = codes_of(table.column("model"), "model", path)
    kglobal = keys.lookup(kuniques, kcodes)
    mglobal = models.lookup(muniques, mcodes)

    scodes, suniques = codes_of(table.column("status"), "status", path)
    ok = np.isin(scodes, [i for i, v in enumerate(suniques) if v == "ok"])
    counts = {name: as_counts(table.column(name)) for name in _TOKENS}
    valid = {name: as_bools(pc.is_valid(table.column(name))) for name in _TOKENS}
    billable = valid["prompt_tokens"] | valid["completion_tokens"] | valid["total_tokens"]
    complete = valid["prompt_tokens"] & valid["completion_tokens"]
    hit = (as_bools(pc.fill_null(table.column("cache_hit"), False))
           if "cache_hit" in table.column_names else np.zeros(n, dtype=bool))
    reused = (np.where(hit, as_floats(pc.fill_null(table.column("cost_usd"), 0.0)), 0.0)
              if hit.any() else np.zeros(n))
    billable, complete = billable & ~hit, complete & ~hit  # a cache hit was not paid for
    names = table.column_names
    reasoning = (as_counts(table.column("reasoning_tokens")) if "reasoning_tokens" in names
                 else np.zeros(n))
    batch = (as_bools(pc.is_valid(table.column("batch_id"))) if "batch_id" in names
             else np.zeros(n, dtype=bool))
    online = complete & ~batch
    answered_in_batch = complete & batch
    cut = np.zeros(n, dtype=bool)
    if "finish_reason" in names and reasoning.any():
        length = as_bools(pc.fill_null(pc.equal(table.column("finish_reason"), "length"), False))
        cut = ok & length & (reasoning > 0) & (reasoning >= counts["completion_tokens"])
    if not recompute:
        cost_col = table.column("cost_usd")
        file_cost = np.where(hit, 0.0, as_floats(pc.fill_null(cost_col, 0.0)))
        uncosted = billable & ~as_bools(pc.is_valid(cost_col))
    else:
        file_cost = np.zeros(n)
        uncosted = np.zeros(n, dtype=bool)
    columns = (
        np.ones(n),
        ok,
        counts["prompt_tokens"],
        counts["cached_tokens"],
        counts["completion_tokens"],
        counts["total_tokens"],
        billable,
        complete,
        np.where(online, counts["prompt_tokens"], 0),
        np.where(online, counts["cached_tokens"], 0),
        np.where(online, counts["completion_tokens"], 0),
        file_cost,
        uncosted,
        hit,
        reused,
        reasoning,
        cut,
        batch,
        np.where(answered_in_batch, counts["prompt_tokens"], 0),
        np.where(answered_in_batch, counts["cached_tokens"], 0),
        np.where(answered_in_batch, counts["completion_tokens"], 0),
    )
    # Group rows by (key, model) pair: a dense pair index, then one bincount per sum.
    width = int(mglobal.max(initial=0)) + 1
    pair = kglobal * width + mglobal
    space = int(pair.max(initial=-1)) + 1
    if space <= 4 * n + 1024:  # dense enough to count into directly
        inverse, pairs = pair, np.arange(space)
    else:
        pairs, inverse = np.unique(pair, return_inverse=True)
    sums = np.stack([np.bincount(inverse, weights=c, minlength=len(pairs)) for c in columns])
    seen = sums[0] > 0

    latency = as_floats(table.column("latency_ms"))
    timed = ok & ~np.isnan(latency)
    return _Tally(pairs[seen] // width, pairs[seen] % width, sums[:, seen],
                  kglobal[timed].astype(np.int32), latency[timed])


def _group(
    key: Any,
    sums: dict[str, Any],
    cost: float,
    unpriced: float,
    p50: float | None,
    p95: float | None,
) -> GroupSummary:
    rows, ok = int(round(sums["rows"])), int(round(sums["ok"]))
    unpriced_rows = int(round(unpriced))
    cost = float(cost)
    return GroupSummary(
        key=key,
        rows=rows,
        ok=ok,
        errors=rows - ok,
        prompt_tokens=int(round(sums["prompt_tokens"])),
        cached_tokens=int(round(sums["cached_tokens"])),
        completion_tokens=int(round(sums["completion_tokens"])),
        total_tokens=int(round(sums["total_tokens"])),
        cost_usd=None if unpriced_rows else cost,
        cost_usd_known=cost,
        unpriced_rows=unpriced_rows,
        latency_p50_ms=None if p50 is None or math.isnan(p50) else float(p50),
        latency_p95_ms=None if p95 is None or math.isnan(p95) else float(p95),
        cache_hits=int(round(sums.get("hits", 0))),
        reused_cost_usd=float(sums.get("reused", 0.0)),
        reasoning_tokens=int(round(sums.get("reasoning_tokens", 0))),
        reasoning_cut_rows=int(round(sums.get("reasoning_cut", 0))),
        batch_rows=int(round(sums.get("batch", 0))),
        cache_saving_usd=None if sums.get("saving_unknown", 0) > 0
        else float(sums.get("saving", 0.0)),
    )


_CHECKPOINT_COLUMNS = frozenset(RESULT_SCHEMA.names)


def _sort_key(group: GroupSummary) -> tuple[int, str, Any]:
    key = group.key
    if key is None:
        return (2, "", 0)
    if isinstance(key, int | float) and not isinstance(key, bool):
        return (0, "", key)
    return (1, str(key), 0)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_value(v) for k, v in data.items()}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
