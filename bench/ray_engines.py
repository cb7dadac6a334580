"""The Ray engine beside the local one and beside Ray Data's LLM HTTP stage (issue 19).

The same 20,000-row job (C = 100 requests in flight in all, L = 50 ms) against
bench/fastgate.py, each client a process of its own. A Ray run is a tree of processes (the
driver, Ray's GCS and raylet, the actors' workers), so CPU and memory are those of the whole
tree, sampled from /proc every 50 ms: CPU is the sum over every process seen (each at its
last reading), memory the peak of the summed resident sizes.

    python bench/ray_engines.py                 # all three, ~2 minutes
    python bench/ray_engines.py --rows 5000 --only ray
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    KEY,
    MODEL,
    RESULTS,
    ROOT,
    TICK,
    Server,
    clean_output,
    log,
    machine,
    make_input,
)

RAY_DATA = """
import sys, time
import pyarrow.parquet as pq
import ray
from ray.data.llm import HttpRequestProcessorConfig, build_processor

source, output, url, key, actors, batch = sys.argv[1:7]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
config = HttpRequestProcessorConfig(
    url=url + "/chat/completions", headers={"Authorization": "Bearer " + key},
    concurrency=int(actors), batch_size=int(batch), max_retries=3,
)
processor = build_processor(
    config,
    preprocess=lambda row: dict(payload=dict(
        model="%s", messages=[{"role": "user", "content": row["prompt"]}])),
    postprocess=lambda row: dict(id=row["id"], answer=str(row.get("http_response"))),
)
ds = processor(ray.data.read_parquet(source))
ds.write_parquet(output)
""" % MODEL


class TreeSampler:
    """CPU and resident memory of a process and all its descendants, sampled from /proc."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.cpu: dict[int, float] = {}
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.05)

    def sample(self) -> None:
        parents: dict[int, int] = {}
        stats: dict[int, list[str]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            stats[int(entry)] = fields
        tree = {self.root}
        grew = True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        rss = 0.0
        for pid in tree & stats.keys():
            fields = stats[pid]
            self.cpu[pid] = (int(fields[11]) + int(fields[12])) / TICK
            rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        self.peak_mb = max(self.peak_mb, rss)


def measure(name: str, command: list[str], output: Path, server: Server, rows: int,
            env: dict[str, str]) -> dict[str, Any]:
    clean_output(output)
    server.reset()
    cpu_before = server.cpu()
    started = time.perf_counter()
    with open(RESULTS / f"ray-{name}.log", "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink, env=env)
        with TreeSampler(process.pid) as sampler:
            code = process.wait()
            sampler.sample()
    wall = time.perf_counter() - started
    ok = _ok_rows(output)
    stats = server.stats()
    return {
        "client": name, "exit_code": code, "rows": rows, "ok_rows": ok, "wall_s": wall,
        "rows_per_s": ok / wall if wall else 0.0,
        "cpu_us_per_row": sampler.cpu_s / ok * 1e6 if ok else 0.0,
        "driver_cpu_us_per_row": sampler.cpu.get(process.pid, 0.0) / ok * 1e6 if ok else 0.0,
        "peak_mb": sampler.peak_mb, "server_requests": stats.get("requests"),
        "server_cpu_s": server.cpu() - cpu_before,
    }


def _ok_rows(output: Path) -> int:
    if output.is_dir():  # Ray Data writes a folder of files
        total = 0
        for part in output.glob("*.parquet"):
            table = pq.read_table(part, columns=["answer"])
            total += sum(1 for a in table.column("answer").to_pylist() if a and "choices" in a)
        return total
    if not output.exists():
        return 0
    table = pq.read_table(output, columns=["status"])
    return table.column("status").to_pylist().count("ok")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--only", choices=("local", "ray", "raydata"), action="append")
    args = parser.parse_args(argv)
    source = make_input(args.rows, short=True)
    env = {**os.environ, "BENCH_KEY": KEY, "PYTHONPATH": str(ROOT)}
    clients = args.only or ["local", "ray", "raydata"]
    figures = []
    with Server("fast", args.latency_ms) as server:
        for name in clients:
            output = RESULTS / f"ray-{name}.parquet"
            base = [sys.executable, "-m", "batchrunner", "run", "-i", str(source),
                    "-o", str(output), "-m", MODEL, "--base-url", server.base_url,
                    "--api-key-env", "BENCH_KEY", "-c", str(args.concurrency), "--quiet"]
            if name == "local":
                command = base
            elif name == "ray":
                command = [*base, "--engine", "ray", "--ray-actors", "2"]
            else:
                command = [sys.executable, "-c", RAY_DATA, str(source), str(output),
                           server.base_url, KEY, "2", str(args.concurrency // 2)]
            log(f"{name}: {args.rows:,} rows, C = {args.concurrency}, L = {args.latency_ms:g} ms")
            figures.append(measure(name, command, output, server, args.rows, env))
            log(json.dumps(figures[-1]))
    ideal = args.concurrency / (args.latency_ms / 1000)
    print(f"\n{args.rows:,} rows, C = {args.concurrency}, L = {args.latency_ms:g} ms "
          f"(C/L = {ideal:,.0f} rows/s), {machine()['cpu']}, {os.cpu_count()} cores\n")
    print("| engine | exit | ok rows | rows/s | % of C/L | CPU µs/row (tree) "
          "| of it, the driver | peak MB (tree) |")
    print("|---|---|---|---|---|---|---|---|")
    for f in figures:
        print(f"| {f['client']} | {f['exit_code']} | {f['ok_rows']:,} | {f['rows_per_s']:,.0f} | "
              f"{f['rows_per_s'] / ideal:.0%} | {f['cpu_us_per_row']:,.0f} | "
              f"{f['driver_cpu_us_per_row']:,.0f} | {f['peak_mb']:,.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray_engines.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
