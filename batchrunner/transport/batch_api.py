"""The provider's Batch API from the client side: request files uploaded, batches created,
watched, cancelled, and their output read back, a line at a time.

It goes through the run's `Client` (client.py): the same session, key, proxy, timeouts, error
classes and key scrubbing as a chat request. Calls are retried as a row is (transport/retry.py:
429, 5xx, timeouts, connection errors, with backoff and Retry-After); a retried `create` first
looks for the batch its lost answer may have created, so that a batch is not made twice.

    async with Client(base_url, key) as client:
        api = BatchApi(client)
        await api.probe()  # UsageError: this gateway has no Batch API
        file_id = await api.upload(Path("requests.jsonl"))
        batch = await api.create(file_id, {"output": "out/nightly.parquet"})
        batch = await api.retrieve(batch["id"])
        async with contextlib.aclosing(api.lines(batch["output_file_id"])) as lines:
            async for line in lines:
                ...
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from batchrunner.errors import (
    InvalidResponse,
    PermanentError,
    RetryableError,
    UsageError,
)
from batchrunner.transport.client import Client
from batchrunner.transport.retry import call_with_retries

__all__ = ["CHAT_ENDPOINT", "NO_BATCH_API", "BatchApi"]

NO_BATCH_API = "this gateway has no Batch API; run without --engine batch"
CHAT_ENDPOINT = "/v1/chat/completions"
FIND_LIMIT = 100  # batches looked through for the one a lost `create` answer made
READ_BYTES = 1 << 16


class BatchApi:
    """The Batch API of the gateway `client` talks to; `client` must be open.

    `max_attempts` and `sleep` are the retry policy's (a test passes a sleep that costs no
    time). Every method raises batchrunner's error classes, their texts scrubbed of the key.
    """

    def __init__(
        self,
        client: Client,
        *,
        max_attempts: int = 6,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._max_attempts = max_attempts
        self._sleep = sleep

    async def probe(self) -> None:
        """Check that the gateway serves the Batch API: a 404 or 405 to `GET /batches` is a
        UsageError saying so; other failures are raised as they are."""
        try:
            await self._retried("GET", "/batches", params={"limit": "1"})
        except PermanentError as exc:
            if exc.http_status in (404, 405):
                raise UsageError(NO_BATCH_API) from None
            raise

    async def upload(self, path: Path | str) -> str:
        """Upload a request file (`purpose=batch`), streamed from disk; its file id."""
        path = Path(path)

        async def send() -> dict[str, Any]:
            with path.open("rb") as handle:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", handle, filename=path.name,
                               content_type="application/jsonl")
                payload = form()
                return await self._once("POST", "/files", data=payload,
                                        content_type=payload.content_type)

        file = await call_with_retries(send, self._max_attempts, sleep=self._sleep)
        return _field(file, "id", "POST /files")

    async def create(self, file_id: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Create a batch of the uploaded file for the chat endpoint, window `24h`.

        If an attempt fails after it may have reached the gateway, the next one first looks
        for a batch of this file among the newest, and returns it rather than make another.
        """
        body: dict[str, Any] = {
            "input_file_id": file_id, "endpoint": CHAT_ENDPOINT, "completion_window": "24h",
        }
        if metadata is not None:
            body["metadata"] = metadata
        attempts = 0

        async def send() -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                made = await self._made_from(file_id)
                if made is not None:
                    return made
            return await self._once("POST", "/batches", data=_dumps(body))

        batch = await call_with_retries(send, self._max_attempts, sleep=self._sleep)
        _field(batch, "id", "POST /batches")
        return batch

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object as the gateway has it now."""
        return await self._retried("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask the gateway to cancel a batch; the batch as it is after the request.

        A batch that cannot be cancelled any more (finished, or already cancelling) is not an
        error: it is returned as it is.
        """
        try:
            return await self._retried("POST", f"/batches/{batch_id}/cancel")
        except PermanentError as exc:
            if exc.http_status != 400:
                raise
            return await self.retrieve(batch_id)

    async def list(self, *, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        """One page of batches, newest first: `data`, `has_more`, `last_id` (the next `after`)."""
        params = {"limit": str(limit)}
        if after is not None:
            params["after"] = after
        return await self._retried("GET", "/batches", params=params)

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """The lines of a file's content (without their newline; blank ones skipped), read as
        they arrive, never the whole file at once.

        A download cut by a retryable failure is opened again and read on from the first line
        not yet given (the lines before are skipped, not given twice), up to `max_attempts`
        failures in a row. Close it (`contextlib.aclosing`) if you stop early.
        """
        given = 0  # bytes of the lines already given, newlines included
        failures = 0
        while True:
            skip = given
            try:
                async with self._client.request(
                    "GET", f"/files/{file_id}/content", stream=True
                ) as response:
                    rest = b""
                    async for chunk in response.content.iter_chunked(READ_BYTES):
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        *whole, rest = (rest + chunk).split(b"\n")
                        for line in whole:
                            given += len(line) + 1
                            failures = 0
                            if line.strip():
                                yield line
                    if rest.strip():
                        given += len(rest)
                        yield rest
                    return
            except RetryableError as exc:
                failures += 1
                if failures >= self._max_attempts:
                    raise
                wait = min(30.0, 0.5 * 2 ** (failures - 1))
                await self._sleep(max(wait, getattr(exc, "retry_after", None) or 0.0))

    # -- one call ----------------------------------------------------------------------------

    async def _retried(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        return await call_with_retries(
            lambda: self._once(method, path, **options), self._max_attempts, sleep=self._sleep
        )

    async def _once(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        async with self._client.request(method, path, **options) as response:
            raw = await response.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            raise InvalidResponse(f"{method} {path}: the answer is not JSON") from None
        if not isinstance(payload, dict):
            raise InvalidResponse(f"{method} {path}: the answer is not a JSON object")
        return payload

    async def _made_from(self, file_id: str) -> dict[str, Any] | None:
        page = await self._once("GET", "/batches", params={"limit": str(FIND_LIMIT)})
        for batch in page.get("data") or ():
            if isinstance(batch, dict) and batch.get("input_file_id") == file_id:
                return batch
        return None


def _field(payload: dict[str, Any], name: str, what: str) -> Any:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidResponse(f"{what}: no `{name}` in the answer")
    return value


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
