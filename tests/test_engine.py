"""The main job end to end through the library, against the gateway simulator on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openapi_schema
import pyarrow.parquet as pq
import pytest
from scripted_server import Reply, Request, scripted_server

from batchrunner import RunConfig, run
from batchrunner.config.pricing import PriceTable
from batchrunner.errors import InputError
from batchrunner.simulator import complete

KEY = "sk-ru-engine-tests-5f1c2a9e7b3d4c6a8e0f"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return KEY


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prompts(n: int) -> list[dict[str, Any]]:
    topics = ["rivers", "compilers", "bread", "orbits", "tides", "violins", "glaciers"]
    return [
        {"id": f"row-{i:03d}", "prompt": f"Tell me about {topics[i % len(topics)]} "
         f"in {i % 5 + 1} sentences.", "topic": topics[i % len(topics)]}
        for i in range(n)
    ]


def go(tmp_path: Path, base_url: str, rows: list[Any] | None = None, **settings: Any):  # type: ignore[no-untyped-def]
    source = write_jsonl(tmp_path / "in.jsonl", rows if rows is not None else prompts(20))
    settings.setdefault("model", "gpt-4o-mini")
    config = RunConfig(input=source, output=tmp_path / "out.parquet", base_url=base_url,
                       **settings)
    report = run(config, handle_signals=False)
    table = pq.read_table(config.output) if config.output.exists() else None
    return report, (table.to_pylist() if table is not None else None)


def test_usage_order_ids_and_carried_columns(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    rows = prompts(30)
    for row in rows:
        row["status"] = "draft"  # clashes with a result column: carried as input_status
    report, out = go(tmp_path, gateway.base_url, rows, concurrency=8)
    assert report.exit_code == 0 and report.reason == "complete"
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    prices = PriceTable.load()
    for source, result in zip(rows, out):
        expected = complete({"model": "gpt-4o-mini",
                             "messages": [{"role": "user", "content": source["prompt"]}]})
        assert result["status"] == "ok" and result["error"] is None
        assert result["prompt"] == source["prompt"] and result["topic"] == source["topic"]
        assert result["input_status"] == "draft"
        assert result["content"] == expected.texts[0]
        assert result["choices"] == list(expected.texts)
        assert result["prompt_tokens"] == expected.usage.prompt_tokens
        assert result["completion_tokens"] == expected.usage.completion_tokens
        assert result["total_tokens"] == expected.usage.total_tokens
        assert result["cached_tokens"] == 0
        assert result["cost_usd"] == pytest.approx(prices.cost(
            "gpt-4o-mini", expected.usage.prompt_tokens, expected.usage.completion_tokens, 0))
        assert result["model"] == "gpt-4o-mini"
        assert result["response_model"].startswith("gpt-4o-mini")
        assert result["attempts"] == 1 and result["http_status"] == 200
        assert result["latency_ms"] > 0 and result["ttft_ms"] is None
        assert result["response_id"]
    assert report.total_tokens == sum(r["total_tokens"] for r in out)
    assert gateway.stats.requests == 30


def test_the_concurrency_bound_is_held(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(latency_ms=60)
    report, out = go(tmp_path, gw.base_url, prompts(40), concurrency=5)
    assert report.exit_code == 0
    assert gw.stats.max_in_flight == 5


def test_5xx_answers_are_retried(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(error_rate=0.3, fault_seed=7)
    report, out = go(tmp_path, gw.base_url, prompts(30), concurrency=8, max_attempts=10)
    assert report.exit_code == 0
    assert all(r["status"] == "ok" for r in out)
    errors = sum(n for status, n in gw.stats.by_status.items() if status in (500, 503))
    assert errors > 0
    assert sum(r["attempts"] for r in out) == 30 + errors


def test_dropped_connections_are_retried(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(drop_rate=0.25, fault_seed=3)
    report, out = go(tmp_path, gw.base_url, prompts(30), concurrency=8, max_attempts=10)
    assert report.exit_code == 0
    assert gw.stats.dropped > 0
    assert sum(r["attempts"] for r in out) == 30 + gw.stats.dropped


def test_dropped_streams_are_retried(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(drop_rate=0.25, fault_seed=5)
    report, out = go(tmp_path, gw.base_url, prompts(30), concurrency=8, max_attempts=10,
                     stream=True)
    assert report.exit_code == 0
    assert gw.stats.dropped > 0
    assert all(r["status"] == "ok" and r["ttft_ms"] is not None for r in out)


def test_a_rate_limited_gateway_gets_every_row_with_few_429s(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    # 20 requests per 2-second window: a fortieth of the real minute, the same shape
    gw = start_gateway(rpm=20, rate_window_s=2.0)
    started = time.monotonic()
    report, out = go(tmp_path, gw.base_url, prompts(40), concurrency=16, max_attempts=20)
    elapsed = time.monotonic() - started
    assert report.exit_code == 0 and all(r["status"] == "ok" for r in out)
    limited = gw.stats.by_status.get(429, 0)
    assert limited <= 40 * 0.05, f"{limited} answers were 429"
    assert elapsed >= 2.0  # 40 rows at 20 per 2 s cannot take less than one full window


def test_timeouts_are_retried_then_recorded(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(latency_ms=2000)
    report, out = go(tmp_path, gw.base_url, prompts(2), timeout=0.3, max_attempts=2)
    assert report.exit_code == 1
    for r in out:
        assert r["status"] == "error" and r["attempts"] == 2
        assert r["http_status"] is None and "no answer within" in r["error"]
        assert r["content"] is None


def test_4xx_is_not_retried_and_keeps_the_gateways_message(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    report, out = go(tmp_path, gateway.base_url, prompts(3), params={"temperature": 5})
    assert report.exit_code == 1
    for r in out:
        assert r["status"] == "error" and r["attempts"] == 1 and r["http_status"] == 400
        assert "temperature" in r["error"]
    assert gateway.stats.requests == 3


def test_an_unknown_model_is_a_row_error_without_the_preflight(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    rows = prompts(3)
    rows[1]["model"] = "gpt-9-imaginary"
    report, out = go(tmp_path, gateway.base_url, rows, preflight=False)
    assert report.exit_code == 1
    assert [r["status"] for r in out] == ["ok", "error", "ok"]
    assert out[1]["http_status"] == 404 and out[1]["model"] == "gpt-9-imaginary"
    assert out[1]["input_model"] == "gpt-9-imaginary"


def test_401_stops_the_run_with_exit_4(tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(keys=("sk-ru-the-only-good-key",))
    report, out = go(tmp_path, gw.base_url, prompts(200), concurrency=4)
    assert report.exit_code == 4 and report.reason == "auth"
    assert out is None  # nothing finished, so no output file
    assert gw.stats.requests <= 4 + 1
    assert KEY not in report.message


def test_streaming_gives_the_same_results(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, plain = go(tmp_path / "a", gateway.base_url, prompts(12), params={"n": 2, "max_tokens": 30})
    _, streamed = go(tmp_path / "b", gateway.base_url, prompts(12), stream=True,
                     params={"n": 2, "max_tokens": 30})
    keys = ["id", "content", "choices", "finish_reason", "prompt_tokens", "completion_tokens",
            "total_tokens", "response_model", "cost_usd"]
    assert [{k: r[k] for k in keys} for r in plain] == [{k: r[k] for k in keys} for r in streamed]
    assert all(r["ttft_ms"] is not None and r["ttft_ms"] <= r["latency_ms"] for r in streamed)


def test_n_choices_and_max_tokens(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    _, out = go(tmp_path, gateway.base_url, prompts(4), params={"n": 3, "max_tokens": 5})
    for r in out:
        assert len(r["choices"]) == 3 and len(set(r["choices"])) == 3
        assert r["finish_reason"] == "length" and r["completion_tokens"] == 15


def test_row_input_errors_are_recorded_and_not_sent(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    rows: list[Any] = prompts(3)
    rows.insert(1, "{this is not json")
    rows.append({"id": "empty", "prompt": ""})
    report, out = go(tmp_path, gateway.base_url, rows)
    assert report.exit_code == 1
    assert len(out) == 5
    bad = [r for r in out if r["status"] == "error"]
    assert len(bad) == 2
    assert all(r["error"].startswith("input:") and r["attempts"] == 0 for r in bad)
    assert "line 2" in bad[0]["error"]
    assert gateway.stats.requests == 3


def test_a_missing_column_stops_before_anything_is_sent(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="question"):
        go(tmp_path, gateway.base_url, prompts(3), template="Answer: {question}")
    assert gateway.stats.requests == 0


def answer_like_the_gateway(body: dict[str, Any]) -> Reply:
    """The simulator's answer to `body`, as a scripted server's reply."""
    answer = complete({k: v for k, v in body.items() if k not in ("stream", "stream_options")})
    return Reply(json={
        "id": "c", "object": "chat.completion", "created": 1, "model": answer.model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                     "finish_reason": f, "logprobs": None}
                    for i, (t, f) in enumerate(zip(answer.texts, answer.finish_reasons))],
        "usage": answer.usage.to_json()})


def test_requests_sent_validate_against_the_official_schema(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "hello there"},
        {"id": "b", "messages": [{"role": "system", "content": "terse"},
                                 {"role": "user", "content": "hi"}]},
        {"id": "c", "prompt": "pick one", "model": "gpt-4o"},
    ])
    with scripted_server(lambda request: answer_like_the_gateway(request.json())) as server:
        config = RunConfig(input=source, output=tmp_path / "out.parquet",
                           base_url=server.base_url, model="gpt-4o-mini", system="Be brief.",
                           params={"temperature": 0.2, "top_p": 0.9, "max_tokens": 50,
                                   "stop": ["\n\n"], "n": 2, "seed": 11,
                                   "response_format": {"type": "text"}},
                           preflight=False)  # the script answers chat requests only
        report = run(config, handle_signals=False)
    assert report.exit_code == 0
    bodies = sorted((request.json() for request in server.requests),
                    key=lambda body: body["messages"][-1]["content"])
    assert len(bodies) == 3
    for body in bodies:
        openapi_schema.validate(body, "CreateChatCompletionRequest")
    assert bodies[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert bodies[1]["messages"][0]["content"] == "terse"  # its own system message kept
    assert bodies[2]["model"] == "gpt-4o"


@pytest.mark.parametrize("retry_after", [None, "1"], ids=["no-retry-after", "retry-after-1s"])
def test_429_is_retried_after_the_wait_it_asks_for(tmp_path: Path, retry_after: str | None) -> None:
    moments: list[float] = []

    def answer(request: Request) -> Reply:
        moments.append(time.monotonic())
        if len(moments) == 1:
            headers = {"Retry-After": retry_after} if retry_after else {}
            return Reply(status=429, headers=headers, json={"error": {"message": "slow down"}})
        return answer_like_the_gateway(request.json())

    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "only", "prompt": "hello"}])
    with scripted_server(answer) as server:
        config = RunConfig(input=source, output=tmp_path / "out.parquet",
                           base_url=server.base_url, model="gpt-4o",
                           preflight=False)  # the script answers chat requests only
        report = run(config, handle_signals=False)
    assert report.exit_code == 0
    out = pq.read_table(config.output).to_pylist()
    assert out[0]["attempts"] == 2 and out[0]["status"] == "ok"
    waited = moments[1] - moments[0]
    assert waited >= (1.0 if retry_after else 0.5)  # Retry-After, else the first backoff step


def test_arun_is_the_async_core(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    from batchrunner import arun

    source = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    config = RunConfig(input=source, output=tmp_path / "out.parquet", base_url=gateway.base_url,
                       model="gpt-4o")
    report = asyncio.run(arun(config))
    assert report.exit_code == 0 and report.ok == 5 and report.sent == 5


def test_local_runs_against_the_built_in_gateway(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RU_LLM_API_KEY")
    report, out = go(tmp_path, "http://127.0.0.1:9/v1", prompts(6), local=True)
    assert report.exit_code == 0 and len(out) == 6


def test_collections_are_rarer_during_a_run_and_put_back_after(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    import gc

    from batchrunner.engine.runner import YOUNG_GC_THRESHOLD

    seen: list[int] = []
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
        config = RunConfig(input=source, output=tmp_path / "out.parquet",
                           base_url=gateway.base_url, model="gpt-4o-mini")
        report = run(config, handle_signals=False,
                     on_result=lambda result, tally: seen.append(gc.get_threshold()[0]))
        assert report.exit_code == 0
        assert seen == [YOUNG_GC_THRESHOLD] * 3
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(0)  # a program that turned collection off keeps it off
        seen.clear()
        run(config.replace(output=tmp_path / "again.parquet"), handle_signals=False,
            on_result=lambda result, tally: seen.append(gc.get_threshold()[0]))
        assert seen == [0] * 3 and gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_input_columns_named_like_results_keep_every_value(
    tmp_path: Path, gateway, suffix: str  # type: ignore[no-untyped-def]
) -> None:
    """`status` beside `input_status` (and `score`): no output has two columns of one name."""
    from batchrunner import read_results

    rows = [{"id": f"r{i}", "prompt": f"Say {i}.", "status": "draft", "input_status": "old",
             "score": 0.5, "input_input_status": "older"} for i in range(3)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / f"out{suffix}"
    config = RunConfig(input=source, output=output, base_url=gateway.base_url,
                       model="gpt-4o-mini")
    assert run(config, handle_signals=False).exit_code == 0
    if suffix == ".jsonl":
        text = output.read_text().splitlines()[0]
        pairs = json.loads(text, object_pairs_hook=lambda p: p)
        names = [k for k, _ in pairs]
    elif suffix == ".csv":
        names = output.read_text().splitlines()[0].split(",")
    else:
        names = pq.read_schema(output).names
    assert len(names) == len(set(names)), names
    frame = read_results(output)
    first = frame.iloc[0]
    assert first["status"] == "ok"
    assert first["input_status"] == "old"  # the input's own column keeps its name
    assert first["input_input_status"] == "older"
    assert first["input_input_input_status"] == "draft"  # `status`, moved past both
    assert first["input_score"] == 0.5


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
@pytest.mark.parametrize("how", ["path", "symlink", "hardlink", "dotted"])
def test_an_output_that_is_the_input_is_refused_before_sending(
    tmp_path: Path, gateway, suffix: str, how: str  # type: ignore[no-untyped-def]
) -> None:
    from batchrunner.errors import UsageError

    source = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        write_jsonl(source, prompts(3))
    else:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        table = pa.Table.from_pylist(prompts(3))
        pq.write_table(table, source) if suffix == ".parquet" else pacsv.write_csv(table, source)
    before = source.read_bytes()
    output = {"path": source, "dotted": tmp_path / "." / source.name,
              "symlink": tmp_path / f"link{suffix}", "hardlink": tmp_path / f"hard{suffix}"}[how]
    if how == "symlink":
        output.symlink_to(source)
    elif how == "hardlink":
        output.hardlink_to(source)
    config = RunConfig(input=source, output=output, base_url=gateway.base_url, model="gpt-4o")
    with pytest.raises(UsageError, match="is the input"):
        run(config, handle_signals=False)
    assert gateway.stats.requests == 0 and source.read_bytes() == before


def test_an_output_inside_a_checkpoint_folder_is_refused(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    from batchrunner.errors import UsageError

    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    first = RunConfig(input=source, output=tmp_path / "a.parquet", base_url=gateway.base_url,
                      model="gpt-4o")
    assert run(first, handle_signals=False).exit_code == 0
    sent = gateway.stats.requests
    for output in (tmp_path / "a.parquet.checkpoint" / "b.parquet",  # another output's
                   tmp_path / "in.jsonl.checkpoint" / "c.parquet"):  # the input's
        with pytest.raises(UsageError, match="inside the checkpoint folder"):
            run(first.replace(output=output), handle_signals=False)
    assert gateway.stats.requests == sent


def test_run_control_stop_from_another_thread_wakes_the_run_on_its_own_loop() -> None:
    """A notebook stops a run going on in another thread: the event is set on the run's loop
    (asyncio's objects are not thread-safe; its debug mode says so when they are misused)."""
    import asyncio
    import threading

    from batchrunner.engine.state import RunControl

    control = RunControl()
    bound = threading.Event()
    woke: list[float] = []

    async def run_side() -> None:
        event = asyncio.Event()
        control.bind(event)
        asyncio.get_running_loop().call_later(0.2, bound.set)  # once the wait below began
        async with asyncio.timeout(10):
            await event.wait()
        woke.append(time.monotonic())

    thread = threading.Thread(target=asyncio.run, args=(run_side(),), kwargs={"debug": True})
    thread.start()
    assert bound.wait(10)
    asked = time.monotonic()
    control.stop("interrupted", 130)  # from this thread, not the run's
    thread.join(15)
    assert woke and woke[0] - asked < 5
    assert control.reason == "interrupted"


def test_a_budget_below_one_request_says_why_and_what_to_do(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    """--max-cost 0.01 with gpt-4o and no max_tokens: one request may cost $0.04 (4,096
    completion tokens assumed); "budget reached" with nothing spent explained nothing."""
    report, _ = go(tmp_path, gateway.base_url, prompts(5), model="gpt-4o", max_cost=0.01)
    assert report.exit_code == 5 and report.reason == "budget"
    assert gateway.stats.requests == 0
    message = report.message
    assert "the --max-cost budget of $0.0100 is below the worst case of one request" in message
    assert "for gpt-4o" in message and "4,096 completion tokens, assumed as no max_tokens is set" in message
    assert "$0.04" in message  # the worst case's figure
    assert "set --max-tokens" in message and "raise --max-cost" in message


def test_a_deadline_already_past_today_is_said_to_mean_tomorrow(
    tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    from datetime import datetime

    import batchrunner.engine.execution as engine_module

    monkeypatch.setattr(engine_module, "_wall_now", lambda: datetime(2026, 12, 7, 23, 56))
    with caplog.at_level("INFO", logger="batchrunner"):
        report, _ = go(tmp_path, gateway.base_url, prompts(3), deadline="23:51")
    assert report.exit_code == 0
    said = [r for r in caplog.records if "--deadline" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]
    assert said[0].getMessage() == (
        "--deadline 23:51: that time has passed today: sending until 23:51 tomorrow, "
        "in 23 h 55 min"
    )


def test_an_input_edited_during_the_run_is_said_and_in_the_summary_json(
    tmp_path: Path, gateway, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    import os

    source = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    summary = tmp_path / "summary.json"
    touched: list[bool] = []

    def edit_once(result, tally) -> None:  # type: ignore[no-untyped-def]
        if not touched:  # an editor saving the file while the run goes on
            stat = source.stat()
            os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
            touched.append(True)

    config = RunConfig(input=source, output=tmp_path / "out.parquet", base_url=gateway.base_url,
                       model="gpt-4o-mini", summary_json=summary)
    with caplog.at_level("WARNING", logger="batchrunner"):
        report = run(config, handle_signals=False, on_result=edit_once)
    assert report.exit_code == 0 and report.input_changed
    assert any(f"the input {source} changed while the run went on" in r.getMessage()
               for r in caplog.records)
    assert json.loads(summary.read_text())["input_changed"] is True

    again = run(config.replace(output=tmp_path / "other.parquet"), handle_signals=False)
    assert not again.input_changed
