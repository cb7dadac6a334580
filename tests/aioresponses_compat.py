"""Lets aioresponses 0.7.x build responses under aiohttp 3.14.

aiohttp 3.14 (a security release) added a required `stream_writer` argument to
ClientResponse; aioresponses 0.7.9 does not pass it yet (pnuckowski/aioresponses#289). Mocked
responses have sent nothing, so a writer that reports zero bytes is the honest value. Import
this module before using aioresponses; it does nothing on versions that need no help.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

from aiohttp import ClientResponse

_original_init = ClientResponse.__init__

if "stream_writer" in inspect.signature(_original_init).parameters:

    def _init(self: ClientResponse, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        _original_init(self, *args, **kwargs)

    ClientResponse.__init__ = _init  # type: ignore[method-assign]
