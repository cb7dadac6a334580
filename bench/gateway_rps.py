"""How many chat completions per second the gateway simulator serves on one core.

Starts `serve(GatewayConfig(port=0))` in a subprocess pinned to one CPU (no latency, no faults)
and loads it from another process pinned to another CPU: `wrk` with a Lua script when it is
installed (`apt-get install wrk`), else an aiohttp client with many keep-alive connections.
Every request has a different prompt unless `--same-body` (then the answer cache serves it).

    python bench/gateway_rps.py                      # 10 s, 64 connections, distinct prompts
    python bench/gateway_rps.py --stream --seconds 5
    python bench/gateway_rps.py --client aiohttp --same-body
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

KEY = "sk-ru-bench"
PROMPT = "Question {i}: summarise the history of the tea trade between {i} ports, briefly."

SERVER = textwrap.dedent(
    """
    import os
    cpu = {cpu!r}
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {{cpu}})
    from batchrunner.simulator import GatewayConfig, serve
    serve(GatewayConfig(port=0))
    """
)

WRK_SCRIPT = textwrap.dedent(
    """
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    wrk.headers["Authorization"] = "Bearer {key}"
    local counter = 0
    local same = {same}
    local stream = {stream}
    request = function()
      counter = counter + 1
      local i = same and 0 or counter
      local body = string.format(
        '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{prompt}"}}]%s}}',
        {args}, stream and ',"stream":true,"stream_options":{{"include_usage":true}}' or '')
      return wrk.format(nil, "/v1/chat/completions", nil, body)
    end
    """
)


def body(i: int, stream: bool) -> dict[str, object]:
    """The request body number `i`."""
    request: dict[str, object] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": PROMPT.format(i=i)}],
    }
    if stream:
        request.update(stream=True, stream_options={"include_usage": True})
    return request


def start_server(cpu: int | None) -> tuple[subprocess.Popen[str], str]:
    """Start the simulator in a subprocess; return it and its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(cpu=cpu)], stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"the gateway did not start: {line!r}")
    # Keep reading its stderr, so that a chatty server never blocks on a full pipe.
    drain = threading.Thread(
        target=shutil.copyfileobj, args=(process.stderr, sys.stderr), daemon=True
    )
    drain.start()
    return process, match.group(1)


def run_wrk(base_url: str, args: argparse.Namespace, cpu: int | None) -> tuple[float, str]:
    """Load with wrk; return requests per second and wrk's report."""
    prompt = PROMPT.replace("{i}", "%d")
    script = WRK_SCRIPT.format(
        key=KEY,
        prompt=prompt,
        args="i, i",
        same="true" if args.same_body else "false",
        stream="true" if args.stream else "false",
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    command = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "-s", file.name]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    try:
        report = subprocess.run(
            [*command, base_url.removesuffix("/v1")], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(file.name)
    if "Non-2xx" in report or "Socket errors" in report:
        raise SystemExit(f"errors during the run:\n{report}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", report)
    if not match:
        raise SystemExit(f"no figure in wrk's report:\n{report}")
    rate = float(match.group(1))
    return rate, report


async def _aiohttp_load(base_url: str, args: argparse.Namespace) -> tuple[int, float]:
    import aiohttp

    url = f"{base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    payloads = [json.dumps(body(0 if args.same_body else i, args.stream)) for i in range(50_000)]
    deadline = time.perf_counter() + args.seconds
    done = 0
    counter = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done, counter
        while time.perf_counter() < deadline:
            counter += 1
            payload = payloads[counter % len(payloads)]
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise SystemExit(f"status {response.status}")
            done += 1

    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(args.connections)))
        return done, time.perf_counter() - start


def run_aiohttp(base_url: str, args: argparse.Namespace, cpu: int | None) -> tuple[float, str]:
    """Load with an aiohttp client; return requests per second and a one-line report."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    done, elapsed = asyncio.run(_aiohttp_load(base_url, args))
    return done / elapsed, f"{done} requests in {elapsed:.1f}s"


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used (Linux), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    """Parse options, run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="SSE answers with usage")
    parser.add_argument("--same-body", action="store_true", help="one body, from the cache")
    parser.add_argument("--client", choices=("auto", "wrk", "aiohttp"), default="auto")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "aiohttp"
    process, base_url = start_server(server_cpu)
    try:
        load = run_wrk if client == "wrk" else run_aiohttp
        load(base_url, argparse.Namespace(**{**vars(args), "seconds": 1}), client_cpu)  # warm up
        reset = urllib.request.Request(base_url.removesuffix("/v1") + "/_simulator/reset", b"")
        urllib.request.urlopen(reset).close()
        cpu_before = cpu_seconds(process.pid)
        rate, report = load(base_url, args, client_cpu)
        cpu_after = cpu_seconds(process.pid)
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_simulator/stats") as reply:
            served = json.load(reply)
    finally:
        process.terminate()
        process.wait(timeout=10)
    print(report.strip(), file=sys.stderr)
    print(f"simulator stats: {served}", file=sys.stderr)
    kind = "stream" if args.stream else "json"
    bodies = "same body" if args.same_body else "distinct bodies"
    print(
        f"gateway: {rate:,.0f} requests/s on one core (cpu {server_cpu}; {kind}, {bodies}, "
        f"{args.connections} connections, client {client} on cpu {client_cpu}, "
        f"{Path(sys.executable).name} {sys.version.split()[0]})"
    )
    if cpu_before is not None and cpu_after is not None and cpu_after > cpu_before:
        # On a shared machine the server gets less than a whole core: this is the figure
        # for a core of its own.
        per_cpu = served["requests"] / (cpu_after - cpu_before)
        print(
            f"gateway: {per_cpu:,.0f} requests per CPU-second of the server "
            f"({served['requests']:,} requests, {cpu_after - cpu_before:.2f} CPU-s "
            f"in {args.seconds} s)"
        )


if __name__ == "__main__":
    main()
