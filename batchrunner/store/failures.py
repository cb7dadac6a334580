"""The most frequent errors of a run, with counts, for summaries and status.

    top = top_errors(pa.array(["HTTP 404: no such model", None, "HTTP 404: no such model"]))
    top[0].error, top[0].count      # ('HTTP 404: no such model', 2)

Errors that differ only in where they happened (`input: line 7: not valid JSON`) count as one
(`input: line N: not valid JSON`); anything that looks like an API key is masked, so that a
gateway echoing a key in its message cannot put it on a screen.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.redaction import scrub

__all__ = [
    "TOP_ERRORS",
    "ErrorCount",
    "merge_counts",
    "normalize_error",
    "render_errors",
    "top_errors",
    "value_counts",
]

#: How many of the most frequent errors a summary lists.
TOP_ERRORS = 5

_WHERE = re.compile(r"^input: (line|row) \d+:")
_MAX_CHARS = 300


@dataclass(frozen=True, slots=True)
class ErrorCount:
    """One kind of error and how many rows failed with it."""

    error: str
    count: int

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {"error": self.error, "count": self.count}


def normalize_error(text: str) -> str:
    """The kind of an error: row and line numbers of input errors as N, key-like text masked."""
    text = _WHERE.sub(lambda m: f"input: {m.group(1)} N:", text.strip())
    text = scrub(text)
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 1] + "…"


def merge_counts(
    pairs: Iterable[tuple[str, int]], limit: int = TOP_ERRORS
) -> tuple[ErrorCount, ...]:
    """(error, count) pairs normalized and merged; the `limit` most frequent, most first."""
    counts: Counter[str] = Counter()
    for text, count in pairs:
        counts[normalize_error(text)] += int(count)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(ErrorCount(error, count) for error, count in ranked[:limit])


def value_counts(errors: pa.Array | pa.ChunkedArray) -> list[tuple[str, int]]:
    """(error, count) for each distinct non-null value of an Arrow string column."""
    if len(errors) == 0 or errors.null_count == len(errors):
        return []
    counted = pc.value_counts(pc.drop_null(errors))
    if isinstance(counted, pa.ChunkedArray):
        counted = counted.combine_chunks()
    return list(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))


def top_errors(
    errors: pa.Array | pa.ChunkedArray, limit: int = TOP_ERRORS
) -> tuple[ErrorCount, ...]:
    """The most frequent errors of an Arrow string column (nulls are not errors)."""
    return merge_counts(value_counts(errors), limit)


def render_errors(errors: Iterable[ErrorCount], indent: str = "  ") -> list[str]:
    """Text lines for people: `  12  HTTP 404: ...` (rows, error), one an error kind."""
    errors = list(errors)
    if not errors:
        return []
    width = max(len(f"{e.count:,}") for e in errors)
    return [f"{indent}{e.count:>{width},}  {e.error}" for e in errors]
