"""The three input formats read as streams: JSONL lines, Parquet and CSV record batches.

Formats by extension (`detect_format`): `.jsonl` / `.ndjson` (optionally `.gz`), `.parquet`,
`.csv` (optionally `.gz`). In JSONL every line is a row, so row `i` is line `i + 1` and errors
name the line; a line that is blank or not a JSON object is a row that cannot be read (blank
lines at the very end of the file are not rows). CSV cells are read as text, exactly as written
(no type guessing: `007` stays `007`, `NA` stays `NA`); an empty unquoted cell is null, a quoted
`""` is the empty string. Nothing here loads a file whole; every failure to read is one
`InputError` line naming the file.
"""

from __future__ import annotations

import codecs
import gzip
import json
import stat
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchrunner.errors import InputError
from batchrunner.inputs.columns import id_text

__all__ = ["detect_format"]

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson.gz": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
}


# Rows per batch when reading for requests: small enough that a batch of Python dicts is a few
# MB, large enough that per-batch overhead vanishes.
_RECORD_BATCH_ROWS = 8192
_RECORD_BATCH_BYTES = 8 << 20


def detect_format(path: str | Path) -> str:
    """The input format named by a file's extension: "jsonl", "parquet" or "csv"."""
    name = Path(path).name.lower()
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    suffix = "".join(Path(name).suffixes[-2:]) or "(none)"
    raise InputError(
        f"{path}: unknown input format {suffix!r} "
        "(expected .jsonl, .ndjson, .parquet or .csv; .jsonl, .ndjson and .csv may end in .gz)"
    )


def _check_file(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path}: is a directory, not an input file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _first_line(exc: BaseException, width: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= width else line[: width - 3] + "..."


def _check_distinct(path: Path, columns: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise InputError(f"{path}: column {name!r} appears more than once")
        seen.add(name)


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}  # fmt: skip


def _json_problem(exc: json.JSONDecodeError) -> str:
    """json's message as a whole phrase: its own ends in "at" or "starting at", which its
    str() completes with a position that the kinds of errors (failures.py) must not hold."""
    return exc.msg.removesuffix(" at").removesuffix(" starting")


def _open_binary(path: Path) -> Any:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def _jsonl_lines(path: Path, limit: int | None) -> Iterator[tuple[Any, str | None, int]]:
    """(object, None, size) for each line, or (None, "input: line N: ...", size) for a bad one.

    Every line is a row, so that row i is line i + 1; blank lines at the end are dropped.
    """
    if limit == 0:
        return
    count = 0
    blank_run = 0  # blank lines seen but not yet known to be followed by a row
    line_no = 0
    try:
        with _open_binary(path) as f:
            for line in f:
                line_no += 1
                if line_no == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8) :]
                try:
                    # decoding first is faster than json.loads(bytes), which sniffs the encoding
                    obj = json.loads(line.decode())
                    error = None
                except (ValueError, RecursionError) as exc:
                    if not line.strip():
                        blank_run += 1
                        continue
                    obj = None
                    if isinstance(exc, UnicodeDecodeError):
                        error = f"input: line {line_no}: not valid UTF-8"
                    elif isinstance(exc, json.JSONDecodeError):
                        error = f"input: line {line_no}: not valid JSON ({_json_problem(exc)})"
                    else:
                        error = f"input: line {line_no}: not valid JSON (nested too deeply)"
                for blank_no in range(line_no - blank_run, line_no):
                    yield None, f"input: line {blank_no}: empty line", 0
                    count += 1
                    if count == limit:
                        return
                blank_run = 0
                if error is None and type(obj) is not dict:
                    kind = _JSON_KINDS.get(type(obj), "not an object")
                    error = f"input: line {line_no}: not a JSON object (found {kind})"
                    obj = None
                yield obj, error, len(line)
                count += 1
                if count == limit:
                    return
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read ({_first_line(exc)})") from None


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        # pre_buffer would read ahead the selected columns of every row group at once: memory
        # that grows with the file.
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None


