"""The clients batchrunner is compared with, written as their users usually write them.

- `openai`: the official SDK's `AsyncOpenAI` (its own retries, `max_retries`) and an
  `asyncio.Semaphore` of C around `chat.completions.create`, one task per row, `gather`ed.
- `litellm`: `litellm.acompletion(model="openai/<model>", api_base=...)` (its OpenAI
  provider, so it speaks the same protocol to the same server) under the same semaphore.
- `aiohttp`: the floor under batchrunner's transport: a bare loop of C worker tasks on one
  aiohttp `ClientSession` (a connector of C connections), orjson to encode and decode, uvloop,
  the same libraries batchrunner runs on, and none of its features (no retries, pacing,
  checkpoints, pricing). It is what batchrunner's CPU per row is measured against.

Both read the prompts of the input Parquet (`id`, `prompt`) at the start and write one result
row per input row (id, status, content, tokens, latency, error) to Parquet at the end, in one
go. That is less work than batchrunner does: it also checkpoints durably as it goes (fsynced
Arrow segments every 100 rows or 2 s), computes cost, carries the input columns through and
writes the final file atomically. The comparison favours the peers on that account.

    RU_LLM_API_KEY=sk-ru-bench python bench/peers.py openai -i in.parquet -o out.parquet \\
        --base-url http://127.0.0.1:8000/v1 -c 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PEERS = ("openai", "litellm", "aiohttp")
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("content", pa.string()),
        ("response_model", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("latency_ms", pa.float64()),
        ("error", pa.string()),
    ]
)

Row = tuple[str, str]  # id, prompt
Send = Callable[[str], Awaitable[tuple[str | None, str | None, Any]]]


def prepare(name: str) -> None:
    """Import the peer's library (so that its import time is measured apart from the run)."""
    if name == "openai":
        import openai  # noqa: F401
    elif name == "aiohttp":
        import aiohttp  # noqa: F401
        import orjson  # noqa: F401
    elif name == "litellm":
        # litellm fetches a model price map from the network at import unless told not to;
        # there is no network here, and a benchmark must not depend on one.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("LITELLM_LOG", "ERROR")
        import litellm

        litellm.suppress_debug_info = True
    else:
        raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")


def installed(name: str) -> bool:
    """True when the peer's library can be imported in this environment."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def read_rows(path: Path) -> list[Row]:
    """The (id, prompt) pairs of an input Parquet file, all in memory (as peers do)."""
    table = pq.read_table(path, columns=["id", "prompt"])
    return list(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist()))


def write_results(path: Path, records: list[dict[str, Any]]) -> None:
    """All results to Parquet at once, through a temporary file renamed into place."""
    table = pa.Table.from_pylist(records, schema=RESULT_SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


async def _run_all(rows: list[Row], concurrency: int, send: Send) -> list[dict[str, Any]]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(row: Row) -> dict[str, Any]:
        row_id, prompt = row
        async with semaphore:
            started = time.perf_counter()
            try:
                content, model, usage = await send(prompt)
            except Exception as exc:  # a peer's typical loop: any failure is the row's error
                return {"id": row_id, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                        "latency_ms": (time.perf_counter() - started) * 1000}
            return {
                "id": row_id,
                "status": "ok",
                "content": content,
                "response_model": model,
                "prompt_tokens": getattr(usage, "prompt_tokens", None),
                "completion_tokens": getattr(usage, "completion_tokens", None),
                "total_tokens": getattr(usage, "total_tokens", None),
                "latency_ms": (time.perf_counter() - started) * 1000,
            }

    return await asyncio.gather(*(one(row) for row in rows))


async def run_openai(
    rows: list[Row], base_url: str, api_key: str, model: str, concurrency: int, max_retries: int
) -> list[dict[str, Any]]:
    """AsyncOpenAI with its default HTTP client and a semaphore of `concurrency`."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=120
    ) as client:

        async def send(prompt: str) -> tuple[str | None, str | None, Any]:
            response = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}]
            )
            return response.choices[0].message.content, response.model, response.usage

        return await _run_all(rows, concurrency, send)


async def run_litellm(
    rows: list[Row], base_url: str, api_key: str, model: str, concurrency: int, max_retries: int
) -> list[dict[str, Any]]:
    """litellm.acompletion through its OpenAI provider, with a semaphore of `concurrency`."""
    import litellm

    async def send(prompt: str) -> tuple[str | None, str | None, Any]:
        response = await litellm.acompletion(
            model=f"openai/{model}",
            api_base=base_url,
            api_key=api_key,
            messages=[{"role": "user", "content": prompt}],
            max_retries=max_retries,
            timeout=120,
        )
        return response.choices[0].message.content, response.model, response.usage

    return await _run_all(rows, concurrency, send)


async def run_aiohttp(
    rows: list[Row], base_url: str, api_key: str, model: str, concurrency: int, max_retries: int
) -> list[dict[str, Any]]:
    """C worker tasks sharing one aiohttp ClientSession: the transport and nothing else."""
    import aiohttp
    import orjson

    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    records: list[dict[str, Any]] = [{}] * len(rows)
    todo = iter(range(len(rows)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            for i in todo:
                row_id, prompt = rows[i]
                started = time.perf_counter()
                body = orjson.dumps({"model": model,
                                     "messages": [{"role": "user", "content": prompt}]})
                async with session.post(url, data=body) as response:
                    raw = await response.read()
                    status = response.status
                if status != 200:
                    records[i] = {"id": row_id, "status": "error", "error": f"HTTP {status}"}
                    continue
                payload = orjson.loads(raw)
                usage = payload.get("usage") or {}
                records[i] = {
                    "id": row_id,
                    "status": "ok",
                    "content": payload["choices"][0]["message"]["content"],
                    "response_model": payload.get("model"),
                    "prompt_tokens": usage.get("prompt_tokens"),
                    "completion_tokens": usage.get("completion_tokens"),
                    "total_tokens": usage.get("total_tokens"),
                    "latency_ms": (time.perf_counter() - started) * 1000,
                }

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


RUNNERS = {"openai": run_openai, "litellm": run_litellm, "aiohttp": run_aiohttp}


def run(name: str, input_path: Path, output: Path, base_url: str, model: str,
        concurrency: int, max_retries: int = 2) -> int:
    """Run peer `name` on the input; write its results; return the number of rows."""
    api_key = os.environ.get("RU_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise SystemExit("set RU_LLM_API_KEY (any sk-ru-... value works with the simulator)")
    rows = read_rows(input_path)
    main = RUNNERS[name](rows, base_url, api_key, model, concurrency, max_retries)
    if name == "aiohttp":  # on uvloop, as batchrunner runs
        import uvloop

        records = uvloop.run(main)
    else:
        records = asyncio.run(main)
    write_results(output, records)
    return len(records)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one peer run (shared with bench/timed.py)."""
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("-i", "--input", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("-m", "--model", default="gpt-4o-mini")
    parser.add_argument("-c", "--concurrency", type=int, default=100)
    parser.add_argument("--max-retries", type=int, default=2)


def main(argv: list[str] | None = None) -> None:
    """Run one peer from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    prepare(args.peer)
    started = time.perf_counter()
    rows = run(args.peer, args.input, args.output, args.base_url, args.model,
               args.concurrency, args.max_retries)
    elapsed = time.perf_counter() - started
    print(f"{args.peer}: {rows} rows in {elapsed:.2f} s, {rows / elapsed:,.0f} rows/s")


if __name__ == "__main__":
    main()
