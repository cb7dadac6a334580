"""Evaluations end to end (docs/evaluations.md): scoring in a run, sweeps, compare, the DataFrame face."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

import batchrunner
from batchrunner import RunConfig, UsageError, read_results, run
from batchrunner.reports.compare import compare, render_table, to_csv
from batchrunner.simulator.evals import eval_answer

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-ru-eval-tests-5b7d9f1a3c5e7a9b"
MODELS = ("gpt-4o", "gpt-4o-mini")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)


def arithmetic_input(tmp_path: Path, rows: int, *, model_of: dict[int, str] | None = None) -> Path:
    path = tmp_path / "in.jsonl"
    lines = []
    for i in range(rows):
        row = {"id": f"r{i}", "question": f"Calculate {i + 1},000 + {i}.",
               "reference": f"{(i + 1) * 1000 + i:,}"}
        if model_of is not None:
            row["model"] = model_of.get(i)
        lines.append(json.dumps(row) + "\n")
    path.write_text("".join(lines))
    return path


def config(tmp_path: Path, gateway, source: Path, **fields) -> RunConfig:  # type: ignore[no-untyped-def]
    fields.setdefault("models", MODELS)
    return RunConfig(input=source, output=tmp_path / "out.parquet", base_url=gateway.base_url,
                     template="{question}", **fields)


# -- sweeps -----------------------------------------------------------------------------------


def test_a_sweep_has_a_row_per_input_row_and_model_in_order(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    report = run(config(tmp_path, gateway, arithmetic_input(tmp_path, 5)), handle_signals=False)
    assert report.exit_code == 0 and report.rows == 10 and report.ok == 10
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [(r["id"], r["model"]) for r in table] == [
        (f"r{i}", m) for i in range(5) for m in MODELS
    ]
    assert all(r["response_model"].startswith(r["model"] + "-2024") for r in table)
    assert [r["question"] for r in table[::2]] == [r["question"] for r in table[1::2]]
    assert gateway.stats.requests == 10


def test_a_row_with_its_own_model_goes_to_that_model_only(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = arithmetic_input(tmp_path, 4, model_of={1: "claude-3-5-haiku-20241022",
                                                     2: "gpt-4o-mini"})
    report = run(config(tmp_path, gateway, source), handle_signals=False)
    assert report.exit_code == 0 and report.rows == 6
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [(r["id"], r["model"]) for r in table] == [
        ("r0", "gpt-4o"), ("r0", "gpt-4o-mini"), ("r1", "claude-3-5-haiku-20241022"),
        ("r2", "gpt-4o-mini"), ("r3", "gpt-4o"), ("r3", "gpt-4o-mini"),
    ]
    assert [r["input_model"] for r in table][2:4] == ["claude-3-5-haiku-20241022", "gpt-4o-mini"]
    assert gateway.stats.requests == 6


def test_a_sweep_resumes_and_limit_counts_input_rows(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    base = config(tmp_path, gateway, arithmetic_input(tmp_path, 6), limit=2)
    smoke = run(base, handle_signals=False)
    assert smoke.exit_code == 0 and smoke.rows == 4 and gateway.stats.requests == 4
    full = run(base.replace(limit=None), handle_signals=False)
    assert full.exit_code == 0 and full.rows == 12 and full.resumed == 4 and full.ok == 12
    assert gateway.stats.requests == 12  # nothing sent twice
    again = run(base.replace(limit=None), handle_signals=False)
    assert again.exit_code == 0 and gateway.stats.requests == 12
    ids = pq.read_table(tmp_path / "out.parquet").column("id").to_pylist()
    assert ids == [f"r{i}" for i in range(6) for _ in MODELS]


def test_max_cost_across_a_sweep(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    base = config(tmp_path, gateway, arithmetic_input(tmp_path, 30), concurrency=2,
                  params={"max_tokens": 20}, max_cost=0.0008)
    stopped = run(base, handle_signals=False)
    assert stopped.exit_code == 5 and 0 < stopped.ok < 60 and stopped.cost_usd <= 0.0008
    finished = run(base.replace(max_cost=1.0), handle_signals=False)
    assert finished.exit_code == 0 and finished.ok == 60
    assert gateway.stats.requests == 60


def test_changing_the_models_of_a_sweep_is_a_checkpoint_mismatch(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    base = config(tmp_path, gateway, arithmetic_input(tmp_path, 2))
    assert run(base, handle_signals=False).exit_code == 0
    with pytest.raises(batchrunner.CheckpointMismatch, match="models"):
        run(base.replace(models=("gpt-4o", "claude-3-5-haiku-20241022")), handle_signals=False)


# -- scoring in a run ---------------------------------------------------------------------------


def test_run_with_score_fills_the_score_column(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    base = config(tmp_path, gateway, arithmetic_input(tmp_path, 40), score="numeric",
                  reference_column="reference")
    assert run(base, handle_signals=False).exit_code == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("score").type == pa.float64()
    rows = table.to_pylist()
    for r in rows:  # the score is what the metric says of this row
        right = batchrunner.answers.scoring.last_number(r["content"]) == (int(r["id"][1:]) + 1) * 1000 \
            + int(r["id"][1:])
        assert r["score"] == float(right)
    # and the simulator gets some wrong, more for the smaller model
    accuracy = {m: sum(r["score"] for r in rows if r["model"] == m) / 40 for m in MODELS}
    assert 0.5 < accuracy["gpt-4o-mini"] < accuracy["gpt-4o"] < 1.0
    # the same run with another metric re-scores the finished output and sends nothing
    sent = gateway.stats.requests
    assert run(base.replace(score="exact"), handle_signals=False).exit_code == 0
    assert gateway.stats.requests == sent
    exact = pq.read_table(tmp_path / "out.parquet").column("score").to_pylist()
    assert exact == [float(r["content"].strip() == r["reference"]) for r in rows]


def test_scoring_problems_stop_the_run_before_sending(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = arithmetic_input(tmp_path, 3)
    with pytest.raises(UsageError, match="no reference column 'gold'"):
        run(config(tmp_path, gateway, source, score="exact", reference_column="gold"),
            handle_signals=False)
    with pytest.raises(UsageError, match="unknown metric"):
        run(config(tmp_path, gateway, source, score="exactly", reference_column="reference"),
            handle_signals=False)
    with pytest.raises(UsageError, match="--reference-column"):
        config(tmp_path, gateway, source, score="exact")
    assert gateway.stats.requests == 0


def test_cli_score_and_run_exit_2_before_sending(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RU_LLM_API_KEY", "OPENAI_API_KEY")}
    env["PYTHONPATH"] = str(REPO)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "batchrunner", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    out = tmp_path / "o.parquet"
    bad = cli("run", "-i", "sample_data/eval_arithmetic.jsonl", "-o", str(out), "-m", "gpt-4o",
              "--template", "{question}", "--local", "--score", "regex:(",
              "--reference-column", "reference")
    assert bad.returncode == 2 and "regular expression" in bad.stderr and "Traceback" not in bad.stderr
    assert not out.exists()
    missing = cli("run", "-i", "sample_data/eval_arithmetic.jsonl", "-o", str(out), "-m", "a",
                  "-m", "gpt-4o", "--template", "{question}", "--local", "--score", "numeric",
                  "--reference-column", "answer")
    assert missing.returncode == 2 and "no reference column 'answer'" in missing.stderr
    ok = cli("run", "-i", "sample_data/eval_arithmetic.jsonl", "-o", str(out), "-m", "gpt-4o",
             "-m", "gpt-4o-mini", "--template", "{question}", "--local", "--limit", "50",
             "--score", "numeric", "--reference-column", "reference", "-q")
    assert ok.returncode == 0, ok.stderr
    assert pq.read_table(out).num_rows == 100
    rescored = cli("score", str(out), "--metric", "exact", "--reference-column", "reference",
                   "-o", str(tmp_path / "exact.parquet"))
    assert rescored.returncode == 0 and "100 of 100 rows scored with exact" in rescored.stdout
    assert cli("score", str(out), "--metric", "python:nowhere_xyz:f",
               "--reference-column", "reference").returncode == 2
    compared = cli("compare", str(out), "--format", "json")
    assert compared.returncode == 0
    data = json.loads(compared.stdout)
    assert [g["group"] for g in data["groups"]] == list(MODELS)
    assert data["pairs"][0]["paired"] == 50
    summary = cli("summary", str(out))
    assert summary.returncode == 0 and "95% CI" in summary.stdout and "$/correct" in summary.stdout
    summary_json = json.loads(cli("summary", str(out), "--format", "json").stdout)
    assert [g["scored"] for g in summary_json["scores"]] == [50, 50, 100]
    as_csv = cli("summary", str(out), "--format", "csv")  # `> costs.csv`: one table a stream
    assert as_csv.returncode == 0, as_csv.stderr
    costs = pd.read_csv(io.StringIO(as_csv.stdout))
    assert list(costs["level"]) == ["group", "group", "total"] and costs["rows"].iloc[-1] == 100
    assert "scores (not in the CSV" in as_csv.stderr and "95% CI" in as_csv.stderr


# -- compare ------------------------------------------------------------------------------------


def results_file(path: Path, model: str, scores: dict[str, float | None]) -> Path:
    n = len(scores)
    pq.write_table(pa.table({
        "id": list(scores), "status": ["ok" if s is not None else "error" for s in scores.values()],
        "model": [model] * n, "score": pa.array(list(scores.values()), pa.float64()),
        "cost_usd": [0.01] * n, "total_tokens": pa.array([100] * n, pa.int64()),
        "latency_ms": [float(i) for i in range(n)],
    }), path)
    return path


def test_compare_pairs_by_id_and_leaves_out_one_sided_ids(tmp_path: Path) -> None:
    a = {f"q{i}": float(i % 3 != 0) for i in range(60)} | {"only-a": 1.0, "err": None}
    b = {f"q{i}": float(i % 4 == 0) for i in range(60)} | {"only-b1": 0.0, "only-b2": 1.0}
    report = compare([results_file(tmp_path / "a.parquet", "m-a", a),
                      results_file(tmp_path / "b.parquet", "m-b", b)])
    first, second = report.groups
    assert (first.key, first.rows, first.scored) == ("m-a", 62, 61)
    assert first.score.mean == pytest.approx(41 / 61)
    low, high = proportion_confint(41, 61, method="wilson")
    assert (first.score.low, first.score.high) == (pytest.approx(low), pytest.approx(high))
    assert first.cost_per_correct == pytest.approx(0.62 / 41)
    assert first.latency_p50_ms == pytest.approx(30.0)  # the error row's latency left out
    (pair,) = report.pairs
    assert (pair.paired, pair.only_a, pair.only_b) == (60, 1, 2)
    x = [a[f"q{i}"] for i in range(60)]
    y = [b[f"q{i}"] for i in range(60)]
    wins = sum(p > q for p, q in zip(x, y))
    losses = sum(p < q for p, q in zip(x, y))
    assert (pair.wins, pair.ties, pair.losses) == (wins, 60 - wins - losses, losses)
    assert pair.mcnemar_p == pytest.approx(
        mcnemar([[0, wins], [losses, 0]], exact=True).pvalue, rel=1e-9)
    assert pair.difference.mean == pytest.approx((sum(x) - sum(y)) / 60)
    assert "m-a vs m-b" in render_table(report)
    assert to_csv(report).splitlines()[0].startswith("level,group,other")


def test_compare_by_file_pairs_sweeps_by_id_and_model(tmp_path: Path) -> None:
    first = tmp_path / "t0.parquet"
    second = tmp_path / "t1.parquet"
    for path, offset in ((first, 0), (second, 1)):
        rows = {"id": [], "model": [], "score": []}
        for i in range(10):
            for j, m in enumerate(MODELS):
                rows["id"].append(f"q{i}")
                rows["model"].append(m)
                rows["score"].append(float((i + j + offset) % 2))
        pq.write_table(pa.table(rows), path)
    report = compare([first, second], by="file")
    (pair,) = report.pairs
    assert pair.paired == 20 and pair.ties == 0 and pair.wins == pair.losses == 10
    with pytest.raises(UsageError, match="no scores"):
        pq.write_table(pa.table({"id": ["a"], "model": ["m"]}), tmp_path / "plain.parquet")
        compare([tmp_path / "plain.parquet"])


# -- the simulator and the sample sets ----------------------------------------------------------


def test_the_simulator_answers_sample_questions_per_model_and_nothing_else() -> None:
    seed = b"seed"
    assert eval_answer("gpt-4o", "Explain DNS.", seed) is None
    assert eval_answer("gpt-4o", "What is 277 + 840?", seed) is None  # eval_questions' format
    mc = "What is 2 + 3?\nA) 4\nB) 5\nC) 6\nAnswer with the letter of the correct option."
    assert eval_answer("gpt-4o", mc, seed) == eval_answer("gpt-4o", mc, seed)
    right = {m: sum(batchrunner.answers.scoring.extract_choice(eval_answer(m, mc, b"%d" % i)) == "B"
                    for i in range(400)) for m in MODELS}
    assert 330 < right["gpt-4o"] <= 400 and 250 < right["gpt-4o-mini"] < 330


def test_nightly_eval_is_a_scored_two_model_sweep_with_different_accuracies(tmp_path: Path) -> None:
    job = batchrunner.build_config(batchrunner.load_job(REPO / "jobs/nightly-eval.toml"), {
        "local": True, "output": tmp_path / "nightly.parquet", "rpm": 1e6,
        "summary_json": tmp_path / "s.json", "deadline": "23h"})
    assert job.models == MODELS and job.score == "choice"
    report = run(job, handle_signals=False)
    assert report.exit_code == 0 and report.rows == 600
    comparison = compare([tmp_path / "nightly.parquet"])
    better, worse = comparison.groups
    assert better.score.high < 1 and worse.score.low > 0
    assert better.score.low > worse.score.high  # clearly apart
    assert comparison.pairs[0].mcnemar_p < 1e-3


# -- the DataFrame face ---------------------------------------------------------------------------


def test_run_takes_a_dataframe_and_read_results_keeps_the_types(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    frame = pd.DataFrame({"question": ["Calculate 2 + 2.", "Calculate 10 × 3."],
                          "reference": ["4", "30"]}, index=pd.Index([7, 9], name="id"))
    options = {"output": tmp_path / "df.parquet", "base_url": gateway.base_url,
               "model": "gpt-4o", "template": "{question}"}
    report = run(options, input=frame)
    assert report.exit_code == 0 and report.rows == 2
    results = read_results(str(tmp_path / "*.parquet"))
    assert results["id"].tolist() == ["0", "1"]  # the index is not an id unless named
    assert str(results["prompt_tokens"].dtype) == "Int64"
    assert str(results["attempts"].dtype) == "Int32"
    assert results["cost_usd"].dtype == "float64"
    assert "question" in results and len(results) == 2
    named = run({**options, "output": tmp_path / "named" / "df.parquet", "id_column": "id"},
                input=frame)
    assert named.exit_code == 0
    assert read_results(tmp_path / "named" / "df.parquet")["id"].tolist() == ["7", "9"]
    again = run(options, input=frame)  # the same frame resumes: nothing sent again
    assert again.resumed == 2 and gateway.stats.requests == 4


def test_estimate_counts_every_row_and_model_of_a_sweep(tmp_path: Path) -> None:
    source = arithmetic_input(tmp_path, 5, model_of={0: "gpt-4o"})
    sweep = RunConfig(input=source, output=tmp_path / "o.parquet", models=MODELS,
                      template="{question}")
    estimate = batchrunner.estimate(sweep, prices=batchrunner.PriceTable.load())
    assert estimate.rows == 9  # row 0 names its own model; the others go to both
    assert {m.model: m.rows for m in estimate.models} == {"gpt-4o": 5, "gpt-4o-mini": 4}


def test_run_works_where_an_event_loop_is_running_as_in_a_notebook(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    frame = pd.DataFrame({"prompt": ["Hello there", "Name a colour"]})

    async def cell() -> batchrunner.RunReport:  # a Jupyter cell runs inside the kernel's loop
        return run({"output": tmp_path / "nb.parquet", "base_url": gateway.base_url,
                    "model": "gpt-4o-mini"}, input=frame)

    report = asyncio.run(cell())
    assert report.exit_code == 0 and report.ok == 2


def test_a_scored_sweep_to_jsonl_compares_and_reads_back(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    base = config(tmp_path, gateway, arithmetic_input(tmp_path, 10), score="numeric",
                  reference_column="reference").replace(output=tmp_path / "out.jsonl")
    assert run(base, handle_signals=False).exit_code == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(r["score"] in (0.0, 1.0) for r in lines)
    report = compare([tmp_path / "out.jsonl"])
    assert [g.scored for g in report.groups] == [10, 10] and report.pairs[0].paired == 10
    assert len(read_results(tmp_path / "out.jsonl")) == 20
    sent = gateway.stats.requests
    assert run(base.replace(score="exact"), handle_signals=False).exit_code == 0  # re-scored
    assert gateway.stats.requests == sent
    rescored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rescored] == [float(r["content"].strip() == r["reference"])
                                             for r in rescored]


def test_a_dataframe_run_refused_before_sending_leaves_no_input_copy(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    frame = pd.DataFrame({"question": ["Calculate 2 + 2."]})
    options = {"output": tmp_path / "df.parquet", "base_url": gateway.base_url,
               "model": "gpt-4o", "template": "{nope}"}  # no such column: refused
    with pytest.raises(UsageError, match="nope"):
        run(options, input=frame)
    import asyncio

    with pytest.raises(UsageError, match="nope"):
        asyncio.run(batchrunner.arun(options, input=frame))
    assert not list(tmp_path.glob(".*input.parquet"))
    assert gateway.stats.requests == 0
    assert run({**options, "template": "{question}"}, input=frame).exit_code == 0
    assert list(tmp_path.glob(".*input.parquet"))  # kept: the run may be resumed
