"""What a person sees of a run (docs/cron.md#progress-and-logs): the bar, the stop messages, the error line.

The bar is tested through the library with the display's stream injected (a terminal is
what makes the CLI draw it); signals and messages through the CLI as a user runs it.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from batchrunner import RunConfig, run
from batchrunner.cli.progress import ProgressDisplay
from batchrunner.engine.state import Tally
from batchrunner.results import Result

KEY = "sk-ru-progress-tests-8e2c4a6f1b3d5e7c9a0b"


def write_input(path: Path, rows: int) -> Path:
    with open(path, "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": f"r{i:03d}", "prompt": f"Count to {i}."}) + "\n")
    return path


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RU_LLM_BASE_URL")}
    env["RU_LLM_API_KEY"] = KEY
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchrunner", *args], env=environment(),
                          capture_output=True, text=True, timeout=timeout)


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr does when a person watches."""

    def isatty(self) -> bool:
        return True


def last_frame(text: str) -> str:
    return re.split(r"[\r\n]", text.rstrip("\r\n"))[-1]


def test_the_bar_counts_resumed_rows_once_and_shows_the_cost(
    tmp_path: Path, gateway, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    source = write_input(tmp_path / "in.jsonl", 40)
    config = RunConfig(input=source, output=tmp_path / "out.parquet", model="gpt-4o-mini",
                       base_url=gateway.base_url, progress=True, concurrency=4)
    first = run(config.replace(limit=10), handle_signals=False)
    assert first.ok == 10

    stream = Terminal()
    seen_at_first_result: list[str] = []

    with ProgressDisplay(config, stream) as display:
        def on_result(result: Result, tally: Tally) -> None:
            if not seen_at_first_result:
                seen_at_first_result.append(stream.getvalue())
            display.update(result, tally)

        report = run(config, on_result=on_result, on_start=display.start,
                     handle_signals=False)
    final = last_frame(stream.getvalue())  # the bar's last frame, drawn as it closed
    assert report.exit_code == 0 and report.resumed == 10
    # the bar was on screen, at the resumed rows, before the first answer came back
    assert "10/40" in seen_at_first_result[0]
    assert "40/40" in final and "100%" in final, final
    assert "50/40" not in stream.getvalue()
    assert re.search(r"cost=\$0\.\d{4}", final), final


def test_ctrl_c_says_what_it_waits_for_and_the_second_how_to_resume(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(latency_ms=20_000)  # answers that will not come in time
    source = write_input(tmp_path / "in.jsonl", 20)
    cmd = [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o",
           str(tmp_path / "out.parquet"), "-m", "gpt-4o-mini", "--base-url", gw.base_url,
           "-c", "3"]
    proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr],
                              daemon=True)  # type: ignore[union-attr]
    reader.start()

    def wait_for(text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout} s")

    try:
        deadline = time.monotonic() + 30
        while gw.stats.in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.stats.in_flight == 3
        proc.send_signal(signal.SIGINT)
        line = wait_for("stopping:", timeout=3)  # at once, not after the 5 s of grace
        assert "waiting for 3 requests in flight" in line and "Ctrl-C again" in line
        assert proc.poll() is None  # still waiting for them
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        reader.join(timeout=5)
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        assert any("run the same command again to resume" in r for r in rest), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_budget_reached_is_said_once(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = write_input(tmp_path / "in.jsonl", 200)
    done = run_cli("run", "-i", str(source), "-o", str(tmp_path / "out.parquet"), "-m", "gpt-4o",
                   "--base-url", gateway.base_url, "-c", "16", "--max-tokens", "50",
                   "--max-cost", "0.005")
    assert done.returncode == 5, done.stderr
    assert done.stderr.count("reached: no new requests are sent") == 1, done.stderr


def test_one_row_reads_one_row(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "only", "prompt": "hi", "model": "gpt-9"}) + "\n")
    done = run_cli("run", "-i", str(source), "-o", str(tmp_path / "out.parquet"),
                   "-m", "gpt-4o-mini", "--base-url", gateway.base_url, "--no-preflight")
    assert done.returncode == 1, done.stderr
    assert "1 row failed" in done.stderr and "1 rows" not in done.stderr


def test_json_logs_shape_the_error_line_too(tmp_path: Path) -> None:
    done = run_cli("run", "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.parquet"),
                   "-m", "gpt-4o", "--local", "--log-format", "json")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    record: dict[str, Any] = json.loads(lines[0])
    assert record["level"] == "error" and record["exit_code"] == 2
    assert "missing.jsonl" in record["message"]
    # an option click itself refuses, too
    bad = run_cli("run", "-i", "x.jsonl", "-o", "o.parquet", "--concurrency", "many",
                  "--log-format=json")
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert "many" in json.loads(line)["message"]
    plain = run_cli("run", "--concurrency", "many")
    assert plain.returncode == 2 and "Usage:" in plain.stderr  # click's own, without json


def test_the_final_summary_says_what_the_prompt_cache_saved(tmp_path: Path) -> None:
    from batchrunner.cli.progress import cache_line
    from batchrunner.config.pricing import BUILTIN_PRICES
    from batchrunner.engine.state import RunReport

    report = RunReport(exit_code=0, reason="complete", output=tmp_path / "o.parquet", rows=10,
                       ok=10, failed=0, resumed=0, sent=10, prompt_tokens=20_000,
                       completion_tokens=500, cached_tokens=15_360, total_tokens=20_500,
                       cost_usd=0.01, wall_seconds=3.0)
    config = RunConfig(input=tmp_path / "i.jsonl", output=tmp_path / "o.parquet",
                       model="gpt-4o", progress=False)
    stream = io.StringIO()
    ProgressDisplay(config, stream).final_summary(report)
    saved = BUILTIN_PRICES["gpt-4o"].cache_saving(15_360)
    assert f"cached    76.8% of prompt tokens (the gateway's prompt cache), saved ${saved:,.4f}" \
        in stream.getvalue()
    batch = cache_line(report, config.replace(engine="batch"))
    assert f"saved ${saved / 2:,.4f}" in batch
    # a sweep: the share, the saving per model is summary's; nothing cached: no line
    assert "saved" not in cache_line(report, config.replace(models=("gpt-4o", "gpt-4o-mini")))
    import dataclasses

    assert cache_line(dataclasses.replace(report, cached_tokens=0), config) is None
