"""The viewer's index over one or many sources: totals, filters, pages, one row, a sweep.

The index (`batchrunner.viewer.index`) keeps a few small columns of every row in numpy arrays
(about 40 bytes a row: a million rows in ~40 MB): status, model, tokens, cost, latency, score,
cache hit, error kind, and the id. Totals, charts and the filters on status, model, error kind
and score are numpy operations on them. The filters that read text (a search in prompts and
answers, an error's text) stream the text columns through `pyarrow.compute` a row group at a
time and keep the matching rows as a boolean mask (a byte a row), the last few masks cached. A
page of rows reads only the row groups that hold it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.viewer.index import _build_index, _merge_codes
from batchrunner.viewer.request_view import RequestRenderer
from batchrunner.viewer.sources import (
    RESULT_COLUMNS,
    CheckpointSource,
    ParquetSource,
    Source,
)

__all__ = ["Dataset", "Filters"]

log = logging.getLogger(__name__)

PAGE_LIMIT = 200  # rows a page may ask for
PREVIEW_CHARS = 240  # text shown in a table cell; the full text is in the row view
SWEEP_LIMIT = 24  # rows shown side by side for one id
_MASKS_CACHED = 8
_SUMMARIES_CACHED = 16
_SORTABLE = ("latency_ms", "cost_usd", "total_tokens", "score", "attempts")
@dataclass(frozen=True)
class Filters:
    """Which rows to show; every field None means every row.

    >>> Filters(status="error", model="gpt-4o", search="capital")
    """

    status: str | None = None  # "ok" or "error"
    model: str | None = None
    error_kind: str | None = None  # an error_kind() key, as the frequent errors list it
    error: str | None = None  # text the error contains (case-insensitive)
    score_min: float | None = None
    score_max: float | None = None
    search: str | None = None  # text the prompt or the answer contains (case-insensitive)
    source: int | None = None  # one file of several

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Filters:
        """Filters from a page's query string; empty values mean no filter."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = query.get(field.name, "").strip()
            if not raw:
                continue
            if field.name in ("score_min", "score_max"):
                try:
                    values[field.name] = float(raw)
                except ValueError:
                    raise ValueError(f"{field.name} must be a number, not {raw!r}") from None
            elif field.name == "source":
                if not raw.isdigit():
                    raise ValueError(f"source must be a file number, not {raw!r}")
                values[field.name] = int(raw)
            else:
                values[field.name] = raw
        if values.get("status") not in (None, "ok", "error"):
            raise ValueError("status must be ok or error")
        return cls(**values)


