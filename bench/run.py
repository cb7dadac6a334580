"""The batchrunner benchmark (issue 8): throughput, CPU per row, peers, curve, memory, resume.

One command, from the repository root, after `bash bench/setup.sh`:

    bench/.venv/bin/python bench/run.py                      # every section, ~15 minutes
    bench/.venv/bin/python bench/run.py --section peers --rows 5000
    bench/.venv/bin/python bench/run.py --section curve --curve-peers

Every client runs as its own process (bench/timed.py) against a server in another process;
this process only starts them, samples and prints. Inputs, outputs and logs go to
bench/results/ (git-ignored); each section's figures are printed as a Markdown table and saved
as bench/results/SECTION.json. See bench/README.md for what each section measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
KEY = "sk-ru-bench"
MODEL = "gpt-4o-mini"
CLIENTS = ("batchrunner", "aiohttp", "openai", "litellm")
SECTIONS = ("throughput", "cpu", "peers", "curve", "resume", "memory")
LONG_PROMPT = "Question {}: summarise the history of the tea trade between these ports, briefly."
SHORT_PROMPT = "Say {}."
TICK = os.sysconf("SC_CLK_TCK")


# -- the machine ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("batchrunner", "aiohttp", "orjson", "pyarrow", "openai", "litellm", "uvloop"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "not installed"
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": os.getloadavg(),
        "commit": _commit(ROOT),
        "versions": versions,
    }


def _commit(tree: Path) -> str:
    """`git describe` of a checkout: which batchrunner was measured."""
    return subprocess.run(
        ["git", "-C", str(tree), "describe", "--always", "--dirty"],
        check=False, capture_output=True, text=True,
    ).stdout.strip()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    """Resident memory of a live process, MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- inputs ---------------------------------------------------------------------------------


def make_input(rows: int, *, short: bool = False) -> Path:
    """A Parquet input of `rows` rows (`id`, `prompt`), made once and kept in bench/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"input-{rows}{'-short' if short else ''}.parquet"
    if path.exists():
        with contextlib.suppress(Exception):
            if pq.ParquetFile(path).metadata.num_rows == rows:
                return path
    started = time.perf_counter()
    template = SHORT_PROMPT if short else LONG_PROMPT
    before, after = template.split("{}")
    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    chunk = 1_000_000
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, rows, chunk):
            numbers = pa.array(np.arange(start, min(rows, start + chunk))).cast(pa.string())
            ids = pc.binary_join_element_wise("row-", numbers, "")
            prompts = pc.binary_join_element_wise(before, numbers, after, "")
            writer.write_table(pa.table([ids, prompts], schema=schema), row_group_size=100_000)
    os.replace(tmp, path)
    log(f"made {path.name}: {rows:,} rows in {time.perf_counter() - started:.1f} s")
    return path


DOC_QA_SYSTEM = "Answer the question from the document alone, in a few words."
DOC_QA_TEMPLATE = "{document}\n\nQuestion: {question}"
DOC_QA_WORDS = ("the of and town river market harvest bridge mill school festival mayor council "
                "trade wool grain salt road railway station church hall square winter summer "
                "north south east west old new").split()


def make_doc_qa_input(rows: int, documents: int) -> Path:
    """A document-QA input: `rows` questions about `documents` documents, shuffled, made once.

    Columns `id`, `document` (about 6,600 characters: 1,600+ estimated tokens, so that a
    request's leading 1,024 tokens are a cacheable prefix its document's questions share) and
    `question`; sent with DOC_QA_SYSTEM and DOC_QA_TEMPLATE (document first, question last), as
    jobs/doc-qa.toml sends sample_data/doc_qa.parquet. The document column is written
    dictionary-encoded, so that each row group stores each document once.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"input-{rows}-docqa{documents}.parquet"
    if path.exists():
        with contextlib.suppress(Exception):
            if pq.ParquetFile(path).metadata.num_rows == rows:
                return path
    started = time.perf_counter()
    rng = np.random.default_rng(20261208)
    words = np.array(DOC_QA_WORDS)
    texts = pa.array([f"A report on town {d}.\n\n" + " ".join(rng.choice(words, 1100))
                      for d in range(documents)])
    which = rng.permutation(np.arange(rows) % documents).astype(np.int32)  # shuffled
    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([("id", pa.string()),
                        ("document", pa.dictionary(pa.int32(), pa.string())),
                        ("question", pa.string())])
    chunk = 100_000
    # Without the Arrow schema stored, a reader sees the document column as plain strings.
    with pq.ParquetWriter(tmp, schema, compression="zstd", store_schema=False,
                          dictionary_pagesize_limit=64 << 20) as writer:
        for start in range(0, rows, chunk):
            numbers = pa.array(np.arange(start, min(rows, start + chunk))).cast(pa.string())
            ids = pc.binary_join_element_wise("row-", numbers, "")
            document = pa.DictionaryArray.from_arrays(pa.array(which[start:start + chunk]), texts)
            questions = pc.binary_join_element_wise(
                "What does the report say about item ", numbers, "?", "")
            writer.write_table(pa.Table.from_arrays([ids, document, questions],
                                                    names=schema.names))
    os.replace(tmp, path)
    log(f"made {path.name}: {rows:,} rows about {documents:,} documents in "
        f"{time.perf_counter() - started:.1f} s")
    return path


