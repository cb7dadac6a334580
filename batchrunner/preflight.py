"""Failing fast on the obvious (SPEC section 6): the models checked before the first request,
and the stop when every answered row fails the same way.

    check_models({"gpt-4o-mni"}, [{"id": "gpt-4o"}, {"id": "gpt-4o-mini"}])
    # UsageError: model 'gpt-4o-mni' is not one the gateway lists (GET /models);
    #             the closest: gpt-4o-mini, gpt-4o ...

    streak = FailureStreak(limit=20)
    for result in streak.observe(result, (404, "model_not_found")):
        record(result)           # what may be written now; the streak's rows are held back
    if streak.tripped: stop the run (exit 3); the held rows stay pending
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import UsageError
from .results import Result

__all__ = ["SYSTEMATIC_ROWS", "FailureKey", "FailureStreak", "check_models", "closest_models"]

#: Answered rows in a row, all failed the same non-retryable way, that stop a run (exit 3).
SYSTEMATIC_ROWS = 20

#: (HTTP status, the gateway's error code) of a non-retryable failure.
FailureKey = tuple[int | None, str | None]


def closest_models(model: str, ids: Sequence[str], n: int = 3) -> list[str]:
    """The listed ids most like `model` (difflib's ratio, case-insensitive), best first."""
    lowered = {i.lower(): i for i in ids}
    close = difflib.get_close_matches(model.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[c] for c in close]


def check_models(models: Iterable[str], listed: Sequence[dict[str, Any]]) -> None:
    """Raise UsageError (exit 2) for the first of `models` that `listed` (GET /models) lacks.

    A gateway that lists no model at all says nothing about what it serves: no error.
    """
    ids = [str(m["id"]) for m in listed if isinstance(m, dict) and m.get("id") is not None]
    if not ids:
        return
    known = set(ids)
    for model in sorted(set(models)):
        if model in known:
            continue
        close = closest_models(model, ids)
        hint = (
            f"the closest: {', '.join(close)}" if close
            else f"it lists {len(ids)} models (batchrunner models shows them)"
        )
        raise UsageError(
            f"model {model!r} is not one the gateway lists (GET /models); {hint}. "
            "Nothing was sent; --no-preflight skips this check"
        )


class FailureStreak:
    """Answered rows that failed the same non-retryable way, held back while they last.

    A streak is broken by any other answered row (ok, or failed another way); its held rows are
    then given back to be recorded. Rows with no answer (a connection that failed, a timeout)
    neither extend nor break it. When a streak reaches `limit` rows it trips: its rows are
    dropped (they stay pending, so running again sends them), as is every later row failing
    the same way, and the run is to stop sending.
    """

    def __init__(self, limit: int = SYSTEMATIC_ROWS) -> None:
        self.limit = limit
        self.key: FailureKey | None = None
        self.example: str | None = None  # the error of the streak's first row
        self.count = 0  # rows of the tripped streak, those that came back after it included
        self.tripped = False
        self._held: list[Result] = []

    def observe(self, result: Result, key: FailureKey | None) -> list[Result]:
        """Take one answered row's result (`key` set for a non-retryable failure); return the
        results that may be recorded now."""
        if self.tripped:
            if key is not None and key == self.key:
                self.count += 1
                return []
            return [result]
        if key is None:
            if not result.ok and result.http_status is None:
                return [result]  # no answer came back: says nothing about the streak
            released, self._held, self.key = self._held, [], None
            return [*released, result]
        if key != self.key:
            released, self._held, self.key = self._held, [result], key
            return released
        self._held.append(result)
        if len(self._held) >= self.limit:
            self.tripped = True
            self.count = len(self._held)
            self.example = self._held[0].error
            self._held = []
        return []

    def release(self) -> list[Result]:
        """The held results of an untripped streak (the run ends or stops for another reason)."""
        released, self._held = self._held, []
        return released

    def error(self) -> str:
        """The streak's error: the first row's message and the gateway's code."""
        status, code = self.key or (None, None)
        example = self.example or f"HTTP {status}"
        return f"{example} (code {code})" if code else example

    def describe(self) -> str:
        """The stop message of a tripped streak."""
        rows = f"{self.count:,} answered row{'s' if self.count != 1 else ''}"
        return (
            f"stopped early: {rows} in a row failed the same way: {self.error()}. "
            "They are not recorded: fix the cause and run the same command again to send them"
        )
