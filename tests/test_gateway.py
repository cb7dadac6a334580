"""The gateway simulator (docs/simulator.md): the official SDK against it, the OpenAI schema,
the 400/401/404 bodies, deterministic answers and usage, prompt caching, and every fault."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import openapi_schema
import pytest
from openapi_schema import validate, validate_stream

from batchrunner.simulator import (
    MODELS,
    GatewayConfig,
    PromptCache,
    complete,
    count_prompt_tokens,
    count_tokens,
    running_gateway,
)
from batchrunner.simulator.faults import FaultPlan, RateLimiter, format_duration

KEY = "sk-ru-test"


def body_for(content: str = "Name three rivers of Europe.", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **fields}


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    gateway: Any,
    path: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    method: str | None = None,
    raw: bytes | None = None,
    authorization: str | None = None,
) -> Reply:
    """One HTTP request to the simulator, answered whatever the status."""
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(gateway.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, error.read())


def chat(gateway: Any, body: Any, **options: Any) -> Reply:
    return call(gateway, "/v1/chat/completions", body, **options)


def error_of(reply: Reply) -> dict[str, Any]:
    payload = reply.json()
    validate(payload, "ErrorResponse")
    return payload["error"]


# -- the official SDK, unchanged -------------------------------------------------------------


@pytest.fixture
def client(gateway: Any) -> Any:
    with openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as sdk:
        yield sdk


def test_sdk_lists_models(client: Any) -> None:
    models = {model.id: model for model in client.models.list()}
    names = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-20241022", "claude-3-5-haiku-20241022")
    for name in names:
        assert models[name].owned_by
    assert models["claude-3-5-haiku-20241022"].owned_by == "anthropic"
    assert client.models.retrieve("gpt-4o").owned_by == "openai"


def test_sdk_chat_completion_is_the_pure_answer(client: Any) -> None:
    body = body_for()
    response = client.chat.completions.create(**body)
    expected = complete(body)
    assert response.object == "chat.completion"
    assert response.model == "gpt-4o-mini-2024-07-18"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.texts[0]
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens == expected.usage.prompt_tokens
    assert response.usage.completion_tokens == expected.usage.completion_tokens
    assert response.usage.total_tokens == expected.usage.total_tokens
    assert response.usage.prompt_tokens_details.cached_tokens == 0


def test_sdk_n_with_max_tokens_gives_length(client: Any) -> None:
    response = client.chat.completions.create(**body_for(), n=3, max_tokens=5)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert [choice.finish_reason for choice in response.choices] == ["length"] * 3
    texts = [choice.message.content for choice in response.choices]
    assert len(set(texts)) == 3
    assert [count_tokens(text) for text in texts] == [5, 5, 5]
    assert response.usage.completion_tokens == 15


def test_sdk_streams_with_usage(client: Any) -> None:
    body = body_for("Describe a lighthouse at night.")
    stream = client.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    expected = complete(body)
    assert text == expected.texts[0]
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens


def test_sdk_bad_key_raises_authentication_error(gateway: Any) -> None:
    with openai.OpenAI(base_url=gateway.base_url, api_key="sk-wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.chat.completions.create(**body_for())
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()


def test_async_sdk_against_the_in_process_gateway() -> None:
    async def scenario() -> tuple[str, str]:
        async with running_gateway(GatewayConfig(port=0)) as gateway:
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", gateway.base_url)
            assert gateway.port > 0
            sdk = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
            async with sdk:
                response = await sdk.chat.completions.create(**body_for())
                with pytest.raises(openai.NotFoundError):
                    await sdk.chat.completions.create(**{**body_for(), "model": "gpt-9"})
            return response.choices[0].message.content, gateway.url

    content, url = asyncio.run(scenario())
    assert content == complete(body_for()).texts[0]
    with pytest.raises(urllib.error.URLError):  # closed on exit
        urllib.request.urlopen(url + "/_simulator/stats", timeout=2).close()


# -- every response and chunk validates against the OpenAI schema -----------------------------

ANSWERED = [
    body_for(),
    body_for(n=3, max_tokens=7),
    body_for(stop=["the", "."], temperature=0, seed=7),
    body_for(max_completion_tokens=3, top_p=0.5),
    {
        "model": "claude-3-5-sonnet-20241022",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello there"}]},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Tell me about tides.", "name": "ana"},
        ],
        "presence_penalty": 0.5,
    },
]


@pytest.mark.parametrize("body", ANSWERED)
def test_responses_validate(gateway: Any, body: dict[str, Any]) -> None:
    validate(body, "CreateChatCompletionRequest")
    reply = chat(gateway, body)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    payload = reply.json()
    validate(payload, "CreateChatCompletionResponse")
    expected = complete(body)
    assert [c["message"]["content"] for c in payload["choices"]] == list(expected.texts)
    assert [c["finish_reason"] for c in payload["choices"]] == list(expected.finish_reasons)
    assert payload["usage"]["completion_tokens"] == expected.usage.completion_tokens


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("n", [1, 2])
def test_stream_chunks_validate(gateway: Any, include_usage: bool, n: int) -> None:
    body = body_for("Write about autumn leaves.", n=n, max_tokens=20, stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    validate(body, "CreateChatCompletionRequest")
    reply = chat(gateway, body)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    chunks = validate_stream(reply.body.decode())
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    if include_usage:
        assert all(chunk["usage"] is None for chunk in chunks[:-1])
        assert chunks[-1]["choices"] == []
        usage = chunks[-1]["usage"]
        chunks = chunks[:-1]
    else:
        assert all("usage" not in chunk for chunk in chunks)
    expected = complete({**body, "stream": False, "stream_options": None})
    for index in range(n):
        mine = [chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] == expected.finish_reasons[index]
        assert all(choice["finish_reason"] is None for choice in mine[:-1])
        assert "".join(c["delta"].get("content") or "" for c in mine) == expected.texts[index]
    if include_usage:
        assert usage["completion_tokens"] == expected.usage.completion_tokens


def test_models_validate(gateway: Any) -> None:
    reply = call(gateway, "/v1/models")
    assert reply.status == 200
    payload = reply.json()
    validate(payload, "ListModelsResponse")
    assert [model["id"] for model in payload["data"]] == list(MODELS)
    one = call(gateway, "/v1/models/gpt-4o-mini")
    validate(one.json(), "Model")
    missing = call(gateway, "/v1/models/gpt-2")
    assert missing.status == 404
    assert error_of(missing)["code"] == "model_not_found"


def test_schema_helper_teaches_nullable() -> None:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
        "usage": None,
    }
    validate(chunk, "CreateChatCompletionStreamResponse")  # null finish_reason and usage
    chunk["choices"][0]["finish_reason"] = "bored"
    with pytest.raises(jsonschema.ValidationError):
        validate(chunk, "CreateChatCompletionStreamResponse")
    with pytest.raises(jsonschema.ValidationError):
        validate({"object": "chat.completion", "choices": []}, "CreateChatCompletionResponse")
    with pytest.raises(jsonschema.ValidationError):
        validate(body_for(temperature=3), "CreateChatCompletionRequest")
    validate(body_for(stop=None, max_tokens=None), "CreateChatCompletionRequest")


def test_schema_helper_fails_without_the_file(monkeypatch: Any, tmp_path: Any) -> None:
    monkeypatch.setattr(openapi_schema, "SCHEMA_DIR", tmp_path)
    openapi_schema._document.cache_clear()
    openapi_schema._validator.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="tests/data/README.md"):
            validate({}, "ErrorResponse")
    finally:
        openapi_schema._document.cache_clear()
        openapi_schema._validator.cache_clear()


# -- 400, 401, 404 ------------------------------------------------------------------------------

BAD_BODIES = [
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
    ({"model": 4, "messages": [{"role": "user", "content": "x"}]}, "model", "invalid_type"),
    ({"model": "gpt-4o"}, "messages", "missing_required_parameter"),
    ({"model": "gpt-4o", "messages": []}, "messages", "empty_array"),
    ({"model": "gpt-4o", "messages": "hello"}, "messages", "invalid_type"),
    ({"model": "gpt-4o", "messages": ["hello"]}, "messages[0]", "invalid_type"),
    (
        {"model": "gpt-4o", "messages": [{"role": "robot", "content": "x"}]},
        "messages[0].role",
        "invalid_value",
    ),
    ({"model": "gpt-4o", "messages": [{"content": "x"}]}, "messages[0].role", None),
    (
        {"model": "gpt-4o", "messages": [{"role": "system", "content": "a"}, {"role": "user"}]},
        "messages[1].content",
        "missing_required_parameter",
    ),
    (
        {"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        "invalid_type",
    ),
    (body_for(temperature=2.5), "temperature", "decimal_above_max_value"),
    (body_for(temperature=-0.1), "temperature", "decimal_below_min_value"),
    (body_for(temperature="hot"), "temperature", "invalid_type"),
    (body_for(top_p=1.5), "top_p", "decimal_above_max_value"),
    (body_for(presence_penalty=-3), "presence_penalty", "decimal_below_min_value"),
    (body_for(n=0), "n", "integer_below_min_value"),
    (body_for(n=1.5), "n", "invalid_type"),
    (body_for(n=129), "n", "integer_above_max_value"),
    (body_for(max_tokens=0), "max_tokens", "integer_below_min_value"),
    (body_for(max_completion_tokens=-1), "max_completion_tokens", "integer_below_min_value"),
    (body_for(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length"),
    (body_for(stop=3), "stop", "invalid_type"),
    (body_for(stream="yes"), "stream", "invalid_type"),
    (body_for(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_BODIES)
def test_invalid_requests_get_400_naming_the_param(
    gateway: Any, body: dict[str, Any], param: str, code: str | None
) -> None:
    reply = chat(gateway, body)
    assert reply.status == 400
    error = error_of(reply)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]
    assert gateway.stats.by_status == {400: 1}


def test_body_that_is_not_json_gets_400(gateway: Any) -> None:
    reply = chat(gateway, None, raw=b"{not json")
    assert reply.status == 400
    assert "JSON" in error_of(reply)["message"]
    assert chat(gateway, [1, 2]).status == 400


@pytest.mark.parametrize("temperature", [0, 2, 1.3])
def test_temperature_bounds_are_inclusive(gateway: Any, temperature: float) -> None:
    assert chat(gateway, body_for(temperature=temperature)).status == 200


def test_unknown_model_gets_404_model_not_found(gateway: Any) -> None:
    reply = chat(gateway, body_for(model="gpt-9"))
    assert reply.status == 404
    error = error_of(reply)
    assert error["code"] == "model_not_found"
    assert "gpt-9" in error["message"]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer ", "Bearer sk-abc123", "Bearer sk-ru-", "Basic c2stcnUtMTIz", "sk-ru-123"],
)
def test_bad_or_missing_key_gets_401(gateway: Any, authorization: str | None) -> None:
    reply = chat(gateway, body_for(), key=None, authorization=authorization)
    assert reply.status == 401
    error = error_of(reply)
    assert error["type"] == "invalid_request_error"
    assert "sk-abc123" not in error["message"]  # a key is never echoed
    assert call(gateway, "/v1/models", key=None, authorization=authorization).status == 401


def test_key_option_accepts_only_the_given_keys(start_gateway: Any) -> None:
    gateway = start_gateway(keys=("team-key-1", "sk-ru-alpha"))
    assert chat(gateway, body_for(), key="team-key-1").status == 200
    assert chat(gateway, body_for(), key="sk-ru-alpha").status == 200
    refused = chat(gateway, body_for(), key="sk-ru-beta")
    assert refused.status == 401
    assert error_of(refused)["code"] == "invalid_api_key"


def test_unknown_url_gets_a_json_404(gateway: Any) -> None:
    reply = call(gateway, "/v1/completions", body_for())
    assert reply.status == 404
    assert "Invalid URL" in error_of(reply)["message"]


# -- deterministic answers, usage and the tokenizer rule ---------------------------------------


def test_token_rule() -> None:
    assert count_tokens("") == 0
    assert count_tokens("   \n\t") == 0
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("abcdef") == 1
    assert count_tokens("abcdefg") == 2
    assert count_tokens("internationalization") == 4
    assert count_tokens("3.14") == 3
    assert count_tokens("Привет, мир") == 3
    assert count_prompt_tokens([{"role": "user", "content": "Hello, world!"}]) == 4 + 4 + 3
    assert count_prompt_tokens([{"role": "user", "content": "Hi", "name": "ana"}]) == 4 + 1 + 2 + 3
    parts = [{"type": "text", "text": "Hello"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert count_prompt_tokens([{"role": "user", "content": parts}]) == 4 + 1 + 3


def test_same_request_same_answer_and_choices_differ(gateway: Any) -> None:
    first = chat(gateway, body_for(n=4)).json()
    again = chat(gateway, body_for(n=4)).json()
    assert first["id"] != again["id"]
    assert first["choices"] == again["choices"]
    texts = [choice["message"]["content"] for choice in first["choices"]]
    assert len(set(texts)) == 4
    single = chat(gateway, body_for()).json()
    assert single["choices"][0]["message"]["content"] == texts[0]
    assert complete(body_for(temperature=0.2)).texts != complete(body_for()).texts
    assert complete(body_for(seed=1)).texts != complete(body_for(seed=2)).texts
    assert complete(body_for(model="gpt-4o")).texts != complete(body_for()).texts


def test_answer_lengths_vary_with_the_prompt() -> None:
    short = [complete(body_for(f"Question {i}: what is {i} times 7?")) for i in range(300)]
    lengths = [c.usage.completion_tokens for c in short]
    assert min(lengths) >= 10 and max(lengths) <= 160
    assert len(set(lengths)) > 50
    assert 30 <= statistics.mean(lengths) <= 60
    long_prompt = "Summarise this report. " + "The quarterly figures rose again. " * 100
    long = [
        complete(body_for(f"{long_prompt} Part {i}.")).usage.completion_tokens for i in range(100)
    ]
    assert statistics.mean(long) > statistics.mean(lengths) + 15
    for c in short[:50]:
        assert c.usage.completion_tokens == count_tokens(c.texts[0])
        assert c.texts[0].endswith(".") and c.texts[0][0].isupper()
    # the prompt's words find their way into the answer
    answers = [complete(body_for(f"Tell me about volcanoes {i}")).texts[0] for i in range(5)]
    assert any("volcanoes" in text for text in answers)


def test_usage_agrees_with_the_text(gateway: Any) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "List the planets, please."},
        ],
        "n": 2,
    }
    payload = chat(gateway, body).json()
    usage = payload["usage"]
    texts = [choice["message"]["content"] for choice in payload["choices"]]
    assert usage["completion_tokens"] == sum(count_tokens(text) for text in texts)
    assert usage["prompt_tokens"] == count_prompt_tokens(body["messages"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_cuts_with_length() -> None:
    natural = complete(body_for()).texts[0]
    total = count_tokens(natural)
    cut = complete(body_for(max_tokens=total - 3))
    assert cut.finish_reasons == ("length",)
    assert cut.usage.completion_tokens == total - 3
    assert natural.startswith(cut.texts[0])
    roomy = complete(body_for(max_tokens=total))
    assert roomy.finish_reasons == ("stop",) and roomy.texts[0] == natural


def test_stop_sequences_end_with_stop() -> None:
    natural = complete(body_for()).texts[0]
    word = natural.split()[4]
    stopped = complete(body_for(stop=[word, "zzz-not-there"]))
    assert stopped.finish_reasons == ("stop",)
    assert stopped.texts[0] == natural[: natural.index(word)]
    assert word not in stopped.texts[0]
    assert stopped.usage.completion_tokens == count_tokens(stopped.texts[0])
    # a stop sequence beyond max_tokens: the length comes first
    last = natural.split()[-1]
    assert complete(body_for(stop=last, max_tokens=3)).finish_reasons == ("length",)
    assert complete(body_for(stop="zzz")).texts[0] == natural


# -- prompt caching -----------------------------------------------------------------------------


def _cached(reply: Reply) -> int:
    return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_repeated_prompt_prefix_reports_cached_tokens(start_gateway: Any) -> None:
    gateway = start_gateway(cache_min_tokens=32, cache_step_tokens=8)
    shared = "alpha beta gamma delta " * 12  # 48 tokens
    first = body_for(shared + "first question here")
    prompt = complete(first).usage.prompt_tokens
    assert chat(gateway, first).status == 200
    assert _cached(chat(gateway, first)) == 32 + (prompt - 32) // 8 * 8  # 128-step rule, scaled
    # a new ending after the shared prefix: the whole steps inside the shared part are cached
    other = body_for(shared + "an entirely different ending of the prompt")
    framing = 3  # start, role, separator; then the 48 shared tokens
    assert _cached(chat(gateway, other)) == 32 + (framing + 48 - 32) // 8 * 8
    short = body_for("just a short prompt")
    chat(gateway, short)
    assert _cached(chat(gateway, short)) == 0  # under the threshold
    assert _cached(chat(gateway, {**first, "model": "gpt-4o"})) == 0  # the cache is per model


def test_default_cache_rule_is_1024_tokens_in_steps_of_128(gateway: Any) -> None:
    body = body_for("cache me please " * 400 + f"{time.time()}")  # ~1208 tokens, unique
    prompt = complete(body).usage.prompt_tokens
    assert 1152 < prompt < 1280
    assert _cached(chat(gateway, body)) == 0
    assert _cached(chat(gateway, body)) == 1152


def test_prompt_cache_remembers_the_latest_prefixes() -> None:
    cache = PromptCache(min_tokens=8, step_tokens=4, capacity=3)
    messages = [{"role": "user", "content": "one two three four five six seven eight nine"}]
    prefixes = cache.prefix_digests("gpt-4o", messages)
    assert [length for length, _ in prefixes] == [8, 12, 16]
    assert cache.lookup(prefixes) == 0
    cache.store(prefixes)
    assert cache.lookup(prefixes) == 16
    cache.store(cache.prefix_digests("gpt-4o", [{"role": "user", "content": "x " * 20}]))
    assert cache.lookup(prefixes) == 0  # pushed out by capacity


# -- faults --------------------------------------------------------------------------------------


def test_latency_delays_answers(start_gateway: Any) -> None:
    gateway = start_gateway(latency_ms=150)
    started = time.monotonic()
    assert chat(gateway, body_for()).status == 200
    assert time.monotonic() - started >= 0.14


def test_jitter_spreads_latency_around_the_mean() -> None:
    plan = FaultPlan(GatewayConfig(latency_ms=100, jitter_ms=40, fault_seed=1))
    delays = [plan.draw().delay_s for _ in range(500)]
    assert 0.06 <= min(delays) < 0.07 and 0.13 < max(delays) <= 0.14
    assert abs(statistics.mean(delays) - 0.1) < 0.005
    floor = FaultPlan(GatewayConfig(latency_ms=10, jitter_ms=50, fault_seed=1))
    assert min(floor.draw().delay_s for _ in range(200)) == 0.0


def test_error_rate_answers_500_and_503(start_gateway: Any) -> None:
    gateway = start_gateway(error_rate=1.0, fault_seed=3)
    replies = [chat(gateway, body_for()) for _ in range(12)]
    assert {reply.status for reply in replies} == {500, 503}
    for reply in replies:
        assert error_of(reply)["type"] == "server_error"
    assert gateway.stats.requests == 12
    assert sum(gateway.stats.by_status.values()) == 12


def _statuses(gateway: Any, count: int) -> list[int]:
    return [chat(gateway, body_for(f"row {i}")).status for i in range(count)]


def test_fault_seed_reproduces_the_faults(start_gateway: Any) -> None:
    first = _statuses(start_gateway(error_rate=0.4, fault_seed=11), 30)
    again = _statuses(start_gateway(error_rate=0.4, fault_seed=11), 30)
    other = _statuses(start_gateway(error_rate=0.4, fault_seed=12), 30)
    assert first == again
    assert first != other
    assert 3 <= sum(status != 200 for status in first) <= 20


def test_rpm_limit_answers_429_with_retry_after(start_gateway: Any) -> None:
    gateway = start_gateway(rpm=3)
    replies = [chat(gateway, body_for()) for _ in range(4)]
    assert [reply.status for reply in replies] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["2", "1", "0", "0"]
    for reply in replies:
        assert reply.headers["x-ratelimit-limit-requests"] == "3"
        reset = reply.headers["x-ratelimit-reset-requests"]
        assert re.fullmatch(r"\d+(\.\d+)?(ms|s)|\d+m\d+(\.\d+)?s", reset)
        assert "x-ratelimit-limit-tokens" not in reply.headers
    limited = replies[-1]
    assert 55 <= int(limited.headers["Retry-After"]) <= 60
    error = error_of(limited)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert gateway.stats.by_status == {200: 3, 429: 1}
    assert call(gateway, "/v1/models").status == 200  # only chat completions are limited


def test_tpm_limit_answers_429_with_token_headers(start_gateway: Any) -> None:
    tokens = complete(body_for()).usage.total_tokens
    gateway = start_gateway(tpm=2 * tokens + 1)
    replies = [chat(gateway, body_for()) for _ in range(3)]
    assert [reply.status for reply in replies] == [200, 200, 429]
    remaining = [reply.headers["x-ratelimit-remaining-tokens"] for reply in replies]
    assert remaining == [str(tokens + 1), "1", "1"]
    assert replies[0].headers["x-ratelimit-limit-tokens"] == str(2 * tokens + 1)
    assert int(replies[-1].headers["Retry-After"]) >= 1
    assert error_of(replies[-1])["type"] == "tokens"


def test_no_rate_limit_headers_without_limits(gateway: Any) -> None:
    reply = chat(gateway, body_for())
    assert not [name for name in reply.headers if name.lower().startswith("x-ratelimit")]


def test_rate_limiter_window_slides() -> None:
    now = [1000.0]
    limiter = RateLimiter(rpm=2, tpm=100, clock=lambda: now[0])
    assert limiter.acquire(10) is None
    now[0] += 20
    assert limiter.acquire(10) is None
    assert limiter.acquire(10) == ("requests", pytest.approx(40.0))  # Retry-After: next free
    assert limiter.headers()["x-ratelimit-reset-requests"] == "1m0s"  # reset: window empty
    now[0] += 40
    assert limiter.acquire(85) is None  # the first request left the window
    assert limiter.acquire(1) == ("requests", pytest.approx(20.0))
    now[0] += 20  # the second request left too: 85 tokens in the window
    assert limiter.acquire(20) == ("tokens", pytest.approx(40.0))  # 85 + 20 > 100
    assert limiter.acquire(10) is None
    assert limiter.headers()["x-ratelimit-remaining-tokens"] == "5"
    assert limiter.headers()["x-ratelimit-remaining-requests"] == "0"
    assert RateLimiter(rpm=None, tpm=100).acquire(101) == ("tokens", 60.0)  # above the limit


def test_duration_format_is_openai_like() -> None:
    assert format_duration(0) == "0ms"
    assert format_duration(0.12) == "120ms"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(59.9991) == "60s"
    assert format_duration(60) == "1m0s"
    assert format_duration(90.25) == "1m30.25s"


async def _post(url: str, body: dict[str, Any], *, lines: list[bytes] | None = None) -> int:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            if lines is None:
                await response.read()
            else:
                async for line in response.content:
                    lines.append(line)
            return response.status


def test_drop_cuts_a_json_answer_midway(start_gateway: Any) -> None:
    gateway = start_gateway(drop_rate=1.0, fault_seed=5)
    with pytest.raises(aiohttp.ClientPayloadError):
        asyncio.run(_post(gateway.url, body_for()))
    with pytest.raises(openai.APIConnectionError):
        with openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as sdk:
            sdk.chat.completions.create(**body_for())
    assert gateway.stats.dropped == 2
    assert gateway.stats.by_status == {}
    assert gateway.stats.requests == 2


def test_drop_cuts_a_stream_midway(start_gateway: Any) -> None:
    gateway = start_gateway(drop_rate=1.0, fault_seed=5)
    lines: list[bytes] = []
    body = body_for(stream=True, stream_options={"include_usage": True})
    with pytest.raises(aiohttp.ClientPayloadError):
        asyncio.run(_post(gateway.url, body, lines=lines))
    events = [line for line in lines if line.startswith(b"data: ")]
    assert events, "some chunks arrive before the drop"
    assert b"data: [DONE]\n" not in lines
    for event in events:
        validate(json.loads(event[6:]), "CreateChatCompletionStreamResponse")
    assert gateway.stats.dropped == 1


def test_drop_rate_is_a_fraction_and_reproducible(start_gateway: Any) -> None:
    def outcomes(gateway: Any) -> list[str]:
        async def run() -> list[str]:
            results = []
            for i in range(20):
                try:
                    await _post(gateway.url, body_for(f"row {i}", stream=i % 2 == 0))
                    results.append("ok")
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                    results.append("dropped")
            return results

        return asyncio.run(run())

    first = outcomes(start_gateway(drop_rate=0.5, fault_seed=21))
    assert first == outcomes(start_gateway(drop_rate=0.5, fault_seed=21))
    assert 3 <= first.count("dropped") <= 17


# -- stats, in-process and blocking use ---------------------------------------------------------


def test_stats_count_requests_statuses_and_concurrency(start_gateway: Any) -> None:
    gateway = start_gateway(latency_ms=300)

    async def burst() -> list[int]:
        return await asyncio.gather(*(_post(gateway.url, body_for(f"q{i}")) for i in range(5)))

    assert asyncio.run(burst()) == [200] * 5
    chat(gateway, body_for(model="nope"))
    stats = call(gateway, "/_simulator/stats", key=None).json()
    by_key = stats.pop("by_key")
    assert list(by_key.values()) == [6]  # one key, named by a digest
    assert all("sk-" not in label for label in by_key)
    assert stats == {
        "requests": 6,
        "in_flight": 0,
        "max_in_flight": 5,
        "dropped": 0,
        "invalid_json": 0,
        "by_status": {"200": 5, "404": 1},
        "files_created": 0,
        "batches_created": 0,
    }
    assert gateway.stats.max_in_flight == 5
    zeroed = call(gateway, "/_simulator/reset", key=None, method="POST").json()
    assert zeroed["requests"] == 0 and zeroed["by_status"] == {}
    assert gateway.stats.requests == 0


def test_gateway_fixture_starts_each_test_with_zeroed_stats(gateway: Any) -> None:
    assert gateway.stats.requests == 0
    chat(gateway, body_for())
    assert gateway.stats.requests == 1 and gateway.stats.by_status == {200: 1}


def test_config_checks_its_values() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        GatewayConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="rpm"):
        GatewayConfig(rpm=0)
    assert GatewayConfig(keys="sk-ru-one").keys == ("sk-ru-one",)  # type: ignore[arg-type]
    assert GatewayConfig(keys=["a", "b"]).keys == ("a", "b")  # type: ignore[arg-type]


SERVE = (
    "from batchrunner.simulator import GatewayConfig, serve; "
    "serve(GatewayConfig(port=0, keys=('k-1',)))"
)


def test_serve_prints_its_url_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.fullmatch(r"gateway listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert match, line
        with openai.OpenAI(base_url=match.group(1), api_key="k-1", max_retries=0) as sdk:
            assert len(sdk.models.list().data) == len(MODELS)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr
        assert stdout == "" and stderr == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# -- the gateway command: bad options and addresses are usage errors ---------------------------


def _gateway_command(*args: str) -> subprocess.CompletedProcess[str]:
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "batchrunner", "gateway", *args],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(repo)})


@pytest.mark.parametrize(("args", "named"), [
    (["--error-rate", "2"], "--error-rate"),
    (["--drop-rate", "1.5"], "--drop-rate"),
    (["--invalid-json-rate", "-0.1"], "--invalid-json-rate"),
    (["--latency-ms", "-5"], "--latency-ms"),
    (["--jitter-ms", "-1"], "--jitter-ms"),
    (["--port", "-1"], "--port"),
    (["--port", "99999"], "--port"),  # not 99999 - 65536 = 34463
    (["--rpm", "0"], "--rpm"),
    (["--rate-window", "0"], "--rate-window"),
    (["--prompt-cache-ttl", "-1"], "--prompt-cache-ttl"),
])
def test_gateway_options_out_of_range_are_usage_errors(args: list[str], named: str) -> None:
    done = _gateway_command(*args)
    assert done.returncode == 2, done.stderr
    assert f"Invalid value for '{named}'" in done.stderr and "internal error" not in done.stderr


def test_gateway_config_refuses_a_port_out_of_range() -> None:
    with pytest.raises(ValueError, match="port must be between 0 and 65535"):
        GatewayConfig(port=99999)


def test_a_port_in_use_or_an_address_not_here_is_one_line_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _gateway_command("--port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"batchrunner: error: the gateway cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    done = _gateway_command("--host", "203.0.113.7", "--port", "0")  # TEST-NET: not this machine
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("batchrunner: error: the gateway cannot listen on 203.0.113.7:0: ")
    assert len(done.stderr.splitlines()) == 1
