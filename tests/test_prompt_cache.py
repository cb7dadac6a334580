"""The simulator's prompt-cache timing (docs/simulator.md#answers): a prefix is cached once an
answer carrying it is complete, requests in flight together do not see each other's, and a
prefix unused for `--prompt-cache-ttl` seconds expires. Time is injected, never waited for."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakeclock import FakeClock

from batchrunner.clock import Clock
from batchrunner.simulator import GatewayConfig, PromptCache, complete, running_gateway
from batchrunner.simulator.faults import FaultPlan

KEY = "sk-ru-test"
DOCUMENT = " ".join(f"river{n} flows past town{n % 17} in spring" for n in range(220))


def body_for(question: str, **fields: Any) -> dict[str, Any]:
    content = f"{DOCUMENT}\n\nQuestion: {question}"
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **fields}


def _shared_tokens() -> int:
    """The cached tokens two questions about DOCUMENT have in common: its whole 128-steps."""
    cache = PromptCache()
    one = dict(cache.prefix_digests("gpt-4o-mini", body_for("a")["messages"]))
    other = cache.prefix_digests("gpt-4o-mini", body_for("zz top")["messages"])
    return max(length for length, digest in other if one.get(length) == digest)


SHARED_TOKENS = _shared_tokens()


def test_the_document_alone_is_a_cacheable_prefix() -> None:
    assert complete(body_for("a")).usage.prompt_tokens >= 1500
    assert SHARED_TOKENS >= 1024 and (SHARED_TOKENS - 1024) % 128 == 0


class GatedClock:
    """A clock whose sleeps (the simulator's latency) all wait for the test to open the gate."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waiting = 0
        self.gate = asyncio.Event()

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waiting += 1
        await self.gate.wait()


async def _cached(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    """One request's cached tokens, streamed or not."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as reply:
        assert reply.status == 200, await reply.text()
        if not body.get("stream"):
            return int((await reply.json())["usage"]["prompt_tokens_details"]["cached_tokens"])
        text = await reply.text()
    usage = re.findall(r'"cached_tokens":(\d+)', text)
    assert text.endswith("data: [DONE]\n\n") and len(usage) == 1, text[-300:]
    return int(usage[0])


async def _scenario(config: GatewayConfig, clock: Clock, steps: Any) -> Any:
    async with running_gateway(config, clock=clock) as gateway, aiohttp.ClientSession() as session:
        return await steps(gateway, session)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_requests_in_flight_together_do_not_see_each_others_prefix(stream: bool) -> None:
    clock = GatedClock()
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}

    async def steps(gateway: Any, session: aiohttp.ClientSession) -> tuple[list[int], int]:
        together = [asyncio.ensure_future(_cached(session, gateway.url, body_for(f"q{n}", **extra)))
                    for n in range(8)]
        for _ in range(1000):  # every one has arrived (and been given its cached tokens)
            if clock.waiting == 8:
                break
            await asyncio.sleep(0.01)
        assert clock.waiting == 8
        clock.gate.set()
        first = list(await asyncio.gather(*together))
        return first, await _cached(session, gateway.url, body_for("q-after", **extra))

    config = GatewayConfig(port=0, latency_ms=200)
    together, after = asyncio.run(_scenario(config, clock, steps))
    assert together == [0] * 8
    assert after == SHARED_TOKENS  # once one was answered, the next one hits the document


def test_a_prefix_expires_after_the_ttl_without_use_and_a_hit_refreshes_it() -> None:
    clock = FakeClock(1000.0)

    async def steps(gateway: Any, session: aiohttp.ClientSession) -> list[int]:
        seen = []
        for wait, question in [(0, "a"), (0, "b"), (59, "c"), (59, "d"), (60, "e"), (0, "f")]:
            clock.advance(wait)
            seen.append(await _cached(session, gateway.url, body_for(question)))
        return seen

    config = GatewayConfig(port=0, prompt_cache_ttl=60)
    seen = asyncio.run(_scenario(config, clock, steps))
    # a: cold; b: hit; c: 59 s later, hit (refreshed); d: 59 s after c, hit;
    # e: 60 s without use, expired; f: e's answer cached it again
    assert seen == [0, SHARED_TOKENS, SHARED_TOKENS, SHARED_TOKENS, 0, SHARED_TOKENS]


def _drops(config: GatewayConfig) -> list[bool]:
    plan = FaultPlan(config)
    return [plan.draw().drop_at is not None for _ in range(3)]


def test_a_streamed_answer_caches_its_prefix_only_once_its_last_chunk_is_sent() -> None:
    # a seed whose first answer is cut mid-stream and the next two are whole
    config = next(c for seed in range(200)
                  if _drops(c := GatewayConfig(port=0, drop_rate=0.5, fault_seed=seed))
                  == [True, False, False])
    stream = {"stream": True, "stream_options": {"include_usage": True}}

    async def steps(gateway: Any, session: aiohttp.ClientSession) -> list[int]:
        headers = {"Authorization": f"Bearer {KEY}"}
        cut = session.post(f"{gateway.url}/v1/chat/completions", json=body_for("a", **stream),
                           headers=headers)
        async with cut as reply:
            assert reply.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await reply.read()  # its first chunks came, its last never did
        assert gateway.stats.dropped == 1
        return [await _cached(session, gateway.url, body_for(q, **stream)) for q in ("b", "c")]

    assert asyncio.run(_scenario(config, FakeClock(), steps)) == [0, SHARED_TOKENS]


def test_cached_prefixes_are_bounded_least_recently_used_first() -> None:
    now = [0.0]
    cache = PromptCache(min_tokens=8, step_tokens=4, capacity=4, ttl_s=10, clock=lambda: now[0])

    def prefixes(word: str) -> Sequence[tuple[int, bytes]]:
        return cache.prefix_digests("gpt-4o", [{"role": "user", "content": f"{word} " * 6}])

    a, b = prefixes("alpha"), prefixes("beta")  # 2 prefixes each (8 and 12 tokens)
    cache.store(tuple(a))
    now[0] = 1
    cache.store(tuple(b))
    now[0] = 2
    assert cache.lookup(tuple(a)) == 12  # a is now the most recently used
    cache.store(tuple(prefixes("gamma")))  # over capacity: b goes, not a
    assert len(cache) == 4
    assert cache.lookup(tuple(a)) == 12 and cache.lookup(tuple(b)) == 0
    now[0] = 12.5  # 10.5 s after a's last use: expired, and forgotten
    assert cache.lookup(tuple(a)) == 0 and len(cache) == 0


def test_the_gateway_command_takes_the_ttl() -> None:
    """`--prompt-cache-ttl 0`: nothing stays cached, even between two requests in a row."""
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "gateway", "--port", "0",
         "--prompt-cache-ttl", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.fullmatch(r"gateway listening on (http://127\.0\.0\.1:\d+)/v1\n", line)
        assert match, line

        async def twice() -> list[int]:
            async with aiohttp.ClientSession() as session:
                return [await _cached(session, match.group(1), body_for("a")) for _ in range(2)]

        assert asyncio.run(twice()) == [0, 0]
    finally:
        process.terminate()
        process.communicate(timeout=10)
