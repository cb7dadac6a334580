"""Output formats: where results can be written, the writers, and `batchrunner export`.

The format of a run's output follows the extension of `--output` (docs/output.md):

    .parquet   typed columns (the default)
    .jsonl     one JSON object a row, the same fields
    .csv       one line a row; list and struct columns as JSON text

`check_output` refuses, before anything is sent, an output that could not be written at the
end: a folder, a path whose folder cannot be created or written, an unknown extension.
`export_results` turns a finished Parquet output into JSONL, CSV or the OpenAI Batch API's
output lines (`id`, `custom_id`, `response{status_code, request_id, body}`, `error`).

    check_output(Path("out/a.csv"))                       # 'csv', or a UsageError
    export_results(Path("out/a.parquet"), "batch-api", Path("out/a.batch.jsonl"))
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchrunner.config.paths import is_uri
from batchrunner.errors import UsageError
from batchrunner.store.durability import replaced_atomically

__all__ = [
    "EXPORT_FORMATS",
    "OUTPUT_FORMATS",
    "TableWriter",
    "batch_api_line",
    "check_output",
    "check_output_file",
    "check_writable",
    "export_results",
    "open_table_writer",
    "output_format",
]

#: Output formats of a run, by the extension of its output path.
OUTPUT_FORMATS: dict[str, str] = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv"}

#: What `batchrunner export` writes.
EXPORT_FORMATS: tuple[str, ...] = ("jsonl", "csv", "batch-api")

_BATCH_SIZE = 16384


# --- where an output can go -----------------------------------------------------------------


def output_format(path: Path | str, *, what: str = "--output") -> str:
    """The output format `path`'s extension names, or a UsageError listing the formats."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        suffix = Path(path).suffix or "no extension"
        known = ", ".join(OUTPUT_FORMATS)
        raise UsageError(f"{what} {path}: {suffix} is not an output format; use {known}")
    return fmt


def check_output(path: Path | str, *, what: str = "--output") -> str:
    """Check, before anything is sent, that `path` can be written; return its format.

    Refused: a folder, an unknown extension, a folder that cannot be created (a file is in the
    way) or written (permissions, a read-only file system). Nothing is created: a probe file
    is made and removed in the nearest folder that exists.
    """
    if is_uri(path):  # an object-store output is written through a local staged copy
        return output_format(path, what=what)
    path = Path(path)
    if path.is_dir():
        example = path / "results.parquet"
        raise UsageError(f"{what} {path} is a folder: name a file, such as {example}")
    fmt = output_format(path, what=what)
    check_writable(path, what=what)
    return fmt


def check_writable(path: Path, *, what: str) -> None:
    """Check, before anything is sent, that the file `path` can be created or replaced.

    Refused (UsageError naming `what`): a folder, a folder that cannot be created (a file is
    in the way) or written. Nothing is created: a probe file is made and removed in the
    nearest folder that exists.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder: name a file")
    folder = path.parent if str(path.parent) else Path(".")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {path}: cannot create the folder {folder}: {existing} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".batchrunner-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f"the folder {folder}" if existing == folder else f"{folder} (in {existing})"
        raise UsageError(f"{what} {path}: cannot write {where}: {reason}") from None


# --- writers ------------------------------------------------------------------------------


class TableWriter(Protocol):
    """What the final output is written through: Arrow tables in, one file out."""

    def write_table(self, table: pa.Table, row_group_size: int | None = None) -> None:
        """Append the rows of `table`."""

    def close(self) -> None:
        """Finish the file."""


def open_table_writer(path: Path, schema: pa.Schema, fmt: str) -> TableWriter:
    """A writer of `fmt` ("parquet", "jsonl" or "csv") at `path`, for tables of `schema`."""
    if fmt == "parquet":
        return pq.ParquetWriter(path, schema, compression="zstd")
    if fmt == "jsonl":
        return _JsonlWriter(open(path, "wb"))
    if fmt == "csv":
        return _CsvWriter(path, schema)
    raise ValueError(f"unknown output format {fmt!r}")


def _json_default(value: Any) -> Any:
    """What orjson cannot encode by itself (Decimal, bytes, ...) as text."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


