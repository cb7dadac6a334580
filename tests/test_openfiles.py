"""The open-file limit: raised to the hard limit at start; a concurrency beyond it is exit 2.

Real subprocesses, each started under the limits a test sets (`ulimit -n` as a shell would),
so the test process's own limit is never touched.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ru-openfiles-test-0123456789abcdef"
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def run_under(limits: tuple[int, int], tmp_path: Path, base_url: str, concurrency: int
              ) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "r{i}", "prompt": "Say {i}."}}\n' for i in range(10)))
    env = {**os.environ, "RU_LLM_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", "-i", str(source),
         "-o", str(tmp_path / "out.parquet"), "-m", "gpt-4o-mini", "--base-url", base_url,
         "-c", str(concurrency), "--quiet"],
        capture_output=True, text=True, env=env, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits),
    )


def test_a_concurrency_the_limit_cannot_hold_is_a_usage_error_before_sending(
    tmp_path: Path, gateway: Any
) -> None:
    done = run_under((256, 256), tmp_path, gateway.base_url, 5000)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "ulimit -n" in line]
    assert "--concurrency 5000" in line and "256" in line
    assert gateway.stats.requests == 0
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD < 2048,
                    reason="needs a hard open-file limit of at least 2,048")
def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path, gateway: Any) -> None:
    # 600 in flight do not fit under a soft limit of 256, but do under the hard one of 2,048
    done = run_under((256, 2048), tmp_path, gateway.base_url, 600)
    assert done.returncode == 0, done.stderr
    assert gateway.stats.requests == 10


def test_validate_says_so_too(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "hi"}\n')
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{source}"\noutput = "{tmp_path / "out.parquet"}"\n'
                   'model = "gpt-4o-mini"\nconcurrency = 5000\n')
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "validate", str(job)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
    )
    assert done.returncode == 2 and "ulimit -n" in done.stderr, done.stderr
