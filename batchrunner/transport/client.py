"""One HTTP attempt against a chat-completions gateway: send, read the answer, classify failures.

The HTTP is aiohttp's: one `ClientSession` per run over a `TCPConnector` sized to the
concurrency. Proxies come from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (and a `.netrc` for the
proxy's credentials), read as aiohttp's `trust_env` reads them, but once per run rather than
once per request (see `Client`). Certificates are checked against the system's authorities, or
`SSL_CERT_FILE`/`SSL_CERT_DIR`. Every failure leaves as one of the classes of
`batchrunner.errors`; aiohttp's own types never leave this module. The answer is read by
completions.py (a JSON body) or sse.py (a stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
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
from batchrunner.transport.completions import (
    Answer,
    _error_code,
    _error_message,
    _parse_completion,
    _rate_headers,
    _what_came,
)
from batchrunner.transport.openfiles import ensure_room_for
from batchrunner.transport.sse import _read_stream

__all__ = ["MAX_RETRY_AFTER", "Client", "error_for_status", "parse_retry_after"]

MAX_RETRY_AFTER = 600.0  # seconds: a longer Retry-After is taken as this
IDLE_SECONDS = 4.0  # an idle connection older than this is closed rather than reused
_RETRYABLE_4XX = frozenset({408, 409})
USER_AGENT = f"batchrunner/{__version__}"


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

    def url(self, path: str) -> URL:
        """The URL of `path` (e.g. `/batches`) under the base URL, with its query string."""
        root = self._url.path.rpartition("/chat/completions")[0]
        return self._url.with_path(root + path).with_query(self._url.query)

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, path: str, *, stream: bool = False, content_type: str | None = None,
        **options: Any,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request to `path` under the base URL, with the key, proxy and timeouts of
        `complete`; the answer is yielded to read inside the block.

        An answer that is not 2xx raises the error `complete` would raise; aiohttp's errors,
        raised sending or while the block reads the body, leave as ours; every text is
        scrubbed of the key. `stream` reads with the streaming timeouts (a long download is
        not cut while it keeps arriving); `content_type` replaces the JSON one (a multipart
        upload's, with its boundary).
        """
        session = self._session
        assert session is not None, "use Client as an async context manager"
        sent = {**self._send_options, **options}
        if content_type is not None:
            sent["headers"] = _Redacted({**sent["headers"], "Content-Type": content_type})
        if stream:
            sent["timeout"] = self._stream_timeout
        try:
            async with session.request(method, self.url(path), **sent) as response:
                if not 200 <= response.status < 300:
                    raise await _error_for(response)
                yield response
        except (RequestError, AuthRefused) as exc:
            raise self._scrubbed(exc)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise self._scrubbed(self._failure(exc, stream)) from None

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
    if 300 <= status < 400 and response.headers.get("Location"):
        message += f" (redirected to {response.headers['Location']}: use that as the base URL)"
    return error_for_status(status, message, raw, response.headers)


def error_for_status(
    status: int, message: str, raw: bytes = b"", headers: Mapping[str, str] | None = None
) -> RequestError | AuthRefused:
    """The error class and text (`HTTP 400: message`) of a non-200 answer, online or in a
    Batch API output line; `raw` is its body (for the error code)."""
    text = f"HTTP {status}: {message}"
    headers = headers or {}
    if status in (401, 403):
        return AuthRefused(text, http_status=status)
    if status == 429:
        return RateLimited(
            text, retry_after=parse_retry_after(headers), rate_headers=_rate_headers(headers)
        )
    if status >= 500 or status in _RETRYABLE_4XX:
        return ServerError(text, http_status=status, retry_after=parse_retry_after(headers))
    return PermanentError(text, http_status=status, code=_error_code(raw))


def _status_text(response: aiohttp.ClientResponse, raw: bytes) -> str:
    reason = response.reason or "no message"
    return f"{reason} ({_what_came(response.content_type, raw)})" if raw else reason


