"""`--param KEY=JSON` takes JSON only (docs/run.md; issue 12, point 4)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchrunner.cli.commands import main
from batchrunner.config.jobs import build_config, param_value
from batchrunner.errors import UsageError
from batchrunner.store.checkpoint import checkpoint_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, value", [
    ("7", 7), ('"batch-7"', "batch-7"), ('["\\n"]', ["\n"]), ("true", True), ("null", None),
    ('{"type": "json_object"}', {"type": "json_object"}), ("0.5", 0.5),
])
def test_json_values_are_taken_as_json(text: str, value: object) -> None:
    assert param_value("k", text) == value


@pytest.mark.parametrize("text, hint", [
    ("batch-7", """a string needs JSON quotes inside the shell's: --param 'user="batch-7"'"""),
    ("{type:json}", "keys and strings need double quotes"),
    ("", "a string needs JSON quotes"),
])
def test_a_value_that_is_not_json_is_a_usage_error_with_a_hint(text: str, hint: str) -> None:
    with pytest.raises(UsageError, match="is not JSON") as caught:
        param_value("user", text)
    assert hint in str(caught.value)


def run_cli(tmp_path: Path, *params: str):  # type: ignore[no-untyped-def]
    out = tmp_path / "out.parquet"
    args = ["run", "-i", str(REPO / "sample_data" / "prompts.jsonl"), "-o", str(out),
            "-m", "gpt-4o-mini", "--local", "--limit", "2", "-q"]
    for param in params:
        args += ["--param", param]
    return CliRunner().invoke(main, args), out


def test_the_command_line_refuses_a_bare_word_before_sending(tmp_path: Path) -> None:
    result, out = run_cli(tmp_path, "response_format={type:json}")
    assert result.exit_code == 2
    assert "--param response_format: '{type:json}' is not JSON" in result.output
    assert not checkpoint_dir(out).exists()  # nothing started


def test_an_object_param_is_sent_as_an_object(tmp_path: Path) -> None:
    result, out = run_cli(tmp_path, 'response_format={"type":"json_object"}', 'user="batch-7"')
    assert result.exit_code == 0, result.output
    manifest = json.loads((checkpoint_dir(out) / "manifest.json").read_text())
    params = manifest["fingerprint"]["settings"]["params"]
    assert params["response_format"] == {"type": "json_object"} and params["user"] == "batch-7"


def test_an_unknown_param_field_warns_as_in_a_job_file(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        config = build_config(None, {"input": Path("i.jsonl"), "output": Path("o.parquet"),
                                     "params": {"temprature": 0.5, "x_gateway_tag": "a"}})
    assert config.params["temprature"] == 0.5  # sent as is: gateways add their own fields
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["--param temprature is sent as is; did you mean `temperature`?"]
