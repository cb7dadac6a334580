"""Metrics: an answer and a reference give a score in [0, 1] (docs/evaluations.md).

A metric is named by a spec string (`exact`, `numeric:0.01`, `regex:Answer: (\\w+)`,
`python:mymetrics.py:judge`, ...); `parse_metric` checks it before anything is sent and gives a
`Metric`, which scores whole Arrow columns at a time. `score_results` scores (or re-scores) a
finished results file, streaming it in record batches so memory stays flat.

    metric = parse_metric("normalized")
    scores = metric.score(answers, references)     # pyarrow arrays in, a float64 array out
    score_results(Path("out/eval.parquet"), "choice", "reference")
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import UsageError

__all__ = [
    "METRICS",
    "Metric",
    "ScoreOutcome",
    "TableScorer",
    "extract_choice",
    "f1_score",
    "last_number",
    "normalize_answer",
    "parse_metric",
    "score_table",
]

log = logging.getLogger(__name__)

METRICS = ("exact", "normalized", "contains", "regex:PATTERN", "numeric[:TOL]", "choice",
           "json:FIELD", "f1", "python:MODULE:FUNCTION")
"""The metric specs `parse_metric` accepts."""

SCORE_BATCH_ROWS = 65_536  # rows scored at a time when streaming a file

# -- SQuAD's answer normalisation -----------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Arrow's (RE2) versions of the same steps, to normalise a whole column at once.
_RE2_PUNCTUATION = "[" + re.escape(string.punctuation) + "]"
_RE2_ARTICLES = r"\b(a|an|the)\b"
_RE2_SPACE = r"[\s\p{Z}\x1c-\x1f\x85]+"


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _normalize_column(values: pa.Array) -> pa.Array:
    """`normalize_answer` over a string column, in Arrow (nulls stay null)."""
    values = pc.utf8_lower(values)
    values = pc.replace_substring_regex(values, _RE2_PUNCTUATION, "")
    values = pc.replace_substring_regex(values, _RE2_ARTICLES, " ")
    values = pc.replace_substring_regex(values, _RE2_SPACE, " ")
    return pc.utf8_trim(values, " ")


def f1_score(answer: str, reference: str) -> float:
    """SQuAD's token F1 of the normalised answer against the normalised reference.

    Two empty token lists score 1 (SQuAD 2.0's rule); one empty list scores 0.
    """
    return _f1_tokens(normalize_answer(answer).split(), normalize_answer(reference).split())


def _f1_tokens(answer: list[str], reference: list[str]) -> float:
    if not answer or not reference or answer == reference:
        return float(answer == reference)
    if len(answer) == 1 and len(reference) == 1:
        return 0.0  # two different single tokens
    # The size of the multiset intersection (SQuAD's Counter & Counter), without the Counters.
    left: dict[str, int] = {}
    for token in reference:
        left[token] = left.get(token, 0) + 1
    same = 0
    for token in answer:
        count = left.get(token)
        if count:
            same += 1
            left[token] = count - 1
    if same == 0:
        return 0.0
    precision, recall = same / len(answer), same / len(reference)
    return 2 * precision * recall / (precision + recall)


# -- numbers --------------------------------------------------------------------------------

# A sign only where it does not follow a word (so "5-3" reads 3, "x = -3" reads -3); digits
# grouped by thousands with commas, or plain; a decimal part; an exponent.
_NUMBER = re.compile(
    r"(?:(?<![\w.])([-+\u2212]))?"
    r"(\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:[eE]([-+]?\d+))?"
)


def last_number(text: str) -> float | None:
    """The last number written in `text` (`1,234.5` is 1234.5, `-3` and `−3` are -3), or None."""
    found = None
    for found in _NUMBER.finditer(text):
        pass
    if found is None:
        return None
    sign, digits, exponent = found.groups()
    value = float(digits.replace(",", "") + (f"e{exponent}" if exponent else ""))
    return -value if sign in ("-", "\u2212") else value


def _same_number(answer: float | None, reference: float, tolerance: float) -> bool:
    if answer is None:
        return False
    if reference == 0:
        return abs(answer) <= tolerance
    return math.isclose(answer, reference, rel_tol=tolerance, abs_tol=0.0)


# -- option letters -------------------------------------------------------------------------

_CHOICE_PATTERNS = [
    # "Answer: C", "the answer is (b)", "Correct option: D", "I choose B", "final answer is C."
    re.compile(
        r"(?:answer|option|choice|choose|select|pick)(?:\s+(?:is|would\s+be|=))?\s*[:=]?\s*"
        r"(?:option\s+|letter\s+)?"
        r"(?:[(\[]([A-Za-z])[)\]]|(?-i:([A-Z]))(?![A-Za-z'])|(?-i:([a-z]))(?=\s*[.)]?\s*$))",
        re.IGNORECASE,
    ),
    re.compile(r"^\s*[(\[]?([A-Za-z])[)\].:]?\s*$"),  # the answer is only the letter: "C", "(c)"
    re.compile(r"^\s*[(\[]?([A-Z])[)\].:](?:\s|$)"),  # "B. Paris", "C) 42", "(a) first"
    re.compile(r"[(\[]([A-Za-z])[)\]]"),  # "(c)" anywhere
    re.compile(r"(?<![A-Za-z'])([B-HJ-Z]|A(?!\s+[a-z]))(?![A-Za-z'])"),  # a lone capital
]


@functools.lru_cache(maxsize=65_536)  # references, and many answers, repeat
def extract_choice(text: str) -> str | None:
    """The option letter (A-Z, upper case) an answer chooses, or None when it names none.

    >>> extract_choice("The answer is (b).")
    'B'
    """
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            return next(g for g in match.groups() if g).upper()
    return None


# -- metrics --------------------------------------------------------------------------------

RowFunction = Callable[[str, str, dict[str, Any]], Any]


@dataclass(frozen=True)
class ScoreOutcome:
    """The scores of a batch and how many rows a user function failed on (null scores)."""

    scores: pa.Array
    failed: int = 0
    first_error: str | None = None


@dataclass(frozen=True)
class Metric:
    """A parsed metric spec; `score` turns answer and reference columns into scores."""

    spec: str
    kind: str
    argument: str | None = None
    tolerance: float = 1e-6
    pattern: re.Pattern[str] | None = field(default=None, compare=False)
    function: RowFunction | None = field(default=None, compare=False)

    @property
    def binary(self) -> bool:
        """True when every score is 0 or 1 (all built-ins but f1)."""
        return self.kind not in ("f1", "python")

    @property
    def needs_rows(self) -> bool:
        """True when the metric wants each row's other columns (a user function)."""
        return self.kind == "python"

    def score(
        self, answers: pa.Array, references: pa.Array, rows: pa.RecordBatch | None = None
    ) -> pa.Array:
        """float64 scores, null where the answer or the reference is null."""
        return self.score_batch(answers, references, rows).scores

    def score_batch(
        self, answers: pa.Array, references: pa.Array, rows: pa.RecordBatch | None = None
    ) -> ScoreOutcome:
        """Scores of a batch, with the count of rows a user function failed on."""
        answers = _as_strings(answers)
        references = _as_strings(references)
        missing = pc.or_kleene(pc.is_null(answers), pc.is_null(references))
        if self.kind == "python":
            return self._score_python(answers, references, rows)
        if self.kind == "exact":
            same = pc.equal(pc.utf8_trim_whitespace(answers), pc.utf8_trim_whitespace(references))
            values = pc.cast(same, pa.float64())
        elif self.kind == "normalized":
            values = pc.cast(
                pc.equal(_normalize_column(answers), _normalize_column(references)), pa.float64()
            )
        elif self.kind == "contains":
            values = _pairwise(
                _normalize_column(answers), _normalize_column(references),
                lambda a, r: float(r in a), equal=1.0,
            )
        elif self.kind == "f1":
            values = _pairwise(
                _normalize_column(answers), _normalize_column(references),
                lambda a, r: _f1_tokens(a.split(), r.split()), equal=1.0,
            )
        elif self.kind == "regex":
            pattern = self.pattern
            assert pattern is not None

            def extract(text: str) -> str | None:
                match = pattern.search(text)
                if match is None:
                    return None
                return match.group(1) if pattern.groups else match.group(0)

            extracted = pa.array([None if a is None else extract(a) for a in answers.to_pylist()],
                                 pa.string())
            same = pc.equal(_normalize_column(extracted), _normalize_column(references))
            values = pc.cast(pc.fill_null(same, False), pa.float64())
        elif self.kind == "numeric":
            tolerance = self.tolerance
            values = _pairwise(
                answers, references,
                lambda a, r: _numeric(a, r, tolerance),
            )
        elif self.kind == "choice":
            values = _pairwise(answers, references, _choice)
        elif self.kind == "json":
            path = (self.argument or "").split(".")
            fields = pa.array(
                [None if a is None else _json_field(a, path) for a in answers.to_pylist()],
                pa.string(),
            )
            same = pc.equal(_normalize_column(fields), _normalize_column(references))
            values = pc.cast(pc.fill_null(same, False), pa.float64())
        else:  # pragma: no cover - parse_metric admits no other kind
            raise AssertionError(self.kind)
        return ScoreOutcome(pc.if_else(missing, pa.scalar(None, pa.float64()), values))

    def _score_python(
        self, answers: pa.Array, references: pa.Array, rows: pa.RecordBatch | None
    ) -> ScoreOutcome:
        function = self.function
        assert function is not None
        records = rows.to_pylist() if rows is not None else [{}] * len(answers)
        scores: list[float | None] = []
        failed = 0
        first_error: str | None = None
        for answer, reference, row in zip(answers.to_pylist(), references.to_pylist(), records):
            if answer is None or reference is None:
                scores.append(None)
                continue
            try:
                value = function(answer, reference, row)
                if value is not None:
                    value = float(value)
                    if not 0.0 <= value <= 1.0:
                        raise ValueError(f"returned {value}, not a score in [0, 1]")
            except Exception as exc:  # a user's function: any failure is that row's null
                failed += 1
                if first_error is None:
                    first_error = f"{type(exc).__name__}: {exc}"
                value = None
            scores.append(value)
        return ScoreOutcome(pa.array(scores, pa.float64()), failed, first_error)


def _as_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        if pa.types.is_null(values.type):
            return pa.nulls(len(values), pa.string())
        values = pc.cast(values, pa.string())  # numbers and booleans as references
    return values


def _pairwise(answers: pa.Array, references: pa.Array,
              function: Callable[[str, str], float | None],
              equal: float | None = None) -> pa.Array:
    """A per-row Python function over two string columns (null where either is null).

    With `equal`, rows whose two strings are the same score it without the call (Arrow
    compares a whole column at once).
    """
    if equal is not None:
        same = pc.fill_null(pc.equal(answers, references), False).to_numpy(zero_copy_only=False)
        return pa.array(
            [
                None if a is None or r is None else equal if s else function(a, r)
                for a, r, s in zip(answers.to_pylist(), references.to_pylist(), same.tolist())
            ],
            pa.float64(),
        )
    return pa.array(
        [
            None if a is None or r is None else function(a, r)
            for a, r in zip(answers.to_pylist(), references.to_pylist())
        ],
        pa.float64(),
    )


def _numeric(answer: str, reference: str, tolerance: float) -> float | None:
    expected = _reference_number(reference)
    if expected is None:
        return None  # a reference with no number cannot be scored
    return float(_same_number(last_number(answer), expected, tolerance))


_REFERENCE_CACHE: dict[str, float | None] = {}


def _reference_number(reference: str) -> float | None:
    try:
        return _REFERENCE_CACHE[reference]
    except KeyError:
        pass
    value = last_number(reference)
    if len(_REFERENCE_CACHE) < 100_000:
        _REFERENCE_CACHE[reference] = value
    return value


def _choice(answer: str, reference: str) -> float | None:
    expected = extract_choice(reference)
    if expected is None:
        return None
    return float(extract_choice(answer) == expected)


_FENCE = re.compile(r"^\s*```[A-Za-z]*\s*\n?(.*?)\n?```\s*$", re.DOTALL)


def _json_field(answer: str, path: list[str]) -> str | None:
    fenced = _FENCE.match(answer)
    try:
        value: Any = orjson.loads(fenced.group(1) if fenced else answer)
    except orjson.JSONDecodeError:
        return None
    for key in path:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


# -- parsing a spec -------------------------------------------------------------------------


def parse_metric(spec: str) -> Metric:
    """The Metric a spec names; a UsageError (exit 2) for an unknown name, a bad pattern or
    tolerance, or a user function that cannot be imported.

    >>> parse_metric("numeric:0.01").tolerance
    0.01
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"--score/--metric must name a metric: one of {', '.join(METRICS)}")
    name, sep, argument = spec.partition(":")
    name = name.strip().lower()
    if name in ("exact", "normalized", "contains", "choice", "f1"):
        if sep:
            raise UsageError(f"metric {spec!r}: {name} takes no argument")
        return Metric(spec, name)
    if name == "numeric":
        tolerance = 1e-6
        if sep:
            try:
                tolerance = float(argument)
            except ValueError:
                tolerance = -1.0
            if not (math.isfinite(tolerance) and tolerance >= 0):
                raise UsageError(
                    f"metric {spec!r}: the tolerance must be a number >= 0, such as numeric:0.01"
                )
        return Metric(spec, "numeric", argument or None, tolerance=tolerance)
    if name == "regex":
        if not argument:
            raise UsageError(f"metric {spec!r}: give a pattern, such as 'regex:Answer: (\\w+)'")
        try:
            pattern = re.compile(argument)
        except re.error as exc:
            raise UsageError(f"metric {spec!r}: not a valid regular expression: {exc}") from None
        return Metric(spec, "regex", argument, pattern=pattern)
    if name == "json":
        if not argument:
            raise UsageError(f"metric {spec!r}: give a field, such as json:answer")
        return Metric(spec, "json", argument)
    if name == "python":
        return Metric(spec, "python", argument, function=_load_function(spec, argument))
    close = [m for m in METRICS if m.split(":")[0].startswith(name[:3])] if name else []
    hint = f" (did you mean {close[0].split('[')[0]}?)" if close else ""
    raise UsageError(f"unknown metric {spec!r}{hint}; the metrics are: {', '.join(METRICS)}")


def _load_function(spec: str, argument: str) -> RowFunction:
    where, sep, name = argument.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(
            f"metric {spec!r}: expected python:MODULE:FUNCTION or python:path/to/file.py:FUNCTION"
        )
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise UsageError(f"metric {spec!r}: no file {path}")
            module_name = f"_batchrunner_metric_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            if module_spec is None or module_spec.loader is None:
                raise UsageError(f"metric {spec!r}: cannot load {path}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # `python -m batchrunner` finds local modules
            module = importlib.import_module(where)
    except UsageError:
        raise
    except Exception as exc:  # the user's module failed to import: say how, never a traceback
        raise UsageError(
            f"metric {spec!r}: cannot import {where}: {type(exc).__name__}: {exc}"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"metric {spec!r}: {where} has no function {name!r}")
    return function  # type: ignore[no-any-return]


# -- scoring tables and files ---------------------------------------------------------------


def check_reference_column(columns: Sequence[str], reference_column: str | None,
                           where: str) -> str:
    """The reference column, checked to be among `columns` (UsageError naming it if not)."""
    if not reference_column:
        raise UsageError("scoring needs --reference-column COL (job key `reference_column`)")
    if reference_column not in columns:
        carried = f"input_{reference_column}"
        if carried in columns:
            return carried
        raise UsageError(f"{where}: no reference column {reference_column!r}")
    return reference_column


class _Warnings:
    """Counts a user function's failures over a whole file, for one warning at the end."""

    def __init__(self) -> None:
        self.failed = 0
        self.first: str | None = None

    def add(self, outcome: ScoreOutcome) -> None:
        self.failed += outcome.failed
        if self.first is None:
            self.first = outcome.first_error

    def warn(self, metric: Metric) -> None:
        if self.failed:
            log.warning(
                "metric %s failed on %d row%s (null scores); the first: %s",
                metric.spec, self.failed, "" if self.failed == 1 else "s", self.first,
            )


def _answer_column(batch: pa.RecordBatch | pa.Table) -> pa.Array:
    """The answer to score: `content` where the row is ok, else null."""
    content = batch.column("content")
    if "status" in batch.schema.names:
        ok = pc.equal(batch.column("status"), "ok")
        content = pc.if_else(pc.fill_null(ok, False), content, pa.scalar(None, content.type))
    if isinstance(content, pa.ChunkedArray):
        content = content.combine_chunks()
    return content


def score_table(table: pa.Table | pa.RecordBatch, metric: Metric, reference_column: str,
                warnings: _Warnings | None = None) -> pa.Array:
    """The scores of a results table or batch (content against the reference column)."""
    rows = None
    if metric.needs_rows:
        rows = table if isinstance(table, pa.RecordBatch) else table.combine_chunks().to_batches()[0]
    outcome = metric.score_batch(_answer_column(table), table.column(reference_column), rows)
    if warnings is not None:
        warnings.add(outcome)
    return outcome.scores


def with_scores(table: pa.Table, scores: pa.Array) -> pa.Table:
    """`table` with its `score` column set (replaced, or appended after the result columns)."""
    if "score" in table.column_names:
        return table.set_column(table.column_names.index("score"), "score", scores)
    return table.append_column(pa.field("score", pa.float64()), scores)


class TableScorer:
    """Adds the `score` column to output tables as they are written (a run with --score)."""

    def __init__(self, metric: Metric, reference_column: str) -> None:
        self.metric = metric
        self.reference_column = reference_column
        self.warnings = _Warnings()

    def __call__(self, table: pa.Table) -> pa.Table:
        """`table` with its `score` column."""
        column = check_reference_column(table.column_names, self.reference_column, "output")
        return with_scores(table, score_table(table, self.metric, column, self.warnings))
