"""The index of a results source: a few small columns of every visible row, in numpy arrays.

About 40 bytes a row (a million rows in ~40 MB): the id, the model and the error kind as small
integer codes, and status, tokens, cost, latency, score, cache hit and attempts as numbers.
`Dataset` (`batchrunner.viewer.dataset`) computes totals, charts and filters on them.
"""


import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.viewer.sources import (
    ParquetSource,
    Source,
    int64_array,
)

__all__ = ["error_kind"]


# Numbers that vary from row to row (a line, a row, a count of seconds), not an HTTP status.
_NUMBER_RUN = re.compile(r"(?<!HTTP )(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


@functools.lru_cache(maxsize=65536)
def error_kind(text: str) -> str:
    """An error's text with its row-specific numbers masked: what errors are grouped by.

    >>> error_kind("input: line 12: prompt is null (column 'prompt')")
    "input: line #: prompt is null (column 'prompt')"
    """
    return _NUMBER_RUN.sub("#", text)


@dataclass
class _Index:
    """The small columns of every visible row of one source, in display order."""

    ids: pa.ChunkedArray
    model_names: list[str]
    model_codes: np.ndarray  # int32 into model_names ("" for none)
    kind_names: list[str]
    kind_codes: np.ndarray  # int32 into kind_names, -1 where the row has no error
    numbers: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.ids)


def _build_index(source: Source) -> _Index:
    """Read a source's light columns into the small arrays of an _Index, in display order."""
    ids: list[pa.Array] = []
    models = _Coder()
    kinds = _Coder(error_kind)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _NUMBER_COLUMNS}
    for batch in source.light():
        size = batch.num_rows
        ids.append(_strings(batch, "id", size))
        models.add(_column(batch, "model", size))
        kinds.add(_column(batch, "error", size))
        parts["ok"].append(_is_ok(_column(batch, "status", size)))
        parts["cache_hit"].append(_bools(batch, "cache_hit", size))
        for name, dtype in _NUMBER_COLUMNS.items():
            if name in ("ok", "cache_hit"):
                continue
            parts[name].append(_numbers(batch, name, size, dtype))
    visible = source.visible
    everything = isinstance(source, ParquetSource)  # every row shown, in file order

    def pick(array: np.ndarray) -> np.ndarray:
        return array if everything else array[visible]

    id_chunks = pa.chunked_array(ids, pa.string())
    if not everything:
        id_chunks = pa.chunked_array([id_chunks.take(int64_array(visible))], pa.string())
    numbers = {
        name: pick(np.concatenate(chunks) if chunks else np.zeros(0, dtype=_NUMBER_COLUMNS[name]))
        for name, chunks in parts.items()
    }
    model_codes = models.codes()
    model_codes[model_codes < 0] = models.code("")
    return _Index(
        ids=id_chunks,
        model_names=models.names,
        model_codes=pick(model_codes),
        kind_names=kinds.names,
        kind_codes=pick(kinds.codes()),
        numbers=numbers,
    )


class _Coder:
    """Text values of a column as small integer codes, one Python string per distinct value.

    Parquet's dictionary pages are read as Arrow dictionaries (see ParquetSource), so a
    million rows of a few models or error texts cost four bytes each, not a string each.
    `key` maps each distinct text to the name it is counted under (an error to its kind).
    """

    def __init__(self, key: Any = None) -> None:
        self.names: list[str] = []
        self._code_of: dict[str, int] = {}
        self._key = key
        self._parts: list[np.ndarray] = []

    def code(self, name: str) -> int:
        code = self._code_of.get(name)
        if code is None:
            code = self._code_of[name] = len(self.names)
            self.names.append(name)
        return code

    def add(self, column: pa.Array) -> None:
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column)
        values = column.dictionary.cast(pa.string()).to_pylist()
        key = self._key
        mapping = np.array(
            [self.code(key(v) if key else v) if v is not None else -1 for v in values] + [-1],
            dtype=np.int32,
        )
        indices = column.indices.fill_null(len(values)).to_numpy(zero_copy_only=False)
        self._parts.append(mapping[indices])

    def codes(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.int32)


def _merge_codes(parts: list[tuple[list[str], np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """One list of names and the codes into it, from each source's own."""
    names: list[str] = []
    code_of: dict[str, int] = {}
    merged = []
    for own_names, codes in parts:
        mapping = np.array([code_of.setdefault(n, len(code_of)) for n in own_names] + [-1],
                           dtype=np.int32)
        names = list(code_of)
        merged.append(mapping[np.where(codes < 0, len(own_names), codes)])
    return names, (np.concatenate(merged) if merged else np.zeros(0, dtype=np.int32))


def _is_ok(status: pa.Array) -> np.ndarray:
    if pa.types.is_dictionary(status.type):
        ok = np.array([v == "ok" for v in status.dictionary.to_pylist()] + [False])
        return ok[status.indices.fill_null(len(ok) - 1).to_numpy(zero_copy_only=False)]
    return pc.equal(status, "ok").fill_null(False).to_numpy(zero_copy_only=False)


_NUMBER_COLUMNS: dict[str, Any] = {
    "ok": np.bool_,
    "cache_hit": np.bool_,
    "prompt_tokens": np.int32,
    "completion_tokens": np.int32,
    "total_tokens": np.int32,
    "attempts": np.int16,
    "cost_usd": np.float64,
    "latency_ms": np.float32,
    "score": np.float32,
}


def _column(batch: pa.RecordBatch, name: str, size: int) -> pa.Array:
    index = batch.schema.get_field_index(name)
    return batch.column(index) if index >= 0 else pa.nulls(size, pa.string())


def _strings(batch: pa.RecordBatch, name: str, size: int) -> pa.Array:
    index = batch.schema.get_field_index(name)
    if index < 0:
        return pa.nulls(size, pa.string())
    column = batch.column(index)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if column.type != pa.string():
        column = column.cast(pa.string())
    return column


def _bools(batch: pa.RecordBatch, name: str, size: int) -> np.ndarray:
    index = batch.schema.get_field_index(name)
    if index < 0:
        return np.zeros(size, dtype=bool)
    column = batch.column(index).cast(pa.bool_())
    return column.fill_null(False).to_numpy(zero_copy_only=False)


def _numbers(batch: pa.RecordBatch, name: str, size: int, dtype: Any) -> np.ndarray:
    index = batch.schema.get_field_index(name)
    floating = np.issubdtype(dtype, np.floating)
    if index < 0:
        return np.full(size, np.nan if floating else 0, dtype=dtype)
    column = batch.column(index)
    if floating:
        return column.cast(pa.float64()).fill_null(math.nan).to_numpy().astype(dtype)
    return column.cast(pa.int64()).fill_null(0).to_numpy().astype(dtype)
