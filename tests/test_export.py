"""Output formats and `batchrunner export` (docs/output.md; issue 12, point 2)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openapi_schema
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_cli import cli

from batchrunner import RunConfig, run
from batchrunner.cli.commands import main
from batchrunner.errors import UsageError
from batchrunner.store.export import batch_api_line, check_output, export_results

KEY = "sk-ru-export-tests-0a1b2c3d4e5f6a7b8c9d"
REPO_SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "prompts.jsonl"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    return KEY


def rows() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"id": f"r{i}", "prompt": f"Say {i} things about tea.",
                                  "tags": ["a", str(i)]} for i in range(6)]
    out[2]["prompt"] = ""  # an input error: no request, no HTTP status
    out[4]["model"] = "no-such-model"  # the gateway answers 404 model_not_found
    return out


def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path


def go(tmp_path: Path, base_url: str, output: Path) -> Any:
    config = RunConfig(input=source(tmp_path), output=output, model="gpt-4o-mini",
                       base_url=base_url, params={"n": 2},
                       preflight=False)  # row 4's model must reach the gateway: its 404 is data
    return run(config, handle_signals=False)


# --- nothing is paid for that cannot be written --------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("folder", "is a folder"),
    ("out.txt", ".txt is not an output format"),
    ("results", "no extension is not an output format"),
    ("a-file/out.parquet", "a-file is a file"),
    ("/proc/batchrunner-no-such/out.parquet", "cannot write"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_request(
        tmp_path: Path, gateway: Any, name: str, message: str) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("in the way")
    output = tmp_path / name
    with pytest.raises(UsageError, match=message):
        go(tmp_path, gateway.base_url, output)
    assert gateway.stats.requests == 0
    assert not (tmp_path / "folder").with_name("folder.checkpoint").exists()


def test_the_command_line_says_one_line_and_exits_2(tmp_path: Path, gateway: Any) -> None:
    done = cli("run", "-i", str(source(tmp_path)), "-o", str(tmp_path), "-m", "gpt-4o",
               "--base-url", gateway.base_url, env={"RU_LLM_API_KEY": KEY})
    assert done.returncode == 2
    assert done.stderr.strip() == f"batchrunner: error: --output {tmp_path} is a folder: " \
        f"name a file, such as {tmp_path / 'results.parquet'}"
    assert gateway.stats.requests == 0


def test_check_output_creates_nothing(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new" / "deeper" / "r.CSV") == "csv"
    assert list(tmp_path.iterdir()) == []


# --- output formats by extension -----------------------------------------------------------


def test_jsonl_and_csv_outputs_hold_what_parquet_holds(tmp_path: Path, gateway: Any) -> None:
    reports = {ext: go(tmp_path, gateway.base_url, tmp_path / f"out.{ext}")
               for ext in ("parquet", "jsonl", "csv")}
    assert {r.exit_code for r in reports.values()} == {1}  # two rows failed, as they should
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    volatile = ("latency_ms", "response_id", "content", "choices")  # ids and times differ
    for got, want in zip(lines, table, strict=True):
        assert list(got) == list(want)
        assert {k: v for k, v in got.items() if k not in volatile and k != "cost_usd"} == \
            {k: v for k, v in want.items() if k not in volatile and k != "cost_usd"}
        assert got["cost_usd"] == pytest.approx(want["cost_usd"])
        assert (got["content"] is None) == (want["content"] is None)
    with open(tmp_path / "out.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert list(records[0]) == list(table[0])
    assert [r["id"] for r in records] == [r["id"] for r in table]
    assert json.loads(records[0]["tags"]) == ["a", "0"]  # list columns as JSON text
    assert len(json.loads(records[0]["choices"])) == 2
    assert records[2]["status"] == "error" and records[2]["error"].startswith("input:")
    # the Parquet reader must not be fooled: the .csv is text, not Parquet under a csv name
    assert (tmp_path / "out.csv").read_bytes()[:4] != b"PAR1"


# --- batchrunner export -----------------------------------------------------------------------


@pytest.fixture
def results(tmp_path: Path, gateway: Any) -> Path:
    output = tmp_path / "res.parquet"
    assert go(tmp_path, gateway.base_url, output).exit_code == 1
    return output


def test_export_batch_api_lines(results: Path) -> None:
    out = io.BytesIO()
    assert export_results(results, "batch-api", stream=out) == 6
    lines = [json.loads(line) for line in out.getvalue().decode().splitlines()]
    table = pq.read_table(results).to_pylist()
    assert [line["custom_id"] for line in lines] == [r["id"] for r in table]
    assert len({line["id"] for line in lines}) == 6
    for line, row in zip(lines, table):
        assert set(line) == {"id", "custom_id", "response", "error"}
        if row["status"] == "ok":
            assert line["error"] is None and line["response"]["status_code"] == 200
            body = line["response"]["body"]
            openapi_schema.validate(body, "CreateChatCompletionResponse")
            assert body["id"] == row["response_id"]
            assert [c["message"]["content"] for c in body["choices"]] == row["choices"]
            assert body["usage"]["total_tokens"] == row["total_tokens"]
    refused = lines[4]
    assert refused["error"] is None and refused["response"]["status_code"] == 404
    openapi_schema.validate(refused["response"]["body"], "ErrorResponse")
    unsent = lines[2]
    assert unsent["response"] is None
    assert unsent["error"]["code"] == "invalid_input"
    assert unsent["error"]["message"].startswith("input: line 3")


def test_batch_api_line_without_usage_or_choices() -> None:
    line = batch_api_line({"id": "x", "status": "ok", "content": "hi", "model": "m",
                           "response_id": "c1", "http_status": 200,
                           "finish_reason": "length"}, 7, created=1700000000)
    body = line["response"]["body"]
    openapi_schema.validate(body, "CreateChatCompletionResponse")
    assert line["id"] == "batch_req_00000007" and "usage" not in body
    assert body["created"] == 1700000000 and body["choices"][0]["message"]["content"] == "hi"


def test_export_command_to_stdout_and_to_a_file(results: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["export", str(results), "--format", "jsonl"])
    assert shown.exit_code == 0, shown.output
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [r["id"] for r in lines] == [f"r{i}" for i in range(6)]
    target = tmp_path / "exported" / "res.csv"  # --format from the extension
    written = runner.invoke(main, ["export", str(results), "-o", str(target)])
    assert written.exit_code == 0, written.output
    frame = pd.read_csv(target, dtype=str, keep_default_na=False)
    assert list(frame["id"]) == [f"r{i}" for i in range(6)]
    assert [p.name for p in target.parent.iterdir()] == ["res.csv"]  # no temporary left
    batch = tmp_path / "batch_output.jsonl"
    done = runner.invoke(main, ["export", str(results), "--format", "batch-api", "-o", str(batch)])
    assert done.exit_code == 0 and len(batch.read_text().splitlines()) == 6


@pytest.mark.parametrize("args, message", [
    (["--format", "xml"], "Invalid value for '--format'"),
    ([], "give --format"),
    (["--format", "csv", "-o", "{tmp}"], "is a folder"),
])
def test_export_usage_errors(results: Path, tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = CliRunner().invoke(main, ["export", str(results), *args])
    assert done.exit_code == 2 and message in done.output


def test_export_reads_parquet_results_only(tmp_path: Path) -> None:
    other = tmp_path / "r.jsonl"
    other.write_text("{}\n")
    done = CliRunner().invoke(main, ["export", str(other), "--format", "csv"])
    assert done.exit_code == 2 and "export reads Parquet results" in done.output
    assert not os.path.exists(tmp_path / "r.csv")


def test_validate_checks_the_output_too(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{REPO_SAMPLE}"\noutput = "results.txt"\nmodel = "gpt-4o"\n')
    done = CliRunner().invoke(main, ["validate", str(job)])
    assert done.exit_code == 2
    assert ".txt is not an output format; use .parquet, .jsonl, .csv" in done.output
    job.write_text(f'input = "{REPO_SAMPLE}"\noutput = "results.csv"\nmodel = "gpt-4o"\n')
    assert CliRunner().invoke(main, ["validate", str(job)]).exit_code == 0


def test_an_object_store_output_is_checked_by_its_extension_only() -> None:
    assert check_output("s3://bucket/out/r.jsonl") == "jsonl"  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"\.txt is not an output format"):
        check_output("s3://bucket/out/r.txt")  # type: ignore[arg-type]


def test_export_into_a_pipe_that_closes_is_not_a_crash(tmp_path: Path) -> None:
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(200_000)],
                             "status": ["ok"] * 200_000}), big)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "batchrunner", "export", str(big),
                             "--format", "jsonl"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["id"] == "r0"
    proc.stdout.close()  # as `| head -1` does
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert stderr == ""
    assert not (tmp_path / "batchrunner-crash.log").exists()


def test_export_flatten_makes_typed_columns_of_parsed(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    output = tmp_path / "entities.parquet"
    report = run(
        RunConfig(
            input=repo / "sample_data" / "entities.jsonl", output=output, model="gpt-4o-mini",
            json_schema=repo / "jobs" / "entities.schema.json", template="Text: {text}",
            local=True,
        ),
        handle_signals=False,
    )
    assert report.exit_code == 0
    target = tmp_path / "flat.jsonl"
    done = CliRunner().invoke(main, ["export", str(output), "--flatten", "-o", str(target)])
    assert done.exit_code == 0, done.output
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    parsed = [json.loads(r) for r in pq.read_table(output).column("parsed").to_pylist()]
    assert len(lines) == len(parsed) > 0
    for line, answer in zip(lines, parsed):
        assert "parsed" not in line
        assert line["language"] == answer["language"]
        assert line["entities"] == answer["entities"]  # a list of objects, not JSON text
    refused = CliRunner().invoke(main, ["export", str(output), "--flatten", "--format", "batch-api"])
    assert refused.exit_code == 2 and "batch-api" in refused.output


def test_read_results_flattens_parsed_too(tmp_path: Path) -> None:
    from batchrunner import read_results

    repo = Path(__file__).resolve().parent.parent
    output = tmp_path / "entities.parquet"
    run(
        RunConfig(
            input=repo / "sample_data" / "entities.jsonl", output=output, model="gpt-4o-mini",
            json_schema=repo / "jobs" / "entities.schema.json", template="Text: {text}",
            local=True,
        ),
        handle_signals=False,
    )
    frame = read_results(output, flatten=True)
    parsed = [json.loads(r) for r in pq.read_table(output).column("parsed").to_pylist()]
    assert "parsed" not in frame.columns
    assert list(frame["language"]) == [p["language"] for p in parsed]
    assert [list(e) for e in frame["entities"]] == [p["entities"] for p in parsed]


# --- storage errors and closed pipes: one answer for every format and command ---------------


def _big_results(results: Path, tmp_path: Path) -> Path:
    """The fixture's results 2,000 times over (12,000 rows): more than a pipe holds."""
    big = tmp_path / "big.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(results)] * 2000), big)
    return big


