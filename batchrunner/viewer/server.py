"""Running the viewer: open the results, bind loopback (or a host with a token), serve, stop."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import secrets
import signal
import socket
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from batchrunner.errors import UsageError
from batchrunner.viewer.app import create_app
from batchrunner.viewer.dataset import Dataset, Filters
from batchrunner.viewer.sources import open_sources

__all__ = ["ViewerConfig", "is_loopback", "return_freed_memory", "serve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewerConfig:
    """What `batchrunner view` serves and where.

    The token guards every request; None draws a random one (it goes in the printed URL).

    >>> ViewerConfig(paths=("out/eval.parquet",), port=8765, open_browser=False)
    """

    paths: tuple[str | Path, ...]
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    open_browser: bool = True

    def __post_init__(self) -> None:
        if not self.paths:
            raise UsageError("view: name at least one results file")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, not {self.port}")
        if self.token is not None and (len(self.token) < 8 or not self.token.isprintable()):
            raise UsageError("--token must be at least 8 printable characters")


def return_freed_memory() -> None:
    """Have glibc's malloc hand large freed blocks back to the system at once.

    Each page, search or row view decodes row groups (megabytes of text) and frees them.
    glibc raises its mmap threshold after such a free, so later blocks come from the heap,
    which seldom shrinks: on a 1,000,000-row file the server's peak went from about 300 MB
    to 450 MB that way (bench/viewer.py). A fixed threshold keeps those blocks mmapped.
    The CLI calls this (it changes the whole process); elsewhere it does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ViewerConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the page until Ctrl-C or SIGTERM; `on_ready(url)` once it listens.

    Raises UsageError for results that cannot be read or an address that cannot be bound.
    """
    asyncio.run(serve_async(config, on_ready=on_ready))


async def serve_async(
    config: ViewerConfig, *, on_ready: Callable[[str], None] | None = None
) -> None:
    """`serve`, inside a running event loop."""
    if not is_loopback(config.host) and config.token is None:
        log.info("view: %s is not loopback: a random token guards the page", config.host)
    token = config.token or secrets.token_urlsafe(18)
    sources = open_sources(list(config.paths))
    dataset = await asyncio.to_thread(Dataset, sources)
    await asyncio.to_thread(dataset.summary, Filters())  # what the page asks first: ready now
    runner = web.AppRunner(create_app(dataset, token=token), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        port = _bound_port(site) or config.port
        url = f"http://{_url_host(config.host)}:{port}/?token={token}"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if on_ready is not None:
            on_ready(url)
        if config.open_browser:
            await asyncio.to_thread(webbrowser.open, url)
        await stop.wait()
    finally:
        await runner.cleanup()


def _bound_port(site: web.TCPSite) -> int | None:
    server = site._server  # aiohttp keeps the asyncio server here; port 0 needs the real one
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else None


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    if ":" in host:
        return f"[{host}]"
    return host
