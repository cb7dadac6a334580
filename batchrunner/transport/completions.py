"""What a chat-completions gateway sends back, read: an answer's JSON body and error bodies.

`Answer` is a successful chat completion reduced to what a result row needs; `_parse_completion`
reads one from a whole JSON body (a streamed one is assembled in sse.py). The error-body readers
give the gateway's own message and code for the error classes the client raises.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from batchrunner.errors import InvalidResponse, ServerError
from batchrunner.results import Result, Usage

__all__ = ["Answer", "answer_of"]

_SHOWN_BYTES = 60  # of a body that is not what was expected, in an error message


@dataclass(slots=True)  # not frozen: one is made per request, and frozen ones cost 3x as much
class Answer:
    """A successful chat completion, reduced to what a result row needs."""

    choices: tuple[str | None, ...]
    finish_reason: str | None
    response_model: str | None
    response_id: str | None
    usage: Usage
    http_status: int
    latency_ms: float
    ttft_ms: float | None = None
    rate_headers: Mapping[str, str] = field(default_factory=dict)
    refusal: str | None = None
    # each choice's message.tool_calls as JSON text (None for a choice with none); None when
    # no choice called a tool
    choices_tool_calls: tuple[str | None, ...] | None = None
    logprobs: str | None = None  # the first choice's logprobs object as JSON text

    @property
    def content(self) -> str | None:
        """The first choice's content."""
        return self.choices[0] if self.choices else None

    @property
    def tool_calls(self) -> str | None:
        """The first choice's tool calls as JSON text."""
        return self.choices_tool_calls[0] if self.choices_tool_calls else None

    def result(
        self, *, index: int, id: str, model: str | None, cost_usd: float | None,
        attempts: int, batch_id: str | None = None,
    ) -> Result:
        """The ok Result of the row this answers, the whole answer kept."""
        return Result(
            index=index,
            id=id,
            status="ok",
            model=model,
            content=self.content,
            choices=self.choices,
            finish_reason=self.finish_reason,
            response_model=self.response_model,
            usage=self.usage,
            cost_usd=cost_usd,
            attempts=attempts,
            latency_ms=self.latency_ms,
            ttft_ms=self.ttft_ms,
            http_status=self.http_status,
            response_id=self.response_id,
            refusal=self.refusal,
            tool_calls=self.tool_calls,
            logprobs=self.logprobs,
            choices_tool_calls=self.choices_tool_calls,
            batch_id=batch_id,
        )


def _what_came(content_type: str | None, raw: bytes, size: int | None = None) -> str:
    """`text/html, 1,234 bytes: '<html>...'`: what a body that was not expected holds."""
    size = len(raw) if size is None else size
    shown = " ".join(raw[:_SHOWN_BYTES].decode("utf-8", "replace").split())
    more = "..." if size > _SHOWN_BYTES else ""
    kind = content_type or "no Content-Type"
    return f"{kind}, {size:,} bytes" + (f": {shown!r}{more}" if raw else "")


def _rate_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The `x-ratelimit-*` headers, names in lower case (what the pacer reads)."""
    found = {}
    for name, value in headers.items():
        if name[:1] in "xX" and name[:12].lower() == "x-ratelimit-":  # most names fail at once
            found[name.lower()] = value
    return found


def _error_message(raw: bytes) -> str | None:
    """The message of an OpenAI error body (`{"error": {"message": ...}}`), if it is one."""
    try:
        payload = orjson.loads(raw)
    except ValueError:
        return None
    return _error_object_message(payload)


def _error_object_message(payload: Any) -> str | None:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        if isinstance(error, dict):
            return orjson.dumps(error).decode()[:300]
    return None


def _error_code(raw: bytes) -> str | None:
    """The `error.code` of an OpenAI error body, as text; None where there is none."""
    try:
        payload = orjson.loads(raw)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return None if code is None else str(code)


def _parse_completion(raw: bytes, response: aiohttp.ClientResponse, started: float) -> Answer:
    latency_ms = (time.perf_counter() - started) * 1000
    status = response.status
    try:
        payload = orjson.loads(raw)
    except ValueError:
        what = _what_came(response.content_type, raw)
        raise InvalidResponse(f"answer is not JSON ({what})", http_status=status) from None
    return answer_of(payload, status, latency_ms, response.headers)


def answer_of(
    payload: Any, status: int, latency_ms: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """The Answer a chat completion's parsed JSON body holds (a Batch API output line's
    `response.body` too); the errors the online client raises for a body that holds none."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        error = _error_object_message(payload)
        if error is not None:  # some gateways say 200 and put the error in the body
            raise ServerError(f"HTTP 200 with an error: {error}", http_status=status)
        raise InvalidResponse("answer has no `choices` list", http_status=status)
    contents: list[str | None] = []
    finish_reasons: list[str | None] = []
    tool_calls: list[str | None] = []
    refusal: str | None = None
    logprobs: str | None = None
    for choice in sorted(choices, key=_choice_index) if len(choices) > 1 else choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise InvalidResponse("a choice has no `message`", http_status=status)
        if not contents:
            refusal = message.get("refusal")
            logprobs = _json_text(choice.get("logprobs"))
        contents.append(message.get("content"))
        finish_reasons.append(choice.get("finish_reason"))
        calls = message.get("tool_calls")
        tool_calls.append(_tool_calls_text(calls) if calls else None)
    usage = payload.get("usage")
    return Answer(
        choices=tuple(contents),
        finish_reason=finish_reasons[0],
        response_model=payload.get("model"),
        response_id=payload.get("id"),
        usage=Usage.from_json(usage if isinstance(usage, dict) else None),
        http_status=status,
        latency_ms=latency_ms,  # type: ignore[arg-type]
        rate_headers=_rate_headers(headers) if headers else {},
        refusal=refusal if isinstance(refusal, str) else None,
        choices_tool_calls=tuple(tool_calls) if any(tool_calls) else None,
        logprobs=logprobs,
    )


def _json_text(value: Any) -> str | None:
    """A JSON value as compact JSON text (None for null or absent)."""
    if value is None:
        return None
    return orjson.dumps(value).decode()


def _tool_calls_text(calls: Any) -> str:
    """`message.tool_calls` as JSON text, each call as `{id, type, function: {name, arguments}}`
    (what a streamed answer is assembled into, so both read the same)."""
    if not isinstance(calls, list):
        return orjson.dumps(calls).decode()
    shaped = []
    for call in calls:
        if not isinstance(call, dict):
            shaped.append(call)
            continue
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        shaped.append({
            "id": call.get("id"),
            "type": call.get("type", "function"),
            "function": {"name": function.get("name"), "arguments": function.get("arguments")},
        })
    return orjson.dumps(shaped).decode()


def _choice_index(choice: Any) -> int:
    return choice.get("index", 0) if isinstance(choice, dict) else 0
