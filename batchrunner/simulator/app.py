"""The simulator's HTTP side: an aiohttp.web application serving the gateway's API.

Routes:

- `POST /v1/chat/completions`: JSON or Server-Sent Events (`"stream": true`)
- `GET /v1/models`, `GET /v1/models/{id}`
- `GET /_simulator/stats`, `POST /_simulator/reset`: the live counters (no key needed)
- the Batch API (`/v1/files`, `/v1/batches`): batches.py, its lines answered by `answer_body`

Each chat request goes: key -> body checks (400/404) -> rate limit (429) -> its cached tokens
(against the prefixes cached so far) -> latency -> 500/503 -> answer, possibly dropped midway;
a complete answer caches its prompt's prefixes. Answers are computed once per distinct body and
kept in a small cache, so a benchmark measures the HTTP path, not the text generator.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import json.encoder
import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from batchrunner.simulator.batches import BatchApi, LineAnswer
from batchrunner.simulator.chat_request import ApiError, ChatRequest, parse_request
from batchrunner.simulator.clock import REAL_CLOCK, Clock
from batchrunner.simulator.completions import Completion, Usage, answer
from batchrunner.simulator.config import MODELS, GatewayConfig
from batchrunner.simulator.faults import FaultPlan, InvalidJsonPlan, RateLimiter
from batchrunner.simulator.json_answers import spoil
from batchrunner.simulator.prompt_cache import PromptCache
from batchrunner.simulator.stats import GatewayStats
from batchrunner.simulator.tokens import count_tokens

__all__ = ["SIMULATOR", "Simulator", "create_app"]

KEY_PREFIX = "sk-ru-"
FINGERPRINT = "fp_ru_sim"
ANSWER_CACHE_SIZE = 4096
JSON_TYPE = "application/json"
_WORD_PIECE = re.compile(r"\s*\S+|\s+")
_string = json.encoder.encode_basestring  # a str as a JSON string literal, in C


@dataclass
class _Prepared:
    """A checked request with its answer, and the JSON fragments every response repeats."""

    request: ChatRequest
    completion: Completion
    prefixes: tuple[tuple[int, bytes], ...]
    model_json: str
    choices_json: str | None = None  # the "choices" array of a JSON answer
    chunk_choices: list[str] | None = None  # the "choices" array of each content stream chunk


def _choices_json(completion: Completion) -> str:
    calls = completion.tool_calls or (None,) * len(completion.texts)
    logprobs = completion.logprobs
    return "[%s]" % ",".join(
        f'{{"index":{index},"message":{{"role":"assistant",'
        f'"content":{"null" if call else _string(text)},'
        + (f'"tool_calls":{json.dumps(list(call), separators=(",", ":"))},' if call else "")
        + f'"refusal":null,"annotations":[]}},"logprobs":{_logprobs_json(logprobs, index)},'
        f'"finish_reason":"{reason}"}}'
        for index, (text, reason, call) in enumerate(
            zip(completion.texts, completion.finish_reasons, calls)
        )
    )


def _logprobs_json(logprobs: Any, index: int, part: slice | None = None) -> str:
    if logprobs is None:
        return "null"
    entries = list(logprobs[index] if part is None else logprobs[index][part])
    return json.dumps({"content": entries, "refusal": None}, separators=(",", ":"))


_ARGUMENT_PIECES = 4  # a tool call's arguments are streamed in about this many chunks


def _chunk_choices(completion: Completion) -> list[str]:
    """Stream chunks' choices: role first, then words round-robin over choices, then finish.

    A tool call is streamed as OpenAI streams one: its id, type and name with empty
    arguments first, then the arguments in pieces, each delta naming the call by `index`.
    """
    calls = completion.tool_calls or (None,) * len(completion.texts)
    chunks = []
    for index, call in enumerate(calls):
        if call is None:
            chunks.append(
                f'[{{"index":{index},"delta":{{"role":"assistant","content":"","refusal":null}},'
                f'"logprobs":null,"finish_reason":null}}]'
            )
            continue
        heads = [
            {"index": n, "id": c["id"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": ""}}
            for n, c in enumerate(call)
        ]
        chunks.append(
            f'[{{"index":{index},"delta":{{"role":"assistant","content":null,'
            f'"tool_calls":{json.dumps(heads, separators=(",", ":"))},"refusal":null}},'
            f'"logprobs":null,"finish_reason":null}}]'
        )
        for n, c in enumerate(call):
            arguments = c["function"]["arguments"]
            size = max(1, -(-len(arguments) // _ARGUMENT_PIECES))
            for start in range(0, len(arguments), size):
                piece = [{"index": n, "function": {"arguments": arguments[start:start + size]}}]
                chunks.append(
                    f'[{{"index":{index},"delta":{{"tool_calls":'
                    f'{json.dumps(piece, separators=(",", ":"))}}},'
                    f'"logprobs":null,"finish_reason":null}}]'
                )
    pieces = [_WORD_PIECE.findall(text) for text in completion.texts]
    logprobs = completion.logprobs
    for step in range(max(map(len, pieces), default=0)):
        for index, words in enumerate(pieces):
            if step < len(words):
                content = _string(words[step])
                chunks.append(
                    f'[{{"index":{index},"delta":{{"content":{content}}},'
                    f'"logprobs":{_logprobs_json(logprobs, index, slice(step, step + 1))},'
                    f'"finish_reason":null}}]'
                )
    chunks += (
        f'[{{"index":{index},"delta":{{}},"logprobs":null,"finish_reason":"{reason}"}}]'
        for index, reason in enumerate(completion.finish_reasons)
    )
    return chunks


def _spoiled(prepared: _Prepared, how: float) -> _Prepared:
    """The same request answered with invalid JSON (not JSON, or a required field missing)."""
    completion = prepared.completion
    schema = (prepared.request.response_format or {}).get("schema", {})
    texts = tuple(spoil(text, schema, how) for text in completion.texts)
    tokens = sum(count_tokens(text) for text in texts)
    usage = dataclasses.replace(
        completion.usage, completion_tokens=tokens + completion.usage.reasoning_tokens
    )
    spoiled = dataclasses.replace(completion, texts=texts, usage=usage)
    return _Prepared(prepared.request, spoiled, prepared.prefixes, prepared.model_json)


def _usage_json(prompt: int, completion: int, cached: int, reasoning: int = 0) -> str:
    return (
        f'{{"prompt_tokens":{prompt},"completion_tokens":{completion},'
        f'"total_tokens":{prompt + completion},'
        f'"prompt_tokens_details":{{"cached_tokens":{cached},"audio_tokens":0}},'
        f'"completion_tokens_details":{{"reasoning_tokens":{reasoning},"audio_tokens":0,'
        f'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}'
    )


def _usage_of(usage: Usage, cached: int) -> str:
    return _usage_json(
        usage.prompt_tokens, usage.completion_tokens, cached, usage.reasoning_tokens
    )




class Simulator:
    """The state behind the routes: config, counters, limiter, faults and caches.

    `clock` is where the latency is waited, the prompt cache reads the time and batches are
    scheduled (default the real one; a FakeClock or one moved by hand in tests).
    """

    def __init__(self, config: GatewayConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock = clock if clock is not None else REAL_CLOCK
        self.stats = GatewayStats()
        self.faults = FaultPlan(config)
        self.invalid_json = InvalidJsonPlan(config) if config.invalid_json_rate else None
        self.limiter = (
            RateLimiter(config.rpm, config.tpm, window=config.rate_window_s)
            if config.rpm is not None or config.tpm is not None
            else None
        )
        self.prompt_cache = PromptCache(
            config.cache_min_tokens,
            config.cache_step_tokens,
            ttl_s=config.prompt_cache_ttl,
            clock=clock.monotonic,
        )
        self._keys = frozenset(config.keys)
        self._answers: OrderedDict[bytes, _Prepared] = OrderedDict()
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._models_body = json.dumps(
            {
                "object": "list",
                "data": [self._model_json(info.id) for info in MODELS.values()],
            }
        ).encode()
        # Batch lines draw their faults from streams of their own: a batch running beside
        # chat requests changes none of theirs.
        batch_config = dataclasses.replace(
            config, latency_ms=0.0, jitter_ms=0.0, drop_rate=0.0,
            fault_seed=None if config.fault_seed is None else config.fault_seed ^ 0xBA7C4,
        )
        self._batch_faults = FaultPlan(batch_config)
        self._batch_invalid_json = (
            InvalidJsonPlan(batch_config) if config.invalid_json_rate else None
        )
        self.batches = BatchApi(config, self.stats, self.answer_body, self._refused, clock)

    # -- routes ------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Register the simulator's routes on `app`."""
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_get("/_simulator/stats", self.get_stats)
        app.router.add_post("/_simulator/reset", self.reset_stats)
        self.batches.add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self.not_found)

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/models`."""
        refused = self._refuse_key(request)
        if refused is not None:
            return self._error(refused)
        return web.Response(body=self._models_body, headers={"Content-Type": JSON_TYPE})

    async def get_model(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/models/{model}`."""
        refused = self._refuse_key(request)
        if refused is not None:
            return self._error(refused)
        model = request.match_info["model"]
        if model not in MODELS:
            return self._error(
                ApiError(
                    404,
                    f"The model '{model}' does not exist",
                    param="model",
                    code="model_not_found",
                )
            )
        return web.json_response(self._model_json(model))

    async def get_stats(self, request: web.Request) -> web.StreamResponse:
        """`GET /_simulator/stats`: the counters as JSON."""
        return web.json_response(self.stats.to_json())

    async def reset_stats(self, request: web.Request) -> web.StreamResponse:
        """`POST /_simulator/reset`: zero the counters; answers the zeroed counters."""
        self.stats.reset()
        return web.json_response(self.stats.to_json())

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """Any other URL: 404 with an OpenAI error body."""
        return self._error(ApiError(404, f"Invalid URL ({request.method} {request.path})"))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`, counted in the stats."""
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        try:
            return await self._chat(request)
        finally:
            stats.in_flight -= 1

    # -- chat completions ----------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        refused = self._refuse_key(request)
        if refused is not None:
            return self._counted(self._error(refused))
        raw = await request.read()
        prepared = self._answers.get(raw)
        if prepared is None:
            try:
                prepared = self._prepare(raw)
            except ApiError as error:
                return self._counted(self._error(error))
            if len(self._answers) >= ANSWER_CACHE_SIZE:
                self._answers.popitem(last=False)
            self._answers[raw] = prepared

        if self.limiter is not None:
            refusal = self.limiter.acquire(prepared.completion.usage.total_tokens)
            if refusal is not None:
                return self._counted(self._rate_limited(*refusal, prepared))

        # Decided on arrival, against the prefixes of the answers complete by now.
        cached = self.prompt_cache.lookup(prepared.prefixes) if prepared.prefixes else 0
        faults = self.faults.draw()
        if faults.delay_s:
            await self.clock.sleep(faults.delay_s)
        if faults.error_status is not None:
            return self._counted(self._server_error(faults.error_status))

        if self.invalid_json is not None and prepared.request.response_format is not None:
            how = self.invalid_json.draw()
            if how is not None:
                prepared = _spoiled(prepared, how)
                self.stats.invalid_json += 1
        if prepared.request.stream:
            return await self._stream(request, prepared, cached, faults.drop_at)
        body = self._json_answer(prepared, cached)
        headers = self._headers(JSON_TYPE)
        if faults.drop_at is not None:
            response = web.StreamResponse(headers=headers)
            return await self._drop(request, response, [body], faults.drop_at, stream=False)
        self._answered(prepared)
        return self._counted(web.Response(body=body, headers=headers))

    def _prepare(self, raw: bytes) -> _Prepared:
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(
                400,
                "We could not parse the JSON body of your request. The OpenAI API expects "
                "a JSON payload, but what was sent was not valid JSON.",
            ) from None
        return self._prepare_body(body)

    def _prepare_body(self, body: Any) -> _Prepared:
        request = parse_request(body)
        completion = answer(request)
        prefixes = (
            self.prompt_cache.prefix_digests(request.model, request.messages)
            if completion.usage.prompt_tokens >= self.config.cache_min_tokens
            else ()
        )
        return _Prepared(request, completion, prefixes, json.dumps(completion.model))

    def answer_body(self, body: Any, created: int) -> LineAnswer:
        """A Batch API line's `body` answered as `POST /v1/chat/completions` would answer it.

        The same checks (400/404), text, usage and cached tokens; the 500/503s of `error_rate`
        and the spoiled answers of `invalid_json_rate`, drawn from the batch lines' own
        streams. The answer is never streamed.
        """
        try:
            prepared = self._prepare_body(body)
        except ApiError as error:
            return LineAnswer(error.status, json.dumps(error.body()).encode())
        faults = self._batch_faults.draw()
        if faults.error_status is not None:
            error = _server_error(faults.error_status)
            return LineAnswer(error.status, json.dumps(error.body()).encode())
        if self._batch_invalid_json is not None and prepared.request.response_format is not None:
            how = self._batch_invalid_json.draw()
            if how is not None:
                prepared = _spoiled(prepared, how)
                self.stats.invalid_json += 1
        cached = 0
        if prepared.prefixes:  # a line's answer is complete at once: its prefix is cached
            cached = self.prompt_cache.lookup(prepared.prefixes)
            self.prompt_cache.store(prepared.prefixes)
        usage = prepared.completion.usage
        return LineAnswer(
            200, self._json_answer(prepared, cached, created), usage.prompt_tokens,
            usage.completion_tokens, cached, usage.reasoning_tokens,
        )

    def _new_id(self) -> str:
        return f"chatcmpl-{self._id_prefix}{next(self._ids):08x}"

    def _json_answer(self, prepared: _Prepared, cached: int, created: int | None = None) -> bytes:
        if prepared.choices_json is None:
            prepared.choices_json = _choices_json(prepared.completion)
        usage = prepared.completion.usage
        created = int(time.time()) if created is None else created
        return (
            f'{{"id":"{self._new_id()}","object":"chat.completion","created":{created},'
            f'"model":{prepared.model_json},"choices":{prepared.choices_json},'
            f'"usage":{_usage_of(usage, cached)},'
            f'"service_tier":"default","system_fingerprint":"{FINGERPRINT}"}}'
        ).encode()

    def _stream_events(self, prepared: _Prepared, cached: int) -> list[bytes]:
        if prepared.chunk_choices is None:
            prepared.chunk_choices = _chunk_choices(prepared.completion)
        head = (
            f'data: {{"id":"{self._new_id()}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{prepared.model_json},'
            f'"system_fingerprint":"{FINGERPRINT}","choices":'
        )
        # With include_usage every chunk carries "usage": null and a last one the usage.
        tail = ',"usage":null}\n\n' if prepared.request.include_usage else "}\n\n"
        events = [f"{head}{choices}{tail}" for choices in prepared.chunk_choices]
        if prepared.request.include_usage:
            usage = prepared.completion.usage
            events.append(
                f"{head}[],\"usage\":"
                f"{_usage_of(usage, cached)}}}\n\n"
            )
        events.append("data: [DONE]\n\n")
        return [event.encode() for event in events]

    async def _stream(
        self, request: web.Request, prepared: _Prepared, cached: int, drop_at: float | None
    ) -> web.StreamResponse:
        events = self._stream_events(prepared, cached)
        response = web.StreamResponse(headers=self._headers("text/event-stream; charset=utf-8"))
        response.headers["Cache-Control"] = "no-cache"
        if drop_at is not None:
            return await self._drop(request, response, events, drop_at, stream=True)
        try:
            await response.prepare(request)
            await response.write(b"".join(events))
            await response.write_eof()
        except ConnectionError:  # the client went away mid-stream: nothing to answer
            return response
        self._answered(prepared)  # the last chunk is sent
        return self._counted(response)

    def _answered(self, prepared: _Prepared) -> None:
        """The answer is complete: its prompt's prefixes are cached from now on."""
        if prepared.prefixes:
            self.prompt_cache.store(prepared.prefixes)

    async def _drop(
        self,
        request: web.Request,
        response: web.StreamResponse,
        parts: list[bytes],
        fraction: float,
        *,
        stream: bool,
    ) -> web.StreamResponse:
        """Send the headers and part of the answer, then cut the connection."""
        if not stream:  # one JSON body: cut inside it
            body = parts[0]
            response.content_length = len(body)
            sent = [body[: max(1, int(len(body) * fraction))]]
        else:  # a stream: cut after whole events, never after [DONE]
            sent = parts[: max(1, min(int(len(parts) * fraction), len(parts) - 2))]
        self.stats.dropped += 1
        try:
            await response.prepare(request)
            await response.write(b"".join(sent))
        except ConnectionError:  # the client left first
            return response
        transport = request.transport
        if transport is not None:
            transport.abort()
        return response

    # -- errors and headers --------------------------------------------------------------------

    def _refused(self, request: web.Request) -> web.Response | None:
        """The 401 answer to a request without an accepted key, or None."""
        refused = self._refuse_key(request)
        return None if refused is None else self._error(refused)

    def _refuse_key(self, request: web.Request) -> ApiError | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            return ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        key = header[7:].strip()
        if key in self._keys if self._keys else key.startswith(KEY_PREFIX) and key != KEY_PREFIX:
            self.stats.count_key(key)
            return None
        # The key itself is never echoed: clients copy error messages into logs and results.
        return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _headers(self, content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type}
        if self.limiter is not None:
            headers.update(self.limiter.headers())
        return headers

    def _error(self, error: ApiError, extra: dict[str, str] | None = None) -> web.Response:
        headers = self._headers(JSON_TYPE)
        if extra:
            headers.update(extra)
        return web.Response(
            status=error.status, body=json.dumps(error.body()).encode(), headers=headers
        )

    def _rate_limited(self, kind: str, wait: float, prepared: _Prepared) -> web.Response:
        assert self.limiter is not None
        requests, tokens = self.limiter.used()
        if kind == "requests":
            label, limit, used, asked = "requests per min (RPM)", self.limiter.rpm, requests, 1
        else:
            asked = prepared.completion.usage.total_tokens
            label, limit, used = "tokens per min (TPM)", self.limiter.tpm, tokens
        error = ApiError(
            429,
            f"Rate limit reached for {prepared.request.model} on {label}: Limit {limit}, "
            f"Used {used}, Requested {asked}. Please try again in {wait:.3g}s.",
            type=kind,
            code="rate_limit_exceeded",
        )
        return self._error(
            error,
            {
                "Retry-After": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
            },
        )

    def _server_error(self, status: int) -> web.Response:
        return self._error(_server_error(status))

    def _counted(self, response: web.StreamResponse) -> web.StreamResponse:
        by_status = self.stats.by_status
        by_status[response.status] = by_status.get(response.status, 0) + 1
        return response

    @staticmethod
    def _model_json(model: str) -> dict[str, Any]:
        info = MODELS[model]
        return {
            "id": info.id,
            "object": "model",
            "created": info.created,
            "owned_by": info.owned_by,
        }


def _server_error(status: int) -> ApiError:
    if status == 503:
        return ApiError(
            503,
            "The server is overloaded or not ready yet.",
            type="server_error",
            code="service_unavailable",
        )
    return ApiError(
        500,
        "The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


SIMULATOR = web.AppKey("simulator", Simulator)


def create_app(config: GatewayConfig | None = None, clock: Clock | None = None) -> web.Application:
    """The simulator as an aiohttp application; its state is at `app[SIMULATOR]`.

    `clock` (`monotonic()` and `async sleep()`) is the simulator's time: latency, the prompt
    cache's expiry, the Batch API's schedule; tests give a virtual one. Stopping the application stops its batches and removes their files.

    >>> app = create_app(GatewayConfig(error_rate=0.05, fault_seed=1))
    """
    app = web.Application()
    simulator = Simulator(config or GatewayConfig(), clock)
    app[SIMULATOR] = simulator
    simulator.add_routes(app)

    async def stop_batches(app: web.Application) -> None:
        await simulator.batches.close()

    app.on_cleanup.append(stop_batches)
    return app
