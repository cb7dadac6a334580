"""The client's parsing and error classification, with answers a real server rarely gives.

aioresponses serves what the gateway simulator cannot easily produce: bodies cut short, bodies
that are not JSON, streams that end early; the simulator covers the rest in test_engine.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses

import aioresponses_compat  # noqa: F401  (aiohttp 3.14 support)

from batchrunner.client import Client, parse_retry_after
from batchrunner.errors import (
    AttemptTimeout,
    AuthRefused,
    ConnectionFailed,
    InvalidResponse,
    PermanentError,
    RateLimited,
    ServerError,
)

BASE = "http://gateway.test/v1"
URL = BASE + "/chat/completions"
KEY = "sk-ru-client-test-0123456789abcdef"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def completion(content: str = "hello", **extra: Any) -> dict[str, Any]:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }
    payload.update(extra)
    return payload


def send(mock_setup, body: dict[str, Any] = BODY, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        with aioresponses() as mocked:
            mock_setup(mocked)
            async with Client(BASE, KEY, concurrency=2, timeout=timeout) as client:
                return await client.complete(body)

    return asyncio.run(go())


def test_parses_a_completion_with_usage_and_cached_tokens() -> None:
    payload = completion()
    payload["usage"]["prompt_tokens_details"]["cached_tokens"] = 3
    answer = send(lambda m: m.post(URL, payload=payload))
    assert answer.content == "hello"
    assert answer.choices == ("hello",)
    assert answer.finish_reason == "stop"
    assert answer.response_model == "gpt-4o-2024-08-06"
    assert answer.response_id == "chatcmpl-1"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 2)
    assert answer.usage.total_tokens == 7 and answer.usage.cached_tokens == 3
    assert answer.http_status == 200 and answer.ttft_ms is None


def test_n_choices_are_kept_in_index_order() -> None:
    payload = completion()
    payload["choices"] = [
        {"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "length"},
        {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"},
    ]
    answer = send(lambda m: m.post(URL, payload=payload))
    assert answer.choices == ("a", "b")
    assert answer.finish_reason == "stop"


@pytest.mark.parametrize(
    "body",
    [b'{"id": "x", "choices": [{"index": 0, "mess', b"<html>bad gateway</html>", b"", b"[]",
     b'{"id": "x"}', b'{"choices": [{"index": 0}]}'],
    ids=["cut-short", "html", "empty", "a-list", "no-choices", "no-message"],
)
def test_a_body_that_is_not_a_valid_completion_is_retryable(body: bytes) -> None:
    with pytest.raises(InvalidResponse):
        send(lambda m: m.post(URL, body=body, content_type="application/json"))


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(500, ServerError), (502, ServerError), (503, ServerError), (408, ServerError),
     (409, ServerError), (429, RateLimited), (400, PermanentError), (404, PermanentError),
     (422, PermanentError), (401, AuthRefused), (403, AuthRefused)],
)
def test_status_codes_are_classified_by_type(status: int, error_class: type) -> None:
    error = {"error": {"message": f"the gateway says {status}", "type": "x", "code": None}}
    with pytest.raises(error_class) as caught:
        send(lambda m: m.post(URL, status=status, payload=error))
    assert caught.value.http_status == status
    assert f"the gateway says {status}" in str(caught.value)


def test_429_carries_retry_after_in_seconds() -> None:
    with pytest.raises(RateLimited) as caught:
        send(lambda m: m.post(URL, status=429, headers={"Retry-After": "7"}, payload={}))
    assert caught.value.retry_after == 7.0


def test_429_without_retry_after_has_none() -> None:
    with pytest.raises(RateLimited) as caught:
        send(lambda m: m.post(URL, status=429, payload={"error": {"message": "slow down"}}))
    assert caught.value.retry_after is None


def test_retry_after_as_http_date_and_in_milliseconds() -> None:
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"},
                             now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_connection_errors_and_timeouts_are_retryable_classes() -> None:
    with pytest.raises(ConnectionFailed):
        send(lambda m: m.post(URL, exception=aiohttp.ClientConnectionError("reset by peer")))
    with pytest.raises(ConnectionFailed):
        send(lambda m: m.post(URL, exception=aiohttp.ServerDisconnectedError()))
    with pytest.raises(AttemptTimeout):
        send(lambda m: m.post(URL, exception=asyncio.TimeoutError()))


def sse(*events: Any) -> bytes:
    lines = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        lines.append(f"data: {data}\n\n")
    return "".join(lines).encode()


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o", "choices": [{"index": index, "delta": delta,
                                            "finish_reason": finish}]}


STREAM_BODY = {**BODY, "stream": True, "stream_options": {"include_usage": True}}


def test_a_stream_is_assembled_with_usage_and_ttft() -> None:
    usage = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
             "model": "gpt-4o", "choices": [],
             "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}
    body = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
               chunk({"content": "lo"}), chunk({}, "stop"), usage, "[DONE]")
    answer = send(lambda m: m.post(URL, body=body, content_type="text/event-stream"),
                  body=STREAM_BODY)
    assert answer.content == "Hello"
    assert answer.finish_reason == "stop"
    assert answer.usage.total_tokens == 7
    assert answer.ttft_ms is not None and answer.ttft_ms >= 0
    assert answer.response_id == "chatcmpl-s"


def test_a_stream_cut_before_done_is_an_invalid_response() -> None:
    body = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}))
    with pytest.raises(InvalidResponse, match="DONE"):
        send(lambda m: m.post(URL, body=body, content_type="text/event-stream"),
             body=STREAM_BODY)


def test_a_stream_reset_mid_way_is_a_connection_failure() -> None:
    async def go() -> None:
        with aioresponses() as mocked:
            mocked.post(URL, exception=aiohttp.ClientPayloadError("Response payload is not completed"))
            async with Client(BASE, KEY, concurrency=1) as client:
                await client.complete(STREAM_BODY)

    with pytest.raises(ConnectionFailed):
        asyncio.run(go())


def test_a_stream_event_that_is_not_json_is_invalid() -> None:
    body = sse(chunk({"role": "assistant"}), "{not json", "[DONE]")
    with pytest.raises(InvalidResponse):
        send(lambda m: m.post(URL, body=body, content_type="text/event-stream"),
             body=STREAM_BODY)


def test_the_key_is_sent_as_a_bearer_header_and_never_shown() -> None:
    seen: dict[str, Any] = {}

    def capture(url: Any, **kwargs: Any) -> None:
        seen.update(kwargs)

    async def go() -> str:
        with aioresponses() as mocked:
            mocked.post(URL, payload=completion(), callback=capture)
            async with Client(BASE, KEY, concurrency=1) as client:
                await client.complete(BODY)
                return repr(client) + repr(client.__dict__)

    shown = asyncio.run(go())
    assert seen["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in shown
