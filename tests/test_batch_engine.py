"""`--engine batch`: the same job through the provider's Batch API, never paid twice.

Runs are real subprocesses of the CLI against the gateway simulator (in a thread of the test
process, so that its batches outlive a client that is killed). A kill at a chosen step is a
wrapper that patches that step to SIGKILL its own process, then runs the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchrunner.store.batches import read_ledger
from batchrunner.store.checkpoint import checkpoint_dir

KEY = "sk-ru-batch-engine-tests-5d1c7a9e3b"
MODEL = "gpt-4o-mini"
TIMING = ("latency_ms", "ttft_ms", "response_id", "batch_id", "cost_usd")
FAST = ("--batch-poll", "0.05", "--checkpoint-every", "4")


def write_input(path: Path, rows: int) -> Path:
    with open(path, "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": f"q{i:03d}", "prompt": f"Name a colour, take {i}."})
                         + "\n")
    return path


def command(source: Path, output: Path, base_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o", str(output),
            "-m", MODEL, "--base-url", base_url, "--engine", "batch", *FAST, *extra]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["RU_LLM_API_KEY"] = KEY
    env["BATCHRUNNER_LOG_SECONDS"] = "0"
    return env


def finish(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=environment(), capture_output=True, text=True,
                          timeout=timeout)


# Patches one step of the batch engine to SIGKILL the process right after it, then runs the CLI.
KILLER = r"""
import os, signal, sys
from batchrunner.store import batches
from batchrunner.transport import batch_api
from batchrunner.engine.batch import lines
step = sys.argv[1]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if step in ("uploaded", "submitted"):
    save = batches.Ledger.save
    def saved(self):
        save(self)
        if any(b.state == step for b in self.batches):
            die()
    batches.Ledger.save = saved
elif step == "created":  # the batch exists at the gateway; the ledger does not know it
    create = batch_api.BatchApi.create
    async def created(self, *args, **kwargs):
        await create(self, *args, **kwargs)
        die()
    batch_api.BatchApi.create = created
elif step == "polling":
    retrieve = batch_api.BatchApi.retrieve
    async def retrieved(self, *args, **kwargs):
        batch = await retrieve(self, *args, **kwargs)
        if batch["status"] == "in_progress":
            die()
        return batch
    batch_api.BatchApi.retrieve = retrieved
elif step == "reading":  # in the middle of a batch's output file
    read = lines.LineReader.read
    count = [0]
    def reading(self, line):
        read(self, line)
        count[0] += 1
        if count[0] == 5:
            die()
    lines.LineReader.read = reading
elif step == "read":  # its answers durable in the checkpoint, the batch not marked collected
    from batchrunner.engine.batch import dispatcher
    def following(*args, **kwargs):
        die()
    dispatcher.retry_file = following
