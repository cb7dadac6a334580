"""`{date}` in output paths: a nightly job writes a new file each night (docs/cron.md)."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrunner import RunConfig, build_config, load_job
from batchrunner.cli.commands import main
from batchrunner.config.paths import expand_date
from batchrunner.errors import UsageError
from batchrunner.store.checkpoint import checkpoint_dir

REPO = Path(__file__).resolve().parents[1]
NIGHT = datetime(2026, 12, 1, 1, 15, 30)


def today_names(pattern: str) -> set[str]:
    """`pattern` with {} as today's ISO date, and as tomorrow's (a test may cross midnight)."""
    now = date.today()
    return {pattern.format(d.isoformat()) for d in (now, now + timedelta(days=1))}


@pytest.mark.parametrize("given, expected", [
    ("out/eval-{date}.parquet", "out/eval-2026-12-01.parquet"),
    ("out/{date:%Y%m%d-%H}.jsonl", "out/20261201-01.jsonl"),
    ("out/{date:%Y}/{date:%m}/{date}.csv", "out/2026/12/2026-12-01.csv"),
    ("out/plain.parquet", "out/plain.parquet"),
])
def test_date_placeholders(given: str, expected: str) -> None:
    assert expand_date(Path(given), now=NIGHT) == Path(expected)


@pytest.mark.parametrize("given, problem", [
    ("out/{data}.parquet", "unknown placeholder {data}"),
    ("out/{date:}.parquet", "needs a strftime pattern"),
    ("out/{date}-{run}.parquet", "unknown placeholder {run}"),
])
def test_bad_placeholders_are_usage_errors(given: str, problem: str) -> None:
    with pytest.raises(UsageError, match=re.escape(problem)):
        expand_date(Path(given), now=NIGHT)


def test_the_config_resolves_output_and_summary_once() -> None:
    config = RunConfig(input=Path("in.jsonl"), output=Path("out/r-{date}.parquet"),
                       summary_json=Path("out/r-{date}.json"))
    assert config.output.name in today_names("r-{}.parquet")
    assert config.summary_json is not None
    assert config.summary_json.stem == config.output.stem  # one moment for both
    assert config.replace(concurrency=2).output == config.output


def test_the_shipped_nightly_jobs_write_a_file_a_day() -> None:
    for job, stem in (("nightly-eval.toml", "nightly-eval-{}"),
                      ("bulk-generation.toml", "product-descriptions-{}")):
        config = build_config(load_job(REPO / "jobs" / job), {})
        assert config.output.name in today_names(stem + ".parquet")
        assert config.summary_json is not None
        assert config.summary_json.name in today_names(stem + ".summary.json")


def test_the_cron_guide_shows_it() -> None:
    guide = (REPO / "docs" / "cron.md").read_text()
    cron = guide[guide.index("## A new file each night"):]
    cron = cron[:cron.index("\n## ", 3)]
    assert "{date}" in cron and "{date:%Y%m%d-%H}" in cron


def test_a_dated_run_checkpoints_beside_the_resolved_file_and_resumes_it(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["run", "-i", str(REPO / "sample_data" / "prompts.jsonl"), "-o",
            str(tmp_path / "r-{date}.parquet"), "-m", "gpt-4o-mini", "--local", "-q",
            "--limit", "3"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    [output] = [p for p in tmp_path.iterdir() if p.suffix == ".parquet"]
    assert output.name in today_names("r-{}.parquet")
    assert checkpoint_dir(output).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name, output.name + ".checkpoint"]
    assert str(output) in first.output  # the summary names the resolved file
    assert pq.read_table(output).num_rows == 3
    status = runner.invoke(main, ["status", str(output), "--format", "json"])
    assert status.exit_code == 0 and '"done": 3' in status.output
    again = runner.invoke(main, [a for a in args if a not in ("--limit", "3")])
    assert again.exit_code == 0, again.output
    assert "resumed 3" in again.output  # the same day: the same file, resumed
    assert pq.read_table(output).num_rows == 50


def test_an_object_store_output_keeps_its_uri() -> None:
    uri = "s3://bucket/nightly/r-{date}.parquet"
    config = RunConfig(input=Path("in.jsonl"), output=uri)  # type: ignore[arg-type]
    assert isinstance(config.output, str)
    assert config.output.startswith("s3://bucket/nightly/r-")  # not folded to s3:/bucket
    assert config.output.rsplit("/", 1)[1] in today_names("r-{}.parquet")
