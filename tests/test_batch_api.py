"""The Batch API client (transport/batch_api.py): a gateway without it refused before anything
is uploaded, files and batches against the simulator, retries that make no second batch, a cut
download read on without repeats, and the key never in an error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from scripted_server import Reply, Request, scripted_server

from batchrunner.errors import AuthRefused, ConnectionFailed, PermanentError, UsageError
from batchrunner.simulator import GatewayConfig, complete, running_gateway
from batchrunner.transport.batch_api import NO_BATCH_API, BatchApi
from batchrunner.transport.client import Client

KEY = "sk-ru-batch-client-0123456789"
BASE = "http://gateway.test/v1"


async def no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


def request_lines(count: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini",
                      "messages": [{"role": "user", "content": f"Tell me about lake {i}"}]}}
            for i in range(count)]


def mocked_call(setup: Any, call: Any, key: str = KEY) -> tuple[Any, aioresponses]:
    """`call(api)` against what `setup(mocked)` mocks; returns its result and the mock."""
    async def go() -> Any:
        with aioresponses() as mocked:
            setup(mocked)
            async with Client(BASE, key) as client:
                try:
                    return await call(BatchApi(client, max_attempts=3, sleep=no_wait)), mocked
                except Exception as exc:  # noqa: BLE001 - handed to the test to inspect
                    return exc, mocked

    return asyncio.run(go())


@pytest.mark.parametrize("status", [404, 405])
def test_probe_refuses_a_gateway_without_the_batch_api(status: int) -> None:
    def setup(mocked: aioresponses) -> None:
        mocked.get(re.compile(r".*/v1/batches.*"), status=status,
                   payload={"error": {"message": "Invalid URL (GET /v1/batches)"}})

    error, mocked = mocked_call(setup, lambda api: api.probe())
    assert isinstance(error, UsageError) and str(error) == NO_BATCH_API
    assert [method for method, _ in mocked.requests] == ["GET"]  # nothing uploaded


def test_probe_says_a_refused_key_as_such() -> None:
    def setup(mocked: aioresponses) -> None:
        mocked.get(re.compile(r".*/v1/batches.*"), status=401,
                   payload={"error": {"message": "Incorrect API key provided."}})

    error, _ = mocked_call(setup, lambda api: api.probe())
    assert isinstance(error, AuthRefused)


def test_a_key_echoed_by_the_gateway_is_not_in_the_error() -> None:
    key = "plain-secret-value-42"  # not shaped like a key: only the client knows it is one

    def setup(mocked: aioresponses) -> None:
        mocked.post(f"{BASE}/batches", status=400,
                    payload={"error": {"message": f"bad request from {key} (Bearer {key})"}})

    error, _ = mocked_call(setup, lambda api: api.create("file-1"), key=key)
    assert isinstance(error, PermanentError) and error.http_status == 400
    assert key not in str(error) and "[key]" in str(error)


def test_a_retried_create_returns_the_batch_its_lost_answer_made() -> None:
    made = {"id": "batch_1", "object": "batch", "input_file_id": "file-1",
            "status": "validating"}

    def setup(mocked: aioresponses) -> None:
        mocked.post(f"{BASE}/batches", exception=aiohttp.ServerDisconnectedError())
        mocked.get(re.compile(r".*/v1/batches\?limit=100"),
                   payload={"object": "list", "data": [made], "has_more": False})

    batch, mocked = mocked_call(setup, lambda api: api.create("file-1"))
    assert batch == made
    posts = [key for key in mocked.requests if key[0] == "POST"]
    assert sum(len(mocked.requests[key]) for key in posts) == 1  # never a second batch


def test_upload_create_retrieve_list_cancel_and_lines_against_the_simulator(
    tmp_path: Path,
) -> None:
    lines = request_lines(300)
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    async def main() -> None:
        config = GatewayConfig(port=0, batch_seconds=0.2)
        async with running_gateway(config) as gateway, Client(gateway.base_url, KEY) as client:
            api = BatchApi(client, sleep=no_wait)
            await api.probe()
            file_id = await api.upload(path)
            batch = await api.create(file_id, {"output": "out/nightly.parquet"})
            assert batch["status"] == "validating" and batch["input_file_id"] == file_id
            assert batch["metadata"] == {"output": "out/nightly.parquet"}
            other = await api.create(file_id)
            assert (await api.cancel(other["id"]))["status"] == "cancelling"
            for _ in range(600):
                batch = await api.retrieve(batch["id"])
                if batch["status"] == "completed":
                    break
                await asyncio.sleep(0.02)
            assert batch["status"] == "completed", batch["status"]
            assert (await api.cancel(batch["id"]))["status"] == "completed"  # as it is
            page = await api.list(limit=1)
            assert [b["id"] for b in page["data"]] == [other["id"]] and page["has_more"]
            rest = await api.list(limit=1, after=page["last_id"])
            assert [b["id"] for b in rest["data"]] == [batch["id"]]
            got = [json.loads(line) async for line in api.lines(batch["output_file_id"])]
            assert [line["custom_id"] for line in got] == [f"row-{i}" for i in range(300)]
            first = got[0]["response"]["body"]["choices"][0]["message"]["content"]
            assert first == complete(lines[0]["body"]).texts[0]
            async with contextlib.aclosing(api.lines(batch["output_file_id"])) as stream:
                async for _ in stream:
                    break  # stopping early closes the download
            assert gateway.stats.files_created == 1 and gateway.stats.batches_created == 2

    asyncio.run(main())


def test_a_cut_download_is_read_on_from_the_first_line_not_given() -> None:
    body = b"".join(b'{"custom_id":"row-%d"}\n' % i for i in range(50))
    cut = len(body) // 2 + 7  # mid-line
    seen: list[Request] = []

    def handler(request: Request) -> Reply:
        seen.append(request)
        if len(seen) == 1:
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/jsonl\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
            return Reply(raw=head + body[:cut], close=True)
        return Reply(body=body, headers={"Content-Type": "application/jsonl"})

    async def main(base_url: str) -> list[bytes]:
        async with Client(base_url, KEY) as client:
            api = BatchApi(client, sleep=no_wait)
            return [line async for line in api.lines("file-1")]

    with scripted_server(handler) as server:
        got = asyncio.run(main(server.base_url))
    assert [json.loads(line)["custom_id"] for line in got] == [f"row-{i}" for i in range(50)]
    assert len(seen) == 2 and seen[1].path.startswith("/v1/files/file-1/content")


def test_a_download_that_keeps_failing_raises_after_the_attempts() -> None:
    def handler(request: Request) -> Reply:
        return Reply(status=503, json={"error": {"message": "overloaded"}})

    async def main(base_url: str) -> None:
        async with Client(base_url, KEY) as client:
            api = BatchApi(client, max_attempts=3, sleep=no_wait)
            async for _ in api.lines("file-1"):
                pass

    with scripted_server(handler) as server, pytest.raises(Exception) as raised:
        asyncio.run(main(server.base_url))
    assert "503" in str(raised.value) and not isinstance(raised.value, ConnectionFailed)
