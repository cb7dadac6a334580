"""A model sweep: every input row sent to each of several models (docs/evaluations.md).

The engine's row numbers become *slots*: input row i has slots offsets[i] .. offsets[i+1]-1,
one per model in the order the models were given, so the checkpoint, resume and the output
assembly work on slots as they do on rows. A row whose own `model` column is set has a single
slot, for that model only. Without a `model` column, slot = i * M + j, and no table is kept.

    sweep = Sweep.plan(config, info.columns)
    sweep.total            # slots: output rows
    sweep.span(0, 100)     # the slots of input rows 0..99
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchrunner.config.settings import RunConfig
from batchrunner.inputs.readers import iter_records
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.results import Row
from batchrunner.store.resume import DoneSet

__all__ = ["Sweep", "slot_bodies", "sweep_config", "sweep_rows"]


def sweep_config(config: RunConfig) -> RunConfig:
    """For a sweep, the config rows are checked and built with: the first model as `model`."""
    if len(config.models) > 1:
        return config.replace(model=config.models[0])
    return config


def slot_bodies(config: RunConfig, builder: RequestBuilder) -> Iterator[dict[str, Any] | None]:
    """The request body of every output row (None for an input error), sending nothing.

    One per input row, or in a sweep one per input row and model (one for a row whose own
    `model` column is set), in output order: what `batchrunner estimate` counts.
    """
    sweep = config.models if len(config.models) > 1 else ()
    for index, record, error in iter_records(config, builder.columns):
        body = builder.build(index, record, error).body
        own = record is not None and record.get("model") not in (None, "")
        if not sweep or own:
            yield body
            continue
        for model in sweep:
            yield None if body is None else {**body, "model": model}


@dataclass(frozen=True)
class Sweep:
    """The models of a sweep and where each input row's slots start."""

    models: tuple[str, ...]
    rows: int  # input rows (after --limit)
    own_model: np.ndarray | None = None  # per input row: True where its `model` column is set

    @classmethod
    def plan(cls, config: RunConfig, columns: tuple[str, ...], rows: int) -> Sweep:
        """The sweep of a run over an input of `rows` rows with these columns."""
        own = None
        if "model" in columns:
            # One pass over the `model` column alone: which rows name their own model.
            own = np.zeros(rows, dtype=bool)
            for index, record, _error in iter_records(config, columns=("model",)):
                if index >= rows:
                    break
                value = (record or {}).get("model")
                own[index] = value is not None and value != ""
            if not own.any():
                own = None
        return cls(tuple(config.models), rows, own)

    @property
    def _counts(self) -> np.ndarray | None:
        if self.own_model is None:
            return None
        return np.where(self.own_model, 1, len(self.models)).astype(np.int64)

    @property
    def offsets(self) -> np.ndarray | None:
        """Where each input row's slots start (None when every row has M slots)."""
        counts = self._counts
        if counts is None:
            return None
        return np.concatenate([[0], np.cumsum(counts)])

    @property
    def total(self) -> int:
        """Slots in all: the output's rows."""
        counts = self._counts
        return self.rows * len(self.models) if counts is None else int(counts.sum())

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """The slots [lo, hi) of input rows [start, stop)."""
        offsets = self.offsets
        if offsets is None:
            m = len(self.models)
            return start * m, stop * m
        return int(offsets[start]), int(offsets[stop])

    def repeats(self, start: int, stop: int) -> np.ndarray:
        """For input rows [start, stop): the position (0-based) of each slot's input row."""
        counts = self._counts
        n = stop - start
        if counts is None:
            return np.repeat(np.arange(n), len(self.models))
        return np.repeat(np.arange(n), counts[start:stop])


def sweep_rows(
    config: RunConfig, builder: RequestBuilder, done: DoneSet, sweep: Sweep
) -> Iterator[Row]:
    """The slots with no checkpointed result, built into requests, in input then model order."""
    records = iter_records(config, columns=builder.columns)
    offsets = sweep.offsets
    m = len(sweep.models)
    check = len(done) > 0
    for index, record, error in records:
        if index >= sweep.rows:
            return
        row = builder.build(index, record, error)
        first = index * m if offsets is None else int(offsets[index])
        own = sweep.own_model is not None and bool(sweep.own_model[index])
        if own:
            slot = dataclasses.replace(row, index=first)
            if not (check and done.contains(first, row.id)):
                yield slot
            continue
        for j, model in enumerate(sweep.models):
            slot_index = first + j
            if check and done.contains(slot_index, row.id):
                continue
            if row.body is None:
                yield dataclasses.replace(row, index=slot_index, sweep_model=model)
            else:
                yield dataclasses.replace(row, index=slot_index, body={**row.body, "model": model})