def log(message: str) -> None:
    """Progress of the harness, on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the server -----------------------------------------------------------------------------


class Server:
    """The gateway the clients talk to: bench/fastgate.py (default) or the built-in simulator."""

    def __init__(self, kind: str, latency_ms: float, workers: int = 1) -> None:
        self.kind, self.latency_ms, self.workers = kind, latency_ms, workers
        self.process: subprocess.Popen[str] | None = None
        self.pids: list[int] = []
        self.base_url = ""

    def __enter__(self) -> Server:
        if self.kind == "fast":
            command = [sys.executable, str(HERE / "fastgate.py"), "--port", "0",
                       "--latency-ms", str(self.latency_ms), "--workers", str(self.workers)]
        else:
            command = [sys.executable, "-m", "batchrunner", "gateway", "--port", "0",
                       "--latency-ms", str(self.latency_ms)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"the {self.kind} server did not start: {line!r}")
        self.base_url = match.group(1)
        pids = re.search(r"pids ([\d ]+)", line)
        self.pids = [self.process.pid] + ([int(p) for p in pids.group(1).split()] if pids else [])
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with open(RESULTS / f"server-{self.kind}.log", "a") as sink:
            shutil.copyfileobj(self.process.stderr, sink)

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def cpu(self) -> float:
        """CPU seconds used so far by every process of the server."""
        return sum(cpu_seconds(pid) for pid in self.pids)

    def stats(self) -> dict[str, Any]:
        """The server's counters (GET /_simulator/stats)."""
        with urllib.request.urlopen(self.root + "/_simulator/stats", timeout=5) as reply:
            return json.load(reply)

    def reset(self) -> None:
        """Zero the server's counters."""
        request = urllib.request.Request(self.root + "/_simulator/reset", b"", method="POST")
        urllib.request.urlopen(request, timeout=5).close()

    def describe(self) -> str:
        if self.kind == "fast":
            return f"bench/fastgate.py, {self.workers} worker(s), latency {self.latency_ms:g} ms"
        return f"batchrunner gateway (simulator), latency {self.latency_ms:g} ms"


# -- one measured client run ----------------------------------------------------------------


@dataclass
class Measurement:
    """One client run, as measured from inside (timed.py) and outside (wait4, /proc)."""

    client: str
    rows: int
    concurrency: int
    latency_ms: float
    exit_code: int | None = None
    ok_rows: int = 0
    output_rows: int = 0
    import_s: float = 0.0
    run_s: float = 0.0  # ready (library imported) -> final file in place
    run_cpu_s: float = 0.0
    wall_s: float = 0.0  # spawn -> exit, from outside
    proc_cpu_s: float = 0.0  # the whole process: interpreter start, imports, run, exit
    peak_mb: float = 0.0  # the client's VmHWM (its own peak resident memory)
    server_cpu_s: float = 0.0
    server_requests: int = 0
    server_connections: int | None = None  # TCP connections opened (fastgate only)
    first_request_s: float | None = None  # spawn -> the server's first request
    # (seconds since spawn, requests the server has had, the client's CPU seconds so far),
    # polled every 50 ms during the run
    arrivals: list[tuple[float, int, float]] = field(default_factory=list)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.ok_rows / self.run_s if self.run_s else 0.0

    def _steady_window(self) -> tuple[float, float, float] | None:
        """(requests, seconds, client CPU seconds) while the middle 80% of requests arrived."""
        total = self.server_requests
        if total < 100 or len(self.arrivals) < 4:
            return None
        low, high = _sample_at(self.arrivals, 0.1 * total), _sample_at(self.arrivals, 0.9 * total)
        if low is None or high is None or high[0] <= low[0]:
            return None
        return 0.8 * total, high[0] - low[0], high[1] - low[1]

    @property
    def steady_rows_per_s(self) -> float | None:
        """Requests per second while the middle 80% of them reached the server.

        Start-up (reading the input, the pre-flight, opening the checkpoint) and the end (the
        last round trips, writing the final file) are left out: this is the rate the client
        keeps once it runs, the figure issue 14's "steady rows per second" names.
        """
        window = self._steady_window()
        return window[0] / window[1] if window else None

    @property
    def steady_cpu_us_per_row(self) -> float | None:
        """The client's CPU per request over the same window (/proc, 10 ms ticks)."""
        window = self._steady_window()
        return window[2] / window[0] * 1e6 if window else None

    @property
    def steady_share_of_ideal(self) -> float | None:
        steady = self.steady_rows_per_s
        if not self.latency_ms or steady is None:
            return None
        return steady / (self.concurrency / (self.latency_ms / 1000))

    @property
    def e2e_rows_per_s(self) -> float:
        return self.ok_rows / self.wall_s if self.wall_s else 0.0

    @property
    def share_of_ideal(self) -> float | None:
        if not self.latency_ms:
            return None
        return self.rows_per_s / (self.concurrency / (self.latency_ms / 1000))

    @property
    def cpu_us_per_row(self) -> float:
        return self.run_cpu_s / self.ok_rows * 1e6 if self.ok_rows else 0.0

    @property
    def proc_cpu_us_per_row(self) -> float:
        return self.proc_cpu_s / self.ok_rows * 1e6 if self.ok_rows else 0.0

    @property
    def server_cpu_percent(self) -> float:
        return self.server_cpu_s / self.wall_s * 100 if self.wall_s else 0.0

    @property
    def server_us_per_request(self) -> float:
        return self.server_cpu_s / self.server_requests * 1e6 if self.server_requests else 0.0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("rows_per_s", "steady_rows_per_s", "steady_share_of_ideal",
                     "steady_cpu_us_per_row",
                     "e2e_rows_per_s", "share_of_ideal", "cpu_us_per_row",
                     "proc_cpu_us_per_row", "server_cpu_percent", "server_us_per_request"):
            data[name] = getattr(self, name)
        return data


