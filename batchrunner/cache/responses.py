"""The response cache file: answers already paid for, shared across outputs and runs.

One SQLite file (the standard library's sqlite3) in WAL mode with a busy timeout, so that
several processes (two cron jobs) read and write it at once; each process has one connection,
used by one thread only, so lookups and writes never block the event loop and one process is
one writer. Every write is one transaction: a process killed at any instant leaves either all
of a batch or none of it (SQLite's journal), never a torn entry.

The key is the SHA-256 of the gateway's base URL and the canonical request body (every field,
keys sorted at every level, `stream` and `stream_options` left out): never the API key. Only ok
answers whose finish reason is `stop` or `tool_calls` are stored (docs/cache.md). A run uses the
cache through `CacheSession` (session.py).

    cache = ResponseCache.open(default_cache_path())
    hits = cache.lookup([cache_key(body, base_url)])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchrunner.config.durations import parse_duration
from batchrunner.errors import UsageError
from batchrunner.results import Usage

__all__ = [
    "CACHE_MODES",
    "CacheStats",
    "CachedAnswer",
    "ResponseCache",
    "STORABLE_FINISH_REASONS",
    "cache_key",
    "cache_stats",
    "clear_cache",
    "default_cache_path",
    "prune_cache",
    "request_hash",
    "parse_age",
]

log = logging.getLogger(__name__)

CACHE_MODES = ("read-write", "read-only", "write-only", "refresh")
STORABLE_FINISH_REASONS = frozenset({"stop", "tool_calls"})
BUSY_TIMEOUT_MS = 60_000  # another process's write transaction: wait this long, then fail
_LOOKUP_CHUNK = 500  # keys per SELECT (SQLite allows 32,766 parameters; small is quicker)
_LEFT_OUT = ("stream", "stream_options")

# A rowid table, keys in a unique index: new answers append to the table and only the small
# index takes random inserts (a third of the cost of a WITHOUT ROWID table of whole answers).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key BLOB NOT NULL UNIQUE,
    model TEXT,
    answer BLOB NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    cached_tokens INTEGER,
    cost_usd REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS hits (
    model TEXT PRIMARY KEY,
    hits INTEGER NOT NULL,
    cost_saved REAL NOT NULL
);
"""


def default_cache_path(environ: Mapping[str, str] | None = None) -> Path:
    """$BATCHRUNNER_CACHE, else $XDG_CACHE_HOME/batchrunner/responses.sqlite, else ~/.cache/..."""
    environ = os.environ if environ is None else environ
    if environ.get("BATCHRUNNER_CACHE"):
        return Path(environ["BATCHRUNNER_CACHE"]).expanduser()
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchrunner" / "responses.sqlite"


