"""Summaries, plots and estimates (SPEC section 9), checked against independent computations."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import struct
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner.config import RunConfig
from batchrunner.errors import InputError, UsageError
from batchrunner.pricing import BUILTIN_PRICES, ModelPrice, PriceTable
from batchrunner.reports import (
    SummaryReport,
    estimate,
    estimate_to_json,
    plot_summary,
    render_estimate,
    render_table,
    summarize,
    summarize_days,
    to_csv,
    to_json,
)

# --- result files as SPEC section 7 writes them ---------------------------------------------

RESULT_TYPES: dict[str, pa.DataType] = {
    "status": pa.string(),
    "content": pa.string(),
    "choices": pa.list_(pa.string()),
    "finish_reason": pa.string(),
    "model": pa.string(),
    "response_model": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "total_tokens": pa.int64(),
    "cached_tokens": pa.int64(),
    "cost_usd": pa.float64(),
    "attempts": pa.int32(),
    "latency_ms": pa.float64(),
    "ttft_ms": pa.float64(),
    "http_status": pa.int32(),
    "error": pa.string(),
    "response_id": pa.string(),
}
CARRIED_TYPES: dict[str, pa.DataType] = {
    "prompt": pa.string(),
    "topic": pa.string(),
    "level": pa.int64(),
}
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-20241022", "claude-3-5-haiku-20241022"]
UNKNOWN = "mystery-model-1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_results(path: Path, rows: list[dict[str, Any]],
                  carried: dict[str, pa.DataType] | None = None) -> Path:
    """A result file: id, the carried input columns, then the result columns."""
    carried = CARRIED_TYPES if carried is None else carried
    types = {"id": pa.string(), **carried, **RESULT_TYPES}
    table = pa.table({name: pa.array([r.get(name) for r in rows], type=t)
                      for name, t in types.items()})
    pq.write_table(table, path)
    return path


def file_cost(row: dict[str, Any]) -> float | None:
    """What the run wrote into cost_usd: the built-in price, null where it has none."""
    price = BUILTIN_PRICES.get(row["model"]) if row["model"] else None
    if price is None or row.get("prompt_tokens") is None or row.get("completion_tokens") is None:
        return None
    return reference_cost(price, row["prompt_tokens"], row["completion_tokens"],
                          row["cached_tokens"] or 0)


def reference_cost(price: ModelPrice, prompt: int, completion: int, cached: int) -> float:
    return ((prompt - cached) * price.input + cached * price.cached_input
            + completion * price.output) / 1_000_000


def make_rows(n: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """Realistic rows: ok rows with usage (some cache hits), failed requests without usage,
    input errors without a model, an unpriced model, usage with a missing completion count."""
    rng = np.random.default_rng(seed)
    topics = ["math", "law", "bio", None]
    rows = []
    for i in range(start, start + n):
        kind = rng.random()
        model = MODELS[int(rng.integers(len(MODELS)))] if rng.random() > 0.08 else UNKNOWN
        row: dict[str, Any] = {
            "id": f"r{i}",
            "prompt": f"question {i}",
            "topic": topics[int(rng.integers(len(topics)))],
            "level": int(rng.integers(1, 4)),
            "model": model,
            "attempts": 1,
        }
        if kind < 0.80:  # answered
            prompt = int(rng.integers(5, 3000))
            completion = int(rng.integers(0, 600))
            cached = int(rng.integers(0, prompt)) if rng.random() < 0.3 else (
                0 if rng.random() < 0.5 else None)
            missing_completion = rng.random() < 0.02
            row.update(
                status="ok", content="answer", choices=["answer"], finish_reason="stop",
                response_model=model, prompt_tokens=prompt,
                completion_tokens=None if missing_completion else completion,
                total_tokens=prompt + (0 if missing_completion else completion),
                cached_tokens=cached, latency_ms=float(rng.gamma(2.0, 300.0)),
                http_status=200, response_id=f"chatcmpl-{i}",
            )
            if rng.random() < 0.01:
                row["latency_ms"] = None
        elif kind < 0.92:  # the gateway failed: no usage, nothing to pay
            row.update(status="error", http_status=500, error="server error",
                       latency_ms=float(rng.gamma(2.0, 100.0)), attempts=6)
        else:  # an input error: no request, no model
            row.update(status="error", model=None, attempts=0, error="input: row: prompt is null")
        row["cost_usd"] = file_cost(row)
        rows.append(row)
    return rows


def expected_groups(rows: list[dict[str, Any]], key: str,
                    prices: dict[str, ModelPrice] | None) -> dict[Any, dict[str, Any]]:
    """Every figure of a summary, computed row by row in plain Python."""
    out: dict[Any, dict[str, Any]] = defaultdict(lambda: defaultdict(float))
    latencies: dict[Any, list[float]] = defaultdict(list)

    def add(group: Any, row: dict[str, Any]) -> None:
        g = out[group]
        g["rows"] += 1
        g["ok"] += row["status"] == "ok"
        g["errors"] += row["status"] != "ok"
        for name in ("prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens"):
            g[name] += row.get(name) or 0
        billable = any(row.get(n) is not None for n in
                       ("prompt_tokens", "completion_tokens", "total_tokens"))
        if prices is None:
            cost = row["cost_usd"]
        else:
            price = prices.get(row["model"]) if row["model"] else None
            cost = None
            if price and row.get("prompt_tokens") is not None and \
                    row.get("completion_tokens") is not None:
                cost = reference_cost(price, row["prompt_tokens"], row["completion_tokens"],
                                      row.get("cached_tokens") or 0)
        if cost is not None:
            g["cost_usd_known"] += cost
        elif billable:
            g["unpriced_rows"] += 1
        if row["status"] == "ok" and row.get("latency_ms") is not None:
            latencies[group].append(row["latency_ms"])

    for row in rows:
        add(row.get(key), row)
        add("__total__", row)
    result = {}
    for group, g in out.items():
        lat = latencies[group]
        result[group] = {
            **{k: int(v) for k, v in g.items() if k != "cost_usd_known"},
            "cost_usd_known": g["cost_usd_known"],
            "unpriced_rows": int(g["unpriced_rows"]),
            "latency_p50_ms": float(np.percentile(lat, 50)) if lat else None,
            "latency_p95_ms": float(np.percentile(lat, 95)) if lat else None,
        }
    return result


def unpriced_models(rows: list[dict[str, Any]], prices: dict[str, ModelPrice]) -> set[Any]:
    """Models of rows with usage whose cost cannot be computed."""
    return {
        r["model"] for r in rows
        if r.get("prompt_tokens") is not None
        and (r["model"] not in prices or r.get("completion_tokens") is None)
    }


def check_report(report: SummaryReport, rows: list[dict[str, Any]], key: str,
                 prices: dict[str, ModelPrice] | None) -> None:
    expected = expected_groups(rows, key, prices)
    total = expected.pop("__total__")
    assert {g.key for g in report.groups} == set(expected)
    for g in [*report.groups, report.total]:
        want = total if g is report.total else expected[g.key]
        for name in ("rows", "ok", "errors", "prompt_tokens", "cached_tokens",
                     "completion_tokens", "total_tokens", "unpriced_rows"):
            assert getattr(g, name) == want[name], (g.key, name)
        assert g.cost_usd_known == pytest.approx(want["cost_usd_known"], rel=1e-9, abs=1e-12)
        if want["unpriced_rows"]:
            assert g.cost_usd is None, g.key  # never a silently low figure
        else:
            assert g.cost_usd == pytest.approx(want["cost_usd_known"], rel=1e-9, abs=1e-12)
        for name in ("latency_p50_ms", "latency_p95_ms"):
            if want[name] is None:
                assert getattr(g, name) is None
            else:
                assert getattr(g, name) == pytest.approx(want[name], rel=1e-12)


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    a = make_rows(700, seed=1)
    b = make_rows(500, seed=2, start=700)
    paths = [write_results(tmp_path / "run-a.parquet", a),
             write_results(tmp_path / "run-b.parquet", b)]
    return a + b, paths


def pricing_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "batchrunner.pricing" and r.levelno == logging.WARNING]


# --- summarize ---------------------------------------------------------------------------------


def test_summary_recomputes_costs_from_usage_and_prices(
    two_files: tuple[list[dict[str, Any]], list[Path]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="batchrunner.pricing")
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


def parse_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = text.splitlines()
    header = lines[0].split()
    body: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line.strip():
            break
        if set(line.replace(" ", "")) == {"-"}:
            continue
        cells = line.split()
        body[cells[0]] = cells[1:]
    return header, body


def number(cell: str) -> float | None:
    if cell in ("-", "?"):
        return None
    return float(cell.removeprefix(">=").replace(",", ""))


def test_json_and_csv_carry_the_figures_of_the_table(
    two_files: tuple[list[dict[str, Any]], list[Path]],
) -> None:
    rows, paths = two_files
    report = summarize(paths, by="topic", prices=PriceTable.load())
    header, table = parse_table(render_table(report))
    assert header == ["topic", "rows", "ok", "errors", "prompt", "cached", "completion",
                      "total", "cost_usd", "unpriced", "p50_ms", "p95_ms"]
    data = json.loads(to_json(report))
    csv_rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert len(csv_rows) == len(data["groups"]) + 1 == len(table)
    assert csv_rows[-1]["level"] == "total"

    fields = ["rows", "ok", "errors", "prompt_tokens", "cached_tokens", "completion_tokens",
              "total_tokens", "cost_usd", "unpriced_rows", "latency_p50_ms", "latency_p95_ms"]
    groups = [*data["groups"], {**data["total"], "key": "TOTAL"}]
    for group, csv_row in zip(groups, csv_rows, strict=True):
        label = "(null)" if group["key"] is None else group["key"]
        cells = table[label]
        assert csv_row["topic"] == ("" if group["key"] in (None, "TOTAL") else group["key"])
        for name, cell in zip(fields, cells, strict=True):
            value = group[name]
            if name == "cost_usd":
                if value is None:  # unknown: the table shows the known part as a lower bound
                    assert cell.startswith(">=") or cell == "?"
                    value = group["cost_usd_known"] if cell != "?" else None
                shown = number(cell)
                assert shown == pytest.approx(value, abs=5e-7)
            elif name.startswith("latency"):
                shown = number(cell)
                assert (shown is None) == (value is None)
                if value is not None:
                    assert shown == pytest.approx(value, abs=0.05 + 1e-9)
            else:
                assert number(cell) == value
            # CSV: the same figures at full precision, empty where unknown
            raw = csv_row[name]
            if value is None or (name == "cost_usd" and group["cost_usd"] is None):
                assert raw == ""
            else:
                assert float(raw) == pytest.approx(group[name], rel=1e-15)
        assert float(csv_row["cost_usd_known"]) == pytest.approx(group["cost_usd_known"],
                                                                rel=1e-15)
    assert data["by"] == "topic"
    assert set(data["unpriced_models"]) == unpriced_models(rows, dict(BUILTIN_PRICES))


def test_table_notes_say_where_costs_come_from_and_what_is_unpriced(
    two_files: tuple[list[dict[str, Any]], list[Path]],
) -> None:
    _, paths = two_files
    text = render_table(summarize(paths))
    assert "cost_usd column of the result files" in text
    assert UNKNOWN in text and "rows reported usage but have no cost" in text
    lines = text.splitlines()
    assert len({len(line) for line in lines[:3]}) == 1  # aligned


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


# --- plot --------------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_drawn(path: Path) -> None:
    """A real chart: a PNG of some size with many colours, not a blank canvas."""
    import matplotlib.image

    assert path.stat().st_size > 20_000
    pixels = matplotlib.image.imread(path)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 50
    assert float(pixels[..., :3].std()) > 0.05


def test_plot_per_model_and_per_day(tmp_path: Path) -> None:
    a = write_results(tmp_path / "a.parquet", make_rows(300, 1))
    b = write_results(tmp_path / "b.parquet", make_rows(300, 2, start=300))
    one_day = tmp_path / "one-day.png"
    assert plot_summary([a, b], one_day, prices=PriceTable.load()) == one_day
    assert_drawn(one_day)
    os.utime(a, (1_764_000_000,) * 2)
    os.utime(b, (1_764_000_000 + 86_400,) * 2)
    two_days = tmp_path / "two-days.png"
    plot_summary([tmp_path / "*.parquet"], two_days)
    assert_drawn(two_days)
    (w1, h1), (w2, h2) = png_size(one_day), png_size(two_days)
    assert w1 == w2 and h2 > 1.8 * h1  # a second row of charts: per day
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_labels_in_any_script_and_with_dollars(tmp_path: Path) -> None:
    rows = make_rows(100, 5)
    for i, row in enumerate(rows):
        row["topic"] = ["数学", "$5 deals $", "право", "x" * 80][i % 4]
    path = write_results(tmp_path / "r.parquet", rows)
    out = tmp_path / "topics.png"
    plot_summary([path], out, by="topic")  # filterwarnings=error: no stray warning escapes
    assert_drawn(out)


def test_plot_many_groups_fold_into_others(tmp_path: Path) -> None:
    rows = make_rows(200, 6)
    path = write_results(tmp_path / "r.parquet", rows)
    out = tmp_path / "ids.png"
    plot_summary([path], out, by="id")
    assert_drawn(out)


def test_plot_without_matplotlib_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_results(tmp_path / "r.parquet", make_rows(10, 1))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UsageError, match=re.escape("pip install 'batchrunner[plot]'")):
        plot_summary([path], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_to_an_unwritable_place(tmp_path: Path) -> None:
    path = write_results(tmp_path / "r.parquet", make_rows(10, 1))
    with pytest.raises(UsageError, match="cannot write the plot"):
        plot_summary([path], tmp_path / "no-such-dir" / "x.png")


# --- estimate ----------------------------------------------------------------------------------

TRUE_TOKEN = re.compile(r"\w{1,4}|[^\w\s]")  # the "real" tokenizer of the generated dataset
SYSTEM = "You are a careful assistant. Answer briefly."
MAX_TOKENS = 256


def true_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return 3 + sum(4 + len(TRUE_TOKEN.findall(m["content"])) for m in messages)


def generated_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, int(rng.integers(2, 11)))) for _ in range(500)]
    prompts = []
    for _ in range(n):
        words = rng.choice(vocab, int(rng.integers(5, 150)))
        prompts.append(" ".join(words) + "?")
    return prompts


def true_completions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    return np.minimum(rng.gamma(3.0, 30.0, n).astype(int) + 1, MAX_TOKENS)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def finished_run(path: Path, prompts: list[str], completions: np.ndarray,
                 model: str = "gpt-4o", system: str | None = SYSTEM) -> Path:
    """Results of a run of `prompts` (input columns id and prompt carried), usage true."""
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        p = true_prompt_tokens(messages)
        rows.append({
            "id": f"c{i}", "input_id": f"c{i}", "prompt": prompt, "status": "ok",
            "model": model, "prompt_tokens": p, "completion_tokens": int(completion),
            "total_tokens": p + int(completion), "cached_tokens": 0, "latency_ms": 100.0,
        })
    rows.append({"id": "bad", "input_id": "bad", "prompt": "x", "status": "error",
                 "model": model, "error": "server error"})  # ignored: no usage
    carried = {"input_id": pa.string(), "prompt": pa.string()}
    return write_results(path, rows, carried=carried)


def width(r: Any) -> float:
    return r.high - r.low


def test_estimate_contains_the_truth_and_calibration_narrows_it(tmp_path: Path) -> None:
    n = 1500
    prompts = generated_prompts(n, seed=1)
    completions = true_completions(n, seed=1)
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"id": f"q{i}", "prompt": p} for i, p in enumerate(prompts)])
    config = RunConfig(input=source, output=tmp_path / "out.parquet", model="gpt-4o",
                       system=SYSTEM, params={"max_tokens": MAX_TOKENS, "temperature": 0})
    truth_prompt = sum(true_prompt_tokens([{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": p}]) for p in prompts)
    truth_completion = int(completions.sum())
    price = BUILTIN_PRICES["gpt-4o"]
    truth_cost = reference_cost(price, truth_prompt, truth_completion, 0)

    prices = PriceTable.load()
    rough = estimate(config, prices=prices)
    assert rough.rows == rough.rows_to_send == n and rough.input_errors == 0
    assert rough.calibration is None
    assert rough.prompt_tokens.low <= truth_prompt <= rough.prompt_tokens.high
    assert rough.completion_tokens.low == n  # one token a row at least
    assert rough.completion_tokens.high == n * MAX_TOKENS
    assert rough.completion_tokens.expected is None  # nothing to say where, before calibrating
    assert rough.completion_tokens.low <= truth_completion <= rough.completion_tokens.high
    assert rough.cost_usd is not None
    assert rough.cost_usd.low <= truth_cost <= rough.cost_usd.high
    # The cost bounds are the table's prices applied to the token bounds.
    assert rough.cost_usd.low == pytest.approx(reference_cost(
        price, rough.prompt_tokens.low, rough.completion_tokens.low, 0))
    assert rough.cost_usd.high == pytest.approx(reference_cost(
        price, rough.prompt_tokens.high, rough.completion_tokens.high, 0))

    # Calibrate on another run of prompts of the same kind.
    other = finished_run(tmp_path / "earlier.parquet", generated_prompts(800, seed=2),
                         true_completions(800, seed=2))
    tight = estimate(config, prices=prices, calibrate=[other])
    assert tight.calibration is not None and tight.calibration.rows == 800
    for name, truth in (("prompt_tokens", truth_prompt), ("completion_tokens", truth_completion),
                        ("cost_usd", truth_cost)):
        calibrated, uncalibrated = getattr(tight, name), getattr(rough, name)
        assert calibrated.low <= truth <= calibrated.high, name
        assert width(calibrated) < 0.5 * width(uncalibrated), name
        assert calibrated.expected == pytest.approx(truth, rel=0.06), name


def test_estimate_input_errors_unpriced_models_and_no_max_tokens(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "prompt": "Hello there, how are you?"}),
        json.dumps({"id": "b", "prompt": ""}),  # an input error: not sent
        "{not json",  # an input error too
        json.dumps({"id": "c", "prompt": "Price me", "model": "mystery-9"}),
        json.dumps({"id": "d", "messages": [{"role": "user", "content": "Hi"}]}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o-mini",
                       messages_column="messages", prompt_column="prompt")
    est = estimate(config, prices=PriceTable.load())
    assert (est.rows, est.rows_to_send, est.input_errors) == (5, 3, 2)
    assert est.unpriced_rows == 1 and est.unpriced_models == ("mystery-9",)
    assert est.cost_usd is None  # unknown, not silently low
    assert est.cost_usd_known.low > 0 and est.cost_usd_known.high is None
    assert est.completion_tokens.high is None and est.unbounded_rows == 3
    # The documented rule: characters / 4 + 4 a message + 3 a request.
    chars = len("Hello there, how are you?") + len("Price me") + len("Hi")
    assert est.chars == chars and est.messages == 3
    assert est.prompt_tokens.expected == round(chars / 4 + 4 * 3 + 3 * 3)
    text = render_estimate(est)
    assert "no bound" in text and "no price" in text and "2 with input errors" in text
    data = json.loads(estimate_to_json(est))
    assert data["cost_usd"] is None and data["unpriced_models"] == ["mystery-9"]
    assert data["prompt_tokens"]["expected"] == est.prompt_tokens.expected
    assert {m["model"] for m in data["models"]} == {"gpt-4o-mini", "mystery-9"}
    assert json.loads(to_json(est)) == data


def test_estimate_counts_choices_and_respects_limit(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"prompt": f"question number {i}"} for i in range(50)])
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o",
                       params={"max_tokens": 10, "n": 3}, limit=20)
    est = estimate(config, prices=PriceTable.load())
    assert est.rows == 20
    assert est.completion_tokens.low == 20 * 3 and est.completion_tokens.high == 20 * 3 * 10


def test_calibration_with_a_template_job_and_a_renamed_model_column(tmp_path: Path) -> None:
    questions = generated_prompts(300, seed=7)
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"question": q, "model": "gpt-4o-mini"} for q in questions])
    config = RunConfig(input=source, output=tmp_path / "o.parquet", template="Q: {question}",
                       params={"max_tokens": 100})
    rows = []
    for i, q in enumerate(questions[:200]):
        p = true_prompt_tokens([{"role": "user", "content": f"Q: {q}"}])
        rows.append({"id": str(i), "question": q, "input_model": "gpt-4o-mini",
                     "model": "gpt-4o-mini", "status": "ok", "prompt_tokens": p,
                     "completion_tokens": 40, "total_tokens": p + 40, "cached_tokens": p // 4})
    cal = write_results(tmp_path / "cal.parquet", rows,
                        carried={"question": pa.string(), "input_model": pa.string()})
    est = estimate(config, prices=PriceTable.load(), calibrate=[cal])
    assert est.calibration is not None
    truth = sum(true_prompt_tokens([{"role": "user", "content": f"Q: {q}"}]) for q in questions)
    assert est.prompt_tokens.low <= truth <= est.prompt_tokens.high
    assert est.completion_tokens.expected == 300 * 40
    assert est.calibration.cached_fraction == pytest.approx(0.25, abs=0.01)
    # cached prompt tokens lower the expected cost; the high bound assumes no cache hit
    price = BUILTIN_PRICES["gpt-4o-mini"]
    f = est.calibration.cached_fraction
    assert est.cost_usd is not None
    assert est.cost_usd.expected == pytest.approx(reference_cost(
        price, est.prompt_tokens.expected, est.completion_tokens.expected,
        est.prompt_tokens.expected * f))
    assert "calibrated on 200 rows" in render_estimate(est)


def test_calibration_files_that_cannot_be_used(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o")
    no_prompts = write_results(tmp_path / "np.parquet", make_rows(5, 1), carried={})
    with pytest.raises(UsageError, match="neither the input columns"):
        estimate(config, prices=PriceTable.load(), calibrate=[no_prompts])
    all_failed = write_results(tmp_path / "failed.parquet",
                               [{"id": "1", "prompt": "x", "status": "error", "model": "gpt-4o"}])
    with pytest.raises(UsageError, match="no ok row"):
        estimate(config, prices=PriceTable.load(), calibrate=[all_failed])
    with pytest.raises(UsageError, match="nothing-here"):
        estimate(config, prices=PriceTable.load(), calibrate=[tmp_path / "nothing-here*"])


def test_estimate_of_an_unusable_input_is_an_input_error(tmp_path: Path) -> None:
    config = RunConfig(input=tmp_path / "absent.jsonl", output=tmp_path / "o.parquet",
                       model="gpt-4o")
    with pytest.raises(InputError):
        estimate(config, prices=PriceTable.load())

