"""Summaries (docs/cost.md#summary), checked against independent computations."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_files import (
    UNKNOWN,
    check_report,
    make_rows,
    pricing_warnings,
    two_files,
    unpriced_models,
    write_results,
)

from batchrunner.config.pricing import BUILTIN_PRICES, ModelPrice, PriceTable
from batchrunner.errors import UsageError
from batchrunner.reports.render import render_table, to_json
from batchrunner.reports.summary import summarize, summarize_days

# --- summarize ---------------------------------------------------------------------------------


def test_summary_recomputes_costs_from_usage_and_prices(
    two_files: tuple[list[dict[str, Any]], list[Path]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="batchrunner.config.pricing")
    rows, _ = two_files
    report = summarize([tmp_path / "run-*.parquet"], prices=PriceTable.load())
    check_report(report, rows, "model", dict(BUILTIN_PRICES))
    assert report.cost_source == "prices" and report.prices_as_of == "2026-11-25"
    assert set(report.unpriced_models) == unpriced_models(rows, dict(BUILTIN_PRICES))
    assert UNKNOWN in report.unpriced_models
    by_key = {g.key: g for g in report.groups}
    assert by_key[UNKNOWN].cost_usd is None and by_key[UNKNOWN].cost_usd_known == 0
    assert by_key[None].rows > 0 and by_key[None].unpriced_rows == 0  # input errors cost nothing
    # one warning for the unpriced model, over two files and many rows
    warned = pricing_warnings(caplog)
    assert len(warned) == 1 and UNKNOWN in warned[0]
    assert report.total.cost_usd is None


def test_summary_sums_the_files_costs_without_prices(
    two_files: tuple[list[dict[str, Any]], list[Path]],
) -> None:
    rows, paths = two_files
    report = summarize(paths)
    check_report(report, rows, "model", None)
    assert report.cost_source == "files" and report.prices_as_of is None


def test_prices_recompute_with_an_override_file(
    two_files: tuple[list[dict[str, Any]], list[Path]], tmp_path: Path,
) -> None:
    rows, paths = two_files
    toml = tmp_path / "prices.toml"
    toml.write_text(
        f'[models."gpt-4o"]\ninput = 5.0\ncached_input = 0.5\noutput = 20.0\n'
        f'[models."{UNKNOWN}"]\ninput = 1.0\noutput = 2.0\n'
    )
    table = PriceTable.load(toml)
    prices = {**BUILTIN_PRICES, "gpt-4o": ModelPrice(5.0, 0.5, 20.0),
              UNKNOWN: ModelPrice(1.0, 1.0, 2.0)}
    report = summarize(paths, prices=table)
    check_report(report, rows, "model", prices)
    assert report.prices_file == str(toml)
    from_files = {g.key: g for g in summarize(paths).groups}
    recomputed = {g.key: g for g in report.groups}
    assert recomputed["gpt-4o"].cost_usd_known != pytest.approx(
        from_files["gpt-4o"].cost_usd_known)
    assert recomputed["gpt-4o-mini"].cost_usd_known == pytest.approx(
        from_files["gpt-4o-mini"].cost_usd_known)
    assert "overlaid by" in render_table(report)


@pytest.mark.parametrize("column", ["topic", "level", "status"])
def test_summary_by_any_column(
    two_files: tuple[list[dict[str, Any]], list[Path]], column: str,
) -> None:
    rows, paths = two_files
    report = summarize(paths, by=column, prices=PriceTable.load())
    check_report(report, rows, column, dict(BUILTIN_PRICES))
    if column == "level":  # integer keys stay integers
        assert {g.key for g in report.groups} == {1, 2, 3}
    assert report.by == column


def test_missing_by_column_names_it_and_the_file(tmp_path: Path) -> None:
    write_results(tmp_path / "with.parquet", make_rows(10, 1))
    without = write_results(tmp_path / "without.parquet", make_rows(10, 2), carried={})
    summarize([tmp_path / "with.parquet"], by="topic")
    with pytest.raises(UsageError) as info:
        summarize([tmp_path / "*.parquet"], by="topic")
    assert "'topic'" in str(info.value) and str(without) in str(info.value)


def test_globs_folders_and_paths_that_match_nothing(tmp_path: Path) -> None:
    rows = []
    for i in range(3):
        part = make_rows(50, seed=10 + i, start=50 * i)
        rows += part
        write_results(tmp_path / f"part-{i}.parquet", part)
    (tmp_path / "notes.txt").write_text("not a result file")
    everything = summarize([tmp_path / "part-*.parquet"])
    assert everything.total.rows == 150 and len(everything.files) == 3
    # a file matched twice is read once; a folder gives its Parquet files
    again = summarize([tmp_path / "part-*.parquet", tmp_path / "part-0.parquet"])
    assert again.total == everything.total
    assert summarize([tmp_path]).total == everything.total
    check_report(everything, rows, "model", None)
    for bad in ([tmp_path / "nothing-*.parquet"], [tmp_path / "absent.parquet"]):
        with pytest.raises(UsageError, match=re.escape(str(bad[0]))):
            summarize(bad)
    with pytest.raises(UsageError, match="notes.txt"):
        summarize([tmp_path / "notes.txt"])


def test_a_file_without_result_columns_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "input.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), path)
    with pytest.raises(UsageError, match="input.parquet.*'model'"):
        summarize([path])


def test_an_empty_result_file(tmp_path: Path) -> None:
    path = write_results(tmp_path / "empty.parquet", [])
    report = summarize([path], prices=PriceTable.load())
    assert report.groups == () and report.total.rows == 0 and report.total.cost_usd == 0
    assert report.total.latency_p50_ms is None
    assert "TOTAL" in render_table(report)
    json.loads(to_json(report))


def test_days_from_file_mtimes_and_created_columns(tmp_path: Path) -> None:
    day1, day2 = 1_764_000_000, 1_764_000_000 + 2 * 86_400  # 2025-11-24, 2025-11-26 (UTC)
    a = write_results(tmp_path / "a.parquet", make_rows(40, 1))
    b = write_results(tmp_path / "b.parquet", make_rows(60, 2, start=40))
    os.utime(a, (day1, day1))
    os.utime(b, (day2, day2))
    report = summarize_days([a, b])
    assert [(g.key, g.rows) for g in report.groups] == [("2025-11-24", 40), ("2025-11-26", 60)]
    assert report.by == "day"
    # A created column wins over the mtime where it is set.
    rows = make_rows(30, 3)
    table = pq.read_table(write_results(tmp_path / "c.parquet", rows))
    created = pa.array([day1] * 10 + [day2] * 10 + [None] * 10, type=pa.int64())
    pq.write_table(table.append_column("created", created), tmp_path / "c.parquet")
    os.utime(tmp_path / "c.parquet", (day2 + 86_400,) * 2)
    report = summarize_days([tmp_path / "c.parquet"])
    assert [(g.key, g.rows) for g in report.groups] == [
        ("2025-11-24", 10), ("2025-11-26", 10), ("2025-11-27", 10)]


# --- the prompt cache's saving and the rows paid at batch prices --------------------------------


def _usage_row(i: int, model: str, prompt: int, cached: int, completion: int,
               batch_id: str | None = None, *, batch: bool = False) -> dict[str, Any]:
    price = BUILTIN_PRICES.get(model)
    cost = None if price is None else price.cost(prompt, completion, cached, batch=batch)
    row = {"id": str(i), "model": model, "status": "ok", "prompt_tokens": prompt,
           "cached_tokens": cached, "completion_tokens": completion,
           "total_tokens": prompt + completion, "cost_usd": cost, "latency_ms": 10.0,
           "error": None}
    if batch_id is not None or batch:
        row["batch_id"] = batch_id
    return row


def _write(path: Path, rows: list[dict[str, Any]], batch_column: bool) -> Path:
    types = {"id": pa.string(), "model": pa.string(), "status": pa.string(),
             "prompt_tokens": pa.int64(), "cached_tokens": pa.int64(),
             "completion_tokens": pa.int64(), "total_tokens": pa.int64(),
             "cost_usd": pa.float64(), "latency_ms": pa.float64(), "error": pa.string()}
    if batch_column:
        types["batch_id"] = pa.string()
    pq.write_table(pa.table({n: pa.array([r.get(n) for r in rows], type=t)
                             for n, t in types.items()}), path)
    return path


def test_summary_says_the_cached_share_and_what_the_cache_saved(tmp_path: Path) -> None:
    rows = [_usage_row(0, "gpt-4o", 2000, 0, 100), _usage_row(1, "gpt-4o", 2000, 1536, 100),
            _usage_row(2, "gpt-4o-mini", 1500, 1024, 50)]
    path = _write(tmp_path / "old.parquet", rows, batch_column=False)  # an older output
    full = BUILTIN_PRICES["gpt-4o"]
    mini = BUILTIN_PRICES["gpt-4o-mini"]
    # the cached tokens priced in full, less what was paid for them
    saved = ((1536 * full.input - 1536 * full.cached_input)
             + (1024 * mini.input - 1024 * mini.cached_input)) / 1e6
    for prices in (None, PriceTable.load()):
        report = summarize([path], prices=prices)
        assert report.total.cached_share == pytest.approx(2560 / 5500)
        assert report.total.cache_saving_usd == pytest.approx(saved)
        assert report.total.batch_rows == 0
        by_model = {g.key: g for g in report.groups}
        assert by_model["gpt-4o"].cache_saving_usd == pytest.approx(1536 * 1.25 / 1e6)
    text = render_table(report)
    assert f"prompt cache: 46.5% of prompt tokens were cached (2,560), which saved ${saved:,.6f}" \
        in text
    assert "Batch API" not in text
    data = json.loads(to_json(report))
    assert data["total"]["cached_share"] == pytest.approx(2560 / 5500)
    assert data["total"]["cache_saving_usd"] == pytest.approx(saved)
    from batchrunner.reports.render import to_csv

    header, *_ = to_csv(report).splitlines()
    assert "cache_saving_usd" in header and "batch_rows" in header


def test_rows_with_a_batch_id_are_priced_at_batch_prices(tmp_path: Path) -> None:
    rows = [_usage_row(0, "gpt-4o", 2000, 1024, 100),
            _usage_row(1, "gpt-4o", 2000, 1024, 100, "batch_abc", batch=True),
            _usage_row(2, "gpt-4o", 2000, 0, 100, None)]  # a null batch_id: online
    path = _write(tmp_path / "mixed.parquet", rows, batch_column=True)
    price = BUILTIN_PRICES["gpt-4o"]
    online = price.cost(2000, 100, 1024) + price.cost(2000, 100, 0)
    in_batch = price.cost(2000, 100, 1024, batch=True)
    report = summarize([path], prices=PriceTable.load())
    assert report.total.batch_rows == 1
    assert report.total.cost_usd == pytest.approx(online + in_batch)
    assert summarize([path]).total.cost_usd == pytest.approx(online + in_batch)  # the files'
    # the batch row's cached tokens saved the batch prices' difference
    assert report.total.cache_saving_usd == pytest.approx(
        price.cache_saving(1024) + price.cache_saving(1024, batch=True))
    text = render_table(report)
    assert "1 row answered through the Batch API (its batch_id is set), priced at batch prices" \
        in text


def test_a_saving_that_cannot_be_priced_is_unknown(tmp_path: Path) -> None:
    rows = [_usage_row(0, "house-model", 2000, 1024, 100)]
    report = summarize([_write(tmp_path / "r.parquet", rows, batch_column=False)])
    assert report.total.cache_saving_usd is None
    assert "an unknown sum" in render_table(report)


def test_a_result_says_its_endpoint_and_batch_and_is_online_by_default() -> None:
    from batchrunner.results import Result

    online = Result(0, "a", "ok", "gpt-4o")
    assert online.endpoint is None and online.batch_id is None
    batched = Result(0, "a", "ok", "gpt-4o", endpoint="https://gw.example/v1", batch_id="batch_1")
    assert (batched.endpoint, batched.batch_id) == ("https://gw.example/v1", "batch_1")
    assert batched != online
