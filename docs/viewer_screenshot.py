"""Make docs/viewer.png, the README's picture of `batchrunner view` on the sample eval sweep.

    PYTHONPATH=. python docs/viewer_screenshot.py

Runs jobs/nightly-eval.toml through the simulator for two models (5% of answers a 500/503,
one attempt a row, so a few rows fail), serves both outputs with `batchrunner view`, opens a
page in headless Chromium (/usr/bin/chromium) and saves the screenshot.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    import batchrunner
    from batchrunner.simulator import GatewayConfig, gateway_in_thread

    folder = Path(tempfile.mkdtemp(prefix="viewer-shot-"))
    os.environ.setdefault("RU_LLM_API_KEY", "sk-ru-screenshot")
    output = folder / "nightly-eval.parquet"
    with gateway_in_thread(GatewayConfig(port=0, error_rate=0.05, fault_seed=5,
                                         latency_ms=300, jitter_ms=250)) as gw:
        config = batchrunner.build_config(
            batchrunner.load_job(ROOT / "jobs" / "nightly-eval.toml"),
            {"output": output, "base_url": gw.base_url, "max_attempts": 1, "deadline": None,
             "rpm": None, "summary_json": None, "concurrency": 64},
        )
        batchrunner.run(config, handle_signals=False)  # the sweep: both models, scored
    outputs = [str(output)]
    server = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "view", *outputs, "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = re.search(r"http://\S+", server.stdout.readline()).group(0)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                     "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url)
        time.sleep(2.5)
        out = ROOT / "docs" / "viewer.png"
        driver.save_screenshot(str(out))
        print(f"wrote {out}")
    finally:
        driver.quit()
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=20)


if __name__ == "__main__":
    main()
