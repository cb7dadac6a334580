"""The ledger of an output's Batch API batches (`--engine batch`), kept in its checkpoint folder.

Every step of a batch is written here, durably, before the next one is taken, so that a run
started again after any interruption knows what it already paid for:

    written    the request file and its rows file are on disk (`batch-00001.jsonl`,
               `batch-00001.rows.arrow`)
    uploaded   the file is at the gateway (`file_id`)
    submitted  the batch exists (`batch_id`)
    collected  its answers are durable in the checkpoint

`batches.json` is one JSON object rewritten atomically (`durability.write_atomically`) at
each step; it holds ids, states and counts, never the API key, and no row's content. The rows
file holds, per request line, the row's index, id, request hash, input hash, model and how
many times it was submitted: the few things a result needs that its answer line lacks.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from batchrunner.store import durability
from batchrunner.store.layout import (
    batch_ledger_path,
    batch_request_path,
    batch_rows_path,
)

__all__ = ["BatchEntry", "BatchRows", "Ledger", "ROWS_SCHEMA", "read_ledger"]

LEDGER_VERSION = 1
STATES = ("written", "uploaded", "submitted", "collected")

ROWS_SCHEMA = pa.schema([
    ("index", pa.int64()),
    ("id", pa.string()),
    ("row_hash", pa.int64()),
    ("input_hash", pa.int64()),
    ("model", pa.string()),
    ("attempt", pa.int32()),
])


@dataclass
class BatchEntry:
    """One batch of the output, as the ledger has it."""

    number: int
    rows: int
    bytes: int
    worst_cost: float = 0.0  # USD at batch prices, from max_tokens (for --max-cost)
    state: str = "written"
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the gateway's last known status
    counts: dict[str, int] = field(default_factory=dict)  # request_counts last seen

    @property
    def pending(self) -> bool:
        """Submitted and not collected: the gateway has it, its answers are not kept yet."""
        return self.state == "submitted"


@dataclass
class BatchRows:
    """The rows of one request file, line by line (the order of its lines)."""

    index: np.ndarray  # int64
    ids: pa.Array  # string
    row_hash: np.ndarray  # int64
    input_hash: pa.Array  # int64, nullable
    model: pa.Array  # string, nullable
    attempt: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def read(cls, path: Path) -> BatchRows:
        table = feather.read_table(path)
        return cls(
            index=table.column("index").to_numpy(),
            ids=table.column("id").combine_chunks(),
            row_hash=table.column("row_hash").to_numpy(),
            input_hash=table.column("input_hash").combine_chunks(),
            model=table.column("model").combine_chunks(),
            attempt=table.column("attempt").to_numpy(),
        )


def write_rows(path: Path, columns: dict[str, list[Any]]) -> None:
    """Write a request file's rows file, durably."""
    table = pa.table({name: pa.array(columns[name], ROWS_SCHEMA.field(name).type)
                      for name in ROWS_SCHEMA.names}, schema=ROWS_SCHEMA)
    with durability.replaced_atomically(path, durable=True) as tmp:
        feather.write_feather(table, tmp, compression="uncompressed")


class Ledger:
    """The batches of one output's checkpoint folder; each change written at once."""

    def __init__(
        self, directory: Path, batches: list[BatchEntry] | None = None,
        base_url: str | None = None,
    ) -> None:
        self.directory = directory
        self.batches = batches or []
        self.base_url = base_url  # the gateway's, without credentials (for `cancel`)

    @classmethod
    def open(cls, directory: Path) -> Ledger:
        data = _read(directory)
        return cls(directory, _entries(data), data.get("base_url"))

    def request_path(self, number: int) -> Path:
        return batch_request_path(self.directory, number)

    def rows_path(self, number: int) -> Path:
        return batch_rows_path(self.directory, number)

    def next_number(self) -> int:
        """The number of the next request file (a file left by an unrecorded step is reused)."""
        return max((b.number for b in self.batches), default=0) + 1

    def add(self, entry: BatchEntry) -> None:
        self.batches.append(entry)
        self.save()

    def save(self) -> None:
        data = {"version": LEDGER_VERSION, "base_url": self.base_url,
                "batches": [asdict(b) for b in self.batches]}
        durability.write_atomically(
            batch_ledger_path(self.directory), json.dumps(data, indent=1).encode()
        )

    def unfinished(self) -> list[BatchEntry]:
        return [b for b in self.batches if b.state != "collected"]

    def forget_files(self, entry: BatchEntry) -> None:
        """Remove a collected batch's request and rows files (its answers are kept)."""
        for path in (self.request_path(entry.number), self.rows_path(entry.number)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def read_ledger(directory: Path) -> list[BatchEntry]:
    """The batches the ledger in `directory` lists (none when there is no ledger)."""
    return _entries(_read(directory))


def _read(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads(batch_ledger_path(directory).read_bytes())
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _entries(data: dict[str, Any]) -> list[BatchEntry]:
    known = set(BatchEntry.__dataclass_fields__)
    return [BatchEntry(**{k: v for k, v in raw.items() if k in known})
            for raw in data.get("batches", [])]
