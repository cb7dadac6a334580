"""The response cache (docs/cache.md): keys, storage, the engine's use of it, and its safety.

Runs go through the library against the gateway simulator on loopback; its request counters
say what was really sent. Sharing and crash tests use real CLI processes and real signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrunner import RunConfig, run
from batchrunner.cache.responses import (
    ResponseCache,
    cache_key,
    cache_stats,
    default_cache_path,
    parse_age,
)
from batchrunner.cache.session import CacheSession
from batchrunner.cli.commands import main
from batchrunner.errors import UsageError
from batchrunner.results import Result, Row, Usage

KEY = "sk-ru-cache-tests-9d2e4f6a8b0c1e3a5c7e"
MODEL = "gpt-4o-mini"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return KEY


def write_input(path: Path, rows: int, start: int = 0) -> Path:
    words = ["harbour", "lattice", "meadow", "quartz", "saffron", "tundra", "vector", "willow"]
    with open(path, "w") as handle:
        for i in range(start, start + rows):
            prompt = f"Write about {words[i % 8]} and {words[(i * 3) % 8]}, take {i}."
            handle.write(json.dumps({"id": f"r{i:05d}", "prompt": prompt}) + "\n")
    return path


def go(source: Path, output: Path, base_url: str, cache: Path | None, **settings: Any):  # type: ignore[no-untyped-def]
    settings.setdefault("model", MODEL)
    config = RunConfig(input=source, output=output, base_url=base_url, cache=cache, **settings)
    report = run(config, handle_signals=False)
    rows = pq.read_table(output).to_pylist() if output.exists() else None
    return report, rows


URL = "http://127.0.0.1:1/v1"


def answer(finish_reason: str = "stop", text: str = "hello") -> Result:
    return Result(index=0, id="r", status="ok", model="m", content=text, choices=(text,),
                  finish_reason=finish_reason, response_model="m-1", response_id="chatcmpl-1",
                  usage=Usage(3, 4, 7, 0), cost_usd=0.25)


def body(name: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": name}]}


def store(path: Path, answers: dict[str, Result]) -> int:
    """Store answers as a run does (`CacheSession.offer`, then `close`); returns how many."""

    async def offer_all() -> int:
        session = CacheSession.open(path, "write-only", URL)
        assert session is not None
        for index, (name, result) in enumerate(answers.items()):
            session.offer(Row(index, name, body(name)), result)
        await session.close()
        return session.stored

    return asyncio.run(offer_all())


def key(name: str) -> bytes:
    return cache_key(body(name), URL)


# -- keys and storage ---------------------------------------------------------------------------


def test_key_is_canonical_and_leaves_streaming_out() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    same = {"temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m",
            "stream": True, "stream_options": {"include_usage": True}}
    url = "http://127.0.0.1:1/v1"
    assert cache_key(body, url) == cache_key(same, url)
    assert cache_key(body, url) == cache_key(body, url + "/")
    assert cache_key(body, url) != cache_key(body, "http://127.0.0.1:2/v1")
    assert cache_key(body, url) != cache_key({**body, "temperature": 1}, url)
    assert cache_key(body, url) != cache_key({**body, "seed": 1}, url)
    assert len(cache_key(body, url)) == 32


def test_default_path_follows_the_environment(tmp_path: Path) -> None:
    assert default_cache_path({"BATCHRUNNER_CACHE": str(tmp_path / "c.db")}) == tmp_path / "c.db"
    assert default_cache_path({"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "batchrunner" / "responses.sqlite")
    home = default_cache_path({})
    assert home == Path.home() / ".cache" / "batchrunner" / "responses.sqlite"


def test_file_and_its_wal_are_private_and_only_stop_answers_are_stored(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "responses.sqlite"
        stored = store(path, {"a": answer("stop"), "b": answer("length"),
                              "c": answer("tool_calls"), "d": answer("content_filter")})
        assert stored == 2
        with ResponseCache.open(path) as cache:
            found = cache.lookup([key("a"), key("b"), key("c"), key("d"), key("e")])
            assert set(found) == {key("a"), key("c")}
            assert found[key("a")].usage == Usage(3, 4, 7, 0)
            assert found[key("a")].cost_usd == 0.25 and found[key("a")].content == "hello"
            for suffix in ("", "-wal", "-shm"):
                mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
                assert mode == 0o600, (suffix, oct(mode))
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
            mode = cache._db.execute("PRAGMA journal_mode").fetchone()[0]
            assert mode == "wal"
    finally:
        os.umask(old)


def test_prune_clear_and_ages(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    assert store(path, {"o": answer(text="x"), "n": answer()}) == 2
    with ResponseCache.open(path) as cache:
        with cache._db:  # "o" was stored 40 days ago
            cache._db.execute("UPDATE responses SET created = ? WHERE key = ?",
                              (time.time() - 40 * 86400, key("o")))
        assert cache.prune(parse_age("30d")) == 1
        assert set(cache.lookup([key("o"), key("n")])) == {key("n")}
        assert cache.clear() == 1
        assert cache.stats().entries == 0
    assert parse_age("12h") == 43200 and parse_age("90m") == 5400 and parse_age("2w") == 1209600
    for bad in ("", "30", "d", "-1d", "xd", "infd"):
        with pytest.raises(UsageError):
            parse_age(bad)


def test_a_folder_or_a_corrupt_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a folder"):
        ResponseCache.open(tmp_path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UsageError, match="cannot be used"):
        ResponseCache.open(junk)


def test_a_file_that_is_not_a_database_leaves_no_connection_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection that found the file unusable is closed, not left to the garbage
    collector (Python 3.13 warns of an unclosed database: `--cache junk.sqlite` printed a
    ResourceWarning after its error line)."""
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def recording_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", recording_connect)
    with pytest.raises(UsageError, match="cannot be used"):
        ResponseCache.open(junk)
    monkeypatch.undo()
    assert opened
    for db in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            db.execute("SELECT 1")

    # As a user meets it, with every ResourceWarning shown: one line.
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-m", "batchrunner", "run", "-i", str(source), "-o",
         str(tmp_path / "o.parquet"), "-m", MODEL, "--local", f"--cache={junk}"],
        capture_output=True, text=True, env=child_env(), timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"batchrunner: error: the response cache {junk} cannot be used: file is not a database"]


