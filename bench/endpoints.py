"""Rows per minute of one, two and four rate-limited endpoints (issue 29).

Starts four gateway simulators, each in its own process with a requests-per-minute limit, and
runs `batchrunner run` against the first one, the first two and all four (`--endpoint URL
--api-key-env NAME` repeated, `--rpm` applied to each endpoint), and prints a table: rows,
wall seconds (the run's own, from --summary-json), rows per minute, the ideal (endpoints x
rpm), and the 429s the simulators answered (pacing should avoid them all).

    PYTHONPATH=$PWD python bench/endpoints.py                    # 400 rows, 600 rpm each
    PYTHONPATH=$PWD python bench/endpoints.py --rows 800 --rpm 1200
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_simulator/stats") as response:
        return json.load(response)


def reset(port: int) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/_simulator/reset", method="POST")
    urllib.request.urlopen(request).close()


def start(port: int, rpm: int, latency_ms: float) -> subprocess.Popen[bytes]:
    gateway = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "gateway", "--port", str(port), "--rpm", str(rpm),
         "--latency-ms", str(latency_ms)],
        stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            stats(port)
            return gateway
        except OSError:
            time.sleep(0.1)
    gateway.kill()
    raise SystemExit("a gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--counts", default="1,2,4")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    ports = [free_port() for _ in range(max(counts))]
    gateways = [start(port, args.rpm, args.latency_ms) for port in ports]
    env = {**os.environ, **{f"BENCH_KEY_{i}": f"sk-ru-bench-endpoint-{i}" for i in range(len(ports))}}
    figures = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "in.jsonl"
            with open(source, "w") as handle:
                for i in range(args.rows):
                    handle.write(json.dumps({"id": f"r{i}", "prompt": f"Say {i}."}) + "\n")
            for n in counts:
                for port in ports:
                    reset(port)
                summary = Path(tmp) / f"summary-{n}.json"
                command = [sys.executable, "-m", "batchrunner", "run", "-i", str(source),
                           "-o", str(Path(tmp) / f"out-{n}.parquet"), "-m", "gpt-4o-mini", "-q",
                           "--rpm", str(args.rpm), "--concurrency", str(args.concurrency),
                           "--summary-json", str(summary)]
                for i, port in enumerate(ports[:n]):
                    command += ["--endpoint", f"http://127.0.0.1:{port}/v1",
                                "--api-key-env", f"BENCH_KEY_{i}"]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{n} endpoint(s): exit {done.returncode}: {done.stderr}")
                report = json.loads(summary.read_text())
                served = [stats(port) for port in ports[:n]]
                limited = sum(int(s["by_status"].get("429", 0)) for s in served)
                seconds = report["wall_seconds"]
                figures.append((n, report["ok"], seconds, report["ok"] / seconds * 60,
                                n * args.rpm, limited))
    finally:
        for gateway in gateways:
            gateway.kill()
            gateway.wait()

    print(f"{args.rows} rows, each endpoint limited to {args.rpm} requests a minute "
          f"(--rpm {args.rpm}), --concurrency {args.concurrency}, latency {args.latency_ms:g} ms")
    print("| endpoints | rows ok | seconds | rows/min | ideal rows/min | 429s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, ok, seconds, per_minute, ideal, limited in figures:
        print(f"| {n} | {ok:,} | {seconds:.1f} | {per_minute:,.0f} | {ideal:,} | {limited} |")


if __name__ == "__main__":
    main()
