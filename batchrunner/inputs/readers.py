"""Stream rows from JSONL, Parquet and CSV inputs, never loading a file whole (SPEC section 5).

Three readers share one shape of output, so the rest of the run never sees a format:

- `scan_input` makes one pass before anything is sent: it checks the file, the columns the
  options name, the model, and that ids are unique; every problem is one `InputError` line.
- `iter_records` yields rows lazily as Python dicts, for building requests.
- `iter_tables` yields the same rows as Arrow tables with one fixed schema, for the output.

Formats by extension: `.jsonl` / `.ndjson` (optionally `.gz`), `.parquet`, `.csv` (optionally
`.gz`). Rows are numbered from 0 in input order. In JSONL every line is a row, so row `i` is line
`i + 1` and errors name the line; a line that is blank or not a JSON object is a row that cannot
be read (blank lines at the very end of the file are not rows). CSV cells are read as text,
exactly as written (no type guessing: `007` stays `007`, `NA` stays `NA`); an empty unquoted cell
is null, a quoted `""` is the empty string.

pyarrow stays in this module: what leaves it is Python values, except the tables of
`iter_tables`, which go to the output writer.
"""

from __future__ import annotations

import _string  # the parser str.format uses for field names such as "a.b[0]"
import codecs
import gzip
import hashlib
import json
import logging
import stat
import string
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchrunner.config.settings import RunConfig
from batchrunner.errors import InputError
from batchrunner.inputs.rowhash import input_hashes

__all__ = [
    "ColumnPlan",
    "InputInfo",
    "detect_format",
    "fingerprint_input",
    "id_text",
    "iter_column_batches",
    "iter_hashed_records",
    "iter_records",
    "iter_tables",
    "resolve_columns",
    "scan_input",
    "template_fields",
]

logger = logging.getLogger(__name__)

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson.gz": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
}
_BATCH_API_COLUMNS = ("custom_id", "method", "url", "body")
# Rows per batch when reading for requests: small enough that a batch of Python dicts is a few
# MB, large enough that per-batch overhead vanishes.
_RECORD_BATCH_ROWS = 8192
_RECORD_BATCH_BYTES = 8 << 20
_TABLE_BATCH_BYTES = 64 << 20
_ID_CHUNK_ROWS = 16384
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class InputInfo:
    """What `scan_input` learned about an input: its format, columns and row count."""

    path: Path
    format: str  # "jsonl", "parquet" or "csv"
    columns: tuple[str, ...]
    rows: int  # after --limit


@dataclass(frozen=True)
class ColumnPlan:
    """Which input columns feed which part of a request (SPEC section 5), resolved once a run."""

    id_column: str | None  # None: ids are 0-based row numbers
    messages_column: str | None
    prompt_column: str | None
    template_fields: tuple[str, ...]
    model_column: str | None
    batch_api: bool  # rows may be OpenAI Batch API lines (custom_id, method, url, body)

    @property
    def needed(self) -> tuple[str, ...]:
        """The input columns that building a request reads, in a stable order."""
        names: dict[str, None] = {}
        for name in (self.id_column, self.messages_column, self.prompt_column, self.model_column):
            if name is not None:
                names[name] = None
        names.update(dict.fromkeys(self.template_fields))
        if self.batch_api:
            names.update(dict.fromkeys(_BATCH_API_COLUMNS))
        return tuple(names)


# --- formats, files and columns ------------------------------------------------------------


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


def id_text(value: Any) -> str:
    """An id as the output holds it: always a string (the int 7 becomes "7")."""
    return value if type(value) is str else str(value)


def template_fields(template: str | None) -> tuple[str, ...]:
    """The columns a `str.format` template reads: `{question}` and `{meta[lang]}` read
    `question` and `meta`; `{{` is a literal brace. A positional `{}` or `{0}` is an error."""
    if template is None:
        return ()
    fields: dict[str, None] = {}

    def walk(text: str, depth: int) -> None:
        for _literal, field, spec, _conversion in string.Formatter().parse(text):
            if field is None:
                continue
            first, rest = _string.formatter_field_name_split(field)
            list(rest)  # a malformed "{a[}" only fails here
            if first == "" or isinstance(first, int):
                raise InputError(
                    f"template {template!r}: placeholder {{{field}}} is positional; "
                    "name a column, as in {prompt}"
                )
            fields[first] = None
            if spec and depth < 2:
                walk(spec, depth + 1)

    try:
        walk(template, 0)
    except ValueError as exc:
        raise InputError(f"template {template!r}: {exc}") from None
    return tuple(fields)