def _canonical(body: Mapping[str, Any]) -> bytes:
    trimmed = {k: v for k, v in body.items() if k not in _LEFT_OUT}
    try:
        return orjson.dumps(trimmed, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson refuses (integers over 64 bits): the slower, same-rule path
        return json.dumps(
            trimmed, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        ).encode()


def request_hash(body: Mapping[str, Any]) -> int:
    """A 64-bit hash of a request body (never 0), that the checkpoint keeps per row."""
    digest = hashlib.blake2b(_canonical(body), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def cache_key(body: Mapping[str, Any], base_url: str) -> bytes:
    """The 32-byte key of a request: SHA-256 of the base URL and the canonical body."""
    digest = hashlib.sha256(base_url.rstrip("/").encode())
    digest.update(b"\n")
    digest.update(_canonical(body))
    return digest.digest()


@dataclass(slots=True)  # not frozen: one is made per hit, and frozen ones cost 3x as much
class CachedAnswer:
    """A stored answer: what was paid for the first time it was asked."""

    choices: tuple[str | None, ...]
    finish_reason: str
    response_model: str | None
    response_id: str | None
    model: str | None
    usage: Usage
    cost_usd: float | None
    created: float
    refusal: str | None = None  # the model's refusal, when it refused (content null)
    # the rest of an answer kept whole (JSON text) and, for a --json-schema run, its check
    tool_calls: str | None = None
    logprobs: str | None = None
    choices_tool_calls: tuple[str | None, ...] | None = None
    parsed: str | None = None
    reasks: int | None = None
    reask_cost_usd: float | None = None

    @property
    def content(self) -> str | None:
        """The first choice's content."""
        return self.choices[0] if self.choices else None


@dataclass(frozen=True)
class CacheStats:
    """What `batchrunner cache stats` shows."""

    path: Path
    entries: int
    size_bytes: int
    oldest: float | None
    newest: float | None
    hits_by_model: dict[str, int]
    cost_saved_usd: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "path": str(self.path),
            "entries": self.entries,
            "size_bytes": self.size_bytes,
            "oldest": self.oldest,
            "newest": self.newest,
            "hits_by_model": dict(self.hits_by_model),
            "hits": sum(self.hits_by_model.values()),
            "cost_saved_usd": round(self.cost_saved_usd, 10),
        }


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' (any duration of durations.py) as seconds; else UsageError."""
    seconds = parse_duration(text)
    if seconds is None:
        raise UsageError(f"--older-than {text!r}: expected a duration such as 30d, 12h or 90m")
    return seconds


def _create_private(path: Path) -> None:
    """Create the file (and its folder) readable by its owner only, before SQLite opens it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
    except OSError as exc:
        raise UsageError(f"cannot create the response cache {path}: {exc.strerror}") from None


class ResponseCache:
    """One process's connection to a cache file; every method may be called from any one thread.

    Not for concurrent use by several threads at once: the engine gives it one thread of its
    own. Several processes may share the file.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> ResponseCache:
        """Open (creating, mode 0600) the cache at `path`; a UsageError if it cannot be."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise UsageError(f"the response cache {path} is a folder, not a file")
        existed = path.exists()
        if not existed:
            _create_private(path)
        try:
            db = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"the response cache {path} cannot be used: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("response cache %s: WAL mode unavailable (%s)", path, mode)
            db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a killed process loses nothing
            db.execute("PRAGMA cache_size = -65536")  # 64 MB of pages: a big cache stays warm
            db.execute("PRAGMA mmap_size = 1073741824")  # reads from the page cache, no copies
            with _transaction(db):
                for statement in _statements():
                    db.execute(statement)
        except BaseException as exc:
            db.close()  # not left for the garbage collector (Python 3.13 warns of it)
            if isinstance(exc, sqlite3.DatabaseError):
                raise UsageError(f"the response cache {path} cannot be used: {exc}") from None
            raise
        cache = cls(path, db)
        cache._private_sidecars()
        return cache

    def _private_sidecars(self) -> None:
        # SQLite gives -wal and -shm the main file's mode; this makes sure of it.
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.chmod(f"{self.path}{suffix}", 0o600)

    def close(self) -> None:
        """Close the connection (a checkpoint of the WAL happens when the last one closes)."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- lookups and writes ----------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, CachedAnswer]:
        """The stored answers of those keys that have one."""
        found: dict[bytes, CachedAnswer] = {}
        with self._lock:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    "SELECT key, model, answer, prompt_tokens, completion_tokens, total_tokens,"
                    f" cached_tokens, cost_usd, created FROM responses WHERE key IN ({marks})",
                    chunk,
                ).fetchall()
                for key, model, answer, pt, ct, tt, cached, cost, created in rows:
                    data = orjson.loads(answer)
                    calls = data.get("choices_tool_calls")
                    found[key] = CachedAnswer(
                        tuple(data["choices"]),
                        data["finish_reason"],
                        data.get("response_model"),
                        data.get("response_id"),
                        model,
                        Usage(pt, ct, tt, cached, data.get("reasoning_tokens")),
                        cost,
                        created,
                        data.get("refusal"),
                        data.get("tool_calls"),
                        data.get("logprobs"),
                        None if calls is None else tuple(calls),
                        data.get("parsed"),
                        data.get("reasks"),
                        data.get("reask_cost_usd"),
                    )
        return found

    def store_rows(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Store rows already in the table's layout (key, model, answer JSON, the usage figures,
        cost, created), in one transaction (`CacheSession` builds them)."""
        if not rows:
            return 0
        with self._lock, _transaction(self._db):
            self._db.executemany(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
        return len(rows)

    def record_hits(self, by_model: Mapping[str | None, tuple[int, float]]) -> None:
        """Add served hits (count, cost saved) per model to the cache's statistics."""
        rows = [(model or "", n, saved) for model, (n, saved) in by_model.items() if n]
        if not rows:
            return
        with self._lock, _transaction(self._db):
            self._db.executemany(
                "INSERT INTO hits VALUES (?, ?, ?) ON CONFLICT (model) DO UPDATE SET"
                " hits = hits + excluded.hits, cost_saved = cost_saved + excluded.cost_saved",
                rows,
            )

    # -- maintenance -----------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """Entries, size, hits by model and cost saved."""
        with self._lock:
            entries, oldest, newest = self._db.execute(
                "SELECT count(*), min(created), max(created) FROM responses"
            ).fetchone()
            hits = self._db.execute("SELECT model, hits, cost_saved FROM hits ORDER BY model")
            rows = hits.fetchall()
        size = sum(
            os.path.getsize(f"{self.path}{s}")
            for s in ("", "-wal")
            if os.path.exists(f"{self.path}{s}")
        )
        return CacheStats(
            path=self.path,
            entries=int(entries),
            size_bytes=size,
            oldest=oldest,
            newest=newest,
            hits_by_model={model: int(n) for model, n, _ in rows},
            cost_saved_usd=float(sum(saved for _, _, saved in rows)),
        )

    def prune(self, older_than_seconds: float, *, now: float | None = None) -> int:
        """Remove the answers stored more than that many seconds ago; returns how many."""
        limit = (time.time() if now is None else now) - older_than_seconds
        with self._lock, _transaction(self._db):
            removed = self._db.execute("DELETE FROM responses WHERE created < ?", (limit,))
            count = removed.rowcount
        self._vacuum()
        return count

    def clear(self) -> int:
        """Remove every answer and the hit statistics; returns how many answers."""
        with self._lock, _transaction(self._db):
            count = self._db.execute("DELETE FROM responses").rowcount
            self._db.execute("DELETE FROM hits")
        self._vacuum()
        return count

    def _vacuum(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.OperationalError):  # busy: space stays
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


