"""Usage and cost reports over result files, and cost estimates before a run (SPEC section 9).

    >>> report = summarize(["out/*.parquet"], by="model", prices=PriceTable.load())
    >>> print(render_table(report))
    >>> plot_summary(["out/*.parquet"], Path("usage.png"))
    >>> print(render_estimate(estimate(config, prices=PriceTable.load())))

Summaries read only the columns they need and aggregate with numpy, never row by row in Python:
ten million result rows take a few seconds. The renderers (`render_table`, `to_json`, `to_csv`,
`render_estimate`) return text and print nothing; the CLI decides where it goes.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .checkpoint import RESULT_SCHEMA, checkpoint_dir, checkpoint_results
from .config import RunConfig
from .errors import UsageError
from .failures import ErrorCount, merge_counts, render_errors, value_counts
from .pricing import PRICES_AS_OF, PriceTable
from .requests import CHARS_PER_TOKEN, MESSAGE_TOKENS, REPLY_TOKENS
from .structured import StructuredSummary, summarize_files

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

# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------

_TOKENS = ("prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens")
_DAY = "__day__"  # pseudo-column: the UTC day of each row (a `created` column, else file mtime)
_DAY_COLUMNS = ("created", "created_at")


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
    structured: StructuredSummary | None = None  # SPEC 17, for files of --json-schema runs

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
            "groups": [_plain(asdict(g)) for g in self.groups],
            "total": _plain({k: v for k, v in asdict(self.total).items() if k != "key"}),
        } | ({"structured": self.structured.to_dict()} if self.structured else {})


def expand_paths(paths: Iterable[str | Path], *, what: str = "results") -> list[Path]:
    """Files named by `paths`: globs expanded (`**` too), folders give their `*.parquet`.

    An output whose run is going on or was interrupted counts as a file too (its checkpoint
    is read). A path or pattern that matches no file is a UsageError naming it; a file matched
    twice is read once.
    """
    found: dict[str, Path] = {}
    for raw in paths:
        text = str(raw)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            matches += _unfinished_outputs(glob.glob(text + ".checkpoint", recursive=True))
        elif os.path.isdir(text):
            matches = sorted(glob.glob(os.path.join(glob.escape(text), "*.parquet")))
            matches += _unfinished_outputs(
                glob.glob(os.path.join(glob.escape(text), "*.parquet.checkpoint"))
            )
        else:
            matches = [text] if os.path.isfile(text) or _has_checkpoint(Path(text)) else []
        if not matches:
            raise UsageError(f"{what}: no file matches {text}")
        for m in matches:
            found.setdefault(os.path.realpath(m), Path(m))
    if not found:
        raise UsageError(f"{what}: no file given")
    return list(found.values())


_CHECKPOINT = ".checkpoint"


def _has_checkpoint(output: Path) -> bool:
    return (checkpoint_dir(output) / "manifest.json").is_file()


def _unfinished_outputs(folders: Iterable[str]) -> list[str]:
    """The outputs of checkpoint folders that have no output file yet."""
    outputs = [f[: -len(_CHECKPOINT)] for f in sorted(folders) if f.endswith(_CHECKPOINT)]
    return [o for o in outputs if not os.path.isfile(o) and _has_checkpoint(Path(o))]


def _read_from_checkpoint(output: Path) -> bool:
    """True when the summary of `output` must come from its checkpoint: the run is going on,
    was interrupted, or is going again (the file, if any, is not the latest)."""
    manifest = checkpoint_dir(output) / "manifest.json"
    try:
        finished = json.loads(manifest.read_text()).get("finished")
    except (OSError, ValueError):
        return False
    return not (finished and output.is_file())


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
            key = _hashable(value)
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
)


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
            # the checkpoint has every result column (cache_hit and cost_usd included)
            extra = [c for c in ("cache_hit", "cost_usd") if c not in needed]
            batches = _checkpoint_batches(path, by, [*needed, *extra])
        else:
            extra = [c for c in ("cache_hit", "cost_usd") if c in _names(path) and c not in needed]
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
        ) / 1e6
        pair_unpriced = np.where(known[pm], s["billable"] - s["complete"], s["billable"])
        unpriced_models = {models.values[m] for m in np.unique(pm[pair_unpriced > 0])}

    def per_key(values: np.ndarray) -> np.ndarray:
        return np.bincount(pk, weights=values, minlength=nkeys)

    by_key = {name: per_key(s[name]) for name in ("rows", "ok", *_TOKENS, "hits", "reused")}
    cost_by_key = per_key(pair_cost)
    unpriced_by_key = per_key(pair_unpriced)
    lk = np.concatenate(lat_keys) if lat_keys else np.zeros(0, np.int64)
    lv = np.concatenate(lat_values) if lat_values else np.zeros(0)
    p50, p95 = _grouped_quantiles(lk, lv, nkeys, (0.50, 0.95))

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
        kcodes, kuniques = _day_codes(table, path)
    else:
        kcodes, kuniques = _codes(table.column(by), by, path)
    mcodes, muniques = kcodes, kuniques
    if by != "model":
        mcodes, muniques = _codes(table.column("model"), "model", path)
    kglobal = keys.lookup(kuniques, kcodes)
    mglobal = models.lookup(muniques, mcodes)

    scodes, suniques = _codes(table.column("status"), "status", path)
    ok = np.isin(scodes, [i for i, v in enumerate(suniques) if v == "ok"])
    counts = {name: _counts(table.column(name)) for name in _TOKENS}
    valid = {name: _bool(pc.is_valid(table.column(name))) for name in _TOKENS}
    billable = valid["prompt_tokens"] | valid["completion_tokens"] | valid["total_tokens"]
    complete = valid["prompt_tokens"] & valid["completion_tokens"]
    hit = (_bool(pc.fill_null(table.column("cache_hit"), False))
           if "cache_hit" in table.column_names else np.zeros(n, dtype=bool))
    reused = (np.where(hit, _floats(pc.fill_null(table.column("cost_usd"), 0.0)), 0.0)
              if hit.any() else np.zeros(n))
    billable, complete = billable & ~hit, complete & ~hit  # a cache hit was not paid for
    if not recompute:
        cost_col = table.column("cost_usd")
        file_cost = np.where(hit, 0.0, _floats(pc.fill_null(cost_col, 0.0)))
        uncosted = billable & ~_bool(pc.is_valid(cost_col))
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
        np.where(complete, counts["prompt_tokens"], 0),
        np.where(complete, counts["cached_tokens"], 0),
        np.where(complete, counts["completion_tokens"], 0),
        file_cost,
        uncosted,
        hit,
        reused,
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

    latency = _floats(table.column("latency_ms"))
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
    )


def _names(path: Path) -> list[str]:
    """A result file's column names (none when it cannot be read: _read_batches says why)."""
    try:
        return pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        return []


