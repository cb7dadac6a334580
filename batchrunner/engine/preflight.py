"""Failing fast on the obvious: the models checked before the first request, the stop when
every answered row fails the same way, and the stop when the gateway is unreachable or down.

    check_models({"gpt-4o-mni"}, [{"id": "gpt-4o"}, {"id": "gpt-4o-mini"}])
    # UsageError: model 'gpt-4o-mni' is not one the gateway lists (GET /models);
    #             the closest: gpt-4o-mini, gpt-4o ...

    streak = FailureStreak(limit=20)
    for result in streak.observe(result, (404, "model_not_found")):
        record(result)           # what may be written now; the streak's rows are held back
    if streak.tripped: stop the run (exit 3); the held rows stay pending

    outage = Outage("http://127.0.0.1:1/v1")
    if outage.unreachable(error): stop the run (exit 3)   # each attempt with no connection
    outage.answered()                                       # each attempt the gateway answered
    if outage.hold(result): stop the run (exit 3)           # a row that got no answer at all
    for result in outage.release(): record(result)          # a row got an answer: they failed
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from batchrunner.clock import SYSTEM_CLOCK, Clock
from batchrunner.errors import GatewayUnreachable, UsageError


class Answered(Protocol):
    """What the streaks read of a row's result (a Result, or the recorder's held row)."""

    @property
    def ok(self) -> bool: ...

    @property
    def http_status(self) -> int | None: ...

    @property
    def error(self) -> str | None: ...


R = TypeVar("R", bound=Answered)

__all__ = [
    "OUTAGE_ROWS",
    "SYSTEMATIC_ROWS",
    "UNREACHABLE_ATTEMPTS",
    "UNREACHABLE_SECONDS",
    "UNREACHABLE_SECONDS_AT_START",
    "FailureKey",
    "FailureStreak",
    "Outage",
    "check_models",
    "closest_models",
]

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


class FailureStreak(Generic[R]):
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
        self._held: list[R] = []

    def observe(self, result: R, key: FailureKey | None) -> list[R]:
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

    def release(self) -> list[R]:
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


#: Rows in a row that got no answer at all after all their attempts (each attempt a timeout,
#: a connection that failed, or a 5xx): the gateway is down, the run stops (exit 3).
OUTAGE_ROWS = 20
#: No connection could be made on any attempt for this long, while the gateway has not
#: answered once in this run (a wrong URL or port, a gateway not started): it is unreachable.
UNREACHABLE_SECONDS_AT_START = 10.0
#: The same after the gateway has answered in this run: a restart is given longer.
UNREACHABLE_SECONDS = 30.0
#: ... and at least this many attempts in that time, so that one slow DNS lookup is not all.
UNREACHABLE_ATTEMPTS = 3

_UNREACHABLE_WORDS = {
    "refused": "refused every connection",
    "dns": "could not be found (its host name did not resolve)",
    "tls": "failed every TLS handshake",
    "connect": "could not be connected to",
}


class Outage(Generic[R]):
    """The gateway unreachable or down: when to stop sending, and the rows that stay pending.

    Two signs, either of which trips it (then the run sends nothing more and exits 3):

    - unreachable: every attempt since the gateway last answered found no connection
      (refused, DNS, TLS) for UNREACHABLE_SECONDS_AT_START before its first answer in this
      run, UNREACHABLE_SECONDS after one, with at least UNREACHABLE_ATTEMPTS attempts;
    - down: OUTAGE_ROWS rows in a row got no answer on any attempt (a timeout, a failed
      connection or a 5xx on each), with no answered row in between.

    Rows that got no answer are held back while the streak lasts: an answered row releases
    them (they failed, and are recorded so); a trip drops them, and every later one, so that
    they stay pending and running the same command again sends them.
    """

    def __init__(
        self,
        base_url: str,
        *,
        limit: int = OUTAGE_ROWS,
        clock: Clock = SYSTEM_CLOCK,
        windows: tuple[float, float] | None = None,
    ):
        """`windows`: the unreachable windows before and after a first answer (seconds), by
        default UNREACHABLE_SECONDS_AT_START and UNREACHABLE_SECONDS."""
        parts = urlsplit(base_url)
        host = parts.netloc.rpartition("@")[2]  # never a user:password
        self.url = f"{parts.scheme}://{host}{parts.path}" if host else base_url
        self.limit = limit
        self.clock = clock
        self._windows = windows or (UNREACHABLE_SECONDS_AT_START, UNREACHABLE_SECONDS)
        self.tripped = False
        self.cause: str | None = None  # the one line saying why, once tripped
        self.dropped = 0  # rows given no result because of the outage
        self._held: list[R] = []
        self._dropped: list[R] = []
        self._answered_once = False  # an attempt got an HTTP answer in this run
        self._since: float | None = None  # the first attempt with no connection since an answer
        self._attempts = 0  # attempts with no connection since then
        self._last_error: GatewayUnreachable | None = None

    # -- attempts ------------------------------------------------------------------------

    def answered(self) -> None:
        """An attempt that the gateway answered (any HTTP status): it is reachable."""
        self._answered_once = True
        self._since = None
        self._attempts = 0

    def unreachable(self, error: GatewayUnreachable) -> bool:
        """An attempt that found no connection; True when this trips the outage now."""
        if self._since is None:
            self._since = self.clock.monotonic()
        self._attempts += 1
        self._last_error = error
        return self.check()

    def check(self) -> bool:
        """True when no connection was found long enough: this trips the outage now."""
        if self.tripped or self._since is None or self._last_error is None:
            return False
        waited = self.clock.monotonic() - self._since
        if self._attempts < UNREACHABLE_ATTEMPTS or waited < self._window():
            return False
        error = self._last_error
        words = _UNREACHABLE_WORDS.get(error.cause, _UNREACHABLE_WORDS["connect"])
        detail = "" if error.cause == "refused" else f" ({error})"
        self._trip(f"the gateway at {self.url} {words} for {waited:.0f} s{detail}")
        return True

    def seconds_to_check(self) -> float | None:
        """When to `check` again for the window to end (None: no connection is failing)."""
        if self.tripped or self._since is None:
            return None
        return max(0.0, self._since + self._window() - self.clock.monotonic())

    def _window(self) -> float:
        return self._windows[1] if self._answered_once else self._windows[0]

    # -- rows ----------------------------------------------------------------------------

    def hold(self, result: R) -> bool:
        """A row that got no answer on any attempt; True when this trips the outage now."""
        if self.tripped:
            self.dropped += 1
            return False
        self._held.append(result)
        if len(self._held) < self.limit:
            return False
        self._trip(
            f"the gateway at {self.url} answered none of the last {len(self._held)} rows: "
            f"every attempt timed out, failed to connect or got a 5xx ({result.error})"
        )
        return True

    def release(self) -> list[R]:
        """A row got an answer: the held rows did fail; they are given back to be recorded."""
        released, self._held = self._held, []
        return released

    def take_dropped(self) -> list[R]:
        """The held rows the trip dropped (once): they get no result and stay pending."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def _trip(self, cause: str) -> None:
        self.tripped = True
        self.cause = cause
        self.dropped += len(self._held)
        self._dropped, self._held = self._held, []