_ANSWER_FIELDS = (
    "choices", "finish_reason", "response_model", "response_id", "refusal", "tool_calls",
    "logprobs", "choices_tool_calls", "reasoning_tokens", "parsed", "reasks", "reask_cost_usd",
)


def _answer_json(*values: Any) -> dict[str, Any]:
    """The stored answer's JSON object (fields after `refusal` only where set: older entries
    and plain answers stay as small as before)."""
    data = dict(zip(_ANSWER_FIELDS, values, strict=True))
    return {k: v for i, (k, v) in enumerate(data.items()) if i < 5 or v is not None}


def _statements() -> list[str]:
    return [s.strip() for s in _SCHEMA.split(";") if s.strip()]


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):  # type: ignore[no-untyped-def]
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): the write lock is taken at once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# -- what `batchrunner cache` does ------------------------------------------------------------


def _existing(path: Path | str | None) -> ResponseCache:
    where = default_cache_path() if path is None else Path(path).expanduser()
    if not where.exists():
        raise UsageError(f"no response cache at {where}")
    return ResponseCache.open(where)


def cache_stats(path: Path | str | None = None) -> CacheStats:
    """`batchrunner cache stats`: the figures of the cache at `path` (default: the default)."""
    with _existing(path) as cache:
        return cache.stats()


def prune_cache(path: Path | str | None, older_than: str) -> int:
    """`batchrunner cache prune --older-than AGE`: how many answers were removed."""
    seconds = parse_age(older_than)
    with _existing(path) as cache:
        return cache.prune(seconds)


def clear_cache(path: Path | str | None = None) -> int:
    """`batchrunner cache clear`: how many answers were removed."""
    with _existing(path) as cache:
        return cache.clear()