# -- the engine -----------------------------------------------------------------------------


def test_a_hit_sends_nothing_and_carries_what_was_first_paid(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = write_input(tmp_path / "in.jsonl", 40)
    cache = tmp_path / "cache.sqlite"
    first, paid = go(source, tmp_path / "a.parquet", gateway.base_url, cache, concurrency=8)
    assert first.exit_code == 0 and gateway.stats.requests == 40
    assert first.cache_hits == 0 and first.cost_usd > 0
    assert all(r["cache_hit"] is False and r["attempts"] == 1 for r in paid)

    gateway.stats.reset()
    second, served = go(source, tmp_path / "b.parquet", gateway.base_url, cache, concurrency=8)
    assert gateway.stats.requests == 0  # every row came from the cache
    assert second.exit_code == 0 and second.sent == 0 and second.ok == 40
    assert second.cache_hits == 40 and second.cost_usd == 0
    assert second.reused_cost_usd == pytest.approx(first.cost_usd)
    for before, after in zip(paid, served):
        assert after["cache_hit"] is True and after["attempts"] == 0
        for column in ("id", "content", "choices", "finish_reason", "response_model",
                       "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
                       "cost_usd", "response_id", "model", "status"):
            assert after[column] == before[column], column
    # The key is never in the cache file.
    data = b"".join(Path(f"{cache}{s}").read_bytes() for s in ("", "-wal")
                    if Path(f"{cache}{s}").exists())
    assert KEY.encode() not in data
    stats = cache_stats(cache)
    assert stats.entries == 40 and stats.hits_by_model == {MODEL: 40}
    assert stats.cost_saved_usd == pytest.approx(first.cost_usd)


def test_a_length_answer_is_never_served_from_the_cache(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = write_input(tmp_path / "in.jsonl", 60)
    cache = tmp_path / "cache.sqlite"
    _, first = go(source, tmp_path / "a.parquet", gateway.base_url, cache, params={"max_tokens": 25})
    cut = [r["id"] for r in first if r["finish_reason"] == "length"]
    whole = [r["id"] for r in first if r["finish_reason"] == "stop"]
    assert cut and whole  # the simulator's answer lengths straddle 25 tokens
    gateway.stats.reset()
    _, second = go(source, tmp_path / "b.parquet", gateway.base_url, cache, params={"max_tokens": 25})
    assert gateway.stats.requests == len(cut)  # only the truncated rows were sent again
    hits = {r["id"] for r in second if r["cache_hit"]}
    assert hits == set(whole)
    assert all(r["attempts"] == 1 for r in second if r["id"] in cut)


def test_settings_are_part_of_the_key(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = write_input(tmp_path / "in.jsonl", 10)
    cache = tmp_path / "cache.sqlite"
    go(source, tmp_path / "a.parquet", gateway.base_url, cache)
    gateway.stats.reset()
    go(source, tmp_path / "b.parquet", gateway.base_url, cache, params={"temperature": 0.5})
    assert gateway.stats.requests == 10  # another request body: nothing reused
    gateway.stats.reset()
    go(source, tmp_path / "c.parquet", gateway.base_url, cache, stream=True)
    assert gateway.stats.requests == 0  # streaming is left out of the key


def test_cache_modes(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = write_input(tmp_path / "in.jsonl", 12)
    cache = tmp_path / "cache.sqlite"
    go(source, tmp_path / "ro.parquet", gateway.base_url, cache, cache_mode="read-only")
    assert gateway.stats.requests == 12 and cache_stats(cache).entries == 0  # read-only: no store

    gateway.stats.reset()
    go(source, tmp_path / "wo.parquet", gateway.base_url, cache, cache_mode="write-only")
    assert gateway.stats.requests == 12 and cache_stats(cache).entries == 12

    gateway.stats.reset()
    go(source, tmp_path / "wo2.parquet", gateway.base_url, cache, cache_mode="write-only")
    assert gateway.stats.requests == 12  # write-only never reads

    gateway.stats.reset()
    _, rows = go(source, tmp_path / "ro2.parquet", gateway.base_url, cache, cache_mode="read-only")
    assert gateway.stats.requests == 0 and all(r["cache_hit"] for r in rows)

    with contextlib.closing(sqlite3.connect(cache)) as db:
        before = dict(db.execute("SELECT key, created FROM responses"))
    gateway.stats.reset()
    _, rows = go(source, tmp_path / "rf.parquet", gateway.base_url, cache, cache_mode="refresh")
    assert gateway.stats.requests == 12 and not any(r["cache_hit"] for r in rows)
    with contextlib.closing(sqlite3.connect(cache)) as db:
        after = dict(db.execute("SELECT key, created FROM responses"))
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)


def test_max_cost_counts_only_what_is_paid(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache.sqlite"
    first_in = write_input(tmp_path / "first.jsonl", 30)
    first, paid = go(first_in, tmp_path / "a.parquet", gateway.base_url, cache,
                     params={"max_tokens": 60})
    stored = [r for r in paid if r["finish_reason"] == "stop"]
    reused = sum(r["cost_usd"] for r in stored)
    both = tmp_path / "both.jsonl"
    both.write_text(first_in.read_text() + write_input(tmp_path / "new.jsonl", 5, 30).read_text())
    gateway.stats.reset()
    # A budget far below what the 30 cached rows cost, yet enough for the 5 new ones.
    budget = first.cost_usd / 3
    report, rows = go(both, tmp_path / "b.parquet", gateway.base_url, cache,
                      max_cost=budget, params={"max_tokens": 60})
    assert report.exit_code == 0 and report.reason == "complete"
    assert len(stored) >= 20 and reused > budget
    assert gateway.stats.requests == 35 - len(stored) and report.cache_hits == len(stored)
    assert 0 < report.cost_usd <= budget
    assert report.reused_cost_usd == pytest.approx(reused)
    assert sum(1 for r in rows if r["cache_hit"]) == len(stored)


def test_a_failing_cache_write_is_one_warning_not_a_stop(
    tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    def broken(self: ResponseCache, entries: Any) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ResponseCache, "store_rows", broken)
    monkeypatch.setattr("batchrunner.cache.session.WRITE_ROWS", 4)  # several write attempts
    source = write_input(tmp_path / "in.jsonl", 30)
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        report, rows = go(source, tmp_path / "a.parquet", gateway.base_url,
                          tmp_path / "cache.sqlite", concurrency=2)
    assert report.exit_code == 0 and len(rows) == 30 and all(r["status"] == "ok" for r in rows)
    warnings = [r for r in caplog.records if "cannot store answers" in r.getMessage()]
    assert len(warnings) == 1 and "disk I/O error" in warnings[0].getMessage()


def test_status_and_summary_json_separate_paid_and_reused(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    from batchrunner import read_status

    source = write_input(tmp_path / "in.jsonl", 10)
    cache = tmp_path / "cache.sqlite"
    first, _ = go(source, tmp_path / "a.parquet", gateway.base_url, cache)
    second, _ = go(source, tmp_path / "b.parquet", gateway.base_url, cache,
                   summary_json=tmp_path / "s.json")
    state = read_status(tmp_path / "b.parquet")
    assert state.cache_hits == 10 and state.cost_usd == 0
    assert state.reused_cost_usd == pytest.approx(first.cost_usd)
    figures = json.loads((tmp_path / "s.json").read_text())
    assert figures["cache_hits"] == 10 and figures["cost_usd"] == 0
    assert figures["reused_cost_usd"] == pytest.approx(first.cost_usd)
    # Resuming a finished cached output keeps the split.
    third, _ = go(source, tmp_path / "b.parquet", gateway.base_url, cache)
    assert third.cache_hits == 10 and third.cost_usd == 0


# -- the command line -----------------------------------------------------------------------


def test_cli_cache_option_job_key_and_cache_commands(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    source = write_input(tmp_path / "in.jsonl", 8)
    cache = tmp_path / "c.sqlite"
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out/a.parquet"\nmodel = "{MODEL}"\n'
                   f'base_url = "{gateway.base_url}"\ncache = "c.sqlite"\n')
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(job), "-q"])
    assert result.exit_code == 0, result.output
    assert cache_stats(cache).entries == 8
    gateway.stats.reset()
    env = {"BATCHRUNNER_CACHE": str(cache)}
    result = runner.invoke(main, ["run", "-i", str(source), "-o", str(tmp_path / "b.parquet"),
                                  "-m", MODEL, "--base-url", gateway.base_url, "--cache"], env=env)
    assert result.exit_code == 0, result.output
    assert gateway.stats.requests == 0
    assert "reused from the response cache (8 rows)" in result.output
    status = runner.invoke(main, ["status", str(tmp_path / "b.parquet")])
    assert "8 rows from the response cache" in status.output

    stats = runner.invoke(main, ["cache", "stats", "--format", "json"], env=env)
    assert stats.exit_code == 0 and json.loads(stats.output)["entries"] == 8
    assert json.loads(stats.output)["hits_by_model"] == {MODEL: 8}
    pruned = runner.invoke(main, ["cache", "prune", "--older-than", "30d"], env=env)
    assert pruned.exit_code == 0 and "removed 0 answers" in pruned.output
    bad = runner.invoke(main, ["cache", "prune", "--older-than", "soon"], env=env)
    assert bad.exit_code == 2 and "--older-than" in bad.output
    cleared = runner.invoke(main, ["cache", "clear", "--path", str(cache)])
    assert cleared.exit_code == 0 and "removed 8 answers" in cleared.output
    missing = runner.invoke(main, ["cache", "stats", "--path", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 2 and "no response cache" in missing.output
    wrong = runner.invoke(main, ["run", "--cache", str(job)])
    assert wrong.exit_code == 2 and "job file" in wrong.output
    mode = runner.invoke(main, ["run", str(job), "--cache-mode", "sometimes"])
    assert mode.exit_code == 2


def test_job_key_cache_must_be_a_boolean_or_a_path(tmp_path: Path) -> None:
    from batchrunner.config.jobs import load_job

    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "o.parquet"\ncache = true\n')
    assert load_job(job)["cache"] is True
    job.write_text('input = "in.jsonl"\noutput = "o.parquet"\ncache = "sub/c.sqlite"\n')
    assert load_job(job)["cache"] == tmp_path / "sub" / "c.sqlite"
    job.write_text('input = "in.jsonl"\noutput = "o.parquet"\ncache = 3\n')
    with pytest.raises(UsageError, match="`cache` must be true, false or a path"):
        load_job(job)
    job.write_text('input = "in.jsonl"\noutput = "o.parquet"\ncache_mode = "never"\n')
    with pytest.raises(UsageError, match="cache_mode"):
        load_job(job)


# -- sharing and crashes: real processes ------------------------------------------------------


def cli(source: Path, output: Path, base_url: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o", str(output),
            "-m", MODEL, "--base-url", base_url, f"--cache={cache}", "-q", *extra]


def child_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "RU_LLM_API_KEY": KEY,
            "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def integrity(cache: Path) -> tuple[str, int]:
    with contextlib.closing(sqlite3.connect(cache, timeout=30)) as db:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        count = db.execute("SELECT count(*) FROM responses").fetchone()[0]
    return check, count


def test_two_runs_share_one_cache_at_once(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(latency_ms=2.0)
    cache = tmp_path / "shared.sqlite"
    a = write_input(tmp_path / "a.jsonl", 600)
    b = write_input(tmp_path / "b.jsonl", 600, start=300)  # half overlaps a
    procs = [subprocess.Popen(cli(src, tmp_path / f"{src.stem}.parquet", gw.base_url, cache,
                                  "-c", "16", "--checkpoint-every", "20"),
                              env=child_env(), stderr=subprocess.PIPE, text=True)
             for src in (a, b)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    check, count = integrity(cache)
    assert check == "ok" and count == 900  # every distinct request, once
    gw.stats.reset()
    for src in (a, b):
        subprocess.run(cli(src, tmp_path / f"again-{src.stem}.parquet", gw.base_url, cache),
                       env=child_env(), check=True, timeout=120)
    assert gw.stats.requests == 0  # nothing lost: both reruns served whole from the cache


def test_sigkill_mid_write_loses_and_corrupts_nothing(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway()
    cache = tmp_path / "c.sqlite"
    source = write_input(tmp_path / "in.jsonl", 3000)
    output = tmp_path / "out.parquet"
    counts = []
    for kill_at in (60, 700, 1500):  # stored answers at the moment of the kill
        proc = subprocess.Popen(cli(source, output, gw.base_url, cache, "-c", "32"),
                                env=child_env(), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        stored = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if cache.exists():
                try:
                    stored = integrity(cache)[1]
                except sqlite3.OperationalError:
                    stored = 0  # the schema is being created
                if stored >= kill_at:
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        check, count = integrity(cache)
        assert check == "ok" and count >= stored
        counts.append(count)
    assert counts == sorted(counts)  # nothing stored before a kill went missing after it
    # Every stored answer is whole and served: a fresh output sends only what the cache lacks.
    _, stored = integrity(cache)
    gw.stats.reset()
    done = subprocess.run(cli(source, tmp_path / "fresh.parquet", gw.base_url, cache),
                          env=child_env(), timeout=120, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(tmp_path / "fresh.parquet").to_pylist()
    assert len(rows) == 3000 and all(r["status"] == "ok" for r in rows)
    assert sum(r["cache_hit"] for r in rows) == stored
    assert gw.stats.requests == 3000 - stored
    assert integrity(cache) == ("ok", 3000)


def test_a_checkpoint_written_before_the_cache_hit_column_still_resumes(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    from batchrunner.store.checkpoint import checkpoint_dir

    source = write_input(tmp_path / "in.jsonl", 20)
    output = tmp_path / "out.parquet"
    go(source, output, gateway.base_url, None, limit=12)
    # Rewrite the segment in the layout of before: no cache_hit column.
    segment = next(checkpoint_dir(output).glob("part-*.arrows"))
    with pa.ipc.open_stream(pa.py_buffer(segment.read_bytes())) as reader:
        table = reader.read_all().drop_columns(["cache_hit"])
    with pa.ipc.new_stream(segment, table.schema) as writer:
        writer.write_table(table)
    output.unlink()
    gateway.stats.reset()
    report, rows = go(source, output, gateway.base_url, None)
    assert gateway.stats.requests == 8 and report.resumed == 12 and len(rows) == 20
    assert [r["cache_hit"] for r in rows] == [None] * 12 + [False] * 8


def test_estimate_with_cache_counts_only_the_rows_the_cache_lacks(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    from batchrunner import PriceTable, estimate

    cache = tmp_path / "c.sqlite"
    _, first = go(write_input(tmp_path / "old.jsonl", 10), tmp_path / "a.parquet",
                  gateway.base_url, cache, params={"max_tokens": 400})
    assert all(r["finish_reason"] == "stop" for r in first)
    source = write_input(tmp_path / "in.jsonl", 15)
    config = RunConfig(input=source, output=tmp_path / "b.parquet", model=MODEL,
                       base_url=gateway.base_url, params={"max_tokens": 400})
    full = estimate(config, prices=PriceTable.load())
    part = estimate(config.replace(cache=cache), prices=PriceTable.load())
    assert full.rows_to_send == 15 and full.cached_rows == 0
    assert part.rows == 15 and part.rows_to_send == 5 and part.cached_rows == 10
    assert part.cost_usd.high == pytest.approx(full.cost_usd.high / 3, rel=0.2)
    refresh = estimate(config.replace(cache=cache, cache_mode="refresh"), prices=PriceTable.load())
    assert refresh.rows_to_send == 15
    result = CliRunner().invoke(main, ["estimate", "-i", str(source), "-m", MODEL,
                                       "--base-url", gateway.base_url, "--max-tokens", "400",
                                       f"--cache={cache}"])
    assert result.exit_code == 0 and "10 in the response cache" in result.output
    assert gateway.stats.requests == 10  # the estimate sent nothing


def test_summary_separates_paid_and_reused(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    from batchrunner import PriceTable, summarize

    source = write_input(tmp_path / "in.jsonl", 10)
    cache = tmp_path / "c.sqlite"
    first, _ = go(source, tmp_path / "a.parquet", gateway.base_url, cache)
    go(source, tmp_path / "b.parquet", gateway.base_url, cache)
    for prices in (None, PriceTable.load()):
        report = summarize([tmp_path / "a.parquet", tmp_path / "b.parquet"], prices=prices)
        assert report.total.rows == 20 and report.total.cache_hits == 10
        assert report.total.cost_usd == pytest.approx(first.cost_usd)  # paid once
        assert report.total.reused_cost_usd == pytest.approx(first.cost_usd)
        assert report.total.unpriced_rows == 0
    result = CliRunner().invoke(main, ["summary", str(tmp_path / "b.parquet")])
    assert "10 rows came from the response cache" in result.output


def test_the_ray_engine_refuses_the_cache_rather_than_ignoring_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--cache works with the local engine only"):
        RunConfig(input=tmp_path / "in.jsonl", output=tmp_path / "o.parquet", model=MODEL,
                  engine="ray", cache=True)
