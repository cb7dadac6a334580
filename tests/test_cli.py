"""The command line as a user runs it: help, exit codes, logs, the summary file, the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrunner.cli.commands import main

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-ru-LEAKCANARY-7d1e5f3a9c2b4d6e8f0a1b3c5d7e9f"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RU_LLM_API_KEY", "OPENAI_API_KEY", "RU_LLM_BASE_URL",
                             "OPENAI_BASE_URL")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "batchrunner", *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"batchrunner {command}" in result.output


def test_the_readme_quick_start_job_runs_locally(tmp_path: Path) -> None:
    out = tmp_path / "quick.parquet"
    done = cli("run", "-i", "sample_data/prompts.jsonl", "-o", str(out), "-m", "gpt-4o-mini",
               "--local")
    assert done.returncode == 0, done.stderr
    assert "done" in done.stderr and str(out) in done.stderr
    assert pq.read_table(out).num_rows == 50


def test_logs_are_plain_lines_when_stderr_is_not_a_terminal(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(latency_ms=30)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n"
                              for i in range(400)))
    out = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    done = cli("run", "-i", str(source), "-o", str(out), "-m", "gpt-4o", "--base-url",
               gw.base_url, "-c", "4", "--summary-json", str(summary),
               env={"RU_LLM_API_KEY": SECRET, "BATCHRUNNER_LOG_SECONDS": "0.5"})
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr  # no bar, no terminal codes
    progress = [line for line in done.stderr.splitlines() if "rows/s" in line]
    assert progress, done.stderr
    assert all(line.startswith("batchrunner: INFO:") for line in progress)
    figures = json.loads(summary.read_text())
    table = pq.read_table(out)
    assert figures["exit_code"] == 0 and figures["rows"] == 400 and figures["ok"] == 400
    assert figures["total_tokens"] == sum(table.column("total_tokens").to_pylist())
    assert figures["cost_usd"] == pytest.approx(sum(table.column("cost_usd").to_pylist()))
    assert figures["output"] == str(out)


def test_json_logs_are_one_object_a_line(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(20)))
    done = cli("run", "-i", str(source), "-o", str(tmp_path / "o.parquet"), "-m", "gpt-4o",
               "--base-url", gateway.base_url, "--log-format", "json",
               env={"RU_LLM_API_KEY": SECRET})
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    final = records[-1]
    assert final["message"] == "summary" and final["exit_code"] == 0 and final["ok"] == 20


def test_quiet_prints_only_the_summary(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(20)))
    done = cli("run", "-i", str(source), "-o", str(tmp_path / "o.parquet"), "-m", "gpt-4o",
               "--base-url", gateway.base_url, "--quiet", env={"RU_LLM_API_KEY": SECRET})
    assert done.returncode == 0
    assert done.stderr.startswith("batchrunner: done") and "INFO" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "missing.jsonl"], "missing.jsonl"),
        (["-i", "sample_data/prompts.jsonl", "--template", "Q: {question}"], "question"),
        (["-i", "sample_data/prompts.jsonl", "--prompt-column", "text"], "text"),
        (["-i", "sample_data/prompts.txt"], "prompts.txt"),
    ],
    ids=["missing-file", "template-column", "prompt-column", "unknown-format"],
)
def test_input_errors_exit_2_with_one_line(tmp_path: Path, gateway, args: list[str],  # type: ignore[no-untyped-def]
                                           message: str) -> None:
    done = cli("run", *args, "-o", str(tmp_path / "o.parquet"), "-m", "gpt-4o",
               "--base-url", gateway.base_url, env={"RU_LLM_API_KEY": SECRET})
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert gateway.stats.requests == 0


def test_no_key_is_a_usage_error_naming_the_variables(tmp_path: Path) -> None:
    done = cli("run", "-i", "sample_data/prompts.jsonl", "-o", str(tmp_path / "o.parquet"),
               "-m", "gpt-4o")
    assert done.returncode == 2 and "RU_LLM_API_KEY" in done.stderr


def test_validate(tmp_path: Path) -> None:
    assert cli("validate", "jobs/nightly-eval.toml").returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('input = "../nowhere.jsonl"\noutput = "o.parquet"\nmodel = "gpt-4o"\n')
    done = cli("validate", str(bad))
    assert done.returncode == 2 and "nowhere.jsonl" in done.stderr


def _validate_job(folder: Path, lines: list[str], model: str = "gpt-4o-mini",
                  extra: str = "") -> Path:
    (folder / "in.jsonl").write_text("".join(line + "\n" for line in lines))
    job = folder / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out.parquet"\nmodel = "{model}"\n{extra}')
    return job


def test_validate_is_a_dry_run_that_checks_models_rows_and_estimates(
    tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", SECRET)
    good = [json.dumps({"id": i, "prompt": f"q{i}"}) for i in range(5)]
    url = ["--base-url", gateway.base_url]
    ok = CliRunner().invoke(main, ["validate", str(_validate_job(tmp_path, good)), *url])
    assert ok.exit_code == 0, ok.output
    assert "gpt-4o-mini: listed by the gateway" in ok.output and "5 rows" in ok.output
    assert "cost (USD)" in ok.output  # the estimate
    # an unknown model: exit 2, as run's pre-flight
    misspelt = _validate_job(tmp_path, good, "gpt-4o-mni")
    unknown = CliRunner().invoke(main, ["validate", str(misspelt), *url])
    assert unknown.exit_code == 2 and "'gpt-4o-mni' is not one the gateway lists" in unknown.output
    # problem rows: counted, the first shown with their lines, exit 2
    bad = [*good, "not json", json.dumps({"id": "e", "prompt": ""}), *["{"] * 7]
    problems = CliRunner().invoke(main, ["validate", str(_validate_job(tmp_path, bad)), *url])
    assert problems.exit_code == 2, problems.output
    assert "problem rows: 9" in problems.output and "line 6: not valid JSON" in problems.output
    assert "line 7: prompt is empty" in problems.output
    assert "9 input rows of 14 cannot be sent" in problems.output
    assert gateway.stats.requests == 0  # no chat completion asked for, in any of them
    assert not (tmp_path / "out.parquet").exists()


def test_validate_warns_where_the_gateway_cannot_say(tmp_path: Path) -> None:
    job = _validate_job(tmp_path, [json.dumps({"id": 1, "prompt": "q"})])
    down = cli("validate", str(job), "--base-url", "http://127.0.0.1:1/v1",
               env={"RU_LLM_API_KEY": SECRET})
    assert down.returncode == 0, down.stderr
    assert "not checked: GET /models did not answer" in down.stdout
    keyless = cli("validate", str(job))
    assert keyless.returncode == 0 and "not checked: no API key" in keyless.stdout
    local = cli("validate", str(_validate_job(tmp_path, [json.dumps({"prompt": "q"})],
                                              "gpt-4o-mni")), "--local")
    assert local.returncode == 2 and "'gpt-4o-mni' is not one the gateway lists" in local.stderr


def test_the_key_never_appears_in_any_file_or_output(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    """Every path a key could leak through: results, checkpoint, summary, logs, errors."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"q{i}"}) + "\n" for i in range(30))
                      + "not json\n")
    flaky = start_gateway(error_rate=0.3, drop_rate=0.1, fault_seed=2)
    refusing = start_gateway(keys=("sk-ru-some-other-key",))
    env = {"RU_LLM_API_KEY": SECRET}
    printed = []
    runs = [
        ("run", "-i", str(source), "-o", str(tmp_path / "a.parquet"), "-m", "gpt-4o",
         "--base-url", flaky.base_url, "--summary-json", str(tmp_path / "a.json"),
         "--max-attempts", "2"),
        ("run", "-i", str(source), "-o", str(tmp_path / "b.parquet"), "-m", "gpt-4o",
         "--base-url", flaky.base_url, "--log-format", "json", "--stream"),
        ("run", "-i", str(source), "-o", str(tmp_path / "c.parquet"), "-m", "gpt-4o",
         "--base-url", refusing.base_url, "--summary-json", str(tmp_path / "c.json")),
        ("run", "-i", str(source), "-o", str(tmp_path / "d.parquet"), "-m", "gpt-4o",
         "--base-url", "http://127.0.0.1:9/v1", "--max-attempts", "1", "--timeout", "2"),
        ("models", "--base-url", refusing.base_url),
        ("status", str(tmp_path / "a.parquet")),
        ("summary", str(tmp_path / "a.parquet"), "--format", "json"),
    ]
    codes = []
    for args in runs:
        done = cli(*args, env=env)
        codes.append(done.returncode)
        printed.append(done.stdout + done.stderr)
    # the runs: rows failed, rows failed, key refused, no gateway (an outage: exit 3); then
    # `models` refused (4), and `status` and `summary` of the first output
    assert codes == [1, 1, 4, 3, 4, 0, 0], printed
    assert all("Traceback" not in text for text in printed)
    for text in printed:
        assert SECRET not in text
        assert SECRET[10:30] not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 6
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data, f"the key leaked into {path}"


