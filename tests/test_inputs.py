"""Reading inputs: formats, whole-input errors, unreadable rows, ids, limits, laziness."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner.config.settings import RunConfig
from batchrunner.errors import InputError
from batchrunner.inputs import formats, scan
from batchrunner.inputs.columns import template_fields
from batchrunner.inputs.formats import detect_format
from batchrunner.inputs.readers import iter_records, iter_tables
from batchrunner.inputs.scan import fingerprint_input, scan_input

ROWS = [
    {"id": "a", "prompt": "What is 1+1?", "answer": "2"},
    {"id": "b", "prompt": "Capital of France?", "answer": "Paris"},
    {"id": "c", "prompt": "Say hi", "answer": "hi"},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_input(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows in the format the path's extension names."""
    name = path.name
    if name.endswith((".jsonl", ".ndjson", ".jsonl.gz")):
        return write_jsonl(path, rows)
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
        return path
    raise AssertionError(name)


def config(path: Path, **changes: Any) -> RunConfig:
    changes.setdefault("model", "gpt-4o")
    return RunConfig(input=path, output=path.with_name("out.parquet"), **changes)


# --- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("p.jsonl", "jsonl"),
        ("p.jsonl.gz", "jsonl"),
        ("p.ndjson", "jsonl"),
        ("p.parquet", "parquet"),
        ("p.csv", "csv"),
    ],
)
def test_every_format_scans_and_streams_the_same_rows(tmp_path: Path, name: str, fmt: str) -> None:
    path = write_input(tmp_path / name, ROWS)
    info = scan_input(config(path))
    assert (info.format, info.columns, info.rows) == (fmt, ("id", "prompt", "answer"), 3)
    assert list(iter_records(config(path))) == [(i, row, None) for i, row in enumerate(ROWS)]
    tables = list(iter_tables(config(path)))
    assert pa.concat_tables(tables).to_pylist() == ROWS


def test_csv_gz_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "p.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("id,prompt\n1,hello\n")
    assert scan_input(config(path)).rows == 1
    assert list(iter_records(config(path))) == [(0, {"id": "1", "prompt": "hello"}, None)]


def test_csv_cells_are_text_exactly_as_written(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('id,prompt,note\n007,"two\nlines",NA\n8,x,\n9,y,""\n', encoding="utf-8")
    records = [r for _, r, _ in iter_records(config(path))]
    assert records == [
        {"id": "007", "prompt": "two\nlines", "note": "NA"},
        {"id": "8", "prompt": "x", "note": None},  # an empty cell is null
        {"id": "9", "prompt": "y", "note": ""},  # a quoted "" is the empty string
    ]
    (table,) = iter_tables(config(path))
    assert table.schema == pa.schema([(name, pa.string()) for name in ("id", "prompt", "note")])


def test_iter_records_can_read_only_some_columns(tmp_path: Path) -> None:
    for name in ("p.parquet", "p.csv"):
        path = write_input(tmp_path / name, ROWS)
        assert [r for _, r, _ in iter_records(config(path), columns=["prompt", "nope"])] == [
            {"prompt": row["prompt"]} for row in ROWS
        ]


@pytest.mark.parametrize("name", ["p.txt", "p.json", "p", "p.parquet.gz"])
def test_an_unknown_extension_is_an_input_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("{}\n")
    with pytest.raises(InputError, match=r"unknown input format"):
        scan_input(config(path))


def test_detect_format() -> None:
    assert detect_format("a/B.JSONL") == "jsonl"
    assert detect_format("x.ndjson.gz") == "jsonl"
    assert detect_format("x.parquet") == "parquet"
    assert detect_format("x.csv") == "csv"


# --- whole-input errors -------------------------------------------------------------------


def test_a_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        scan_input(config(tmp_path / "prompts.jsonl"))
    assert str(caught.value) == f"{tmp_path / 'prompts.jsonl'}: no such file"


def test_a_directory_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        scan_input(config(tmp_path / "d.csv"))


def test_a_file_that_cannot_be_opened_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_input(tmp_path / "p.jsonl", ROWS)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(formats, "open", refuse, raising=False)
    with pytest.raises(InputError) as caught:
        scan_input(config(path))
    assert str(caught.value) == f"{path}: cannot read (Permission denied)"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.parquet", b"not parquet at all", "not a readable Parquet file"),
        ("p.jsonl.gz", b"not gzip data\n", "cannot read"),
        ("p.csv", b"id,prompt\n1,a\n2,b,c\n", "not a readable CSV file (CSV parse error"),
        ("p.csv", b"", "not a readable CSV file (Empty CSV file)"),
    ],
)
def test_a_corrupt_file_is_an_input_error(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        scan_input(config(path))
    assert str(caught.value).startswith(f"{path}: {message}")
    assert "\n" not in str(caught.value)


def test_a_truncated_gzip_is_an_input_error(tmp_path: Path) -> None:
    path = write_input(tmp_path / "p.jsonl.gz", ROWS * 100)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match="cannot read"):
        scan_input(config(path))


