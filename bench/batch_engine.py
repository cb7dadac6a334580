"""`--engine batch` end to end against the simulator: wall time, peak memory, reading time.

    python bench/batch_engine.py --rows 100000

Starts `batchrunner gateway` in a subprocess (its own memory; `--batch-seconds 1`), writes an
input of N distinct prompts, and runs `batchrunner run --engine batch` on it (`--batch-poll
1`, batches of the default 50,000 lines). Prints the run's wall time, its peak RSS (the client
process alone: the gateway is still running when it is measured) and the seconds the run took
to read each finished batch's output into the checkpoint (from its log lines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ru-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RU_LLM_API_KEY": KEY}
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "gateway", "--port", str(port),
         "--batch-seconds", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "in.jsonl"
            with source.open("w") as handle:
                for i in range(args.rows):
                    handle.write(json.dumps({"id": f"r{i:07d}",
                                             "prompt": f"Summarise item {i} in one line."}) + "\n")
            started = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o",
                 str(Path(tmp) / "out.parquet"), "-m", "gpt-4o-mini", "--base-url",
                 f"http://127.0.0.1:{port}/v1", "--engine", "batch", "--batch-poll", "1"],
                env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            reads = [float(s) for s in re.findall(r"read into the checkpoint in ([\d.]+) s",
                                                  run.stderr)]
            print(f"rows {args.rows:,}: exit {run.returncode}, wall {wall:.1f} s, "
                  f"client peak RSS {peak:.0f} MB, output read into the checkpoint "
                  f"{sum(reads):.1f} s ({', '.join(f'{r:.1f}' for r in reads)} per batch)")
    finally:
        gateway.terminate()
        gateway.wait()


if __name__ == "__main__":
    main()
