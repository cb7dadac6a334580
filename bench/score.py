"""How long `batchrunner score` takes on a 1,000,000-row results file, and its peak memory.

    PYTHONPATH=. /work/venv/bin/python bench/score.py            # every built-in metric
    PYTHONPATH=. /work/venv/bin/python bench/score.py --rows 200000 --metric f1

Makes a results file shaped like a real one (the output columns, short answers in the usual
phrasings, references), then scores it with each metric in its own process (the `score`
command, in-process via `cli.main`), printing wall time and peak memory (VmHWM) as a Markdown
table. The file lives in a temporary folder and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METRICS = ["exact", "normalized", "contains", r"regex:answer is (\w+)", "numeric", "choice",
           "json:answer", "f1"]

CHILD = r"""
import resource, sys, time
from batchrunner.cli.commands import main
started = time.perf_counter()
try:
    main(["score", sys.argv[1], "--metric", sys.argv[2], "--reference-column", "reference",
          "-o", sys.argv[3]], standalone_mode=False)
finally:
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    peak = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    print("BENCH", wall, cpu, peak, file=sys.stderr)
"""


def make_results(path: Path, rows: int) -> None:
    """A results file of `rows` rows, written in chunks (the benchmark itself stays small)."""
    rng = np.random.default_rng(7)
    writer = None
    chunk = 100_000
    letters = np.array(list("ABCD"))
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        numbers = rng.integers(-99_999, 999_999, n)
        right = rng.random(n) < 0.8
        answered = np.where(right, numbers, numbers + 1)
        kind = rng.integers(0, 4, n)
        letter = letters[rng.integers(0, 4, n)]
        content = np.where(
            kind == 0, np.char.add("The answer is ", np.char.mod("%d", answered)),
            np.where(kind == 1, np.char.add("Answer: ", letter),
                     np.where(kind == 2, np.char.add('{"answer": "', np.char.add(letter, '"}')),
                              np.char.add("(", np.char.add(letter, ") because of the answer"))))
        )
        reference = np.where(kind == 0, np.char.mod("%d", numbers), letter)
        table = pa.table({
            "id": pa.array(np.char.mod("q%07d", np.arange(start, start + n))),
            "question": pa.array(np.char.mod("Calculate %d plus one, please.", numbers)),
            "reference": pa.array(reference),
            "status": pa.array(np.where(rng.random(n) < 0.99, "ok", "error")),
            "content": pa.array(content),
            "model": pa.array(np.where(rng.random(n) < 0.5, "gpt-4o", "gpt-4o-mini")),
            "prompt_tokens": pa.array(rng.integers(20, 80, n)),
            "completion_tokens": pa.array(rng.integers(2, 20, n)),
            "cost_usd": pa.array(rng.random(n) / 1000),
            "latency_ms": pa.array(rng.random(n) * 900),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
    assert writer is not None
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--metric", action="append", help="only these metrics (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "results.parquet"
        started = time.perf_counter()
        make_results(source, args.rows)
        size = source.stat().st_size / 1e6
        print(f"made {args.rows:,} rows ({size:.0f} MB) in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
        figures = []
        for metric in args.metric or METRICS:
            out = Path(folder) / "scored.parquet"
            done = subprocess.run([sys.executable, "-c", CHILD, str(source), metric, str(out)],
                                  capture_output=True, text=True)
            line = [ln for ln in done.stderr.splitlines() if ln.startswith("BENCH")]
            if done.returncode != 0 or not line:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(f"{metric}: failed")
            _, wall, cpu, peak = line[-1].split()
            figures.append({"metric": metric, "rows": args.rows, "seconds": float(wall),
                            "cpu_seconds": float(cpu), "peak_mb": float(peak),
                            "said": done.stdout.strip()})
    print("| metric | rows | wall s | CPU s | peak MB |\n|---|---:|---:|---:|---:|")
    for f in figures:
        print(f"| `{f['metric']}` | {f['rows']:,} | {f['seconds']:.1f} | {f['cpu_seconds']:.1f} "
              f"| {f['peak_mb']:.0f} |")
    print(json.dumps(figures), file=sys.stderr)


if __name__ == "__main__":
    main()
