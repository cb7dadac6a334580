"""The Batch API on the simulator: time to upload, answer and read back a batch of N lines.

    python bench/batch_api.py --lines 100000

Starts `batchrunner gateway` in a subprocess (its own memory), writes N request lines, then
with transport/batch_api.py's client: uploads them, creates the batch, polls it every 0.5 s
until it is completed, and reads its output file a line at a time (each line decoded with
orjson, as a run would). Prints each step's seconds and the peak memory (VmHWM) of the
gateway and of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import orjson
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchrunner.transport.batch_api import BatchApi  # noqa: E402
from batchrunner.transport.client import Client  # noqa: E402

KEY = "sk-ru-bench"


def peak_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


async def measure(base_url: str, path: Path, gateway_pid: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with Client(base_url, KEY) as client:
        api = BatchApi(client)
        started = time.perf_counter()
        file_id = await api.upload(path)
        figures["upload_s"] = time.perf_counter() - started
        started = time.perf_counter()
        batch = await api.create(file_id, {"bench": "batch_api"})
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            await asyncio.sleep(0.5)
            batch = await api.retrieve(batch["id"])
        figures["answer_s"] = time.perf_counter() - started
        assert batch["status"] == "completed", batch["status"]
        started = time.perf_counter()
        count = 0
        async for line in api.lines(batch["output_file_id"]):
            orjson.loads(line)
            count += 1
        figures["read_s"] = time.perf_counter() - started
        figures["output_lines"] = count
    figures["gateway_peak_mb"] = peak_mb(gateway_pid)
    figures["client_peak_mb"] = peak_mb(os.getpid())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--batch-seconds", type=float, default=2.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "requests.jsonl"
        with path.open("w") as out:
            for i in range(options.lines):
                body = {"model": "gpt-4o-mini", "messages": [
                    {"role": "user", "content": f"Summarise document {i} about rivers."}]}
                out.write(json.dumps({"custom_id": f"row-{i}", "method": "POST",
                                      "url": "/v1/chat/completions", "body": body}) + "\n")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "batchrunner", "gateway", "--port", "0",
             "--batch-seconds", str(options.batch_seconds)],
            cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )
        try:
            line = gateway.stderr.readline()
            base_url = line.rsplit(" ", 1)[-1].strip()
            figures = asyncio.run(measure(base_url, path, gateway.pid))
        finally:
            gateway.terminate()
            gateway.wait()
    figures = {"lines": options.lines, **figures}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                      for k, v in figures.items()}, indent=2))


if __name__ == "__main__":
    main()
