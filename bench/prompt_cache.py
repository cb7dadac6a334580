"""How much of a document-QA job the gateway's prompt cache serves (issue 28).

Runs jobs/doc-qa.toml (sample_data/doc_qa.parquet: 200 documents of 1,500+ tokens, 10
questions each, rows shuffled) against the gateway simulator, started afresh for each run so
that no run inherits another's cache: C = 64 requests in flight, 200 ms of latency, cached
prefixes kept 60 s without use. For each run it prints rows, prompt tokens, cached tokens, the
cached share of prompt tokens, the cost, the cost with no cache at all, and the wall time; and
first the best share any order could reach (each document's first question a miss, every other
one a hit on the whole shared prefix), worked out with the simulator's own cache rule.

    python bench/prompt_cache.py                    # every run in RUNS
    python bench/prompt_cache.py --concurrency 100 --ttl 300

From the repository root, with the project's venv (bench/setup.sh is not needed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "doc-qa.toml"
MODEL = "gpt-4o-mini"  # the job's model

# One line a run: its label and the `batchrunner run` options that make it different.
RUNS: list[tuple[str, tuple[str, ...]]] = [
    ("input order", ("--order", "input")),
    ("prefix order", ("--order", "prefix")),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def simulator(args: argparse.Namespace) -> Iterator[str]:
    """`batchrunner gateway` in a subprocess, for the block: its base URL."""
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "gateway", "--port", str(port),
         "--latency-ms", str(args.latency_ms), "--prompt-cache-ttl", str(args.ttl)],
        stderr=subprocess.DEVNULL, env=_env(),
    )
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(root + "/_simulator/stats", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("the simulator did not start")
        yield root + "/v1"
    finally:
        process.terminate()
        process.wait()


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "RU_LLM_API_KEY": "sk-ru-bench",
            "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def run_once(args: argparse.Namespace, options: tuple[str, ...]) -> dict[str, float]:
    """One run of the job on a fresh simulator: the figures of its --summary-json."""
    with simulator(args) as base_url, tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        command = [sys.executable, "-m", "batchrunner", "run", str(JOB),
                   "-o", str(Path(tmp) / "out.parquet"), "--summary-json", str(summary),
                   "--base-url", base_url, "--concurrency", str(args.concurrency), "--quiet",
                   *options]
        started = time.monotonic()
        done = subprocess.run(command, env=_env(), capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"exit {done.returncode}: {done.stderr[-2000:]}")
        figures = json.loads(summary.read_text())
    figures["process_seconds"] = wall
    return figures


def best_share() -> tuple[int, int]:
    """(prompt tokens, cached tokens) of the job sent one document at a time, in sequence."""
    import pyarrow.parquet as pq

    from batchrunner.simulator import PromptCache, count_prompt_tokens

    job = tomllib.loads(JOB.read_text(encoding="utf-8"))
    table = pq.read_table(JOB.parent / job["input"], columns=["id", "document", "question"])
    rows = sorted(table.to_pylist(), key=lambda row: row["id"])  # doc001-q00, doc001-q01, ...
    cache = PromptCache()
    prompt = cached = 0
    for row in rows:
        messages = [{"role": "system", "content": job["system"]},
                    {"role": "user", "content": job["template"].format(**row)}]
        prefixes = cache.prefix_digests(job["model"], messages)
        prompt += count_prompt_tokens(messages)
        cached += cache.lookup(prefixes)
        cache.store(prefixes)
    return prompt, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--ttl", type=float, default=60, help="--prompt-cache-ttl, seconds")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from batchrunner import PriceTable

    prices = PriceTable.load(None)
    print(f"{JOB.relative_to(REPO)} on the simulator: C = {args.concurrency}, "
          f"latency {args.latency_ms:g} ms, prompt-cache TTL {args.ttl:g} s")
    prompt, cached = best_share()
    print(f"best any order can do: {cached:,} of {prompt:,} prompt tokens cached "
          f"({cached / prompt:.1%})")
    header = (f"{'run':<14} {'rows':>6} {'prompt tokens':>14} {'cached tokens':>14} "
              f"{'cached':>7} {'cost':>9} {'no cache':>9} {'wall':>7}")
    print(header)
    for label, options in RUNS:
        f = run_once(args, options)
        prompt, cached = int(f["prompt_tokens"]), int(f["cached_tokens"])
        uncached = prices.cost(MODEL, prompt, int(f["completion_tokens"]), 0) or 0.0
        print(f"{label:<14} {int(f['rows']):>6,} {prompt:>14,} {cached:>14,} "
              f"{cached / max(prompt, 1):>7.1%} {'$' + format(f['cost_usd'], '.4f'):>9} "
              f"{'$' + format(uncached, '.4f'):>9} {f['wall_seconds']:>6.1f}s", flush=True)


if __name__ == "__main__":
    main()
