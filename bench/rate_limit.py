"""Adaptive pacing against a rate-limited gateway (issue 5).

Starts the simulator with a requests-per-minute limit, runs `batchrunner run` against it with
no --rpm and a high concurrency, and prints: rows finished, share of answers that were 429,
and the rate achieved against the limit.

    python bench/rate_limit.py                      # 600 rpm, 1,800 rows, --concurrency 64
    python bench/rate_limit.py --rows 3000 --rpm 600 --concurrency 64

The simulator counts requests in a sliding 60-second window, so a window's worth is admitted
at once and N rows need at least (ceil(N / limit) - 1) minutes: the rate achieved is that
shortest possible time over the time the run took (100% = as fast as the limit allows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stats(base: str) -> dict:
    with urllib.request.urlopen(base.replace("/v1", "/_simulator/stats")) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1800)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=50)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "gateway", "--port", str(port), "--rpm",
         str(args.rpm), "--latency-ms", str(args.latency_ms)],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                stats(base)
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "in.jsonl"
            with open(source, "w") as handle:
                for i in range(args.rows):
                    handle.write(json.dumps({"id": i, "prompt": f"Describe item {i}."}) + "\n")
            env = dict(os.environ, RU_LLM_API_KEY="sk-ru-bench")
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o",
                 str(Path(tmp) / "out.parquet"), "-m", "gpt-4o-mini", "--base-url", base,
                 "--concurrency", str(args.concurrency), "--max-attempts", "20", "--quiet"],
                env=env, capture_output=True, text=True,
            )
            wall = time.monotonic() - started
        figures = stats(base)
    finally:
        gateway.terminate()
        gateway.wait()

    limited = figures["by_status"].get("429", 0)
    ok = figures["by_status"].get("200", 0)
    shortest = (math.ceil(args.rows / args.rpm) - 1) * 60.0
    print(f"exit code            {done.returncode}")
    print(f"rows                 {args.rows} (answered 200: {ok})")
    print(f"requests             {figures['requests']}")
    print(f"429 answers          {limited} ({100 * limited / max(figures['requests'], 1):.1f}%)")
    print(f"wall time            {wall:.1f} s")
    print(f"shortest possible    {shortest:.1f} s for {args.rows} rows at {args.rpm} per minute")
    if shortest:
        print(f"rate achieved        {100 * shortest / wall:.1f}% of what the limit allows")
    print(f"overall rate         {args.rows / wall * 60:.0f} rows/min over the whole run")
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
