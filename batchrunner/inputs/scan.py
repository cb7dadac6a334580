"""The pass over an input before anything is sent, and the input's identity for resume.

`scan_input` checks the file, the columns the options name, the model, and that ids are unique
(ids are hashed into a numpy array; only colliding hashes are compared on the real ids, in a
second pass), and counts the rows: `InputInfo`. `fingerprint_input` is the size, mtime and
BLAKE2b of the file's bytes that a resume compares.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchrunner.config.settings import RunConfig
from batchrunner.errors import InputError
from batchrunner.inputs.columns import id_text, resolve_columns
from batchrunner.inputs.formats import (
    _arrow_columns,
    _check_file,
    _csv_batches,
    _jsonl_lines,
    _open_parquet,
    _parquet_batches,
    detect_format,
)

__all__ = ["InputInfo", "fingerprint_input", "scan_input"]

_ID_CHUNK_ROWS = 16384
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class InputInfo:
    """What `scan_input` learned about an input: its format, columns and row count."""

    path: Path
    format: str  # "jsonl", "parquet" or "csv"
    columns: tuple[str, ...]
    rows: int  # after --limit


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