@pytest.mark.parametrize("option", ["prompt_column", "messages_column", "id_column"])
@pytest.mark.parametrize("name", ["prompts.csv", "prompts.jsonl", "prompts.parquet"])
def test_a_column_named_by_the_options_must_exist(tmp_path: Path, option: str, name: str) -> None:
    path = write_input(tmp_path / name, [{"id": "1", "text": "hi"}])
    with pytest.raises(InputError) as caught:
        scan_input(config(path, **{option: "question"}))
    assert str(caught.value) == f"{path}: no column 'question' (columns: id, text)"


def test_a_template_placeholder_needs_a_column(tmp_path: Path) -> None:
    path = write_input(tmp_path / "prompts.csv", [{"id": "1", "text": "hi"}])
    scan_input(config(path, template="Q: {text} {{literal}}"))
    with pytest.raises(InputError) as caught:
        scan_input(config(path, template="Q: {text} A: {answer[0]}"))
    assert str(caught.value) == (
        f"{path}: template placeholder {{answer}} has no column (columns: id, text)"
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Q: {}", "is positional"),
        ("Q: {0}", "is positional"),
        ("Q: {text", "expected '}'"),
        ("Q: }", "Single '}'"),
    ],
)
def test_a_malformed_template_is_an_input_error(template: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        template_fields(template)


def test_template_fields_follow_str_format() -> None:
    assert template_fields("{a} {b.c} {d[0]!r:>{width}} {{e}} {a}") == ("a", "b", "d", "width")
    assert template_fields(None) == ()


def test_no_prompt_source_is_an_input_error(tmp_path: Path) -> None:
    path = write_input(tmp_path / "prompts.csv", [{"id": "1", "text": "hi"}])
    with pytest.raises(InputError, match=r"csv: no column 'prompt' \(columns: id, text\); name"):
        scan_input(config(path))


def test_no_model_is_an_input_error(tmp_path: Path) -> None:
    path = write_input(tmp_path / "prompts.parquet", [{"id": "1", "prompt": "hi"}])
    with pytest.raises(InputError) as caught:
        scan_input(config(path, model=None))
    assert str(caught.value) == f"{path}: no model: give --model, or a 'model' column"
    # a model column, or a model in --param, is enough
    path = write_input(tmp_path / "m.parquet", [{"prompt": "hi", "model": "gpt-4o-mini"}])
    assert scan_input(config(path, model=None)).rows == 1
    path = write_input(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    assert scan_input(config(path, model=None, params={"model": "m"})).rows == 1


def batch_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def test_batch_api_bodies_may_carry_the_model(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    path = write_jsonl(
        tmp_path / "batch.jsonl",
        [batch_line("r1", {"model": "gpt-4o", "messages": messages}),
         batch_line("r2", {"messages": messages})],  # fmt: skip
    )
    assert scan_input(config(path, model=None)).columns == ("custom_id", "method", "url", "body")
    path = write_jsonl(tmp_path / "nomodel.jsonl", [batch_line("r1", {"messages": messages})])
    with pytest.raises(InputError, match="no model"):
        scan_input(config(path, model=None))


def test_duplicate_columns_are_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,id\n1,a,2\n")
    with pytest.raises(InputError, match="column 'id' appears more than once"):
        scan_input(config(path))


# --- ids ------------------------------------------------------------------------------------


def test_a_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    rows = [{"id": i, "prompt": "p"} for i in range(10)] + ["oops", {"id": "3", "prompt": "p"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError) as caught:
        scan_input(config(path))
    # the int 3 and the string "3" are the same id: ids are strings
    assert str(caught.value) == f"{path}: duplicate id '3' (lines 4 and 12)"


@pytest.mark.parametrize("name", ["p.parquet", "p.csv"])
def test_a_duplicate_id_names_both_rows(tmp_path: Path, name: str) -> None:
    rows = [{"id": f"r{i}", "prompt": "p"} for i in range(100)]
    rows[70]["id"] = "r5"
    path = write_input(tmp_path / name, rows)
    with pytest.raises(InputError) as caught:
        scan_input(config(path))
    assert str(caught.value) == f"{path}: duplicate id 'r5' (rows 5 and 70, 0-based)"


def test_duplicate_ids_in_an_integer_parquet_column(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 2], "prompt": ["a"] * 4}), path)
    with pytest.raises(InputError, match=r"duplicate id '2' \(rows 1 and 3, 0-based\)"):
        scan_input(config(path))


def test_custom_id_and_explicit_id_columns_are_checked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"custom_id": "x", "prompt": "a"}] * 2)
    with pytest.raises(InputError, match="duplicate id 'x'"):
        scan_input(config(path))
    rows = [{"key": "k", "id": i, "prompt": "a"} for i in range(2)]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    assert scan_input(config(path)).rows == 2
    with pytest.raises(InputError, match="duplicate id 'k'"):
        scan_input(config(path, id_column="key"))


