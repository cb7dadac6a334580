"""Run one client in this process and write its timings: the wrapper bench/run.py starts.

    python bench/timed.py --report R.json batchrunner run -i IN -o OUT -m M --base-url U -c C
    python bench/timed.py --report R.json openai -i IN -o OUT --base-url U -c C

The report holds, from this process's own clock and `getrusage(RUSAGE_SELF)` (all threads):
`import_s`/`import_cpu_s` from the first line of this file to the client library being
imported, and `run_s`/`run_cpu_s` from there to the client's final file being in place (for
batchrunner: the `batchrunner run` command returning, final Parquet written). Interpreter
start-up before this file runs is not in either; bench/run.py measures the whole process from
outside as well (wall clock from spawn to exit, and `wait4`'s rusage). `peak_rss_mb` is the
process's VmHWM.
"""

from __future__ import annotations

import resource
import time

T0 = time.perf_counter()
RU0 = resource.getrusage(resource.RUSAGE_SELF)

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _dump_tasks(signum: int, frame: object) -> None:
    """SIGUSR1: print every asyncio task's stack to stderr (bench/run.py sends it on a timeout)."""
    import asyncio

    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:
        print("timed.py: no running event loop", file=sys.stderr, flush=True)
        return
    print(f"timed.py: {len(tasks)} asyncio tasks", file=sys.stderr)
    for task in tasks:
        task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM), MB.

    Not ru_maxrss: Linux carries the parent's peak across fork + exec into it, so a child of a
    big harness process would report the harness's memory.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _run_batchrunner(args: list[str]) -> tuple[float, resource.struct_rusage, int]:
    import batchrunner.cli.commands as cli
    import batchrunner.cli.progress  # noqa: F401
    import batchrunner.config.jobs  # noqa: F401
    import batchrunner.engine.runner  # noqa: F401  (imported lazily by the command; counted here)

    ready, ru_ready = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        cli.main.main(args=args, prog_name="batchrunner", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return ready, ru_ready, code


def _run_peer(args: list[str]) -> tuple[float, resource.struct_rusage, int]:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers

    parser = argparse.ArgumentParser(prog="timed.py PEER")
    peers.add_arguments(parser)
    options = parser.parse_args(args)
    peers.prepare(options.peer)
    import pyarrow.parquet  # noqa: F401

    ready, ru_ready = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    peers.run(options.peer, options.input, options.output, options.base_url, options.model,
              options.concurrency, options.max_retries)
    return ready, ru_ready, 0


def main() -> None:
    """Parse `--report PATH CLIENT ARGS...`, run the client, write the report."""
    import signal

    signal.signal(signal.SIGUSR1, _dump_tasks)
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[0] != "--report":
        raise SystemExit(__doc__)
    report, client, args = Path(argv[1]), argv[2], argv[3:]
    if client == "batchrunner":
        ready, ru_ready, code = _run_batchrunner(args)
    else:
        ready, ru_ready, code = _run_peer([client, *args])
    end, ru_end = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    report.write_text(json.dumps({
        "client": client,
        "exit_code": code,
        "import_s": ready - T0,
        "import_cpu_s": _cpu(ru_ready) - _cpu(RU0),
        "run_s": end - ready,
        "run_cpu_s": _cpu(ru_end) - _cpu(ru_ready),
        "run_user_s": ru_end.ru_utime - ru_ready.ru_utime,
        "run_sys_s": ru_end.ru_stime - ru_ready.ru_stime,
        "peak_rss_mb": _peak_rss_mb(),
        **({"batchrunner_file": sys.modules["batchrunner"].__file__}
           if "batchrunner" in sys.modules else {}),
    }))
    sys.exit(code)


if __name__ == "__main__":
    main()
