"""The results viewer: its JSON API over aiohttp's test client, and the page in real Chromium.

The sample is a real run: an evaluation of 120 questions sent through the simulator (with
500/503 faults and one attempt a row, so some rows fail) to two models, as two files; one
question carries a `<script>` and one answer is replaced by markup, to check that the page
shows them as text. What the page shows is checked against the files, read with pyarrow.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp.test_utils import TestClient, TestServer
from optional import missing, require

import batchrunner
from batchrunner.errors import UsageError
from batchrunner.simulator import GatewayConfig, gateway_in_thread
from batchrunner.viewer import Dataset, Filters, ViewerConfig, create_app, open_sources
from batchrunner.viewer.index import error_kind

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ru-viewer-test-key-MARKER-7f3a"
TOKEN = "test-token-0123456789"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCRIPT_PROMPT = "<script>window.__pwned = 'prompt'</script>What is 2 + 2?"
SCRIPT_ANSWER = "<script>window.__pwned = 'answer'</script><img src=x onerror=\"window.__pwned='img'\">"
MODELS = ("gpt-4o", "gpt-4o-mini")


# -- the sample run ---------------------------------------------------------------------------


def _write_questions(path: Path, rows: int) -> None:
    lines = (ROOT / "sample_data" / "eval_questions.jsonl").read_text().splitlines()
    source = [json.loads(line) for line in lines]
    with path.open("w") as out:
        for i in range(rows):
            record = dict(source[i % len(source)])
            record["id"] = f"q{i:04d}"
            if i == 7:
                record["id"] = "x-script"
                record["question"] = SCRIPT_PROMPT
            out.write(json.dumps(record) + "\n")


def _run(input_path: Path, output: Path, model: str, base_url: str, **extra: Any) -> None:
    settings: dict[str, Any] = {
        "model": model,
        "system": "Reply with the answer only.",
        "template": "Answer briefly: {question}",
        "params": {"temperature": 0, "max_tokens": 24},
        "base_url": base_url,
        "max_attempts": 1,
        "concurrency": 8,
        "quiet": True,
        **extra,
    }
    config = batchrunner.RunConfig(input=input_path, output=output, **settings)
    batchrunner.run(config, handle_signals=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two finished outputs (one per model) of a 120-question eval with failures."""
    folder = tmp_path_factory.mktemp("viewer")
    questions = folder / "questions.jsonl"
    _write_questions(questions, 120)
    saved = os.environ.get("RU_LLM_API_KEY")
    os.environ["RU_LLM_API_KEY"] = KEY
    try:
        with gateway_in_thread(GatewayConfig(port=0, error_rate=0.2, fault_seed=11)) as gw:
            outputs = []
            for model in MODELS:
                output = folder / f"eval-{model}.parquet"
                _run(questions, output, model, gw.base_url)
                outputs.append(output)
    finally:
        if saved is None:
            os.environ.pop("RU_LLM_API_KEY", None)
        else:
            os.environ["RU_LLM_API_KEY"] = saved
    # One answer replaced by markup (the simulator never answers with any).
    table = pq.read_table(outputs[0])
    content = table.column("content").to_pylist()
    index = table.column("id").to_pylist().index("x-script")
    content[index] = SCRIPT_ANSWER
    statuses = table.column("status").to_pylist()
    statuses[index] = "ok"
    errors = table.column("error").to_pylist()
    errors[index] = None
    for name, values in (("content", content), ("status", statuses), ("error", errors)):
        at = table.schema.get_field_index(name)
        table = table.set_column(at, name, pa.array(values, table.schema.field(name).type))
    pq.write_table(table, outputs[0])
    tables = [pq.read_table(p).to_pylist() for p in outputs]
    assert any(r["status"] == "error" for r in tables[0]), "the sample needs some failures"
    return {"folder": folder, "outputs": outputs, "rows": tables, "questions": questions}


def _all_rows(sample: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for rows in sample["rows"] for row in rows]


