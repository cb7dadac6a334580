"""Structured output (docs/structured.md): schemas, validation, re-asking, the simulator's JSON, flatten."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openapi_schema
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scripted_server import Reply, Request, scripted_server

from batchrunner import RunConfig, run
from batchrunner.answers.flatten import flatten
from batchrunner.answers.structured import load_schema
from batchrunner.cli.commands import main
from batchrunner.config.jobs import build_config, load_job
from batchrunner.config.pricing import PriceTable
from batchrunner.errors import CheckpointMismatch, UsageError
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.inputs.scan import scan_input
from batchrunner.reports import summarize, to_json
from batchrunner.simulator import ApiError, complete

KEY = "sk-ru-structured-tests-0b9d7c5e3a1f"
REPO = Path(__file__).resolve().parents[1]

ENTITIES = {
    "title": "entities",
    "type": "object",
    "properties": {
        "entities": {"type": "array", "items": {"$ref": "#/$defs/entity"}, "maxItems": 4},
        "language": {"type": "string", "enum": ["en", "fr", "de"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["entities", "language", "confidence"],
    "additionalProperties": False,
    "$defs": {
        "entity": {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "type": {"type": "string", "enum": ["PERSON", "PLACE", "ORG"]},
            },
            "required": ["text", "type"],
            "additionalProperties": False,
        }
    },
}

# Every construct the simulator claims to honour, in one schema.
EVERYTHING = {
    "type": "object",
    "properties": {
        "label": {"enum": ["spam", "ham"]},
        "constant": {"const": 42},
        "score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "even": {"type": "integer", "minimum": 10, "maximum": 20, "multipleOf": 2},
        "step": {"type": "number", "minimum": 0, "maximum": 3, "multipleOf": 0.5},
        "flag": {"type": "boolean"},
        "code": {"type": "string", "minLength": 12, "maxLength": 16},
        "short": {"type": "string", "maxLength": 3},
        "day": {"type": "string", "format": "date"},
        "when": {"type": "string", "format": "date-time"},
        "mail": {"type": "string", "format": "email"},
        "link": {"type": "string", "format": "uri"},
        "uid": {"type": "string", "format": "uuid"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                 "minItems": 2, "maxItems": 3, "uniqueItems": True},
        "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "nullable": {"type": ["integer", "null"], "minimum": -3, "maximum": -1},
        "nested": {
            "type": "object",
            "properties": {"inner": {"$ref": "#/$defs/point"}, "deep": {"type": "array",
                           "items": {"type": "array", "items": {"type": "integer"}}}},
            "required": ["inner", "deep"],
        },
        "merged": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}},
                              "required": ["a"]},
                             {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
        "tree": {"$ref": "#/$defs/tree"},
    },
    "required": ["label", "constant", "score", "stars", "even", "step", "flag", "code", "short",
                 "day", "when", "mail", "link", "uid", "tags", "maybe", "nullable", "nested",
                 "merged", "tree"],
    "$defs": {
        "point": {"type": "object", "properties": {"x": {"type": "number"},
                                                   "y": {"type": "number"}},
                  "required": ["x", "y"], "additionalProperties": False},
        "tree": {"type": "object", "properties": {"name": {"type": "string"},
                 "children": {"type": "array", "items": {"$ref": "#/$defs/tree"}}},
                 "required": ["name", "children"]},
    },
}


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def write(path: Path, value: Any) -> Path:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def texts(n: int) -> list[dict[str, Any]]:
    names = ["Ada Lovelace in London", "Marie Curie at Stockholm", "Alan Turing at Bletchley",
             "Grace Hopper with Remington", "Katherine Johnson at Langley"]
    return [{"id": f"t{i}", "text": f"{names[i % len(names)]}, note {i}"} for i in range(n)]


def go(tmp_path: Path, base_url: str, n: int = 12, **settings: Any):  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in texts(n)))
    settings.setdefault("json_schema", write(tmp_path / "schema.json", ENTITIES))
    config = RunConfig(input=source, output=tmp_path / "out.parquet", base_url=base_url,
                       model="gpt-4o-mini", template="Entities of: {text}", **settings)
    report = run(config, handle_signals=False)
    if not config.output.exists():  # a stopped run: its rows are in the checkpoint
        return report, None
    return report, pq.read_table(config.output).to_pylist()


_FORMATS: dict[str, dict[str, Any]] = {}  # check_schema takes a while: once per schema


def body(prompt: str, schema: dict[str, Any] = ENTITIES, **extra: Any) -> dict[str, Any]:
    key = json.dumps(schema, sort_keys=True)
    if key not in _FORMATS:
        _FORMATS[key] = load_schema(schema).response_format()
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "response_format": _FORMATS[key],
        **extra,
    }


# -- loading a schema -------------------------------------------------------------------------


def test_a_schema_loads_from_json_toml_or_a_table(tmp_path: Path) -> None:
    from_json = load_schema(write(tmp_path / "s.json", ENTITIES))
    toml = tmp_path / "label.toml"
    toml.write_text('type = "object"\nrequired = ["label"]\n'
                    '[properties.label]\ntype = "string"\nenum = ["a", "b"]\n')
    from_toml = load_schema(toml)
    inline = load_schema({"type": "object", "properties": {}})
    assert from_json.name == "entities"  # the title
    assert from_toml.name == "label" and from_toml.document["required"] == ["label"]
    assert inline.name == "response"
    assert from_json.response_format() == {
        "type": "json_schema",
        "json_schema": {"name": "entities", "schema": ENTITIES, "strict": True},
    }
    wrapped = load_schema(write(tmp_path / "w.json", {"name": "my schema!", "strict": True,
                                                     "schema": ENTITIES}))
    assert wrapped.document == ENTITIES and wrapped.name == "my_schema"  # the API's name rule


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.json", '{"type": "object",\n "properties": }', "bad.json: not valid JSON: "
         "Expecting value (at line 2, column 16)"),
        ("bad.toml", "type = \n", "bad.toml: not valid TOML: "),
        ("bad.txt", "<xml>not a schema</xml>", "bad.txt: not JSON or TOML"),
        ("list.json", "[1, 2]", "list.json: a JSON Schema must be an object, not an array"),
        ("type.json", '{"type": "objekt"}', "type.json: not a valid JSON Schema: at $.type: "),
        ("req.json", '{"type": "object", "properties": {"a": {"minimum": "one"}}}',
         "req.json: not a valid JSON Schema: at $.properties.a.minimum: 'one' is not of type"),
    ],
)
def test_a_bad_schema_file_names_the_file_and_the_problem(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(UsageError) as caught:
        load_schema(path)
    assert str(caught.value).startswith(str(tmp_path / expected))
    assert caught.value.exit_code == 2


def test_a_missing_schema_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="schema file not found: .*nope.json"):
        load_schema(tmp_path / "nope.json")


def test_a_bad_schema_is_exit_2_before_anything_is_sent(tmp_path: Path, gateway: Any) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    bad = write(tmp_path / "s.json", {"type": "object", "required": "entities"})
    for command in ("run", "estimate"):
        result = CliRunner().invoke(main, [
            command, "-i", str(source), "-o", str(tmp_path / "o.parquet"), "-m", "gpt-4o-mini",
            "--base-url", gateway.base_url, "--json-schema", str(bad),
        ])
        assert result.exit_code == 2, result.output
        assert f"{bad}: not a valid JSON Schema: at $.required: 'entities' is not of type " \
               "'array'" in result.output
        assert "Traceback" not in result.output
    assert gateway.stats.requests == 0
    assert not (tmp_path / "o.parquet").exists()


def test_a_ref_that_points_nowhere_is_exit_2_before_anything_is_sent(
    tmp_path: Path, gateway: Any
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    bad = write(tmp_path / "s.json", {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/name"}, "b": {"$ref": "#/definitions/nope"}},
        "$defs": {"name": {"type": "string"}}})
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "o.parquet"\nmodel = "gpt-4o-mini"\n'
                   f'json_schema = "s.json"\nbase_url = "{gateway.base_url}"\n')
    for args in (["run", str(job)], ["validate", str(job)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert f"{bad}: the $ref '#/definitions/nope' at $.properties.b does not " \
               "resolve" in result.output
        assert "Traceback" not in result.output
    assert gateway.stats.requests == 0


def test_refs_that_resolve_pass(tmp_path: Path) -> None:
    schema = {"type": "object", "$defs": {"n": {"type": "string"}},
              "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#"},
                             "c": {"$id": "https://example.com/c", "$defs": {"m": {"enum": [1]}},
                                   "properties": {"d": {"$ref": "#/$defs/m"}}},
                             "e": {"$ref": "https://example.com/c"},
                             "f": {"const": {"$ref": "not a reference: data"}}}}
    assert load_schema(schema).document == schema


def test_job_files_take_a_schema_path_or_an_inline_table(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    write(tmp_path / "jobs" / "s.json", ENTITIES)
    job = write(tmp_path / "jobs" / "a.toml", 'input = "in.jsonl"\noutput = "o.parquet"\n'
                'json_schema = "s.json"\ninvalid_retries = 0\n')
    config = build_config(load_job(job), {})
    assert config.json_schema == tmp_path / "jobs" / "s.json" and config.invalid_retries == 0
    inline = write(tmp_path / "b.toml", 'input = "in.jsonl"\noutput = "o.parquet"\n'
                   '[json_schema]\ntype = "object"\nrequired = ["x"]\n'
                   '[json_schema.properties.x]\ntype = "integer"\n')
    assert build_config(load_job(inline), {}).json_schema["required"] == ["x"]
    broken = write(tmp_path / "c.toml", 'input = "i"\noutput = "o"\n'
                   '[json_schema]\ntype = "integer"\nminimum = "zero"\n')
    with pytest.raises(UsageError, match=r"c.toml: `json_schema`: not a valid JSON Schema: "
                                         r"at \$.minimum"):
        load_job(broken)
    negative = write(tmp_path / "d.toml", 'input = "i"\noutput = "o"\ninvalid_retries = -1\n')
    with pytest.raises(UsageError, match="invalid_retries` must be at least 0"):
        load_job(negative)


def test_the_request_asks_for_the_schema_unless_the_row_or_a_param_sets_a_format(
    tmp_path: Path,
) -> None:
    schema = write(tmp_path / "s.json", ENTITIES)
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "x"}], '
        '"response_format": {"type": "json_object"}}}\n'
        '{"custom_id": "b", "body": {"messages": [{"role": "user", "content": "y"}]}}\n'
    )
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o",
                       json_schema=schema)
    builder = RequestBuilder(config, scan_input(config).columns)
    own, plain = (builder.build(i, r, None).body for i, r in
                  enumerate(map(json.loads, source.read_text().splitlines())))
    assert own["response_format"] == {"type": "json_object"}  # the row's own wins
    assert plain["response_format"] == load_schema(schema).response_format()
    param = config.replace(params={"response_format": {"type": "text"}})
    builder = RequestBuilder(param, scan_input(param).columns)
    assert builder.build(1, json.loads(source.read_text().splitlines()[1]), None).body[
        "response_format"] == {"type": "text"}


# -- checking answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"language": "en", "entities": [], "confidence": 0.5}',
         '{"confidence":0.5,"entities":[],"language":"en"}'),
        ('```json\n{"language":"fr","entities":[],"confidence":1}\n```',
         '{"confidence":1,"entities":[],"language":"fr"}'),
        ('{"language": "en", "entities": [{"text": "Ada", "type": "x"}], "confidence": 1}',
         "schema: $.entities[0].type: 'x' is not one of ['PERSON', 'PLACE', 'ORG']"),
        ('{"entities": [], "confidence": 0.1}', "schema: $: 'language' is a required property"),
        ('{"language": "en", "entities": [], "confidence": 2}',
         "schema: $.confidence: 2 is greater than the maximum of 1"),
        ("Sure! {", "schema: not JSON: Expecting value: line 1 column 1 (char 0)"),
        ('{"language": "en", "entities": [], "confidence": NaN}', "schema: not JSON: NaN is not"),
        (None, "schema: no content in the answer"),
    ],
)
def test_answers_are_parsed_and_validated(content: str | None, expected: str) -> None:
    check = load_schema(ENTITIES).check(content)
    if expected.startswith("schema:"):
        assert not check.valid and check.error is not None and check.error.startswith(expected)
    else:
        assert check.valid and check.parsed == expected and check.error is None


def test_a_cut_answer_says_so() -> None:
    check = load_schema(ENTITIES).check('{"language": "e', "length")
    assert check.error is not None and check.error.startswith("schema: not JSON (cut at max_tokens)")


# -- the simulator ----------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [ENTITIES, EVERYTHING], ids=["entities", "everything"])
def test_the_simulator_answers_json_valid_against_the_schema(schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    answers = set()
    for i in range(60):
        completion = complete(body(f"Ada Lovelace met Charles Babbage, take {i}", schema, n=2))
        for text in completion.texts:
            validator.validate(json.loads(text))
            answers.add(text)
        assert completion.finish_reasons == ("stop", "stop")
    assert len(answers) > 100  # derived from the request, not one canned answer


def test_the_simulators_json_is_deterministic_and_counted() -> None:
    from batchrunner.simulator import count_tokens

    first = complete(body("Marie Curie in Paris"))
    assert complete(body("Marie Curie in Paris")) == first
    assert complete(body("Marie Curie in Paris", seed=1)).texts != first.texts
    assert first.usage.completion_tokens == count_tokens(first.texts[0])
    # The answer weaves in the prompt's words, as an extraction would.
    assert any(w in first.texts[0] for w in ("Marie", "Curie", "Paris"))


def test_non_schema_answers_are_unchanged_by_response_format_text() -> None:
    plain = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi there"}]}
    assert complete({**plain, "response_format": {"type": "text"}}) == complete(plain)
    as_object = json.loads(complete({**plain, "response_format": {"type": "json_object"}}).texts[0])
    assert list(as_object) == ["answer"] and as_object["answer"].endswith(".")


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "json_schema"}, "Missing required parameter: 'response_format.json_schema'"),
        ({"type": "json_schema", "json_schema": {"schema": {}}},
         "Missing required parameter: 'response_format.json_schema.name'"),
        ({"type": "json_schema", "json_schema": {"name": "a b"}},
         "Invalid 'response_format.json_schema.name'"),
        ({"type": "xml"}, "Invalid value: 'xml'"),
    ],
)
def test_the_simulator_refuses_a_malformed_response_format(
    response_format: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiError) as caught:
        complete({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}],
                  "response_format": response_format})
    assert caught.value.status == 400 and caught.value.message.startswith(message)


def _answers(gateway: Any, prompts: list[str | dict[str, Any]]) -> list[str]:
    """The first choice's content of each request, sent one by one on one connection."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(gateway.base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    out = []
    try:
        for prompt in prompts:
            sent = body(prompt) if isinstance(prompt, str) else prompt
            connection.request("POST", url.path + "/chat/completions", json.dumps(sent), headers)
            answer = json.loads(connection.getresponse().read())
            out.append(answer["choices"][0]["message"]["content"])
    finally:
        connection.close()
    return out


