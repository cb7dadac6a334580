"""The order of sending: rows that share a cacheable prompt prefix sent together (docs/cost.md).

A gateway caches a prompt's prefix once a request carrying it has been answered, for a few
minutes. `PrefixOrder` reorders the rows a dispatcher takes so that the discount is not lost:
within a window of rows read ahead, rows are grouped by the hash of their request's cacheable
prefix (`inputs/prefixes.py`); the first row of a group is sent alone, and the rest of the
group as soon as it is answered, one after another, so that the group stays close in time.
Rows too short to be cached, and rows of a group already answered, go at once. Only the order
of sending changes: every row is sent once, and the output is in input order as always.

Rows are read only as a row is wanted: until one may be sent, parking on the way the rows
whose group waits for its first answer. Memory: the parked rows (at most the window,
`WINDOW_PER_WORKER` per unit of concurrency and at least `MIN_WINDOW`) and one small entry
per group recently seen (at most `MAX_GROUPS`). A job whose prompts are too short to be
cached is sent in input order, reading no row ahead.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable

from batchrunner.results import Result, Row

__all__ = ["MAX_GROUPS", "MIN_WINDOW", "PrefixOrder", "WINDOW_PER_WORKER"]

WINDOW_PER_WORKER = 64  # rows read ahead per unit of concurrency
MIN_WINDOW = 4096
MAX_GROUPS = 200_000  # groups remembered; the least recently seen is forgotten past this

PrefixKey = Callable[[Row], "int | None"]


class _Group:
    __slots__ = ("leader", "waiting", "warm")

    def __init__(self, leader: int | None) -> None:
        self.leader = leader  # the row index of the request sent first, until it is answered
        self.warm = False  # a request of the group was answered: its prefix is cached
        self.waiting: collections.deque[Row] = collections.deque()


class PrefixOrder:
    """The rows of `rows`, reordered by cacheable prefix; told of answers by `answered`."""

    def __init__(self, rows: AsyncIterator[Row], key: PrefixKey, *, window: int) -> None:
        self._source = rows
        self._key = key
        self._window = max(1, window)
        self._groups: collections.OrderedDict[int, _Group] = collections.OrderedDict()
        self._leaders: dict[int, int] = {}  # row index of a leader in flight -> its group key
        self._ready: collections.deque[Row] = collections.deque()
        self._waiting = 0  # rows held in groups, waiting for their leader's answer
        self._changed = asyncio.Event()
        self._exhausted = False

    @classmethod
    def window_for(cls, concurrency: int) -> int:
        """The rows read ahead for a run of `concurrency`."""
        return max(MIN_WINDOW, WINDOW_PER_WORKER * concurrency)

    def answered(self, row: Row, result: Result | None) -> None:
        """A row got its result (None: it was given up): its group may go on."""
        key = self._leaders.pop(row.index, None)
        if key is None:
            return
        group = self._groups.get(key)
        if group is None:
            return
        group.leader = None
        if result is not None and result.ok:
            group.warm = True
            self._release(group, len(group.waiting))
        elif group.waiting:  # the leader failed: the next of the group goes first instead
            self._lead(key, group, group.waiting.popleft())
            self._waiting -= 1
        self._changed.set()

    async def rows(self) -> AsyncIterator[Row]:
        """The rows in the order to send them; closing it closes the source."""
        try:
            while True:
                await self._read_ahead()
                if self._ready:
                    yield self._ready.popleft()
                    continue
                if self._exhausted and not self._waiting:
                    return
                self._changed.clear()
                await self._changed.wait()
        finally:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _read_ahead(self) -> None:
        """Read rows until one may be sent, or the window is full of rows waiting."""
        while not self._exhausted and not self._ready and self._waiting < self._window:
            row = await anext(self._source, None)
            if row is None:
                self._exhausted = True
                return
            self._place(row)

    def _place(self, row: Row) -> None:
        key = self._key(row)
        if key is None:  # too short to be cached: nothing to wait for
            self._ready.append(row)
            return
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(None)
            self._lead(key, group, row)
            self._forget_old()
        elif group.warm and group.leader is None:
            self._groups.move_to_end(key)
            self._ready.append(row)
        else:
            self._groups.move_to_end(key)
            group.waiting.append(row)
            self._waiting += 1

    def _lead(self, key: int, group: _Group, row: Row) -> None:
        group.leader = row.index
        self._leaders[row.index] = key
        self._ready.append(row)

    def _release(self, group: _Group, count: int) -> None:
        for _ in range(count):
            self._ready.append(group.waiting.popleft())
        self._waiting -= count

    def _forget_old(self) -> None:
        """Forget the least recently seen groups past MAX_GROUPS (none with rows waiting)."""
        while len(self._groups) > MAX_GROUPS:
            key, group = next(iter(self._groups.items()))
            if group.waiting or group.leader is not None:
                self._groups.move_to_end(key)
                return
            del self._groups[key]
