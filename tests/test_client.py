"""The client's HTTP, parsing and error classification, against a loopback server.

`scripted_server` answers with whatever bytes a test writes: bodies cut short, bodies that are
not JSON, streams that end early or are reset, stale keep-alive connections. The gateway
simulator covers the API itself in test_engine.py and test_gateway.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from scripted_server import Reply, Request, scripted_server

from batchrunner.errors import (
    AttemptTimeout,
    AuthRefused,
    ConnectionFailed,
    GatewayUnreachable,
    InvalidResponse,
    PermanentError,
    RateLimited,
    ServerError,
)
from batchrunner.transport.client import Client, parse_retry_after

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


def send(reply: Reply | Callable[[Request], Reply], body: dict[str, Any] = BODY,
         timeout: float = 5.0) -> Any:
    """One request through a Client to a server that answers `reply`."""
    handler = reply if callable(reply) else (lambda request: reply)
    with scripted_server(handler) as server:
        async def go() -> Any:
            async with Client(server.base_url, KEY, concurrency=2, timeout=timeout) as client:
                return await client.complete(body)

        return asyncio.run(go())


def test_parses_a_completion_with_usage_and_cached_tokens() -> None:
    payload = completion()
    payload["usage"]["prompt_tokens_details"]["cached_tokens"] = 3
    answer = send(Reply(json=payload))
    assert answer.content == "hello"
    assert answer.choices == ("hello",)
    assert answer.finish_reason == "stop"
    assert answer.response_model == "gpt-4o-2024-08-06"
    assert answer.response_id == "chatcmpl-1"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 2)
    assert answer.usage.total_tokens == 7 and answer.usage.cached_tokens == 3
    assert answer.http_status == 200 and answer.ttft_ms is None


def test_the_request_is_json_posted_to_the_base_urls_path_with_the_key() -> None:
    with scripted_server(lambda request: Reply(json=completion())) as server:
        base = server.base_url.replace("/v1", "/ru llm/v1")

        async def go() -> str:
            async with Client(base + "/", KEY, concurrency=1) as client:
                await client.complete(BODY)
                return repr(client) + repr(client.__dict__)

        shown = asyncio.run(go())
    request = server.requests[0]
    assert (request.method, request.path) == ("POST", "/ru%20llm/v1/chat/completions")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == base.split("/")[2]
    assert request.json() == BODY
    assert KEY not in shown


def test_a_body_orjson_refuses_is_still_sent_exactly() -> None:
    body = {**BODY, "seed": 2**70, "logit_bias": {50256: -100}, "user": "Ünïcode ✓"}
    with scripted_server(lambda request: Reply(json=completion())) as server:
        async def go() -> None:
            async with Client(server.base_url, KEY, concurrency=1) as client:
                await client.complete(body)

        asyncio.run(go())
    assert server.requests[0].json() == {**body, "logit_bias": {"50256": -100}}
    assert "Ünïcode ✓".encode() in server.requests[0].body  # UTF-8, not \\u escapes


def test_n_choices_are_kept_in_index_order() -> None:
    payload = completion()
    payload["choices"] = [
        {"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "length"},
        {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"},
    ]
    answer = send(Reply(json=payload))
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
        send(Reply(body=body))


def test_chunked_and_gzip_bodies_are_decoded() -> None:
    payload = json.dumps(completion("zipped")).encode()
    answer = send(Reply(chunks=[payload[:40], payload[40:]]))
    assert answer.content == "zipped"
    answer = send(Reply(body=gzip.compress(payload), headers={"Content-Encoding": "gzip"}))
    assert answer.content == "zipped"


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(500, ServerError), (502, ServerError), (503, ServerError), (408, ServerError),
     (409, ServerError), (429, RateLimited), (400, PermanentError), (404, PermanentError),
     (422, PermanentError), (401, AuthRefused), (403, AuthRefused)],
)
def test_status_codes_are_classified_by_type(status: int, error_class: type) -> None:
    error = {"error": {"message": f"the gateway says {status}", "type": "x", "code": None}}
    with pytest.raises(error_class) as caught:
        send(Reply(status=status, json=error))
    assert caught.value.http_status == status
    assert f"the gateway says {status}" in str(caught.value)


def test_429_carries_retry_after_and_the_rate_limit_headers() -> None:
    headers = {"Retry-After": "7", "X-RateLimit-Remaining-Requests": "0"}
    with pytest.raises(RateLimited) as caught:
        send(Reply(status=429, json={}, headers=headers))
    assert caught.value.retry_after == 7.0
    assert caught.value.rate_headers == {"x-ratelimit-remaining-requests": "0"}


def test_429_without_retry_after_has_none() -> None:
    with pytest.raises(RateLimited) as caught:
        send(Reply(status=429, json={"error": {"message": "slow down"}}))
    assert caught.value.retry_after is None


def test_retry_after_as_http_date_and_in_milliseconds() -> None:
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"},
                             now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_a_refused_connection_is_a_connection_failure() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nobody listens once the socket is closed

    async def go() -> None:
        async with Client(f"http://127.0.0.1:{port}/v1", KEY, concurrency=1) as client:
            await client.complete(BODY)

    with pytest.raises(GatewayUnreachable, match="cannot connect") as caught:
        asyncio.run(go())
    assert isinstance(caught.value, ConnectionFailed)  # retried as any connection failure
    assert caught.value.cause == "refused"  # and, on every attempt, an outage (exit 3)


def test_a_connection_closed_before_or_during_the_answer_is_a_connection_failure() -> None:
    with pytest.raises(ConnectionFailed, match="before any answer"):
        send(Reply(raw=b"", close=True))
    with pytest.raises(ConnectionFailed, match="middle of the answer"):
        send(Reply(json=completion(), cut_after=120))


def test_an_answer_that_is_not_http_is_an_invalid_response() -> None:
    with pytest.raises(InvalidResponse, match="not an HTTP answer"):
        send(Reply(raw=b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))


def test_no_answer_within_the_timeout_is_an_attempt_timeout() -> None:
    with pytest.raises(AttemptTimeout, match="0.3 s"):
        send(Reply(json=completion(), delay=1.0), timeout=0.3)


def test_the_timeout_covers_a_body_that_stalls_and_the_next_request_goes_on() -> None:
    payload = json.dumps(completion("late")).encode()
    replies = iter([Reply(chunks=[payload[:30], payload[30:]], pause=1.0), Reply(json=completion())])
    with scripted_server(lambda request: next(replies)) as server:
        async def go() -> str | None:
            async with Client(server.base_url, KEY, concurrency=1, timeout=0.4) as client:
                with pytest.raises(AttemptTimeout, match="0.4 s"):
                    await client.complete(BODY)
                return (await client.complete(BODY)).content

        assert asyncio.run(go()) == "hello"
        assert [r.connection for r in server.requests] == [1, 2]  # the timed-out one is closed


def test_connections_are_kept_alive_and_one_the_server_closed_is_not_reused() -> None:
    def answer(request: Request) -> Reply:
        return Reply(json=completion(request.json()["messages"][0]["content"]))

    with scripted_server(answer) as server:
        async def go() -> list[str | None]:
            contents = []
            async with Client(server.base_url, KEY, concurrency=1) as client:
                for text in ("one", "two", "three"):
                    answer = await client.complete({**BODY, "messages": [
                        {"role": "user", "content": text}]})
                    contents.append(answer.content)
                server.close_idle_connections()  # as servers do after their keep-alive time
                await asyncio.sleep(0.1)
                contents.append((await client.complete(BODY)).content)
            return contents

        assert asyncio.run(go()) == ["one", "two", "three", "hi"]
        assert [r.connection for r in server.requests] == [1, 1, 1, 2]


def test_a_request_written_then_dropped_is_not_resent_behind_the_callers_back() -> None:
    drop = iter([False, True, False])  # the second request: the server closes without answering

    def answer(request: Request) -> Reply:
        return Reply(raw=b"", close=True) if next(drop) else Reply(json=completion())

    with scripted_server(answer) as server:
        async def go() -> None:
            async with Client(server.base_url, KEY, concurrency=1) as client:
                await client.complete(BODY)
                with pytest.raises(ConnectionFailed, match="before any answer"):
                    await client.complete(BODY)  # the retry policy decides, and counts it
                await client.complete(BODY)

        asyncio.run(go())
        assert [r.connection for r in server.requests] == [1, 1, 2]


def test_an_answer_nobody_asked_for_retires_the_connection_and_spoils_nothing() -> None:
    body = json.dumps(completion("first")).encode()
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    timeout = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    replies = iter([Reply(raw=ok + timeout), Reply(json=completion("second"))])
    with scripted_server(lambda request: next(replies)) as server:
        async def go() -> list[str | None]:
            async with Client(server.base_url, KEY, concurrency=1) as client:
                first = await client.complete(BODY)
                second = await client.complete(BODY)
                return [first.content, second.content]

        assert asyncio.run(go()) == ["first", "second"]
        assert [r.connection for r in server.requests] == [1, 2]


def test_an_informational_answer_before_the_answer_is_skipped() -> None:
    body = json.dumps(completion("after hints")).encode()
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-RateLimit-Remaining-Requests: 9\r\n\r\n%s" % (
        len(body), body)
    answer = send(Reply(raw=hints + ok))
    assert answer.content == "after hints"
    assert answer.rate_headers == {"x-ratelimit-remaining-requests": "9"}


def test_a_connection_close_answer_is_not_reused() -> None:
    with scripted_server(lambda request: Reply(json=completion(), close=True)) as server:
        async def go() -> None:
            async with Client(server.base_url, KEY, concurrency=1) as client:
                for _ in range(3):
                    await client.complete(BODY)

        asyncio.run(go())
        assert [r.connection for r in server.requests] == [1, 2, 3]


def test_https_is_verified_against_the_trusted_authorities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)

    async def go(base_url: str) -> str | None:
        async with Client(base_url, KEY, concurrency=1) as client:
            return (await client.complete(BODY)).content

    with scripted_server(lambda request: Reply(json=completion("over tls")),
                         ssl_context=server_context) as server:
        assert server.base_url.startswith("https://")
        with pytest.raises(GatewayUnreachable, match="certificate verify failed") as caught:
            asyncio.run(go(server.base_url))  # an authority nobody trusts yet
        assert caught.value.cause == "tls"
        authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # as docs/gateway.md says
        assert asyncio.run(go(server.base_url)) == "over tls"
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_models_lists_the_data() -> None:
    models = {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}
    with scripted_server(lambda request: Reply(json=models)) as server:
        async def go() -> list[dict[str, Any]]:
            async with Client(server.base_url, KEY, concurrency=1) as client:
                return await client.models()

        assert asyncio.run(go()) == models["data"]
        assert (server.requests[0].method, server.requests[0].path) == ("GET", "/v1/models")


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
SSE = {"Content-Type": "text/event-stream"}


def pieces(data: bytes, size: int = 7) -> list[bytes]:
    """Cut a stream where events do not end, as a network does."""
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_a_stream_is_assembled_with_usage_and_ttft() -> None:
    usage = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
             "model": "gpt-4o", "choices": [],
             "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}
    body = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
               chunk({"content": "lo"}), chunk({}, "stop"), usage, "[DONE]")
    answer = send(Reply(chunks=pieces(body), headers=SSE, pause=0.001), body=STREAM_BODY)
    assert answer.content == "Hello"
    assert answer.finish_reason == "stop"
    assert answer.usage.total_tokens == 7
    assert answer.ttft_ms is not None and 0 <= answer.ttft_ms <= answer.latency_ms
    assert answer.response_id == "chatcmpl-s"


def test_a_stream_cut_before_done_is_an_invalid_response() -> None:
    body = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}))
    with pytest.raises(InvalidResponse, match="DONE"):
        send(Reply(chunks=[body], headers=SSE), body=STREAM_BODY)


def test_a_stream_reset_mid_way_is_a_connection_failure() -> None:
    body = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), "[DONE]")
    with pytest.raises(ConnectionFailed, match="middle of the answer"):
        send(Reply(chunks=pieces(body, 40), headers=SSE, cut_after=100), body=STREAM_BODY)


def test_a_stream_event_that_is_not_json_is_invalid() -> None:
    body = sse(chunk({"role": "assistant"}), "{not json", "[DONE]")
    with pytest.raises(InvalidResponse):
        send(Reply(chunks=[body], headers=SSE), body=STREAM_BODY)


# -- what the old HTTP pool got wrong (issue 14), each on real sockets ------------------------


def test_a_gzip_body_whose_first_bytes_arrive_alone_is_decoded() -> None:
    packed = gzip.compress(json.dumps(completion("zipped, slowly")).encode())
    answer = send(Reply(chunks=[packed[:2], packed[2:10], packed[10:]], pause=0.05,
                        headers={"Content-Encoding": "gzip"}))
    assert answer.content == "zipped, slowly"


def test_a_body_that_ends_with_its_connection_is_not_taken_whole_when_reset() -> None:
    payload = json.dumps(completion("maybe whole")).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"  # no length, no chunks
    assert send(Reply(raw=head + payload, close=True)).content == "maybe whole"  # a clean close
    with pytest.raises(ConnectionFailed, match="reset"):
        send(Reply(raw=head + payload, close=True, reset=True))


def test_a_chunked_body_cut_by_a_reset_is_a_connection_failure() -> None:
    payload = json.dumps(completion()).encode()
    with pytest.raises(ConnectionFailed, match="middle of the answer"):
        send(Reply(chunks=[payload[:40], payload[40:]], cut_after=60, reset=True))


def test_retry_after_inf_is_absent_and_a_day_is_ten_minutes() -> None:
    for value, expected in (("inf", None), ("86400", 600.0), ("nan", None)):
        with pytest.raises(RateLimited) as caught:
            send(Reply(status=429, json={"error": {"message": "slow"}},
                       headers={"Retry-After": value}))
        assert caught.value.retry_after == expected, value


def test_the_base_urls_query_string_is_kept_on_every_request() -> None:
    models = {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}

    def answer(request: Request) -> Reply:
        return Reply(json=models if request.method == "GET" else completion())

    with scripted_server(answer) as server:
        async def go() -> None:
            base = server.base_url + "?api-version=2024-06-01&deployment=eu%20west"
            async with Client(base, KEY, concurrency=1) as client:
                await client.complete(BODY)
                await client.models()

        asyncio.run(go())
    assert [r.path for r in server.requests] == [
        "/v1/chat/completions?api-version=2024-06-01&deployment=eu%20west",
        "/v1/models?api-version=2024-06-01&deployment=eu%20west",
    ]


def test_a_streamed_answer_leaves_its_connection_for_the_next_request() -> None:
    body = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}),
               chunk({}, "stop"), "[DONE]")
    # a pause after each piece: the body's end comes a moment after data: [DONE]
    reply = Reply(chunks=pieces(body, 30), headers=SSE, pause=0.02)
    with scripted_server(lambda request: reply) as server:
        async def go() -> list[str | None]:
            async with Client(server.base_url, KEY, concurrency=1) as client:
                return [(await client.complete(STREAM_BODY)).content for _ in range(3)]

        assert asyncio.run(go()) == ["Hi", "Hi", "Hi"]
    assert [r.connection for r in server.requests] == [1, 1, 1]


def test_a_long_stream_that_keeps_arriving_is_not_cut_at_the_timeout() -> None:
    events = [chunk({"content": f"{i} "}) for i in range(6)]
    body = sse(chunk({"role": "assistant", "content": ""}), *events, chunk({}, "stop"), "[DONE]")
    # 6 gaps of 0.3 s: 1.8 s in all, each gap well inside the 1 s timeout
    parts = [sse(event) for event in events]
    parts = [body[: body.index(parts[0])], *parts, body[body.index(parts[-1]) + len(parts[-1]):]]
    answer = send(Reply(chunks=parts, headers=SSE, pause=0.3), body=STREAM_BODY, timeout=1.0)
    assert answer.content == "0 1 2 3 4 5 "
    assert answer.latency_ms > 1000


def test_a_stream_that_stalls_longer_than_the_timeout_is_an_attempt_timeout() -> None:
    body = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), "[DONE]")
    with pytest.raises(AttemptTimeout, match="sent nothing for 0.4 s"):
        send(Reply(chunks=pieces(body, 60), headers=SSE, pause=1.5), body=STREAM_BODY,
             timeout=0.4)
