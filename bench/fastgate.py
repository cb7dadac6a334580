"""A fast stand-in for the gateway simulator, for client benchmarks: precomputed answers.

The built-in simulator (`batchrunner gateway`) is an aiohttp application that parses every
request and generates its answer; it costs about 0.3 ms of CPU per request, the same order as
the client budget under test, and on a 2-core machine it would compete with the client for the
CPU being measured. This server answers `POST .../chat/completions` from an asyncio Protocol
(uvloop when installed) with one precomputed OpenAI-shaped body (a fresh `id` and the request's
`model`), after `--latency-ms`, on keep-alive HTTP/1.1 connections. `--workers N` forks N
processes that accept on one listening socket. It speaks enough of the API for batchrunner, the
`openai` SDK and litellm: chat completions (no streaming), `GET /v1/models`, and the
simulator's `GET /_simulator/stats` and `POST /_simulator/reset` (counters summed over workers).

    python bench/fastgate.py --port 0 --latency-ms 50 --workers 1

Prints `gateway listening on http://127.0.0.1:PORT/v1 pids P1 P2 ...` on stderr once it
listens. Loopback only; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import mmap
import os
import re
import signal
import socket
import struct
import sys
import time

CONTENT = "A short benchmark answer: the tea trade grew through many ports."
USAGE = {"prompt_tokens": 21, "completion_tokens": 13, "total_tokens": 34,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0}}
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-20241022", "claude-3-5-haiku-20241022")
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,100})"')
_SLOTS = 64  # bytes per worker in the shared page: requests, in_flight, max_in_flight, connections

# The answer, split around the two parts that change per request (id, model).
_HEAD = b'{"id":"chatcmpl-fast'
_MID = b'","object":"chat.completion","created":%d,"model":"'
_TAIL = (
    b'","choices":[{"index":0,"message":{"role":"assistant","content":'
    + json.dumps(CONTENT).encode()
    + b',"refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":'
    + json.dumps(USAGE, separators=(",", ":")).encode()
    + b',"service_tier":"default","system_fingerprint":"fp_bench"}'
)


def _response(status: str, body: bytes, close: bool = False) -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n" + body
    )


def _error(status: str, message: str, kind: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": kind, "code": None}}).encode()
    return _response(status, body)


_MODELS_BODY = json.dumps(
    {"object": "list",
     "data": [{"id": m, "object": "model", "created": 1715367049, "owned_by": "bench"}
              for m in MODELS]}
).encode()


class Counters:
    """Per-worker counters in an anonymous shared page, so any worker can sum them all."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.page = mmap.mmap(-1, max(mmap.PAGESIZE, workers * _SLOTS))
        self.slot = 0

    def add(self, index: int, delta: int) -> int:
        offset = self.slot * _SLOTS + 8 * index
        (value,) = struct.unpack_from("q", self.page, offset)
        struct.pack_into("q", self.page, offset, value + delta)
        return value + delta

    def own(self, index: int) -> int:
        return struct.unpack_from("q", self.page, self.slot * _SLOTS + 8 * index)[0]

    def set(self, index: int, value: int) -> None:
        struct.pack_into("q", self.page, self.slot * _SLOTS + 8 * index, value)

    def get(self, index: int) -> int:
        return sum(
            struct.unpack_from("q", self.page, w * _SLOTS + 8 * index)[0]
            for w in range(self.workers)
        )

    def to_json(self) -> dict[str, int]:
        requests = self.get(0)
        return {"requests": requests, "in_flight": self.get(1), "max_in_flight": self.get(2),
                "connections": self.get(3), "by_status": {"200": requests}}

    def reset(self) -> None:
        for w in range(self.workers):
            for index in (0, 2, 3):  # requests, max_in_flight, connections; in_flight is live
                struct.pack_into("q", self.page, w * _SLOTS + 8 * index, 0)