def test_a_key_with_its_newline_works_and_a_broken_key_is_named_not_shown(
    tmp_path: Path, gateway
) -> None:  # type: ignore[no-untyped-def]
    args = ("run", "-i", "sample_data/prompts.jsonl", "-m", "gpt-4o", "--limit", "2",
            "--base-url", gateway.base_url)
    pasted = cli(*args, "-o", str(tmp_path / "a.parquet"), env={"RU_LLM_API_KEY": SECRET + "\n"})
    assert pasted.returncode == 0, pasted.stderr
    broken = SECRET[:20] + "\r\nX-Injected: 1"
    refused = cli(*args, "-o", str(tmp_path / "b.parquet"), env={"RU_LLM_API_KEY": broken})
    assert refused.returncode == 2
    assert "$RU_LLM_API_KEY holds characters an HTTP header cannot carry" in refused.stderr
    assert SECRET[:20] not in refused.stderr + refused.stdout
    assert gateway.stats.requests == 2


def test_a_base_url_that_is_not_http_is_a_usage_error_that_does_not_echo_it(tmp_path: Path) -> None:
    url = "ftp://user:sk-ru-in-a-url@gateway.example/v1"
    env = {"RU_LLM_API_KEY": SECRET}
    models = cli("models", "--base-url", url, env=env)
    run = cli("run", "-i", "sample_data/prompts.jsonl", "-o", str(tmp_path / "o.parquet"),
              "-m", "gpt-4o", env={**env, "RU_LLM_BASE_URL": "gateway.example/v1"})
    assert (models.returncode, run.returncode) == (2, 2)
    assert "--base-url must be an http:// or https:// URL" in models.stderr
    assert "$RU_LLM_BASE_URL must be an http:// or https:// URL" in run.stderr
    for done in (models, run):
        assert "Traceback" not in done.stderr and "sk-ru-in-a-url" not in done.stderr


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.toml")))
def test_every_job_file_runs_against_the_simulator(tmp_path: Path, gateway, job: str) -> None:  # type: ignore[no-untyped-def]
    """Each example job, as written, with only its endpoint, output and pace redirected."""
    out = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    done = cli("run", f"jobs/{job}", "-o", str(out), "--summary-json", str(summary),
               "--base-url", gateway.base_url, "--rpm", "1000000", "--tpm", "1e12",
               "--deadline", "1h",
               env={"RU_LLM_API_KEY": SECRET})
    assert done.returncode == 0, done.stderr
    figures = json.loads(summary.read_text())
    table = pq.read_table(out)
    assert figures["rows"] == table.num_rows == figures["ok"] > 0
    if "local" not in job:
        assert gateway.stats.requests == table.num_rows
    assert cli("validate", f"jobs/{job}").returncode == 0


