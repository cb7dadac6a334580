"""What aiohttp's `trust_env=True` costs a request: the bare loop with it off and on.

With `trust_env=True`, aiohttp's ClientSession reads the proxy variables and `~/.netrc` in a
worker thread (`run_in_executor`, `asyncio.to_thread`) on every request. batchrunner reads the
same settings once per run instead (batchrunner/transport/client.py); this probe is why.

    python bench/trust_env.py --requests 10000      # C = 100, against bench/fastgate.py, L = 0
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson

HERE = Path(__file__).resolve().parent


async def probe(url: str, requests: int, concurrency: int, trust_env: bool) -> tuple[float, float]:
    """(requests per second, CPU µs per request) of a bare loop of `concurrency` workers."""
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "1"}]})
    headers = {"Authorization": "Bearer sk-ru-bench", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, trust_env=trust_env,
                                     headers=headers) as session:
        todo = iter(range(requests))

        async def worker() -> None:
            for _ in todo:
                async with session.post(url, data=body) as response:
                    orjson.loads(await response.read())

        started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return requests / elapsed, cpu / requests * 1e6


def main() -> None:
    """Start fastgate, probe with trust_env off, on, off; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("-c", "--concurrency", type=int, default=100)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, str(HERE / "fastgate.py"), "--port", "0",
                               "--latency-ms", "0"], stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        url = re.search(r"listening on (\S+)", server.stderr.readline()).group(1)  # type: ignore[union-attr]
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            run = asyncio.run
        for trust_env in (False, True, False):
            rate, cpu = run(probe(url + "/chat/completions", args.requests, args.concurrency,
                                  trust_env))
            print(f"trust_env={trust_env!s:5}  {rate:7,.0f} requests/s  {cpu:5,.0f} µs CPU a request")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