def _grouped_quantiles(
    keys: np.ndarray, values: np.ndarray, nkeys: int, qs: Sequence[float]
) -> list[np.ndarray]:
    """Per-key quantiles of `values`, exactly as numpy's default (linear) method; NaN if empty.

    Rows are bucketed by key with one stable sort (a radix sort for small key counts), then each
    bucket is partitioned (O(n)) rather than sorted; many small buckets are sorted as one array.
    """
    out = [np.full(nkeys, np.nan) for _ in qs]
    if not len(values):
        return out
    if nkeys <= _PARTITION_MAX_GROUPS:
        order = np.argsort(keys.astype(np.uint16), kind="stable")
        values = values[order]
        counts = np.bincount(keys, minlength=nkeys)
        bounds = np.concatenate(([0], np.cumsum(counts)))
        for g in np.flatnonzero(counts):
            found = np.percentile(values[bounds[g] : bounds[g + 1]], [q * 100 for q in qs])
            for result, value in zip(out, found, strict=True):
                result[g] = value
        return out
    order = np.lexsort((values, keys))
    keys, values = keys[order], values[order]
    counts = np.bincount(keys, minlength=nkeys)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    has = counts > 0
    last = starts[has] + counts[has] - 1
    for result, q in zip(out, qs, strict=True):
        pos = starts[has] + q * (counts[has] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        result[has] = values[lo] + (values[hi] - values[lo]) * (pos - lo)
    return out


_PARTITION_MAX_GROUPS = 2_000  # fits uint16; above it one lexsort beats a loop of partitions


_BATCH_ROWS = 1 << 18  # rows aggregated at a time: memory stays flat however large a file


def _read_batches(path: Path, by: str, needed: Sequence[str]) -> Iterator[pa.Table]:
    """Only the columns a summary needs, from one result file, a batch at a time.

    Errors name the file (and the column).
    """
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None
    columns = list(dict.fromkeys(needed))
    if by == _DAY:
        columns += [c for c in _DAY_COLUMNS if c in schema.names][:1]
    elif by not in columns:
        columns.append(by)
    for name in columns:
        if name not in schema.names:
            if name == by:
                raise UsageError(f"{path}: no column {name!r} to group by (--by)")
            raise UsageError(f"{path}: no column {name!r} (is it a batchrunner result file?)")
    # Result files store these dictionary-encoded: reading them so skips decoding and rehashing.
    strings = [
        c
        for c in columns
        if c in (by, "model", "status")
        and (pa.types.is_string(schema.field(c).type)
             or pa.types.is_large_string(schema.field(c).type))
    ]
    try:
        pf = pq.ParquetFile(path, read_dictionary=strings)
        if pf.metadata.num_rows == 0:
            yield schema.empty_table().select(columns)
            return
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([batch])
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: cannot be read ({exc})") from None


def _checkpoint_batches(output: Path, by: str, needed: Sequence[str]) -> Iterator[pa.Table]:
    """The results so far of an unfinished output, from its checkpoint (result columns only)."""
    columns = list(dict.fromkeys(needed))
    if by != _DAY and by not in columns:
        if by not in RESULT_SCHEMA.names:
            raise UsageError(
                f"{output}: the run has not finished, and its checkpoint holds the result "
                f"columns only, not {by!r}: group by a result column (model, status) until "
                "the output is written"
            )
        columns.append(by)
    table, _rows = checkpoint_results(output, columns)
    yield table


def _codes(column: pa.ChunkedArray, name: str, path: Path) -> tuple[np.ndarray, list[Any]]:
    """Dense codes of a column's values, and the values; null is the last value."""
    try:
        if pa.types.is_dictionary(column.type):
            column = pa.table({"c": column}).unify_dictionaries().column("c")
        else:
            column = pc.dictionary_encode(column)
    except (pa.ArrowException, TypeError) as exc:
        raise UsageError(
            f"{path}: cannot group by column {name!r} of type {column.type} ({exc})"
        ) from None
    chunks = column.chunks
    dictionary = chunks[0].dictionary if chunks else pa.array([], type=pa.null())
    uniques = dictionary.to_pylist()
    null_code = len(uniques)
    if chunks:
        indices = pa.chunked_array([c.indices for c in chunks])
        codes = pc.fill_null(indices, null_code).to_numpy().astype(np.int64)
    else:
        codes = np.zeros(0, dtype=np.int64)
    return codes, [*uniques, None]


def _day_codes(table: pa.Table, path: Path) -> tuple[np.ndarray, list[Any]]:
    """The UTC day of each row: from a `created` column where set, else the file's mtime."""
    n = table.num_rows
    stat_path = path if path.exists() else checkpoint_dir(path)  # an unfinished output
    mtime_day = np.datetime64(int(os.stat(stat_path).st_mtime), "s").astype("datetime64[D]")
    days = np.full(n, mtime_day)
    created = next((c for c in _DAY_COLUMNS if c in table.column_names), None)
    if created is not None:
        col = table.column(created)
        if pa.types.is_timestamp(col.type):
            scale = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[col.type.unit]
            seconds = _floats(col.cast(pa.int64()).cast(pa.float64())) / scale
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            seconds = _floats(col.cast(pa.float64()))  # epoch seconds, like OpenAI's `created`
        else:
            seconds = np.full(n, np.nan)
        have = ~np.isnan(seconds)
        days[have] = seconds[have].astype("datetime64[s]").astype("datetime64[D]")
    uniques, codes = np.unique(days, return_inverse=True)
    return codes.astype(np.int64), [str(d) for d in uniques]


def _bool(values: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)


def _counts(values: pa.ChunkedArray) -> np.ndarray:
    # float64, as bincount weights are: exact for sums below 2**53 tokens.
    return pc.fill_null(values, 0).to_numpy().astype(np.float64)


def _floats(values: pa.ChunkedArray) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(np.float64)


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


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


# Rendering -----------------------------------------------------------------------------------

_TABLE_COLUMNS = (
    ("rows", "rows"),
    ("ok", "ok"),
    ("errors", "errors"),
    ("prompt_tokens", "prompt"),
    ("cached_tokens", "cached"),
    ("completion_tokens", "completion"),
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
    header = [report.by, *(title for _, title in _TABLE_COLUMNS)]
    lines = [[_key_text(g.key), *_cells(g)] for g in report.groups]
    lines.append(["TOTAL", *_cells(report.total)])
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


def _cells(g: GroupSummary) -> list[str]:
    cells = []
    for name, _ in _TABLE_COLUMNS:
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


# Plot ----------------------------------------------------------------------------------------

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
        raise UsageError(f"cannot write the plot {out}: {exc.strerror or exc}") from None
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


# ---------------------------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------------------------

#: The prompt-token rule of an estimate is requests.py's (CHARS_PER_TOKEN, MESSAGE_TOKENS,
#: REPLY_TOKENS); its range allows 6 (plain English prose) to 2 (code, Cyrillic) characters a
#: token. CJK text can fall outside it: calibrate.
CHARS_PER_TOKEN_LOW, CHARS_PER_TOKEN_HIGH = 6.0, 2.0
#: A calibrated range is the expected figure +- this many standard deviations of a total of
#: that many rows, given how the calibration rows varied (a prediction interval that assumes
#: the calibration run is representative of the job: same kind of prompts and answers).
SPREAD_SIGMAS = 3.0
#: ...but never narrower than this share of the expected figure either way: another job's
#: prompts and answers differ from the calibration run's by more than sampling noise (other
#: words, other tokens per character), which the rows' own spread cannot show.
CALIBRATED_MIN_MARGIN = 0.10
#: At most this many rows of the calibration files are read (the first ones).
CALIBRATION_MAX_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class Range:
    """An estimated figure: `low` <= `expected` <= `high`.

    `expected` is None when nothing says where in the range the figure lies (completion
    length before any calibration); `high` is None when there is no upper bound (rows with no
    `max_tokens` and no calibration).
    """

    low: float
    expected: float | None
    high: float | None

    def __add__(self, other: Range) -> Range:
        return Range(
            self.low + other.low,
            None if self.expected is None or other.expected is None
            else self.expected + other.expected,
            None if self.high is None or other.high is None else self.high + other.high,
        )


_ZERO = Range(0, 0, 0)


@dataclass(frozen=True, slots=True)
class Calibration:
    """What finished results say about a job's tokens, from their ok rows."""

    files: tuple[str, ...]
    rows: int
    chars: int
    tokens_per_char: float  # prompt tokens beyond the per-message framing, per character
    prompt_residual_std: float  # per row, tokens
    completion_mean: float  # per request (all n choices), tokens
    completion_std: float
    cached_fraction: float  # of prompt tokens


@dataclass(frozen=True, slots=True)
class ModelEstimate:
    """The estimate for the rows of one model; `cost_usd` is None for a model with no price."""

    model: str | None
    rows: int
    prompt_tokens: Range
    completion_tokens: Range
    cost_usd: Range | None


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a run would send and cost, computed from the input alone (nothing is sent).

    Token and cost figures cover the rows that would be sent (not input errors). `cost_usd` is
    None when some of those rows ask for a model with no price (`unpriced_rows`); then
    `cost_usd_known` is the estimate for the priced rows alone. Costs assume no cache hits,
    except that a calibrated estimate applies the calibration run's share of cached prompt
    tokens to its low and expected figures.
    """

    input: str
    rows: int
    rows_to_send: int
    input_errors: int
    chars: int
    messages: int
    unbounded_rows: int  # rows with no max_tokens: no upper bound on their completions
    prompt_tokens: Range
    completion_tokens: Range
    cost_usd: Range | None
    cost_usd_known: Range
    unpriced_rows: int
    models: tuple[ModelEstimate, ...]
    calibration: Calibration | None = None
    prices_as_of: str = PRICES_AS_OF
    prices_file: str | None = None
    done_rows: int = 0  # rows the output's checkpoint already has a result for: not sent
    checkpoint: str | None = None  # the output whose checkpoint was read, if any
    checkpoint_note: str | None = None  # why a checkpoint was not used
    cached_rows: int = 0  # with --cache: rows the response cache holds (not sent, no cost)

    @property
    def unpriced_models(self) -> tuple[str | None, ...]:
        """The models of rows that have no price."""
        return tuple(m.model for m in self.models if m.cost_usd is None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the figures of `render_estimate`, costs at full precision."""
        data = asdict(self)
        data["unpriced_models"] = list(self.unpriced_models)
        data["rule"] = _RULE
        return _plain_tree(data)


_RULE = (
    f"prompt tokens = characters of the message contents / {CHARS_PER_TOKEN:g} "
    f"(range / {CHARS_PER_TOKEN_LOW:g} .. / {CHARS_PER_TOKEN_HIGH:g}) + {MESSAGE_TOKENS} per "
    f"message + {REPLY_TOKENS} per request; completion tokens 1 per choice .. max_tokens; "
    f"calibrated: measured tokens per character and completion length, +-{SPREAD_SIGMAS:g} "
    f"sigma and at least +-{CALIBRATED_MIN_MARGIN:.0%}"
)


class _ModelTally:
    """Running sums of the rows of one model while the input is read."""

    __slots__ = ("rows", "chars", "messages", "choices", "cap", "unbounded")

    def __init__(self) -> None:
        self.rows = self.chars = self.messages = self.choices = self.cap = self.unbounded = 0


def estimate(
    config: RunConfig,
    *,
    prices: PriceTable,
    calibrate: Sequence[str | Path] = (),
) -> Estimate:
    """Rows, prompt and completion tokens, and cost of the run `config` describes, as ranges.

    Reads the input as the run would (checking it the same way: an unusable input is an
    InputError) and builds every request, sending nothing. Prompt tokens follow the rule of
    `CHARS_PER_TOKEN`; completions range from 1 token per choice to `max_tokens` per choice.
    With `calibrate` (finished result files of this job or a similar one), tokens per character,
    completion length and cache hits are measured on their ok rows, and the ranges become
    prediction intervals around the measured figures (`SPREAD_SIGMAS`, at least
    `CALIBRATED_MIN_MARGIN`), capped by `max_tokens`.

    >>> est = estimate(config, prices=PriceTable.load(), calibrate=[Path("out/last.parquet")])
    >>> print(render_estimate(est))
    """
    from .inputs import scan_input
    from .requests import RequestBuilder
    from .sweep import sweep_config

    config = sweep_config(config)
    info = scan_input(config)
    builder = RequestBuilder(config, info.columns)
    tallies: dict[str | None, _ModelTally] = {}
    rows = input_errors = cached_rows = 0
    done, checkpoint_note = _checkpointed(config)
    for body, cached in _cache_marked(config, _bodies_to_send(config, builder, done)):
        rows += 1
        if body is None:
            input_errors += 1
            continue
        if cached:
            cached_rows += 1
            continue
        model = body.get("model")
        tally = tallies.get(model)
        if tally is None:
            tally = tallies[model] = _ModelTally()
        tally.rows += 1
        for message in body["messages"]:
            tally.chars += _text_length(message.get("content"))
            tally.messages += 1
        n = body.get("n") or 1
        tally.choices += n
        bound = body.get("max_completion_tokens") or body.get("max_tokens")
        if bound is None:
            tally.unbounded += 1
        else:
            tally.cap += int(bound) * n

    calibration = _calibrate(config, calibrate) if calibrate else None
    models = tuple(
        _model_estimate(model, t, prices, calibration)
        for model, t in sorted(tallies.items(), key=lambda kv: (kv[0] is None, str(kv[0])))
    )
    def total(name: str) -> Range:
        return sum((getattr(m, name) for m in models), _ZERO)

    priced = [m.cost_usd for m in models if m.cost_usd is not None]
    unpriced_rows = sum(m.rows for m in models if m.cost_usd is None)
    known = sum(priced, _ZERO)
    done_rows = max(0, info.rows - rows) if done is not None else 0
    return Estimate(
        input=str(config.input),
        rows=rows + done_rows,
        rows_to_send=rows - input_errors - cached_rows,
        input_errors=input_errors,
        chars=sum(t.chars for t in tallies.values()),
        messages=sum(t.messages for t in tallies.values()),
        unbounded_rows=sum(t.unbounded for t in tallies.values()),
        prompt_tokens=total("prompt_tokens"),
        completion_tokens=total("completion_tokens"),
        cost_usd=None if unpriced_rows else known,
        cost_usd_known=known,
        unpriced_rows=unpriced_rows,
        models=models,
        calibration=calibration,
        prices_file=None if prices.source is None else str(prices.source),
        done_rows=done_rows,
        checkpoint=None if done is None else str(config.output),
        checkpoint_note=checkpoint_note,
        cached_rows=cached_rows,
    )


def _bodies_to_send(
    config: RunConfig, builder: Any, done: Any
) -> Iterator[dict[str, Any] | None]:
    """The body of every output row `run` would still send (None for an input error).

    One per input row, or in a sweep one per input row and model; rows the checkpoint
    (`done`, a DoneSet or None) already has are left out, as `run` leaves them.
    """
    from .inputs import detect_format, iter_records
    from .sweep import slot_bodies

    if done is None or not len(done):
        yield from slot_bodies(config, builder)
        return
    sweep = config.models if len(config.models) > 1 else ()
    if sweep:  # a sweep's checkpoint is keyed by output row: count them one by one
        slot = 0
        for index, record, error in iter_records(config, builder.columns):
            row = builder.build(index, record, error)
            own = record is not None and record.get("model") not in (None, "")
            for model in (None,) if own else sweep:
                if not done.contains(slot, row.id):
                    yield row.body if model is None or row.body is None else {
                        **row.body, "model": model
                    }
                slot += 1
        return
    one_by_one = detect_format(config.input) == "jsonl"  # Parquet and CSV skip in bulk
    for index, record, error in iter_records(config, builder.columns, skip=done.mask):
        row = builder.build(index, record, error)
        if one_by_one and done.contains(index, row.id):
            continue  # already has a result: `run` would not send it
        yield row.body


def _checkpointed(config: RunConfig) -> tuple[Any, str | None]:
    """The rows of `config.output` that have a checkpointed result (a DoneSet), if the
    checkpoint is one `run` would resume; else None and, for a checkpoint it would refuse,
    why."""
    from .checkpoint import describe_changes, read_done
    from .inputs import fingerprint_input

    found = read_done(Path(config.output))
    if found is None:
        return None, None
    done, fingerprint = found
    now = {"input": fingerprint_input(config.input), "settings": config.request_settings()}
    changes = describe_changes(fingerprint, now)
    if changes and fingerprint.get("settings") == now["settings"]:
        return None, (
            f"the input changed since the checkpoint of {config.output} was made: run will "
            "keep the results of unchanged rows; this estimate is for every row (at most)"
        )
    if changes:
        return None, (
            f"the checkpoint of {config.output} was made with other settings "
            f"({'; '.join(changes)}): run would refuse it without --restart, so this estimate "
            "is for every row"
        )
    return done, None


def _cache_marked(
    config: RunConfig, bodies: Iterable[dict[str, Any] | None]
) -> Iterable[tuple[dict[str, Any] | None, bool]]:
    """Each body, with True where the response cache (`config.cache`) holds its answer."""
    from .cache import LOOKUP_ROWS, ResponseCache, cache_key, default_cache_path
    from .config import resolve_base_url

    path = None
    if config.cache is not None and config.cache is not False:
        path = default_cache_path() if config.cache is True else Path(config.cache)
    if path is None or not path.exists() or config.cache_mode in ("write-only", "refresh"):
        for body in bodies:
            yield body, False
        return
    url = "batchrunner:local" if config.local else resolve_base_url(config.base_url)
    with ResponseCache.open(path) as cache:
        chunk: list[dict[str, Any] | None] = []
        for body in bodies:
            chunk.append(body)
            if len(chunk) >= LOOKUP_ROWS:
                yield from _marked_chunk(cache, chunk, url, cache_key)
                chunk = []
        yield from _marked_chunk(cache, chunk, url, cache_key)


def _marked_chunk(cache: Any, chunk: list[Any], url: str, key: Any) -> Iterable[tuple[Any, bool]]:
    keys = [None if body is None else key(body, url) for body in chunk]
    found = cache.lookup([k for k in keys if k is not None])
    for body, k in zip(chunk, keys):
        yield body, k is not None and k in found


def _text_length(content: Any) -> int:
    """Characters of a message's text (text parts of a list content; other parts are free)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _model_estimate(
    model: str | None, t: _ModelTally, prices: PriceTable, cal: Calibration | None
) -> ModelEstimate:
    overhead = MESSAGE_TOKENS * t.messages + REPLY_TOKENS * t.rows
    cap = None if t.unbounded else t.cap  # most completion tokens these rows can produce
    if cal is None:
        prompt = Range(
            t.chars / CHARS_PER_TOKEN_LOW + overhead,
            t.chars / CHARS_PER_TOKEN + overhead,
            t.chars / CHARS_PER_TOKEN_HIGH + overhead,
        )
        completion = Range(t.choices, None, cap)
        cached = 0.0
    else:
        expected = cal.tokens_per_char * t.chars + overhead
        # The rows' own spread, plus the uncertainty of the ratio measured on cal.rows rows
        # (which grows with how much more text this input has than the calibration rows).
        share = t.chars / cal.chars if cal.chars else 0.0
        sd = cal.prompt_residual_std * math.sqrt(t.rows + cal.rows * share**2)
        prompt = _interval(expected, sd, floor=overhead, ceiling=None)
        sd = cal.completion_std * math.sqrt(t.rows + t.rows**2 / cal.rows)
        completion = _interval(cal.completion_mean * t.rows, sd, floor=t.choices, ceiling=cap)
        cached = cal.cached_fraction
    prompt, completion = _whole(prompt), _whole(completion)
    price = prices.get(model, warn=True)
    cost = None
    if price is not None:
        def dollars(p: float, c: float, cached_share: float) -> float:
            return price.cost(p, c, p * cached_share)

        cost = Range(
            dollars(prompt.low, completion.low, cached),
            None if completion.expected is None or prompt.expected is None
            else dollars(prompt.expected, completion.expected, cached),
            None if completion.high is None or prompt.high is None
            else dollars(prompt.high, completion.high, 0.0),
        )
    return ModelEstimate(model, t.rows, prompt, completion, cost)


def _interval(expected: float, sd: float, *, floor: float, ceiling: float | None) -> Range:
    margin = max(SPREAD_SIGMAS * sd, CALIBRATED_MIN_MARGIN * expected)
    low = max(expected - margin, floor)
    high = expected + margin
    if ceiling is not None:
        high = min(high, ceiling)
        low = min(low, ceiling)
    return Range(low, min(max(expected, low), high), high)


def _whole(r: Range) -> Range:
    """Token counts are whole: the low bound rounds down, the high bound up."""
    return Range(
        math.floor(r.low),
        None if r.expected is None else round(r.expected),
        None if r.high is None else math.ceil(r.high),
    )


def _calibrate(config: RunConfig, paths: Sequence[str | Path]) -> Calibration:
    """Measure tokens per character, completion length and cache hits on finished results."""
    files = expand_paths(paths, what="--calibrate")
    chars: list[int] = []
    messages: list[int] = []
    prompt: list[int] = []
    completion: list[int] = []
    cached: list[int] = []
    for path in files:
        for record, usage in _calibration_rows(config, path, CALIBRATION_MAX_ROWS - len(chars)):
            c = m = 0
            for message in record:
                c += _text_length(message.get("content"))
                m += 1
            chars.append(c)
            messages.append(m)
            prompt.append(usage[0])
            completion.append(usage[1])
            cached.append(usage[2] or 0)
        if len(chars) >= CALIBRATION_MAX_ROWS:
            break
    if not chars:
        raise UsageError(
            f"--calibrate: no ok row with token counts in {', '.join(map(str, files))}"
        )
    c, t = np.array(chars, float), np.array(prompt, float)
    overhead = MESSAGE_TOKENS * np.array(messages, float) + REPLY_TOKENS
    ratio = float((t - overhead).sum() / c.sum()) if c.sum() else 1 / CHARS_PER_TOKEN
    residual = t - (ratio * c + overhead)
    done = np.array(completion, float)
    k = len(chars)
    return Calibration(
        files=tuple(str(p) for p in files),
        rows=k,
        chars=int(c.sum()),
        tokens_per_char=ratio,
        prompt_residual_std=float(residual.std(ddof=1)) if k > 1 else float(abs(residual[0])),
        completion_mean=float(done.mean()),
        completion_std=float(done.std(ddof=1)) if k > 1 else float(done[0]),
        cached_fraction=float(np.sum(cached) / t.sum()) if t.sum() else 0.0,
    )


_RESULT_NAMES = frozenset(RESULT_SCHEMA.names)


def _calibration_rows(
    config: RunConfig, path: Path, limit: int
) -> Iterator[tuple[list[dict[str, Any]], tuple[int, int, int | None]]]:
    """The messages each ok row of a result file sent, rebuilt from its carried input columns.

    The job's own request rules are tried first (template, prompt column, system message);
    where the file lacks the columns they read, its `messages` or `prompt` column is used.
    """
    from .requests import RequestBuilder

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"--calibrate: {path}: not a readable Parquet file ({exc})") from None
    usage = ("status", "prompt_tokens", "completion_tokens", "cached_tokens")
    for name in ("model", *usage):
        if name not in schema.names:
            raise UsageError(f"--calibrate: {path}: no column {name!r} (not a result file?)")
    # The input's columns as the run saw them: carried ones were renamed input_X on a clash.
    physical: dict[str, str] = {}
    for name in schema.names:
        if name.startswith("input_") and name[6:] in _RESULT_NAMES:
            physical[name[6:]] = name
        elif name not in _RESULT_NAMES:
            physical.setdefault(name, name)
    physical["model"] = "model"  # the model each row requested
    columns = tuple(physical)
    cal_config = config.replace(input=Path(path), limit=None)
    try:
        builder = RequestBuilder(cal_config, columns)
    except UsageError:
        generic = cal_config.replace(
            template=None, prompt_column=None, messages_column=None, id_column=None
        )
        try:
            builder = RequestBuilder(generic, columns)
        except UsageError:
            raise UsageError(
                f"--calibrate: {path} carries neither the input columns this job reads nor a "
                "'messages' or 'prompt' column: its prompts cannot be measured"
            ) from None
    read = [physical[c] for c in builder.columns if c in physical]
    wanted = list(dict.fromkeys([*read, *usage]))
    logical = {v: k for k, v in physical.items()}
    pf = pq.ParquetFile(path)
    done = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=8192):
        for raw in batch.to_pylist():
            if done >= limit:
                return
            if raw["status"] != "ok" or raw["prompt_tokens"] is None:
                continue
            if raw["completion_tokens"] is None:
                continue
            record = {logical[c]: raw[c] for c in read}
            body = builder.build(done, record, None).body
            if body is None:
                continue
            done += 1
            yield body["messages"], (
                raw["prompt_tokens"],
                raw["completion_tokens"],
                raw["cached_tokens"],
            )


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
    if est.cost_usd is not None:
        lines.append(f"cost (USD):         {_range_text(est.cost_usd, _dollars)}")
    else:
        lines.append(
            f"cost (USD):         unknown: {_plural(est.unpriced_rows, 'row')} "
            f"{'asks' if est.unpriced_rows == 1 else 'ask'} for a model with no "
            f"price; the priced rows: {_range_text(est.cost_usd_known, _dollars)}"
        )
    header = ["model", "rows", "prompt tokens", "completion tokens", "cost (USD)"]
    table = [
        [
            _key_text(m.model),
            f"{m.rows:,}",
            _range_text(m.prompt_tokens, _tokens, short=True),
            _range_text(m.completion_tokens, _tokens, short=True),
            "no price" if m.cost_usd is None else _range_text(m.cost_usd, _dollars, short=True),
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


def _plain_tree(value: Any) -> Any:
    """JSON-ready: dicts and lists all the way down, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _plain_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_tree(v) for v in value]
    return _json_value(value)