def test_invalid_json_rate_spoils_a_share_reproducibly(start_gateway: Any) -> None:
    prompts = [f"Alan Turing, item {i}" for i in range(40)] * 2  # each body twice
    one = start_gateway(invalid_json_rate=0.4, fault_seed=11)
    two = start_gateway(invalid_json_rate=0.4, fault_seed=11)
    other = start_gateway(invalid_json_rate=0.4, fault_seed=12)
    got = _answers(one, prompts)
    assert _answers(two, prompts) == got  # the same seed: the same answers, spoiled or not
    assert _answers(other, prompts) != got
    schema = load_schema(ENTITIES)
    errors = [schema.check(text).error for text in got]
    invalid = [e for e in errors if e is not None]
    assert one.stats.invalid_json == len(invalid)
    assert 16 <= len(invalid) <= 48  # 40% of 80
    assert any(e.startswith("schema: not JSON") for e in invalid)
    assert any("is a required property" in e for e in invalid)
    # A request spoiled once is answered validly another time: re-asking can help.
    assert any(errors[i] is not None and errors[i + 40] is None for i in range(40))


def test_invalid_json_rate_touches_only_schema_requests(start_gateway: Any) -> None:
    gateway = start_gateway(invalid_json_rate=1.0, fault_seed=1)
    plain = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi there"}]}
    (text,) = _answers(gateway, [plain])
    assert text == complete(plain).texts[0] and gateway.stats.invalid_json == 0


