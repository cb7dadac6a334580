"""Benchmarks of the response cache and of incremental inputs (issue 17).

From the repository root (the project's venv is enough; bench/setup.sh is not needed):

    PYTHONPATH=$PWD python bench/cache.py                       # every section
    PYTHONPATH=$PWD python bench/cache.py --section rerun

Sections (figures go to bench/README.md; each prints a Markdown table):

- rerun:       a fully cached 100,000-row rerun, `batchrunner run --cache` against
               bench/fastgate.py: requests sent (must be 0) and rows/s end to end (target >= 20,000)
- cpu:         CPU per row with `--cache` and no hits vs without (target: at most +15 %)
- lookup:      lookups served by a 1,000,000-entry cache file (target >= 50,000 rows/s)
- incremental: a 1,000,000-row checkpoint and 1,000 rows appended to its input: time to the
               first request (target <= 5 s) and peak memory (target < 400 MB)

Clients run as their own processes through bench/run.py's harness (bench/timed.py), so the
figures are those of `batchrunner run` as a user starts it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402  (bench/run.py: inputs, servers, measured client runs)

RESULTS = harness.RESULTS
MODEL = harness.MODEL
SECTIONS = ("rerun", "cpu", "lookup", "incremental")


def _config(path: Path, base_url: str, output: Path) -> Any:
    import batchrunner

    return batchrunner.build_config(None, {"input": path, "output": output, "model": MODEL,
                                           "base_url": base_url})


def store_answers(path: Path, url: str, answers: Any) -> int:
    """Store (Row, Result) pairs as a run does (`CacheSession.offer`, then `close`)."""
    import asyncio

    from batchrunner.cache.session import CacheSession

    async def offer_all() -> int:
        session = CacheSession.open(path, "write-only", url)
        assert session is not None
        for row, result in answers:
            session.offer(row, result)
        await session.close()
        return session.stored

    return asyncio.run(offer_all())


def fill_cache(cache: Path, source: Path, base_url: str) -> int:
    """Store an answer for every row of `source`, keyed as `batchrunner run` would key it."""
    from batchrunner.inputs.readers import iter_records
    from batchrunner.inputs.requests import RequestBuilder
    from batchrunner.inputs.scan import scan_input
    from batchrunner.results import Result, Usage

    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache}{suffix}").unlink(missing_ok=True)
    config = _config(source, base_url, RESULTS / "unused.parquet")
    builder = RequestBuilder(config, scan_input(config).columns)
    text = "A short cached answer: the tea trade grew through many ports."
    usage = Usage(21, 13, 34, 0)

    def answers() -> Any:
        for index, record, error in iter_records(config, columns=builder.columns):
            row = builder.build(index, record, error)
            yield row, Result(index, row.id, "ok", MODEL, text, (text,), "stop",
                              "gpt-4o-mini-2024-07-18", usage, 0.0000111,
                              response_id=f"chatcmpl-c{index:x}")

    return store_answers(cache, base_url, answers())


def section_rerun(args: argparse.Namespace) -> None:
    rows = args.rerun_rows
    source = harness.make_input(rows)
    cache = RESULTS / "cache-rerun.sqlite"
    runs = []
    with harness.Server("fast", 20.0) as server:
        started = time.perf_counter()
        fill_cache(cache, source, server.base_url)
        harness.log(f"filled the cache with {rows:,} answers in {time.perf_counter() - started:.1f} s")
        for attempt in range(args.repeat):
            runs.append(harness.run_client(
                "batchrunner", source, rows, 100, server, tag=f"-cached{attempt}",
                extra_args=(f"--cache={cache}",), timeout=args.timeout))
    lines = ["| run | requests sent | rows ok (of which cache hits) | run s | e2e s | rows/s (run) "
             "| rows/s (e2e) | CPU µs/row | peak MB | exit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, m in enumerate(runs, 1):
        lines.append(f"| {i} | {m.server_requests:,} | {m.ok_rows:,} | {m.run_s:.2f} | {m.wall_s:.2f} "
                     f"| {rows / m.run_s:,.0f} | {rows / m.wall_s:,.0f} | {m.cpu_us_per_row:,.1f} "
                     f"| {m.peak_mb:,.0f} | {m.exit_code} |")
    best = max(rows / m.wall_s for m in runs)
    per_cpu = max(rows / m.proc_cpu_s for m in runs)
    sent = max(m.server_requests for m in runs)
    verdict = "met" if best >= 20_000 and sent == 0 else "NOT met"
    harness.emit("cache-rerun", f"Fully cached rerun: {rows:,} rows, --cache, C = 100",
                 "\n".join(lines) + f"\n\nLoad average {os.getloadavg()[0]:.1f} on "
                 f"{os.cpu_count()} cores. Target: nothing sent and >= 20,000 rows/s end to end "
                 f"(spawn to exit): **{verdict}** (best {best:,.0f} rows/s wall; "
                 f"{per_cpu:,.0f} rows per CPU second of the whole process; most requests {sent}).")
    harness.save("cache-rerun", {"machine": harness.machine(), "runs": [m.to_json() for m in runs]})


def section_cpu(args: argparse.Namespace) -> None:
    rows = args.cpu_rows
    source = harness.make_input(rows)
    off: list[Any] = []
    on: list[Any] = []
    with harness.Server("fast", 10.0) as server:
        for attempt in range(args.repeat):
            off.append(harness.run_client("batchrunner", source, rows, 100, server,
                                          tag=f"-nocache{attempt}", timeout=args.timeout))
            cache = RESULTS / f"cache-cpu-{attempt}.sqlite"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{cache}{suffix}").unlink(missing_ok=True)
            on.append(harness.run_client("batchrunner", source, rows, 100, server,
                                         tag=f"-emptycache{attempt}",
                                         extra_args=(f"--cache={cache}",), timeout=args.timeout))

    def us(m: Any) -> float:
        return m.run_cpu_s / rows * 1e6

    def proc_us(m: Any) -> float:
        return m.proc_cpu_s / rows * 1e6

    lines = ["| cache | run | requests | run CPU µs/row | process CPU µs/row | run s | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for label, group in (("off", off), ("on, no hits", on)):
        for i, m in enumerate(group, 1):
            lines.append(f"| {label} | {i} | {m.server_requests:,} | {us(m):,.1f} | {proc_us(m):,.1f} "
                         f"| {m.run_s:.2f} | {m.peak_mb:,.0f} |")
    base, cached = statistics.median(map(us, off)), statistics.median(map(us, on))
    pbase, pcached = statistics.median(map(proc_us, off)), statistics.median(map(proc_us, on))
    extra, pextra = cached / base - 1, pcached / pbase - 1
    verdict = "met" if extra <= 0.15 else "NOT met"
    harness.emit("cache-cpu", f"CPU per row, cache on (no hits) vs off: {rows:,} rows, C = 100, L = 10 ms",
                 "\n".join(lines) + f"\n\nMedian run CPU: {base:,.1f} µs/row off, {cached:,.1f} µs/row "
                 f"on ({extra:+.1%}); whole process {pbase:,.1f} vs {pcached:,.1f} ({pextra:+.1%}). "
                 f"Target at most +15 %: **{verdict}**.")
    harness.save("cache-cpu", {"machine": harness.machine(),
                               "off": [m.to_json() for m in off], "on": [m.to_json() for m in on]})


def _lookup_body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [
        {"role": "user", "content": f"Summarise the history of the tea trade, part {i}."}]}


def section_lookup(args: argparse.Namespace) -> None:
    from batchrunner.cache.responses import ResponseCache, cache_key
    from batchrunner.cache.session import CacheSession
    from batchrunner.results import Result, Row, Usage

    entries = args.lookup_entries
    url = "http://127.0.0.1:9/v1"
    path = RESULTS / f"cache-{entries}.sqlite"
    marker = path.with_suffix(".ready")
    if not (marker.exists() and path.exists()):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        started = time.perf_counter()
        text = "A cached answer of ordinary length, a sentence or two long."
        answer = Result(0, "row", "ok", MODEL, text, (text,), "stop", "gpt-4o-mini-2024-07-18",
                        Usage(21, 13, 34, 0), 0.0000111, response_id="chatcmpl-x")
        store_answers(path, url, ((Row(i, f"row-{i}", _lookup_body(i)), answer)
                                  for i in range(entries)))
        marker.write_text("ok")
        harness.log(f"built a {entries:,}-entry cache in {time.perf_counter() - started:.1f} s "
                    f"({path.stat().st_size / 1e6:,.0f} MB)")
    size = sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))
    rng = random.Random(17)
    probes = args.lookup_probes
    picked = [rng.randrange(entries) for _ in range(probes)]
    lines = ["| what | rows | wall s | rows/s (wall) | CPU s | rows/s (per CPU second) | hits |",
             "|---|---|---|---|---|---|---|"]
    rates, cpu_rates = [], []
    load = os.getloadavg()[0]
    with ResponseCache.open(path) as cache:
        keys = [cache_key(_lookup_body(i), url) for i in picked]
        started, cpu = time.perf_counter(), time.thread_time()
        hits = 0
        for start in range(0, probes, 512):
            hits += len(cache.lookup(keys[start:start + 512]))
        took, used = time.perf_counter() - started, time.thread_time() - cpu
        rates.append(probes / took)
        cpu_rates.append(probes / used)
        lines.append(f"| ResponseCache.lookup, 512 keys a query (keys ready) | {probes:,} "
                     f"| {took:.2f} | {probes / took:,.0f} | {used:.2f} | {probes / used:,.0f} "
                     f"| {hits:,} |")
    session = CacheSession(ResponseCache.open(path), "read-only", url)
    rows = [Row(i, f"row-{i}", _lookup_body(i)) for i in picked]
    started, cpu = time.perf_counter(), time.thread_time()
    hits = 0
    for start in range(0, probes, 512):
        hits += sum(a is not None for a in session._lookup(rows[start:start + 512])[2])
    took, used = time.perf_counter() - started, time.thread_time() - cpu
    rates.append(probes / took)
    cpu_rates.append(probes / used)
    session.cache.close()
    lines.append(f"| the engine's lookup: key and hash of each request body, then the query "
                 f"| {probes:,} | {took:.2f} | {probes / took:,.0f} | {used:.2f} "
                 f"| {probes / used:,.0f} | {hits:,} |")
    verdict = "met" if min(rates) >= 50_000 else "NOT met"
    harness.emit("cache-lookup", f"Lookups in a {entries:,}-entry cache file ({size / 1e6:,.0f} MB), random rows",
                 "\n".join(lines) + f"\n\nLoad average at the start: {load:.1f} on "
                 f"{os.cpu_count()} cores. Target >= 50,000 rows/s (wall): **{verdict}**; "
                 f"per CPU second: {min(cpu_rates):,.0f} rows/s at the least.")
    harness.save("cache-lookup", {"machine": harness.machine(), "rates": rates,
                                  "cpu_rates": cpu_rates, "size": size, "load": load})


def incremental_template(path: Path, rows: int, base_url: str) -> Path:
    """A checkpoint of `rows` ok results over `path`, with the hashes a run records (of each
    request body and of its input values)."""
    import numpy as np

    import batchrunner
    from batchrunner.engine.execution import ChangedInput
    from batchrunner.inputs.requests import RequestBuilder
    from batchrunner.inputs.scan import fingerprint_input, scan_input
    from batchrunner.results import Result, Usage
    from batchrunner.store import checkpoint as checkpoint_module
    from batchrunner.store.checkpoint import Checkpoint
    from batchrunner.store.segments import results_to_batch

    output = RESULTS / "incremental-template" / "out.parquet"
    config = _config(path, base_url, output)
    fingerprint = {"input": fingerprint_input(config.input),
                   "settings": config.request_settings()}
    key = hashlib.sha256(json.dumps([fingerprint, Path(checkpoint_module.__file__).read_text()],
                                    sort_keys=True, default=str).encode()).hexdigest()
    directory = output.with_name(output.name + ".checkpoint")
    marker = output.with_name("template-key")
    if directory.exists() and marker.exists() and marker.read_text() == key:
        return directory
    shutil.rmtree(output.parent, ignore_errors=True)
    output.parent.mkdir(parents=True)
    started = time.perf_counter()
    info = scan_input(config)
    builder = RequestBuilder(config, info.columns)
    current = ChangedInput(config, builder)
    ids, input_hashes = current.rows()  # what a run records of each row, as a run computes it
    hashes = current.body_hashes(np.ones(len(ids), dtype=bool))
    ids = ids.to_pylist()
    prices = batchrunner.PriceTable.load(None)
    usage = Usage(prompt_tokens=21, completion_tokens=13, total_tokens=34, cached_tokens=0)
    cost = prices.cost(MODEL, 21, 13, 0)
    content = "A short benchmark answer: the tea trade grew through many ports."
    ckpt = Checkpoint.open(config.output, fingerprint, rows=info.rows)
    try:
        for start in range(0, rows, 50_000):
            stop = min(rows, start + 50_000)
            results = [
                Result(index=i, id=ids[i], status="ok", model=MODEL, content=content,
                       choices=(content,), finish_reason="stop",
                       response_model="gpt-4o-mini-2024-07-18", usage=usage, cost_usd=cost,
                       attempts=1, latency_ms=50.0, http_status=200,
                       response_id=f"chatcmpl-inc{i:x}")
                for i in range(start, stop)
            ]
            ckpt.write_batch(results_to_batch(results, hashes[start:stop].tolist(),
                                              input_hashes[start:stop].tolist()))
    finally:
        ckpt.close()
    marker.write_text(key)
    harness.log(f"built a {rows:,}-row checkpoint with request hashes in "
                f"{time.perf_counter() - started:.1f} s")
    return directory


def section_incremental(args: argparse.Namespace) -> None:
    done, extra = args.incremental_rows, 1000
    old, new = harness.make_input(done), harness.make_input(done + extra)
    with harness.Server("fast", 50.0) as server:
        template = incremental_template(old, done, server.base_url)

        def restore(output: Path) -> None:
            shutil.copytree(template, output.with_name(output.name + ".checkpoint"))

        m = harness.run_client("batchrunner", new, done + extra, 100, server, tag="-incremental",
                               watch_first_request=True, prepare_output=restore,
                               timeout=args.timeout)
    first = m.first_request_s
    verdict = ("met" if first is not None and first <= 5 and m.peak_mb < 400
               and m.server_requests == extra else "NOT met")
    harness.emit(
        "cache-incremental",
        f"Incremental input: {done:,} rows checkpointed, {extra:,} appended to the input",
        "| first new request after | requests sent | rows in the final file (ok) | run s | e2e s "
        "| peak MB | exit |\n|---|---|---|---|---|---|---|\n"
        f"| {first if first is None else f'{first:.2f} s'} | {m.server_requests:,} "
        f"| {m.output_rows:,} ({m.ok_rows:,}) | {m.run_s:.2f} | {m.wall_s:.2f} | {m.peak_mb:,.0f} "
        f"| {m.exit_code} |\n\nTarget: first request within 5 s, under 400 MB, {extra:,} "
        f"requests: **{verdict}**.")
    harness.save("cache-incremental", {"machine": harness.machine(), "runs": [m.to_json()]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=SECTIONS, action="append")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rerun-rows", type=int, default=100_000)
    parser.add_argument("--cpu-rows", type=int, default=20_000)
    parser.add_argument("--lookup-entries", type=int, default=1_000_000)
    parser.add_argument("--lookup-probes", type=int, default=200_000)
    parser.add_argument("--incremental-rows", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=170.0)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for section in args.section or SECTIONS:
        globals()[f"section_{section}"](args)


if __name__ == "__main__":
    main()