class Dataset:
    """Rows of one or many result sources, as the page asks for them.

    Thread-safe: the web app calls it from worker threads, one call at a time per dataset.

    >>> data = Dataset(open_sources(["out/eval.parquet"]))
    >>> data.summary(Filters(status="error"))["totals"]["rows"]
    """

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = list(sources)
        self.generation = 0
        self._lock = threading.RLock()
        self._indexes = [_build_index(s) for s in self.sources]
        self._renderers: dict[int, RequestRenderer | None] = {}
        self._masks: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._summaries: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self._combine()

    # -- building ------------------------------------------------------------------------

    def _combine(self) -> None:
        indexes = self._indexes
        sizes = [ix.rows for ix in indexes]
        self.rows = int(sum(sizes))
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._source_of = np.repeat(np.arange(len(indexes), dtype=np.int16), sizes)
        self._ids = pa.chunked_array(
            [chunk for ix in indexes for chunk in ix.ids.chunks], pa.string()
        )
        self.models, self._model_codes = _merge_codes(
            [(ix.model_names, ix.model_codes) for ix in indexes]
        )
        self._kinds, self._kind_codes = _merge_codes(
            [(ix.kind_names, ix.kind_codes) for ix in indexes]
        )
        self._numbers = {
            name: np.concatenate([ix.numbers[name] for ix in indexes])
            for name in indexes[0].numbers
        }
        for number, ix in enumerate(indexes):  # share the memory: views, not copies
            start, stop = self._offsets[number], self._offsets[number + 1]
            ix.numbers = {name: array[start:stop] for name, array in self._numbers.items()}
        self.columns = sorted({c for s in self.sources for c in s.columns})
        self.generation += 1
        self._masks.clear()
        self._summaries.clear()
        pa.default_memory_pool().release_unused()

    def refresh(self) -> bool:
        """Read what live runs wrote since the last call; True when the rows changed."""
        with self._lock:
            changed = False
            for number, source in enumerate(self.sources):
                if isinstance(source, CheckpointSource) and source.finished():
                    source = ParquetSource(source.output)  # the run ended: its file takes over
                    self.sources[number] = source
                    self._renderers.pop(number, None)
                elif not source.refresh():
                    continue
                self._indexes[number] = _build_index(source)
                changed = True
            if changed:
                self._combine()
            return changed

    @property
    def live(self) -> bool:
        """True while some source is a run's checkpoint."""
        return any(s.live for s in self.sources)

    # -- the page's questions ------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What the page needs to draw its filters: files, models, optional columns."""
        with self._lock:
            return {
                "generation": self.generation,
                "live": self.live,
                "rows": self.rows,
                "sources": [
                    {"name": s.name, "live": s.live, "rows": int(ix.rows)}
                    for s, ix in zip(self.sources, self._indexes)
                ],
                "models": [m for m in self.models if m],
                "has_score": "score" in self.columns,
                "has_cache_hit": "cache_hit" in self.columns,
                "optional_columns": [
                    c for c in ("score", "cache_hit", "parsed", "refusal") if c in self.columns
                ],
            }

    def summary(self, filters: Filters) -> dict[str, Any]:
        """Totals, frequent errors, per-model figures and latency histogram of the rows shown."""
        with self._lock:
            key = (self.generation, filters)
            cached = self._summaries.get(key)
            if cached is None:
                cached = self._summary(self._mask(filters))
                cached["generation"] = self.generation
                self._summaries[key] = cached
                while len(self._summaries) > _SUMMARIES_CACHED:
                    self._summaries.popitem(last=False)
            return cached

    def page(
        self, filters: Filters, *, offset: int = 0, limit: int = 50, sort: str | None = None
    ) -> dict[str, Any]:
        """One page of the rows shown, with the total they come to."""
        limit = max(1, min(limit, PAGE_LIMIT))
        offset = max(0, offset)
        with self._lock:
            matching = np.flatnonzero(self._mask(filters))
            if sort:
                descending = sort.startswith("-")
                name = sort.lstrip("-")
                if name not in _SORTABLE or name not in self._numbers:
                    raise ValueError(f"cannot sort by {name!r}")
                keys = self._numbers[name][matching].astype(np.float64)
                keys = np.where(np.isnan(keys), -np.inf if descending else np.inf, keys)
                order = np.argsort(-keys if descending else keys, kind="stable")
                matching = matching[order]
            chosen = matching[offset : offset + limit]
            return {
                "generation": self.generation,
                "total": int(len(matching)),
                "offset": offset,
                "limit": limit,
                "rows": self._preview_rows(chosen),
            }

    def row(self, index: int) -> dict[str, Any]:
        """One row in full, the request it sent, and the other rows with its id (a sweep)."""
        with self._lock:
            if not 0 <= index < self.rows:
                raise KeyError(index)
            number, position = self._locate(index)
            source = self.sources[number]
            table = source.read(np.array([position], dtype=np.int64), source.columns, keep=False)
            record = _records(table)[0]
            del table
            pa.default_memory_pool().release_unused()  # a whole row group was decoded for it
            renderer = self._renderer(number)
            request = renderer.request(record) if renderer is not None else None
            inputs = {k: v for k, v in record.items() if k not in RESULT_COLUMNS or k == "id"}
            inputs.pop("id", None)
            return {
                "generation": self.generation,
                "index": index,
                "source": source.name,
                "live": source.live,
                "row": record,
                "inputs": inputs,
                "request": request,
                "request_note": None if request is not None else _no_request_note(source),
                "sweep": self._sweep(index, record.get("id")),
            }

    # -- masks ---------------------------------------------------------------------------

    def _mask(self, filters: Filters) -> np.ndarray:
        mask = np.ones(self.rows, dtype=bool)
        ok = self._numbers["ok"]
        if filters.status == "ok":
            mask &= ok
        elif filters.status == "error":
            mask &= ~ok
        if filters.source is not None:
            mask &= self._source_of == filters.source
        if filters.model is not None:
            code = self.models.index(filters.model) if filters.model in self.models else -2
            mask &= self._model_codes == code
        if filters.error_kind is not None:
            code = self._kinds.index(filters.error_kind) if filters.error_kind in self._kinds else -2
            mask &= self._kind_codes == code
        if filters.score_min is not None or filters.score_max is not None:
            score = self._numbers["score"]
            with np.errstate(invalid="ignore"):
                if filters.score_min is not None:
                    mask &= score >= filters.score_min
                if filters.score_max is not None:
                    mask &= score <= filters.score_max
        if filters.error is not None:
            mask &= self._text_mask(("error",), filters.error)
        if filters.search is not None:
            mask &= self._text_mask(None, filters.search)
        return mask

    def _text_mask(self, columns: tuple[str, ...] | None, text: str) -> np.ndarray:
        """Rows where one of the columns (None: prompts and answers) contains `text`."""
        key = (self.generation, columns, text.lower())
        cached = self._masks.get(key)
        if cached is not None:
            self._masks.move_to_end(key)
            return cached
        mask = np.zeros(self.rows, dtype=bool)
        for number, source in enumerate(self.sources):
            wanted = list(columns) if columns is not None else _search_columns(source)
            wanted = [c for c in wanted if c in source.columns]
            if not wanted:
                continue
            physical: list[np.ndarray] = []
            for batch in source.scan(wanted):
                physical.append(_contains(batch, text))
            found = np.concatenate(physical) if physical else np.zeros(0, dtype=bool)
            start = self._offsets[number]
            mask[start : start + len(source.visible)] = found[source.visible]
        pa.default_memory_pool().release_unused()  # every row group's text was decoded
        self._masks[key] = mask
        while len(self._masks) > _MASKS_CACHED:
            self._masks.popitem(last=False)
        return mask

    # -- figures -------------------------------------------------------------------------

    def _summary(self, mask: np.ndarray) -> dict[str, Any]:
        # Every array is taken once at the rows shown (not at all when every row is).
        where = None if mask.all() else np.flatnonzero(mask)
        n = {k: (v if where is None else v[where]) for k, v in self._numbers.items()}
        codes = self._model_codes if where is None else self._model_codes[where]
        kinds = self._kind_codes if where is None else self._kind_codes[where]
        ok = n["ok"]
        cost = np.nan_to_num(n["cost_usd"])
        reused = n["cache_hit"]
        score = n["score"]
        scored = ~np.isnan(score)
        rows = len(ok)
        ok_count = int(np.count_nonzero(ok))
        totals = {
            "rows": rows,
            "ok": ok_count,
            "errors": rows - ok_count,
            "prompt_tokens": int(n["prompt_tokens"].sum(dtype=np.int64)),
            "completion_tokens": int(n["completion_tokens"].sum(dtype=np.int64)),
            "total_tokens": int(n["total_tokens"].sum(dtype=np.int64)),
            "cost_paid": float(cost.sum() - cost[reused].sum()),
            "cost_reused": float(cost[reused].sum()),
            "cache_hits": int(np.count_nonzero(reused)),
            "scored": int(np.count_nonzero(scored)),
            "mean_score": float(score[scored].mean()) if scored.any() else None,
        }
        return {
            "totals": totals,
            "errors": self._top_errors(kinds[~ok]),
            "models": self._per_model(n, codes, cost, scored),
            "latency": self._latency_histogram(n["latency_ms"][ok], codes[ok]),
        }

    def _top_errors(self, codes: np.ndarray, top: int = 10) -> list[dict[str, Any]]:
        codes = codes[codes >= 0]
        if not len(codes):
            return []
        counts = np.bincount(codes, minlength=len(self._kinds))
        order = np.argsort(-counts, kind="stable")[:top]
        return [
            {"kind": self._kinds[i], "count": int(counts[i])} for i in order if counts[i] > 0
        ]

    def _per_model(
        self, n: dict[str, np.ndarray], codes: np.ndarray, cost: np.ndarray, scored: np.ndarray
    ) -> list[dict[str, Any]]:
        size = len(self.models)

        def total(values: np.ndarray) -> np.ndarray:
            return np.bincount(codes, weights=values, minlength=size)

        rows = np.bincount(codes, minlength=size)
        ok = np.bincount(codes[n["ok"]], minlength=size)
        money = total(cost)
        prompt = total(n["prompt_tokens"])
        completion = total(n["completion_tokens"])
        score_sum = np.bincount(codes[scored], weights=n["score"][scored], minlength=size)
        score_n = np.bincount(codes[scored], minlength=size)
        latency = n["latency_ms"]
        timed = ~np.isnan(latency)
        out = []
        for code in np.flatnonzero(rows):
            lat = latency[(codes == code) & timed] if len(self.models) > 1 else latency[timed]
            p50, p95 = np.percentile(lat, [50, 95]) if len(lat) else (None, None)
            out.append(
                {
                    "model": self.models[code] or "(none)",
                    "rows": int(rows[code]),
                    "ok": int(ok[code]),
                    "errors": int(rows[code] - ok[code]),
                    "cost_usd": float(money[code]),
                    "prompt_tokens": int(prompt[code]),
                    "completion_tokens": int(completion[code]),
                    "mean_score": float(score_sum[code] / score_n[code]) if score_n[code] else None,
                    "latency_p50": _number(p50),
                    "latency_p95": _number(p95),
                }
            )
        return out

    def _latency_histogram(
        self, latency: np.ndarray, codes: np.ndarray, bins: int = 30
    ) -> dict[str, Any]:
        keep = ~np.isnan(latency)
        latency, codes = latency[keep], codes[keep]
        if not len(latency):
            return {"edges": [], "series": []}
        top = float(np.percentile(latency, 99)) or float(latency.max()) or 1.0
        edges = np.linspace(0.0, top, bins + 1)
        # the last bin holds the slowest 1% too
        slot = np.minimum((latency * (bins / top)).astype(np.int64), bins - 1)
        size = len(self.models)
        counts = np.bincount(codes.astype(np.int64) * bins + slot, minlength=size * bins)
        counts = counts.reshape(size, bins)
        series = [
            {"model": self.models[code] or "(none)", "counts": counts[code].tolist()}
            for code in range(size)
            if counts[code].any()
        ]
        return {"edges": [round(float(e), 3) for e in edges], "series": series}

    # -- rows ----------------------------------------------------------------------------

    def _locate(self, index: int) -> tuple[int, int]:
        number = int(self._source_of[index])
        visible = self.sources[number].visible
        return number, int(visible[index - self._offsets[number]])

    def _preview_rows(self, chosen: np.ndarray) -> list[dict[str, Any]]:
        rows: list[dict[str, Any] | None] = [None] * len(chosen)
        numbers = self._source_of[chosen]
        for number in np.unique(numbers):
            where = np.flatnonzero(numbers == number)
            source = self.sources[number]
            visible = source.visible
            positions = visible[chosen[where] - self._offsets[number]]
            renderer = self._renderer(int(number))
            table = _shortened(source.read(positions, self._page_columns(int(number))))
            for at, record in zip(where, _records(table)):
                prompt = renderer.prompt_text(record) if renderer is not None else None
                if prompt is None:
                    fallback = _fallback_prompt_columns(source)
                    prompt = record.get(fallback[0]) if fallback else None
                preview = {
                    "index": int(chosen[at]),
                    "source": int(number),
                    "prompt": _shorten(prompt),
                    **{c: record.get(c) for c in _PREVIEW_COLUMNS if c in record},
                }
                for name in ("content", "error"):  # cut to a cell; the row view has it whole
                    if name in preview:
                        preview[name] = _shorten(preview[name])
                rows[at] = preview
        return [r for r in rows if r is not None]

    def _page_columns(self, number: int) -> list[str]:
        """What a page reads of a source: the table's columns and what its prompt needs."""
        source = self.sources[number]
        renderer = self._renderer(number)
        wanted = [c for c in _PREVIEW_COLUMNS if c in source.columns]
        if renderer is not None:
            wanted += [c for c in renderer.needed if c not in wanted]
        else:
            wanted += [c for c in _fallback_prompt_columns(source)[:1] if c not in wanted]
        return wanted

    def _sweep(self, index: int, row_id: Any) -> list[dict[str, Any]]:
        if row_id is None:
            return []
        same = pc.equal(self._ids, pa.scalar(str(row_id)))
        found = np.flatnonzero(same.fill_null(False).to_numpy(zero_copy_only=False))
        if len(found) < 2:
            return []
        found = found[:SWEEP_LIMIT]
        out = []
        for at in found:
            number, position = self._locate(int(at))
            source = self.sources[number]
            # The columns of a page: the rows of a sweep are next to each other, in the
            # row group the page just read, so this is usually read from the cache.
            wanted = self._page_columns(number)
            record = _records(source.read(np.array([position], dtype=np.int64), wanted))[0]
            record = {k: v for k, v in record.items() if k in _PREVIEW_COLUMNS}
            out.append({"index": int(at), "source": source.name, "current": int(at) == index,
                        **record})
        return out

    def _renderer(self, number: int) -> RequestRenderer | None:
        if number not in self._renderers:
            source = self.sources[number]
            self._renderers[number] = RequestRenderer.for_source(source)
        return self._renderers[number]