# -- the run ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_valid_answer_fills_parsed(tmp_path: Path, gateway: Any, stream: bool) -> None:
    report, rows = go(tmp_path, gateway.base_url, n=6, stream=stream)
    assert report.exit_code == 0 and gateway.stats.requests == 6
    for row in rows:
        assert row["status"] == "ok" and row["attempts"] == 1 and row["reasks"] == 0
        assert row["parsed"] == json.dumps(json.loads(row["content"]), sort_keys=True,
                                           separators=(",", ":"))
        assert row["reask_cost_usd"] == 0.0
    metadata = pq.read_schema(tmp_path / "out.parquet").metadata
    assert json.loads(metadata[b"batchrunner.json_schema"]) == ENTITIES


def test_invalid_answers_are_asked_again_and_every_attempt_counted(
    tmp_path: Path, start_gateway: Any
) -> None:
    gateway = start_gateway(invalid_json_rate=0.5, fault_seed=5)
    report, rows = go(tmp_path, gateway.base_url, n=30, invalid_retries=3)
    assert sum(row["attempts"] for row in rows) == gateway.stats.requests == report.sent
    assert sum(row["reasks"] for row in rows) == gateway.stats.invalid_json - sum(
        row["status"] == "error" for row in rows)
    reasked = [row for row in rows if row["reasks"]]
    assert len(reasked) >= 5
    prices = PriceTable.load(None)
    for row in rows:
        assert row["attempts"] == row["reasks"] + 1  # no transport faults here
        # Tokens and cost are those of every answer: the prompt was sent `attempts` times.
        single = complete({"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": f"Entities of: {texts(30)[int(row['id'][1:])]['text']}"}
        ]}).usage.prompt_tokens
        assert row["prompt_tokens"] == single * row["attempts"]
        assert row["cost_usd"] == pytest.approx(
            prices.cost("gpt-4o-mini", row["prompt_tokens"], row["completion_tokens"], 0))
        if row["status"] == "ok":
            jsonschema.validate(json.loads(row["parsed"]), ENTITIES)
    for row in reasked:
        assert 0 < row["reask_cost_usd"] < row["cost_usd"]
    assert report.cost_usd == pytest.approx(sum(row["cost_usd"] for row in rows))