def _sample_at(samples: list[tuple[float, int, float]], count: float) -> tuple[float, float] | None:
    """(time, client CPU) when the server's request count reached `count`, interpolated."""
    for (t0, n0, c0), (t1, n1, c1) in zip(samples, samples[1:]):
        if n0 <= count <= n1 and n1 > n0:
            share = (count - n0) / (n1 - n0)
            return t0 + (t1 - t0) * share, c0 + (c1 - c0) * share
    return None


def dump_stacks(pid: int, sink: Any) -> None:
    """Append the asyncio tasks and thread stacks of a stuck client to its log."""
    import signal

    sink.flush()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)  # bench/timed.py prints its asyncio tasks
    time.sleep(1.0)
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return
    with contextlib.suppress(Exception):
        subprocess.run([str(spy), "dump", "--pid", str(pid)], stdout=sink, stderr=sink,
                       timeout=30)


def clean_output(output: Path) -> None:
    """Remove an output and its checkpoint, so that a run starts from nothing."""
    with contextlib.suppress(FileNotFoundError):
        output.unlink()
    shutil.rmtree(output.with_name(output.name + ".checkpoint"), ignore_errors=True)


def run_client(
    client: str,
    input_path: Path,
    rows: int,
    concurrency: int,
    server: Server,
    *,
    tag: str = "",
    extra_args: tuple[str, ...] = (),
    watch_first_request: bool = False,
    sample_rss: bool = False,
    prepare_output: Callable[[Path], None] | None = None,
    timeout: float = 300.0,
    tree: Path | None = None,
) -> Measurement:
    """Run one client to its end (or `timeout` seconds); measure it and check its output.

    `tree`: a checkout whose `batchrunner` the batchrunner client imports (first on its
    PYTHONPATH), to compare two versions against the same harness and server.
    """
    measured = Measurement(client, rows, concurrency, server.latency_ms)
    if client != "batchrunner":
        sys.path.insert(0, str(HERE))
        import peers

        if not peers.installed(client):
            measured.note = "not installed"
            return measured
    name = f"{client}-{rows}-c{concurrency}-l{server.latency_ms:g}{tag}"
    output = RESULTS / f"out-{name}.parquet"
    report = RESULTS / f"report-{name}.json"
    client_log = RESULTS / f"log-{name}.txt"
    clean_output(output)
    report.unlink(missing_ok=True)
    if prepare_output is not None:
        prepare_output(output)
    common = ["-i", str(input_path), "-o", str(output), "-m", MODEL,
              "--base-url", server.base_url, "-c", str(concurrency)]
    args = ["run", *common, *extra_args] if client == "batchrunner" else common
    command = [sys.executable, str(HERE / "timed.py"), "--report", str(report), client, *args]
    env = {**os.environ, "RU_LLM_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    env.pop("RU_LLM_BASE_URL", None)
    env.pop("OPENAI_BASE_URL", None)
    if tree is not None and client == "batchrunner":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))

    server.reset()
    server_cpu = server.cpu()
    rss_samples: list[tuple[float, float]] = []
    with open(client_log, "w") as sink:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        next_sample = started
        next_arrival = started
        stopped = None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            now = time.perf_counter()
            if pid:
                break
            if stopped is None and now - started > timeout:
                stopped = now
                measured.note = f"timed out after {timeout:g} s"
                log(f"{client}: {measured.note}; its stacks are in {client_log.name}")
                dump_stacks(process.pid, sink)
                process.terminate()
            elif stopped is not None and now - stopped > 15:
                process.kill()
            if watch_first_request and measured.first_request_s is None:
                if server.stats()["requests"] >= 1:
                    measured.first_request_s = now - started
            elif now >= next_arrival:
                requests = server.stats()["requests"]
                measured.arrivals.append((now - started, requests, cpu_seconds(process.pid)))
                next_arrival = now + 0.05
            if sample_rss and now >= next_sample:
                rss_samples.append((now - started, rss_mb(process.pid)))
                next_sample = now + 0.25
            time.sleep(0.01 if watch_first_request and measured.first_request_s is None else 0.02)
        process.returncode = os.waitstatus_to_exitcode(status)
    measured.wall_s = now - started
    measured.server_cpu_s = server.cpu() - server_cpu
    stats = server.stats()
    measured.server_requests = stats["requests"]
    measured.server_connections = stats.get("connections")
    measured.proc_cpu_s = usage.ru_utime + usage.ru_stime
    measured.arrivals.append((measured.wall_s, stats["requests"], measured.proc_cpu_s))
    measured.peak_mb = usage.ru_maxrss / 1024
    measured.exit_code = process.returncode
    if rss_samples:
        measured.extra["rss_mb_by_second"] = rss_samples
    if report.exists():
        inside = json.loads(report.read_text())
        measured.import_s = inside["import_s"]
        measured.run_s = inside["run_s"]
        measured.run_cpu_s = inside["run_cpu_s"]
        measured.extra["run_user_s"] = inside["run_user_s"]
        measured.extra["run_sys_s"] = inside["run_sys_s"]
        if "batchrunner_file" in inside:
            measured.extra["batchrunner_file"] = inside["batchrunner_file"]
            log(f"{client}: batchrunner imported from {inside['batchrunner_file']}")
        # wait4's ru_maxrss carries the harness's own peak across fork + exec: VmHWM does not.
        measured.extra["ru_maxrss_mb"] = measured.peak_mb
        measured.peak_mb = inside["peak_rss_mb"]
    if output.exists():
        statuses = pq.read_table(output, columns=["status"]).column("status")
        measured.output_rows = len(statuses)
        measured.ok_rows = int(pc.sum(pc.equal(statuses, "ok").cast(pa.int64())).as_py() or 0)
    else:
        measured.note = f"no output (exit {measured.exit_code}; see {client_log.name})"
    if measured.exit_code not in (0, None) and not measured.note:
        measured.note = f"exit {measured.exit_code}"
    log(
        f"{client}: {measured.ok_rows:,}/{rows:,} ok in {measured.run_s:.2f} s "
        f"({measured.rows_per_s:,.0f} rows/s, {measured.cpu_us_per_row:,.0f} us CPU/row, "
        f"peak {measured.peak_mb:,.0f} MB, server {measured.server_cpu_percent:.0f}% CPU, "
        f"{measured.server_connections} connections)"
    )
    return measured