def test_row_number_ids_are_not_checked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "same"}] * 5)
    assert scan_input(config(path)).rows == 5


def test_a_hash_collision_is_confirmed_on_the_real_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every id hashes alike: only an exact comparison can tell a true duplicate.
    monkeypatch.setattr(scan, "_hash_texts", lambda texts: np.zeros(len(texts), np.uint64))
    for name in ("p.jsonl", "p.parquet", "p.csv"):
        path = write_input(tmp_path / name, [{"id": f"r{i}", "prompt": "p"} for i in range(50)])
        assert scan_input(config(path)).rows == 50
    rows = [{"id": f"r{i % 40}", "prompt": "p"} for i in range(50)]
    path = write_input(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match=r"duplicate id 'r0' \(lines 1 and 41\)"):
        scan_input(config(path))


def test_a_null_or_missing_id_is_an_input_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"prompt": "y"}])
    with pytest.raises(InputError) as caught:
        scan_input(config(path))
    assert str(caught.value) == f"{path}: line 2: no id (column 'id')"
    path = write_input(tmp_path / "p.parquet", [{"id": "a", "prompt": "x"}, {"id": None}])
    with pytest.raises(InputError, match=r"row 1 \(0-based\): id is null \(column 'id'\)"):
        scan_input(config(path))
    path = write_input(tmp_path / "e.parquet", [{"id": "a", "prompt": "x"}, {"id": ""}])
    with pytest.raises(InputError, match=r"row 1 \(0-based\): id is empty"):
        scan_input(config(path))


def test_a_duplicate_beyond_the_limit_does_not_count(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}]
    for name in ("p.jsonl", "p.parquet", "p.csv"):
        path = write_input(tmp_path / name, rows)
        assert scan_input(config(path, limit=2)).rows == 2
        with pytest.raises(InputError, match="duplicate id 'a'"):
            scan_input(config(path))


# --- JSONL lines that cannot be read ------------------------------------------------------


def test_bad_jsonl_lines_are_rows_with_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\n'  # a UTF-8 byte order mark is allowed
        b"not json\n"
        b"\n"  # a blank line inside the file is a row
        b"[1, 2]\n"
        b'{"id": "\xff"}\n'
        b'{"id": "b", "prompt": "y"}\r\n'
        b"\n  \n"  # blank lines at the end are not rows
    )
    info = scan_input(config(path))
    assert info.rows == 6
    assert list(iter_records(config(path))) == [
        (0, {"id": "a", "prompt": "x"}, None),
        (1, None, "input: line 2: not valid JSON (Expecting value)"),
        (2, None, "input: line 3: empty line"),
        (3, None, "input: line 4: not a JSON object (found an array)"),
        (4, None, "input: line 5: not valid UTF-8"),
        (5, {"id": "b", "prompt": "y"}, None),
    ]
    table = pa.concat_tables(iter_tables(config(path)))
    assert table.num_rows == 6
    assert table.column("prompt").to_pylist() == ["x", None, None, None, None, "y"]