def test_still_invalid_after_the_retries_is_a_schema_error(
    tmp_path: Path, start_gateway: Any
) -> None:
    gateway = start_gateway(invalid_json_rate=1.0, fault_seed=2)
    report, rows = go(tmp_path, gateway.base_url, n=5, invalid_retries=1)
    assert report.exit_code == 1 and report.failed == 5
    assert gateway.stats.requests == 10
    for row in rows:
        assert row["status"] == "error" and row["attempts"] == 2 and row["reasks"] == 1
        assert row["error"].startswith("schema: ")
        assert row["content"] is not None and row["parsed"] is None  # the answer is kept
        assert row["error"] == load_schema(ENTITIES).check(row["content"]).error


def test_re_asks_and_transport_retries_are_both_attempts(
    tmp_path: Path, start_gateway: Any
) -> None:
    gateway = start_gateway(invalid_json_rate=0.4, error_rate=0.2, fault_seed=9)
    report, rows = go(tmp_path, gateway.base_url, n=10, invalid_retries=2)
    assert sum(row["attempts"] for row in rows) == gateway.stats.requests
    assert gateway.stats.by_status.get(500, 0) + gateway.stats.by_status.get(503, 0) > 0
    assert any(row["attempts"] > row["reasks"] + 1 for row in rows)