def _parquet_batch_rows(
    pf: pq.ParquetFile, cap: int, target_bytes: int, columns: Sequence[str] | None = None
) -> int:
    """Rows per batch so that one batch holds about target_bytes of decoded data.

    The file's metadata gives the stored size, which for a dictionary-encoded column (a long
    document repeated on many rows) is a small part of what it decodes to: the first rows,
    read and measured, say the decoded size too, and the larger of the two is used.
    """
    meta = pf.metadata
    if meta.num_rows == 0:
        return cap
    total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = max(total / meta.num_rows, 1.0, _decoded_row_bytes(pf, columns))
    return max(64, min(cap, int(target_bytes / per_row)))


_PROBE_ROWS = 256


def _decoded_row_bytes(pf: pq.ParquetFile, columns: Sequence[str] | None) -> float:
    """Bytes a row of the file's first rows takes once decoded (0 when it cannot be read:
    the read that follows says why)."""
    try:
        first = next(pf.iter_batches(batch_size=_PROBE_ROWS, columns=columns), None)
    except (pa.ArrowException, OSError):
        return 0.0
    if first is None or first.num_rows == 0:
        return 0.0
    return first.nbytes / first.num_rows


def _parquet_batches(
    path: Path,
    pf: pq.ParquetFile,
    columns: Sequence[str] | None,
    batch_rows: int,
    limit: int | None,
    use_threads: bool = True,
) -> Iterator[pa.RecordBatch]:
    if limit == 0:
        return
    try:
        batches = pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=use_threads)
        yield from _first_rows(batches, limit)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None


def _first_rows(batches: Iterable[pa.RecordBatch], limit: int | None) -> Iterator[pa.RecordBatch]:
    """The batches, cut after `limit` rows in all (None: every row)."""
    remaining = limit
    for batch in batches:
        if remaining is not None:
            if batch.num_rows >= remaining:
                yield batch.slice(0, remaining)
                return
            remaining -= batch.num_rows
        yield batch


_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)


def _csv_columns(path: Path) -> tuple[str, ...]:
    try:
        reader = pacsv.open_csv(path, parse_options=_CSV_PARSE)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable CSV file ({_first_line(exc)})") from None
    try:
        return tuple(reader.schema.names)
    finally:
        reader.close()


def _csv_batches(
    path: Path,
    columns: Sequence[str],
    include: Sequence[str] | None,
    limit: int | None,
    block_size: int = 1 << 20,
) -> Iterator[pa.RecordBatch]:
    """CSV batches with every cell read as text (see the module docstring)."""
    if limit == 0:
        return
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in columns},
        include_columns=list(include) if include else None,
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
    )
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block_size),
            parse_options=_CSV_PARSE,
            convert_options=convert,
        )
        with reader:
            yield from _first_rows(reader, limit)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable CSV file ({_first_line(exc)})") from None


def _arrow_columns(path: Path, fmt: str) -> tuple[str, ...]:
    if fmt == "parquet":
        columns = tuple(_open_parquet(path).schema_arrow.names)
    else:
        columns = _csv_columns(path)
    _check_distinct(path, columns)
    return columns


def _record_batches(
    path: Path, fmt: str, all_columns: Sequence[str], wanted: list[str] | None, limit: int | None
) -> Iterator[pa.RecordBatch]:
    """The record batches `iter_records` turns into rows (Parquet or CSV)."""
    if fmt == "parquet":
        pf = _open_parquet(path)
        batch_rows = _parquet_batch_rows(pf, _RECORD_BATCH_ROWS, _RECORD_BATCH_BYTES, wanted)
        return _parquet_batches(path, pf, wanted, batch_rows, limit)
    return _csv_batches(path, all_columns, wanted, limit)


def _batch_ids(batch: pa.RecordBatch, id_column: str | None, start: int) -> pa.Array:
    """A batch's row ids as strings, by the same rule as `id_text`."""
    if id_column is None:
        return pa.array(np.arange(start, start + batch.num_rows).astype(str))
    column = batch.column(id_column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    if pa.types.is_integer(column.type):
        return column.cast(pa.string())
    return pa.array([None if v is None else id_text(v) for v in column.to_pylist()], pa.string())
