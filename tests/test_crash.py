"""A bug never shows a traceback: one line, exit 70, crash.log without the key (docs/exit-codes.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from batchrunner.redaction import key_values, scrub
from batchrunner.store.checkpoint import checkpoint_dir

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-ru-CRASHCANARY-2b4d6f8a0c1e3a5c7e9b"

# Runs the CLI with a bug planted: the 13th answer raises, its message carrying the key.
PLANTED = """
import os, sys
import batchrunner.engine.processor as engine
import batchrunner.reports as reports
calls = [0]
original = engine.RowProcessor._ok_result
def broken(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > 12:
        raise RuntimeError("planted bug, key " + os.environ["RU_LLM_API_KEY"] + " inside")
    return original(self, *args, **kwargs)
engine.RowProcessor._ok_result = broken
def broken_summary(*args, **kwargs):
    raise KeyError("Authorization: Bearer " + os.environ["RU_LLM_API_KEY"])
reports.summarize = broken_summary
from batchrunner.cli.commands import main
sys.argv[0] = "batchrunner"
main()
"""


def cli(*args: str, cwd: Path, planted: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RU_LLM_BASE_URL")}
    env.update(RU_LLM_API_KEY=SECRET, PYTHONPATH=str(REPO))
    head = ["-c", PLANTED] if planted else ["-m", "batchrunner"]
    return subprocess.run([sys.executable, *head, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_a_bug_in_run_is_one_line_exit_70_and_the_run_resumes(tmp_path: Path, gateway: Any) -> None:
    out = tmp_path / "out.parquet"
    args = ("run", "-i", str(REPO / "sample_data" / "prompts.jsonl"), "-o", str(out),
            "-m", "gpt-4o-mini", "--base-url", gateway.base_url, "-c", "2",
            "--checkpoint-every", "5", "-q")
    crashed = cli(*args, cwd=tmp_path)
    assert crashed.returncode == 70, crashed.stderr
    lines = crashed.stderr.strip().splitlines()
    log = checkpoint_dir(out) / "crash.log"
    assert lines == [
        "batchrunner: internal error (a bug, please report it): RuntimeError: planted bug, "
        f"key [key] inside; the traceback is in {log}"
    ]
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text
    assert "RuntimeError: planted bug, key [key] inside" in text
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in crashed.stdout + crashed.stderr

    status = cli("status", str(out), "--format", "json", cwd=tmp_path, planted=False)
    assert status.returncode == 0, status.stderr
    done = json.loads(status.stdout)["done"]
    assert 12 <= done < 50  # what was answered before the bug is checkpointed

    sent_before = gateway.stats.requests
    resumed = cli(*args, cwd=tmp_path, planted=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {done}" in resumed.stderr
    assert gateway.stats.requests - sent_before == 50 - done


def test_a_bug_elsewhere_writes_its_log_in_the_current_folder(tmp_path: Path) -> None:
    results = tmp_path / "r.parquet"
    results.write_bytes(b"")
    crashed = cli("summary", str(results), cwd=tmp_path)
    assert crashed.returncode == 70
    log = tmp_path / "batchrunner-crash.log"
    assert crashed.stderr.strip().splitlines() == [
        "batchrunner: internal error (a bug, please report it): KeyError: "
        f"'Authorization: Bearer [key]'; the traceback is in {log}"
    ]
    text = log.read_text()
    assert "Traceback" in text and SECRET not in text and "broken_summary" in text


def test_scrub_masks_the_named_variables_and_key_shapes() -> None:
    environ = {"EVAL_KEY": "plain-looking-secret-123", "OPENAI_API_KEY": "sk-proj-abcdef123456"}
    text = ("a plain-looking-secret-123, sk-proj-abcdef123456 and sk-ru-other-key-000 "
            "and Bearer xyz9-token")
    assert scrub(text, key_values(["EVAL_KEY"], environ)) == \
        "a [key], [key] and [key] and Bearer [key]"
    assert scrub("nothing secret here: task-list") == "nothing secret here: task-list"


# The row feeder breaks on the 31st row it builds: a bug while building a request.
PLANTED_IN_FEEDER = """
import sys
import batchrunner.inputs.requests as requests
calls = [0]
original = requests.RequestBuilder.build
def broken(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > 30:
        raise ZeroDivisionError("planted bug in the feeder")
    return original(self, *args, **kwargs)
requests.RequestBuilder.build = broken
from batchrunner.cli.commands import main
sys.argv[0] = "batchrunner"
main()
"""


def test_a_bug_in_the_row_feeder_ends_the_run_with_exit_70(tmp_path: Path, gateway: Any) -> None:
    """A crashed task other than a worker (here the feeder) must not leave the workers waiting
    for rows for ever: exit 70, one line, crash.log, a readable checkpoint."""
    out = tmp_path / "out.parquet"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RU_LLM_BASE_URL")}
    env.update(RU_LLM_API_KEY=SECRET, PYTHONPATH=str(REPO))
    args = ["run", "-i", str(REPO / "sample_data" / "prompts.jsonl"), "-o", str(out),
            "-m", "gpt-4o-mini", "--base-url", gateway.base_url, "-c", "2",
            "--checkpoint-every", "5", "-q", "--no-preflight"]
    try:
        crashed = subprocess.run([sys.executable, "-c", PLANTED_IN_FEEDER, *args], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the run hung after the feeder crashed") from None
    assert crashed.returncode == 70, crashed.stderr
    log = checkpoint_dir(out) / "crash.log"
    assert crashed.stderr.strip().splitlines() == [
        "batchrunner: internal error (a bug, please report it): ZeroDivisionError: planted bug "
        f"in the feeder; the traceback is in {log}"
    ]
    assert "in broken" in log.read_text()
    status = cli("status", str(out), "--format", "json", cwd=tmp_path, planted=False)
    assert status.returncode == 0, status.stderr
    assert 1 <= json.loads(status.stdout)["done"] <= 30  # the rows built before the bug
