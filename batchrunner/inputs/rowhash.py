"""A 64-bit hash of the input values each row's request is built from, a batch at a time.

With the run's settings unchanged (the checkpoint refuses other settings), a request body is a
function of the values of the columns it reads (`RequestBuilder.columns`), so a row whose
values hash the same as when its result was made has the same body. The checkpoint keeps this
hash beside the body's own (`_ihash` and `_hash`), and an incremental run (docs/resume.md)
compares it for every row without building a single request: only the rows whose values
changed have their bodies built and compared. Computed over Arrow batches, vectorised (pandas'
SipHash of each column, mixed across columns): the same whatever the batch sizes, chunks,
dictionary encoding or integer and string widths. A value whose hash changes for another
reason (a newer pandas, a column now stored as floats) only sends that row down the slower,
exact path: it is never taken as an edit on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson
import pyarrow as pa

__all__ = ["input_hashes"]

_SEED = np.uint64(0x9E3779B97F4A7C15)
_MULTIPLIER = np.uint64(0x100000001B3)  # FNV's 64-bit prime: odd, so no bits are lost
_NULL = np.uint64(0x5BD1E9955BD1E995)  # a null, told apart from every value's hash
# Mixed into each kind's hashes, so that `true`, `1`, `1.0` and `"1"` (different JSON in a
# body) never hash alike because pandas hashed the same number for them.
_KINDS = {"text": np.uint64(0x1), "bool": np.uint64(0x2), "int": np.uint64(0x3),
          "float": np.uint64(0x4), "json": np.uint64(0x5)}


def input_hashes(batch: pa.RecordBatch | pa.Table, columns: Sequence[str]) -> np.ndarray:
    """One int64 per row of `batch` (never 0): the hash of its values in `columns`."""
    mixed = np.full(batch.num_rows, _SEED, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in sorted(columns):
            mixed = (mixed ^ _column_hash(batch.column(name))) * _MULTIPLIER
    out = mixed.view(np.int64)
    out[out == 0] = 1  # 0 stands for "no request" in an incremental run's comparison
    return out


def _column_hash(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.dictionary_decode()
        kind = column.type
    valid = None if not column.null_count else column.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values, tag = column.to_numpy(zero_copy_only=False), _KINDS["text"]
    elif pa.types.is_boolean(kind):
        values, tag = column.fill_null(False).cast(pa.int64()).to_numpy(), _KINDS["bool"]
    elif pa.types.is_integer(kind):
        values, tag = column.fill_null(0).cast(pa.int64()).to_numpy(), _KINDS["int"]
    elif pa.types.is_floating(kind):
        values, tag = column.fill_null(0).cast(pa.float64()).to_numpy(), _KINDS["float"]
    else:  # lists, structs, dates, decimals...: each value's canonical JSON text
        values = np.array(
            [orjson.dumps(v, option=orjson.OPT_SORT_KEYS, default=str).decode()
             for v in column.to_pylist()],
            dtype=object,
        )
        tag = _KINDS["json"]
    from pandas.util import (
        hash_array,  # here, not at import: `status` and `--help` need no pandas
    )

    with np.errstate(over="ignore"):
        hashed = hash_array(values, categorize=False) * _MULTIPLIER ^ tag
    if valid is not None:
        hashed[~valid] = _NULL
    return hashed