def _completion(content: str) -> Reply:
    return Reply(json={
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    })


def test_a_re_ask_that_fails_ends_the_row_with_the_schema_error(tmp_path: Path) -> None:
    def answer(request: Request) -> Reply:
        if len(server.requests) == 1:
            return _completion('{"language": "xx"}')
        return Reply(status=400, json={"error": {"message": "nope", "type": "invalid_request"}})

    with scripted_server(answer) as server:  # it answers chat requests only: no pre-flight
        report, rows = go(tmp_path, server.base_url, n=1, invalid_retries=3, preflight=False)
    assert len(server.requests) == 2 and report.exit_code == 1
    (row,) = rows
    assert row["attempts"] == 2 and row["reasks"] == 0
    assert row["error"].startswith("schema: $: 'entities' is a required property")
    assert row["content"] == '{"language": "xx"}' and row["prompt_tokens"] == 10
    for request in server.requests:  # what is sent is what the API's own schema allows
        openapi_schema.validate(request.json(), "CreateChatCompletionRequest")
        assert request.json()["response_format"]["json_schema"]["strict"] is True


_KEPT = ["status", "error", "attempts", "reasks", "prompt_tokens", "content", "cost_usd"]


def test_a_401_during_a_re_ask_keeps_the_answers_paid_for(tmp_path: Path) -> None:
    def answer(request: Request) -> Reply:
        if len(server.requests) == 1:
            return _completion('{"language": "xx"}')
        return Reply(status=401, json={"error": {"message": "key revoked", "type": "auth"}})

    with scripted_server(answer) as server:
        report, _ = go(tmp_path, server.base_url, n=1, invalid_retries=3, preflight=False)
    assert report.exit_code == 4 and len(server.requests) == 2
    from batchrunner.store.checkpoint import checkpoint_results

    (row,) = checkpoint_results(tmp_path / "out.parquet", _KEPT)[0].to_pylist()
    # The first answer was paid for: it is recorded (as a failed re-ask records it), not
    # thrown away to be sent again on resume.
    assert row["status"] == "error" and row["error"].startswith("schema: ")
    assert row["attempts"] == 2 and row["reasks"] == 0 and row["prompt_tokens"] == 10
    assert row["content"] == '{"language": "xx"}'