def _call(app_data: Dataset, path: str, token: str | None = TOKEN) -> tuple[int, Any, dict[str, str]]:
    """GET `path` from the viewer app over aiohttp's test client."""

    async def go() -> tuple[int, Any, dict[str, str]]:
        client = TestClient(TestServer(create_app(app_data, token=TOKEN)))
        await client.start_server()
        try:
            sep = "&" if "?" in path else "?"
            url = path + (f"{sep}token={token}" if token else "")
            response = await client.get(url)
            text = await response.text()
            body = json.loads(text) if response.content_type == "application/json" else text
            return response.status, body, dict(response.headers)
        finally:
            await client.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def dataset(sample: dict[str, Any]) -> Dataset:
    return Dataset(open_sources(sample["outputs"]))


# -- the JSON API -------------------------------------------------------------------------------


def test_summary_totals_match_the_files(dataset: Dataset, sample: dict[str, Any]) -> None:
    rows = _all_rows(sample)
    status, body, _ = _call(dataset, "/api/summary")
    assert status == 200
    totals = body["totals"]
    assert totals["rows"] == len(rows) == 240
    assert totals["ok"] == sum(r["status"] == "ok" for r in rows)
    assert totals["errors"] == sum(r["status"] == "error" for r in rows) > 0
    assert totals["total_tokens"] == sum(r["total_tokens"] or 0 for r in rows)
    assert totals["cost_paid"] == pytest.approx(sum(r["cost_usd"] or 0 for r in rows))
    assert totals["cost_reused"] == 0
    assert totals["mean_score"] is None  # no score column: nothing scored
    by_model = {m["model"]: m for m in body["models"]}
    assert set(by_model) == set(MODELS)
    for model in MODELS:
        mine = [r for r in rows if r["model"] == model]
        assert by_model[model]["rows"] == len(mine)
        assert by_model[model]["cost_usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in mine))
    kinds: dict[str, int] = {}
    for r in rows:
        if r["error"]:
            kinds[error_kind(r["error"])] = kinds.get(error_kind(r["error"]), 0) + 1
    assert {e["kind"]: e["count"] for e in body["errors"]} == kinds
    assert sum(sum(s["counts"]) for s in body["latency"]["series"]) == totals["ok"]


def test_rows_filtered_to_errors_page_through_in_file_order(
    dataset: Dataset, sample: dict[str, Any]
) -> None:
    failed = [r for r in _all_rows(sample) if r["status"] == "error"]
    status, first, _ = _call(dataset, "/api/rows?status=error&limit=5")
    assert status == 200 and first["total"] == len(failed)
    assert [r["id"] for r in first["rows"]] == [r["id"] for r in failed[:5]]
    _, second, _ = _call(dataset, "/api/rows?status=error&limit=5&offset=5")
    assert [r["id"] for r in second["rows"]] == [r["id"] for r in failed[5:10]]
    assert all(r["status"] == "error" and r["error"] for r in first["rows"] + second["rows"])


def test_filters_model_error_text_search_and_score(dataset: Dataset, sample: dict[str, Any]) -> None:
    rows = _all_rows(sample)
    _, body, _ = _call(dataset, "/api/rows?model=gpt-4o-mini&limit=200")
    assert body["total"] == sum(r["model"] == "gpt-4o-mini" for r in rows)
    _, body, _ = _call(dataset, "/api/rows?error=OVERLOADED&limit=200")  # case-insensitive
    assert body["total"] == sum("overloaded" in (r["error"] or "").lower() for r in rows) > 0
    _, body, _ = _call(dataset, "/api/rows?search=capital+of&limit=200")
    expected = [r["id"] for r in rows
                if "capital of" in r["question"].lower() or "capital of" in (r["content"] or "").lower()]
    assert [r["id"] for r in body["rows"]] == expected and expected
    status, body, _ = _call(dataset, "/api/rows?score_min=abc")
    assert status == 400 and "score_min" in body["error"]
    _, body, _ = _call(dataset, "/api/rows?score_min=0.5")
    assert body["total"] == 0  # no scores in this sample: a score filter keeps nothing


def test_one_row_in_full_with_the_messages_sent_and_the_sweep(
    dataset: Dataset, sample: dict[str, Any]
) -> None:
    status, body, _ = _call(dataset, "/api/row/3")
    assert status == 200
    expected = sample["rows"][0][3]
    assert body["row"]["id"] == expected["id"] and body["row"]["content"] == expected["content"]
    assert body["request"]["messages"] == [
        {"role": "system", "content": "Reply with the answer only."},
        {"role": "user", "content": f"Answer briefly: {expected['question']}"},
    ]
    assert body["request"]["max_tokens"] == 24 and body["request"]["model"] == "gpt-4o"
    assert body["inputs"]["question"] == expected["question"]
    assert [(s["model"], s["current"]) for s in body["sweep"]] == [("gpt-4o", True), ("gpt-4o-mini", False)]
    other = sample["rows"][1][3]
    assert body["sweep"][1]["content"] == other["content"] and body["sweep"][1]["index"] == 123
    assert _call(dataset, "/api/row/999999")[0] == 404


def test_every_request_needs_the_token(dataset: Dataset) -> None:
    for path in ("/", "/static/app.js", "/api/info", "/api/rows", "/api/row/0"):
        status, body, _ = _call(dataset, path, token=None)
        assert status == 403, path
        assert "token" in body
    assert _call(dataset, "/api/info", token="wrong-token-123")[0] == 403
    status, page, headers = _call(dataset, "/")
    assert status == 200 and "<table id=\"rows\"" in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "batchrunner_view_" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]


