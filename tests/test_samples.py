"""`batchrunner samples DIR`: what a user who pip-installed batchrunner tries first.

No checkout, no key, no network: the samples come from the installed package, and the job
files they hold run against the built-in gateway simulator.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner

from batchrunner.cli import main
from batchrunner.samples import SAMPLE_FILES, write_samples

REPO = Path(__file__).resolve().parents[1]
PACKAGE_SAMPLES = REPO / "batchrunner" / "samples"


def batchrunner(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: no key in the environment, from `cwd`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RU_LLM_API_KEY", "OPENAI_API_KEY", "RU_LLM_BASE_URL", "OPENAI_BASE_URL")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "batchrunner", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_packaged_data_is_the_same_bytes_as_sample_data() -> None:
    """One set of samples: make_samples.py writes both copies; a hand edit to one fails here."""
    for name in ("prompts.jsonl", "eval_multiple_choice.jsonl"):
        assert (PACKAGE_SAMPLES / name).read_bytes() == (REPO / "sample_data" / name).read_bytes(), (
            f"batchrunner/samples/{name} differs from sample_data/{name}: "
            f"run sample_data/make_samples.py")


def test_every_sample_file_is_package_data() -> None:
    """What the command writes is what the folder holds, and the wheel takes all of it."""
    data = sorted(p.name for p in PACKAGE_SAMPLES.iterdir()
                  if p.is_file() and p.suffix not in (".py", ".pyc"))
    assert data == sorted(SAMPLE_FILES)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["batchrunner.samples"]
    for name in SAMPLE_FILES:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_the_main_help_shows_the_samples_first() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    first_example = next(line for line in result.output.splitlines() if "batchrunner " in line)
    assert "batchrunner samples demo && cd demo && batchrunner run job.toml" in first_example
    assert "sample_data/" not in result.output  # only a checkout has that folder


def test_samples_then_the_job_files_run_locally_from_an_empty_folder(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    result = CliRunner().invoke(main, ["samples", str(demo)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in demo.iterdir()) == sorted(SAMPLE_FILES)
    assert [Path(line).name for line in result.stdout.splitlines()] == list(SAMPLE_FILES)
    assert "batchrunner run job.toml" in result.stderr

    # A real run, in a subprocess, from the folder, with no key: the job file says `local`.
    done = batchrunner("run", "job.toml", cwd=demo)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(demo / "out" / "quickstart.parquet")
    assert table.num_rows == 50 and set(table.column("status").to_pylist()) == {"ok"}
    summary = batchrunner("summary", "out/quickstart.parquet", cwd=demo)
    assert summary.returncode == 0 and "gpt-4o-mini" in summary.stdout

    # The evaluation: a scored sweep of two models (the first 20 questions, to stay quick).
    done = batchrunner("run", "eval.toml", "--limit", "20", cwd=demo)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(demo / "out" / "eval.parquet")
    assert sorted(set(table.column("model").to_pylist())) == ["gpt-4o", "gpt-4o-mini"]
    assert table.num_rows == 40 and None not in table.column("score").to_pylist()
    compare = batchrunner("compare", "out/eval.parquet", cwd=demo)
    assert compare.returncode == 0 and "gpt-4o vs gpt-4o-mini" in compare.stdout


def test_a_changed_sample_is_kept_unless_forced(tmp_path: Path) -> None:
    write_samples(tmp_path)
    again = CliRunner().invoke(main, ["samples", str(tmp_path)])  # the same bytes: fine
    assert again.exit_code == 0

    job = tmp_path / "job.toml"
    job.write_text("# mine\n", encoding="utf-8")
    refused = CliRunner().invoke(main, ["samples", str(tmp_path)])
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (f"batchrunner: error: {job} already exists and differs from the "
                                      f"sample (--force replaces it)")
    assert job.read_text(encoding="utf-8") == "# mine\n"

    forced = CliRunner().invoke(main, ["samples", str(tmp_path), "--force"])
    assert forced.exit_code == 0
    assert job.read_bytes() == (PACKAGE_SAMPLES / "job.toml").read_bytes()


def test_a_file_in_the_way_of_the_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "demo").write_text("x", encoding="utf-8")
    result = CliRunner().invoke(main, ["samples", str(tmp_path / "demo")])
    assert result.exit_code == 2
    assert result.stderr == f"batchrunner: error: {tmp_path / 'demo'} is a file, not a folder\n"
