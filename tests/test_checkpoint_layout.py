"""A checkpoint written before the `refusal` column existed still resumes: nothing resent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner import RunConfig, run


def test_segments_of_the_layout_before_refusal_are_read_with_a_null_refusal(
    tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", "sk-ru-layout-test-0123456789")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "r{i}", "prompt": "Say {i}."}}\n' for i in range(8)))
    config = RunConfig(input=source, output=tmp_path / "out.parquet", model="gpt-4o-mini",
                       base_url=gateway.base_url, concurrency=4)
    assert run(config, handle_signals=False).exit_code == 0
    first = pq.read_table(config.output).drop_columns(["refusal"])
    # Rewrite every segment as the previous release wrote it: no `refusal` column.
    segments = sorted((tmp_path / "out.parquet.checkpoint").glob("part-*.arrows"))
    assert segments
    for segment in segments:
        with pa.ipc.open_stream(segment.read_bytes()) as reader:
            table = reader.read_all().drop_columns(["refusal"])
        with pa.OSFile(str(segment), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    config.output.unlink()
    gateway.stats.reset()

    report = run(config, handle_signals=False)
    assert (report.exit_code, report.resumed, report.sent) == (0, 8, 0)
    assert gateway.stats.requests == 0
    again = pq.read_table(config.output)
    assert again.column("refusal").to_pylist() == [None] * 8
    assert again.drop_columns(["refusal"]).equals(first)