def test_ctrl_c_before_a_re_ask_keeps_the_answers_paid_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchrunner.answers.structured import Schema
    from batchrunner.engine.state import RunControl

    control = RunControl()
    check = Schema.check

    def interrupted(self: Schema, content: Any, finish_reason: Any = None) -> Any:
        control.stop("interrupted", 130)  # as the SIGINT handler does, on the run's loop
        return check(self, content, finish_reason)

    monkeypatch.setattr(Schema, "check", interrupted)
    with scripted_server(lambda request: _completion('{"language": "xx"}')) as server:
        source = tmp_path / "in.jsonl"
        source.write_text(json.dumps(texts(1)[0]) + "\n")
        config = RunConfig(input=source, output=tmp_path / "out.parquet",
                           base_url=server.base_url, model="gpt-4o-mini", preflight=False,
                           template="Entities of: {text}", invalid_retries=3,
                           json_schema=write(tmp_path / "schema.json", ENTITIES))
        report = run(config, handle_signals=False, control=control)
    assert len(server.requests) == 1 and report.failed == 1
    (row,) = pq.read_table(config.output).to_pylist()
    assert row["status"] == "error" and row["error"].startswith("schema: ")
    assert row["attempts"] == 1 and row["prompt_tokens"] == 10


def test_a_budget_reached_during_a_re_ask_keeps_the_answers_paid_for(tmp_path: Path) -> None:
    from batchrunner.engine.processor import _prompt_tokens

    def answer(request: Request) -> Reply:
        reply = _completion('{"language": "xx"}')
        reply.json["usage"] = {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}
        return reply

    prices = write(tmp_path / "prices.toml", '[models."gpt-4o-mini"]\n'
                   "input = 1000.0\ncached_input = 1000.0\noutput = 1000.0\n")
    prompt = {"messages": [{"role": "user", "content": f"Entities of: {texts(1)[0]['text']}"}]}
    worst = (_prompt_tokens(prompt)[1] + 5) * 1000 / 1e6
    with scripted_server(answer) as server:
        # The first answer ($0.055) leaves less than a re-ask's worst case.
        report, rows = go(tmp_path, server.base_url, n=1, invalid_retries=3, preflight=False,
                          max_cost=worst + 0.001, params={"max_tokens": 5}, prices=prices)
    # The row has its result, so the run is complete (exit 1: a row failed), not left pending.
    assert len(server.requests) == 1 and report.exit_code == 1 and report.failed == 1
    (row,) = rows
    assert row["status"] == "error" and row["error"].startswith("schema: ")
    assert row["attempts"] == 1 and row["cost_usd"] == pytest.approx(0.055)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_second_identical_structured_run_with_the_cache_sends_nothing(
    tmp_path: Path, gateway: Any, stream: bool
) -> None:
    cache = tmp_path / "cache.sqlite"
    report, rows = go(tmp_path, gateway.base_url, n=8, cache=cache, stream=stream)
    assert report.exit_code == 0 and gateway.stats.requests == 8
    second = tmp_path / "two"
    second.mkdir()
    report, again = go(second, gateway.base_url, n=8, cache=cache, stream=stream)
    assert report.exit_code == 0 and gateway.stats.requests == 8  # 0 sent the second time
    assert all(row["cache_hit"] and row["attempts"] == 0 for row in again)
    assert [row["parsed"] for row in again] == [row["parsed"] for row in rows]


