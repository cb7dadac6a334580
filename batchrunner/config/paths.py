"""Dated output paths: `{date}` and `{date:STRFTIME}` in an output path (docs/cron.md).

A nightly cron job writes a new file each night, and a re-run on the same day resumes that
day's file: the placeholders are replaced once, by the local date and time the run started,
when the config is made, so the checkpoint folder, the final file, the summary and `status`
all name the same resolved path.

    >>> expand_date(Path("out/eval-{date}.parquet"), now=datetime(2026, 12, 1, 1, 15))
    PosixPath('out/eval-2026-12-01.parquet')
    >>> expand_date(Path("out/{date:%Y%m%d-%H}.jsonl"), now=datetime(2026, 12, 1, 1, 15))
    PosixPath('out/20261201-01.jsonl')
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from batchrunner.errors import UsageError

__all__ = ["DEFAULT_DATE_FORMAT", "expand_date", "is_uri"]

#: What `{date}` alone stands for: the ISO date, 2026-12-01.
DEFAULT_DATE_FORMAT = "%Y-%m-%d"

_PLACEHOLDER = re.compile(r"\{date(?::([^{}]*))?\}")
_BRACES = re.compile(r"\{[^{}]*\}")


def expand_date(
    path: Path | str, *, now: datetime | None = None, what: str = "--output"
) -> Path | str:
    """`path` with `{date}` and `{date:STRFTIME}` replaced by `now` (default: local now).

    A Path gives a Path; text (an object-store URI such as `s3://bucket/{date}.parquet`, which
    a Path would fold) gives text.

    Any other `{...}` is a UsageError naming it: a mistyped `{data}` in a cron job must not
    write the same literal file every night.
    """
    text = str(path)
    if "{" not in text:
        return path
    moment = now if now is not None else datetime.now().astimezone()

    def replace(match: re.Match[str]) -> str:
        pattern = match.group(1)
        if pattern is not None and not pattern.strip():
            raise UsageError(
                f"{what} {text}: {{date:}} needs a strftime pattern, e.g. {{date:%Y%m%d}}"
            )
        rendered = moment.strftime(DEFAULT_DATE_FORMAT if pattern is None else pattern)
        if not rendered.strip() or "\x00" in rendered:
            raise UsageError(f"{what} {text}: {match.group(0)} gives an empty name")
        return rendered

    expanded = _PLACEHOLDER.sub(replace, text)
    leftover = _BRACES.search(expanded)
    if leftover is not None:
        raise UsageError(
            f"{what} {text}: unknown placeholder {leftover.group(0)}; "
            "an output path may hold {date} or {date:STRFTIME}, such as {date:%Y%m%d-%H}"
        )
    return expanded if isinstance(path, str) else Path(expanded)


def is_uri(path: str | os.PathLike[str] | None) -> bool:
    """True for `s3://bucket/key` and the like (a local path, or `file://`, is not one)."""
    if path is None:
        return False
    scheme = urlsplit(str(path)).scheme
    return len(scheme) > 1 and scheme != "file" and "://" in str(path)
