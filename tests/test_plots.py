"""Charts of summaries (docs/cost.md#summary): drawn, labelled, folded, and the errors."""

from __future__ import annotations

import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from report_files import (
    PNG_SIGNATURE,
    make_rows,
    write_results,
)

from batchrunner.config.pricing import PriceTable
from batchrunner.errors import UsageError
from batchrunner.reports.plots import plot_summary

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
    with pytest.raises(UsageError, match="cannot write"):
        plot_summary([path], tmp_path / "no-such-dir" / "x.png")