def test_an_empty_jsonl_file_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    info = scan_input(config(path, model=None))
    assert (info.rows, info.columns) == (0, ())
    assert list(iter_records(config(path))) == []
    (table,) = iter_tables(config(path))
    assert table.num_rows == 0


def test_jsonl_columns_are_the_union_of_keys(tmp_path: Path) -> None:
    rows = [{"prompt": "a"}, {"prompt": "b", "x": 1}, "bad", {"y": 2}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert scan_input(config(path)).columns == ("prompt", "x", "y")


# --- limit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["p.jsonl", "p.parquet", "p.csv"])
@pytest.mark.parametrize("limit", [0, 2, 10])
def test_limit_takes_the_first_rows(tmp_path: Path, name: str, limit: int) -> None:
    path = write_input(tmp_path / name, ROWS)
    expected = min(limit, 3)
    assert scan_input(config(path, limit=limit)).rows == expected
    assert [i for i, _, _ in iter_records(config(path, limit=limit))] == list(range(expected))
    table = pa.concat_tables(iter_tables(config(path, limit=limit)))
    assert table.num_rows == expected
    # JSONL's columns are the keys of the rows read, so `--limit 0` reads none; Parquet and
    # CSV have theirs in the file's schema or header
    columns = [] if name == "p.jsonl" and limit == 0 else ["id", "prompt", "answer"]
    assert table.column_names == columns
    assert list(scan_input(config(path, limit=limit)).columns) == columns


def test_limit_counts_bad_jsonl_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "", "", {"prompt": "b"}])
    assert scan_input(config(path, limit=2)).rows == 2
    assert [e for _, _, e in iter_records(config(path, limit=3))] == [
        None, "input: line 2: empty line", "input: line 3: empty line"]  # fmt: skip


# --- iter_tables ----------------------------------------------------------------------------


