"""One HTTP attempt against a chat-completions gateway: send, parse (JSON or SSE), classify.

The HTTP is aiohttp's: one `ClientSession` per run over a `TCPConnector` sized to the
concurrency. Proxies come from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (and a `.netrc` for the
proxy's credentials), read as aiohttp's `trust_env` reads them, but once per run rather than
once per request (see `Client`). Certificates are checked against the system's authorities, or
`SSL_CERT_FILE`/`SSL_CERT_DIR`. Every failure leaves as one of the classes of
`batchrunner.errors`; aiohttp's own types never leave this module.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from yarl import URL

from batchrunner._version import __version__
from batchrunner.errors import (
    AttemptTimeout,
    AuthRefused,
    ConnectionFailed,
    GatewayUnreachable,
    InvalidResponse,
    PermanentError,
    RateLimited,
    RequestError,
    ServerError,
    UsageError,
)
from batchrunner.redaction import scrub
from batchrunner.results import Usage
from batchrunner.transport.openfiles import ensure_room_for

__all__ = ["MAX_RETRY_AFTER", "Answer", "Client", "parse_retry_after"]

MAX_RETRY_AFTER = 600.0  # seconds: a longer Retry-After is taken as this (SPEC section 6)
IDLE_SECONDS = 4.0  # an idle connection older than this is closed rather than reused
_RETRYABLE_4XX = frozenset({408, 409})
USER_AGENT = f"batchrunner/{__version__}"
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


class Client:
    """One aiohttp session to one gateway; use as an async context manager.

    >>> async with Client("http://127.0.0.1:8000/v1", key, concurrency=16) as client:
    ...     answer = await client.complete({"model": "gpt-4o", "messages": [...]})

    `timeout` bounds a whole attempt without a stream, connecting included; with a stream it
    bounds connecting and each wait for the next bytes, so a long answer that keeps arriving
    is not cut. The base URL's query string (`?api-version=...`) is kept on every request.

    The session does not set aiohttp's `trust_env`: with it, aiohttp reads the proxy variables
    and `~/.netrc` in a worker thread on every request, which cost 3-5x the CPU of a request
    here (bench/trust_env.py), and a `.netrc` entry for the gateway's host would clash with the
    Authorization header on every request. The same reading, aiohttp's own function, is done
    once when the session opens.
    """

    def __init__(
        self, base_url: str, api_key: str, *, concurrency: int = 16, timeout: float = 120.0
    ) -> None:
        ensure_room_for(concurrency)
        self._url, self._models_url = _endpoints(base_url)
        self._origin = f"{self._url.scheme}://{self._url.raw_authority}"
        self._concurrency = concurrency
        self._timeout = timeout
        self._attempt_timeout = aiohttp.ClientTimeout(total=timeout)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_read=timeout
        )
        # The key goes with each request, not in the session's default headers: aiohttp copies
        # those into a proxy's CONNECT request, and so would hand the key to the proxy.
        self._credentials = _Redacted({"Authorization": f"Bearer {api_key}"})
        self._keys = _Redacted({"key": api_key})  # masked in error texts: a gateway may echo it
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._send_options: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Client({str(self._url)!r})"

    async def __aenter__(self) -> Client:
        ssl_context = ssl.create_default_context() if self._url.scheme == "https" else None
        connector = aiohttp.TCPConnector(
            limit=self._concurrency,
            limit_per_host=0,
            keepalive_timeout=IDLE_SECONDS,
            ssl=ssl_context if ssl_context is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
            timeout=self._attempt_timeout,
            cookie_jar=aiohttp.DummyCookieJar(),  # an API client keeps no cookies
            raise_for_status=False,
        )
        self._proxy, proxy_authorization = _proxy_from_environment(self._url)
        options: dict[str, Any] = {"allow_redirects": False, "headers": self._credentials}
        if self._proxy is not None:
            options["proxy"] = self._proxy
        if proxy_authorization is not None:
            if self._url.scheme == "https":  # said in the CONNECT that opens the tunnel
                options["proxy_headers"] = _Redacted({"Proxy-Authorization": proxy_authorization})
            else:  # said in each request, which the proxy reads and forwards
                options["headers"] = _Redacted(
                    {**self._credentials, "Proxy-Authorization": proxy_authorization}
                )
        self._send_options = options
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def proxy(self) -> str | None:
        """The proxy requests go through (from the environment), without credentials."""
        return None if self._proxy is None else str(self._proxy)

    async def complete(self, body: dict[str, Any]) -> Answer:
        """Send one request; return its Answer or raise a RequestError subclass."""
        session = self._session
        assert session is not None, "use Client as an async context manager"
        started = time.perf_counter()
        stream = bool(body.get("stream"))
        options = self._send_options
        if stream:
            options = {**options, "timeout": self._stream_timeout}
        try:
            async with session.post(self._url, data=_dumps(body), **options) as response:
                if response.status != 200:
                    raise await _error_for(response)
                if stream and response.content_type != "application/json":
                    return await _read_stream(response, started)
                closed = _end_by_close(response)
                raw = await response.read()
                if closed is not None and _ended_by_error(closed):
                    raise ConnectionFailed(
                        "the connection was reset before the answer was known to be whole "
                        "(its end is the connection's end)", http_status=response.status
                    )
                return _parse_completion(raw, response, started)
        except (RequestError, AuthRefused) as exc:
            raise self._scrubbed(exc)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise self._scrubbed(self._failure(exc, stream)) from None

    async def models(self) -> list[dict[str, Any]]:
        """The `data` list of GET /models."""
        session = self._session
        assert session is not None, "use Client as an async context manager"
        try:
            async with session.get(self._models_url, **self._send_options) as response:
                if response.status != 200:
                    raise await _error_for(response)
                raw = await response.read()
        except (RequestError, AuthRefused) as exc:
            raise self._scrubbed(exc)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise self._scrubbed(self._failure(exc, stream=False)) from None
        try:
            payload = orjson.loads(raw)
        except ValueError:
            what = _what_came(response.content_type, raw)
            raise InvalidResponse(f"GET /models: the answer is not JSON ({what})") from None
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise InvalidResponse("GET /models: no `data` list in the answer")
        return data

    def _scrubbed(self, exc: RequestError | AuthRefused) -> RequestError | AuthRefused:
        """`exc` with the key (and anything shaped like one) masked in its text.

        The text becomes the row's `error`, in the output, the checkpoint and the summaries; a
        gateway or proxy that echoes the Authorization header must not put the key there.
        """
        exc.args = tuple(scrub(a, self._keys.values()) if isinstance(a, str) else a for a in exc.args)
        return exc

    def _failure(self, exc: BaseException, stream: bool) -> RequestError:
        """Our error for one of aiohttp's (or the socket's) exceptions."""
        timeout = f"{self._timeout:g} s"
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return AttemptTimeout(
                f"no connection to {self._origin} within {timeout}", sent=False
            )
        if isinstance(exc, aiohttp.SocketTimeoutError) and stream:
            return AttemptTimeout(f"the stream sent nothing for {timeout}")
        if isinstance(exc, asyncio.TimeoutError):
            return AttemptTimeout(f"no answer within {timeout}")
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            return ConnectionFailed(
                f"the proxy {self.proxy} answered {exc.status} {exc.message}".rstrip()
            )
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            error = exc.certificate_error
            reason = getattr(error, "verify_message", None) or str(error)
            return GatewayUnreachable(
                f"cannot connect to {self._origin}: certificate verify failed: {reason}",
                cause="tls",
            )
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return GatewayUnreachable(
                f"cannot connect to {self._origin}: the host name does not resolve "
                f"({_os_reason(exc.os_error)})", cause="dns"
            )
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return GatewayUnreachable(
                f"cannot connect to the proxy {self.proxy}: {_os_reason(exc.os_error)}",
                cause=_connect_cause(exc.os_error),
            )
        if isinstance(exc, aiohttp.ClientConnectorSSLError):
            return GatewayUnreachable(
                f"cannot connect to {self._origin}: the TLS handshake failed: "
                f"{_os_reason(exc.os_error)}", cause="tls"
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            return GatewayUnreachable(
                f"cannot connect to {self._origin}: {_os_reason(exc.os_error)}",
                cause=_connect_cause(exc.os_error),
            )
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return ConnectionFailed("the server closed the connection before any answer")
        if isinstance(exc, aiohttp.ClientPayloadError):
            causes = (exc.__cause__, *exc.args[1:])
            if any(isinstance(cause, ContentEncodingError) for cause in causes):
                return InvalidResponse("a compressed body does not decode")
            detail = next((c.message for c in causes if isinstance(c, HttpProcessingError)), "")
            return ConnectionFailed(
                "the server closed the connection in the middle of the answer"
                + (f": {detail}" if detail else "")
            )
        if isinstance(exc, aiohttp.ClientResponseError):  # not HTTP, or headers out of bounds
            return InvalidResponse(f"not an HTTP answer: {' '.join(str(exc.message).split())}")
        if isinstance(exc, (aiohttp.ClientOSError, OSError)):
            return ConnectionFailed(f"connection to {self._origin} failed: {_describe(exc)}")
        if isinstance(exc, aiohttp.ClientError):
            return ConnectionFailed(f"request to {self._origin} failed: {_describe(exc)}")
        return InvalidResponse(f"the answer cannot be read: {_describe(exc)}")


def _endpoints(base_url: str) -> tuple[URL, URL]:
    """POST and GET URLs under the base URL: its path, its query string; never its user:password."""
    parts = urlsplit(base_url.strip())
    host = parts.netloc.rpartition("@")[2]
    root = f"{parts.scheme}://{host}{parts.path.rstrip('/')}"
    query = f"?{parts.query}" if parts.query else ""
    try:
        return URL(f"{root}/chat/completions{query}"), URL(f"{root}/models{query}")
    except ValueError as exc:  # a host name IDNA cannot encode, a port out of range
        raise UsageError(f"not a usable base URL: {base_url!r} ({exc})") from None


def _end_by_close(response: aiohttp.ClientResponse) -> asyncio.Future[None] | None:
    """For a body that ends with its connection (no length, not chunked): how that ended.

    aiohttp takes such a body as complete however the connection ends, a reset included; the
    protocol's `closed` future tells a clean close (None) from a reset (an exception).
    """
    headers = response.headers
    if "Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "").lower():
        return None
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    closed = protocol.closed if protocol is not None else None
    if closed is not None:
        closed.add_done_callback(_retrieve)
    return closed


def _ended_by_error(closed: asyncio.Future[None]) -> bool:
    return closed.done() and not closed.cancelled() and closed.exception() is not None


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # seen, so that asyncio does not log it as never retrieved


def _proxy_from_environment(url: URL) -> tuple[URL | None, str | None]:
    """The proxy for `url` as aiohttp's trust_env finds it, and its Proxy-Authorization."""
    try:
        proxy, auth = get_env_proxy_for_url(url)
    except LookupError:  # none set, or NO_PROXY names the host
        return None, None
    return proxy, (auth.encode() if auth is not None else None)