# -- tables ---------------------------------------------------------------------------------

HEADER = (
    "| client | rows ok | C | L ms | run s | rows/s | % of C/L | steady rows/s "
    "| steady % of C/L | CPU µs/row | steady CPU µs/row | e2e s "
    "| e2e rows/s | process CPU µs/row | peak MB | server CPU % | server µs/req | note |"
)


def table(measurements: list[Measurement]) -> str:
    """The figures as a Markdown table."""
    lines = [HEADER, _rule()]
    for m in measurements:
        if m.note == "not installed":
            lines.append(f"| {m.client} | – | {m.concurrency} | {m.latency_ms:g} | "
                         + " | ".join(["–"] * 13) + " | not installed |")
            continue
        share = f"{m.share_of_ideal * 100:.0f}%" if m.share_of_ideal is not None else "–"
        steady = f"{m.steady_rows_per_s:,.0f}" if m.steady_rows_per_s is not None else "–"
        steady_share = (f"{m.steady_share_of_ideal * 100:.0f}%"
                        if m.steady_share_of_ideal is not None else "–")
        steady_cpu = (f"{m.steady_cpu_us_per_row:,.0f}"
                      if m.steady_cpu_us_per_row is not None else "–")
        lines.append(
            f"| {m.client} | {m.ok_rows:,} | {m.concurrency} | {m.latency_ms:g} | {m.run_s:.2f} "
            f"| {m.rows_per_s:,.0f} | {share} | {steady} | {steady_share} "
            f"| {m.cpu_us_per_row:,.0f} | {steady_cpu} | {m.wall_s:.2f} "
            f"| {m.e2e_rows_per_s:,.0f} | {m.proc_cpu_us_per_row:,.0f} | {m.peak_mb:,.0f} "
            f"| {m.server_cpu_percent:.0f} | {m.server_us_per_request:.0f} | {m.note} |"
        )
    return "\n".join(lines)


