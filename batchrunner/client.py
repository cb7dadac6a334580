"""One HTTP attempt against a chat-completions gateway: send, parse (JSON or SSE), classify.

The HTTP itself is `connection.py`'s keep-alive pool. Every failure leaves as one of the
classes of `batchrunner.errors`.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from . import __version__
from .connection import ConnectionPool, Response
from .errors import (
    AuthRefused,
    ConnectionFailed,
    InvalidResponse,
    PermanentError,
    RateLimited,
    RequestError,
    ServerError,
)
from .results import Usage

__all__ = ["Answer", "Client"]

_RETRYABLE_4XX = frozenset({408, 409})


@dataclass(frozen=True, slots=True)
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

    @property
    def content(self) -> str | None:
        """The first choice's content."""
        return self.choices[0] if self.choices else None


class Client:
    """Keep-alive connections to one gateway; use as an async context manager.

    >>> async with Client("http://127.0.0.1:8000/v1", key, concurrency=16) as client:
    ...     answer = await client.complete({"model": "gpt-4o", "messages": [...]})
    """

    def __init__(
        self, base_url: str, api_key: str, *, concurrency: int = 16, timeout: float = 120.0
    ) -> None:
        path = quote(urlsplit(base_url).path.rstrip("/"), safe="/%:@!$&'()*+,;=~")
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._path = path + "/chat/completions"
        self._models_path = path + "/models"
        self._timeout = timeout
        # The key lives only in the pool's encoded headers, which no repr shows.
        self._pool: ConnectionPool | None = ConnectionPool(
            base_url, _headers(api_key), max_idle=concurrency
        )

    def __repr__(self) -> str:
        return f"Client({self._url!r})"

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def complete(self, body: dict[str, Any]) -> Answer:
        """Send one request; return its Answer or raise a RequestError subclass."""
        assert self._pool is not None, "use Client as an async context manager"
        started = time.perf_counter()
        request = self._pool.stream("POST", self._path, _dumps(body), timeout=self._timeout)
        async with request as response:
            if response.status != 200:
                raise await _error_for(response)
            if body.get("stream"):
                return await _read_stream(response, started)
            raw = await response.read()
            return _parse_completion(raw, response, started)

    async def models(self) -> list[dict[str, Any]]:
        """The `data` list of GET /models."""
        assert self._pool is not None, "use Client as an async context manager"
        response = await self._pool.request("GET", self._models_path, timeout=self._timeout)
        if response.status != 200:
            raise await _error_for(response)
        raw = await response.read()
        try:
            payload = orjson.loads(raw)
        except ValueError:
            raise InvalidResponse("GET /models: the answer is not JSON") from None
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise InvalidResponse("GET /models: no `data` list in the answer")
        return data


def _headers(api_key: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "User-Agent": f"batchrunner/{__version__}",
    }


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # what orjson refuses and json writes: integers over 64 bits, int keys
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _rate_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("x-ratelimit-")}


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` in seconds or as an HTTP date."""
    headers = {name.lower(): value for name, value in headers.items()}
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


async def _error_for(response: Response) -> RequestError | AuthRefused:
    """The error class for a non-200 answer, with the gateway's message."""
    status = response.status
    try:
        raw = await response.read()
    except (ConnectionFailed, InvalidResponse):
        raw = b""
    message = _error_message(raw) or response.reason or "no message"
    text = f"HTTP {status}: {message}"
    if status in (401, 403):
        return AuthRefused(text, http_status=status)
    if status == 429:
        return RateLimited(
            text,
            retry_after=parse_retry_after(response.headers),
            rate_headers=_rate_headers(response.headers),
        )
    if status >= 500 or status in _RETRYABLE_4XX:
        return ServerError(
            text, http_status=status, retry_after=parse_retry_after(response.headers)
        )
    return PermanentError(text, http_status=status, code=_error_code(raw))


def _error_message(raw: bytes) -> str | None:
    try:
        payload = orjson.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return text[:300] or None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
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


def _parse_completion(
    raw: bytes, response: Response, started: float
) -> Answer:
    latency_ms = (time.perf_counter() - started) * 1000
    try:
        payload = orjson.loads(raw)
    except ValueError:
        raise InvalidResponse(
            f"answer is not JSON ({len(raw)} bytes)", http_status=response.status
        ) from None
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        raise InvalidResponse("answer has no `choices` list", http_status=response.status)
    contents: list[str | None] = []
    finish_reasons: list[str | None] = []
    for choice in sorted(choices, key=_choice_index):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise InvalidResponse("a choice has no `message`", http_status=response.status)
        contents.append(message.get("content"))
        finish_reasons.append(choice.get("finish_reason"))
    usage = payload.get("usage")
    return Answer(
        choices=tuple(contents),
        finish_reason=finish_reasons[0],
        response_model=payload.get("model"),
        response_id=payload.get("id"),
        usage=Usage.from_json(usage if isinstance(usage, dict) else None),
        http_status=response.status,
        latency_ms=latency_ms,
        rate_headers=_rate_headers(response.headers),
    )


def _choice_index(choice: Any) -> int:
    return choice.get("index", 0) if isinstance(choice, dict) else 0


async def _read_stream(response: Response, started: float) -> Answer:
    """Assemble an SSE stream of chat.completion.chunk events into one Answer."""
    parts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    response_id = response_model = None
    usage: dict[str, Any] | None = None
    ttft_ms: float | None = None
    done = False
    async for line in _lines(response):
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, `event:` lines
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        try:
            chunk = orjson.loads(data)
        except ValueError:
            raise InvalidResponse("a stream event is not JSON", http_status=200) from None
        if not isinstance(chunk, dict):
            raise InvalidResponse("a stream event is not an object", http_status=200)
        if isinstance(chunk.get("error"), dict):
            raise ServerError(f"stream error: {chunk['error'].get('message')}", http_status=200)
        response_id = response_id or chunk.get("id")
        response_model = response_model or chunk.get("model")
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1000
                parts.setdefault(index, []).append(text)
            else:
                parts.setdefault(index, [])
            if choice.get("finish_reason") is not None:
                finish[index] = choice["finish_reason"]
    if not done:
        raise InvalidResponse("stream ended before data: [DONE]", http_status=200)
    if not parts:
        raise InvalidResponse("stream carried no choices", http_status=200)
    indexes = sorted(parts)
    return Answer(
        choices=tuple("".join(parts[i]) for i in indexes),
        finish_reason=finish.get(indexes[0]),
        response_model=response_model,
        response_id=response_id,
        usage=Usage.from_json(usage),
        http_status=response.status,
        latency_ms=(time.perf_counter() - started) * 1000,
        ttft_ms=ttft_ms,
        rate_headers=_rate_headers(response.headers),
    )


async def _lines(response: Response) -> AsyncIterator[bytes]:
    """The body's lines, stripped, as they arrive."""
    pending = b""
    async for chunk in response.iter_chunks():
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line.strip()
    if pending.strip():
        yield pending.strip()
