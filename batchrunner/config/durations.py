"""The one duration grammar: "45m", "90s", "2h30m", "1.5h", "30d", "2w", "250ms", "6m0s".

A duration is one or more parts, each a number and a unit, summed: `2h30m` is 9000 seconds.
Units: `w`, `d`, `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`. Case and spaces do not matter; a number
is what Python's float() reads (`1.5`, `.5`, `1e3`, `+2`), never negative, NaN or infinite.

It is the union of the grammars the project had before: --deadline's (compound, d/h/m/s),
`cache prune --older-than`'s (one part, any float, also w) and the Go-style `x-ratelimit-reset-*`
values (ms, us, ns). Callers keep their own rules on top (a deadline is more than zero, a reset
at most a day) and their own error messages. `parse_deadline` adds the time of day. This module
imports only `errors` from the package, so the gateway simulator may use it without touching the
client side.

>>> parse_duration("2h30m"), parse_duration("soon")
(9000.0, None)
>>> format_duration(90.25)
'1m30.25s'
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

from batchrunner.errors import UsageError

__all__ = ["UNITS", "format_duration", "parse_deadline", "parse_duration"]

UNITS: dict[str, float] = {
    "w": 7 * 86400.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}

# A number is loose here (float() has the final word); "ms" is tried before "m".
_NUMBER = r"[+-]?[\d_.]+(?:e[+-]?[\d_]+)?"
_UNIT = r"ns|us|µs|ms|s|m|h|d|w"
_DURATION = re.compile(rf"(?:(?:{_NUMBER})(?:{_UNIT}))+")
_PART = re.compile(rf"({_NUMBER})({_UNIT})")
_SPACE = re.compile(r"\s+")


def parse_duration(text: str) -> float | None:
    """Seconds in a duration such as "2h30m" or "1.5h"; None if the text is not one.

    >>> parse_duration("1h2m3.5s"), parse_duration("250ms"), parse_duration("45")
    (3723.5, 0.25, None)
    """
    value = _SPACE.sub("", text.lower())
    if not _DURATION.fullmatch(value):
        return None
    seconds = 0.0
    for number, unit in _PART.findall(value):
        try:
            amount = float(number)
        except ValueError:
            return None
        if not 0 <= amount < math.inf:  # also rejects nan
            return None
        seconds += amount * UNITS[unit]
    return seconds if seconds < math.inf else None


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes `x-ratelimit-reset-*`: `120ms`, `1.5s`, `1m0s`.

    parse_duration reads back what this writes.
    """
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{math.ceil(rest * 1000) / 1000:g}s"


_LOCAL_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")


def parse_deadline(text: str, now: datetime) -> datetime:
    """When --deadline falls: a duration from now ("45m", "90s", "2h30m", "1.5h"), or a local
    time ("06:00", "6:00:30") meaning its next occurrence, today or tomorrow.

    >>> parse_deadline("06:00", datetime(2024, 5, 1, 23, 0))
    datetime.datetime(2024, 5, 2, 6, 0)
    """
    value = text.strip().lower().replace(" ", "")
    seconds = parse_duration(value)
    if seconds is not None:
        if seconds <= 0:
            raise UsageError(f"--deadline {text!r}: the duration must be more than zero")
        return now + timedelta(seconds=seconds)
    match = _LOCAL_TIME.fullmatch(value)
    if match:
        hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise UsageError(f"--deadline {text!r}: no such time of day")
        at = now.replace(hour=hour, minute=minute, second=second, microsecond=0)
        return at if at > now else at + timedelta(days=1)
    raise UsageError(
        f"--deadline {text!r}: expected a duration such as 45m, 90s or 2h30m, "
        "or a local time such as 06:00"
    )
