"""A missing optional test dependency: a visible skip that names the extra, a failure in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci", [False, True])
def test_without_ray_the_ray_tests_say_what_to_install(tmp_path: Path, ci: bool) -> None:
    (tmp_path / "ray.py").write_text('raise ImportError("no Ray in this test")\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), env.get("PYTHONPATH", "")])
    if ci:
        env["CI"] = "true"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_distributed.py", "-q", "-ra",
         "-p", "no:cacheprovider"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    message = "the Ray engine's tests need ray: pip install -e '.[test-ray]' (or '.[test-all]')"
    assert message in done.stdout, done.stdout
    if ci:
        assert done.returncode != 0 and "CI is set: not skipped" in done.stdout
    else:
        assert done.returncode in (0, 5)  # 5: a module skipped whole collects no test
        assert any(line.startswith("SKIPPED [1] tests/test_distributed.py:") and message in line
                   for line in done.stdout.splitlines()), done.stdout
