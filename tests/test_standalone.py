"""A clean clone passes its tests: nothing outside the repository is read (issue 12, point 1)."""

from __future__ import annotations

import re
from pathlib import Path

import openapi_schema

REPO = Path(__file__).resolve().parents[1]


def test_the_openai_schema_lives_in_the_repository() -> None:
    path = openapi_schema.schema_path()
    assert path.is_file()
    assert path.resolve().is_relative_to(REPO)
    notice = (path.parent / "README.md").read_text()
    assert "openai/openai-openapi" in notice and "MIT" in notice


def test_no_test_or_ci_file_points_outside_the_repository() -> None:
    needles = ("BATCHRUNNER_" + "SHARED", "../" + "shared", '/ "' + 'shared"')
    files = [*REPO.glob("tests/*.py"), REPO / ".ci" / "run", REPO / "pyproject.toml"]
    for file in files:
        text = file.read_text()
        for needle in needles:
            assert needle not in text, f"{file.relative_to(REPO)} mentions {needle!r}"


def test_ci_runs_the_readme_test_command_in_a_fresh_clone() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_command = next(c for c in commands if "pytest" in c and "[test]" in c)
    script = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    assert re.search(r"^git clone .*\"\$repo\" \"\$work/", script, re.M)
    lines = script.splitlines()
    clone = next(i for i, line in enumerate(lines) if line.startswith("git clone"))
    cd = next(i for i, line in enumerate(lines) if line.startswith('cd "$work/'))
    run = lines.index(test_command)  # word for word, after the clone, in the clone
    assert clone < cd < run
    assert lines[run] == [line for line in lines if line.strip()][-1]  # its exit code is CI's