class Http(asyncio.Protocol):
    """One keep-alive connection: parse requests as they come, answer after the latency."""

    latency: float = 0.0
    counters: Counters
    ids = itertools.count()
    prefix = b""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counters.add(3, 1)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._close_with(_error("400 Bad Request", "bad request line", "invalid_request_error"))
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            start = end + 4
            if headers.get("transfer-encoding", "").lower() == "chunked":
                parsed = _dechunk(self.buffer, start)
                if parsed is None:
                    return
                body, consumed = parsed
            else:
                length = int(headers.get("content-length") or 0)
                if len(self.buffer) < start + length:
                    return
                body, consumed = self.buffer[start:start + length], start + length
            self.buffer = self.buffer[consumed:]
            close = headers.get("connection", "").lower() == "close"
            self._handle(method, target, headers, body, close)

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes,
                close: bool) -> None:
        path = target.split("?", 1)[0]
        if method == "POST" and path.endswith("/chat/completions"):
            auth = headers.get("authorization", "")
            if not auth.startswith("Bearer sk-"):
                self._send(_error("401 Unauthorized", "Incorrect API key provided.",
                                  "invalid_request_error"), close)
                return
            match = _MODEL.search(body)
            model = match.group(1) if match else b"gpt-4o-mini"
            counters = self.counters
            counters.add(0, 1)
            in_flight = counters.add(1, 1)
            if in_flight > counters.own(2):
                counters.set(2, in_flight)
            answer = (
                _HEAD + self.prefix + b"%x" % next(self.ids) + _MID % int(time.time())
                + model + _TAIL
            )
            response = _response("200 OK", answer, close)
            if self.latency > 0:
                self.loop.call_later(self.latency, self._deliver, response, close)
            else:
                self._done_one()
                self._send(response, close)
        elif method == "GET" and path.endswith("/models"):
            self._send(_response("200 OK", _MODELS_BODY), close)
        elif method == "GET" and path == "/_simulator/stats":
            self._send(_response("200 OK", json.dumps(self.counters.to_json()).encode()), close)
        elif method == "POST" and path == "/_simulator/reset":
            self.counters.reset()
            self._send(_response("200 OK", b"{}"), close)
        else:
            self._send(_error("404 Not Found", f"no route {method} {path}", "invalid_request_error"), close)

    def _done_one(self) -> None:
        self.counters.add(1, -1)

    def _deliver(self, response: bytes, close: bool) -> None:
        # Clients here do not pipeline; with one fixed latency, answers leave in request
        # order anyway (call_later keeps the order of equal delays).
        self._done_one()
        self._send(response, close)

    def _send(self, data: bytes, close: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if close:
            self.transport.close()

    def _close_with(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.transport.close()


def _dechunk(buffer: bytes, start: int) -> tuple[bytes, int] | None:
    """A chunked body from `buffer[start:]`: (body, end offset), or None while incomplete."""
    parts = []
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(buffer[position:line_end].split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", position)
            if trailer_end < 0:
                return None
            return b"".join(parts), trailer_end + 2
        if len(buffer) < position + size + 2:
            return None
        parts.append(buffer[position:position + size])
        position += size + 2


async def _worker_main(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Http, sock=sock, backlog=4096)
    async with server:
        await stop.wait()


def _run_worker(sock: socket.socket, latency: float, counters: Counters, slot: int) -> None:
    Http.latency = latency
    Http.counters = counters
    Http.prefix = b"%02x" % slot
    counters.slot = slot
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(_worker_main(sock))
    else:
        uvloop.run(_worker_main(sock))


def main(argv: list[str] | None = None) -> None:
    """Parse options, listen, fork the workers and wait for them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("fastgate serves loopback only")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    counters = Counters(args.workers)
    latency = args.latency_ms / 1000

    pids = []
    for slot in range(args.workers):
        pid = os.fork()
        if pid == 0:
            with contextlib.suppress(KeyboardInterrupt):
                _run_worker(sock, latency, counters, slot)
            os._exit(0)
        pids.append(pid)
    sock.close()
    print(
        f"gateway listening on http://{args.host}:{port}/v1 pids {' '.join(map(str, pids))}",
        file=sys.stderr, flush=True,
    )

    def forward(signum: int, _frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for pid in pids:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


if __name__ == "__main__":
    main()
