"""Failures are visible and the cost of what is left is known (docs/cost.md).

The final summary, `status` and `summary` list the most frequent errors; `summary` reads an
unfinished output from its checkpoint; `estimate` counts only the rows still to send.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from batchrunner import RunConfig
from batchrunner.config.pricing import PriceTable
from batchrunner.reports import estimate
from batchrunner.store.failures import normalize_error, top_errors

KEY = "sk-ru-visibility-tests-6a4c2e8f0b1d3f5a7c9e"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RU_LLM_BASE_URL")}
    env["RU_LLM_API_KEY"] = KEY
    return subprocess.run([sys.executable, "-m", "batchrunner", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def mixed_input(path: Path) -> Path:
    """12 rows: 6 ok, 4 asking for an unknown model, 2 lines that are not JSON."""
    lines = []
    for i in range(12):
        if i in (3, 8):
            lines.append("{not json")
        elif i % 3 == 1:
            lines.append(json.dumps({"id": f"r{i}", "prompt": f"Say {i}.", "model": "gpt-9"}))
        else:
            lines.append(json.dumps({"id": f"r{i}", "prompt": f"Say {i}."}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_final_summary_status_and_summary_list_the_most_frequent_errors(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    source = mixed_input(tmp_path / "in.jsonl")
    output = tmp_path / "out.parquet"
    done = run_cli("run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini",
                   "--base-url", gateway.base_url, "--no-preflight")
    assert done.returncode == 1, done.stderr
    http = "HTTP 404: The model `gpt-9` does not exist"
    for text in (done.stderr, run_cli("status", str(output)).stdout,
                 run_cli("summary", str(output)).stdout):
        assert "most frequent errors" in text, text
        assert any(line.split()[:1] == ["4"] and http in line for line in text.splitlines())
        assert any(line.split()[:1] == ["2"] and "input: line N: not valid JSON" in line
                   for line in text.splitlines()), text
    state = json.loads(run_cli("status", str(output), "--format", "json").stdout)
    assert [e["count"] for e in state["errors"]] == [4, 2]
    report = json.loads(run_cli("summary", str(output), "--format", "json").stdout)
    assert [e["count"] for e in report["errors"]] == [4, 2]


def test_summary_reads_an_unfinished_output_from_its_checkpoint(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    source = mixed_input(tmp_path / "in.jsonl")
    output = tmp_path / "out.parquet"
    done = run_cli("run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini",
                   "--base-url", gateway.base_url, "--no-preflight", "--limit", "7",
                   "--max-tokens", "20")
    assert done.returncode == 1 and output.exists()
    # the full run, stopped by its budget: the old file is not the latest any more
    stopped = run_cli("run", "-i", str(source), "-o", str(output), "-m", "gpt-4o-mini",
                      "--base-url", gateway.base_url, "--no-preflight", "-c", "1",
                      "--max-tokens", "20", "--max-cost", "0.000002")
    assert stopped.returncode == 5, stopped.stderr
    output.unlink()  # an output that was never written: the checkpoint is all there is
    shown = run_cli("summary", str(output), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    state = json.loads(run_cli("status", str(output), "--format", "json").stdout)
    assert report["from_checkpoint"] == [str(output)]
    assert report["total"]["rows"] == state["done"] and 7 <= state["done"] < 12
    assert report["total"]["ok"] == state["ok"]
    assert report["total"]["cost_usd"] == pytest.approx(state["cost_usd"])
    table = run_cli("summary", str(output)).stdout
    assert "not finished" in table and "read from its checkpoint" in table
    by_topic = run_cli("summary", str(output), "--by", "prompt")
    assert by_topic.returncode == 2 and "result columns only" in by_topic.stderr
    # a glob finds it too
    assert json.loads(run_cli("summary", str(tmp_path / "*.parquet"), "--format",
                              "json").stdout)["total"]["rows"] == state["done"]


def test_estimate_counts_only_the_rows_still_to_send(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Explain {i} well."}) + "\n"
                              for i in range(40)))
    output = tmp_path / "out.parquet"
    args = ["-i", str(source), "-o", str(output), "-m", "gpt-4o", "--max-tokens", "30"]
    before = estimate(RunConfig(input=source, output=output, model="gpt-4o",
                                params={"max_tokens": 30}), prices=PriceTable.load())
    assert before.rows_to_send == 40 and before.done_rows == 0 and before.checkpoint is None
    assert run_cli("run", *args, "--base-url", gateway.base_url, "--limit", "15").returncode == 0
    after = estimate(RunConfig(input=source, output=output, model="gpt-4o",
                               params={"max_tokens": 30}), prices=PriceTable.load())
    assert (after.rows, after.done_rows, after.rows_to_send) == (40, 15, 25)
    assert after.cost_usd is not None and before.cost_usd is not None
    assert after.cost_usd.high == pytest.approx(before.cost_usd.high * 25 / 40, rel=0.05)
    shown = run_cli("estimate", *args)
    assert shown.returncode == 0, shown.stderr
    assert "40 rows, 15 done" in shown.stdout and "25 to send" in shown.stdout
    # a checkpoint `run` would refuse (other settings) is not used, and the estimate says so
    other = run_cli("estimate", *args[:-1], "31")
    assert "40 to send" in other.stdout and "other settings" in other.stdout


def test_max_cost_is_documented_as_the_spending_across_runs() -> None:
    guide = (Path(__file__).resolve().parents[1] / "docs" / "cost.md").read_text()
    assert "across all the runs" in guide
    helped = run_cli("run", "--help").stdout
    assert "across all its runs" in " ".join(helped.split())


def test_error_kinds_merge_places_and_mask_keys() -> None:
    assert normalize_error("input: line 17: not valid JSON") == "input: line N: not valid JSON"
    assert normalize_error("input: row 3: empty prompt") == "input: row N: empty prompt"
    masked = normalize_error("HTTP 401: Incorrect API key provided: sk-ru-abcdefghijklmnop")
    assert "abcdefghijklmnop" not in masked and "[key]" in masked
    errors = pa.array(["b", None, "a", "b", "input: line 1: x", "input: line 9: x", "b"])
    top = top_errors(errors, limit=2)
    assert [(e.error, e.count) for e in top] == [("b", 3), ("input: line N: x", 2)]


def test_estimate_of_a_sweeps_checkpoint_counts_rows_times_models(
    tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    from batchrunner import run

    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Say {i}."}) + "\n"
                              for i in range(30)))
    config = RunConfig(input=source, output=tmp_path / "out.parquet", model="gpt-4o",
                       models=("gpt-4o", "gpt-4o-mini"), base_url=gateway.base_url,
                       params={"max_tokens": 10})
    assert run(config, handle_signals=False).exit_code == 0
    done = estimate(config, prices=PriceTable.load())
    assert (done.rows, done.done_rows, done.rows_to_send) == (60, 60, 0)
