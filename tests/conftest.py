"""Shared fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import aioresponses_compat  # noqa: F401  (aioresponses on aiohttp 3.14)
from batchrunner.gateway import GatewayConfig, RunningGateway, gateway_in_thread


@pytest.fixture(scope="session")
def _session_gateway() -> Iterator[RunningGateway]:
    with gateway_in_thread(GatewayConfig(port=0)) as gateway:
        yield gateway


@pytest.fixture
def gateway(_session_gateway: RunningGateway) -> RunningGateway:
    """The gateway simulator with the default config, in a background thread, stats zeroed.

    One server for the whole session: use `start_gateway` for faults or keys.
    `gateway.base_url` is `http://127.0.0.1:PORT/v1`; any `sk-ru-...` key is accepted.
    """
    _session_gateway.stats.reset()
    return _session_gateway


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., RunningGateway]]:
    """Start a fresh simulator in a thread: `start_gateway(error_rate=0.5, fault_seed=1)`.

    Takes GatewayConfig's fields (port defaults to 0, a free one); stopped at teardown.
    """
    with contextlib.ExitStack() as stack:

        def start(**fields: Any) -> RunningGateway:
            fields.setdefault("port", 0)
            return stack.enter_context(gateway_in_thread(GatewayConfig(**fields)))

        yield start
