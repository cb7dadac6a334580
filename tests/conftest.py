"""Shared fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aioresponses_compat  # noqa: F401  (aioresponses on aiohttp 3.14)
import pytest
from optional import require
from pyarrow import fs

from batchrunner.simulator import GatewayConfig, RunningGateway, gateway_in_thread


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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on loopback, for object-store paths (docs/buckets.md)."""
    moto_server = require("moto.server", "test-s3", "the object-store tests (moto's S3 server)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A fresh bucket; the environment points s3:// at the server; staging under tmp_path."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("BATCHRUNNER_STAGING", str(tmp_path / "staging-a"))
    s3 = fs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True)
    name = f"bucket-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    s3.create_dir(name)
    return s3, name
