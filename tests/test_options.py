"""The one description of each `run` option drives the CLI, the job keys and RunConfig."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import batchrunner.config.options as options_module
from batchrunner.cli.commands import main
from batchrunner.config.jobs import JOB_KEYS, REQUEST_KEYS, load_job
from batchrunner.config.options import OPTION_BY_NAME, OPTIONS
from batchrunner.config.settings import RunConfig, resolve_base_url
from batchrunner.errors import UsageError

FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def test_every_option_is_a_runconfig_field_or_a_request_field_and_back() -> None:
    fields = {o.name for o in OPTIONS if not o.request}
    assert fields == FIELDS
    assert {o.name for o in OPTIONS if o.request} == REQUEST_KEYS
    assert JOB_KEYS == {o.name for o in OPTIONS if o.job}


@pytest.mark.parametrize("command", ["run", "estimate"])
def test_the_commands_options_are_the_tables(command: str) -> None:
    names = {p.name for p in main.commands[command].params if p.name != "job"}
    names -= {"calibrate", "fmt"}  # estimate's own, not run options
    wanted = {o.dest or o.name for o in OPTIONS if o.flags and command in o.commands}
    assert names == wanted


def test_the_table_does_not_import_click() -> None:
    tree = ast.parse(Path(options_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "click" for name in imported)


def test_a_job_file_and_the_environment_share_one_base_url_rule(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('base_url = "http://:8080/v1"\n')  # a scheme but no host
    with pytest.raises(UsageError) as refused:
        load_job(job)
    with pytest.raises(UsageError) as refused_env:
        resolve_base_url(None, {"RU_LLM_BASE_URL": "http://:8080/v1"})
    assert str(refused.value).endswith("`base_url` must be an http:// or https:// URL with a host")
    assert str(refused_env.value) == (
        "$RU_LLM_BASE_URL must be an http:// or https:// URL with a host"
    )
    job.write_text('base_url = "HTTPS://gateway.example/v1/"\n')
    assert resolve_base_url(load_job(job)["base_url"]) == "HTTPS://gateway.example/v1"


def test_runconfig_checks_its_fields_with_the_options_checks(tmp_path: Path) -> None:
    paths = {"input": tmp_path / "in.jsonl", "output": tmp_path / "o.parquet"}
    with pytest.raises(UsageError, match=r"^--concurrency must be at least 1, not 0$"):
        RunConfig(**paths, concurrency=0)
    with pytest.raises(UsageError, match=r"^--deadline must be a duration"):
        RunConfig(**paths, deadline="soon")
    with pytest.raises(UsageError, match=r"^--cache-mode must be one of read-write"):
        RunConfig(**paths, cache_mode="sometimes")
    assert RunConfig(**paths, rpm=600, timeout=30).rpm == 600  # ints are numbers


def test_invocation_only_options_are_named_as_flags_in_a_job_file(tmp_path: Path) -> None:
    assert not OPTION_BY_NAME["restart"].job and OPTION_BY_NAME["restart"].flags
    job = tmp_path / "job.toml"
    job.write_text("retry_failed = true\n")
    with pytest.raises(UsageError, match="give --retry-failed on the command line"):
        load_job(job)


def test_an_endpoint_is_named_by_its_base_url_without_credentials_or_query() -> None:
    from batchrunner.config.endpoints import Endpoint, endpoint_name

    assert endpoint_name("https://user:secret@gw.example.com:8443/v1/?api-version=2024-06-01"
                         "&api-key=sk-123#x") == "https://gw.example.com:8443/v1"
    assert endpoint_name(" http://127.0.0.1:8000/v1 ") == "http://127.0.0.1:8000/v1"
    assert endpoint_name("http://[::1]:9000/v1") == "http://[::1]:9000/v1"
    assert Endpoint("https://k@a.example/v1?key=1").name == "https://a.example/v1"
