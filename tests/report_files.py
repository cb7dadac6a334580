"""Result files as a run writes them (docs/output.md), and the independent sums the report tests check against."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner.config.pricing import BUILTIN_PRICES, ModelPrice
from batchrunner.reports import SummaryReport

# --- result files as a run writes them (docs/output.md) ------------------------------------

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
            if r.name == "batchrunner.config.pricing" and r.levelno == logging.WARNING]
