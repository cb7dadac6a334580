"""The API key is in no file and no line, even when a gateway echoes it (docs/gateway.md#credentials).

A gateway or a proxy that quotes the Authorization header in its error message would put the
key into the row's `error`: the output, the checkpoint, `--summary-json`, stderr. The one
scrubber (batchrunner.redaction) masks it where gateway text enters and in the log lines.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scripted_server import Reply, Request, scripted_server

from batchrunner.cli import group as cli
from batchrunner.redaction import KEY_MASK, scrub

REPO = Path(__file__).resolve().parents[1]

KEYS = {
    "sk": "sk-proj-" + "Q7x" * 16,
    "dashless": "A1b2C3d4" * 6,  # 48 letters and digits, no dash, no prefix
    "short-dashless": "Zq9Wm4Kt7Rp2Lx5V",  # not key-shaped: masked because it is the run's key
}


def _echo(request: Request, status: int) -> Reply:
    """An error body quoting the request's Authorization header, as some proxies do."""
    header = request.headers.get("authorization", "")
    key = header.removeprefix("Bearer ")
    message = f"invalid request; headers seen: Authorization: {header}; the key {key} is not allowed"
    return Reply(status=status, json={"error": {"message": message, "type": "invalid_request"}})


def _run(tmp_path: Path, key: str, status: int, *extra: str) -> subprocess.CompletedProcess[str]:
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "prompt": f"q{i}"}) + "\n" for i in range(6)))

    def handler(request: Request) -> Reply:
        if request.path.endswith("/models"):
            return Reply(json={"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})
        return _echo(request, status)

    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "RU_LLM_API_KEY", "RU_LLM_BASE_URL")}
    env.update(ECHO_KEY=key, PYTHONPATH=str(REPO), BATCHRUNNER_LOG_SECONDS="0")
    with scripted_server(handler) as server:
        return subprocess.run(
            [sys.executable, "-m", "batchrunner", "run", "-i", str(rows),
             "-o", str(tmp_path / "out.parquet"), "-m", "gpt-4o-mini", "--base-url",
             server.base_url, "--api-key-env", "ECHO_KEY", "-c", "2", "--checkpoint-every", "2",
             "--summary-json", str(tmp_path / "summary.json"), *extra],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )


def _assert_nowhere(key: str, tmp_path: Path, *texts: str) -> None:
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files)
    for path in files:  # output, checkpoint segments, manifest, summary, any crash.log
        assert key.encode() not in path.read_bytes(), path
    for text in texts:
        assert key not in text


@pytest.mark.parametrize("name", sorted(KEYS))
def test_a_key_echoed_in_row_errors_is_in_no_file_and_no_line(tmp_path: Path, name: str) -> None:
    key = KEYS[name]
    done = _run(tmp_path, key, 400)
    assert done.returncode == 1, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == 6
    assert KEY_MASK in json.dumps(summary["errors"])
    import pyarrow.parquet as pq

    errors = pq.read_table(tmp_path / "out.parquet").column("error").to_pylist()
    assert all(f"Authorization: Bearer {KEY_MASK}; the key {KEY_MASK} is" in e for e in errors)
    exported = subprocess.run(
        [sys.executable, "-m", "batchrunner", "export", str(tmp_path / "out.parquet"), "--format", "csv"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    _assert_nowhere(key, tmp_path, done.stdout, done.stderr, exported.stdout, exported.stderr)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_key_echoed_with_a_refusal_is_in_no_file_and_no_line(
    tmp_path: Path, log_format: str
) -> None:
    key = KEYS["sk"]
    done = _run(tmp_path, key, 401, "--log-format", log_format)
    assert done.returncode == 4, done.stderr
    assert KEY_MASK in done.stderr
    _assert_nowhere(key, tmp_path, done.stdout, done.stderr)


def test_log_lines_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger("batchrunner")
    saved = root.handlers[:], root.level, root.propagate
    try:
        for log_format in ("text", "json"):
            cli._configure_logging(log_format=log_format)
            logging.getLogger("batchrunner.x").warning("gateway said: Bearer %s", KEYS["sk"])
    finally:
        root.handlers[:], root.level, root.propagate = saved
    err = capsys.readouterr().err
    assert KEYS["sk"] not in err and err.count(f"Bearer {KEY_MASK}") == 2


def test_key_shapes_are_masked_and_ordinary_text_is_not() -> None:
    assert scrub("x sk-ru-abcdefghijklmnop y") == "x [key] y"
    assert scrub("Authorization: bearer eyJhbGciOi.J9x-_y") == "Authorization: bearer [key]"
    assert scrub(f"'{'f3a9' * 12}'") == "'[key]'"  # 48 dashless letters and digits
    assert scrub("a key of mine", keys=["of mine"]) == "a key [key]"
    ordinary = [
        "HTTP 404: The model `gpt-4o-mini-2024-07-18` does not exist",
        "cannot connect to http://127.0.0.1:8000: Connection refused",
        "input: line 17: not valid JSON",
        "/home/me/results/very_long_folder_name_for_the_nightly_eval_2024/out.parquet",
        "row 123456789012345678901234567890123456 of them",  # digits only: a number
        "Supercalifragilisticexpialidociousnessandmore",  # letters only: a word
        "chatcmpl-9a8b7c6d5e4f3a2b1c0d task-list 550e8400-e29b-41d4-a716-446655440000",
        "a bearer of news",
    ]
    for text in ordinary:
        assert scrub(text) == text
