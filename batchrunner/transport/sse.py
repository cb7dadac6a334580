"""Streamed answers: server-sent events read from a body as it arrives, assembled into an Answer.

`EventStream` splits bytes into events (the WHATWG rules); `_StreamAnswer` puts the
chat.completion.chunk events of one answer together (content, refusals, tool calls, logprobs,
usage, time to first token); `_read_stream` drives both over an aiohttp response.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson

from batchrunner.errors import InvalidResponse, ServerError
from batchrunner.results import Usage
from batchrunner.transport.completions import (
    _SHOWN_BYTES,
    Answer,
    _error_object_message,
    _rate_headers,
    _what_came,
)

__all__ = ["EventStream"]

_SSE_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})


class EventStream:
    """Server-sent events from a body's bytes, as they arrive (the WHATWG rules).

    Lines end in LF, CRLF or a lone CR; an event's `data:` lines are joined with newlines;
    a blank line ends an event; comments (`:`) and `event:`/`id:`/`retry:` are skipped. Data
    still pending when the body ends is one more event (servers that omit the last blank line).

    >>> EventStream().feed(b"data: a\\r\\ndata: b\\r\\n\\r\\n")
    [b'a\\nb']
    """

    __slots__ = ("_data", "_pending", "_started")

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        self._started = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events that `chunk` completes (their data); raises ValueError for a non-SSE line."""
        text = self._pending + chunk
        hold = b""
        if b"\r" in text:
            if text.endswith(b"\r"):  # its LF may be in the next chunk: one line end, not two
                text, hold = text[:-1], b"\r"
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        self._pending = lines.pop() + hold
        return self._lines(lines)

    def close(self) -> list[bytes]:
        """The events left when the body ends."""
        rest = self._pending.rstrip(b"\r")
        self._pending = b""
        events = self._lines([rest] if rest else [])
        if self._data:
            events.append(b"\n".join(self._data))
            self._data = []
        return events

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        events = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(b"\n".join(data))
                    data = self._data = []
                continue
            if line[0] == 58:  # b":", a comment (a keep-alive ping)
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if value[:1] == b" " else value)
                self._started = True
            elif name not in _SSE_FIELDS and not self._started:
                raise ValueError(line)
        return events