def test_jsonl_tables_share_one_unified_schema(tmp_path: Path) -> None:
    rows: list[Any] = [
        {"id": "a", "score": 1, "meta": {"lang": "en"}, "mixed": 1},
        {"id": "b", "score": 2.5, "meta": {"tags": ["x"]}, "mixed": "two"},
        "not json",
        {"id": "c", "late": True, "mixed": [3]},
        {"id": "d", "score": None, "mixed": None},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    tables = list(iter_tables(config(path), batch_rows=2))
    assert [t.num_rows for t in tables] == [2, 2, 1]
    assert all(t.schema == tables[0].schema for t in tables)
    schema = tables[0].schema
    assert schema.names == ["id", "score", "meta", "mixed", "late"]
    assert schema.field("score").type == pa.float64()  # int and float unify
    meta = pa.struct([("lang", pa.string()), ("tags", pa.list_(pa.string()))])
    assert schema.field("meta").type == meta
    assert schema.field("mixed").type == pa.string()  # incompatible: JSON-encoded
    assert schema.field("late").type == pa.bool_()
    table = pa.concat_tables(tables)
    assert table.column("mixed").to_pylist() == ["1", '"two"', None, "[3]", None]
    assert table.column("score").to_pylist() == [1.0, 2.5, None, None, None]
    assert table.column("id").to_pylist() == ["a", "b", None, "c", "d"]


def test_jsonl_ints_too_large_for_int64_are_json_encoded(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "big": 2**70}, {"prompt": "b", "big": 1}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    table = pa.concat_tables(iter_tables(config(path)))
    assert table.column("big").to_pylist() == [str(2**70), "1"]


def test_parquet_tables_keep_the_file_schema(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pd.DataFrame({"id": [f"r{i}" for i in range(10)], "x": range(10)}).to_parquet(path)
    tables = list(iter_tables(config(path, prompt_column="id"), batch_rows=4))
    assert [t.num_rows for t in tables] == [4, 4, 2]
    assert tables[0].schema == pq.read_schema(path).remove_metadata()
    assert tables[0].schema.metadata is None  # pandas metadata would not fit the output
    (empty,) = iter_tables(config(path, prompt_column="id", limit=0))
    assert empty.num_rows == 0 and empty.schema == tables[0].schema


# --- laziness and memory --------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.parquet"
    n = 200_000
    table = pa.table({
        "id": pa.array([f"row-{i}" for i in range(n)]),
        "prompt": pa.array([f"What is {i} + {i}?" for i in range(n)]),
    })  # fmt: skip
    pq.write_table(table, path, row_group_size=20_000)
    return path


def test_iter_records_reads_batches_only_as_rows_are_taken(
    big_parquet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pulled = []
    real = pq.ParquetFile.iter_batches

    def counting(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        probe = kwargs.get("batch_size") == formats._PROBE_ROWS  # the decoded size measured
        for batch in real(self, *args, **kwargs):
            if not probe:
                pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    records = iter_records(config(big_parquet))
    assert next(records) == (0, {"id": "row-0", "prompt": "What is 0 + 0?"}, None)
    assert len(pulled) == 1 and pulled[0] <= 8192
    for _ in range(10_000):
        next(records)
    assert len(pulled) == 2
    records.close()


def test_iter_records_reads_jsonl_lines_only_as_rows_are_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(1000)])
    read = []
    real = formats._open_binary

    def counting(p: Path) -> Any:
        class Lines:
            def __init__(self) -> None:
                self.f = real(p)

            def __enter__(self) -> Any:
                return self

            def __exit__(self, *exc: object) -> None:
                self.f.close()

            def __iter__(self) -> Any:
                for line in self.f:
                    read.append(line)
                    yield line

        return Lines()

    monkeypatch.setattr(formats, "_open_binary", counting)
    records = iter_records(config(path))
    for _ in range(3):
        next(records)
    assert len(read) == 3
    records.close()


def test_memory_stays_flat_while_iterating(big_parquet: Path) -> None:
    # Holding all 200,000 rows as dicts would take some 60 MB of Python objects; a batch at a
    # time takes a few MB, however long the file.
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_records(config(big_parquet)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000
    assert peak < 12 << 20
    tracemalloc.start()
    try:
        info = scan_input(config(big_parquet))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.rows == 200_000
    assert peak < 6 << 20  # 1.6 MB of id hashes, one chunk of ids as Python strings


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_changes_with_the_content(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"x" * (3 << 20) + b"a")
    first = fingerprint_input(path)
    assert set(first) == {"size", "mtime_ns", "blake2b"} and first["size"] == (3 << 20) + 1
    assert fingerprint_input(path) == first
    stat = path.stat()
    path.write_bytes(b"x" * (3 << 20) + b"b")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    second = fingerprint_input(path)
    assert second["blake2b"] != first["blake2b"]
    assert (second["size"], second["mtime_ns"]) == (first["size"], first["mtime_ns"])


def test_bad_json_lines_say_a_whole_phrase_not_one_cut_before_its_position(
    tmp_path: Path,
) -> None:
    """json's own messages end in "at" ("Invalid control character at", "Unterminated string
    starting at"), completed by a position elsewhere: shown alone they read as cut off."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"id": "a", "prompt": "a raw\ttab"}\n'
        b'{"id": "c", "prompt": "x", }\n'
        b'{"id": "b", "prompt": "never closed}'  # the last line, with no newline to meet
    )
    errors = [error for _, _, error in iter_records(config(path))]
    try:
        json.loads('{"id": "c", "prompt": "x", }')
    except json.JSONDecodeError as exc:  # Python 3.13 words this one differently from 3.11
        trailing_comma = exc.msg
    assert errors == [
        "input: line 1: not valid JSON (Invalid control character)",
        f"input: line 2: not valid JSON ({trailing_comma})",
        "input: line 3: not valid JSON (Unterminated string)",
    ]


def test_a_dictionary_encoded_parquet_is_read_in_batches_sized_by_what_it_decodes_to(
    tmp_path: Path,
) -> None:
    """Long documents repeated on many rows take little room in the file and much once read:
    batches are sized from the decoded rows, not from the file's metadata alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchrunner.inputs.formats import _parquet_batch_rows

    documents = [f"document {d} " + "word " * 10_000 for d in range(20)]  # about 50 KB each
    table = pa.table({
        "document": [documents[i % 20] for i in range(4000)],
        "question": [f"question {i}" for i in range(4000)],
    })
    path = tmp_path / "docs.parquet"
    pq.write_table(table, path, use_dictionary=True)
    pf = pq.ParquetFile(path)
    stored = sum(pf.metadata.row_group(i).total_byte_size for i in range(pf.metadata.num_row_groups))
    assert stored / 4000 < 1000  # the file says under 1 KB a row...
    rows = _parquet_batch_rows(pf, 8192, 8 << 20)
    assert rows <= (8 << 20) // 50_000 + 1  # ...but a batch of 8 MB holds about 160 rows