def resolve_columns(config: RunConfig, columns: Sequence[str]) -> ColumnPlan:
    """Decide which columns give the id, messages, prompt and model (SPEC section 5).

    Raises InputError for a column named by the options that the input lacks, a template
    placeholder with no column, no prompt source at all, or no model. With no columns known
    (an empty JSONL file) nothing can be checked and nothing is raised.

    An explicit --template or --prompt-column wins over a column that is merely *called*
    "messages"; an explicit --messages-column comes first, the template or prompt filling in
    for rows whose messages are null.
    """
    where = config.input
    have = set(columns)
    checking = bool(columns)
    fields = template_fields(config.template)

    def listing() -> str:
        shown = ", ".join(columns[:20])
        return shown + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")

    if checking:
        for name in (config.prompt_column, config.messages_column, config.id_column):
            if name is not None and name not in have:
                raise InputError(f"{where}: no column {name!r} (columns: {listing()})")
        for name in fields:
            if name not in have:
                raise InputError(
                    f"{where}: template placeholder {{{name}}} has no column (columns: {listing()})"
                )

    batch_api = "body" in have and "custom_id" in have
    if config.id_column is not None:
        id_column: str | None = config.id_column
    else:
        id_column = next((c for c in ("id", "custom_id") if c in have), None)
    if config.messages_column is not None:
        messages_column: str | None = config.messages_column
    elif config.template is None and config.prompt_column is None and "messages" in have:
        messages_column = "messages"
    else:
        messages_column = None
    if config.template is not None:
        prompt_column = None
    elif config.prompt_column is not None:
        prompt_column = config.prompt_column
    else:
        prompt_column = "prompt" if "prompt" in have else None
    model_column = "model" if "model" in have else None

    if checking:
        if not (batch_api or messages_column or prompt_column or config.template is not None):
            raise InputError(
                f"{where}: no column 'prompt' (columns: {listing()}); name the prompt column "
                "with --prompt-column, or give --template, or a 'messages' column"
            )
        if not (config.model or config.params.get("model") or model_column or batch_api):
            raise InputError(f"{where}: no model: give --model, or a 'model' column")
    return ColumnPlan(
        id_column=id_column,
        messages_column=messages_column,
        prompt_column=prompt_column,
        template_fields=fields,
        model_column=model_column,
        batch_api=batch_api,
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


# --- JSONL ---------------------------------------------------------------------------------

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


def _body_has_model(body: Any) -> bool:
    if type(body) is str:
        try:
            body = json.loads(body)
        except ValueError:
            return False
    return type(body) is dict and bool(body.get("model"))


def _scan_jsonl(config: RunConfig, path: Path) -> InputInfo:
    keys: dict[str, None] = {}
    # Ids are gathered for every column that may turn out to be the id column: which one it
    # is depends on the union of keys, known only at the end of this single pass.
    candidates = (config.id_column,) if config.id_column else ("id", "custom_id")
    ids = {name: _IdHashes(None) for name in candidates}
    pending: dict[str, list[str]] = {name: [] for name in candidates}
    no_id: dict[str, int] = {}  # column -> first line without an id
    body_model = False
    rows = 0
    for obj, _error, _size in _jsonl_lines(path, config.limit):
        rows += 1
        if obj is None:
            continue
        for key in obj:
            if key not in keys:
                keys[key] = None
        for name in candidates:
            value = obj.get(name)
            if value is None or value == "":
                no_id.setdefault(name, rows)
            else:
                texts = pending[name]
                texts.append(id_text(value))
                if len(texts) >= _ID_CHUNK_ROWS:
                    ids[name].add(_hash_texts(texts))
                    pending[name] = []
        if not body_model and "body" in obj:
            body_model = _body_has_model(obj["body"])
    columns = tuple(keys)
    if rows == 0:
        return InputInfo(path, "jsonl", columns, 0)
    plan = resolve_columns(config, columns)
    if plan.batch_api and not (
        config.model or config.params.get("model") or plan.model_column or body_model
    ):
        raise InputError(
            f"{path}: no model: give --model, a 'model' column, or a model in each body"
        )
    name = plan.id_column
    if name is not None:
        if name in no_id:
            raise InputError(f"{path}: line {no_id[name]}: no id (column {name!r})")
        ids[name].add(_hash_texts(pending[name]))
        suspects = ids[name].colliding()
        if suspects.size:

            def chunks() -> Iterator[tuple[list[str], list[int]]]:
                texts: list[str] = []
                lines: list[int] = []
                for line_no, (obj, _e, _s) in enumerate(_jsonl_lines(path, config.limit), 1):
                    if obj is not None:
                        texts.append(id_text(obj[name]))
                        lines.append(line_no)
                        if len(texts) >= _ID_CHUNK_ROWS:
                            yield texts, lines
                            texts, lines = [], []
                yield texts, lines

            duplicate = _find_duplicate(chunks(), suspects)
            if duplicate is not None:
                text, first, second = duplicate
                raise InputError(
                    f"{path}: duplicate id {_short(text)} (lines {first} and {second})"
                )
    return InputInfo(path, "jsonl", columns, rows)


# --- Parquet and CSV -----------------------------------------------------------------------


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        # pre_buffer would read ahead the selected columns of every row group at once: memory
        # that grows with the file.
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None


def _parquet_batch_rows(pf: pq.ParquetFile, cap: int, target_bytes: int) -> int:
    """Rows per batch so that one batch holds about target_bytes of (uncompressed) data."""
    meta = pf.metadata
    if meta.num_rows == 0:
        return cap
    total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = max(total / meta.num_rows, 1.0)
    return max(64, min(cap, int(target_bytes / per_row)))


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


def _scan_arrow(config: RunConfig, path: Path, fmt: str) -> InputInfo:
    columns = _arrow_columns(path, fmt)
    plan = resolve_columns(config, columns)
    name = plan.id_column
    pf = _open_parquet(path) if fmt == "parquet" else None

    def id_batches() -> Iterator[pa.Array]:
        if pf is not None:
            # One column decodes fast enough alone; threads would only cost memory.
            batches = _parquet_batches(path, pf, [name], _ID_CHUNK_ROWS, config.limit, False)
            for batch in batches:
                yield batch.column(0)
        else:
            # Without an id column, one column is still read: CSV rows can only be counted.
            for batch in _csv_batches(path, columns, [name or columns[0]], config.limit):
                yield batch.column(0)

    if pf is not None:
        rows = pf.metadata.num_rows
        rows = rows if config.limit is None else min(rows, config.limit)
        if name is None:
            return InputInfo(path, fmt, columns, rows)
        ids = _IdHashes(rows)
    else:
        ids = _IdHashes(None)
    rows = 0
    for array in id_batches():
        if name is not None:
            try:
                ids.add(_hash_arrow(array, path, rows))
            except InputError as exc:
                raise InputError(f"{exc} (column {name!r})") from None
        rows += len(array)
    if name is not None:
        suspects = ids.colliding()
        if suspects.size:
            numbered = _numbered(id_batches())
            duplicate = _find_duplicate(numbered, suspects)
            if duplicate is not None:
                text, first, second = duplicate
                raise InputError(
                    f"{path}: duplicate id {_short(text)} (rows {first} and {second}, 0-based)"
                )
    return InputInfo(path, fmt, columns, rows)


# --- ids -----------------------------------------------------------------------------------


class _IdHashes:
    """64-bit hashes of every id, so that ten million ids cost 80 MB, not ten million strings.

    Equal hashes only make suspects; `_find_duplicate` confirms them on the real ids.
    """

    # An array this large is always mmapped by malloc: pages cost memory only once written,
    # and growing it (realloc, i.e. mremap) never holds two copies.
    _INITIAL = 1 << 23

    def __init__(self, expected: int | None) -> None:
        self._hashes = np.empty(self._INITIAL if expected is None else expected, np.uint64)
        self._size = 0

    def add(self, hashes: np.ndarray) -> None:
        end = self._size + len(hashes)
        if end > len(self._hashes):
            self._hashes.resize(max(end, 2 * len(self._hashes)), refcheck=False)
        self._hashes[self._size : end] = hashes
        self._size = end

    def colliding(self) -> np.ndarray:
        """The hash values seen more than once (usually none)."""
        hashes = self._hashes[: self._size]
        hashes.sort()
        repeated = []
        step = 1 << 20  # compare a slice at a time: no bool array the size of the input
        for start in range(0, max(len(hashes) - 1, 0), step):
            part = hashes[start : start + step + 1]
            repeated.append(part[1:][part[1:] == part[:-1]])
        return np.unique(np.concatenate(repeated)) if repeated else hashes[:0].copy()


def _hash_texts(texts: list[str]) -> np.ndarray:
    # Python's own string hash: seeded per process, which is all a single scan needs, and it
    # spares importing pandas (some 50 MB) for pd.util.hash_array.
    return np.fromiter(map(hash, texts), np.int64, len(texts)).view(np.uint64)


def _hash_arrow(array: pa.Array, path: Path | None = None, start: int = 0) -> np.ndarray:
    """Hashes of a column of ids; given `path`, a null or empty id is an InputError first."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if path is not None and array.null_count:
        at = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{path}: row {start + at} (0-based): id is null")
    kind = array.type
    if pa.types.is_integer(kind):
        # str() of an int is one-to-one, so the numbers themselves serve as hashes.
        return array.to_numpy().astype(np.uint64)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        texts = array.to_pylist()
    else:
        texts = [id_text(value) for value in array.to_pylist()]
    if path is not None and "" in texts:
        raise InputError(f"{path}: row {start + texts.index('')} (0-based): id is empty")
    return _hash_texts(texts)


def _numbered(arrays: Iterable[pa.Array]) -> Iterator[tuple[pa.Array, range]]:
    start = 0
    for array in arrays:
        yield array, range(start, start + len(array))
        start += len(array)


def _find_duplicate(
    chunks: Iterable[tuple[pa.Array | list[str], Sequence[int]]], suspects: np.ndarray
) -> tuple[str, int, int] | None:
    """The first id seen twice among the suspects, with the positions of both, or None."""
    first_seen: dict[str, int] = {}
    for values, positions in chunks:
        is_arrow = isinstance(values, pa.Array)
        hashes = _hash_arrow(values) if is_arrow else _hash_texts(values)
        for at in np.flatnonzero(np.isin(hashes, suspects)).tolist():
            value = values[at]
            text = id_text(value.as_py()) if is_arrow else value
            if text in first_seen:
                return text, first_seen[text], positions[at]
            first_seen[text] = positions[at]
    return None


def _short(text: str, width: int = 80) -> str:
    shown = text if len(text) <= width else text[: width - 3] + "..."
    return repr(shown)


# --- the public readers ----------------------------------------------------------------------


def scan_input(config: RunConfig) -> InputInfo:
    """Check an input in one pass before anything is sent, and count its rows.

    Raises InputError (one line naming the file and the column or line) for a missing or
    unreadable file, an unknown format, a column named by the options that is missing, a
    template placeholder with no column, no prompt source or no model, and a null or
    duplicate id. For Parquet and CSV only the id column is read.

    >>> info = scan_input(RunConfig(input=Path("prompts.jsonl"), output=Path("out.parquet"),
    ...                             model="gpt-4o"))
    >>> info.rows, info.columns
    (1000, ('id', 'prompt'))
    """
    path = Path(config.input)
    fmt = detect_format(path)
    _check_file(path)
    if fmt == "jsonl":
        return _scan_jsonl(config, path)
    return _scan_arrow(config, path, fmt)


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


def _record_batches(
    path: Path, fmt: str, all_columns: Sequence[str], wanted: list[str] | None, limit: int | None
) -> Iterator[pa.RecordBatch]:
    """The record batches `iter_records` turns into rows (Parquet or CSV)."""
    if fmt == "parquet":
        pf = _open_parquet(path)
        batch_rows = _parquet_batch_rows(pf, _RECORD_BATCH_ROWS, _RECORD_BATCH_BYTES)
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


def fingerprint_input(path: str | Path) -> dict[str, Any]:
    """The identity of an input for resume checks: size, mtime_ns and a BLAKE2b of its bytes."""
    path = Path(path)
    info = path.stat()
    digest = hashlib.blake2b(digest_size=20)
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "blake2b": digest.hexdigest()}