def _rule() -> str:
    return "|" + "---|" * (HEADER.count("|") - 1)


def save(section: str, payload: dict[str, Any]) -> None:
    """Write a section's figures to bench/results/SECTION.json."""
    path = RESULTS / f"{section}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def emit(section: str, title: str, text: str) -> None:
    """Print a section's result on stdout and append it to bench/results/report.md."""
    block = f"\n### {title}\n\n{text}\n"
    print(block, flush=True)
    with open(RESULTS / "report.md", "a") as report:
        report.write(block)


# -- sections -------------------------------------------------------------------------------


def section_throughput(args: argparse.Namespace) -> None:
    """batchrunner alone: rows/s against C/L, end to end (target: >= 90% of C/L)."""
    rows, c, latency = args.rows or 20_000, args.concurrency or 100, _latency(args, 50)
    path = make_input(rows)
    with Server(args.server, latency, args.server_workers) as server:
        m = run_client("batchrunner", path, rows, c, server, timeout=args.timeout)
    ideal = c / (latency / 1000)
    verdict = "met" if m.rows_per_s >= 0.9 * ideal else "NOT met"
    emit("throughput", f"Throughput: {rows:,} rows, C = {c}, L = {latency:g} ms ({server.describe()})",
         table([m]) + f"\n\nTarget >= 90% of C/L = {0.9 * ideal:,.0f} rows/s: **{verdict}** "
         f"({m.rows_per_s:,.0f} rows/s from ready to final file; {m.e2e_rows_per_s:,.0f} "
         "rows/s from process spawn to exit).")
    save("throughput", {"machine": machine(), "server": server.describe(), "runs": [m.to_json()]})


def section_cpu(args: argparse.Namespace) -> None:
    """batchrunner's CPU per row with no added latency (target: <= 300 µs)."""
    rows, c, latency = args.rows or 20_000, args.concurrency or 100, _latency(args, 0)
    path = make_input(rows)
    with Server(args.server, latency, args.server_workers) as server:
        m = run_client("batchrunner", path, rows, c, server, timeout=args.timeout)
    verdict = "met" if m.cpu_us_per_row <= 300 else "NOT met"
    emit("cpu", f"CPU per row: {rows:,} rows, C = {c}, L = {latency:g} ms ({server.describe()})",
         table([m]) + f"\n\nTarget <= 300 µs of batchrunner CPU per row: **{verdict}** "
         f"({m.cpu_us_per_row:,.0f} µs: user {m.extra.get('run_user_s', 0):.2f} s + sys "
         f"{m.extra.get('run_sys_s', 0):.2f} s over {m.ok_rows:,} rows, from ready to final file).")
    save("cpu", {"machine": machine(), "server": server.describe(), "runs": [m.to_json()]})


def section_peers(args: argparse.Namespace) -> None:
    """batchrunner, AsyncOpenAI + semaphore and litellm.acompletion + semaphore, side by side."""
    rows, c, latency = args.rows or 20_000, args.concurrency or 100, _latency(args, 50)
    path = make_input(rows)
    runs = []
    with Server(args.server, latency, args.server_workers) as server:
        for client in args.clients:
            runs.append(run_client(client, path, rows, c, server, timeout=args.timeout,
                                   tree=args.tree))
    tree = f", batchrunner from {args.tree} ({_commit(args.tree)})" if args.tree else ""
    emit("peers", f"Side by side: {rows:,} rows, C = {c}, L = {latency:g} ms "
         f"({server.describe()}{tree})",
         table(runs) + "\n\nbatchrunner also checkpoints (fsynced Arrow segments every 100 rows "
         "or 2 s), prices every row and writes the input columns through; the peers keep "
         "everything in memory and write one Parquet file at the end." + peer_targets(runs))
    save("peers", {"machine": machine(), "server": server.describe(),
                   "runs": [m.to_json() for m in runs]})


def peer_targets(runs: list[Measurement]) -> str:
    """Issue 14's targets, from one side-by-side run: CPU against the bare loop, speed."""
    by = {m.client: m for m in runs if m.ok_rows}
    ours = by.get("batchrunner")
    if ours is None:
        return ""
    lines = ["", "", "| target (issue 14) | measured | |", "|---|---|---|"]
    bare = by.get("aiohttp")
    if bare is not None and bare.cpu_us_per_row:
        ratio = ours.cpu_us_per_row / bare.cpu_us_per_row
        lines.append(f"| CPU per row ≤ 1.5× the bare aiohttp loop's | {ratio:.2f}× "
                     f"({ours.cpu_us_per_row:,.0f} / {bare.cpu_us_per_row:,.0f} µs) "
                     f"| {'met' if ratio <= 1.5 else 'NOT met'} |")
    share = ours.steady_share_of_ideal
    if share is not None:
        lines.append(f"| steady rows/s ≥ 90% of C/L | {share * 100:.0f}% "
                     f"({ours.steady_rows_per_s:,.0f} rows/s while the middle 80% of requests "
                     f"arrived; {ours.rows_per_s:,.0f} from ready to final file) "
                     f"| {'met' if share >= 0.9 else 'NOT met'} |")
    sdk = by.get("openai")
    if sdk is not None and sdk.rows_per_s:
        times = ours.rows_per_s / sdk.rows_per_s
        lines.append(f"| rows/s ≥ 5× the openai SDK's | {times:.1f}× "
                     f"| {'met' if times >= 5 else 'NOT met'} |")
    return "\n".join(lines)


