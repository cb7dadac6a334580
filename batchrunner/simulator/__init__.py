"""The gateway simulator: the ru-llm gateway's API on loopback, for tests, demos and `--local`.

Server side only: nothing here imports batchrunner's client modules.

    config.py        GatewayConfig, the models served
    tokens.py        the tokenizer rule; usage always agrees with the text
    completions.py   request checks (400/404) and the deterministic answer, no server needed
    prompt_cache.py  cached_tokens: a prefix cached once answered, expiring unused
    faults.py        latency, 500/503, dropped connections, the 429 limiter
    stats.py         live counters
    batch_files.py   the Batch API's files: uploads on disk, their lines checked
    batches.py       the Batch API: files and batches routes, a batch's statuses and lines
    app.py           the aiohttp.web application
    server.py        running it: async context manager, thread, blocking `serve`

>>> async with running_gateway(GatewayConfig(port=0)) as gw:
...     client = openai.AsyncOpenAI(base_url=gw.base_url, api_key="sk-ru-test")
"""

from __future__ import annotations

from batchrunner.simulator.app import create_app
from batchrunner.simulator.chat_request import ApiError, ChatRequest, parse_request
from batchrunner.simulator.completions import Completion, Usage, answer, complete
from batchrunner.simulator.config import MODELS, GatewayConfig, ModelInfo
from batchrunner.simulator.prompt_cache import PromptCache
from batchrunner.simulator.server import (
    CannotListen,
    RunningGateway,
    gateway_in_thread,
    running_gateway,
    serve,
)
from batchrunner.simulator.stats import GatewayStats
from batchrunner.simulator.tokens import count_prompt_tokens, count_tokens

__all__ = [
    "MODELS",
    "ApiError",
    "CannotListen",
    "ChatRequest",
    "Completion",
    "GatewayConfig",
    "GatewayStats",
    "ModelInfo",
    "PromptCache",
    "RunningGateway",
    "Usage",
    "answer",
    "complete",
    "count_prompt_tokens",
    "count_tokens",
    "create_app",
    "gateway_in_thread",
    "parse_request",
    "running_gateway",
    "serve",
]
