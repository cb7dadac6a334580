"""The results viewer: a local web page to browse, filter and compare batchrunner results.

Server side only, like the gateway simulator: an aiohttp application and its bundled static
files (no CDN, nothing fetched from the internet).

    sources.py       a finished Parquet output or a live run's checkpoint, read in pieces
    dataset.py       the index over them: totals, filters, pages, one row, a sweep's rows
    request_view.py  the request a row sent, rebuilt from its input columns and the manifest
    app.py           the aiohttp application: the page, the assets, the JSON API, the token
    server.py        serving it until Ctrl-C
    static/          index.html, app.js, style.css

>>> serve(ViewerConfig(paths=("out/eval.parquet",)), on_ready=print)
"""

from __future__ import annotations

from batchrunner.viewer.app import create_app
from batchrunner.viewer.dataset import Dataset, Filters
from batchrunner.viewer.server import (
    ViewerConfig,
    is_loopback,
    return_freed_memory,
    serve,
    serve_async,
)
from batchrunner.viewer.sources import open_sources

__all__ = [
    "Dataset",
    "Filters",
    "ViewerConfig",
    "create_app",
    "is_loopback",
    "open_sources",
    "return_freed_memory",
    "serve",
    "serve_async",
]
