"""The simulator's Batch API (docs/simulator.md): OpenAI's shapes and statuses on a virtual
clock, expiry and cancellation keeping the done lines, per-line faults, stats, the SDK."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
from fakeclock import FakeClock
from openai.types import Batch, FileObject

from batchrunner.simulator import GatewayConfig, complete, gateway_in_thread, running_gateway

KEY = "sk-ru-batch-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


class ManualClock:
    """Virtual time moved only by `advance`, which then lets every woken task run."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, wake))
        await wake

    async def advance_to(self, moment: float) -> None:
        self.now = moment
        for entry in list(self._sleepers):
            if entry[0] <= moment + 1e-9:
                self._sleepers.remove(entry)
                if not entry[1].done():
                    entry[1].set_result(None)
        for _ in range(50):
            await asyncio.sleep(0)


def body_for(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **fields}


def request_line(custom_id: str, body: dict[str, Any], **fields: Any) -> str:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": body, **fields}
    return json.dumps(line)


def lines_of(count: int) -> list[str]:
    return [request_line(f"row-{i}", body_for(f"Question number {i} about rivers")) for i in
            range(count)]


class Api:
    """The Batch API over aiohttp, answered whatever the status."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base = base_url

    async def call(self, method: str, path: str, **options: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, headers=AUTH,
                                        **options) as response:
            raw = await response.read()
            kind = response.content_type
            return response.status, json.loads(raw) if kind == "application/json" else raw

    async def upload(self, lines: list[str], purpose: str = "batch") -> tuple[int, Any]:
        form = aiohttp.FormData()
        form.add_field("purpose", purpose)
        form.add_field("file", ("\n".join(lines) + "\n").encode(), filename="in.jsonl",
                       content_type="application/jsonl")
        return await self.call("POST", "/files", data=form)

    async def create(self, lines: list[str], **fields: Any) -> dict[str, Any]:
        status, file = await self.upload(lines)
        assert status == 200, file
        body = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h", **fields}
        status, batch = await self.call("POST", "/batches", json=body)
        assert status == 200, batch
        return batch

    async def batch(self, batch_id: str) -> dict[str, Any]:
        status, batch = await self.call("GET", f"/batches/{batch_id}")
        assert status == 200, batch
        Batch.model_validate(batch, strict=True)  # the SDK's own model, every field checked
        return batch

    async def content(self, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        status, raw = await self.call("GET", f"/files/{file_id}/content")
        assert status == 200, raw
        return [json.loads(line) for line in raw.splitlines()]


async def _api(config: GatewayConfig, clock: Any) -> AsyncIterator[tuple[Api, Any]]:
    async with running_gateway(config, clock) as gateway, aiohttp.ClientSession() as session:
        yield Api(session, gateway.base_url), gateway


def run(test: Any, clock: Any = None, **fields: Any) -> None:
    """Run `test(api, gateway)` against a fresh simulator on `clock`."""
    config = GatewayConfig(port=0, **fields)

    async def main() -> None:
        async for api, gateway in _api(config, clock):
            await test(api, gateway)

    asyncio.run(main())


def test_a_batch_goes_validating_in_progress_finalizing_completed_on_the_clock() -> None:
    clock = ManualClock()
    lines = lines_of(8)

    async def test(api: Api, gateway: Any) -> None:
        batch = await api.create(lines, metadata={"output": "out/nightly.parquet"})
        assert batch["object"] == "batch" and batch["status"] == "validating"
        assert batch["request_counts"] == {"total": 8, "completed": 0, "failed": 0}
        assert batch["metadata"] == {"output": "out/nightly.parquet"}
        assert batch["expires_at"] == batch["created_at"] + 24 * 3600
        seen = []
        for moment in (0.5, 1.0, 3.0, 5.0, 9.0, 9.5, 10.0):
            await clock.advance_to(moment)
            now = await api.batch(batch["id"])
            seen.append((moment, now["status"], now["request_counts"]["completed"]))
        assert seen == [
            (0.5, "validating", 0), (1.0, "in_progress", 0), (3.0, "in_progress", 2),
            (5.0, "in_progress", 4), (9.0, "finalizing", 8), (9.5, "finalizing", 8),
            (10.0, "completed", 8),
        ]
        done = await api.batch(batch["id"])
        assert done["error_file_id"] is None and done["errors"] is None
        assert done["created_at"] <= done["in_progress_at"] <= done["finalizing_at"] \
            <= done["completed_at"]
        output = await api.content(done["output_file_id"])
        assert [line["custom_id"] for line in output] == [f"row-{i}" for i in range(8)]
        for number, line in enumerate(output):
            assert line["error"] is None and line["id"].startswith("batch_req_")
            response = line["response"]
            assert response["status_code"] == 200 and response["request_id"]
            expected = complete(json.loads(lines[number])["body"])
            assert response["body"]["choices"][0]["message"]["content"] == expected.texts[0]
            assert response["body"]["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
        usage = done["usage"]
        assert usage["input_tokens"] == sum(
            line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
        status, file = await api.call("GET", f"/files/{done['output_file_id']}")
        assert status == 200 and file["purpose"] == "batch_output" and file["bytes"] > 0
        FileObject.model_validate(file, strict=True)

    run(test, clock, batch_seconds=10)


def test_expire_after_keeps_the_done_lines_and_lists_the_rest_as_expired() -> None:
    clock = ManualClock()

    async def test(api: Api, gateway: Any) -> None:
        batch = await api.create(lines_of(8))
        for moment in (1.0, 5.0, 9.0, 10.0):
            await clock.advance_to(moment)
        done = await api.batch(batch["id"])
        assert done["status"] == "expired" and done["expired_at"] is not None
        assert done["request_counts"] == {"total": 8, "completed": 3, "failed": 0}
        output = await api.content(done["output_file_id"])
        assert [line["custom_id"] for line in output] == ["row-0", "row-1", "row-2"]
        errors = await api.content(done["error_file_id"])
        assert [line["custom_id"] for line in errors] == [f"row-{i}" for i in range(3, 8)]
        assert all(line["response"] is None and line["error"]["code"] == "batch_expired"
                   for line in errors)

    run(test, clock, batch_seconds=10, batch_expire_after=3)


def test_cancel_keeps_the_done_lines() -> None:
    clock = ManualClock()

    async def test(api: Api, gateway: Any) -> None:
        batch = await api.create(lines_of(10))
        await clock.advance_to(5.0)
        status, cancelling = await api.call("POST", f"/batches/{batch['id']}/cancel")
        assert status == 200 and cancelling["status"] == "cancelling"
        assert cancelling["request_counts"]["completed"] == 5
        await clock.advance_to(6.0)
        done = await api.batch(batch["id"])
        assert done["status"] == "cancelled"
        assert done["cancelling_at"] <= done["cancelled_at"]
        output = await api.content(done["output_file_id"])
        assert [line["custom_id"] for line in output] == [f"row-{i}" for i in range(5)]
        errors = await api.content(done["error_file_id"])
        assert [line["error"]["code"] for line in errors] == ["batch_cancelled"] * 5
        status, again = await api.call("POST", f"/batches/{batch['id']}/cancel")
        assert status == 400 and "cancelled" in again["error"]["message"]

    run(test, clock, batch_seconds=10)


def test_per_line_faults_and_bad_bodies_go_to_the_error_file() -> None:
    clock = ManualClock()
    lines = lines_of(40) + [request_line("bad-model", body_for("hi", model="no-such-model"))]

    async def test(api: Api, gateway: Any) -> None:
        batch = await api.create(lines)
        for moment in (1.0, 5.0, 9.0, 10.0):
            await clock.advance_to(moment)
        done = await api.batch(batch["id"])
        assert done["status"] == "completed"
        output = await api.content(done["output_file_id"])
        errors = await api.content(done["error_file_id"])
        counts = done["request_counts"]
        assert counts["completed"] == len(output) and counts["failed"] == len(errors)
        assert len(output) + len(errors) == 41
        statuses = {line["response"]["status_code"] for line in errors}
        assert 404 in statuses and statuses <= {404, 500, 503} and statuses & {500, 503}
        for line in errors:
            assert line["error"] is None
            assert line["response"]["body"]["error"]["message"]
        bad = next(line for line in errors if line["custom_id"] == "bad-model")
        assert bad["response"]["body"]["error"]["code"] == "model_not_found"
        # faults are per line: some of the 40 failed, most did not
        assert 5 <= counts["failed"] <= 35

    run(test, clock, batch_seconds=10, error_rate=0.5, fault_seed=3)


def test_cached_tokens_are_reported_as_the_chat_endpoint_reports_them() -> None:
    clock = ManualClock()
    prompt = "rivers and lakes " * 500  # past the 1024-token cached prefix
    lines = [request_line("first", body_for(prompt + "first?")),
             request_line("second", body_for(prompt + "second?"))]

    async def test(api: Api, gateway: Any) -> None:
        batch = await api.create(lines)
        for moment in (1.0, 9.0, 10.0):
            await clock.advance_to(moment)
        done = await api.batch(batch["id"])
        output = await api.content(done["output_file_id"])
        cached = [line["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
                  for line in output]
        assert cached[0] == 0 and cached[1] >= 1024
        assert done["usage"]["input_tokens_details"]["cached_tokens"] == cached[1]

    run(test, clock, batch_seconds=10)


def test_a_batch_slower_than_its_window_expires_at_24_hours_with_what_it_finished() -> None:
    clock = FakeClock()  # time jumps whenever the loop is idle: two days pass in no time

    async def test(api: Api, gateway: Any) -> None:
        batch = await api.create(lines_of(10))
        while (now := await api.batch(batch["id"]))["status"] not in ("expired", "completed"):
            await clock.sleep(600)
        assert now["status"] == "expired"
        assert now["expired_at"] - now["created_at"] in range(24 * 3600, 24 * 3600 + 601)
        # 48 hours to answer: about 24 hours of 0.8 x 48 answered, the other lines expired
        assert 5 <= now["request_counts"]["completed"] <= 6
        errors = await api.content(now["error_file_id"])
        assert len(errors) == 10 - now["request_counts"]["completed"]

    run(test, clock, batch_seconds=48 * 3600)


def test_a_file_with_bad_lines_fails_the_batch_with_its_errors() -> None:
    clock = ManualClock()
    lines = [
        request_line("a", body_for("one")),
        request_line("a", body_for("two")),
        request_line("b", body_for("three"), url="/v1/embeddings"),
        request_line("c", body_for("four"), method="GET"),
        "not json",
        json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions"}),
    ]

    async def test(api: Api, gateway: Any) -> None:
        batch = await api.create(lines)
        await clock.advance_to(1.0)
        done = await api.batch(batch["id"])
        assert done["status"] == "failed" and done["failed_at"] is not None
        assert done["output_file_id"] is None and done["error_file_id"] is None
        errors = done["errors"]
        assert errors["object"] == "list"
        assert [(e["line"], e["code"]) for e in errors["data"]] == [
            (2, "duplicate_custom_id"), (3, "invalid_url"), (4, "invalid_method"),
            (5, "invalid_json_line"), (6, "missing_required_parameter"),
        ]

    run(test, clock, batch_seconds=10)


def test_refusals_stats_listing_and_deleting() -> None:
    clock = ManualClock()

    async def test(api: Api, gateway: Any) -> None:
        status, error = await api.upload(lines_of(1), purpose="fine-tune")
        assert status == 400 and error["error"]["param"] == "purpose"
        status, file = await api.upload(lines_of(2))
        assert status == 200 and file["object"] == "file" and file["purpose"] == "batch"
        good = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h"}
        for wrong, param in (({"input_file_id": "file-nope"}, "input_file_id"),
                             ({"endpoint": "/v1/embeddings"}, "endpoint"),
                             ({"completion_window": "1h"}, "completion_window"),
                             ({"metadata": {"k": 1}}, "metadata")):
            status, error = await api.call("POST", "/batches", json={**good, **wrong})
            assert status == 400 and error["error"]["param"] == param, (wrong, error)
        ids = []
        for _ in range(3):
            status, batch = await api.call("POST", "/batches", json=good)
            ids.append(batch["id"])
        status, page = await api.call("GET", "/batches", params={"limit": "2"})
        assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
        status, rest = await api.call("GET", "/batches",
                                      params={"limit": "2", "after": page["last_id"]})
        assert [b["id"] for b in rest["data"]] == ids[:1] and not rest["has_more"]
        async with api.session.get(api.base + "/batches") as response:  # no key
            assert response.status == 401
        stats = gateway.stats.to_json()
        assert stats["files_created"] == 1 and stats["batches_created"] == 3
        assert stats["requests"] == 0  # batch lines are not chat requests
        status, deleted = await api.call("DELETE", f"/files/{file['id']}")
        assert deleted == {"id": file["id"], "object": "file", "deleted": True}
        status, _ = await api.call("GET", f"/files/{file['id']}/content")
        assert status == 404
        gateway.stats.reset()
        assert gateway.stats.to_json()["batches_created"] == 0

    run(test, clock, batch_seconds=10)


def test_the_files_and_batches_of_the_openai_sdk_work_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines_of(5)) + "\n")
    config = GatewayConfig(port=0, batch_seconds=0.3)
    with gateway_in_thread(config) as gateway, \
            openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as client:
        with path.open("rb") as handle:
            file = client.files.create(file=handle, purpose="batch")
        assert file.purpose == "batch" and file.bytes == path.stat().st_size
        assert client.files.retrieve(file.id).id == file.id
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"output": "o.parquet"})
        assert batch.status == "validating" and batch.metadata == {"output": "o.parquet"}
        other = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        assert client.batches.cancel(other.id).status == "cancelling"
        deadline = time.monotonic() + 30
        while (batch := client.batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline, batch.status
            time.sleep(0.05)
        assert batch.request_counts is not None and batch.request_counts.completed == 5
        listed = [b.id for b in client.batches.list(limit=1)]  # pages of one, followed
        assert listed == [other.id, batch.id]
        content = client.files.content(batch.output_file_id).text
        assert [json.loads(line)["custom_id"] for line in content.splitlines()] == [
            f"row-{i}" for i in range(5)]
        assert client.files.delete(file.id).deleted
        assert gateway.stats.files_created == 1 and gateway.stats.batches_created == 2


def test_the_gateway_command_takes_the_batch_options(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "batchrunner", "gateway", "--port", "0",
               "--batch-seconds", "0", "--batch-expire-after", "2"]
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen(command, cwd=root, stderr=subprocess.PIPE, text=True) as gateway:
        try:
            assert gateway.stderr is not None
            base_url = gateway.stderr.readline().rsplit(" ", 1)[-1].strip()

            async def main() -> dict[str, Any]:
                async with aiohttp.ClientSession() as session:
                    api = Api(session, base_url)
                    batch = await api.create(lines_of(5))
                    deadline = time.monotonic() + 30
                    while (batch := await api.batch(batch["id"]))["status"] != "expired":
                        assert time.monotonic() < deadline, batch["status"]
                        await asyncio.sleep(0.05)
                    return batch

            batch = asyncio.run(main())
            assert batch["request_counts"] == {"total": 5, "completed": 2, "failed": 0}
        finally:
            gateway.terminate()
    refused = subprocess.run([*command[:6], "--batch-expire-after=-1"], cwd=root,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--batch-expire-after" in refused.stderr
