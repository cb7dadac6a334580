"""A loopback HTTP/1.1 server whose every answer a test writes: real sockets, any bytes.

The gateway simulator answers like the API; this server answers however a test needs: a body
cut short, a connection reset mid-stream, a chunked SSE stream, a gzip body, a stale keep-alive
connection. Each request goes to `handler(request) -> Reply`.

    with scripted_server(lambda request: Reply(json={"ok": True})) as server:
        ... server.base_url ... server.requests ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One request as the server read it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    connection: int  # which connection it came on, counted from 1

    def json(self) -> Any:
        return jsonlib.loads(self.body)


@dataclass
class Reply:
    """What to send back. `raw` replaces everything; `cut_after` sends that many bytes, then
    closes; `chunks` sends the body with chunked transfer encoding, `pause` s between chunks;
    `close` closes the connection after answering; `reset` ends it with a TCP reset (RST)
    instead of a clean close wherever it closes."""

    status: int = 200
    json: Any = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] | None = None
    pause: float = 0.0
    raw: bytes | None = None
    cut_after: int | None = None
    close: bool = False
    delay: float = 0.0
    reset: bool = False


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


class ScriptedServer:
    def __init__(self, handler: Callable[[Request], Reply]) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.connections = 0
        self.base_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def close_idle_connections(self) -> None:
        """Close every connection now, as a server does with idle keep-alive connections."""
        assert self._loop is not None
        done = threading.Event()

        def close_all() -> None:
            for writer in list(self._writers):
                writer.close()
            done.set()

        self._loop.call_soon_threadsafe(close_all)
        done.wait(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                request = Request(method, path, headers, body, number)
                self.requests.append(request)
                reply = self.handler(request)
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                if not await self._answer(writer, reply):
                    if reply.reset:
                        _reset(writer)
                    return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        """Send the reply; False when the connection is to be closed."""
        if reply.raw is not None:
            writer.write(reply.raw)
            await writer.drain()
            return not reply.close
        body = reply.body if reply.json is None else jsonlib.dumps(reply.json).encode()
        headers = {"Content-Type": "application/json", **reply.headers}
        if reply.chunks is None:
            headers["Content-Length"] = str(len(body))
        else:
            headers["Transfer-Encoding"] = "chunked"
        if reply.close:
            headers["Connection"] = "close"
        head = f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        if reply.chunks is None:
            data = head.encode() + body
            if reply.cut_after is not None:
                writer.write(data[: reply.cut_after])
                await writer.drain()
                return False
            writer.write(data)
        else:
            writer.write(head.encode())
            sent = 0
            for chunk in reply.chunks:
                piece = b"%x\r\n%s\r\n" % (len(chunk), chunk)
                if reply.cut_after is not None and sent + len(piece) > reply.cut_after:
                    await writer.drain()
                    return False
                writer.write(piece)
                sent += len(piece)
                await writer.drain()
                if reply.pause:
                    await asyncio.sleep(reply.pause)
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return not reply.close


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: SO_LINGER on, zero seconds."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.contextmanager
def scripted_server(
    handler: Callable[[Request], Reply], ssl_context: ssl.SSLContext | None = None
) -> Iterator[ScriptedServer]:
    """Run a ScriptedServer on 127.0.0.1 in a background thread (HTTPS with `ssl_context`)."""
    server = ScriptedServer(handler)
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=ssl_context)
        port = listener.sockets[0].getsockname()[1]
        scheme = "https" if ssl_context else "http"
        server.base_url = f"{scheme}://127.0.0.1:{port}/v1"
        server._loop = asyncio.get_running_loop()
        ready.set()
        async with listener:
            await stop.wait()
            for writer in list(server._writers):
                writer.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield server
    finally:
        assert server._loop is not None and stop is not None
        server._loop.call_soon_threadsafe(stop.set)
        thread.join(10)
