"""The simulator's Batch API: `/v1/files` and `/v1/batches`, with OpenAI's shapes and statuses.

A batch goes `validating` -> `in_progress` -> `finalizing` -> `completed` in about
`batch_seconds` S: validating for a tenth of S, its lines answered evenly over the next
eight tenths (or as fast as they can be, if that is slower), finalizing for the last tenth.
A file with bad lines fails (`failed`, with `errors`); `POST /batches/{id}/cancel` makes it
`cancelling`, then `cancelled` a tenth of S later; with `batch_expire_after` N it is `expired`
once N lines are done (as after 24 hours). Whatever ends it, the answered lines are in its
output file (`output_file_id`), the failed ones in its error file (`error_file_id`), and the
lines never answered are in the error file too, with the `batch_expired` or `batch_cancelled`
error, as OpenAI writes them.

Each line is answered as the chat endpoint would answer its body (the same text and usage,
cached tokens, 400/404 for a bad body, the `error_rate` 500/503s and `invalid_json_rate` from a
random stream of their own, seeded from `fault_seed`); latency, dropped connections and the
rpm/tpm limits are about connections and do not apply. The input is read a line at a time and
the output written a line at a time: a batch of a million lines is never in memory.

Time comes from a clock (`monotonic()` and `async sleep()`, as `batchrunner.clock.Clock`), so
that tests drive a batch through its statuses without waiting.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from aiohttp import web

from batchrunner.simulator.batch_files import CHAT_URL, FileRecord, FileStore
from batchrunner.simulator.chat_request import ApiError
from batchrunner.simulator.clock import REAL_CLOCK, Clock
from batchrunner.simulator.config import GatewayConfig
from batchrunner.simulator.stats import GatewayStats

__all__ = ["AnswerLine", "BatchApi", "LineAnswer"]

VALIDATING_SHARE = 0.1  # of batch_seconds: validating, finalizing, cancelling each last this
ANSWERING_SHARE = 0.8  # of batch_seconds: the lines are answered evenly over this
TICKS = 100  # the answering wakes at most this many times a batch
CHUNK = 256  # lines answered between two turns of the event loop
COMPLETION_WINDOW_S = 24 * 3600
MAX_METADATA = 16
MAX_LIST = 100
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class LineAnswer:
    """The chat endpoint's answer to one line's body: status, JSON body, and usage if 200."""

    status: int
    body: bytes
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


AnswerLine = Callable[[Any, int], LineAnswer]
"""Answers a line's `body` as the chat endpoint would, `created` at the given Unix time."""




@dataclass
class _Batch:
    id: str
    input: FileRecord
    metadata: dict[str, str] | None
    created: float  # on the clock
    times: dict[str, int]  # created_at, in_progress_at, ... as Unix seconds
    status: str = "validating"
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # in, cached, out, reasoning
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    cancel_requested: float | None = None  # when, on the clock

    @property
    def done(self) -> int:
        return self.completed + self.failed

    def to_json(self) -> dict[str, Any]:
        times = self.times
        input_tokens, cached, output_tokens, reasoning = self.usage
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": CHAT_URL,
            "model": self.input.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input.id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            **{name: times.get(name) for name in (
                "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                "failed_at", "expired_at", "cancelling_at", "cancelled_at")},
            "request_counts": {
                "total": self.total, "completed": self.completed, "failed": self.failed
            },
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": input_tokens + output_tokens,
            },
            "metadata": self.metadata,
        }