def test_the_cache_stores_valid_answers_with_their_re_asks_and_forgets_the_rest(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchrunner.cache.session import CacheSession

    left: list[int] = []
    close = CacheSession.close

    async def closing(self: CacheSession) -> None:
        left.append(len(self._keys))  # rows looked up, sent, and not yet stored or forgotten
        await close(self)

    monkeypatch.setattr(CacheSession, "close", closing)
    gateway = start_gateway(invalid_json_rate=0.5, fault_seed=5)
    cache = tmp_path / "cache.sqlite"
    report, rows = go(tmp_path, gateway.base_url, n=20, invalid_retries=1, cache=cache)
    sent = gateway.stats.requests
    assert report.exit_code == 1 and sent > 20 and left == [0]
    second = tmp_path / "two"
    second.mkdir()
    report2, again = go(second, gateway.base_url, n=20, invalid_retries=1, cache=cache)
    valid = [row for row in rows if row["status"] == "ok"]
    failed = [row for row in rows if row["status"] != "ok"]
    assert valid and failed and left == [0, 0]
    # Only the failed rows are sent again; every valid one is served with its re-asks' cost.
    assert gateway.stats.requests - sent == sum(
        row["attempts"] for row in again if not row["cache_hit"])
    by_id = {row["id"]: row for row in again}
    for row in valid:
        hit = by_id[row["id"]]
        assert hit["cache_hit"] and hit["attempts"] == 0
        for name in ("parsed", "reasks", "reask_cost_usd", "cost_usd", "prompt_tokens"):
            assert hit[name] == row[name]
    assert all(not by_id[row["id"]]["cache_hit"] for row in failed)


def test_without_a_schema_the_output_has_no_structured_columns(
    tmp_path: Path, gateway: Any
) -> None:
    report, rows = go(tmp_path, gateway.base_url, n=2, json_schema=None)
    assert report.exit_code == 0
    assert not {"parsed", "reasks", "reask_cost_usd"} & rows[0].keys()


def test_the_schema_is_part_of_the_checkpoint_fingerprint(tmp_path: Path, gateway: Any) -> None:
    go(tmp_path, gateway.base_url, n=3)
    changed = {**ENTITIES, "required": ["entities"]}
    with pytest.raises(CheckpointMismatch, match="settings: json_schema changed. Run with"):
        go(tmp_path, gateway.base_url, n=3, json_schema=write(tmp_path / "s2.json", changed))
    before = gateway.stats.requests
    report, _ = go(tmp_path, gateway.base_url, n=3)  # the same schema: a finished job
    assert gateway.stats.requests == before and report.exit_code == 0


def test_the_cli_runs_with_json_schema_and_summary_shows_first_attempt_validity(
    tmp_path: Path, start_gateway: Any
) -> None:
    gateway = start_gateway(invalid_json_rate=0.5, fault_seed=3)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in texts(20)))
    schema = write(tmp_path / "s.json", ENTITIES)
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, [
        "run", "-i", str(source), "-o", str(out), "-m", "gpt-4o-mini", "--template", "{text}",
        "--base-url", gateway.base_url, "--json-schema", str(schema), "--invalid-retries", "0",
        "--quiet",
    ])
    rows = pq.read_table(out).to_pylist()
    valid = sum(row["status"] == "ok" for row in rows)
    assert result.exit_code == (0 if valid == 20 else 1)
    assert gateway.stats.requests == 20 and all(row["reasks"] == 0 for row in rows)
    assert 3 <= valid <= 17
    summary = CliRunner().invoke(main, ["summary", str(out)])
    assert f"structured: {valid} of 20 answered rows valid at the first answer " \
           f"({valid / 20:.1%}), {valid} valid in the end; 0 re-asks cost $0.000000" \
           in summary.output


def test_summary_figures_of_re_asking(tmp_path: Path, start_gateway: Any) -> None:
    gateway = start_gateway(invalid_json_rate=0.5, fault_seed=4)
    go(tmp_path, gateway.base_url, n=20, invalid_retries=2)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    figures = json.loads(to_json(summarize([tmp_path / "out.parquet"])))["structured"]
    first = sum(row["status"] == "ok" and row["reasks"] == 0 for row in rows)
    assert figures["answered"] == 20 and figures["valid_first"] == first
    assert figures["valid_first_share"] == first / 20
    assert figures["valid"] == sum(row["status"] == "ok" for row in rows)
    assert figures["reasks"] == sum(row["reasks"] for row in rows) > 0
    assert figures["reask_cost_usd"] == pytest.approx(sum(r["reask_cost_usd"] for r in rows))
    assert figures["reask_cost_usd"] > 0


def test_the_sample_job_runs_locally(tmp_path: Path) -> None:
    job = load_job(REPO / "jobs" / "extract-entities.toml")
    config = build_config(job, {"output": tmp_path / "entities.parquet", "local": True})
    report = run(config, handle_signals=False)
    assert report.exit_code == 0 and report.rows == 6
    table = flatten(pq.read_table(tmp_path / "entities.parquet"))
    assert {"entities", "language", "sentiment", "people", "about_science"} <= set(
        table.column_names)


