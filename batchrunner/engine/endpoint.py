"""Where a run's requests go: the gateway the options name, or the in-process simulator.

`--local` (and `local=True` in the library) is served here, above the engine: the engine's
run takes a base URL and a key and never learns whether a simulator answers them. The
simulator (`batchrunner.simulator`) is imported only when a local run starts.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

from batchrunner.config.endpoints import Endpoint
from batchrunner.config.settings import (
    RunConfig,
    key_env_names,
    resolve_api_key,
    resolve_base_url,
    resolve_endpoints,
)

__all__ = ["endpoint", "local_gateway", "run_endpoint", "run_endpoints"]


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


def run_endpoints(config: RunConfig) -> tuple[RunConfig, tuple[Endpoint, ...]]:
    """The endpoints a run sends to, and its config for them.

    One endpoint (`--local`, or one base URL and one key: the ordinary run): the config as it
    is and no endpoints (`run_endpoint` serves it). A single
    declared endpoint (`--endpoint URL`, or `endpoints` of one entry) becomes the run's base
    URL, key variable and limits. Several (declared, or several key variables on one base
    URL): every one, resolved (`resolve_endpoints`: each key variable must be set).
    """
    if config.local or (not config.endpoints and len(key_env_names(config.api_key_env)) <= 1):
        return config, ()
    endpoints = resolve_endpoints(config)
    if len(endpoints) > 1:
        return config, endpoints
    one = endpoints[0]
    return config.replace(
        endpoints=(), base_url=one.base_url, api_key_env=one.api_key_env, rpm=one.rpm,
        tpm=one.tpm, concurrency=one.concurrency,
    ), ()
