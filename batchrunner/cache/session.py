"""The response cache as one run uses it: lookups and writes on a thread of its own.

`CacheSession` keys each row's request body, looks the keys up in batches off the event loop,
serves hits as Results, and stores the answers of sent rows in transactions of `WRITE_ROWS`
(the file itself, its keys and its layout: responses.py).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from batchrunner.cache.responses import (
    STORABLE_FINISH_REASONS,
    CachedAnswer,
    ResponseCache,
    _answer_json,
    _canonical,
    cache_key,
    default_cache_path,
)
from batchrunner.results import Result

__all__ = ["LOOKUP_ROWS", "WRITE_ROWS", "CacheSession"]

log = logging.getLogger(__name__)

LOOKUP_ROWS = 512  # rows whose keys go to the cache thread at once
WRITE_ROWS = 256  # answers stored per transaction


class CacheSession:
    """The response cache as one run uses it: lookups and writes on a thread of their own.

    Built by the engine (`CacheSession.open(config, base_url)`); every method but the
    blocking ones runs on the event loop. A failed write is one warning, and the run goes on
    without storing (the checkpoint is what must not fail); a failed lookup is a miss.
    """

    def __init__(self, cache: ResponseCache, mode: str, key_url: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.cache = cache
        self.mode = mode
        self.key_url = key_url
        self.reads = mode in ("read-write", "read-only")
        self.writes = mode in ("read-write", "write-only", "refresh")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-cache")
        self._keys: dict[int, bytes] = {}  # row index -> key, for rows looked up and missed
        self._pending: list[tuple[Any, ...]] = []  # rows for store_rows, answers not yet JSON
        self._futures: list[Any] = []
        self._hits: dict[str | None, list[float]] = {}
        self._broken_reads = False
        self._broken_writes = False
        self.schema: Any = None  # a --json-schema run's Schema: a hit must pass it
        self.hits = 0
        self.stored = 0

    @classmethod
    def open(cls, cache: bool | Path | str | None, mode: str, key_url: str) -> CacheSession | None:
        """The session for a run's `cache` setting (None when the cache is off)."""
        if cache is None or cache is False:
            return None
        path = default_cache_path() if cache is True else Path(cache)
        return cls(ResponseCache.open(path), mode, key_url)

    # -- reading -------------------------------------------------------------------------

    async def lookup(
        self, rows: Sequence[Any]
    ) -> tuple[list[CachedAnswer | None], list[int]]:
        """Each row's stored answer (or None) and request hash; off the event loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        keys, hashes, answers = await loop.run_in_executor(self._executor, self._lookup, rows)
        if self.schema is not None:
            answers = [self._checked(row, a) for row, a in zip(rows, answers)]
        if self.writes:
            for row, key, answer in zip(rows, keys, answers):
                if answer is None:
                    self._keys[row.index] = key
        return answers, hashes

    def _checked(self, row: Any, answer: CachedAnswer | None) -> CachedAnswer | None:
        """A hit for a --json-schema run: valid against its schema (else a miss), `parsed` set.

        An answer stored by a structured run carries its check; one stored by another run of
        the same request is checked here.
        """
        if answer is None or answer.parsed is not None:
            return answer
        from batchrunner.answers.structured import names_function

        check = self.schema.check_answer(answer, names_function(row.body))
        if not check.valid:
            return None
        answer.parsed, answer.reasks, answer.reask_cost_usd = check.parsed, 0, 0.0
        return answer

    def _lookup(
        self, rows: Sequence[Any]
    ) -> tuple[list[bytes], list[int], list[CachedAnswer | None]]:
        # One canonical form of each body gives both its cache key and its checkpoint hash.
        prefix = hashlib.sha256(self.key_url.rstrip("/").encode() + b"\n")
        keys: list[bytes] = []
        hashes: list[int] = []
        for row in rows:
            canonical = _canonical(row.body)
            digest = prefix.copy()
            digest.update(canonical)
            keys.append(digest.digest())
            small = hashlib.blake2b(canonical, digest_size=8).digest()
            hashes.append(int.from_bytes(small, "little", signed=True) or 1)
        if self._broken_reads:
            return keys, hashes, [None] * len(keys)
        try:
            found = self.cache.lookup(keys)
        except sqlite3.Error as exc:
            self._broken_reads = True
            log.warning("response cache %s: cannot read it (%s); rows are sent instead",
                        self.cache.path, exc)
            return keys, hashes, [None] * len(keys)
        return keys, hashes, [found.get(key) for key in keys]

    def hit_result(self, row: Any, answer: CachedAnswer) -> Result:
        """The Result of a row served from the cache: attempts 0, the first-paid figures."""
        self.hits += 1
        model = row.body.get("model")
        counts = self._hits.get(model)
        if counts is None:
            counts = self._hits[model] = [0, 0.0]
        counts[0] += 1
        counts[1] += answer.cost_usd or 0.0
        choices = answer.choices
        return Result(
            index=row.index,
            id=row.id,
            status="ok",
            model=model,
            content=choices[0] if choices else None,
            choices=answer.choices,
            finish_reason=answer.finish_reason,
            response_model=answer.response_model,
            usage=answer.usage,
            cost_usd=answer.cost_usd,
            attempts=0,
            response_id=answer.response_id,
            refusal=answer.refusal,
            cache_hit=True,
            tool_calls=answer.tool_calls,
            logprobs=answer.logprobs,
            choices_tool_calls=answer.choices_tool_calls,
            parsed=answer.parsed,
            reasks=answer.reasks,
            reask_cost_usd=answer.reask_cost_usd,
        )

    # -- writing -------------------------------------------------------------------------

    def offer(self, row: Any, result: Any) -> None:
        """Store a sent row's answer, if it may be stored (ok, finish reason stop/tool_calls);
        called for every row taken to be sent (`result` None when it got none), so that the
        key kept for it since its lookup goes either way."""
        key = self._keys.pop(row.index, None)
        if not self.writes or self._broken_writes or result is None:
            return
        if not result.ok or result.finish_reason not in STORABLE_FINISH_REASONS:
            return
        if key is None:
            key = cache_key(row.body, self.key_url)
        usage = result.usage
        self._pending.append((
            key,
            result.model,
            (list(result.choices or ()), result.finish_reason, result.response_model,
             result.response_id, result.refusal, result.tool_calls, result.logprobs,
             None if result.choices_tool_calls is None else list(result.choices_tool_calls),
             usage.reasoning_tokens, result.parsed, result.reasks, result.reask_cost_usd),
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            usage.cached_tokens,
            result.cost_usd,
            time.time(),
        ))
        if len(self._pending) >= WRITE_ROWS:
            self._submit_writes()

    def _submit_writes(self) -> None:
        entries, self._pending = self._pending, []
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self._executor.submit(self._store, entries))

    def _store(self, entries: list[tuple[Any, ...]]) -> None:
        if self._broken_writes:
            return
        try:
            dumps = orjson.dumps
            rows = [
                (key, model, dumps(_answer_json(*a)), *rest) for key, model, a, *rest in entries
            ]
            self.stored += self.cache.store_rows(rows)
        except (sqlite3.Error, OSError) as exc:
            self._broken_writes = True
            log.warning(
                "response cache %s: cannot store answers (%s); the run goes on without "
                "storing (%d answers not stored)", self.cache.path, exc, len(entries),
            )

    def _finish(self) -> None:
        if self._hits:
            try:
                self.cache.record_hits({m: (int(n), s) for m, (n, s) in self._hits.items()})
            except (sqlite3.Error, OSError):
                pass  # statistics only; a broken cache was already warned about
        self.cache.close()

    async def close(self) -> None:
        """Store what is pending, record the hit statistics, close; off the event loop."""
        import asyncio

        if self._pending:
            self._submit_writes()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._finish)
        self._executor.shutdown(wait=True)
