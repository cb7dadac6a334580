"""aioresponses on aiohttp 3.14: the responses it builds lack the new `stream_writer` argument.

aiohttp 3.14 made `ClientResponse.__init__` require `stream_writer`; aioresponses 0.7.9 does
not pass it (pnuckowski/aioresponses#289, open). Its responses are whole from the start (the
request counts as sent), so a writer that reports zero bytes written is all they need. Imported
by conftest.py, so every test that uses aioresponses gets it; a no-op once aioresponses passes
the argument itself, and on an aiohttp before 3.14, which does not take it.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import aiohttp
import aioresponses.core

# Before 3.14 (pyproject allows 3.11) ClientResponse takes no `stream_writer`: passing one
# there is a TypeError, so the shim applies only where the argument exists.
TAKES_STREAM_WRITER = "stream_writer" in inspect.signature(aiohttp.ClientResponse).parameters


class CompatResponse(aiohttp.ClientResponse):
    """ClientResponse that supplies a finished `stream_writer` when none is given."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


if TAKES_STREAM_WRITER and aioresponses.core.ClientResponse is aiohttp.ClientResponse:
    aioresponses.core.ClientResponse = CompatResponse  # type: ignore[misc]