class BatchApi:
    """The Batch API's state and routes: files, batches, and the task that runs each batch."""

    def __init__(
        self,
        config: GatewayConfig,
        stats: GatewayStats,
        answer_line: AnswerLine,
        refuse: Callable[[web.Request], web.Response | None],
        clock: Clock | None = None,
    ) -> None:
        self._seconds = config.batch_seconds
        self._expire_after = config.batch_expire_after
        self._stats = stats
        self._answer = answer_line
        self._refuse = refuse
        self._clock: Clock = clock if clock is not None else REAL_CLOCK
        self._epoch = time.time() - self._clock.monotonic()
        self.files = FileStore()
        self.batches: dict[str, _Batch] = {}  # oldest first
        self._tasks: set[asyncio.Task[None]] = set()

    def add_routes(self, app: web.Application) -> None:
        """Register `/v1/files` and `/v1/batches` on `app`."""
        router = app.router
        router.add_post("/v1/files", self.create_file)
        router.add_get("/v1/files/{id}", self.get_file)
        router.add_get("/v1/files/{id}/content", self.get_content)
        router.add_delete("/v1/files/{id}", self.delete_file)
        router.add_post("/v1/batches", self.create_batch)
        router.add_get("/v1/batches", self.list_batches)
        router.add_get("/v1/batches/{id}", self.get_batch)
        router.add_post("/v1/batches/{id}/cancel", self.cancel_batch)

    async def close(self) -> None:
        """Stop every batch's task and remove the files."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.files.close()

    def _now(self) -> int:
        return int(self._epoch + self._clock.monotonic())

    # -- routes ------------------------------------------------------------------------------

    async def create_file(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/files`: a multipart upload with `purpose=batch`."""
        if (refused := self._refuse(request)) is not None:
            return refused
        if not request.content_type.startswith("multipart/"):
            return _error(ApiError(400, "Uploads must be multipart/form-data.", param="file"))
        try:
            record = await self.files.upload(await request.multipart(), self._now())
        except ApiError as error:
            return _error(error)
        self._stats.files_created += 1
        return web.json_response(record.to_json())

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/files/{id}`: the file object."""
        return self._answer_with(request, lambda: self.files.get(request.match_info["id"])
                                 .to_json())

    async def get_content(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/files/{id}/content`: the file's bytes, streamed from disk."""
        if (refused := self._refuse(request)) is not None:
            return refused
        try:
            record = self.files.get(request.match_info["id"])
        except ApiError as error:
            return _error(error)
        return web.FileResponse(record.path, headers={"Content-Type": "application/jsonl"})

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        """`DELETE /v1/files/{id}`."""
        def deleted() -> dict[str, Any]:
            record = self.files.delete(request.match_info["id"])
            return {"id": record.id, "object": "file", "deleted": True}

        return self._answer_with(request, deleted)

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/batches`: input_file_id, endpoint, completion_window "24h", metadata."""
        if (refused := self._refuse(request)) is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return _error(ApiError(400, "We could not parse the JSON body of your request."))
        try:
            batch = self._new_batch(body)
        except ApiError as error:
            return _error(error)
        self._stats.batches_created += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response(batch.to_json())

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/batches/{id}`."""
        return self._answer_with(request, lambda: self._batch(request).to_json())

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/batches?limit=N&after=ID`: newest first, as OpenAI lists them."""
        return self._answer_with(request, lambda: self._list(request.query))

    async def cancel_batch(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/batches/{id}/cancel`: cancelling now, cancelled a tenth of S later."""
        def cancel() -> dict[str, Any]:
            batch = self._batch(request)
            if batch.status not in ("validating", "in_progress"):
                raise ApiError(
                    400, f"Cannot cancel a batch with status '{batch.status}'.", param="id"
                )
            batch.cancel_requested = self._clock.monotonic()
            batch.status = "cancelling"
            batch.times["cancelling_at"] = self._now()
            return batch.to_json()

        return self._answer_with(request, cancel)

    # -- helpers of the routes -----------------------------------------------------------------

    def _answer_with(
        self, request: web.Request, make: Callable[[], dict[str, Any]]
    ) -> web.StreamResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        try:
            return web.json_response(make())
        except ApiError as error:
            return _error(error)

    def _batch(self, request: web.Request) -> _Batch:
        batch_id = request.match_info["id"]
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="id")
        return batch

    def _list(self, query: Any) -> dict[str, Any]:
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIST:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIST}.", param="limit")
        newest = list(reversed(self.batches))
        after = query.get("after")
        if after:
            if after not in self.batches:
                raise ApiError(400, f"No batch found with id '{after}' (after).", param="after")
            newest = newest[newest.index(after) + 1:]
        page = [self.batches[batch_id].to_json() for batch_id in newest[:limit]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(newest) > limit,
        }

    def _new_batch(self, body: Any) -> _Batch:
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object.")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise ApiError(400, "Missing required parameter: 'input_file_id'.",
                           param="input_file_id")
        record = self.files.files.get(file_id)
        if record is None:
            raise ApiError(400, f"No such File object: {file_id}", param="input_file_id",
                           code="invalid_input_file")
        if record.purpose != "batch":
            raise ApiError(400, f"The file {file_id} was not uploaded with purpose 'batch'.",
                           param="input_file_id")
        if body.get("endpoint") != CHAT_URL:
            raise ApiError(400, f"Invalid value for 'endpoint': this gateway serves {CHAT_URL} "
                           "batches only.", param="endpoint")
        if body.get("completion_window") != "24h":
            raise ApiError(400, "Invalid value for 'completion_window': only '24h' is "
                           "supported.", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not _good_metadata(metadata):
            raise ApiError(400, "metadata must be an object of at most 16 string values, keys "
                           "of at most 64 characters, values of at most 512.", param="metadata")
        now = self._now()
        batch = _Batch(
            id=f"batch_{secrets.token_hex(12)}",
            input=record,
            metadata=metadata,
            created=self._clock.monotonic(),
            times={"created_at": now, "expires_at": now + COMPLETION_WINDOW_S},
            total=record.lines if not record.problems else 0,
        )
        self.batches[batch.id] = batch
        return batch

    # -- running a batch ---------------------------------------------------------------------

    async def _until(self, moment: float) -> None:
        await self._clock.sleep(max(0.0, moment - self._clock.monotonic()))

    async def _run(self, batch: _Batch) -> None:
        step = VALIDATING_SHARE * self._seconds
        await self._until(batch.created + step)
        if batch.input.problems:  # its lines were never answerable: nothing to write
            if batch.cancel_requested is not None:
                await self._until(batch.cancel_requested + step)
                ending = "cancelled"
            else:
                batch.errors = list(batch.input.problems)
                ending = "failed"
            batch.status = ending
            batch.times[f"{ending}_at"] = self._now()
            return
        with _Files(self, batch) as files:
            if batch.cancel_requested is None:
                batch.status = "in_progress"
                batch.times["in_progress_at"] = self._now()
                await self._answer_lines(batch, files)
            if batch.cancel_requested is not None:
                files.write_unanswered(batch, "batch_cancelled", "This request was cancelled "
                                       "before it was executed.")
                await self._until(batch.cancel_requested + step)
                ending = "cancelled"
            elif batch.status == "expired":
                files.write_unanswered(batch, "batch_expired", "This request could not be "
                                       "executed before the completion window expired.")
                ending = "expired"
            else:
                batch.status = "finalizing"
                batch.times["finalizing_at"] = self._now()
                await self._until(max(batch.created + self._seconds,
                                      self._clock.monotonic() + step))
                ending = "completed"
        batch.output_file_id, batch.error_file_id = files.listed()
        batch.status = ending
        batch.times[f"{ending}_at"] = self._now()

    async def _answer_lines(self, batch: _Batch, files: _Files) -> None:
        clock = self._clock
        span = ANSWERING_SHARE * self._seconds
        started = batch.created + VALIDATING_SHARE * self._seconds  # when validating ended
        total = batch.total
        limit = total if self._expire_after is None else min(total, self._expire_after)
        window_ends = batch.created + COMPLETION_WINDOW_S
        while batch.done < total and batch.cancel_requested is None:
            now = clock.monotonic()
            due = total if span <= 0 else min(total, int(total * (now - started) / span))
            due = min(due, limit)
            if due > batch.done:
                files.answer(batch, min(due, batch.done + CHUNK))
                await asyncio.sleep(0)  # let the server answer others between chunks
                continue
            if batch.done >= limit or now >= window_ends:
                batch.status = "expired"
                return
            next_due = started + (batch.done + 1) * span / total
            await clock.sleep(min(max(next_due - now, span / TICKS), window_ends - now))


class _Files:
    """One running batch's input (read a line at a time) and its output and error files."""

    def __init__(self, api: BatchApi, batch: _Batch) -> None:
        self._api = api
        store = api.files
        created = api._now()
        self.output = store.new(f"{batch.id}_output.jsonl", "batch_output", created)
        self.errors = store.new(f"{batch.id}_error.jsonl", "batch_output", created)
        self._input: IO[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None
        self._path = batch.input.path

    def __enter__(self) -> _Files:
        self._input = self._path.open("rb")
        self._out = self.output.path.open("wb")
        self._err = self.errors.path.open("wb")
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in (self._input, self._out, self._err):
            if handle is not None:
                handle.close()
        if exc_info[0] is not None:  # cancelled (the server stopping): nothing to list
            self.output.path.unlink(missing_ok=True)
            self.errors.path.unlink(missing_ok=True)

    def _lines(self) -> Any:
        assert self._input is not None
        for raw in self._input:
            if raw.strip():
                yield raw, json.loads(raw)

    def answer(self, batch: _Batch, until: int) -> None:
        """Answer lines until `until` are done, each into the output or the error file."""
        assert self._out is not None and self._err is not None
        created = self._api._now()
        usage = batch.usage
        lines = self._lines()
        while batch.done < until:
            _, line = next(lines)
            answer = self._api._answer(line["body"], created)
            ok = answer.status == 200
            (self._out if ok else self._err).write(
                b'{"id":"batch_req_%s","custom_id":%s,"response":{"status_code":%d,'
                b'"request_id":"req_%s","body":%s},"error":null}\n' % (
                    secrets.token_hex(12).encode(), _json(line["custom_id"]), answer.status,
                    secrets.token_hex(16).encode(), answer.body,
                )
            )
            if ok:
                batch.completed += 1
                usage[0] += answer.prompt_tokens
                usage[1] += answer.cached_tokens
                usage[2] += answer.completion_tokens
                usage[3] += answer.reasoning_tokens
            else:
                batch.failed += 1

    def write_unanswered(self, batch: _Batch, code: str, message: str) -> None:
        """Every line not answered goes to the error file with `code`."""
        assert self._err is not None
        error = _json({"code": code, "message": message})
        for _, line in self._lines():
            self._err.write(
                b'{"id":"batch_req_%s","custom_id":%s,"response":null,"error":%s}\n'
                % (secrets.token_hex(12).encode(), _json(line["custom_id"]), error)
            )

    def listed(self) -> tuple[str | None, str | None]:
        """List the output and error files that hold lines; remove the empty ones."""
        ids: list[str | None] = []
        for record in (self.output, self.errors):
            if record.path.stat().st_size:
                ids.append(self._api.files.add(record).id)
            else:
                record.path.unlink(missing_ok=True)
                ids.append(None)
        return ids[0], ids[1]


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _good_metadata(metadata: Any) -> bool:
    return (
        isinstance(metadata, dict)
        and len(metadata) <= MAX_METADATA
        and all(
            isinstance(key, str) and len(key) <= 64 and isinstance(value, str)
            and len(value) <= 512
            for key, value in metadata.items()
        )
    )


def _error(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)
