"""A forward HTTP proxy on loopback, as a corporate proxy is to a client: real sockets.

It serves both ways a client uses a proxy: `CONNECT host:port` (HTTPS through a tunnel) and
absolute-form requests (`POST http://host:port/path HTTP/1.1`, plain HTTP). Host names are
looked up in `hosts` first, so a test can name a gateway that no DNS knows (`gateway.invalid`)
and reach it only through the proxy. Each request the proxy sees is kept in `seen`.

    with forward_proxy(hosts={"gateway.invalid": "127.0.0.1"}) as proxy:
        ... proxy.url ... proxy.seen ...
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Seen:
    """One request as the proxy read it: method, target, headers (lower-case names)."""

    method: str
    target: str
    headers: dict[str, str]


@dataclass
class ForwardProxy:
    """What the proxy saw, and where it listens."""

    hosts: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: a tunnel, or one absolute-form request forwarded."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                self.seen.append(Seen(method, target, headers))
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    await self._tunnel(reader, writer, host, int(port))
                    return
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                await self._forward(writer, method, target, lines[1:], body)
                return  # the answer said Connection: close
        finally:
            await _closed(writer)

    async def _tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self.hosts.get(host, host), port
        )
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer),
            return_exceptions=True,
        )

    async def _forward(
        self, writer: asyncio.StreamWriter, method: str, target: str, header_lines: list[str],
        body: bytes,
    ) -> None:
        """Send one request on to its origin (a connection of its own) and its answer back."""
        url = urlsplit(target)
        path = url.path + (f"?{url.query}" if url.query else "")
        kept = [
            line for line in header_lines
            if line and not line.lower().startswith(("proxy-", "connection:", "keep-alive:"))
        ]
        head = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""])
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self.hosts.get(url.hostname or "", url.hostname), url.port or 80
        )
        upstream_writer.write(head.encode("latin-1") + body)
        await upstream_writer.drain()
        answer = await upstream_reader.read()  # the origin closes: Connection: close
        await _closed(upstream_writer)
        # The answer may say keep-alive; the client is told this connection ends with it.
        status_end = answer.index(b"\r\n") + 2
        writer.write(answer[:status_end] + b"Connection: close\r\n" + _without_connection(
            answer[status_end:]))
        await writer.drain()


def _without_connection(rest: bytes) -> bytes:
    head, _, body = rest.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        await _closed(writer)


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Close a connection and wait until it is (the loop may stop right after the test)."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


@contextlib.contextmanager
def forward_proxy(hosts: dict[str, str] | None = None) -> Iterator[ForwardProxy]:
    """Run a ForwardProxy on 127.0.0.1 (a free port) in a background thread."""
    proxy = ForwardProxy(hosts=dict(hosts or {}))
    ready = threading.Event()
    loop: asyncio.AbstractEventLoop | None = None
    stop: asyncio.Event | None = None

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await proxy.serve(reader, writer)

    async def main() -> None:
        nonlocal loop, stop
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        listener = await asyncio.start_server(serve, "127.0.0.1", 0)
        proxy.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        ready.set()
        async with listener:
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield proxy
    finally:
        assert loop is not None and stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
