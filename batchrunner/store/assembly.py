"""The checkpoint's output assembly: the last result of each row, joined with the input.

`OutputAssembly` is the part of a `Checkpoint` that reads back, in row order, the results of a
chunk of rows (only the batches that hold them) and joins them with the input's columns;
`Checkpoint.finalize` writes the chunks out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import UsageError
from batchrunner.store.layout import segment_number
from batchrunner.store.segments import (
    _SEGMENT_SCHEMA,
    _STRUCTURED_COLUMNS,
    JSON_SCHEMA_METADATA,
    RESULT_SCHEMA,
    _BatchRef,
    _conform,
    _last_positions,
)


class OutputAssembly:
    """Where each checkpointed batch lies, and the output's chunks read back from them.

    >>> assembly = OutputAssembly(loaded.batches, json_schema=None)
    >>> table = assembly.structured_output(assembly.results_for(0, 1000))
    """

    def __init__(self, batches: list[_BatchRef], json_schema: dict[str, Any] | None) -> None:
        self.batches = batches  # in the order they were written; `add` appends
        self.json_schema = json_schema  # a structured run's --json-schema, as the manifest has it

    def add(self, ref: _BatchRef) -> None:
        """Remember a batch just written."""
        self.batches.append(ref)

    def holds(self, segment: Path) -> bool:
        """True when some remembered batch lies in `segment`."""
        return any(b.segment == segment for b in self.batches)

    def structured_output(self, table: pa.Table) -> pa.Table:
        """A structured run's output records its schema; another run's has no parsed columns."""
        if self.json_schema is None:
            return table.drop_columns(list(_STRUCTURED_COLUMNS))
        metadata = {JSON_SCHEMA_METADATA: json.dumps(self.json_schema["schema"]).encode()}
        return table.replace_schema_metadata(metadata)

    def results_for(self, start: int, stop: int) -> pa.Table:
        """The last result of each row in [start, stop), in row order."""
        refs = [b for b in self.batches if b.first_row < stop and b.last_row >= start]
        pieces: list[pa.RecordBatch] = []
        by_segment: dict[Path, list[int]] = {}
        layouts: dict[Path, pa.Schema] = {}
        for ref in refs:
            by_segment.setdefault(ref.segment, []).append(ref.offset)
            layouts[ref.segment] = ref.schema or _SEGMENT_SCHEMA
        # Segment by segment in the order they were written, so later results win; only the
        # batches that hold these rows are read.
        for segment in sorted(by_segment, key=segment_number):
            with pa.memory_map(str(segment)) as source:
                for offset in sorted(by_segment[segment]):
                    source.seek(offset)
                    batch = pa.ipc.read_record_batch(pa.ipc.read_message(source), layouts[segment])
                    batch = _conform(batch)
                    rows = batch.column(0)
                    keep = pc.and_(pc.greater_equal(rows, start), pc.less(rows, stop))
                    pieces.append(batch.filter(keep))
        table = pa.Table.from_batches(pieces, _SEGMENT_SCHEMA)
        row_numbers = table.column("_row").to_numpy()
        positions = _last_positions(row_numbers)
        picked = table.take(pa.array(positions, pa.int64()))
        got = picked.column("_row").to_numpy()
        if len(got) != stop - start or (len(got) and (got[0] != start or got[-1] != stop - 1)):
            raise UsageError(f"rows {start}..{stop - 1} are not all checkpointed; cannot finalize")
        return picked.drop_columns(["_row", "_hash", "_ihash"])


# Result columns an input column may not keep its name beside: the results' own, and `score`
# (added by scoring, during the run or by `batchrunner score` later).
RESULT_NAMES = frozenset(RESULT_SCHEMA.names) | {"score"}


def output_column_names(input_columns: Sequence[str]) -> list[str]:
    """Output columns: id, the input's, then the results'; never two of one name.

    An input column named like a result column is carried as `input_<name>`, or
    `input_input_<name>` where that is taken too (by another input column), and so on: no
    input value is dropped or shadowed, in any output format.
    """
    taken = set(RESULT_NAMES) | set(input_columns)
    carried: list[str] = []
    for column in input_columns:
        if column in RESULT_NAMES:
            name = f"input_{column}"
            while name in taken:
                name = f"input_{name}"
            taken.add(name)
            column = name
        carried.append(column)
    return ["id", *carried, *RESULT_SCHEMA.names[1:]]


def _join(inputs: pa.Table, results: pa.Table, id_column: str | None) -> pa.Table:
    if id_column == "id":  # the input's own id column is the output's `id`: not carried twice
        inputs = inputs.drop_columns(["id"])
    names = output_column_names(inputs.column_names)
    columns = [results.column("id"), *inputs.columns, *results.columns[1:]]
    return pa.Table.from_arrays(columns, names=names)