def test_an_unwritable_summary_json_is_refused_before_sending(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "prompt": "q"}) + "\n")
    (tmp_path / "file").write_text("in the way")
    for target in (tmp_path / "file" / "summary.json", tmp_path / "file" / "deep" / "s.json"):
        done = cli("run", "-i", str(source), "-o", str(tmp_path / "o.parquet"), "-m", "gpt-4o",
                   "--base-url", gateway.base_url, "--summary-json", str(target),
                   env={"RU_LLM_API_KEY": SECRET})
        assert done.returncode == 2, done.stderr
        assert f"--summary-json {target}" in done.stderr and "Traceback" not in done.stderr
    assert gateway.stats.requests == 0 and not (tmp_path / "o.parquet").exists()


def test_an_empty_input_says_so_and_exits_0(tmp_path: Path) -> None:
    source = tmp_path / "empty.jsonl"
    source.write_text("")
    done = cli("run", "-i", str(source), "-o", str(tmp_path / "o.parquet"), "-m", "gpt-4o",
               "--local", "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"{source}: the input has no rows" in done.stderr
    assert (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_summary_reads_jsonl_and_csv_outputs(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"o{suffix}"
    done = cli("run", "-i", "sample_data/prompts.jsonl", "-o", str(out), "-m", "gpt-4o-mini",
               "--local", "--limit", "7", "--quiet")
    assert done.returncode == 0, done.stderr
    shown = cli("summary", str(out), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    figures = json.loads(shown.stdout)
    assert figures["total"]["rows"] == 7 and figures["total"]["ok"] == 7
    assert figures["total"]["prompt_tokens"] > 0 and figures["total"]["cost_usd"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--endpoint", "https://a.example/v1", "--endpoint", "https://b.example/v1",
      "--api-key-env", "KEY_A"], "2 --endpoint and 1 --api-key-env"),
    (["--endpoint", "not-a-url"], "--endpoint #1 must be an http:// or https:// URL"),
    (["--endpoint", "https://a.example/v1", "--endpoint", "https://a.example/v1/"],
     "are the same endpoint (https://a.example/v1)"),
    (["--endpoint", "https://a.example/v1", "--local"], "--local runs against the built-in"),
    (["--endpoint", "https://a.example/v1", "--base-url", "https://b.example/v1"],
     "--base-url and --endpoint"),
    (["--engine", "batch", "--stream"], "--stream does not apply to --engine batch"),
    (["--engine", "batch", "--endpoint", "https://a.example/v1", "--endpoint",
      "https://b.example/v1"], "--engine batch sends to one endpoint"),
    (["--order", "random"], "'random' is not one of 'prefix', 'input'"),
])
def test_run_refuses_endpoints_and_engines_that_make_no_sense(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, ["run", "-i", "sample_data/prompts.jsonl", "-o",
                                       str(tmp_path / "o.parquet"), "-m", "gpt-4o", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.parquet").exists()


def test_api_key_env_repeated_without_endpoint_is_the_several_keys_form(tmp_path: Path) -> None:
    from batchrunner.cli.group import _overrides

    kwargs = {"param": (), "input_": Path("a.jsonl"), "model": (), "stop": (),
              "endpoint": (), "api_key_env": ("KEY_A", "KEY_B")}
    assert _overrides(dict(kwargs))["api_key_env"] == "KEY_A,KEY_B"
    one = _overrides({**kwargs, "api_key_env": ("KEY_A",)})
    assert one["api_key_env"] == "KEY_A" and "endpoints" not in one


def test_validate_checks_every_endpoint_s_key_variable(tmp_path: Path) -> None:
    job = _validate_job(tmp_path, [json.dumps({"id": 1, "prompt": "q"})], extra=(
        'endpoints = [{ base_url = "http://127.0.0.1:1/v1", api_key_env = "BR_KEY_A" },\n'
        '             { base_url = "http://127.0.0.1:2/v1", api_key_env = "BR_KEY_B" }]\n'))
    missing = CliRunner().invoke(main, ["validate", str(job)], env={"BR_KEY_A": SECRET,
                                                                     "BR_KEY_B": ""})
    assert missing.exit_code == 0, missing.output
    assert "not checked: no API key: `endpoints` [1] (http://127.0.0.1:2/v1) names BR_KEY_B" \
        in missing.output
    both = CliRunner().invoke(main, ["validate", str(job)], env={"BR_KEY_A": SECRET,
                                                                  "BR_KEY_B": SECRET})
    assert both.exit_code == 0 and "2 endpoints: the run's pre-flight checks each" in both.output
    assert SECRET not in missing.output + both.output
