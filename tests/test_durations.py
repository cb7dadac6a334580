"""The one duration grammar, shared by --deadline, cache prune --older-than and the simulator."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from batchrunner.cache.responses import parse_age
from batchrunner.config import settings as config
from batchrunner.config.durations import format_duration, parse_duration
from batchrunner.simulator import faults
from batchrunner.transport.headers import parse_reset
from batchrunner.transport.limits import parse_deadline


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45m", 2700.0), ("90s", 90.0), ("2h30m", 9000.0), ("1.5h", 5400.0), ("30d", 2592000.0),
        ("2w", 1209600.0), ("250ms", 0.25), ("6m0s", 360.0), ("1h2m3.5s", 3723.5),
        ("2H30M", 9000.0), (" 1 h 30 m ", 5400.0), ("1e3s", 1000.0), (".5h", 1800.0),
        ("0s", 0.0), ("7us", 7e-6), ("7µs", 7e-6), ("5ns", 5e-9),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "45", "m", "soon", "-5m", "1h-30m", "infd", "nans", "1e400s", "1s2", "5x", "1__0s"]
)
def test_parse_duration_rejects(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize("seconds", [0, 0.12, 1.5, 59.5, 60, 90.25, 3723.5])
def test_format_duration_reads_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-3)


def test_every_user_of_durations_shares_the_grammar() -> None:
    """The union of the old grammars: each caller now reads the others' spellings."""
    now = datetime(2024, 5, 1, 5, 0, 0)
    assert parse_deadline("2w", now) == now + timedelta(weeks=2)  # once only --older-than's
    assert parse_deadline("1e3s", now) == now + timedelta(seconds=1000)
    assert parse_age("2h30m") == 9000.0  # once only --deadline's
    assert parse_reset("1d") == 86400.0 and parse_reset("2d") is None  # the day cap stays
    assert faults.format_duration is format_duration
    assert config.parse_duration is parse_duration and config.format_duration is format_duration


def test_the_simulator_takes_only_the_grammar_from_the_package() -> None:
    """simulator/ imports nothing of the client side: of the package outside it, the base
    values and the duration grammar alone."""
    import ast
    from pathlib import Path

    folder = Path(faults.__file__).parent
    outside = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("batchrunner"):
                outside.add(node.module)
            elif isinstance(node, ast.Import):
                outside.update(a.name for a in node.names if a.name.startswith("batchrunner"))
    outside = {name for name in outside if not name.startswith("batchrunner.simulator")}
    assert outside <= {"batchrunner.config.durations", "batchrunner.errors"}, outside
    assert "batchrunner.config.durations" in outside