from batchrunner.cli.commands import main
main(sys.argv[2:], prog_name="batchrunner")
"""


def killed_at(step: str, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", KILLER, step, *cmd[3:]], env=environment(),
                          capture_output=True, text=True, timeout=120)


def get(gw: Any, path: str) -> Any:
    """GET a Batch API path of the simulator, as a client would."""
    request = urllib.request.Request(f"{gw.base_url}{path}",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as answer:
        return json.loads(answer.read())


def table(output: Path) -> list[dict[str, Any]]:
    return pq.read_table(output).to_pylist()


def same_answers(batch: list[dict[str, Any]], online: list[dict[str, Any]]) -> None:
    assert len(batch) == len(online)
    for b, o in zip(batch, online):
        assert {k: v for k, v in b.items() if k not in TIMING} == \
            {k: v for k, v in o.items() if k not in TIMING}


def test_the_output_is_the_online_engines_at_half_the_cost(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=0.3)
    source = write_input(tmp_path / "in.jsonl", 20)
    online_cmd = command(source, tmp_path / "online.parquet", gw.base_url)
    online = finish(online_cmd[:online_cmd.index("--engine")])
    assert online.returncode == 0, online.stderr
    done = finish(command(source, tmp_path / "batch.parquet", gw.base_url,
                          "--batch-max-requests", "8"))
    assert done.returncode == 0, done.stderr
    assert gw.stats.batches_created == 3  # 8 + 8 + 4
    batch, on = table(tmp_path / "batch.parquet"), table(tmp_path / "online.parquet")
    same_answers(batch, on)
    for b, o in zip(batch, on):
        assert b["cost_usd"] == pytest.approx(o["cost_usd"] / 2, rel=1e-12)
        assert b["batch_id"].startswith("batch_") and o["batch_id"] is None
    assert len({b["batch_id"] for b in batch}) == 3
    # the request files are gone once collected; the ledger says each batch is collected
    ledger = read_ledger(checkpoint_dir(tmp_path / "batch.parquet"))
    assert [e.state for e in ledger] == ["collected"] * 3
    assert not list(checkpoint_dir(tmp_path / "batch.parquet").glob("batch-*.jsonl"))
    again = finish(command(source, tmp_path / "batch.parquet", gw.base_url))
    assert again.returncode == 0 and gw.stats.batches_created == 3  # nothing sent twice


@pytest.mark.parametrize(
    "step", ["uploaded", "created", "submitted", "polling", "reading", "read"]
)
def test_a_sigkill_at_any_step_then_the_same_command_pays_nothing_twice(
    tmp_path: Path, start_gateway, step: str  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=0.6)
    source = write_input(tmp_path / "in.jsonl", 20)
    reference = finish(command(source, tmp_path / "ref.parquet", gw.base_url,
                               "--batch-max-requests", "8",
                               "--summary-json", str(tmp_path / "ref.json")))
    assert reference.returncode == 0, reference.stderr
    uninterrupted = gw.stats.batches_created
    gw.stats.reset()
    cmd = command(source, tmp_path / "out.parquet", gw.base_url, "--batch-max-requests", "8")
    killed = killed_at(step, cmd)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if step == "read":
        assert any(p.stat().st_size > 0 for p in
                   checkpoint_dir(tmp_path / "out.parquet").glob("part-*.arrows"))
    again = finish([*cmd, "--summary-json", str(tmp_path / "out.json")])
    assert again.returncode == 0, again.stderr
    assert gw.stats.batches_created == uninterrupted
    # no answer kept twice: the run's own sums are the uninterrupted run's
    ref, out = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ref", "out"))
    assert (out["total_tokens"], out["cost_usd"]) == (ref["total_tokens"], ref["cost_usd"])
    same_answers(table(tmp_path / "out.parquet"), table(tmp_path / "ref.parquet"))
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in table(tmp_path / "out.parquet"))


def test_expired_batches_keep_their_answers_and_the_rest_go_into_a_new_batch(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=0.3, batch_expire_after=5)
    source = write_input(tmp_path / "in.jsonl", 12)
    done = finish(command(source, tmp_path / "out.parquet", gw.base_url))
    assert done.returncode == 0, done.stderr
    rows = table(tmp_path / "out.parquet")
    assert [r["id"] for r in rows] == [f"q{i:03d}" for i in range(12)]
    assert all(r["status"] == "ok" for r in rows)
    assert gw.stats.batches_created == 3  # 12 lines: 5 answered, then 5 of 7, then 2
    assert sorted(r["attempts"] for r in rows) == [1] * 5 + [2] * 5 + [3] * 2


def test_retryable_line_errors_are_sent_again_in_a_following_batch(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=0.2, error_rate=0.4, fault_seed=3)
    source = write_input(tmp_path / "in.jsonl", 15)
    done = finish(command(source, tmp_path / "out.parquet", gw.base_url))
    assert done.returncode == 0, done.stderr
    rows = table(tmp_path / "out.parquet")
    assert all(r["status"] == "ok" for r in rows)
    assert max(r["attempts"] for r in rows) > 1 and gw.stats.batches_created > 1


def test_a_row_out_of_attempts_is_an_error_row_as_online(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=0.1, error_rate=1.0)
    source = write_input(tmp_path / "in.jsonl", 3)
    done = finish(command(source, tmp_path / "out.parquet", gw.base_url, "--max-attempts", "2"))
    assert done.returncode == 1, done.stderr
    rows = table(tmp_path / "out.parquet")
    assert gw.stats.batches_created == 2
    assert all(r["status"] == "error" and r["attempts"] == 2 for r in rows)
    assert all(r["error"].startswith(("HTTP 500: ", "HTTP 503: ")) for r in rows)
    assert all(r["http_status"] in (500, 503) for r in rows)
    healthy = start_gateway(batch_seconds=0.1)
    again = finish(command(source, tmp_path / "out.parquet", healthy.base_url, "--retry-failed"))
    assert again.returncode == 0, again.stderr
    assert healthy.stats.batches_created == 1
    assert all(r["status"] == "ok" for r in table(tmp_path / "out.parquet"))


def test_a_gateway_without_the_batch_api_is_a_usage_error_before_any_upload(
    tmp_path: Path,
) -> None:
    from scripted_server import Reply, scripted_server

    with scripted_server(lambda request: Reply(status=404, json={"error": {
            "message": "Not found", "type": "invalid_request_error"}})) as server:
        source = write_input(tmp_path / "in.jsonl", 3)
        done = finish(command(source, tmp_path / "out.parquet", server.base_url,
                              "--no-preflight"))
        paths = [r.path for r in server.requests]
    assert done.returncode == 2, done.stderr
    assert "this gateway has no Batch API; run without --engine batch" in done.stderr
    assert "Traceback" not in done.stderr
    assert all(not p.startswith("/v1/files") for p in paths) and paths


def test_sigint_while_waiting_leaves_the_batches_and_the_next_run_collects_them(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=3)
    source = write_input(tmp_path / "in.jsonl", 10)
    cmd = command(source, tmp_path / "out.parquet", gw.base_url, "--batch-max-requests", "5")
    proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    directory = checkpoint_dir(tmp_path / "out.parquet")
    limit = time.monotonic() + 30
    while time.monotonic() < limit:
        if sum(e.state == "submitted" for e in read_ledger(directory)) == 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "2 batches are pending at the gateway" in err
    assert "run the same command again to collect them" in err
    status = finish([sys.executable, "-m", "batchrunner", "status", str(tmp_path / "out.parquet"),
                     "--format", "json"])
    listed = json.loads(status.stdout)["batches"]
    assert [b["state"] for b in listed] == ["submitted", "submitted"]
    again = finish(cmd)
    assert again.returncode == 0, again.stderr
    assert gw.stats.batches_created == 2


def test_cancel_keeps_what_the_batches_finished(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=10)
    source = write_input(tmp_path / "in.jsonl", 40)
    cmd = command(source, tmp_path / "out.parquet", gw.base_url)
    killed = killed_at("submitted", cmd)
    assert killed.returncode == -signal.SIGKILL
    (entry,) = read_ledger(checkpoint_dir(tmp_path / "out.parquet"))
    limit = time.monotonic() + 30
    while time.monotonic() < limit:  # some lines answered, not all
        if get(gw, f"/batches/{entry.batch_id}")["request_counts"]["completed"] >= 2:
            break
        time.sleep(0.05)
    cancel = finish([sys.executable, "-m", "batchrunner", "cancel",
                     str(tmp_path / "out.parquet")])
    assert cancel.returncode == 0, cancel.stderr
    assert "cancelling" in cancel.stdout and KEY not in cancel.stdout + cancel.stderr
    again = finish(cmd)
    assert again.returncode == 0, again.stderr
    rows = table(tmp_path / "out.parquet")
    first = [r for r in rows if r["attempts"] == 1]
    assert 0 < len(first) < 40  # kept from the cancelled batch
    assert all(r["status"] == "ok" for r in rows) and gw.stats.batches_created == 2


def test_max_cost_does_not_submit_a_batch_that_could_pass_it(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=0.2)
    source = write_input(tmp_path / "in.jsonl", 20)
    # the worst case of a 10-row batch at batch prices (gpt-4o-mini, 100 tokens out each) is
    # about $0.0003: one batch fits in $0.0004, two do not
    cmd = command(source, tmp_path / "out.parquet", gw.base_url, "--batch-max-requests", "10",
                  "--max-tokens", "100", "--max-cost", "0.0004")
    done = finish(cmd)
    assert done.returncode == 5, done.stderr
    assert "was not submitted" in done.stderr
    assert gw.stats.batches_created == 1
    more = finish([*cmd[:-1], "1"])
    assert more.returncode == 0, more.stderr
    assert gw.stats.batches_created == 2


def test_the_key_is_in_no_file_metadata_or_log(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=0.2)
    source = write_input(tmp_path / "in.jsonl", 6)
    cmd = command(source, tmp_path / "out.parquet", gw.base_url, "--batch-max-requests", "3")
    killed = killed_at("submitted", cmd)  # the request files are still there
    directory = checkpoint_dir(tmp_path / "out.parquet")
    kept = [p for p in directory.iterdir() if p.is_file()]
    assert any(p.name.endswith(".jsonl") for p in kept)
    done = finish(cmd)
    assert done.returncode == 0
    for text in (killed.stderr, done.stderr, done.stdout):
        assert KEY not in text
    for path in [*kept, *directory.iterdir()]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    listed = get(gw, "/batches?limit=100")["data"]
    assert len(listed) == 2 and all(b["metadata"]["batchrunner_output"] for b in listed)
    assert KEY not in json.dumps(listed)


def test_the_deadline_stops_the_waiting_and_the_next_run_collects(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=8)
    source = write_input(tmp_path / "in.jsonl", 6)
    cmd = command(source, tmp_path / "out.parquet", gw.base_url)
    stopped = finish([*cmd, "--deadline", "4s"])
    assert stopped.returncode == 5, stopped.stderr
    assert "1 batch is pending at the gateway" in stopped.stderr
    again = finish(cmd)
    assert again.returncode == 0, again.stderr
    assert gw.stats.batches_created == 1 and len(table(tmp_path / "out.parquet")) == 6


def test_a_sweep_and_the_response_cache_work_as_online(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(batch_seconds=0.2)
    source = write_input(tmp_path / "in.jsonl", 6)
    cache = ["--cache", str(tmp_path / "cache.sqlite")]
    sweep = ["-m", "gpt-4o", "--batch-max-requests", "5"]
    online_cmd = command(source, tmp_path / "online.parquet", gw.base_url, *sweep)
    online = finish(online_cmd[:online_cmd.index("--engine")] + sweep[:2] + cache)
    assert online.returncode == 0, online.stderr
    batch = finish(command(source, tmp_path / "batch.parquet", gw.base_url, *sweep))
    assert batch.returncode == 0, batch.stderr
    assert gw.stats.batches_created == 3  # 12 rows (6 x 2 models), 5 a file
    rows = table(tmp_path / "batch.parquet")
    assert [(r["id"], r["model"]) for r in rows][:2] == [("q000", MODEL), ("q000", "gpt-4o")]
    same_answers(rows, table(tmp_path / "online.parquet"))
    # hits are served locally: nothing submitted
    hits = finish(command(source, tmp_path / "hits.parquet", gw.base_url, *sweep, *cache))
    assert hits.returncode == 0, hits.stderr
    assert gw.stats.batches_created == 3
    assert all(r["cache_hit"] for r in table(tmp_path / "hits.parquet"))
    # --restart discards the ledger with the checkpoint: everything is submitted again
    restarted = finish(command(source, tmp_path / "batch.parquet", gw.base_url, *sweep,
                               "--restart"))
    assert restarted.returncode == 0, restarted.stderr
    assert gw.stats.batches_created == 6


def test_json_schema_is_refused_with_the_batch_engine(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}))
    source = write_input(tmp_path / "in.jsonl", 2)
    done = finish(command(source, tmp_path / "out.parquet", "http://127.0.0.1:9/v1",
                          "--json-schema", str(schema)))
    assert done.returncode == 2 and "--json-schema is not supported with --engine batch" \
        in done.stderr and "Traceback" not in done.stderr


def test_a_row_edited_while_its_batch_runs_gets_the_answer_to_its_new_request(
    tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    from batchrunner.simulator import complete

    gw = start_gateway(batch_seconds=0.5)
    source = write_input(tmp_path / "in.jsonl", 6)
    cmd = command(source, tmp_path / "out.parquet", gw.base_url)
    assert killed_at("submitted", cmd).returncode == -signal.SIGKILL
    lines = source.read_text().splitlines()
    lines[2] = json.dumps({"id": "q002", "prompt": "Name a fruit instead."})
    source.write_text("\n".join(lines) + "\n")
    again = finish(cmd)
    assert again.returncode == 0, again.stderr
    assert gw.stats.batches_created == 2  # the first one collected, the edited row in a new one
    rows = table(tmp_path / "out.parquet")
    expected = complete({"model": MODEL, "messages": [
        {"role": "user", "content": "Name a fruit instead."}]})
    assert rows[2]["content"] == expected.texts[0]
    assert rows[2]["batch_id"] != rows[0]["batch_id"]
    assert [r["id"] for r in rows] == [f"q{i:03d}" for i in range(6)]