def section_curve(args: argparse.Namespace) -> None:
    """rows/s and CPU/row for C = 10, 100, 500, 1000 at 200 ms; drawn as bench/curve.png."""
    latency = _latency(args, 200)
    clients = args.clients if args.curve_peers else ["batchrunner"]
    runs: list[Measurement] = []
    with Server(args.server, latency, args.server_workers) as server:
        for c in args.curve:
            # About `curve_seconds` of work at the ideal rate, at least 20 rounds of C; the
            # peers, many times slower, get at most 5,000 rows (and at least 5 rounds of C).
            rows = args.rows or max(20 * c, int(c / (latency / 1000) * args.curve_seconds))
            for client in clients:
                n = rows if client == "batchrunner" or args.rows else max(5 * c, min(rows, 5000))
                runs.append(run_client(client, make_input(n), n, c, server, timeout=args.timeout))
    emit("curve", f"Curve: C = {', '.join(map(str, args.curve))}, L = {latency:g} ms "
         f"({server.describe()})", table(runs) + "\n\n![curve](curve.png)")
    draw_curve(runs, latency, HERE / "curve.png")
    save("curve", {"machine": machine(), "server": server.describe(),
                   "runs": [m.to_json() for m in runs]})


def draw_curve(runs: list[Measurement], latency_ms: float, path: Path) -> None:
    """Rows/s (with the C/L ceiling) and CPU µs/row against C, one line per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    cs = sorted({m.concurrency for m in runs})
    left.plot(cs, [c / (latency_ms / 1000) for c in cs], "k--", lw=1, label="C / L (ceiling)")
    for client in dict.fromkeys(m.client for m in runs):
        mine = sorted((m for m in runs if m.client == client and m.ok_rows),
                      key=lambda m: m.concurrency)
        if not mine:
            continue
        x = [m.concurrency for m in mine]
        left.plot(x, [m.rows_per_s for m in mine], "o-", label=client)
        right.plot(x, [m.cpu_us_per_row for m in mine], "o-", label=client)
        for m in mine:
            left.annotate(f"{m.share_of_ideal * 100:.0f}%", (m.concurrency, m.rows_per_s),
                          textcoords="offset points", xytext=(4, -12), fontsize=8)
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_xlabel("concurrency C (requests in flight)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("rows per second")
    left.set_title(f"Throughput at L = {latency_ms:g} ms (label: % of C/L)")
    right.set_ylabel("client CPU µs per row (user + sys)")
    right.set_title("CPU per row")
    right.set_ylim(bottom=0)
    figure.suptitle(f"batchrunner benchmark, {time.strftime('%Y-%m-%d')}, "
                    f"{os.cpu_count()} cores", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    log(f"drew {path}")


def section_memory(args: argparse.Namespace) -> None:
    """Peak RSS on a 10,000,000-row input, the run stopped by --deadline (target: < 300 MB)."""
    rows, c, latency = args.memory_rows, args.concurrency or 100, _latency(args, 50)
    extra: tuple[str, ...] = ("--deadline", args.deadline)
    if args.order:
        extra += ("--order", args.order)
    if args.prompts == "doc-qa":
        documents = args.documents
        path = make_doc_qa_input(rows, documents)
        extra += ("--system", DOC_QA_SYSTEM, "--template", DOC_QA_TEMPLATE)
        what = f"document-QA input ({documents:,} documents of 1,600+ tokens, shuffled)"
    else:
        path = make_input(rows, short=True)
        what = "input (short prompts)"
    if args.order:
        what += f", --order {args.order}"
    if args.tree:
        what += f", batchrunner from {args.tree} ({_commit(args.tree)})"
    tag = f"-memory-{args.prompts}{'-' + args.order if args.order else ''}"
    with Server(args.server, latency, args.server_workers) as server:
        m = run_client("batchrunner", path, rows, c, server, tag=tag, extra_args=extra,
                       watch_first_request=True, sample_rss=True, timeout=args.timeout,
                       tree=args.tree)
    m.ok_rows = _checkpointed(RESULTS / f"out-batchrunner-{rows}-c{c}-l{latency:g}{tag}.parquet")
    samples = m.extra.get("rss_mb_by_second", [])
    timeline = ", ".join(f"{t:.0f} s: {mb:.0f}" for t, mb in samples[:: max(1, len(samples) // 10)])
    if samples:
        at, most = max(samples, key=lambda sample: sample[1])
        timeline += f" (highest sample {most:.0f} MB at {at:.1f} s)"
    verdict = "met" if m.peak_mb < 300 else "NOT met"
    first = f"{m.first_request_s:.1f} s" if m.first_request_s is not None else "never"
    emit("memory", f"Memory: {rows:,}-row Parquet {what}, --deadline {args.deadline}, "
         f"C = {c}, L = {latency:g} ms",
         f"| peak RSS MB | rows done before the deadline | first request after | exit code "
         f"| wall s | server requests |\n|---|---|---|---|---|---|\n"
         f"| {m.peak_mb:,.0f} | {m.ok_rows:,} | {first} | {m.exit_code} | {m.wall_s:.1f} "
         f"| {m.server_requests:,} |\n\nRSS (MB) over time: {timeline}\n\n"
         f"Target peak < 300 MB: **{verdict}**. Input file: "
         f"{path.stat().st_size / 2**20:,.0f} MB.")
    save("memory", {"machine": machine(), "server": server.describe(), "runs": [m.to_json()]})


def _checkpointed(output: Path) -> int:
    """Rows with a checkpointed result (the run stopped before the final file)."""
    from batchrunner import read_status

    try:
        return read_status(output).done
    except Exception:
        return 0


def section_resume(args: argparse.Namespace) -> None:
    """Time to the first new request when resuming a 1,000,000-row checkpoint (target: < 3 s)."""
    done, extra = args.resume_rows, 100
    rows, c, latency = done + extra, args.concurrency or 100, _latency(args, 50)
    path = make_input(rows)
    with Server(args.server, latency, args.server_workers) as server:
        # Built in a child process, so that the 1,000,000 results never inflate this one.
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; "
                f"import run; print(run.resume_template(Path({str(path)!r}), {rows}, {done}, "
                f"{server.base_url!r}, {c}))")
        built = subprocess.run([sys.executable, "-c", code], check=True, text=True,
                               stdout=subprocess.PIPE)
        template = Path(built.stdout.strip().splitlines()[-1])

        def restore(output: Path) -> None:
            shutil.copytree(template, output.with_name(output.name + ".checkpoint"))

        m = run_client("batchrunner", path, rows, c, server, tag="-resume",
                       watch_first_request=True, prepare_output=restore, timeout=args.timeout)
    first = m.first_request_s
    verdict = "met" if first is not None and first <= 3 else "NOT met"
    emit("resume", f"Resume: {done:,} rows checkpointed of {rows:,}, C = {c}, L = {latency:g} ms",
         f"| first new request after | requests sent | rows in the final file (ok) | run s "
         f"| e2e s | peak MB | exit code |\n|---|---|---|---|---|---|---|\n"
         f"| {first if first is None else f'{first:.2f} s'} | {m.server_requests:,} "
         f"| {m.output_rows:,} ({m.ok_rows:,}) | {m.run_s:.2f} | {m.wall_s:.2f} "
         f"| {m.peak_mb:,.0f} | {m.exit_code} |\n\n"
         f"Target: first new request within 3 s of the process start: **{verdict}**. "
         f"Expected {extra} requests and {rows:,} rows.")
    save("resume", {"machine": machine(), "server": server.describe(), "runs": [m.to_json()]})


def resume_template(path: Path, rows: int, done: int, base_url: str, concurrency: int) -> Path:
    """A checkpoint with `done` synthetic ok results, as the CLI run would have made it.

    Built once with the library (no requests sent) and kept in bench/results/; rebuilt when
    the input or batchrunner's checkpoint module changes.
    """
    import batchrunner
    from batchrunner.inputs.scan import fingerprint_input, scan_input
    from batchrunner.results import Result, Usage
    from batchrunner.store import checkpoint as checkpoint_module
    from batchrunner.store.checkpoint import Checkpoint
    from batchrunner.store.segments import results_to_batch

    # Exactly the config `batchrunner run -i PATH -o OUT -m MODEL --base-url U -c C` builds;
    # only the input and request settings enter the fingerprint.
    output = RESULTS / "resume-template" / "out.parquet"
    config = batchrunner.build_config(None, {
        "input": path, "output": output, "model": MODEL, "base_url": base_url,
        "concurrency": concurrency,
    })
    fingerprint = {"input": fingerprint_input(config.input),
                   "settings": config.request_settings()}
    key = hashlib.sha256(json.dumps(
        [fingerprint, done, Path(checkpoint_module.__file__).read_text()], sort_keys=True,
        default=str,
    ).encode()).hexdigest()
    directory = output.with_name(output.name + ".checkpoint")
    marker = output.with_name("template-key")
    if directory.exists() and marker.exists() and marker.read_text() == key:
        return directory
    shutil.rmtree(output.parent, ignore_errors=True)
    output.parent.mkdir(parents=True)
    started = time.perf_counter()
    info = scan_input(config)
    assert info.rows == rows, (info.rows, rows)
    prices = batchrunner.PriceTable.load(None)
    usage = Usage(prompt_tokens=21, completion_tokens=13, total_tokens=34, cached_tokens=0)
    cost = prices.cost(MODEL, 21, 13, 0)
    content = "A short benchmark answer: the tea trade grew through many ports."
    ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
    ckpt = Checkpoint.open(config.output, fingerprint, rows=info.rows)
    try:
        for start in range(0, done, 50_000):
            results = [
                Result(index=i, id=ids[i], status="ok", model=MODEL, content=content,
                       choices=(content,), finish_reason="stop",
                       response_model="gpt-4o-mini-2024-07-18", usage=usage, cost_usd=cost,
                       attempts=1, latency_ms=50.0, http_status=200,
                       response_id=f"chatcmpl-resume{i:x}")
                for i in range(start, min(done, start + 50_000))
            ]
            ckpt.write_batch(results_to_batch(results))
    finally:
        ckpt.close()
    marker.write_text(key)
    log(f"built a {done:,}-row checkpoint in {time.perf_counter() - started:.1f} s")
    return directory


def _latency(args: argparse.Namespace, default: float) -> float:
    return default if args.latency is None else args.latency


RUNNERS = {
    "throughput": section_throughput,
    "cpu": section_cpu,
    "peers": section_peers,
    "curve": section_curve,
    "resume": section_resume,
    "memory": section_memory,
}


def main(argv: list[str] | None = None) -> None:
    """Parse options and run the sections asked for."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sections: " + ", ".join(SECTIONS) + "; `all` runs them in that order.",
    )
    parser.add_argument("--section", action="append", choices=(*SECTIONS, "all"),
                        help="what to run (repeatable) [all]")
    parser.add_argument("--rows", type=int, help="rows per run [section's own: 20,000 ...]")
    parser.add_argument("-c", "--concurrency", type=int, help="C [100]")
    parser.add_argument("--latency", type=float, metavar="MS",
                        help="server latency [50; cpu: 0; curve: 200]")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help="clients for peers (and curve with --curve-peers) [%(default)s]")
    parser.add_argument("--tree", type=Path, metavar="PATH",
                        help="peers, memory: run the batchrunner of this checkout (first on the "
                             "client's PYTHONPATH) [the one this Python imports]")
    parser.add_argument("--server", choices=("fast", "simulator"), default="fast",
                        help="bench/fastgate.py or the built-in simulator [%(default)s]")
    parser.add_argument("--server-workers", type=int, default=1,
                        help="fastgate worker processes [%(default)s]")
    parser.add_argument("--curve", default="10,100,500,1000", help="C values [%(default)s]")
    parser.add_argument("--curve-seconds", type=float, default=8.0,
                        help="ideal seconds per curve point [%(default)s]")
    parser.add_argument("--curve-peers", action="store_true", help="peers on the curve too")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before a client run is stopped [%(default)s]")
    parser.add_argument("--memory-rows", type=int, default=10_000_000)
    parser.add_argument("--deadline", default="60s", help="memory section --deadline [60s]")
    parser.add_argument("--prompts", choices=("short", "doc-qa"), default="short",
                        help="memory section input: short prompts, or questions about long "
                             "documents (a cacheable prefix a document's rows share) "
                             "[%(default)s]")
    parser.add_argument("--documents", type=int, default=2000,
                        help="--prompts doc-qa: documents [%(default)s]")
    parser.add_argument("--order", choices=("prefix", "input"),
                        help="memory section: batchrunner's --order [its default]")
    parser.add_argument("--resume-rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = set(args.clients) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    args.curve = [int(c) for c in args.curve.split(",")]
    sections = args.section or ["all"]
    if "all" in sections:
        sections = list(SECTIONS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.md").write_text(f"# bench/run.py {' '.join(argv or sys.argv[1:])}\n")
    if Path(sys.prefix).resolve() != (HERE / ".venv").resolve():
        log(f"note: running on {sys.prefix}, not bench/.venv (bash bench/setup.sh makes it); "
            "peers missing here are marked 'not installed'")
    info = machine()
    emit("machine", f"Machine, {info['date']}",
         f"{info['nproc']} cores ({info['cpus_allowed']} allowed), {info['cpu']}, "
         f"{info['memory_gb']} GB, Python {info['python']}, Linux {info['kernel']}, "
         f"load average {', '.join(f'{x:.2f}' for x in info['loadavg'])} at the start; "
         f"commit {info['commit']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    for section in sections:
        started = time.perf_counter()
        log(f"section {section} (load average {os.getloadavg()[0]:.2f})")
        RUNNERS[section](args)
        log(f"section {section} took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
