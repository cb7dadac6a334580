"""HTTP/1.1 keep-alive connections to one gateway: the transport under `client.py`.

Why not aiohttp's client: on this project's benchmark (bench/README.md) aiohttp's ClientSession
cost about 250 µs of CPU per request, more than half of everything batchrunner spends on a row;
this pool of asyncio Protocols costs about 50 µs for the same requests. A batch runner sends one
kind of request to one origin, so it needs little of what a general client does: no cookies,
redirects, proxies or multipart. Parsing the HTTP/1.1 response is left to httptools (llhttp,
the parser of Node.js and uvicorn); this module only writes requests and keeps connections.

    pool = ConnectionPool("https://gateway.example/v1", {"Authorization": "Bearer ..."})
    response = await pool.request("POST", "/v1/chat/completions", body, timeout=120)
    await pool.close()

Failures leave as `ConnectionFailed` (refused, reset, closed mid-answer), `InvalidResponse`
(not HTTP) or `AttemptTimeout` (the whole request, connecting included, took longer than its
`timeout`). A request cancelled half-way closes its connection.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httptools

from .errors import AttemptTimeout, ConnectionFailed, InvalidResponse

__all__ = ["ConnectionPool", "Response"]

# Idle connections older than this are closed rather than reused: servers drop idle keep-alive
# connections after 5-75 s, and a request written into one that is being dropped fails.
IDLE_SECONDS = 4.0


class Response:
    """A gateway's answer: status, headers (lower-case names) and, once read, the body."""

    __slots__ = ("_body", "_connection", "headers", "reason", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status: int = connection.status
        self.reason: str = connection.reason
        self.headers: dict[str, str] = connection.headers
        self._body: bytes | None = None

    async def read(self) -> bytes:
        """The whole body (read once, then kept)."""
        if self._body is None:
            self._body = b"".join([chunk async for chunk in self.iter_chunks()])
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as it arrives."""
        connection = self._connection
        while True:
            chunk = await connection.next_chunk()
            if not chunk:
                return
            yield chunk


class ConnectionPool:
    """Keep-alive connections to the origin of `base_url`, opened as requests need them."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        max_idle: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        host_header = url.netloc.rpartition("@")[2]  # never the user:password part
        self._origin = f"{url.scheme}://{host_header}"
        # Every request carries the same headers, so they are encoded once. They hold the API
        # key: _Secret keeps it out of this object's repr (and so out of error messages).
        lines = [f"Host: {host_header}", "Accept: application/json",
                 "Accept-Encoding: identity", "Connection: keep-alive"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._header_block = _Secret(("\r\n".join(lines) + "\r\n").encode("latin-1"))
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    def __repr__(self) -> str:
        return f"ConnectionPool({self._origin!r}, open={len(self._open)})"

    async def request(
        self, method: str, path: str, body: bytes = b"", *, timeout: float
    ) -> Response:
        """Send one request and read its whole answer."""
        async with self.stream(method, path, body, timeout=timeout) as response:
            await response.read()
            return response

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, body: bytes = b"", *, timeout: float
    ) -> AsyncIterator[Response]:
        """Send one request; yield the Response once its headers are in, body still to read.

        `timeout` covers the whole request, from here to the body's last byte.
        """
        data = self._encode(method, path, body)
        deadline = asyncio.get_running_loop().time() + timeout
        connection = self._take_idle() or await self._connect(deadline, timeout)
        try:
            await connection.send(data, deadline, timeout)
            yield Response(connection)
        finally:
            # An answer read to its end leaves the connection ready for the next request, even
            # when the caller raises over its content (a 429, a body that is not JSON).
            self._release(connection, reusable=connection.complete)

    async def close(self) -> None:
        """Close every connection, waiting a moment for TLS to say goodbye."""
        connections = list(self._open)
        self._open.clear()
        self._idle.clear()
        for connection in connections:
            connection.close()
        closing = [connection.closed for connection in connections if not connection.lost]
        if closing:
            await asyncio.wait(closing, timeout=1.0)
            for connection in connections:
                if not connection.lost:
                    connection.abort()

    def _encode(self, method: str, path: str, body: bytes) -> bytes:
        length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
        head = f"{method} {path} HTTP/1.1\r\n{length}".encode("latin-1")
        return b"".join((head, self._header_block.value, b"\r\n", body))

    def _take_idle(self) -> _Connection | None:
        # A connection the server has closed is skipped here, before anything is written to it.
        # Once a request is written, a failure is the caller's to retry, never retried here:
        # the gateway may have started on it, and the caller counts the attempts.
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.keep_alive and not connection.lost and (
                now - connection.idle_since < IDLE_SECONDS
            ):
                return connection
            self._discard(connection)
        return None

    async def _connect(self, deadline: float, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port,
                    ssl=self._ssl, server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            raise AttemptTimeout(f"no connection within {timeout:g} s") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake
            raise ConnectionFailed(
                f"cannot connect to {self._origin}: {exc.strerror or exc}"
            ) from None
        self._open.add(connection)
        return connection

    def _release(self, connection: _Connection, *, reusable: bool) -> None:
        connection.stop_timer()
        if reusable and connection.keep_alive and len(self._idle) < self._max_idle:
            connection.reset()
            self._idle.append(connection)
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.stop_timer()
        connection.close()
        self._open.discard(connection)


class _Secret:
    """Bytes that never show in a repr."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<redacted>"


class _Connection(asyncio.Protocol):
    """One keep-alive connection; httptools calls the on_* methods as the answer is parsed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []
        self._decoder: zlib._Decompress | None = None  # type: ignore[name-defined]
        self._error: Exception | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.lost = False
        self.keep_alive = True
        self.reset()

    def reset(self) -> None:
        """Ready for the next request on this connection."""
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.received = False
        self.complete = False
        self.waiting = False  # a request is written and its answer has not ended
        self._chunks.clear()
        self._error = None
        self._decoder = None
        self.idle_since = time.monotonic()

    async def send(self, data: bytes, deadline: float, timeout: float) -> None:
        """Write a request and wait for the answer's headers; it fails at `deadline`."""
        assert self._transport is not None
        # One timer on the loop for the whole answer: cheaper than asyncio.timeout's
        # per-request task bookkeeping, which cost 6% of a row's CPU (bench/README.md).
        self._timer = self._loop.call_at(deadline, self._time_out, timeout)
        self.waiting = True
        self._transport.write(data)
        while not self.status and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error

    async def next_chunk(self) -> bytes:
        """The next piece of the body; b"" once it is complete."""
        while not self._chunks and not self.complete and self._error is None:
            await self._wait()
        if self._chunks:
            chunk = b"".join(self._chunks)
            self._chunks.clear()
            return chunk
        if self._error is not None:
            raise self._error
        return b""

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _time_out(self, timeout: float) -> None:
        self._timer = None
        if not self.complete:
            self._error = AttemptTimeout(f"no answer within {timeout:g} s")
            self.keep_alive = False
            self.close()
            self._wake()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.keep_alive = False
            self.close()
            if self.waiting:
                self._error = InvalidResponse(f"not an HTTP answer: {exc}")
                self._wake()
            # else an answer nobody asked for (some servers say 408 before closing an idle
            # connection): the connection is not used again, the answer before it stands.

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        self.keep_alive = False
        if not self.complete and self._error is None:
            if self.status and "content-length" not in self.headers and (
                "chunked" not in self.headers.get("transfer-encoding", "")
            ):
                self.complete = True  # a body delimited by the end of the connection
            else:
                reason = f": {exc}" if exc else ""
                where = "in the middle of the answer" if self.received else "before any answer"
                self._error = ConnectionFailed(f"the server closed the connection {where}{reason}")
        self._wake()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if not self.waiting:
            raise ConnectionError("an answer to no request")  # stops the parser

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # 1xx (103 Early Hints, say) comes before the answer; its end is skipped too
        self.status = status
        encoding = self.headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):
            self._decoder = zlib.decompressobj(wbits=47)  # gzip or zlib, told apart by header
        elif encoding != "identity":
            self._error = InvalidResponse(f"unsupported Content-Encoding: {encoding}")
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._error = InvalidResponse(f"a compressed body does not decode: {exc}")
                self.keep_alive = False
                return
        self._chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status:  # the end of a 1xx
            self.headers.clear()
            return
        if self._decoder is not None:
            self._chunks.append(self._decoder.flush())
        self.complete = True
        self.waiting = False
        self.keep_alive = self.keep_alive and self._parser.should_keep_alive()
        self._wake()
