"""The result files a report reads: paths expanded, and only the needed columns read in batches.

A path may name a Parquet output, a `.jsonl` or `.csv` output (read as text), a folder (its
`*.parquet`), a glob, or an output whose run is going on or was interrupted: that one is read
from its checkpoint (result columns only). Errors are UsageErrors naming the file and column.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.errors import UsageError
from batchrunner.store import layout
from batchrunner.store.checkpoint import RESULT_SCHEMA, checkpoint_results

_DAY = "__day__"  # pseudo-column: the UTC day of each row (a `created` column, else file mtime)
_DAY_COLUMNS = ("created", "created_at")


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
            matches += _unfinished_outputs(
                glob.glob(text + layout.CHECKPOINT_SUFFIX, recursive=True)
            )
        elif os.path.isdir(text):
            matches = sorted(glob.glob(os.path.join(glob.escape(text), "*.parquet")))
            matches += _unfinished_outputs(
                glob.glob(os.path.join(glob.escape(text), "*.parquet" + layout.CHECKPOINT_SUFFIX))
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


def _has_checkpoint(output: Path) -> bool:
    return layout.has_manifest(layout.checkpoint_dir(output))


def _unfinished_outputs(folders: Iterable[str]) -> list[str]:
    """The outputs of checkpoint folders that have no output file yet."""
    outputs = [str(layout.output_of(Path(f))) for f in sorted(folders)
               if f.endswith(layout.CHECKPOINT_SUFFIX)]
    return [o for o in outputs if not os.path.isfile(o) and _has_checkpoint(Path(o))]


def _read_from_checkpoint(output: Path) -> bool:
    """True when the summary of `output` must come from its checkpoint: the run is going on,
    was interrupted, or is going again (the file, if any, is not the latest)."""
    try:
        manifest = layout.trusted_manifest(layout.checkpoint_dir(output))
    except UsageError:  # an untrusted folder: its output file, if any, is what there is
        if output.is_file():
            return False
        raise
    if manifest is None:
        return False
    finished = manifest.get("finished")
    return not (finished and output.is_file())


def _names(path: Path) -> list[str]:
    """A result file's column names (none when it cannot be read: _read_batches says why)."""
    try:
        if _is_text(path):
            return list(_text_schema(path).names)
        return pq.read_schema(path).names
    except (OSError, pa.ArrowException, UsageError):
        return []


_TEXT_SUFFIXES = (".jsonl", ".ndjson", ".csv")


def _is_text(path: Path) -> bool:
    """A `.jsonl` or `.csv` output (`run -o out.jsonl`), read as text rather than Parquet."""
    return path.suffix.lower() in _TEXT_SUFFIXES


def _text_schema(path: Path) -> pa.Schema:
    from batchrunner.store.scored import read_result_batches

    schema, _batches = read_result_batches(path)
    return schema


# The result columns a summary reads, typed as in Parquet outputs: a text output's types are
# inferred, and a column null in every row would otherwise have no type to sum.
_TEXT_TYPES = {field.name: field.type for field in RESULT_SCHEMA}


def _text_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    """The columns of a `.jsonl` or `.csv` output, typed as a Parquet output's, a batch at a
    time."""
    from batchrunner.store.scored import read_result_batches

    schema, batches = read_result_batches(path)
    try:
        seen = False
        for batch in batches:
            seen = True
            yield pa.Table.from_arrays(
                [_typed(batch.column(name), _TEXT_TYPES.get(name)) for name in columns],
                names=list(columns))
        if not seen:
            yield pa.Table.from_arrays(
                [pa.array([], _TEXT_TYPES.get(name, schema.field(name).type)) for name in columns],
                names=list(columns))
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: cannot be read ({exc})") from None


def _typed(values: pa.Array, wanted: pa.DataType | None) -> pa.Array:
    if wanted is None or values.type == wanted:
        return values
    if pa.types.is_list(wanted):
        return values
    return values.cast(wanted)


_BATCH_ROWS = 1 << 18  # rows aggregated at a time: memory stays flat however large a file


def _read_batches(path: Path, by: str, needed: Sequence[str]) -> Iterator[pa.Table]:
    """Only the columns a summary needs, from one result file, a batch at a time.

    Errors name the file (and the column).
    """
    try:
        schema = _text_schema(path) if _is_text(path) else pq.read_schema(path)
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
    if _is_text(path):
        yield from _text_batches(path, columns)
        return
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
