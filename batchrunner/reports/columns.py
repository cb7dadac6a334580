"""Columns of result files as NumPy arrays, for grouping and aggregating (`summary`).

Dense codes of a column's values (the groups), the UTC day of each row, null-safe numeric
views, and quantiles of many groups at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import UsageError
from batchrunner.reports.result_files import _DAY_COLUMNS
from batchrunner.store.layout import checkpoint_dir

__all__ = [
    "PARTITION_MAX_GROUPS", "as_bools", "as_counts", "as_floats", "codes_of", "day_codes",
    "grouped_quantiles", "hashable",
]

def grouped_quantiles(
    keys: np.ndarray, values: np.ndarray, nkeys: int, qs: Sequence[float]
) -> list[np.ndarray]:
    """Per-key quantiles of `values`, exactly as numpy's default (linear) method; NaN if empty.

    Rows are bucketed by key with one stable sort (a radix sort for small key counts), then each
    bucket is partitioned (O(n)) rather than sorted; many small buckets are sorted as one array.
    """
    out = [np.full(nkeys, np.nan) for _ in qs]
    if not len(values):
        return out
    if nkeys <= PARTITION_MAX_GROUPS:
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


PARTITION_MAX_GROUPS = 2_000  # fits uint16; above it one lexsort beats a loop of partitions


def codes_of(column: pa.ChunkedArray, name: str, path: Path) -> tuple[np.ndarray, list[Any]]:
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


def day_codes(table: pa.Table, path: Path) -> tuple[np.ndarray, list[Any]]:
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
            seconds = as_floats(col.cast(pa.int64()).cast(pa.float64())) / scale
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            seconds = as_floats(col.cast(pa.float64()))  # epoch seconds, like OpenAI's `created`
        else:
            seconds = np.full(n, np.nan)
        have = ~np.isnan(seconds)
        days[have] = seconds[have].astype("datetime64[s]").astype("datetime64[D]")
    uniques, codes = np.unique(days, return_inverse=True)
    return codes.astype(np.int64), [str(d) for d in uniques]


def as_bools(values: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)


def as_counts(values: pa.ChunkedArray) -> np.ndarray:
    # float64, as bincount weights are: exact for sums below 2**53 tokens.
    return pc.fill_null(values, 0).to_numpy().astype(np.float64)


def as_floats(values: pa.ChunkedArray) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(np.float64)


def hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value