class _StreamAnswer:
    """The pieces of a streamed answer, put together chunk by chunk."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.parts: dict[int, list[str]] = {}
        self.refusals: dict[int, list[str]] = {}
        # choice -> tool call index -> [id, type, name, argument pieces]
        self.tools: dict[int, dict[int, list[Any]]] = {}
        self.logprobs: dict[int, list[Any]] = {}
        self.finish: dict[int, str | None] = {}
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ttft_ms: float | None = None
        self.done = False

    def event(self, data: bytes) -> None:
        """Take one event's data: a chunk, or `[DONE]`."""
        if data.strip() == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(data)
        except ValueError:
            lines = data.split(b"\n")
            if len(lines) > 1:  # `data:` lines with no blank line between the events
                for line in lines:
                    self.event(line)
                return
            raise InvalidResponse(
                f"a stream event is not JSON: {_what_came(None, data)}", http_status=200
            ) from None
        if not isinstance(chunk, dict):
            raise InvalidResponse("a stream event is not an object", http_status=200)
        if chunk.get("error") is not None:
            message = _error_object_message(chunk) or "no message"
            raise ServerError(f"stream error: {message}", http_status=200)
        self.response_id = self.response_id or chunk.get("id")
        self.response_model = self.response_model or chunk.get("model")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                raise InvalidResponse("a stream choice is not an object", http_status=200)
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            text = delta.get("content")
            parts = self.parts.setdefault(index, [])
            if text:
                if self.ttft_ms is None:
                    self.ttft_ms = (time.perf_counter() - self.started) * 1000
                parts.append(text)
            refusal = delta.get("refusal")
            if refusal:
                self.refusals.setdefault(index, []).append(refusal)
            calls = delta.get("tool_calls")
            if calls:
                self._tool_deltas(index, calls)
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                self.logprobs.setdefault(index, []).extend(logprobs["content"])
            if choice.get("finish_reason") is not None:
                self.finish[index] = choice["finish_reason"]

    def _tool_deltas(self, index: int, calls: Any) -> None:
        """Take a delta's `tool_calls`: each piece names its call by `index`; the first piece
        of a call brings its id, type and name, every piece some of its `arguments`."""
        if not isinstance(calls, list):
            raise InvalidResponse("a stream delta's tool_calls is not a list", http_status=200)
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000
        tools = self.tools.setdefault(index, {})
        for position, call in enumerate(calls):
            if not isinstance(call, dict):
                raise InvalidResponse("a stream tool call is not an object", http_status=200)
            number = call.get("index", position)
            held = tools.get(number)
            if held is None:
                held = tools[number] = [None, None, None, []]
            if call.get("id"):
                held[0] = call["id"]
            if call.get("type"):
                held[1] = call["type"]
            function = call.get("function")
            if isinstance(function, dict):
                if function.get("name"):
                    held[2] = (held[2] or "") + function["name"]
                if function.get("arguments"):
                    held[3].append(function["arguments"])

    def _tool_calls(self, index: int) -> str | None:
        tools = self.tools.get(index)
        if not tools:
            return None
        return orjson.dumps([
            {
                "id": call_id,
                "type": kind or "function",
                "function": {"name": name, "arguments": "".join(pieces)},
            }
            for call_id, kind, name, pieces in (tools[n] for n in sorted(tools))
        ]).decode()

    def answer(self, response: aiohttp.ClientResponse) -> Answer:
        """The Answer, once the stream has ended with `[DONE]`."""
        if not self.done:
            raise InvalidResponse("stream ended before data: [DONE]", http_status=200)
        if not self.parts:
            raise InvalidResponse("stream carried no choices", http_status=200)
        indexes = sorted(self.parts)
        first = indexes[0]
        refusal = "".join(self.refusals[first]) if first in self.refusals else None
        tool_calls = tuple(self._tool_calls(i) for i in indexes)
        logprobs = self.logprobs.get(first)
        return Answer(
            choices=tuple(
                "".join(self.parts[i])
                if self.parts[i] or (i not in self.refusals and i not in self.tools)
                else None
                for i in indexes
            ),
            choices_tool_calls=tool_calls if any(tool_calls) else None,
            logprobs=None if logprobs is None else orjson.dumps({"content": logprobs}).decode(),
            finish_reason=self.finish.get(first),
            response_model=self.response_model,
            response_id=self.response_id,
            usage=Usage.from_json(self.usage),
            http_status=response.status,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            ttft_ms=self.ttft_ms,
            rate_headers=_rate_headers(response.headers),
            refusal=refusal,
        )


async def _read_stream(response: aiohttp.ClientResponse, started: float) -> Answer:
    """Assemble an SSE stream of chat.completion.chunk events into one Answer."""
    events = EventStream()
    answer = _StreamAnswer(started)
    first = b""  # the body's first bytes and its length, for an error message
    received = 0
    try:
        async for chunk in response.content.iter_any():
            if len(first) < _SHOWN_BYTES:
                first += chunk[:_SHOWN_BYTES]
            received += len(chunk)
            for data in events.feed(chunk):
                answer.event(data)
            if answer.done:
                # Read to the end of the body (the chunked encoding's last chunk), so that the
                # connection goes back to the pool instead of being closed.
                await response.content.read()
                break
        else:
            for data in events.close():
                answer.event(data)
    except ValueError:
        received += len(await response.content.read())  # the rest: the connection is kept
        what = _what_came(response.content_type, first, received)
        raise InvalidResponse(
            f"the answer is not an event stream ({what})", http_status=response.status
        ) from None
    return answer.answer(response)
