"""Object-store inputs, outputs and checkpoints (docs/buckets.md) against moto's S3 server on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from batchrunner.config.settings import RunConfig
from batchrunner.engine import runner as engine
from batchrunner.inputs.storage import is_uri

VOLATILE = ["latency_ms", "ttft_ms", "response_id"]


def upload(s3: Any, path: str, text: str) -> None:
    """Put a small text object."""
    with s3.open_output_stream(path) as sink:
        sink.write(text.encode())


def _rows(n: int) -> str:
    return "".join(json.dumps({"id": f"r{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(n))


def _keys(s3: Any, prefix: str) -> list[str]:
    selector = fs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return sorted(i.path for i in s3.get_file_info(selector) if i.type == fs.FileType.File)


def test_uris_are_told_from_paths() -> None:
    assert is_uri("s3://bucket/key.parquet") and is_uri("gs://b/k.jsonl")
    assert not is_uri("out/results.parquet") and not is_uri("/abs/x.parquet")
    assert not is_uri("file:///tmp/x.parquet") and not is_uri("C:/data/x.csv")


def test_input_output_and_checkpoint_in_a_bucket(bucket: Any, tmp_path: Path) -> None:
    s3, name = bucket
    upload(s3, f"{name}/in/prompts.jsonl", _rows(40))
    config = RunConfig(
        input=f"s3://{name}/in/prompts.jsonl",  # type: ignore[arg-type]
        output=f"s3://{name}/out/results.parquet",  # type: ignore[arg-type]
        model="gpt-4o-mini", local=True,
    )
    report = engine.run(config, handle_signals=False)
    assert report.exit_code == 0 and report.ok == 40
    assert str(report.output) == f"s3://{name}/out/results.parquet"
    keys = _keys(s3, f"{name}/out")
    assert f"{name}/out/results.parquet" in keys
    assert f"{name}/out/results.parquet.checkpoint/manifest.json" in keys
    assert any("part-00001.arrows@" in k for k in keys)
    # The object is the output a local run writes.
    source = tmp_path / "prompts.jsonl"
    source.write_text(_rows(40))
    local = engine.run(
        RunConfig(input=source, output=tmp_path / "local.parquet", model="gpt-4o-mini", local=True),
        handle_signals=False,
    )
    assert local.exit_code == 0
    with s3.open_input_file(f"{name}/out/results.parquet") as f:
        remote = pq.read_table(f).drop_columns(VOLATILE)
    assert remote.to_pylist() == pq.read_table(tmp_path / "local.parquet").drop_columns(
        VOLATILE
    ).to_pylist()


def test_resume_from_the_bucket_on_another_machine(
    bucket: Any, gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3, name = bucket
    monkeypatch.setenv("BR_TEST_KEY", "sk-ru-storage-test")
    upload(s3, f"{name}/prompts.jsonl", _rows(300))
    config = RunConfig(
        input=f"s3://{name}/prompts.jsonl",  # type: ignore[arg-type]
        output=f"s3://{name}/nightly.parquet",  # type: ignore[arg-type]
        model="gpt-4o-mini", base_url=gateway.base_url, api_key_env="BR_TEST_KEY",
        params={"max_tokens": 40}, max_cost=0.0015, concurrency=4,
    )
    first = engine.run(config, handle_signals=False)
    assert first.exit_code == 5 and 0 < first.ok < 300
    # Stopped before the end: the checkpoint is in the bucket, the output object is not.
    keys = _keys(s3, name)
    assert f"{name}/nightly.parquet" not in keys
    assert f"{name}/nightly.parquet.checkpoint/manifest.json" in keys
    sent_before = gateway.stats.requests
    # Another machine: nothing staged locally; the bucket's checkpoint is all there is.
    monkeypatch.setenv("BATCHRUNNER_STAGING", str(tmp_path / "staging-b"))
    second = engine.run(config.replace(max_cost=1.0), handle_signals=False)
    assert second.exit_code == 0 and second.resumed == first.ok
    assert gateway.stats.requests - sent_before == 300 - first.ok
    with s3.open_input_file(f"{name}/nightly.parquet") as f:
        table = pq.read_table(f)
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(300)]
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_a_missing_input_object_is_a_usage_error(bucket: Any, tmp_path: Path) -> None:
    _, name = bucket
    config = RunConfig(
        input=f"s3://{name}/nothing.jsonl",  # type: ignore[arg-type]
        output=tmp_path / "o.parquet", model="gpt-4o-mini", local=True,
    )
    with pytest.raises(Exception) as caught:
        engine.run(config, handle_signals=False)
    assert getattr(caught.value, "exit_code", None) == 2
    assert f"s3://{name}/nothing.jsonl" in str(caught.value)


def test_the_cli_runs_on_and_reports_a_bucket(bucket: Any) -> None:
    from click.testing import CliRunner

    from batchrunner.cli.commands import main

    s3, name = bucket
    upload(s3, f"{name}/p.jsonl", _rows(5))
    out = f"s3://{name}/cli/out.parquet"
    done = CliRunner().invoke(
        main, ["run", "-i", f"s3://{name}/p.jsonl", "-o", out, "-m", "gpt-4o-mini", "--local"]
    )
    assert done.exit_code == 0, done.output
    status = CliRunner().invoke(main, ["status", out, "--format", "json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["done"] == 5
