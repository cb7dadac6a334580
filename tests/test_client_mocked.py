"""The client against answers a server cannot easily produce, served by aioresponses.

aioresponses replaces aiohttp's `ClientSession._request`, which is what the client calls, so
these tests run the client's own parsing and classification on odd statuses and headers,
bodies that are not JSON, gateways that answer a stream with plain JSON, SSE with CR line
ends and multi-line `data:` fields, and aiohttp's own failures (disconnects, timeouts).
Real sockets (cuts, resets, keep-alive, proxies) are in test_client.py and test_proxy.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq
import pytest
from aioresponses import aioresponses

from batchrunner import RunConfig, run
from batchrunner.errors import (
    AttemptTimeout,
    ConnectionFailed,
    GatewayUnreachable,
    InvalidResponse,
    PermanentError,
    RateLimited,
    ServerError,
)
from batchrunner.transport.client import MAX_RETRY_AFTER, Client, parse_retry_after
from batchrunner.transport.completions import Answer
from batchrunner.transport.sse import EventStream

KEY = "sk-ru-mocked-client-0123456789abcdef"
BASE = "http://gateway.test/v1"
URL = BASE + "/chat/completions"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
STREAM_BODY = {**BODY, "stream": True}


def completion(content: str | None = "hello", **message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-m", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content, **message}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    return json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
                       "model": "gpt-4o",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def call(setup: Callable[[aioresponses], None], body: dict[str, Any] = BODY,
         base_url: str = BASE, timeout: float = 30.0) -> Answer:
    """One Client.complete against what `setup` mocks."""
    async def go() -> Answer:
        with aioresponses() as mocked:
            setup(mocked)
            async with Client(base_url, KEY, concurrency=2, timeout=timeout) as client:
                return await client.complete(body)

    return asyncio.run(go())


# -- statuses and headers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("7", 7.0), ("0", 0.0), ("2.5", 2.5), ("86400", MAX_RETRY_AFTER),
     ("inf", None), ("Infinity", None), ("nan", None), ("-5", None), ("1e3", None),
     ("soon", None), ("", None)],
)
def test_429_retry_after_is_capped_and_an_unparsable_one_is_absent(
    retry_after: str, expected: float | None
) -> None:
    headers = {"Retry-After": retry_after, "X-RateLimit-Remaining-Requests": "0",
               "x-RateLimit-Reset-Tokens": "6m0s", "X-Request-Id": "req-1"}
    with pytest.raises(RateLimited) as caught:
        call(lambda m: m.post(URL, status=429, headers=headers,
                              payload={"error": {"message": "slow down"}}))
    assert caught.value.retry_after == expected
    assert "slow down" in str(caught.value)
    # names lower-cased, only the rate-limit ones: the pacer reads them
    assert caught.value.rate_headers == {"x-ratelimit-remaining-requests": "0",
                                         "x-ratelimit-reset-tokens": "6m0s"}


def test_retry_after_as_an_http_date_is_capped_and_one_in_the_past_is_zero() -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=now) == 10.0
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:00:00 GMT"}, now=now) == 0.0
    assert parse_retry_after({"Retry-After": "Thu, 22 Oct 2015 07:28:00 GMT"},
                             now=now) == MAX_RETRY_AFTER
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "inf", "Retry-After": "3"}) == 3.0


def test_a_503_carries_its_retry_after_and_a_html_body_says_what_it_was() -> None:
    page = "<html>\n<head><title>503 Service Temporarily Unavailable</title></head></html>"
    with pytest.raises(ServerError) as caught:
        call(lambda m: m.post(URL, status=503, body=page, content_type="text/html",
                              headers={"Retry-After": "120"}))
    assert caught.value.retry_after == 120.0 and caught.value.http_status == 503
    message = str(caught.value)
    assert message.startswith("HTTP 503: Service Unavailable (text/html, ")
    assert "<html> <head><title>503 Service" in message  # first bytes, whitespace collapsed


def test_a_redirect_is_not_followed_with_the_key_and_says_where_it_points() -> None:
    with pytest.raises(PermanentError) as caught:
        call(lambda m: m.post(URL, status=301,
                              headers={"Location": "https://gateway.test/v1/chat/completions"}))
    assert caught.value.http_status == 301
    assert "redirected to https://gateway.test/v1/chat/completions" in str(caught.value)


# -- bodies -----------------------------------------------------------------------------------


def test_a_200_carrying_an_error_object_is_that_error_retried_as_a_server_error() -> None:
    error = {"error": {"message": "upstream model overloaded", "type": "server_error"}}
    with pytest.raises(ServerError) as caught:
        call(lambda m: m.post(URL, status=200, payload=error))
    assert caught.value.http_status == 200
    assert "upstream model overloaded" in str(caught.value)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_html_page_says_its_content_type_and_first_bytes(stream: bool) -> None:
    page = "<!DOCTYPE html><html><body>Sign in to the corporate portal</body></html>"
    with pytest.raises(InvalidResponse) as caught:
        call(lambda m: m.post(URL, status=200, body=page, content_type="text/html"),
             body=STREAM_BODY if stream else BODY)
    message = str(caught.value)
    assert "text/html" in message and "<!DOCTYPE html><html><body>Sign in" in message
    assert f"{len(page)} bytes" in message


def test_a_body_of_bytes_that_are_not_utf8_is_described_not_a_traceback() -> None:
    with pytest.raises(InvalidResponse, match="application/octet-stream, 4 bytes"):
        call(lambda m: m.post(URL, body=b"\xff\xfe\x00\x01",
                              content_type="application/octet-stream"))


def test_a_streamed_request_answered_with_plain_json_is_read_as_a_completion() -> None:
    answer = call(lambda m: m.post(URL, payload=completion("not streamed after all")),
                  body=STREAM_BODY)
    assert answer.content == "not streamed after all"
    assert answer.usage.total_tokens == 7 and answer.ttft_ms is None


def test_a_streamed_request_answered_with_a_json_error_is_that_error() -> None:
    error = {"error": {"message": "streaming is not enabled for this key"}}
    with pytest.raises(ServerError, match="streaming is not enabled"):
        call(lambda m: m.post(URL, payload=error), body=STREAM_BODY)


def test_a_refusal_is_kept_and_the_content_is_null() -> None:
    answer = call(lambda m: m.post(URL, payload=completion(None, refusal="I can't help with that.")))
    assert answer.content is None
    assert answer.refusal == "I can't help with that."
    assert call(lambda m: m.post(URL, payload=completion("fine", refusal=None))).refusal is None


def test_a_streamed_refusal_is_put_together() -> None:
    events = [chunk({"role": "assistant", "refusal": ""}), chunk({"refusal": "I can't "}),
              chunk({"refusal": "help with that."}), chunk({}, "stop"), "[DONE]"]
    body = "".join(f"data: {event}\n\n" for event in events)
    answer = call(lambda m: m.post(URL, body=body, content_type="text/event-stream"),
                  body=STREAM_BODY)
    assert answer.refusal == "I can't help with that."
    assert answer.content is None and answer.finish_reason == "stop"


# -- server-sent events -------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["\r", "\r\n", "\n"], ids=["CR", "CRLF", "LF"])
def test_sse_with_any_line_end_and_multi_line_data_fields(end: str) -> None:
    first = json.loads(chunk({"role": "assistant", "content": "Hel"}))
    split = json.dumps(first, indent=1).split("\n")  # one JSON object over several data: lines
    lines = [": keep-alive", "event: message", *(f"data: {part}" for part in split), "",
             "id: 2", f"data:{chunk({'content': 'lo'})}", "", "retry: 100",
             f"data: {chunk({}, 'stop')}", "", "data: [DONE]", ""]
    body = end.join(lines)
    answer = call(lambda m: m.post(URL, body=body, content_type="text/event-stream"),
                  body=STREAM_BODY)
    assert answer.content == "Hello" and answer.finish_reason == "stop"
    assert answer.ttft_ms is not None


def test_sse_events_with_no_blank_line_between_them_and_no_final_newline() -> None:
    body = "\n".join(f"data: {e}" for e in [chunk({"content": "a"}), chunk({"content": "b"}),
                                            chunk({}, "stop"), "[DONE]"])
    answer = call(lambda m: m.post(URL, body=body, content_type="text/event-stream"),
                  body=STREAM_BODY)
    assert answer.content == "ab"


def test_a_stream_with_an_error_event_is_a_server_error() -> None:
    body = f"data: {chunk({'content': 'a'})}\n\ndata: " + json.dumps(
        {"error": {"message": "the model went away"}}) + "\n\n"
    with pytest.raises(ServerError, match="the model went away"):
        call(lambda m: m.post(URL, body=body, content_type="text/event-stream"),
             body=STREAM_BODY)


def test_event_stream_cuts_anywhere_give_the_same_events() -> None:
    body = b": hi\r\ndata: one\r\ndata: two\r\n\r\ndata: three\r\rdata: four\n\ndata: [DONE]"
    whole = EventStream()
    expected = whole.feed(body) + whole.close()
    assert expected == [b"one\ntwo", b"three", b"four", b"[DONE]"]
    for cut in range(1, len(body)):
        for second_cut in (cut, min(len(body), cut + 1), min(len(body), cut + 7)):
            events = EventStream()
            got = events.feed(body[:cut]) + events.feed(body[cut:second_cut])
            got += events.feed(body[second_cut:]) + events.close()
            assert got == expected, (cut, second_cut)


# -- aiohttp's failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exception", "error_class", "words"),
    [
        (aiohttp.ServerDisconnectedError(), ConnectionFailed, "before any answer"),
        (aiohttp.ClientConnectionError("Connection lost"), ConnectionFailed, "Connection lost"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), ConnectionFailed, "reset by peer"),
        (aiohttp.ClientPayloadError("Response payload is not completed"), ConnectionFailed,
         "middle of the answer"),
        (asyncio.TimeoutError(), AttemptTimeout, "no answer within 30 s"),
        (aiohttp.ConnectionTimeoutError(), AttemptTimeout, "no connection to http://gateway.test"),
    ],
    ids=["disconnected", "connection-error", "os-error", "payload", "timeout", "connect-timeout"],
)
def test_aiohttp_failures_become_retryable_errors(
    exception: BaseException, error_class: type, words: str
) -> None:
    with pytest.raises(error_class, match=words) as caught:
        call(lambda m: m.post(URL, exception=exception))
    assert caught.value.http_status is None
    assert KEY not in str(caught.value)


def test_a_host_name_that_does_not_resolve_is_unreachable_and_a_connect_timeout_unsent() -> None:
    """Neither reached the gateway: not counted as sent, nor as a timeout that may be billed."""
    dns = aiohttp.ClientConnectorDNSError(
        aiohttp.client_reqrep.ConnectionKey("gateway.test", 80, False, True, None, None, None),
        OSError(-2, "Name or service not known"),
    )
    with pytest.raises(GatewayUnreachable, match="the host name does not resolve") as caught:
        call(lambda m: m.post(URL, exception=dns))
    assert caught.value.cause == "dns"
    with pytest.raises(AttemptTimeout) as timed_out:
        call(lambda m: m.post(URL, exception=aiohttp.ConnectionTimeoutError()))
    assert timed_out.value.sent is False
    with pytest.raises(AttemptTimeout) as late:
        call(lambda m: m.post(URL, exception=asyncio.TimeoutError()))
    assert late.value.sent is True  # the request went out: the gateway may have billed it


def test_a_read_timeout_in_a_stream_says_how_long_nothing_came() -> None:
    with pytest.raises(AttemptTimeout, match="the stream sent nothing for 2.5 s"):
        call(lambda m: m.post(URL, exception=aiohttp.SocketTimeoutError()), body=STREAM_BODY,
             timeout=2.5)


def test_the_query_string_is_on_every_request() -> None:
    base = BASE + "?api-version=2024-06-01"

    async def go() -> tuple[Answer, list[dict[str, Any]], list[Any]]:
        with aioresponses() as mocked:
            mocked.post(URL + "?api-version=2024-06-01", payload=completion())
            mocked.get(BASE + "/models?api-version=2024-06-01",
                       payload={"object": "list", "data": [{"id": "gpt-4o"}]})
            async with Client(base, KEY, concurrency=1) as client:
                answer = await client.complete(BODY)
                models = await client.models()
            return answer, models, list(mocked.requests)

    answer, models, requests = asyncio.run(go())
    assert answer.content == "hello" and models == [{"id": "gpt-4o"}]
    assert [str(url) for _, url in requests] == [URL + "?api-version=2024-06-01",
                                                BASE + "/models?api-version=2024-06-01"]


# -- the refusal column, end to end ------------------------------------------------------------


def test_a_refusal_fills_the_refusal_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "refuse"}\n')

    def answer(url: Any, **kwargs: Any) -> Any:
        from aioresponses import CallbackResult

        prompt = json.loads(kwargs["data"])["messages"][0]["content"]
        refused = prompt == "refuse"
        payload = completion(None if refused else "ok", refusal="No." if refused else None)
        return CallbackResult(payload=payload)

    config = RunConfig(input=source, output=tmp_path / "out.parquet", base_url=BASE,
                       model="gpt-4o")
    with aioresponses() as mocked:
        mocked.post(URL, callback=answer, repeat=True)
        report = run(config, handle_signals=False)
    assert report.exit_code == 0
    rows = pq.read_table(config.output).to_pylist()
    assert [(r["id"], r["status"], r["content"], r["refusal"]) for r in rows] == [
        ("a", "ok", "ok", None), ("b", "ok", None, "No.")]


def test_a_refusal_served_from_the_response_cache_keeps_its_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "b", "prompt": "refuse"}\n')
    refused = completion(None, refusal="No.")
    outputs = []
    for name in ("first.parquet", "second.parquet"):
        config = RunConfig(input=source, output=tmp_path / name, base_url=BASE, model="gpt-4o",
                           cache=tmp_path / "responses.sqlite", preflight=False)
        with aioresponses() as mocked:
            mocked.post(URL, payload=refused, repeat=True)
            assert run(config, handle_signals=False).exit_code == 0
            sent = sum(len(calls) for calls in mocked.requests.values())
        outputs.append((sent, pq.read_table(config.output).to_pylist()[0]))
    (sent_first, first), (sent_second, second) = outputs
    assert (sent_first, sent_second) == (1, 0)
    assert second["cache_hit"] is True and first["cache_hit"] is False
    assert first["refusal"] == second["refusal"] == "No."
    assert second["content"] is None
