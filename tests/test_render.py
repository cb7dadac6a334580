"""Renderers of summaries: the table, JSON and CSV carry the same figures (docs/cost.md#summary)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from report_files import (
    UNKNOWN,
    two_files,
    unpriced_models,
)

from batchrunner.config.pricing import BUILTIN_PRICES, PriceTable
from batchrunner.reports.render import render_table, to_csv, to_json
from batchrunner.reports.summary import summarize


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
