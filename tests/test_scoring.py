"""Metrics (docs/evaluations.md#metrics), on cases taken from each definition, and scoring result files."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner.answers.scoring import (
    extract_choice,
    f1_score,
    last_number,
    normalize_answer,
    parse_metric,
)
from batchrunner.errors import UsageError
from batchrunner.store.scored import score_results


def scores(spec: str, answers: list[str | None], references: list[str | None]) -> list:
    return parse_metric(spec).score(pa.array(answers, pa.string()),
                                    pa.array(references, pa.string())).to_pylist()


# -- SQuAD's normalisation and F1 (the official evaluate-v1.1/v2.0 script's definitions) --------


@pytest.mark.parametrize("text, expected", [
    ("The Denver Broncos", "denver broncos"),  # lower case, article removed
    ("  Denver   Broncos! ", "denver broncos"),  # punctuation removed, whitespace collapsed
    ("an apple a day", "apple day"),
    ("Theatre", "theatre"),  # an article only as a whole word
    ("Saint-Denis", "saintdenis"),  # punctuation is removed, not turned into a space
    ("a", ""),
])
def test_normalize_answer_follows_squad(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected
    # the Arrow (column) version gives the same text as the per-string one
    assert scores("normalized", [text], [expected]) == [1.0]


def test_f1_follows_squad() -> None:
    # prediction "Denver Broncos" vs gold "The Denver Broncos": identical after normalisation
    assert f1_score("Denver Broncos", "The Denver Broncos") == 1.0
    # 2 shared tokens; precision 2/4, recall 2/2 -> F1 = 2*0.5*1/(1.5) = 2/3
    assert f1_score("the Broncos of Denver city", "Denver Broncos") == pytest.approx(2 / 3)
    # repeated tokens count as often as both sides have them (Counter intersection)
    assert f1_score("cat cat cat", "cat") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("the", "a") == 1.0  # both empty after normalisation (SQuAD 2.0's rule)
    assert f1_score("the", "cat") == 0.0
    assert scores("f1", ["Denver Broncos", "dog", None], ["The Denver Broncos", "cat", "x"]) \
        == [1.0, 0.0, None]


# -- the other built-in metrics ---------------------------------------------------------------


def test_exact_trims_whitespace_only() -> None:
    assert scores("exact", [" Paris\n", "paris", "Paris."], ["Paris"] * 3) == [1.0, 0.0, 0.0]


def test_contains_compares_normalised_text() -> None:
    assert scores("contains", ["I think it is Paris, France.", "Lyon"], ["paris"] * 2) \
        == [1.0, 0.0]


def test_regex_takes_group_one_or_the_whole_match() -> None:
    assert scores(r"regex:Answer:\s*(\w+)", ["Reasoning... Answer: Paris", "Paris"],
                  ["paris", "paris"]) == [1.0, 0.0]  # no match scores 0
    assert scores(r"regex:\d+ hours", ["That is 72 hours."], ["72 Hours"]) == [1.0]


@pytest.mark.parametrize("text, expected", [
    ("1,234.5", 1234.5),
    ("1234.5", 1234.5),
    ("The total is $1,234,567.89.", 1234567.89),
    ("-3", -3.0),
    ("x = \u22123", -3.0),  # the Unicode minus sign
    ("+7", 7.0),
    ("5-3", 3.0),  # a hyphen after a digit is not a sign
    ("first 10, then 20", 20.0),  # the last number
    ("12,3456", 3456.0),  # not a thousands grouping
    ("2.5e3", 2500.0),
    (".5", 0.5),
    ("no number here", None),
])
def test_last_number(text: str, expected: float | None) -> None:
    assert last_number(text) == expected


def test_numeric_with_separators_signs_and_tolerance() -> None:
    answers = ["It is 1,234.5", "1234.5", "-7,791", "= 3000", "about 100.4", "none", "0"]
    references = ["1234.5", "1,234.5", "-7,791", "3,000", "100", "5", "0"]
    assert scores("numeric", answers, references) == [1, 1, 1, 1, 0, 0, 1]
    assert scores("numeric:0.01", ["about 100.4", "about 102"], ["100", "100"]) == [1.0, 0.0]
    assert scores("numeric", ["42"], ["no number"]) == [None]  # an unscorable reference


@pytest.mark.parametrize("text, letter", [
    ("Answer: C", "C"),
    ("(c)", "C"),
    ("The answer is B.", "B"),
    ("the correct option is (d).", "D"),
    ("answer: c", "C"),
    ("B", "B"),
    ("b.", "B"),
    ("B) Paris", "B"),
    ("I choose D because it is prime.", "D"),
    ("Final answer: **A**", "A"),
    ("The answer is a city", None),  # the article "a" is not option A
    ("I don't know", None),
])
def test_extract_choice_in_the_usual_phrasings(text: str, letter: str | None) -> None:
    assert extract_choice(text) == letter


def test_choice_compares_letters() -> None:
    assert scores("choice", ["The answer is B.", "(c)", "no idea"], ["B", "b", "C"]) \
        == [1.0, 0.0, 0.0]


def test_json_field() -> None:
    answers = ['{"answer": "Paris", "why": "capital"}', '```json\n{"answer": 42}\n```',
               'not json', '{"other": 1}', '{"a": {"b": "The Cat"}}']
    assert scores("json:answer", answers[:4], ["paris", "42", "x", "1"]) == [1, 1, 0, 0]
    assert scores("json:a.b", [answers[4]], ["cat"]) == [1.0]


def test_null_answer_or_reference_gives_null() -> None:
    for spec in ("exact", "normalized", "contains", "numeric", "choice", "f1", "json:a",
                 "regex:x"):
        assert scores(spec, [None, "x"], ["x", None]) == [None, None], spec


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, words", [
    ("exactly", "unknown metric"),
    ("regex:(", "not a valid regular expression"),
    ("regex:", "give a pattern"),
    ("numeric:abc", "tolerance"),
    ("numeric:-1", "tolerance"),
    ("json:", "give a field"),
    ("f1:2", "takes no argument"),
    ("python:no_such_module_xyz:f", "cannot import"),
    ("python:os:no_such_function", "no function"),
    ("python:nofile.py:f", "no file"),
    ("python:justamodule", "expected python:MODULE:FUNCTION"),
])
def test_bad_specs_are_usage_errors(spec: str, words: str) -> None:
    with pytest.raises(UsageError, match=words) as info:
        parse_metric(spec)
    assert info.value.exit_code == 2


def test_python_metric_from_a_file_gets_the_row_and_a_failure_is_one_null(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = tmp_path / "mymetric.py"
    module.write_text(
        "def judge(answer, reference, row):\n"
        "    if row['topic'] == 'bad':\n"
        "        raise ValueError('cannot judge')\n"
        "    if row['topic'] == 'skip':\n"
        "        return None\n"
        "    return 0.5 if answer.startswith(reference) else 0.0\n"
    )
    results = tmp_path / "r.parquet"
    pq.write_table(pa.table({
        "id": ["1", "2", "3", "4", "5"],
        "topic": ["x", "bad", "bad", "skip", "x"],
        "reference": ["ab", "ab", "ab", "ab", "zz"],
        "status": ["ok"] * 5,
        "content": ["abc"] * 5,
    }), results)
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        done = score_results(results, f"python:{module}:judge", "reference")
    assert pq.read_table(results).column("score").to_pylist() == [0.5, None, None, None, 0.0]
    assert done["failed"] == 2 and done["scored"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 rows" in warnings[0] and "cannot judge" in warnings[0]


def test_python_metric_from_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "evalfuncs_w16.py").write_text(
        "def same(answer, reference, row):\n    return answer == reference\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert scores("python:evalfuncs_w16:same", ["a", "b"], ["a", "a"]) == [1.0, 0.0]


def test_score_results_rescores_error_rows_as_null_and_replaces_the_score(tmp_path: Path) -> None:
    results = tmp_path / "r.parquet"
    pq.write_table(pa.table({
        "id": ["1", "2", "3", "4"],
        "reference": ["Paris", "Paris", None, "Rome"],
        "status": ["ok", "error", "ok", "ok"],
        "content": ["paris", None, "x", "Paris"],
        "score": [0.0, 0.0, 0.0, 0.0],
    }), results)
    out = tmp_path / "scored.parquet"
    done = score_results(results, "normalized", "reference", output=out)
    assert pq.read_table(out).column("score").to_pylist() == [1.0, None, None, 0.0]
    assert done == {"output": str(out), "metric": "normalized", "rows": 4, "scored": 2,
                    "mean": 0.5, "failed": 0}
    assert pq.read_table(results).column("score").to_pylist() == [0.0] * 4  # input untouched
    with pytest.raises(UsageError, match="no reference column 'gold'"):
        score_results(results, "exact", "gold")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_score_results_reads_and_writes_jsonl_and_csv(tmp_path: Path, suffix: str) -> None:
    from batchrunner.store.export import open_table_writer

    table = pa.table({"id": ["1", "2", "3"], "reference": ["42", "7", "1,000"],
                      "status": ["ok", "ok", "error"], "content": ["42", "The answer is 8", None]})
    results = tmp_path / f"r{suffix}"
    writer = open_table_writer(results, table.schema, suffix[1:])
    writer.write_table(table)
    writer.close()
    done = score_results(results, "numeric", "reference")
    assert (done["rows"], done["scored"], done["mean"]) == (3, 2, 0.5)
    out = tmp_path / "scored.parquet"  # and another format out
    score_results(results, "exact", "reference", output=out)
    assert pq.read_table(out).column("score").to_pylist() == [1.0, 0.0, None]
