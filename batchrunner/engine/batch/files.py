"""Request files of `--engine batch`, written while the input is read, and the rows they hold.

`RequestFiles` turns the rows the feed yields into Batch API request lines (`custom_id` the
row's index as text, `POST`, the chat endpoint, the body), cut at `batch_max_requests` lines
or `batch_max_bytes`, each file fsynced with its rows file before the ledger names it.
`Claims` are the rows of a previous session's unfinished batches: a row the feed yields that
one of them already holds (same index, id and request) is not written again. `retry_file`
copies the lines of rows to send again into a new file, from the file they were sent in.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import orjson

from batchrunner.cache.responses import request_hash
from batchrunner.config.pricing import PriceTable
from batchrunner.engine.processor import (
    BUDGET_MAX_TOKENS_GUESS,
    _completion_bound,
    _prompt_tokens,
)
from batchrunner.results import Row
from batchrunner.store.batches import BatchEntry, BatchRows, Ledger, write_rows
from batchrunner.transport.batch_api import CHAT_ENDPOINT

__all__ = ["Claims", "RequestFiles", "retry_file"]


def request_line(index: int, body: dict[str, Any]) -> bytes:
    """One Batch API request line (with its newline)."""
    return orjson.dumps({"custom_id": str(index), "method": "POST", "url": CHAT_ENDPOINT,
                         "body": body}) + b"\n"


class _OpenFile:
    def __init__(self, ledger: Ledger, number: int) -> None:
        self.number = number
        self.path = ledger.request_path(number)
        self.handle = self.path.open("wb")
        self.bytes = 0
        self.worst = 0.0
        self.columns: dict[str, list[Any]] = {
            "index": [], "id": [], "row_hash": [], "input_hash": [], "model": [], "attempt": []
        }

    def __len__(self) -> int:
        return len(self.columns["index"])


class RequestFiles:
    """Rows into request files, at most `max_requests` lines and `max_bytes` a file."""

    def __init__(
        self, ledger: Ledger, max_requests: int, max_bytes: int, prices: PriceTable | None
    ) -> None:
        self.ledger = ledger
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.prices = prices  # None: no --max-cost, no worst case to add up
        self._open: _OpenFile | None = None

    def add(self, row: Row) -> BatchEntry | None:
        """Write one row; the entry of a file it filled (closed and in the ledger), if any."""
        assert row.body is not None
        line = request_line(row.index, row.body)
        closed = None
        current = self._open
        if current is not None and (
            len(current) >= self.max_requests or current.bytes + len(line) > self.max_bytes
        ):
            closed = self.close()
        if self._open is None:
            self._open = _OpenFile(self.ledger, self.ledger.next_number())
        current = self._open
        current.handle.write(line)
        current.bytes += len(line)
        columns = current.columns
        columns["index"].append(row.index)
        columns["id"].append(row.id)
        columns["row_hash"].append(request_hash(row.body))
        columns["input_hash"].append(row.input_hash)
        columns["model"].append(row.model)
        columns["attempt"].append(1)
        if self.prices is not None:
            current.worst += worst_case(self.prices, row.body)
        return closed

    def close(self) -> BatchEntry | None:
        """Close the file being written: fsynced, its rows file written, then the ledger."""
        current, self._open = self._open, None
        if current is None:
            return None
        current.handle.flush()
        os.fsync(current.handle.fileno())
        current.handle.close()
        write_rows(self.ledger.rows_path(current.number), current.columns)
        entry = BatchEntry(number=current.number, rows=len(current), bytes=current.bytes,
                           worst_cost=current.worst)
        self.ledger.add(entry)
        return entry

    def abandon(self) -> None:
        """Drop the file being written (the run stops): its rows stay pending."""
        current, self._open = self._open, None
        if current is not None:
            current.handle.close()
            current.path.unlink(missing_ok=True)


def worst_case(prices: PriceTable, body: dict[str, Any]) -> float:
    """The most one request can cost at batch prices (0 for a model with no price)."""
    _estimate, bound = _prompt_tokens(body)
    completion = _completion_bound(body) or BUDGET_MAX_TOKENS_GUESS
    worst = prices.worst_case(body.get("model"), bound, completion, batch=True)
    return worst or 0.0


class Claims:
    """The rows of unfinished batches of an earlier session, and which of them are still due.

    A row the feed yields (it has no result yet) whose index, id and request hash a batch
    holds is that batch's: `expected[k]` marks the lines whose answers are to be kept. A line
    whose row has a result already (collected before an interruption), or whose row changed
    since, is not expected: its answer is skipped.
    """

    def __init__(self, batches: list[tuple[BatchEntry, BatchRows]]) -> None:
        self.batches = batches
        self.expected = [np.zeros(len(rows), dtype=bool) for _entry, rows in batches]
        self._ids = [rows.ids.to_pylist() for _entry, rows in batches]
        if batches:
            index = np.concatenate([rows.index for _e, rows in batches])
            which = np.concatenate([np.full(len(rows), i) for i, (_e, rows) in enumerate(batches)])
            pos = np.concatenate([np.arange(len(rows)) for _e, rows in batches])
        else:
            index = which = pos = np.zeros(0, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        self._index, self._which, self._pos = index[order], which[order], pos[order]

    def __bool__(self) -> bool:
        return bool(len(self._index))

    def take(self, row: Row) -> bool:
        """True when an unfinished batch holds `row` as it is now (it is not written again)."""
        if not len(self._index):
            return False
        k = int(np.searchsorted(self._index, row.index))
        body_hash: int | None = None
        while k < len(self._index) and self._index[k] == row.index:
            b, i = int(self._which[k]), int(self._pos[k])
            rows = self.batches[b][1]
            if self._ids[b][i] == row.id and not self.expected[b][i]:
                if body_hash is None:
                    body_hash = request_hash(row.body) if row.body is not None else 0
                if int(rows.row_hash[i]) == body_hash:
                    self.expected[b][i] = True
                    return True
            k += 1
        return False

    def expected_of(self, entry: BatchEntry) -> np.ndarray | None:
        for (held, _rows), expected in zip(self.batches, self.expected):
            if held is entry:
                return expected
        return None


def retry_file(ledger: Ledger, entry: BatchEntry, rows: BatchRows, again: np.ndarray,
               prices: PriceTable | None) -> BatchEntry | None:
    """A new request file of the lines of `entry` where `again` is True (their attempt + 1)."""
    if not again.any():
        return None
    number = ledger.next_number()
    path = ledger.request_path(number)
    columns: dict[str, list[Any]] = {
        "index": rows.index[again].tolist(),
        "id": [rows.ids[i].as_py() for i in np.flatnonzero(again)],
        "row_hash": rows.row_hash[again].tolist(),
        "input_hash": [rows.input_hash[i].as_py() for i in np.flatnonzero(again)],
        "model": [rows.model[i].as_py() for i in np.flatnonzero(again)],
        "attempt": (rows.attempt[again] + 1).tolist(),
    }
    size = 0
    worst = 0.0
    with ledger.request_path(entry.number).open("rb") as source, path.open("wb") as target:
        k = 0
        for line in source:
            if not line.strip():
                continue
            if again[k]:
                target.write(line)
                size += len(line)
                if prices is not None:
                    worst += worst_case(prices, orjson.loads(line)["body"])
            k += 1
        target.flush()
        os.fsync(target.fileno())
    write_rows(ledger.rows_path(number), columns)
    new = BatchEntry(number=number, rows=int(again.sum()), bytes=size, worst_cost=worst)
    ledger.add(new)
    return new


def rows_of(ledger: Ledger, entry: BatchEntry) -> BatchRows:
    return BatchRows.read(ledger.rows_path(entry.number))