def test_cookie_from_the_token_admits_later_requests(dataset: Dataset) -> None:
    async def go() -> tuple[int, int]:
        client = TestClient(TestServer(create_app(dataset, token=TOKEN)))
        await client.start_server()
        try:
            first = await client.get(f"/?token={TOKEN}")
            later = await client.get("/api/info")  # no token: the cookie carries it
            return first.status, later.status
        finally:
            await client.close()

    assert asyncio.run(go()) == (200, 200)


def test_assets_are_bundled_and_nothing_comes_from_elsewhere(dataset: Dataset) -> None:
    _, page, _ = _call(dataset, "/")
    _, script, _ = _call(dataset, "/static/app.js")
    _, style, _ = _call(dataset, "/static/style.css")
    for text in (page, script, style):
        assert not re.search(r"(src|href)=\"(https?:)?//", text)
        assert "cdn" not in text.lower()
    assert "innerHTML" not in script  # values reach the page as text only
    assert _call(dataset, "/static/../app.py")[0] in (403, 404)


def test_the_api_key_never_reaches_the_page(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    bodies = [json.dumps(_call(dataset, path)[1]) for path in
              ("/api/info", "/api/summary", "/api/rows?limit=200", "/api/row/0", "/api/row/130")]
    bodies += [_call(dataset, p)[1] for p in ("/", "/static/app.js")]
    assert not any(KEY in body or "MARKER-7f3a" in body for body in bodies)


def test_pages_read_only_row_groups_and_match_a_small_grouped_file(tmp_path: Path) -> None:
    path = tmp_path / "grouped.parquet"
    n = 1000
    statuses = ["error" if i % 7 == 0 else "ok" for i in range(n)]
    table = pa.table({
        "id": [f"r{i}" for i in range(n)],
        "prompt": [f"prompt {i}" for i in range(n)],
        "status": statuses,
        "content": [None if s == "error" else ("x" * 1000 if i == 1 else f"answer {i}")
                    for i, s in enumerate(statuses)],
        "model": ["m1" if i % 2 else "m2" for i in range(n)],
        "total_tokens": pa.array([10] * n, pa.int64()),
        "cost_usd": [0.001] * n,
        "latency_ms": [float(i) for i in range(n)],
        "error": [f"input: line {i + 1}: prompt is null" if s == "error" else None
                  for i, s in enumerate(statuses)],
        "score": [None if i % 3 == 0 else (i % 5) / 4 for i in range(n)],
        "cache_hit": [i % 10 == 1 for i in range(n)],
    })
    pq.write_table(table, path, row_group_size=64)
    data = Dataset(open_sources([path]))
    page = data.page(Filters(status="error"), offset=40, limit=30)
    expected = [i for i in range(n) if statuses[i] == "error"]
    assert page["total"] == len(expected)
    assert [r["id"] for r in page["rows"]] == [f"r{i}" for i in expected[40:70]]
    assert [r["prompt"] for r in page["rows"]] == [f"prompt {i}" for i in expected[40:70]]
    summary = data.summary(Filters())
    # Numbers that vary by row are masked, so a thousand distinct texts make one kind.
    assert summary["errors"] == [{"kind": "input: line #: prompt is null", "count": len(expected)}]
    scores = [s for s in table.column("score").to_pylist() if s is not None]
    assert summary["totals"]["mean_score"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)
    hits = table.column("cache_hit").to_pylist()
    assert summary["totals"]["cost_reused"] == pytest.approx(0.001 * sum(hits))
    assert summary["totals"]["cost_paid"] == pytest.approx(0.001 * (n - sum(hits)))
    high = data.page(Filters(score_min=0.75), limit=200)
    assert high["total"] == sum(s >= 0.75 for s in scores)
    slowest = data.page(Filters(), limit=3, sort="-latency_ms")
    assert [r["id"] for r in slowest["rows"]] == ["r999", "r998", "r997"]
    long = data.page(Filters(), limit=2)["rows"][1]["content"]
    assert long == "x" * 240 + "…"  # a table cell; the row in full has it all
    assert data.row(1)["row"]["content"] == "x" * 1000
    kind = data.page(Filters(error_kind="input: line #: prompt is null"), limit=5)
    assert kind["total"] == len(expected)


def _checkpointed(output: Path) -> int:
    try:
        return batchrunner.read_status(output).done
    except UsageError:
        return 0  # no manifest yet


def test_a_live_run_is_read_from_its_checkpoint_and_refreshed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    questions = tmp_path / "questions.jsonl"
    _write_questions(questions, 60)
    output = tmp_path / "live.parquet"
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    with gateway_in_thread(GatewayConfig(port=0, latency_ms=50)) as gw:
        runner = threading.Thread(
            target=_run,
            args=(questions, output, "gpt-4o", gw.base_url),
            kwargs={"checkpoint_every": 5, "concurrency": 1},
        )
        runner.start()
        try:
            _wait_for(lambda: _checkpointed(output) >= 5)
            data = Dataset(open_sources([output]))
            assert data.live and data.sources[0].live
            first = data.rows
            assert 0 < first < 60
            page = data.page(Filters(), limit=200)
            assert [r["id"] for r in page["rows"]] == sorted(r["id"] for r in page["rows"])
            row = data.row(0)
            assert row["request"] is None and "still going" in row["request_note"]
        finally:
            runner.join(60)
    assert output.exists()
    assert data.refresh()  # the run finished: the Parquet output takes over
    assert not data.live and data.rows == 60
    assert data.row(0)["request"]["messages"][1]["content"].startswith("Answer briefly:")


def test_bad_paths_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such results file"):
        open_sources([tmp_path / "missing.parquet"])
    (tmp_path / "x.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="reads Parquet"):
        open_sources([tmp_path / "x.jsonl"])
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match="not a readable Parquet"):
        open_sources([tmp_path / "junk.parquet"])
    with pytest.raises(UsageError, match="no results match"):
        open_sources([str(tmp_path / "nothing-*.parquet")])
    with pytest.raises(UsageError, match="--token"):
        ViewerConfig(paths=("a",), token="short")


# -- the command ---------------------------------------------------------------------------------


def _start_view(*args: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RU_LLM_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "view", *args, "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = process.stdout.readline()  # type: ignore[union-attr]
    match = re.search(r"http://\S+", line)
    if not match:
        process.kill()
        raise AssertionError(f"no URL printed: {line!r} {process.stderr.read()!r}")  # type: ignore[union-attr]
    return process, match.group(0)


def _stop(process: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[int, str]:
    """Signal the viewer and collect its exit code and stderr (closing its pipes)."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return process.returncode, stderr


def test_view_prints_the_url_serves_and_stops_cleanly_on_ctrl_c(sample: dict[str, Any]) -> None:
    import urllib.request

    process, url = _start_view(*map(str, sample["outputs"]))
    try:
        assert url.startswith("http://127.0.0.1:") and "token=" in url
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b"batchrunner" in response.read()
        bare = url.split("?")[0] + "api/info"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bare, timeout=10)
        assert refused.value.code == 403
        refused.value.close()
        code, stderr = _stop(process, signal.SIGINT)
        assert code == 0
        assert "Traceback" not in stderr and "stopped" in stderr
    finally:
        _stop(process)


def test_view_on_another_host_uses_the_given_token(sample: dict[str, Any]) -> None:
    process, url = _start_view(str(sample["outputs"][0]), "--host", "0.0.0.0",
                               "--token", "my-secret-token-42")
    try:
        assert url.endswith("?token=my-secret-token-42")
        assert ":" in url.split("//")[1]
    finally:
        code, stderr = _stop(process, signal.SIGTERM)
    assert code == 0 and "Traceback" not in stderr


def test_view_of_a_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "batchrunner", "view", str(tmp_path / "nope.parquet"), "--no-browser"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such results file" in result.stderr


# -- the page in a real browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from the system's packages, driven by Selenium.

    In CI (CI is set; .ci/run installs chromium) a missing browser fails the tests; on a
    machine without /usr/bin/chromium they are skipped, saying so.
    """
    require("selenium", "test-browser", "the viewer's browser tests")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing("the viewer's browser tests",
                f"{CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1200", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served(sample: dict[str, Any]) -> Iterator[str]:
    process, url = _start_view(*map(str, sample["outputs"]))
    try:
        yield url
    finally:
        _stop(process)


def _wait_for(condition: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _open(driver: Any, url: str, fragment: str = "") -> None:
    driver.get("about:blank")
    driver.get(url + fragment)
    _wait_for(lambda: driver.execute_script("return document.body.getAttribute('data-ready')"))
    _settle(driver)


def _settle(driver: Any) -> None:
    _wait_for(lambda: driver.execute_script("return document.getElementById('loading').hidden"))


def _text(driver: Any, css: str) -> str:
    """The shown text of an element (looked up again if the page redrew it meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(5):
        try:
            return driver.find_element(By.CSS_SELECTOR, css).text
        except StaleElementReferenceException:
            time.sleep(0.05)
    return driver.find_element(By.CSS_SELECTOR, css).text


def _column(driver: Any, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def test_page_shows_totals_errors_and_charts(browser: Any, served: str, sample: dict[str, Any]) -> None:
    rows = _all_rows(sample)
    _open(browser, served)
    assert _text(browser, '#totals [data-k="rows"] .v') == f"{len(rows):,}"
    assert _text(browser, '#totals [data-k="errors"] .v') == f"{sum(r['status'] == 'error' for r in rows):,}"
    assert _text(browser, '#totals [data-k="tokens"] .v') == f"{sum(r['total_tokens'] or 0 for r in rows):,}"
    assert _column(browser, "#errors li a")  # the frequent errors, as links
    assert len(_column(browser, "#chart-cost svg")) == 1 and len(_column(browser, "#chart-latency svg")) == 1
    assert sorted(_column(browser, "#models tbody td:first-child")) == sorted(MODELS)
    assert _column(browser, "#rows tbody td.id")[:50] == [r["id"] for r in rows[:50]]
    assert browser.find_element("id", "pager-info").text == f"1–50 of {len(rows)}"


def test_page_filters_to_the_errors_opens_a_row_and_pages_forward(
    browser: Any, served: str, sample: dict[str, Any]
) -> None:
    from selenium.webdriver.support.ui import Select

    rows = _all_rows(sample)
    failed = [r for r in rows if r["status"] == "error"]
    _open(browser, served)
    Select(browser.find_element("id", "f-status")).select_by_value("error")
    _wait_for(lambda: "status=error" in browser.current_url)
    _settle(browser)
    assert browser.find_element("id", "pager-info").text == f"1–{min(50, len(failed))} of {len(failed)}"
    assert set(_column(browser, "#rows tbody td.status")) == {"error"}
    assert _column(browser, "#rows tbody td.id") == [r["id"] for r in failed[:50]]
    assert _text(browser, '#totals [data-k="rows"] .v') == f"{len(failed):,}"

    # open the first failed row: its error, the messages sent, no answer
    browser.find_element("css selector", "#rows tbody tr").click()
    _wait_for(lambda: browser.find_element("id", "detail").is_displayed())
    _settle(browser)
    first = failed[0]
    assert _text(browser, "#detail-error") == first["error"]
    assert _text(browser, "#detail-answer") == "(no answer)"
    messages = _column(browser, "#detail-messages .message pre")
    assert messages == ["Reply with the answer only.", f"Answer briefly: {first['question']}"]
    assert _text(browser, '#detail-facts [data-k="attempts"] td') == "1"
    assert _text(browser, '#detail-facts [data-k="http_status"] td') == str(first["http_status"])
    browser.find_element("id", "detail-close").click()
    _wait_for(lambda: not browser.find_element("id", "detail").is_displayed())

    # back to every row, then one page forward
    Select(browser.find_element("id", "f-status")).select_by_value("")
    _wait_for(lambda: "status=error" not in browser.current_url)
    _settle(browser)
    browser.find_element("id", "pager-next").click()
    _wait_for(lambda: "offset=50" in browser.current_url)
    _settle(browser)
    assert browser.find_element("id", "pager-info").text == f"51–100 of {len(rows)}"
    assert _column(browser, "#rows tbody td.id") == [r["id"] for r in rows[50:100]]
    assert _column(browser, "#rows tbody td:first-child")[0] == "50"

    # an ok row in full: answer, usage, latency, and the other model on the same id
    browser.find_elements("css selector", "#rows tbody tr")[2].click()
    _wait_for(lambda: browser.find_element("id", "detail").is_displayed())
    _settle(browser)
    shown = rows[52]
    assert _text(browser, "#detail-answer") == (shown["content"] or "(no answer)")
    assert _text(browser, '#detail-facts [data-k="total_tokens"] td') == str(shown["total_tokens"] or "–")
    cells = _column(browser, "#sweep .cell h4")
    assert sorted(c.split(" · ")[0] for c in cells) == sorted(MODELS)


def test_frequent_error_link_shows_its_rows(browser: Any, served: str, sample: dict[str, Any]) -> None:
    _open(browser, served)
    link = browser.find_element("css selector", "#errors li a")
    kind = link.text
    link.click()
    _wait_for(lambda: "error_kind=" in browser.current_url)
    _settle(browser)
    expected = [r for r in _all_rows(sample) if r["error"] and error_kind(r["error"]) == kind]
    assert browser.find_element("id", "pager-info").text.endswith(f"of {len(expected)}")
    assert _column(browser, "#rows tbody td.error") == [r["error"] for r in expected[:50]]
    assert kind in _text(browser, "#f-kind")


def test_search_finds_prompts_and_markup_stays_text(browser: Any, served: str) -> None:
    _open(browser, served)
    search = browser.find_element("id", "f-search")
    search.send_keys("window.__pwned")
    _wait_for(lambda: "search=" in browser.current_url)
    _settle(browser)
    assert _column(browser, "#rows tbody td.id") == ["x-script", "x-script"]
    prompts = _column(browser, "#rows tbody td.prompt")
    assert prompts[0] == f"Answer briefly: {SCRIPT_PROMPT}"
    assert _column(browser, "#rows tbody td.answer")[0] == SCRIPT_ANSWER
    browser.find_element("css selector", "#rows tbody tr").click()
    _wait_for(lambda: browser.find_element("id", "detail").is_displayed())
    _settle(browser)
    assert _text(browser, "#detail-answer") == SCRIPT_ANSWER
    assert f"Answer briefly: {SCRIPT_PROMPT}" in _column(browser, "#detail-messages .message pre")
    time.sleep(0.3)  # an injected onerror would have fired by now
    assert browser.execute_script("return window.__pwned") is None
    assert browser.execute_script("return document.querySelectorAll('script').length") == 1
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0


def test_page_refreshes_a_live_run(
    browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    questions = tmp_path / "questions.jsonl"
    _write_questions(questions, 80)
    output = tmp_path / "live.parquet"
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    with gateway_in_thread(GatewayConfig(port=0, latency_ms=100)) as gw:
        runner = threading.Thread(target=_run, args=(questions, output, "gpt-4o", gw.base_url),
                                  kwargs={"checkpoint_every": 4, "concurrency": 1})
        runner.start()
        _wait_for(lambda: _checkpointed(output) >= 4)
        process, url = _start_view(str(output))
        try:
            _open(browser, url)
            assert browser.find_element("id", "live").is_displayed()
            seen = int(_text(browser, '#totals [data-k="rows"] .v').replace(",", ""))
            assert 0 < seen < 80
            _wait_for(lambda: int(_text(browser, '#totals [data-k="rows"] .v').replace(",", "")) > seen,
                      timeout=20)
            runner.join(60)
            # the run ended: its output takes over, and the page says it is no longer live
            _wait_for(lambda: _text(browser, '#totals [data-k="rows"] .v') == "80", timeout=20)
            _wait_for(lambda: not browser.find_element("id", "live").is_displayed(), timeout=10)
        finally:
            _stop(process)
            runner.join(60)


def test_readme_screenshot_is_a_small_png() -> None:
    """docs/viewer.png is the README's screenshot; it exists and is a small PNG."""
    png = ROOT / "docs" / "viewer.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 400_000


def test_a_structured_run_shows_parsed_and_the_response_format_sent(
    tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    questions = tmp_path / "questions.jsonl"
    _write_questions(questions, 6)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}},
              "required": ["answer"], "additionalProperties": False}
    (tmp_path / "answer.json").write_text(json.dumps(schema))
    output = tmp_path / "structured.parquet"
    _run(questions, output, "gpt-4o", gateway.base_url, json_schema=tmp_path / "answer.json")
    data = Dataset(open_sources([output]))
    assert "parsed" in data.describe()["optional_columns"]
    detail = data.row(0)
    expected = pq.read_table(output).column("parsed")[0].as_py()
    assert detail["row"]["parsed"] == expected and json.loads(expected)
    sent = detail["request"]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == schema
    assert "parsed" not in detail["inputs"] and "reasks" not in detail["inputs"]


def test_a_checkpoint_folded_by_an_incremental_run_is_read_afresh(
    tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchrunner.viewer.sources import CheckpointSource

    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    questions = tmp_path / "questions.jsonl"
    _write_questions(questions, 12)
    output = tmp_path / "folded.parquet"
    _run(questions, output, "gpt-4o", gateway.base_url)
    directory = output.with_name(output.name + ".checkpoint")
    source = CheckpointSource(output)
    assert source.rows == 12 and not source.refresh()  # nothing new
    # What an incremental run does: the kept results in a new segment, the old ones removed.
    (directory / "part-00001.arrows").rename(directory / "part-00002.arrows")
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, "first_segment": 2}))
    assert source.refresh()
    assert source.rows == 12
    ids = source.read(source.visible[:3], ["id"]).column("id").to_pylist()
    assert ids == ["q0000", "q0001", "q0002"]


def test_a_scored_sweep_in_one_file_shows_its_models_side_by_side(
    tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    questions = tmp_path / "questions.jsonl"
    _write_questions(questions, 10)
    output = tmp_path / "sweep.parquet"
    _run(questions, output, None, gateway.base_url, models=MODELS, score="contains",
         reference_column="reference")
    table = pq.read_table(output).to_pylist()
    data = Dataset(open_sources([output]))
    assert data.describe()["has_score"]
    scores = [r["score"] for r in table if r["score"] is not None]
    summary = data.summary(Filters())
    assert summary["totals"]["mean_score"] == pytest.approx(sum(scores) / len(scores))
    assert {m["model"] for m in summary["models"]} == set(MODELS)
    detail = data.row(1)
    assert [(s["model"], s["id"]) for s in detail["sweep"]] == [(m, table[0]["id"]) for m in MODELS]
    assert detail["request"]["model"] == table[1]["model"]
