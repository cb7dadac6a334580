"""The order of sending by cacheable prefix (engine/order.py), on its own: no gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner import RunConfig, run
from batchrunner.engine.order import PrefixOrder
from batchrunner.results import Result, Row


def _rows(keys: list[str | None]) -> list[Row]:
    return [Row(index=i, id=f"r{i}", body={"k": k}) for i, k in enumerate(keys)]


def _key(row: Row) -> int | None:
    key = row.body["k"] if row.body else None
    return None if key is None else hash(key)


async def _source(rows: list[Row], read: list[int]) -> AsyncIterator[Row]:
    for row in rows:
        read.append(row.index)
        yield row


def _ok(row: Row) -> Result:
    return Result(index=row.index, id=row.id, status="ok", model="m")


def _failed(row: Row) -> Result:
    return Result(index=row.index, id=row.id, status="error", model="m", error="boom")


async def _take(rows: AsyncIterator[Row], n: int) -> list[int]:
    """The next `n` rows' indices; fails if fewer come within a second."""
    got = []
    for _ in range(n):
        row = await asyncio.wait_for(anext(rows), 1)
        got.append(row.index)
    return got


def test_a_groups_first_row_goes_alone_and_the_rest_once_it_is_answered() -> None:
    async def main() -> None:
        rows = _rows(["A", "A", "B", "A", None, "B"])
        order = PrefixOrder(_source(rows, []), _key, window=100)
        sending = order.rows()
        # The leaders of A and B, and the row too short to be cached, at once.
        assert await _take(sending, 3) == [0, 2, 4]
        pending = asyncio.ensure_future(anext(sending))
        await asyncio.sleep(0.01)
        assert not pending.done()  # the rest wait for their group's first answer
        order.answered(rows[0], _ok(rows[0]))
        assert (await pending).index == 1
        assert await _take(sending, 1) == [3]  # A's rows together, in input order
        pending = asyncio.ensure_future(anext(sending))
        await asyncio.sleep(0.01)
        assert not pending.done()
        order.answered(rows[2], _failed(rows[2]))  # B's leader failed: the next B leads
        assert (await pending).index == 5
        order.answered(rows[5], _ok(rows[5]))
        assert await _nothing_more_or_end(sending)

    asyncio.run(main())


async def _nothing_more_or_end(rows: AsyncIterator[Row]) -> bool:
    try:
        await asyncio.wait_for(anext(rows), 1)
    except StopAsyncIteration:
        return True
    return False


def test_a_row_of_an_answered_group_goes_at_once() -> None:
    async def main() -> None:
        rows = _rows(["A", "A", "A"])
        read: list[int] = []
        order = PrefixOrder(_source(rows, read), _key, window=1)
        sending = order.rows()
        assert await _take(sending, 1) == [0]
        order.answered(rows[0], _ok(rows[0]))
        assert await _take(sending, 2) == [1, 2]

    asyncio.run(main())


def test_the_window_bounds_the_rows_read_ahead_and_every_row_comes_once() -> None:
    async def main() -> None:
        keys: list[str | None] = [f"g{i % 7}" for i in range(200)]
        rows = _rows(keys)
        read: list[int] = []
        order = PrefixOrder(_source(rows, read), _key, window=20)
        sending = order.rows()
        sent: list[int] = []
        pending = asyncio.ensure_future(anext(sending))
        while len(sent) < len(rows):
            done, _ = await asyncio.wait({pending}, timeout=0.05)
            if not done:
                # Nothing ready: answer every row sent so far (as a gateway would).
                for index in sent:
                    order.answered(rows[index], _ok(rows[index]))
                continue
            sent.append(pending.result().index)
            pending = asyncio.ensure_future(anext(sending))
            # Never more than the window read ahead of what was sent.
            assert len(read) - len(sent) <= 20
        assert sorted(sent) == list(range(200))
        for index in sent:
            order.answered(rows[index], _ok(rows[index]))
        try:
            await asyncio.wait_for(pending, 1)
        except StopAsyncIteration:
            pass
        else:
            raise AssertionError("a row came twice")

    asyncio.run(main())


def test_closing_the_order_closes_its_source() -> None:
    closed = []

    async def source() -> AsyncIterator[Row]:
        try:
            for row in _rows(["A", None, None]):
                yield row
        finally:
            closed.append(True)

    async def main() -> None:
        order = PrefixOrder(source(), _key, window=10)
        sending = order.rows()
        await anext(sending)
        await sending.aclose()

    asyncio.run(main())
    assert closed == [True]


# -- whole runs on the simulator -------------------------------------------------------------

DOC_QA = Path(__file__).resolve().parents[1] / "sample_data" / "doc_qa.parquet"
# Columns that say when and how a row went, not what came back.
TIMING = ("latency_ms", "ttft_ms", "cached_tokens", "cost_usd", "response_id")


def _doc_qa(tmp_path: Path, documents: int) -> Path:
    """The rows of the sample's first `documents` documents, still shuffled."""
    table = pq.read_table(DOC_QA)
    keep = set(sorted(set(table.column("document").to_pylist()))[:documents])
    mask = pa.array([d in keep for d in table.column("document").to_pylist()])
    path = tmp_path / "doc_qa.parquet"
    pq.write_table(table.filter(mask), path)
    return path


def _run(source: Path, output: Path, base_url: str, order: str, **settings: Any) -> pa.Table:
    config = RunConfig(
        input=source, output=output, base_url=base_url, model="gpt-4o-mini",
        template="{document}\n\nQuestion: {question}", order=order, progress=False, quiet=True,
        **settings,
    )
    report = run(config, handle_signals=False)
    assert report.exit_code == 0, report.message
    return pq.read_table(output)


def test_both_orders_give_the_same_output_row_by_row(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", "sk-ru-order")
    source = _doc_qa(tmp_path, 12)
    by_order = {}
    for order in ("input", "prefix"):
        gateway = start_gateway(latency_ms=20)  # a fresh prompt cache for each order
        by_order[order] = _run(source, tmp_path / f"{order}.parquet", gateway.base_url, order,
                               concurrency=8)
    first, second = (t.drop_columns(list(TIMING)) for t in by_order.values())
    assert first.num_rows == 120
    assert first.to_pylist() == second.to_pylist()  # same rows, same order, same answers
    assert pq.read_table(source).column("id").to_pylist() == first.column("id").to_pylist()


def test_with_the_prefix_order_only_a_documents_first_question_pays_in_full(
    tmp_path: Path, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", "sk-ru-order")
    source = _doc_qa(tmp_path, 12)
    gateway = start_gateway(latency_ms=20)
    table = _run(source, tmp_path / "out.parquet", gateway.base_url, "prefix", concurrency=16)
    cached = table.column("cached_tokens").to_pylist()
    # Each group's first row goes alone; the rest only once it is answered: 12 misses.
    assert sum(1 for c in cached if not c) == 12
    assert gateway.stats.requests == 120
