"""An answer kept whole: tool calls, reasoning tokens and logprobs, from the gateway to the output.

The simulator answers each of these shapes (and the official SDK parses them); the client
assembles tool calls from streamed deltas exactly as the non-streamed answer; the output, the
response cache and the exports carry them. Shapes the simulator does not make (parallel tool
calls, a call split over many deltas, a `length` finish inside the arguments) come from
aioresponses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import openai
import openapi_schema
import pyarrow.parquet as pq
import pytest
from aioresponses import aioresponses

from batchrunner import RunConfig, run
from batchrunner.simulator import complete
from batchrunner.transport.client import Client
from batchrunner.transport.completions import Answer

KEY = "sk-ru-answers-whole-0123456789abcdef"
BASE = "http://gateway.test/v1"
URL = BASE + "/chat/completions"

EXTRACT = {
    "type": "function",
    "function": {
        "name": "record_person",
        "description": "Record the person a text is about.",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "city": {"type": "string"},
                "born": {"type": "integer", "minimum": 1800, "maximum": 2000},
            },
            "required": ["name", "city", "born"],
            "additionalProperties": False,
        },
    },
}
NAMED = {"type": "function", "function": {"name": "record_person"}}


def tool_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Ada Lovelace was born in London in 1815."}],
        "tools": [EXTRACT],
        "tool_choice": NAMED,
        **extra,
    }


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def post(gateway: Any, body: dict[str, Any]) -> Any:
    import urllib.request

    request = urllib.request.Request(
        gateway.base_url + "/chat/completions", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return response.read().decode()


def client_answer(base_url: str, body: dict[str, Any]) -> Answer:
    async def go() -> Answer:
        async with Client(base_url, KEY, concurrency=2) as client:
            return await client.complete(body)

    return asyncio.run(go())


# -- the simulator ----------------------------------------------------------------------------


@pytest.mark.parametrize("choice", [NAMED, "required"], ids=["named", "required"])
def test_the_simulator_calls_the_tool_with_arguments_valid_for_its_parameters(
    gateway: Any, choice: Any
) -> None:
    import jsonschema

    text = post(gateway, tool_body(tool_choice=choice, n=2))
    payload = json.loads(text)
    openapi_schema.validate(payload, "CreateChatCompletionResponse")
    for item in payload["choices"]:
        assert item["message"]["content"] is None and item["finish_reason"] == "tool_calls"
        (call,) = item["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "record_person"
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            EXTRACT["function"]["parameters"])
    # "auto" (or no choice) answers in text, as before
    plain = json.loads(post(gateway, tool_body(tool_choice="auto")))
    assert plain["choices"][0]["message"]["content"]
    assert "tool_calls" not in plain["choices"][0]["message"]


def test_the_simulator_streams_a_tool_call_as_deltas(gateway: Any) -> None:
    chunks = openapi_schema.validate_stream(post(gateway, tool_body(stream=True)))
    pieces = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
    pieces = [p for p in pieces if p]
    assert len(pieces) >= 3  # the head, then the arguments over several chunks
    assert pieces[0][0]["id"] and pieces[0][0]["function"]["arguments"] == ""
    arguments = "".join(p[0]["function"].get("arguments", "") for p in pieces)
    whole = json.loads(post(gateway, tool_body()))["choices"][0]["message"]["tool_calls"]
    assert arguments == whole[0]["function"]["arguments"]


def test_o4_mini_reports_reasoning_tokens_and_runs_out_on_a_small_limit(gateway: Any) -> None:
    body = {"model": "o4-mini", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    payload = json.loads(post(gateway, body))
    openapi_schema.validate(payload, "CreateChatCompletionResponse")
    usage = payload["usage"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning < usage["completion_tokens"]
    cut = json.loads(post(gateway, {**body, "max_completion_tokens": 20}))
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["choices"][0]["message"]["content"] == ""
    assert cut["usage"]["completion_tokens"] == 20
    assert cut["usage"]["completion_tokens_details"]["reasoning_tokens"] == 20
    models = json.loads(urlget(gateway.base_url + "/models"))
    assert "o4-mini" in {m["id"] for m in models["data"]}


def urlget(url: str) -> str:
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as response:
        return response.read().decode()


def test_the_simulator_gives_logprobs_when_asked(gateway: Any) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Spam or ham?"}],
            "logprobs": True, "top_logprobs": 3, "max_tokens": 12}
    payload = json.loads(post(gateway, body))
    openapi_schema.validate(payload, "CreateChatCompletionResponse")
    content = payload["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == payload["choices"][0]["message"]["content"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert bytes(entry["bytes"]).decode() == entry["token"]
    streamed = openapi_schema.validate_stream(post(gateway, {**body, "stream": True}))
    entries = [e for c in streamed for ch in c["choices"] if ch.get("logprobs")
               for e in ch["logprobs"]["content"]]
    assert entries == content


def test_the_openai_sdk_parses_every_new_shape(gateway: Any) -> None:
    with openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as sdk:
        answer = sdk.chat.completions.create(**tool_body())
        call = answer.choices[0].message.tool_calls[0]
        assert call.function.name == "record_person" and json.loads(call.function.arguments)
        assert answer.choices[0].message.content is None
        stream = sdk.chat.completions.create(**tool_body(stream=True))
        arguments = "".join(
            c.choices[0].delta.tool_calls[0].function.arguments or ""
            for c in stream if c.choices and c.choices[0].delta.tool_calls
        )
        assert arguments == call.function.arguments
        thought = sdk.chat.completions.create(
            model="o4-mini", messages=[{"role": "user", "content": "Think."}])
        assert thought.usage.completion_tokens_details.reasoning_tokens > 0
        scored = sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Label."}], logprobs=True,
            top_logprobs=2, max_tokens=5)
        assert scored.choices[0].logprobs.content[0].top_logprobs[0].logprob <= 0


# -- the client, over loopback ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_client_keeps_tool_calls_reasoning_and_logprobs(gateway: Any, stream: bool) -> None:
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    answer = client_answer(gateway.base_url, tool_body(n=2, **extra))
    whole = complete(tool_body(n=2))
    assert answer.content is None and answer.choices == (None, None)
    assert answer.finish_reason == "tool_calls"
    assert json.loads(answer.tool_calls) == list(whole.tool_calls[0])
    assert [json.loads(c) for c in answer.choices_tool_calls] == [list(c) for c in whole.tool_calls]
    thought = client_answer(gateway.base_url, {
        "model": "o4-mini", "messages": [{"role": "user", "content": "Think."}], **extra})
    assert thought.usage.reasoning_tokens == complete(
        {"model": "o4-mini", "messages": [{"role": "user", "content": "Think."}]}
    ).usage.reasoning_tokens > 0
    scored = client_answer(gateway.base_url, {
        "model": "gpt-4o", "messages": [{"role": "user", "content": "Label."}],
        "logprobs": True, "top_logprobs": 2, "max_tokens": 6, **extra})
    assert [e["token"] for e in json.loads(scored.logprobs)["content"]] == [
        e["token"] for e in complete({"model": "gpt-4o", "messages": [
            {"role": "user", "content": "Label."}], "logprobs": True, "top_logprobs": 2,
            "max_tokens": 6}).logprobs[0]]


# -- the client, on shapes only aioresponses makes ------------------------------------------------


def _chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> str:
    return "data: " + json.dumps({
        "id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }) + "\n\n"


def mocked(body: str, request: dict[str, Any], stream: bool = True) -> Answer:
    async def go() -> Answer:
        with aioresponses() as mock:
            if stream:
                mock.post(URL, body=body, content_type="text/event-stream")
            else:
                mock.post(URL, body=body, content_type="application/json")
            async with Client(BASE, KEY, concurrency=2) as client:
                return await client.complete(request)

    return asyncio.run(go())


PARALLEL = [
    {"id": "call_a", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
    {"id": "call_b", "type": "function",
     "function": {"name": "get_time", "arguments": '{"zone":"Europe/Paris","h24":true}'}},
]


def test_parallel_tool_calls_streamed_interleaved_match_the_json_answer() -> None:
    events = [_chunk({"role": "assistant", "content": None})]
    for n, call in enumerate(PARALLEL):
        events.append(_chunk({"tool_calls": [{"index": n, "id": call["id"], "type": "function",
                                              "function": {"name": call["function"]["name"],
                                                           "arguments": ""}}]}))
    args = [c["function"]["arguments"] for c in PARALLEL]
    for position in range(max(map(len, args))):  # one character a delta, the calls interleaved
        for n, text in enumerate(args):
            if position < len(text):
                events.append(_chunk({"tool_calls": [
                    {"index": n, "function": {"arguments": text[position]}}]}))
    events += [_chunk({}, "tool_calls"), "data: [DONE]\n\n"]
    streamed = mocked("".join(events), {"model": "gpt-4o", "messages": [], "stream": True})
    whole = mocked(json.dumps({
        "id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                     "message": {"role": "assistant", "content": None,
                                 "tool_calls": PARALLEL}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35,
                  "completion_tokens_details": {"reasoning_tokens": 12}},
    }), {"model": "gpt-4o", "messages": []}, stream=False)
    assert json.loads(streamed.tool_calls) == PARALLEL
    assert streamed.tool_calls == whole.tool_calls  # the same text, byte for byte
    assert streamed.content is None and whole.content is None
    assert whole.usage.reasoning_tokens == 12 and whole.usage.completion_tokens == 30


def test_a_length_finish_inside_the_arguments_keeps_what_came() -> None:
    events = [
        _chunk({"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_x", "type": "function",
             "function": {"name": "record_person", "arguments": '{"name":"Ad'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'a","ci'}}]}),
        _chunk({}, "length"),
        "data: [DONE]\n\n",
    ]
    answer = mocked("".join(events), {"model": "gpt-4o", "messages": [], "stream": True})
    assert answer.finish_reason == "length"
    (call,) = json.loads(answer.tool_calls)
    assert call["function"]["arguments"] == '{"name":"Ada","ci'


# -- the run: output, cache, exports ------------------------------------------------------------


def run_tools(tmp_path: Path, base_url: str, name: str = "out.parquet", **settings: Any):  # type: ignore[no-untyped-def]
    source = tmp_path / "people.jsonl"
    source.write_text("".join(
        json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(
            ["Ada Lovelace, London, 1815", "Alan Turing, London, 1912",
             "Marie Curie, Warsaw, 1867"])
    ))
    settings.setdefault("params", {"tools": [EXTRACT], "tool_choice": NAMED})
    settings.setdefault("model", "gpt-4o-mini")
    config = RunConfig(input=source, output=tmp_path / name, base_url=base_url,
                       template="Who is this? {text}", **settings)
    report = run(config, handle_signals=False)
    return report, config.output


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_tool_call_only_answer_is_ok_with_its_calls_in_the_output(
    tmp_path: Path, gateway: Any, stream: bool
) -> None:
    report, output = run_tools(tmp_path, gateway.base_url, stream=stream)
    assert report.exit_code == 0
    rows = pq.read_table(output).to_pylist()
    for row in rows:
        assert row["status"] == "ok" and row["content"] is None
        assert row["finish_reason"] == "tool_calls"
        (call,) = json.loads(row["tool_calls"])
        assert json.loads(call["function"]["arguments"])["born"] >= 1800
        assert row["reasoning_tokens"] == 0 and row["logprobs"] is None


def test_the_cache_and_every_output_format_keep_the_answer_whole(
    tmp_path: Path, gateway: Any
) -> None:
    cache = tmp_path / "cache.sqlite"
    params = {"tools": [EXTRACT], "tool_choice": NAMED, "logprobs": True, "top_logprobs": 1}
    _, first = run_tools(tmp_path, gateway.base_url, cache=cache, params=params)
    sent = gateway.stats.requests
    rows = pq.read_table(first).to_pylist()
    for name in ("again.parquet", "again.jsonl", "again.csv"):
        report, output = run_tools(tmp_path, gateway.base_url, name, cache=cache, params=params)
        assert report.exit_code == 0 and gateway.stats.requests == sent  # all from the cache
        from batchrunner import read_results

        again = read_results(output).to_dict("records")
        for before, after in zip(rows, again, strict=True):
            assert after["cache_hit"]
            for column in ("tool_calls", "logprobs", "reasoning_tokens", "prompt_tokens"):
                assert after[column] == before[column], (name, column)


def test_batch_api_export_puts_them_where_the_batch_api_has_them(
    tmp_path: Path, gateway: Any
) -> None:
    import io

    from batchrunner.store.export import export_results

    params = {"tools": [EXTRACT], "tool_choice": NAMED, "n": 2}
    _, output = run_tools(tmp_path, gateway.base_url, params=params)
    out = io.BytesIO()
    export_results(output, "batch-api", stream=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    rows = pq.read_table(output).to_pylist()
    for line, row in zip(lines, rows, strict=True):
        body = line["response"]["body"]
        openapi_schema.validate(body, "CreateChatCompletionResponse")
        assert [c["message"]["tool_calls"] for c in body["choices"]] == [
            json.loads(text) for text in row["choices_tool_calls"]]
        assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    _, scored = run_tools(tmp_path, gateway.base_url, "scored.parquet", model="o4-mini",
                          params={"logprobs": True})
    out = io.BytesIO()
    export_results(scored, "batch-api", stream=out)
    rows = pq.read_table(scored).to_pylist()
    for text, row in zip(out.getvalue().splitlines(), rows, strict=True):
        body = json.loads(text)["response"]["body"]
        openapi_schema.validate(body, "CreateChatCompletionResponse")
        assert body["choices"][0]["logprobs"] == json.loads(row["logprobs"])
        assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == (
            row["reasoning_tokens"]) > 0


def test_json_schema_checks_the_named_functions_arguments(
    tmp_path: Path, start_gateway: Any
) -> None:
    schema = tmp_path / "person.schema.json"
    schema.write_text(json.dumps(EXTRACT["function"]["parameters"]))
    gateway = start_gateway(invalid_json_rate=0.0)
    report, output = run_tools(tmp_path, gateway.base_url, json_schema=schema)
    assert report.exit_code == 0
    for row in pq.read_table(output).to_pylist():
        assert row["status"] == "ok" and row["content"] is None and row["reasks"] == 0
        (call,) = json.loads(row["tool_calls"])
        assert json.loads(row["parsed"]) == json.loads(call["function"]["arguments"])
    # A schema the arguments do not meet: re-asked, then a schema error naming the path.
    strict = tmp_path / "strict.schema.json"
    strict.write_text(json.dumps({**EXTRACT["function"]["parameters"],
                                  "properties": {**EXTRACT["function"]["parameters"]["properties"],
                                                 "born": {"type": "integer", "maximum": 10}}}))
    report, output = run_tools(tmp_path, gateway.base_url, "strict.parquet", json_schema=strict,
                               invalid_retries=1)
    for row in pq.read_table(output).to_pylist():
        assert row["status"] == "error" and row["error"].startswith("schema: $.born: ")
        assert row["attempts"] == 2 and row["reasks"] == 1 and row["tool_calls"]


def test_summary_and_status_show_reasoning_and_the_rows_it_left_empty(
    tmp_path: Path, gateway: Any
) -> None:
    from click.testing import CliRunner

    from batchrunner import summarize
    from batchrunner.cli.commands import main

    # max_tokens 100: o4-mini reasons 64-255 tokens, so some rows end before any answer.
    report, output = run_tools(tmp_path, gateway.base_url, model="o4-mini",
                               params={"max_completion_tokens": 100})
    rows = pq.read_table(output).to_pylist()
    empty = [r for r in rows if r["finish_reason"] == "length" and not r["content"]]
    assert report.exit_code == 0 and all(r["status"] == "ok" for r in rows)
    assert empty and all(r["reasoning_tokens"] == r["completion_tokens"] == 100 for r in empty)
    for row in rows:  # reasoning tokens are inside completion_tokens: priced once, as output
        assert row["cost_usd"] == pytest.approx(
            (row["prompt_tokens"] * 1.10 + row["completion_tokens"] * 4.40) / 1e6)
    summary = summarize([output])
    (group,) = summary.groups
    assert group.reasoning_tokens == sum(r["reasoning_tokens"] for r in rows)
    assert group.reasoning_cut_rows == len(empty)
    assert group.reasoning_share == group.reasoning_tokens / group.completion_tokens
    table = CliRunner().invoke(main, ["summary", str(output)])
    assert table.exit_code == 0
    assert "reasoning" in table.output.splitlines()[0]  # the column beside completion
    assert f"o4-mini {group.reasoning_share:.0%}" in table.output
    assert f"{len(empty)} row" in table.output and "max_completion_tokens" in table.output
    status = CliRunner().invoke(main, ["status", str(output)])
    assert status.exit_code == 0, status.output
    assert f"{group.reasoning_tokens:,}" in status.output
    assert "max_completion_tokens" in status.output
    # a model that does not reason: no column, no note
    _, plain = run_tools(tmp_path, gateway.base_url, "plain.parquet", params={})
    assert "reasoning" not in CliRunner().invoke(main, ["summary", str(plain)]).output


def test_the_viewer_shows_a_rows_tool_calls(tmp_path: Path, gateway: Any) -> None:
    import test_viewer as viewer

    _, output = run_tools(tmp_path, gateway.base_url)
    row = pq.read_table(output).to_pylist()[1]
    (call,) = json.loads(row["tool_calls"])
    process, url = viewer._start_view(str(output))
    try:
        with contextlib.contextmanager(viewer.browser.__wrapped__)() as browser:
            viewer._open(browser, url)
            browser.find_elements("css selector", "#rows tbody tr")[1].click()
            viewer._wait_for(lambda: browser.find_element("id", "detail").is_displayed())
            viewer._settle(browser)
            assert viewer._text(browser, "#detail-answer") == "(no text: the model called a tool)"
            assert viewer._column(browser, "#detail-tools .role") == ["record_person"]
            shown = viewer._text(browser, "#detail-tools pre")
            assert json.loads(shown) == json.loads(call["function"]["arguments"])
    finally:
        viewer._stop(process)


def test_the_tools_sample_job_runs_locally(tmp_path: Path) -> None:
    from batchrunner.config.jobs import build_config, load_job

    repo = Path(__file__).resolve().parents[1]
    job = load_job(repo / "jobs" / "extract-with-tools.toml")
    config = build_config(job, {"output": tmp_path / "tools.parquet", "local": True})
    report = run(config, handle_signals=False)
    assert report.exit_code == 0 and report.rows == 6
    for row in pq.read_table(tmp_path / "tools.parquet").to_pylist():
        assert row["status"] == "ok" and row["content"] is None and row["reasks"] == 0
        (call,) = json.loads(row["tool_calls"])
        assert call["function"]["name"] == "record_entities"
        assert json.loads(row["parsed"]) == json.loads(call["function"]["arguments"])