def _batchrunner(*args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "batchrunner", *args], env=env,
                            stderr=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "batch-api"])
def test_every_format_into_a_pipe_closed_early_is_exit_141(
    results: Path, tmp_path: Path, fmt: str
) -> None:
    big = _big_results(results, tmp_path)
    proc = _batchrunner("export", str(big), "--format", fmt, stdout=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # the first line, as `| head -1` reads it
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert (proc.wait(timeout=60), stderr) == (141, "")
    assert not (tmp_path / "batchrunner-crash.log").exists()


@pytest.mark.parametrize("args", [
    ["export", "{results}", "--format", "jsonl"],
    ["export", "{results}", "--format", "csv"],
    ["export", "{results}", "--format", "batch-api"],
    ["summary", "{results}"],
    ["summary", "{results}", "--format", "csv"],
    ["status", "{results}"],
])
def test_stdout_on_a_full_device_is_exit_74_with_one_line(
    results: Path, tmp_path: Path, args: list[str]
) -> None:
    with open("/dev/full", "wb") as full:
        proc = _batchrunner(*(a.format(results=results) for a in args), stdout=full, cwd=tmp_path)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=60) == 74, stderr
    assert stderr.splitlines() == [
        "batchrunner: error: cannot write stdout: No space left on device; "
        "free space and run the same command again"
    ]
    assert not (tmp_path / "batchrunner-crash.log").exists()


def test_export_to_a_device_writes_into_it_and_never_replaces_it(
    results: Path, tmp_path: Path
) -> None:
    link = tmp_path / "out.csv"
    link.symlink_to("/dev/full")  # `-o /dev/full` itself, without risking the device
    proc = _batchrunner("export", str(results), "-o", str(link), cwd=tmp_path)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 74, stderr
    assert link.is_symlink() and not link.is_file()  # the device is still there
    assert f"cannot write {link}: No space left on device" in stderr
