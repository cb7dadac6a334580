"""Stream an input's rows, never loading a file whole: as Python dicts, or as Arrow tables.

Every format gives one shape of output, so the rest of the run never sees a format:

- `iter_records` yields rows lazily as Python dicts, for building requests (and
  `iter_hashed_records` each with the hash of the values it is built from);
- `iter_column_batches` yields a Parquet or CSV input's columns a record batch at a time;
- `iter_tables` yields the rows as Arrow tables with one fixed schema, for the output.

Rows are numbered from 0 in input order. The pass before a run (`scan_input`) is in scan.py,
the formats themselves in formats.py, which columns feed a request in columns.py; the user's
view of inputs is docs/input.md. What leaves here is Python values, except the tables of
`iter_tables`, which go to the output writer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchrunner.config.settings import RunConfig
from batchrunner.inputs.columns import resolve_columns
from batchrunner.inputs.formats import (
    _arrow_columns,
    _batch_ids,
    _csv_batches,
    _first_line,
    _jsonl_lines,
    _open_parquet,
    _parquet_batch_rows,
    _parquet_batches,
    _record_batches,
    detect_format,
)
from batchrunner.inputs.rowhash import input_hashes

__all__ = ["iter_column_batches", "iter_hashed_records", "iter_records", "iter_tables"]

logger = logging.getLogger(__name__)

_TABLE_BATCH_BYTES = 64 << 20


def iter_records(
    config: RunConfig,
    columns: Sequence[str] | None = None,
    skip: Callable[[pa.Array, int], np.ndarray] | None = None,
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield `(index, row, None)` per row, lazily and in input order, or `(index, None, error)`
    for a row that cannot be read (a JSONL line that is not a JSON object). Respects --limit.

    `columns` restricts Parquet and CSV rows to those columns (pass `RequestBuilder.columns`:
    reading only what requests need is much faster on wide inputs); a JSONL row always holds
    the keys its line has. `skip(ids, first_index)` gets each Parquet or CSV batch's row ids
    as strings and returns a boolean mask of the rows to leave out, so that resuming a long
    run turns no finished row into Python objects (JSONL rows are parsed anyway: the caller
    filters them).
    """
    for index, row, error, _hash in _records(config, columns, skip, hashed=False):
        yield index, row, error


def iter_hashed_records(
    config: RunConfig,
    columns: Sequence[str],
    skip: Callable[[pa.Array, int], np.ndarray] | None = None,
) -> Iterator[tuple[int, dict[str, Any] | None, str | None, int | None]]:
    """`iter_records`, each row with the hash of its values in `columns` (`rowhash`).

    The hash is None for a JSONL input (whose lines are parsed one by one anyway).
    """
    return _records(config, columns, skip, hashed=True)


def _records(
    config: RunConfig,
    columns: Sequence[str] | None,
    skip: Callable[[pa.Array, int], np.ndarray] | None,
    hashed: bool,
) -> Iterator[tuple[int, dict[str, Any] | None, str | None, int | None]]:
    path = Path(config.input)
    fmt = detect_format(path)
    limit = config.limit
    if fmt == "jsonl":
        for index, (obj, error, _size) in enumerate(_jsonl_lines(path, limit)):
            yield index, obj, error, None
        return
    all_columns = _arrow_columns(path, fmt)
    id_column = resolve_columns(config, all_columns).id_column if skip is not None else None
    if columns is None:
        wanted = None
    else:
        asked = set(columns) | ({id_column} if id_column else set())
        wanted = [name for name in all_columns if name in asked]
    hash_columns = [name for name in columns or () if name in all_columns] if hashed else None
    index = 0
    for batch in _record_batches(path, fmt, all_columns, wanted, limit):
        count = batch.num_rows
        positions: np.ndarray | None = None
        if skip is not None:
            keep = ~skip(_batch_ids(batch, id_column, index), index)
            if not keep.any():
                index += count
                continue
            if not keep.all():
                positions = np.flatnonzero(keep)
        hashes: list[int] | None = None
        if hash_columns is not None:
            every = input_hashes(batch, hash_columns)
            hashes = (every if positions is None else every[positions]).tolist()
        if positions is not None:
            chosen = batch.take(pa.array(positions))
            rows = chosen.to_pylist() if chosen.num_columns else [{} for _ in positions]
            numbers = (positions + index).tolist()
        else:
            if wanted is not None and not wanted:
                rows = [{} for _ in range(count)]
            else:
                rows = batch.to_pylist()
            numbers = range(index, index + count)
        if hashes is None:
            for number, row in zip(numbers, rows):
                yield number, row, None, None
        else:
            for number, row, row_hash in zip(numbers, rows, hashes):
                yield number, row, None, row_hash
        index += count


