"""Where a run's requests go: the gateway the options name, or the in-process simulator.

`--local` (and `local=True` in the library) is served here, above the engine: the engine's
run takes a base URL and a key and never learns whether a simulator answers them. The
simulator (`batchrunner.simulator`) is imported only when a local run starts.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

from batchrunner.config.settings import RunConfig, resolve_api_key, resolve_base_url

__all__ = ["endpoint", "local_gateway", "run_endpoint"]


@contextlib.asynccontextmanager
async def local_gateway() -> AsyncIterator[tuple[str, str]]:
    """The gateway simulator on a free loopback port, for the block: (base URL, throwaway key)."""
    from batchrunner.simulator import (  # server side: only for --local
        GatewayConfig,
        running_gateway,
    )

    async with running_gateway(GatewayConfig(port=0)) as gateway:
        yield gateway.base_url, "sk-ru-local-" + secrets.token_hex(12)


@contextlib.asynccontextmanager
async def endpoint(
    local: bool, base_url: str | None = None, api_key_env: str | None = None
) -> AsyncIterator[tuple[str, str]]:
    """(base URL, API key) for the block: the simulator's if `local`, else the resolved ones.

    A missing base URL or key is a UsageError before anything starts.
    """
    if local:
        async with local_gateway() as served:
            yield served
        return
    yield resolve_base_url(base_url), resolve_api_key(api_key_env)


def run_endpoint(config: RunConfig) -> contextlib.AbstractAsyncContextManager[tuple[str, str]]:
    """`endpoint` for a run's config (`local`, `base_url`, `api_key_env`)."""
    return endpoint(config.local, config.base_url, config.api_key_env)
