"""A clean clone passes its tests: nothing outside the repository is read (issue 12, point 1)."""

from __future__ import annotations

import re
import tomllib
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


def test_ci_runs_the_readme_test_command_in_a_fresh_clone_on_the_oldest_and_newest_python() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_command = next(c for c in commands if "pytest" in c and "pip install -e '.[test-all]'" in c)
    script = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    lines = [line.strip() for line in script.splitlines()]
    clone = next(i for i, line in enumerate(lines)
                 if re.match(r'git clone .*"\$repo" "\$work/', line))
    cd = next(i for i, line in enumerate(lines) if line.startswith('cd "$work/'))
    run = lines.index(test_command)  # word for word, after the clone, in the clone
    assert clone < cd < run
    # Run for the oldest and the newest Python the package declares, and last: the exit code
    # of the last run is CI's (set -e stops at the first that fails).
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = sorted((int(v.rpartition(".")[2]), v.rpartition(" :: ")[2])
                      for v in pyproject["classifiers"] if re.fullmatch(r".*Python :: 3\.\d+", v))
    oldest, newest = declared[0][1], declared[-1][1]
    assert pyproject["requires-python"] == f">={oldest}"
    legs = [line for line in lines if line.startswith("tests_on ")]
    assert legs == [f'tests_on "$newest" py{newest}', f'tests_on "$oldest" py{oldest}']
    assert f"python_version {oldest})" in script and f"python_version {newest})" in script
    assert legs[-1] == [line for line in lines if line][-1]