class _JsonlWriter:
    """One JSON object a row; NaN and infinities become null, as JSON has neither."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def write_table(self, table: pa.Table, row_group_size: int | None = None) -> None:
        for batch in table.to_batches(max_chunksize=_BATCH_SIZE):
            self._handle.write(b"".join(_dumps(row) + b"\n" for row in batch.to_pylist()))

    def close(self) -> None:
        self._handle.close()


def _is_nested(kind: pa.DataType) -> bool:
    return (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
        or pa.types.is_struct(kind)
        or pa.types.is_map(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    )


class _CsvWriter:
    """CSV with a header; list, struct and map columns are written as JSON text.

    A null is an empty unquoted cell and an empty string `""`, as the CSV reader reads them.
    """

    def __init__(self, sink: Path | IO[bytes], schema: pa.Schema) -> None:
        self._nested = [i for i, f in enumerate(schema) if _is_nested(f.type)]
        fields = [pa.field(f.name, pa.string()) if i in self._nested else f
                  for i, f in enumerate(schema)]
        self._schema = pa.schema(fields)
        self._writer = pacsv.CSVWriter(str(sink) if isinstance(sink, Path) else sink, self._schema)

    def write_table(self, table: pa.Table, row_group_size: int | None = None) -> None:
        for i in self._nested:
            values = [None if v is None else _dumps(v).decode()
                      for v in table.column(i).to_pylist()]
            table = table.set_column(i, self._schema.field(i), pa.array(values, pa.string()))
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


# --- export ---------------------------------------------------------------------------------


def _read_results(source: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if not source.is_file():
        raise UsageError(f"results not found: {source}")
    if source.suffix.lower() != ".parquet":
        raise UsageError(
            f"{source}: export reads Parquet results (a run's default output), "
            f"not {source.suffix or 'a file with no extension'}"
        )
    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{source}: not a readable Parquet file ({exc})") from None
    missing = [c for c in ("id", "status") if c not in parquet.schema_arrow.names]
    if missing:
        raise UsageError(f"{source}: not batchrunner results (no {', '.join(missing)} column)")
    return parquet.schema_arrow, parquet.iter_batches(batch_size=_BATCH_SIZE)


def batch_api_line(row: dict[str, Any], number: int, *, created: int) -> dict[str, Any]:
    """One result row as a line of the OpenAI Batch API's output file.

    An answered row carries the chat completion rebuilt from the result columns; a row the
    gateway refused carries its status and an OpenAI error body; a row that got no HTTP answer
    (an input error, a connection that kept failing) has `response` null and `error` set.
    `created` is used where the row has no `created` column (OpenAI's, in epoch seconds).
    """
    line: dict[str, Any] = {"id": f"batch_req_{number:08d}", "custom_id": row.get("id")}
    status = row.get("http_status")
    if row.get("status") == "ok":
        choices = row.get("choices")
        if choices is None:
            choices = [row.get("content")]
        calls = _choice_tool_calls(row, len(choices))
        body: dict[str, Any] = {
            "id": row.get("response_id"),
            "object": "chat.completion",
            "created": int(row.get("created") or created),
            "model": row.get("response_model") or row.get("model"),
            "choices": [
                {
                    "index": k,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": row.get("refusal") if k == 0 else None,
                        **({"tool_calls": calls[k]} if calls[k] else {}),
                    },
                    "logprobs": _loads(row.get("logprobs")) if k == 0 else None,
                    "finish_reason": row.get("finish_reason"),
                }
                for k, text in enumerate(choices)
            ],
        }
        usage = _usage(row)
        if usage is not None:
            body["usage"] = usage
        line["response"] = {"status_code": status or 200, "request_id": None, "body": body}
        line["error"] = None
    elif status is not None:
        # Only the message is kept in the results: the type follows from the status.
        kind = "server_error" if status >= 500 else "invalid_request_error"
        error = {"message": row.get("error") or "", "type": kind, "param": None, "code": None}
        line["response"] = {"status_code": status, "request_id": None, "body": {"error": error}}
        line["error"] = None
    else:
        message = row.get("error") or ""
        code = "invalid_input" if message.startswith("input:") else "request_failed"
        line["response"] = None
        line["error"] = {"code": code, "message": message}
    return line


def _usage(row: dict[str, Any]) -> dict[str, Any] | None:
    prompt, completion = row.get("prompt_tokens"), row.get("completion_tokens")
    if prompt is None or completion is None:
        return None
    total = row.get("total_tokens")
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion if total is None else total,
    }
    if row.get("cached_tokens") is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": row["cached_tokens"]}
    if row.get("reasoning_tokens") is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": row["reasoning_tokens"]}
    return usage


def _loads(text: Any) -> Any:
    """A JSON text column's value (None stays None; a list or dict read back is kept)."""
    if text is None or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None


def _choice_tool_calls(row: dict[str, Any], count: int) -> list[Any]:
    """Each choice's tool calls (a list, or None), from `choices_tool_calls` or `tool_calls`."""
    every = row.get("choices_tool_calls")
    if isinstance(every, list) and len(every) == count:
        return [_loads(text) for text in every]
    return [_loads(row.get("tool_calls"))] + [None] * (count - 1)


def export_results(
    source: Path,
    fmt: str,
    output: Path | None = None,
    *,
    stream: IO[bytes] | None = None,
    flatten: bool = False,
    json_schema: Path | None = None,
) -> int:
    """Write the Parquet results `source` as `fmt` to `output` (atomically) or `stream`.

    `fmt` is one of EXPORT_FORMATS; without `output` the lines go to `stream` (stdout by
    default). Returns the number of rows written. `flatten` turns `parsed` into a column per
    top-level property of the JSON schema (`json_schema`, else the one the results record).

    >>> export_results(Path("out/r.parquet"), "csv", Path("out/r.csv"))
    50
    """
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    source = Path(source)
    if output is not None:
        check_output_file(output)
    schema, batches = _read_results(source)
    if flatten:
        schema, batches = _flattened(schema, batches, json_schema, fmt)
    created = int(source.stat().st_mtime)
    if output is None:
        return _write(schema, batches, fmt, stream or sys.stdout.buffer, created)
    if output.exists() and not output.is_file():  # /dev/stdout, a device: written, not replaced
        with open(output, "wb") as handle:
            return _write(schema, batches, fmt, handle, created)
    output.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(output, durable=True) as tmp, open(tmp, "wb") as handle:
        rows = _write(schema, batches, fmt, handle, created)
    return rows


def _flattened(
    schema: pa.Schema, batches: Iterator[pa.RecordBatch], json_schema: Path | None, fmt: str
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The batches with `parsed` made typed columns (structured.flatten, batch by batch)."""
    from batchrunner.answers.flatten import flatten
    from batchrunner.answers.structured import load_schema

    if fmt == "batch-api":
        raise UsageError("--flatten makes columns; the batch-api format has none")
    document = load_schema(json_schema) if json_schema is not None else None
    flat_schema = flatten(schema.empty_table(), document).schema

    def flat() -> Iterator[pa.RecordBatch]:
        for batch in batches:
            table = flatten(pa.Table.from_batches([batch], schema), document)
            yield from table.cast(flat_schema).to_batches()

    return flat_schema, flat()


def check_output_file(path: Path) -> None:
    """Check that `export -o PATH` can be written (any extension: the format is --format)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"-o {path} is a folder: name a file")
    probe = path.with_name(path.name + ".parquet")
    check_output(probe, what="-o")


class _WholeWrites:
    """A binary stream whose `write` writes all it is given, or raises.

    A large write to a pipe whose reader has left (`| head`) or to a full disk can return
    short without an error; a writer that ignores the count (pyarrow's does) loses the rest
    silently and the command ends as if all went well.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            written = self._handle.write(view)
            if not written:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            view = view[written:]
        return total

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def writable(self) -> bool:
        return True


def _write(
    schema: pa.Schema, batches: Iterator[pa.RecordBatch], fmt: str, stream: IO[bytes], created: int
) -> int:
    handle: Any = _WholeWrites(stream)
    rows = 0
    if fmt == "batch-api":
        for batch in batches:
            handle.write(b"".join(
                _dumps(batch_api_line(row, rows + i, created=created)) + b"\n"
                for i, row in enumerate(batch.to_pylist())
            ))
            rows += batch.num_rows
        return rows
    if fmt == "jsonl":
        writer: TableWriter = _JsonlWriter(handle)
    else:
        writer = _CsvWriter(handle, schema)
    for batch in batches:
        writer.write_table(pa.Table.from_batches([batch], schema))
        rows += batch.num_rows
    if fmt == "csv":
        writer.close()  # flushes; pyarrow leaves a stream it did not open open
    handle.flush()
    return rows