def iter_column_batches(
    config: RunConfig, columns: Sequence[str]
) -> Iterator[tuple[pa.RecordBatch, pa.Array]]:
    """A Parquet or CSV input's rows a record batch at a time, just `columns` (those present),
    each batch with its rows' ids as text (the rule of `id_text`)."""
    path = Path(config.input)
    fmt = detect_format(path)
    all_columns = _arrow_columns(path, fmt)
    id_column = resolve_columns(config, all_columns).id_column
    asked = set(columns) | ({id_column} if id_column else set())
    wanted = [name for name in all_columns if name in asked]
    start = 0
    for batch in _record_batches(path, fmt, all_columns, wanted, config.limit):
        yield batch, _batch_ids(batch, id_column, start).cast(pa.string())
        start += batch.num_rows


def iter_tables(config: RunConfig, batch_rows: int = 65536) -> Iterator[pa.Table]:
    """Yield the input columns as Arrow tables, in input order, for writing the output.

    Exactly one table row per input row (a JSONL line that cannot be read is a row of nulls),
    at most `batch_rows` rows a table, one schema for all tables, and at least one table (an
    empty one for an empty input) so the schema is always known. For JSONL the schema is
    inferred in a first pass; a column whose values have types that cannot be unified (say
    numbers on some lines and text on others) holds each value JSON-encoded as a string.
    """
    path = Path(config.input)
    fmt = detect_format(path)
    if fmt == "jsonl":
        yield from _jsonl_tables(path, config.limit, batch_rows)
        return
    if fmt == "parquet":
        pf = _open_parquet(path)
        schema = pf.schema_arrow.remove_metadata()
        rows = _parquet_batch_rows(pf, batch_rows, _TABLE_BATCH_BYTES)
        batches = _parquet_batches(path, pf, None, rows, config.limit)
    else:
        columns = _arrow_columns(path, fmt)
        schema = pa.schema([(name, pa.string()) for name in columns])
        batches = _csv_batches(path, columns, None, config.limit)
    empty = True
    for batch in batches:
        for offset in range(0, batch.num_rows, batch_rows):
            part = batch.slice(offset, batch_rows)
            yield pa.Table.from_arrays(part.columns, schema=schema)
            empty = False
    if empty:
        yield schema.empty_table()


def _jsonl_chunks(
    path: Path, limit: int | None, batch_rows: int
) -> Iterator[list[dict[str, Any] | None]]:
    """JSONL rows in chunks bounded by a row count and about 16 MB of text."""
    chunk: list[dict[str, Any] | None] = []
    size = 0
    for obj, _error, line_size in _jsonl_lines(path, limit):
        chunk.append(obj)
        size += line_size
        if len(chunk) >= batch_rows or size >= 16 << 20:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_UNIFY_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError)


def _jsonl_schema(path: Path, limit: int | None, batch_rows: int) -> tuple[pa.Schema, set[str]]:
    """The unified schema of a JSONL file, and the columns that must be JSON-encoded."""
    types: dict[str, pa.DataType] = {}
    as_json: set[str] = set()
    for chunk in _jsonl_chunks(path, limit, batch_rows):
        present: dict[str, None] = {}
        for obj in chunk:
            if obj is not None:
                for key in obj:
                    if key not in present:
                        present[key] = None
        for name in present:
            types.setdefault(name, pa.null())
            if name in as_json:
                continue
            try:
                kind = pa.array([None if o is None else o.get(name) for o in chunk]).type
                merged = pa.unify_schemas(
                    [pa.schema([(name, types[name])]), pa.schema([(name, kind)])],
                    promote_options="permissive",
                )
                types[name] = merged.field(name).type
            except _UNIFY_ERRORS:
                as_json.add(name)
                types[name] = pa.string()
    return pa.schema(list(types.items())), as_json


def _jsonl_tables(path: Path, limit: int | None, batch_rows: int) -> Iterator[pa.Table]:
    schema, as_json = _jsonl_schema(path, limit, batch_rows)
    empty = True
    for chunk in _jsonl_chunks(path, limit, batch_rows):
        arrays = []
        for field in schema:
            values = [None if o is None else o.get(field.name) for o in chunk]
            if field.name in as_json:
                values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
            try:
                arrays.append(pa.array(values, type=field.type))
            except _UNIFY_ERRORS as exc:
                # Should not happen once the schema is unified; never lose the run over it.
                logger.warning("%s: column %r written as nulls in one batch: %s",
                               path, field.name, _first_line(exc))  # fmt: skip
                arrays.append(pa.nulls(len(values), field.type))
        yield pa.Table.from_arrays(arrays, schema=schema)
        empty = False
    if empty:
        yield schema.empty_table()