# -- flattening -------------------------------------------------------------------------------

FLAT = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["a", "b"]},
        "count": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "people": {"type": "array", "items": {"$ref": "#/$defs/person"}},
        "where": {"type": "object", "properties": {"city": {"type": "string"},
                                                   "zip": {"type": ["integer", "null"]}}},
        "anything": {},
        "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "status": {"type": "string"},
    },
    "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"},
                                                          "age": {"type": "integer"}}}},
}


def _parsed_table() -> pa.Table:
    values = [
        {"label": "a", "count": 3, "score": 0.5, "ok": True, "tags": ["x", "y"],
         "people": [{"name": "Ada", "age": 36}], "where": {"city": "London", "zip": None},
         "anything": {"k": [1]}, "either": 7, "status": "fine"},
        None,  # an error row
        {"label": "b", "count": 0, "score": 2, "ok": False, "tags": [], "people": [],
         "where": {"city": "Paris"}, "anything": "text", "either": "seven"},
    ]
    return pa.table({
        "id": ["r0", "r1", "r2"],
        "status": ["ok", "error", "ok"],
        "parsed": [None if v is None else json.dumps(v, sort_keys=True) for v in values],
        "attempts": pa.array([1, 3, 1], pa.int32()),
    })


def test_flatten_makes_typed_columns_from_the_top_level_properties() -> None:
    flat = flatten(_parsed_table(), FLAT)
    assert flat.column_names == [
        "id", "status", "label", "count", "score", "ok", "tags", "people", "where", "anything",
        "either", "parsed_status", "attempts",
    ]
    types = {field.name: field.type for field in flat.schema}
    assert types["label"] == pa.string() and types["count"] == pa.int64()
    assert types["score"] == pa.float64() and types["ok"] == pa.bool_()
    assert types["tags"] == pa.list_(pa.string())
    assert types["people"] == pa.list_(pa.struct([("name", pa.string()), ("age", pa.int64())]))
    assert types["where"] == pa.struct([("city", pa.string()), ("zip", pa.int64())])
    assert types["anything"] == pa.string() and types["either"] == pa.string()  # JSON text
    rows = flat.to_pylist()
    assert rows[0]["count"] == 3 and rows[2]["score"] == 2.0 and rows[2]["ok"] is False
    assert rows[0]["people"] == [{"name": "Ada", "age": 36}]
    assert rows[2]["where"] == {"city": "Paris", "zip": None}
    assert rows[0]["anything"] == '{"k":[1]}' and rows[2]["anything"] == "text"
    assert rows[0]["either"] == "7" and rows[0]["parsed_status"] == "fine"
    assert all(rows[1][name] is None for name in ("label", "count", "tags", "where"))
    assert rows[2]["parsed_status"] is None  # a property the answer left out


def test_flatten_keeps_a_dataframe_a_dataframe_and_reads_the_recorded_schema(
    tmp_path: Path, gateway: Any
) -> None:
    frame = flatten(_parsed_table().to_pandas(), FLAT)
    assert isinstance(frame, pd.DataFrame) and frame.loc[0, "count"] == 3
    go(tmp_path, gateway.base_url, n=4)
    flat = flatten(pq.read_table(tmp_path / "out.parquet"))  # the schema the run recorded
    assert flat.schema.field("confidence").type == pa.float64()
    assert flat.schema.field("language").type == pa.string()
    assert "parsed" not in flat.column_names


def test_flatten_refuses_what_it_cannot_flatten() -> None:
    with pytest.raises(UsageError, match="no top-level properties"):
        flatten(_parsed_table(), {"type": "array"})
    with pytest.raises(UsageError, match="no schema given"):
        flatten(_parsed_table())
    with pytest.raises(UsageError, match="no `parsed` column"):
        flatten(pa.table({"id": ["a"]}), FLAT)


def test_the_gateway_command_takes_invalid_json_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    import batchrunner.simulator

    served = []
    monkeypatch.setattr(batchrunner.simulator, "serve", served.append)
    result = CliRunner().invoke(main, ["gateway", "--port", "0", "--invalid-json-rate", "0.25",
                                       "--fault-seed", "3"])
    assert result.exit_code == 0, result.output
    assert served[0].invalid_json_rate == 0.25 and served[0].fault_seed == 3
