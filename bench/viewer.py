"""The results viewer on a 1,000,000-row output, driven in headless Chromium (issue 20).

    PYTHONPATH=. /work/venv/bin/python bench/viewer.py [--rows 1000000] [--keep DIR]

Writes a sweep-shaped output (half the rows' ids, two models, 3% errors, a score and a
cache_hit column, 65,536-row row groups as `batchrunner run` writes them, and the checkpoint
manifest beside it so the page rebuilds the messages sent), starts `batchrunner view` on it
as a user would, and measures:

- start-up: from spawning the command to its printing the URL (it indexes the file first);
- first paint: from navigation to the totals and the first page of rows drawn (the page's own
  `performance.now()`, which counts from navigation start);
- a page of rows: clicking Next until the new rows are drawn, ten times, and the JSON API alone
  for pages at random offsets (cold row groups);
- filters: errors only, an error's text, a search in prompts and answers (the first time, which
  streams every row group, and again, from the cached mask);
- the server's resident memory now and at its peak (VmRSS, VmHWM from /proc).

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's chromium, chromium-driver), and
Selenium. About a minute for a million rows on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the model answer rule basic level approach simple limit first result value capital "
         "river number year element planet country city language process energy").split()


def make_output(path: Path, rows: int) -> None:
    """A sweep-shaped output of `rows` rows (two models on each id), written in row groups."""
    rng = np.random.default_rng(7)
    answers = pa.array([" ".join(rng.choice(WORDS, 24)).capitalize() + "." for _ in range(2000)])
    questions = pa.array([f"What is the {' '.join(rng.choice(WORDS, 6))}?" for _ in range(3000)])
    schema = None
    writer = None
    step = 65536
    try:
        for start in range(0, rows, step):
            n = min(step, rows - start)
            i = np.arange(start, start + n)
            ids = pa.array([f"q{k:07d}" for k in i // 2])
            error = rng.random(n) < 0.03
            status = np.where(error, "error", "ok")
            kinds = np.array(["HTTP 503: The server is overloaded or not ready yet.",
                              "HTTP 500: The server had an error while processing your request.",
                              "timeout: no complete answer within 120 s"])
            errors = pa.array(np.where(error, kinds[rng.integers(0, 3, n)], None), pa.string())
            content = answers.take(pa.array(rng.integers(0, len(answers), n)))
            content = pc.if_else(pa.array(error), pa.nulls(n, pa.string()), content)
            prompt_tokens = rng.integers(30, 80, n)
            completion_tokens = rng.integers(10, 60, n)
            model = np.where(i % 2 == 0, "gpt-4o", "gpt-4o-mini")
            price = np.where(model == "gpt-4o", 1e-5, 6e-7)
            cost = np.where(error, np.nan, (prompt_tokens + completion_tokens) * price)
            table = pa.table({
                "id": ids,
                "question": questions.take(pa.array((i // 2) % len(questions))),
                "reference": pa.array(np.char.add("ref ", ((i // 2) % 97).astype(str))),
                "status": pa.array(status),
                "content": content,
                "choices": pa.ListArray.from_arrays(pa.array(np.arange(n + 1), pa.int32()),
                                                    content),
                "finish_reason": pa.array(np.where(error, None, "stop"), pa.string()),
                "model": pa.array(model),
                "response_model": pa.array(np.where(error, None, model), pa.string()),
                "prompt_tokens": pa.array(np.where(error, None, prompt_tokens), pa.int64()),
                "completion_tokens": pa.array(np.where(error, None, completion_tokens), pa.int64()),
                "total_tokens": pa.array(np.where(error, None, prompt_tokens + completion_tokens),
                                         pa.int64()),
                "cached_tokens": pa.nulls(n, pa.int64()),
                "cost_usd": pa.array(cost, pa.float64(), from_pandas=True),
                "attempts": pa.array(np.where(error, 6, 1), pa.int32()),
                "latency_ms": pa.array(rng.gamma(4.0, 120.0, n)),
                "ttft_ms": pa.nulls(n, pa.float64()),
                "http_status": pa.array(np.where(error, 503, 200), pa.int32()),
                "error": errors,
                "response_id": pa.array(np.char.add("chatcmpl-", i.astype(str))),
                "score": pa.array(np.where(error, np.nan, rng.random(n) < 0.7).astype(float),
                                  from_pandas=True),
                "cache_hit": pa.array(rng.random(n) < 0.05),
            })
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            writer.write_table(table, row_group_size=step)
    finally:
        if writer is not None:
            writer.close()
    checkpoint = path.with_name(path.name + ".checkpoint")
    checkpoint.mkdir(exist_ok=True)
    settings = {"model": None, "system": "Reply with the answer only.",
                "template": "Answer briefly: {question}", "prompt_column": None,
                "messages_column": None, "id_column": None,
                "params": {"temperature": 0, "max_tokens": 64}, "stream": False}
    (checkpoint / "manifest.json").write_text(json.dumps(
        {"version": 1, "fingerprint": {"settings": settings}, "rows": rows, "finished": True}))


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024
    return rss, hwm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the output here and keep it")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = args.keep or Path(tempfile.mkdtemp(prefix="viewer-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "big.parquet"
    if not output.exists():
        t = time.perf_counter()
        make_output(output, args.rows)
        print(f"wrote {args.rows:,} rows ({output.stat().st_size / 1e6:.0f} MB) "
              f"in {time.perf_counter() - t:.1f} s")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "view", str(output), "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = server.stdout.readline()
    startup = time.perf_counter() - started
    url = re.search(r"http://\S+", line).group(0)
    base = url.split("?")[0]
    token = url.split("token=")[1]
    figures: dict[str, str] = {"start-up (index the file, print the URL)": f"{startup:.2f} s"}
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        def wait(condition, timeout=60.0):
            deadline = time.perf_counter() + timeout
            while not condition():
                if time.perf_counter() > deadline:
                    raise TimeoutError("the page did not finish")
                time.sleep(0.005)

        def settled() -> bool:
            return driver.execute_script(
                "return document.body.getAttribute('data-ready') === '1' && "
                "document.getElementById('loading').hidden")

        def info() -> str:  # noqa: E306
            return driver.execute_script("return document.getElementById('pager-info').textContent")

        driver.get(url)
        wait(settled)
        first_paint = driver.execute_script("return window.__viewerFirstPaint")
        figures["first paint (navigation -> totals and first rows drawn)"] = f"{first_paint:.0f} ms"
        # a second visit: the browser's caches warm, the server's summary cached
        driver.get("about:blank")
        driver.get(url)
        wait(settled)
        figures["first paint, second visit"] = f"{driver.execute_script('return window.__viewerFirstPaint'):.0f} ms"

        def in_page(action: str) -> float:
            """Milliseconds from `action` to the page's next render, by the page's clock."""
            driver.execute_script(
                "window.__t0 = performance.now(); window.__r0 = window.__viewerRenders; " + action)
            wait(lambda: driver.execute_script("return window.__viewerRenders > window.__r0"))
            wait(settled)
            return driver.execute_script("return window.__viewerLastRender - window.__t0")

        next_page = "document.getElementById('pager-next').click();"
        times = [in_page(next_page) for _ in range(10)]
        figures["Next page in the browser (click -> rows drawn), median / max of 10"] = (
            f"{np.median(times):.0f} / {max(times):.0f} ms")

        def api(path: str) -> float:
            t = time.perf_counter()
            with urllib.request.urlopen(f"{base}api/{path}&token={token}", timeout=120) as r:
                r.read()
            return (time.perf_counter() - t) * 1000

        rng = random.Random(3)
        cold = [api(f"rows?offset={rng.randrange(args.rows - 50)}&limit=50") for _ in range(20)]
        figures["a page at a random offset, API (cold row group), median / max of 20"] = (
            f"{np.median(cold):.0f} / {max(cold):.0f} ms")

        errors_only = ("const s = document.getElementById('f-status'); s.value = 'error'; "
                       "s.dispatchEvent(new Event('change'));")
        figures["filter: errors only (browser: change -> summary and rows drawn)"] = (
            f"{in_page(errors_only):.0f} ms")
        assert "status=error" in driver.current_url and "of 1,000,000" not in info()
        times = [in_page(next_page) for _ in range(5)]
        figures["Next page of the errors, median / max of 5"] = f"{np.median(times):.0f} / {max(times):.0f} ms"

        first = api("rows?error=timeout&limit=50")
        again = api("rows?error=timeout&limit=50&offset=50")
        figures["filter: error text (streams the error column), first / cached"] = (
            f"{first:.0f} / {again:.0f} ms")
        first = api("rows?search=planet+country&limit=50")
        again = api("rows?search=planet+country&limit=50&offset=50")
        figures["filter: search prompts and answers (streams them), first / cached"] = (
            f"{first:.0f} / {again:.0f} ms")
        figures["summary of a search (cached mask)"] = f"{api('summary?search=planet+country'):.0f} ms"
        figures["one row in full with its sweep, API"] = f"{api('row/500001?x=1'):.0f} ms"
        rss, peak = memory(server.pid)
        figures["server memory: resident now / peak"] = f"{rss:.0f} / {peak:.0f} MB"
    finally:
        driver.quit()
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    print(f"\nbatchrunner view on {args.rows:,} rows ({output.stat().st_size / 1e6:.0f} MB Parquet)\n")
    print("| measure | figure |\n|---|---|")
    for name, value in figures.items():
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