_PREVIEW_COLUMNS = (
    "id", "model", "status", "content", "error", "score", "cache_hit", "total_tokens",
    "cost_usd", "latency_ms", "attempts",
)


def _contains(batch: pa.RecordBatch, text: str) -> np.ndarray:
    """True where one of the batch's text columns contains `text`, ignoring case."""
    found: pa.Array | None = None
    for column in batch.columns:
        if pa.types.is_dictionary(column.type):  # each distinct text once
            if not pa.types.is_string(column.type.value_type):
                continue
            hit = pc.match_substring(column.dictionary, text, ignore_case=True)
            hit = hit.fill_null(False).take(column.indices).fill_null(False)
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            hit = pc.match_substring(column, text, ignore_case=True).fill_null(False)
        else:
            continue
        found = hit if found is None else pc.or_(found, hit)
    if found is None:
        return np.zeros(batch.num_rows, dtype=bool)
    return found.to_numpy(zero_copy_only=False)


def _search_columns(source: Source) -> list[str]:
    """The columns a search looks in: the answer, and the input's text columns (the prompts)."""
    names = ["content", "refusal"]
    names += [c for c in source.columns if c not in RESULT_COLUMNS]
    return names


def _fallback_prompt_columns(source: Source) -> list[str]:
    """Input columns to show as the prompt when the run's settings are not known."""
    inputs = [c for c in source.columns if c not in RESULT_COLUMNS]
    preferred = [c for c in ("prompt", "question", "text", "input", "messages") if c in inputs]
    return preferred + [c for c in inputs if c not in preferred]


def _shortened(table: pa.Table) -> pa.Table:
    """Long text cut to what a table cell shows (the row view shows it whole)."""
    columns = []
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_string(column.type) and name in ("content", "error"):
            column = pc.utf8_slice_codeunits(column, 0, PREVIEW_CHARS + 1)
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


def _shorten(value: Any) -> Any:
    if isinstance(value, str) and len(value) > PREVIEW_CHARS:
        return value[:PREVIEW_CHARS] + "…"
    return value


def _records(table: pa.Table) -> list[dict[str, Any]]:
    records = table.to_pylist()
    for record in records:
        for key, value in record.items():
            record[key] = _plain(value)
    return records


def _plain(value: Any) -> Any:
    """A value JSON can carry: NaN and infinities become null, bytes and dates text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return str(value)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 3) if math.isfinite(value) else None


def _no_request_note(source: Source) -> str:
    if source.live:
        return ("the run is still going: its checkpoint holds results only; the input columns "
                "and the messages sent show once the output is written")
    return ("the run's settings (its checkpoint manifest) are not beside this file: "
            "the input columns are shown instead of the messages sent")