class _Redacted(dict):  # type: ignore[type-arg]
    """Headers that hold a secret: a dict whose repr never shows it."""

    def __repr__(self) -> str:
        return f"<{len(self)} headers, redacted>"


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # what orjson refuses and json writes: integers over 64 bits, int keys
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _connect_cause(error: OSError) -> str:
    """GatewayUnreachable's cause of a failed connect: "refused" or "connect"."""
    return "refused" if isinstance(error, ConnectionRefusedError) else "connect"


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


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


_SECONDS = re.compile(r"\d{1,12}(\.\d{1,6})?")


def parse_retry_after(
    headers: Mapping[str, str], now: float | None = None, cap: float = MAX_RETRY_AFTER
) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` in seconds or as an HTTP date.

    A value that is neither a number of seconds nor an HTTP date (`inf`, `-1`, `soon`) is
    treated as absent; a longer wait than `cap` (10 minutes) is taken as `cap`.
    """
    lowered = {name.lower(): value for name, value in headers.items()
               if name[:11].lower() == "retry-after"}
    millis = lowered.get("retry-after-ms", "").strip()
    if _SECONDS.fullmatch(millis):
        return min(cap, float(millis) / 1000)
    value = lowered.get("retry-after", "").strip()
    if not value:
        return None
    if _SECONDS.fullmatch(value):
        return min(cap, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    now = time.time() if now is None else now
    return min(cap, max(0.0, when.timestamp() - now))


async def _error_for(response: aiohttp.ClientResponse) -> RequestError | AuthRefused:
    """The error class for a non-200 answer, with the gateway's message."""
    status = response.status
    try:
        raw = await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        raw = b""
    message = _error_message(raw) or _status_text(response, raw)
    text = f"HTTP {status}: {message}"
    headers = response.headers
    if status in (401, 403):
        return AuthRefused(text, http_status=status)
    if status == 429:
        return RateLimited(
            text, retry_after=parse_retry_after(headers), rate_headers=_rate_headers(headers)
        )
    if status >= 500 or status in _RETRYABLE_4XX:
        return ServerError(text, http_status=status, retry_after=parse_retry_after(headers))
    if 300 <= status < 400 and headers.get("Location"):
        text += f" (redirected to {headers['Location']}: use that as the base URL)"
    return PermanentError(text, http_status=status, code=_error_code(raw))


def _status_text(response: aiohttp.ClientResponse, raw: bytes) -> str:
    reason = response.reason or "no message"
    return f"{reason} ({_what_came(response.content_type, raw)})" if raw else reason


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
        latency_ms=latency_ms,
        rate_headers=_rate_headers(response.headers),
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


# -- streams --------------------------------------------------------------------------------


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
