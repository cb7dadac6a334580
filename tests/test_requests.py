"""Building requests from rows (docs/input.md, docs/run.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openapi_schema import validate

from batchrunner.config.settings import RunConfig
from batchrunner.errors import InputError
from batchrunner.inputs.readers import iter_records
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.inputs.scan import scan_input
from batchrunner.results import Row

HI = [{"role": "user", "content": "Hi"}]


def builder(
    columns: tuple[str, ...] = ("id", "prompt"), name: str = "p.jsonl", **changes: Any
) -> RequestBuilder:
    changes.setdefault("model", "gpt-4o")
    config = RunConfig(input=Path(name), output=Path("out.parquet"), **changes)
    return RequestBuilder(config, columns)


def body(row: Row) -> dict[str, Any]:
    assert row.error is None, row.error
    assert row.body is not None
    return row.body


# --- the prompt -------------------------------------------------------------------------------


def test_a_prompt_becomes_a_user_message() -> None:
    row = builder().build(0, {"id": "a", "prompt": "Hi"}, None)
    assert row == Row(0, "a", {"model": "gpt-4o", "messages": HI})
    assert row.model == "gpt-4o"


def test_the_prompt_column_can_be_named() -> None:
    b = builder(("question", "prompt"), prompt_column="question")
    assert body(b.build(0, {"question": "Q?", "prompt": "no"}, None))["messages"] == [
        {"role": "user", "content": "Q?"}
    ]


def test_a_template_renders_the_row() -> None:
    b = builder(("q", "meta", "n"), template="{{Q}}: {q} [{meta[lang]}] #{n:03d}")
    row = b.build(0, {"q": "Why?", "meta": {"lang": "en"}, "n": 7}, None)
    assert body(row)["messages"] == [{"role": "user", "content": "{Q}: Why? [en] #007"}]


def test_a_template_wins_over_a_column_called_messages() -> None:
    b = builder(("messages", "q"), template="Q: {q}")
    assert body(b.build(0, {"messages": HI, "q": "x"}, None))["messages"][0]["content"] == "Q: x"


def test_params_and_stream_fill_the_body() -> None:
    params = {"temperature": 0, "max_tokens": 5, "stop": ["\n"], "seed": 1,
              "response_format": {"type": "text"}}  # fmt: skip
    b = builder(params=params, stream=True)
    assert body(b.build(0, {"prompt": "Hi"}, None)) == {
        "model": "gpt-4o",
        "messages": HI,
        **params,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_a_model_in_params_is_the_default_model() -> None:
    b = builder(model=None, params={"model": "m", "temperature": 1})
    expected = {"model": "m", "messages": HI, "temperature": 1}
    assert body(b.build(0, {"prompt": "Hi"}, None)) == expected


# --- messages -----------------------------------------------------------------------------------


def test_a_messages_column_is_used_as_is() -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "U2"},
    ]
    b = builder(("id", "messages", "prompt"))
    row = b.build(0, {"messages": messages, "prompt": "ignored"}, None)
    assert body(row)["messages"] == messages
    assert body(b.build(1, {"messages": json.dumps(messages)}, None))["messages"] == messages
    # a row with no messages falls back to its prompt
    assert body(b.build(2, {"messages": None, "prompt": "Hi"}, None))["messages"] == HI


def test_an_explicit_messages_column_wins() -> None:
    b = builder(("conv", "prompt"), messages_column="conv", prompt_column="prompt")
    assert body(b.build(0, {"conv": HI, "prompt": "other"}, None))["messages"] == HI


def test_null_fields_of_parquet_message_structs_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    rows = [{"messages": [{"role": "user", "content": "Hi", "name": None}]},
            {"messages": [{"role": "user", "content": "Yo", "name": "ann"}]}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    config = RunConfig(input=path, output=tmp_path / "o.parquet", model="gpt-4o")
    b = RequestBuilder(config, scan_input(config).columns)
    built = [b.build(*record) for record in iter_records(config)]
    named = [{"role": "user", "content": "Yo", "name": "ann"}]
    assert [body(r)["messages"] for r in built] == [HI, named]
    assert [r.id for r in built] == ["0", "1"]


def test_the_system_message_goes_first_unless_there_is_one() -> None:
    b = builder(("messages", "prompt"), system="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    assert body(b.build(0, {"prompt": "Hi"}, None))["messages"] == [system, *HI]
    assert body(b.build(1, {"messages": HI}, None))["messages"] == [system, *HI]
    own = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Mine."}]
    assert body(b.build(2, {"messages": own}, None))["messages"] == own


# --- model -------------------------------------------------------------------------------------


def test_a_model_column_overrides_the_model_per_row() -> None:
    b = builder(("prompt", "model"))
    row = b.build(0, {"prompt": "Hi", "model": "claude-3-5-sonnet-20241022"}, None)
    assert body(row)["model"] == "claude-3-5-sonnet-20241022"
    assert body(b.build(1, {"prompt": "Hi", "model": None}, None))["model"] == "gpt-4o"
    b = builder(("prompt", "model"), model=None)
    assert b.build(2, {"prompt": "Hi", "model": None}, None).error == (
        "input: line 3: no model (the 'model' column is null and there is no --model)"
    )


# --- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "options", "record", "expected"),
    [
        (("id", "custom_id", "prompt"), {}, {"id": 7, "custom_id": "c", "prompt": "Hi"}, "7"),
        (("custom_id", "prompt"), {}, {"custom_id": "c-1", "prompt": "Hi"}, "c-1"),
        (("key", "id", "prompt"), {"id_column": "key"}, {"key": "k", "prompt": "Hi"}, "k"),
        (("prompt",), {}, {"prompt": "Hi"}, "41"),
        (("id", "prompt"), {}, {"id": 2.5, "prompt": "Hi"}, "2.5"),
    ],
)
def test_ids(
    columns: tuple[str, ...], options: dict[str, Any], record: dict[str, Any], expected: str
) -> None:
    assert builder(columns, **options).build(41, record, None).id == expected


def test_an_explicit_id_column_must_exist() -> None:
    with pytest.raises(InputError, match=r"p.jsonl: no column 'key' \(columns: id, prompt\)"):
        builder(id_column="key")


def test_a_row_that_cannot_be_read_keeps_its_error_and_gets_an_id() -> None:
    error = "input: line 3: not valid JSON (Expecting value)"
    assert builder().build(2, None, error) == Row(2, "<line 3>", None, error)
    assert builder(("prompt",)).build(2, None, error) == Row(2, "2", None, error)


# --- rows that cannot become requests ------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "options", "record", "problem"),
    [
        (("prompt",), {}, {"prompt": None}, "prompt is null (column 'prompt')"),
        (("prompt",), {}, {}, "prompt is null (column 'prompt')"),
        (("prompt",), {}, {"prompt": ""}, "prompt is empty (column 'prompt')"),
        (("prompt",), {}, {"prompt": " \n"}, "prompt is empty (column 'prompt')"),
        (("prompt",), {}, {"prompt": ["a"]}, "prompt is a list, not text (column 'prompt')"),
        (("q",), {"template": "Q: {q}"}, {"q": None}, "template value {q} is null"),
        (("q",), {"template": "{q}"}, {"q": ""}, "template gives an empty prompt"),
        (("q",), {"template": "{q:d}"}, {"q": "x"}, "template cannot be rendered (ValueError: "),
        (("q",), {"template": "{q[k]}"}, {"q": {}}, "template cannot be rendered (KeyError: 'k')"),
        (("messages",), {}, {"messages": "[{"}, "messages are not valid JSON (column 'messages')"),
        (("messages",), {}, {"messages": {"role": "user"}},
         "messages are not a list of {role, content}"),
        (("messages",), {}, {"messages": []}, "messages are empty (column 'messages')"),
        (("messages",), {}, {"messages": ["Hi"]}, "message 0 is not an object {role, content}"),
        (("messages",), {}, {"messages": [{"content": "x"}]},
         "message 0 has no role (column 'messages')"),
        (("messages",), {}, {"messages": [*HI, {"role": 3, "content": "x"}]},
         "message 1 has role 3, not a string (column 'messages')"),
        (("messages",), {}, {"messages": [{"role": "", "content": "x"}]},
         "message 0 has an empty role (column 'messages')"),
        (("messages",), {}, {"messages": None},
         "messages are null (column 'messages') and there is no prompt column"),
    ],
)  # fmt: skip
def test_row_errors_name_the_line(
    columns: tuple[str, ...], options: dict[str, Any], record: dict[str, Any], problem: str
) -> None:
    row = builder(columns, **options).build(6, record, None)
    assert row.body is None
    assert row.error is not None and row.error.startswith(f"input: line 7: {problem}")


def test_row_errors_name_the_0_based_row_outside_jsonl() -> None:
    for name in ("p.parquet", "p.csv"):
        row = builder(name=name).build(6, {"id": "x", "prompt": None}, None)
        assert row == Row(6, "x", None, "input: row 6 (0-based): prompt is null (column 'prompt')")


# --- Batch API lines ---------------------------------------------------------------------------

BATCH = ("custom_id", "method", "url", "body")


def batch(body: Any, **extra: Any) -> dict[str, Any]:
    line = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": body}
    return {**line, **extra}


def test_a_batch_api_body_is_taken_as_is() -> None:
    b = builder(BATCH, model="fallback", params={"temperature": 0, "max_tokens": 9})
    line = batch({"model": "gpt-4o-mini", "messages": HI, "temperature": 1.5, "logprobs": None})
    row = b.build(0, line, None)
    assert row.id == "req-1"
    # the body wins; the job fills only what it lacks, and a null counts as lacking
    expected = {"model": "gpt-4o-mini", "messages": HI, "temperature": 1.5, "max_tokens": 9}
    assert body(row) == expected
    assert line["body"]["temperature"] == 1.5 and "max_tokens" not in line["body"]  # not mutated


def test_a_batch_api_body_gets_the_job_model_system_and_stream() -> None:
    b = builder(BATCH, system="Sys", stream=True)
    assert body(b.build(0, batch(json.dumps({"messages": HI})), None)) == {
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": "Sys"}, *HI],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # a body that says it does not stream is taken at its word
    assert body(b.build(1, batch({"messages": HI, "stream": False}), None))["stream"] is False
    assert "stream_options" not in body(b.build(1, batch({"messages": HI, "stream": False}), None))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (batch("{oops"), "body is not valid JSON"),
        (batch([1]), "body is not a JSON object"),
        (batch({"prompt": "Hi"}), "body has no messages"),
        (batch({"messages": "Hi"}), "messages are not a list of {role, content} (body.messages)"),
        (batch({"messages": HI}, method="GET"), "method 'GET' is not POST"),
        (batch({"messages": HI}, url="/v1/embeddings"),
         "url '/v1/embeddings' is not /v1/chat/completions"),
    ],
)
def test_bad_batch_api_lines_are_row_errors(line: dict[str, Any], problem: str) -> None:
    row = builder(BATCH).build(0, line, None)
    assert (row.id, row.body, row.error) == ("req-1", None, f"input: line 1: {problem}")


def test_a_batch_api_body_without_a_model_needs_the_job_model() -> None:
    row = builder(BATCH, model=None).build(0, batch({"messages": HI}), None)
    assert row.error == "input: line 1: no model (the body has none and there is no --model)"


# --- the official schema -----------------------------------------------------------------------


def test_built_bodies_fit_the_openai_schema() -> None:
    params = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64, "stop": ["END"], "n": 2}
    params |= {"seed": 3, "response_format": {"type": "json_object"}}
    b = builder(("id", "messages", "prompt", "model"), system="Sys", stream=True, params=params)
    bodies = [
        b.build(0, {"id": "a", "prompt": "Hi"}, None),
        b.build(1, {"id": "b", "messages": [*HI, {"role": "assistant", "content": "Yo"}]}, None),
        b.build(2, {"id": "c", "prompt": "Hi", "model": "claude-3-5-sonnet-20241022"}, None),
        builder(BATCH).build(3, batch({"messages": HI, "max_tokens": 3}), None),
        builder().build(4, {"prompt": "Hi"}, None),
    ]
    for row in bodies:
        validate(body(row), "CreateChatCompletionRequest")


# --- every message the OpenAI API accepts (docs/input.md) ----------------------------------------

TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
EVERY_KIND = [
    {"role": "developer", "content": "Answer in French."},
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "name": "ann", "content": [
        {"type": "text", "text": "What is in this picture, and the weather there?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
    ]},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    {"role": "assistant", "content": "Il fait 3 degrés.", "name": "bot"},
    {"role": "user", "content": [{"type": "text", "text": "Merci"}]},
]


def test_every_message_the_api_accepts_passes_in_a_column_and_a_batch_line() -> None:
    column = builder(("id", "messages"), system="Ignored: the row has its own instructions")
    line = builder(BATCH)
    for row in (
        column.build(0, {"id": "a", "messages": EVERY_KIND}, None),
        column.build(1, {"id": "b", "messages": json.dumps(EVERY_KIND)}, None),
        line.build(2, batch({"messages": EVERY_KIND}), None),
    ):
        sent = body(row)["messages"]
        validate(body(row), "CreateChatCompletionRequest")
        # as given, but for the null content next to tool_calls, which the API may lack
        assert sent[3] == {"role": "assistant", "tool_calls": [TOOL_CALL]}
        assert sent[:3] + sent[4:] == EVERY_KIND[:3] + EVERY_KIND[4:]


def test_a_developer_message_counts_as_the_system_message() -> None:
    b = builder(("messages",), system="S")
    mine = [{"role": "developer", "content": "D"}, *HI]
    assert body(b.build(0, {"messages": mine}, None))["messages"] == mine


def test_parquet_structs_of_every_kind_of_message_lose_only_their_nulls(tmp_path: Path) -> None:
    """Parquet gives every message every field of the column's struct, absent ones null."""
    table = pa.table({"id": ["a"], "messages": [[
        {"role": "developer", "content": "Answer in French."},
        {"role": "assistant", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]]})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    config = RunConfig(input=path, output=tmp_path / "o.parquet", model="gpt-4o")
    info = scan_input(config)
    b = RequestBuilder(config, info.columns)
    [(index, record, error)] = list(iter_records(config, columns=b.columns))
    assert record["messages"][0]["tool_calls"] is None  # what Parquet hands over
    row = b.build(index, record, error)
    validate(body(row), "CreateChatCompletionRequest")
    assert body(row)["messages"] == [
        {"role": "developer", "content": "Answer in French."},
        {"role": "assistant", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]


def test_every_kind_of_message_is_answered_end_to_end(
        tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchrunner import run

    monkeypatch.setenv("RU_LLM_API_KEY", "sk-ru-requests-tests-1234567890abcdef")
    path = tmp_path / "in.jsonl"
    lines = [{"id": "col", "messages": EVERY_KIND},
             {"custom_id": "line", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": EVERY_KIND}}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for line in lines:  # one input holds one kind of row
        path.write_text(json.dumps(line) + "\n")
        out = tmp_path / f"{next(iter(line.values()))}.parquet"
        config = RunConfig(input=path, output=out, model="gpt-4o", base_url=gateway.base_url)
        report = run(config, handle_signals=False)
        [result] = pq.read_table(out).to_pylist()
        assert report.exit_code == 0, result["error"]
        assert result["status"] == "ok" and result["http_status"] == 200
