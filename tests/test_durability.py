"""Storage faults: a checkpoint or output write that fails stops the spending at once.

Two kinds of fault: a real full filesystem (a small tmpfs mounted here, which needs root; the
tests say why they skip otherwise), run as a user runs it, in a subprocess of the CLI; and an
OSError injected at each write site of the checkpoint, for the causes a test cannot produce
for real (a read-only folder, an I/O error, a permission refused). Either way the simulator's
request counter says what was sent, and the checkpoint on disk says what was kept.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrunner import RunConfig, read_status, run
from batchrunner.cli.commands import main
from batchrunner.errors import StorageError, UsageError
from batchrunner.results import Result
from batchrunner.simulator import complete
from batchrunner.store import checkpoint as checkpoint_module
from batchrunner.store import durability as durability_module
from batchrunner.store import export as export_module
from batchrunner.store.checkpoint import Checkpoint, checkpoint_dir

KEY = "sk-ru-storage-tests-2c4e6a8b0d1f3e5a7c9b"
MODEL = "gpt-4o-mini"
ROWS, CONCURRENCY, EVERY = 400, 8, 20


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return KEY


def write_input(path: Path, rows: int = ROWS) -> Path:
    words = ["harbour", "lattice", "meadow", "quartz", "saffron", "tundra", "vector", "willow"]
    with open(path, "w") as handle:
        for i in range(rows):
            prompt = f"Write about {words[i % 8]} and {words[(i * 5) % 8]}, take {i}."
            handle.write(json.dumps({"id": f"r{i:05d}", "prompt": prompt}) + "\n")
    return path


def assert_exact_output(output: Path, source: Path) -> None:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    out = pq.read_table(output).to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in rows], "one row per input row, in order"
    for source_row, result in zip(rows, out):
        expected = complete({"model": MODEL,
                             "messages": [{"role": "user", "content": source_row["prompt"]}]})
        assert result["status"] == "ok" and result["content"] == expected.texts[0]


def safe_rows(output: Path) -> int:
    """Rows whose result the checkpoint on disk holds (read back, as a resume would)."""
    return read_status(output).done


# -- a real full filesystem -----------------------------------------------------------------


class SmallDisk:
    """A tmpfs of a chosen size, mounted for one test; `grow` is freeing space."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mount(self, size_bytes: int) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755",
                        f"batchrunner-test-{uuid.uuid4().hex[:8]}", str(self.path)],
                       check=True, capture_output=True)
        return self.path

    def grow(self, size_bytes: int = 64 << 20) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(self.path)],
                       check=True, capture_output=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A real filesystem that fills up: a tmpfs, which only root may mount.

    Skipped, saying why, on a machine where it cannot be mounted; in CI (CI is set: it runs as
    root) that fails the test instead, so the full-disk tests cannot vanish unseen.
    """
    def unavailable(message: str) -> None:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    if os.geteuid() != 0 or shutil.which("mount") is None:
        unavailable("a real full disk needs root to mount a small tmpfs (CI runs as root)")
    disk = SmallDisk(tmp_path / "disk")
    try:
        disk.mount(1 << 20)
    except subprocess.CalledProcessError as exc:
        unavailable(f"cannot mount a tmpfs here: {exc.stderr.decode().strip()}")
    disk.unmount()
    try:
        yield disk
    finally:
        disk.unmount()


def cli_run(source: Path, output: Path, base_url: str, *extra: str,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["RU_LLM_API_KEY"] = KEY
    command = [sys.executable, "-m", "batchrunner", "run", "-i", str(source), "-o", str(output),
               "-m", MODEL, "--base-url", base_url, "-c", str(CONCURRENCY),
               "--checkpoint-every", str(EVERY), "--quiet", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def cli_status(output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchrunner", "status", str(output)],
                          capture_output=True, text=True, timeout=60)


def checkpoint_bytes(output: Path) -> int:
    """What a finished run's checkpoint occupies on a tmpfs (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in checkpoint_dir(output).iterdir())


# Space for the files a run writes before its first batch: lock, manifest (and its temporary
# copy while it is replaced), the reserved fault record and the first segment's schema.
START_BYTES = 5 * 4096


@pytest.mark.parametrize("fault_point", ["first write", "mid-run write", "final output"])
def test_a_full_disk_stops_sending_at_once_and_the_same_command_finishes_the_job(
    fault_point: str, small_disk: SmallDisk, tmp_path: Path, start_gateway  # type: ignore[no-untyped-def]
) -> None:
    gw = start_gateway(latency_ms=20, jitter_ms=5)
    source = write_input(tmp_path / "in.jsonl")
    if fault_point == "first write":
        size = START_BYTES
    elif fault_point == "mid-run write":
        size = START_BYTES + 64 * 1024  # about a quarter of the rows' results
    else:  # room for every result, not for the output beside them
        reference = tmp_path / "reference" / "out.parquet"
        reference.parent.mkdir()
        assert cli_run(source, reference, gw.base_url).returncode == 0
        size = checkpoint_bytes(reference) + 16 * 1024
        assert size < checkpoint_bytes(reference) + reference.stat().st_size
        gw.stats.reset()
    output = small_disk.mount(size) / "out.parquet"
    summary = tmp_path / "summary.json"

    done = cli_run(source, output, gw.base_url, "--summary-json", str(summary))

    assert done.returncode == 74, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    line = lines[0]
    kept = safe_rows(output)
    sent = gw.stats.requests
    lost = sent - kept
    print(f"{fault_point}: {sent} requests sent, {kept} rows safe, {lost} lost "
          f"(bound {CONCURRENCY + EVERY})")
    assert lost <= CONCURRENCY + EVERY, f"{lost} answers paid for and thrown away"
    assert "No space left on device" in line and "free space and run the same command again" in line
    assert f"{kept:,} of {ROWS:,} rows are safe" in line
    report = json.loads(summary.read_text())  # beside the disk: it could be written
    assert report["exit_code"] == 74 and report["storage_fault"]["errno"] == "ENOSPC"
    assert report["storage_fault"]["cause"] == "No space left on device"
    assert report["storage_fault"]["lost_answers"] <= lost
    if fault_point == "final output":
        assert kept == ROWS and sent == ROWS and lost == 0
        assert str(output) in line and not output.exists()
    else:
        assert str(checkpoint_dir(output)) in line
        assert (kept == 0) if fault_point == "first write" else (kept > 0)
        assert sent < ROWS / 2, "it went on sending after the disk was full"

    # status says why it stopped, although the disk was full when the run ended
    state = cli_status(output)
    assert state.returncode == 0 and "stopped on a storage fault" in state.stdout, state.stdout

    small_disk.grow()  # free space, then the same command
    again = cli_run(source, output, gw.base_url, "--summary-json", str(summary))
    assert again.returncode == 0, again.stderr
    assert_exact_output(output, source)
    assert gw.stats.requests - sent == ROWS - kept, "rows already safe were sent again"
    assert "stopped" not in cli_status(output).stdout


def test_the_fault_record_fits_on_a_disk_left_with_no_byte_free(
    small_disk: SmallDisk, tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    # Another process takes every byte the failed write gave back: the record of the fault is
    # written over the space reserved at the start, so `status` can still say what happened.
    output = small_disk.mount(START_BYTES + 32 * 1024) / "out.parquet"
    record = durability_module.CheckpointWriter.record

    def record_on_a_full_disk(self: Any, rows: int) -> bool:
        fd = os.open(output.parent / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(fd, b"x" * 512)
        finally:
            os.close(fd)
        return record(self, rows)

    monkeypatch.setattr(durability_module.CheckpointWriter, "record", record_on_a_full_disk)
    cfg = config(tmp_path, gateway.base_url).replace(output=output)
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 74
    fault = read_status(output).storage_fault
    assert fault is not None and fault["errno"] == "ENOSPC" and fault["message"] == report.message


# -- an OSError injected at each write site -------------------------------------------------


class FaultyOs:
    """The os module as checkpoint.py and durability.py see it, with chosen calls failing.

    `segment_fds` holds the descriptors of the checkpoint segments checkpoint.py opened.
    """

    def __init__(self) -> None:
        self._faults: dict[str, Callable[..., int | None]] = {}
        self.segment_fds: set[int] = set()
        self.segment_open_errno: int | None = None  # set: opening a new segment fails so

    def open_tracking_segments(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        """builtins.open, as checkpoint.py calls it, remembering segment descriptors."""
        if str(path).endswith(".arrows") and self.segment_open_errno is not None:
            code = self.segment_open_errno
            raise OSError(code, os.strerror(code), str(path))
        handle = open(path, mode, *args, **kwargs)
        if str(path).endswith(".arrows"):
            self.segment_fds.add(handle.fileno())
        return handle

    def fail(self, name: str, decide: Callable[..., int | None]) -> None:
        """Make `os.<name>` raise the errno `decide(*args)` returns (None: the real call)."""
        self._faults[name] = decide

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        decide = self._faults.get(name)
        if decide is None:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            code = decide(*args)
            if code is not None:
                raise OSError(code, os.strerror(code))
            return real(*args, **kwargs)

        return call


def nth_segment_fsync(
    faulty: FaultyOs, n: int, code: int, times: int = 10**9
) -> Callable[..., int | None]:
    """Fail the n-th fsync of a checkpoint segment (the first is its schema), `times` times."""
    seen = {"count": 0, "failed": 0}

    def decide(fd: int) -> int | None:
        if fd not in faulty.segment_fds:
            return None
        seen["count"] += 1
        if seen["count"] >= n and seen["failed"] < times:
            seen["failed"] += 1
            return code
        return None

    return decide


@pytest.fixture
def faulty_os(monkeypatch: pytest.MonkeyPatch) -> FaultyOs:
    faulty = FaultyOs()
    monkeypatch.setattr(checkpoint_module, "os", faulty)
    monkeypatch.setattr(durability_module, "os", faulty)  # the atomic replace of the output
    monkeypatch.setattr(checkpoint_module, "open", faulty.open_tracking_segments, raising=False)
    return faulty


def config(tmp_path: Path, base_url: str, **settings: Any) -> RunConfig:
    source = tmp_path / "in.jsonl"
    if not source.exists():
        write_input(source)
    settings.setdefault("concurrency", CONCURRENCY)
    settings.setdefault("checkpoint_every", EVERY)
    return RunConfig(input=source, output=tmp_path / "out.parquet", model=MODEL,
                     base_url=base_url, **settings)


def finish_after_fix(cfg: RunConfig, gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cause is fixed: the same run sends only what the checkpoint lacks and completes."""
    monkeypatch.undo()
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    kept, before = safe_rows(cfg.output), gateway.stats.requests
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 0, report
    assert gateway.stats.requests - before == ROWS - kept
    assert_exact_output(cfg.output, cfg.input)
    assert read_status(cfg.output).storage_fault is None


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_segment_write_stops_the_run_with_exit_74(
    code: int, tmp_path: Path, gateway, faulty_os: FaultyOs, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    # a segment's fsyncs: its schema, two batches, then every one fails
    faulty_os.fail("fsync", nth_segment_fsync(faulty_os, 4, code))
    cfg = config(tmp_path, gateway.base_url)
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 74 and report.reason == "storage"
    kept = safe_rows(cfg.output)
    assert kept == report.ok + report.failed > 0
    assert gateway.stats.requests - kept <= CONCURRENCY + EVERY
    assert os.strerror(code) in report.message and str(checkpoint_dir(cfg.output)) in report.message
    assert f"{gateway.stats.requests - kept:,} answers could not be kept" in report.message
    fault = read_status(cfg.output).storage_fault
    assert fault is not None and fault["errno"] == errno.errorcode[code]
    finish_after_fix(cfg, gateway, monkeypatch)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_first_segment_that_cannot_be_created_stops_the_run_at_the_first_write(
    code: int, tmp_path: Path, gateway, faulty_os: FaultyOs, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    faulty_os.segment_open_errno = code  # e.g. the folder was made read-only after the start
    cfg = config(tmp_path, gateway.base_url)
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 74
    assert f"0 of {ROWS:,} rows are safe" in report.message and os.strerror(code) in report.message
    assert 0 < gateway.stats.requests <= CONCURRENCY + EVERY
    assert f"{gateway.stats.requests:,} answers could not be kept" in report.message
    assert read_status(cfg.output).segments == 0
    finish_after_fix(cfg, gateway, monkeypatch)


def test_the_last_attempt_keeps_the_answers_that_were_in_flight(
    tmp_path: Path, gateway, faulty_os: FaultyOs, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    # One write fails (a passing I/O error): nothing more is sent, what was in flight is
    # answered within the grace period, and the last attempt writes all of it, in a new segment.
    faulty_os.fail("fsync", nth_segment_fsync(faulty_os, 3, errno.EIO, times=1))
    cfg = config(tmp_path, gateway.base_url)
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 74
    assert "0 answers could not be kept" in report.message
    assert safe_rows(cfg.output) == gateway.stats.requests < ROWS / 2
    assert read_status(cfg.output).segments == 2
    finish_after_fix(cfg, gateway, monkeypatch)


def test_a_slow_disk_cannot_make_a_fault_cost_more_than_one_interval(
    tmp_path: Path, start_gateway, faulty_os: FaultyOs, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    # Each write takes 0.3 s: without holding new requests back, the answers that arrive
    # meanwhile (hundreds) would all be lost with the write that fails.
    gw = start_gateway(latency_ms=5)
    real_write = Checkpoint.write_batch

    def slow_write(self: Checkpoint, batch: Any) -> None:
        import time

        time.sleep(0.3)
        real_write(self, batch)

    monkeypatch.setattr(Checkpoint, "write_batch", slow_write)
    faulty_os.fail("fsync", nth_segment_fsync(faulty_os, 4, errno.EIO))
    cfg = config(tmp_path, gw.base_url)
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 74
    lost = gw.stats.requests - safe_rows(cfg.output)
    assert 0 < lost <= CONCURRENCY + EVERY, f"{lost} answers lost"


def test_a_checkpoint_folder_deleted_under_the_run_stops_it(
    tmp_path: Path, gateway  # type: ignore[no-untyped-def]
) -> None:
    cfg = config(tmp_path, gateway.base_url)

    def delete_folder(result: Any, tally: Any) -> None:
        if tally.done == 3 * EVERY:
            shutil.rmtree(checkpoint_dir(cfg.output))

    report = run(cfg, on_result=delete_folder, handle_signals=False)
    assert report.exit_code == 74
    assert "the folder was removed during the run" in report.message
    assert f"0 of {ROWS:,} rows are safe" in report.message
    assert gateway.stats.requests < ROWS / 2
    # the same command starts afresh and completes
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 0
    assert_exact_output(cfg.output, cfg.input)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_output_write_keeps_the_checkpoint_and_the_rerun_sends_nothing(
    code: int, tmp_path: Path, gateway, faulty_os: FaultyOs, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    cfg = config(tmp_path, gateway.base_url)
    faulty_os.fail("replace", lambda src, dst: code if Path(dst) == cfg.output else None)
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 74 and report.reason == "storage"
    assert f"cannot write the output {cfg.output}: {os.strerror(code)}" in report.message
    assert f"{ROWS:,} of {ROWS:,} rows are safe" in report.message
    assert not cfg.output.exists() and safe_rows(cfg.output) == ROWS
    assert not list(tmp_path.glob(".out.parquet.tmp-*")), "the temporary file is removed"
    sent = gateway.stats.requests
    assert sent == ROWS
    monkeypatch.undo()
    monkeypatch.setenv("RU_LLM_API_KEY", KEY)
    report = run(cfg, handle_signals=False)
    assert report.exit_code == 0 and gateway.stats.requests == sent, "nothing is sent again"
    assert_exact_output(cfg.output, cfg.input)


def test_a_parquet_writer_that_fails_on_a_full_disk_is_exit_74(
    tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    # pyarrow's own error for ENOSPC: an OSError whose errno is set, with its own wording.
    class FullWriter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No "
                          "space left on device")

    monkeypatch.setattr(export_module.pq, "ParquetWriter", FullWriter)  # the output writer
    report = run(config(tmp_path, gateway.base_url), handle_signals=False)
    assert report.exit_code == 74 and "No space left on device; 400 of 400" in report.message


def test_new_results_after_a_finished_output_keep_the_manifest_honest(
    tmp_path: Path, start_gateway, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    # --retry-failed after a finished run: the first write must mark the output stale; when
    # that manifest write fails, the output is not taken for finished by the next run.
    gw = start_gateway(error_rate=0.3, fault_seed=3)
    cfg = config(tmp_path, gw.base_url, max_attempts=1)
    first = run(cfg, handle_signals=False)
    assert first.exit_code == 1 and first.failed > 0
    real = durability_module.write_atomically
    refused = []

    def full_once(path: Path, data: bytes) -> None:
        if path.name == "manifest.json" and b'"finished": false' in data and not refused:
            refused.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(durability_module, "write_atomically", full_once)
    report = run(cfg.replace(retry_failed=True), handle_signals=False)
    assert report.exit_code == 74 and refused
    assert "0 answers could not be kept" in report.message  # the last attempt wrote them
    assert read_status(cfg.output).failed < first.failed
    monkeypatch.setattr(durability_module, "write_atomically", real)
    report = run(cfg, handle_signals=False)  # complete: the output is rebuilt, not kept stale
    table = pq.read_table(cfg.output)
    assert table.num_rows == ROWS
    assert table.column("status").to_pylist().count("error") == report.failed < first.failed


@pytest.mark.parametrize(("code", "exit_code"), [(errno.ENOSPC, 74), (errno.EIO, 74),
                                                 (errno.EROFS, 2), (errno.EACCES, 2)])
def test_a_checkpoint_that_cannot_be_started_sends_nothing(
    code: int, exit_code: int, tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    def refuse(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(durability_module, "write_atomically", refuse)
    error_class = StorageError if exit_code == 74 else UsageError
    with pytest.raises(error_class) as caught:
        run(config(tmp_path, gateway.base_url), handle_signals=False)
    assert caught.value.exit_code == exit_code
    assert os.strerror(code) in str(caught.value)
    if exit_code == 74:
        assert "nothing was sent" in str(caught.value)
    assert gateway.stats.requests == 0


def test_a_fault_record_that_cannot_be_reserved_stops_before_sending(
    tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    def full(directory: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durability_module, "_reserve", full)
    with pytest.raises(StorageError):
        run(config(tmp_path, gateway.base_url), handle_signals=False)
    assert gateway.stats.requests == 0
    assert not read_status(tmp_path / "out.parquet").live, "the lock is released"


def test_the_cli_ends_a_storage_fault_with_one_line_and_the_summary_says_why(
    tmp_path: Path, gateway, faulty_os: FaultyOs  # type: ignore[no-untyped-def]
) -> None:
    faulty_os.fail("fsync", nth_segment_fsync(faulty_os, 3, errno.EIO))
    source = write_input(tmp_path / "in.jsonl")
    output, summary = tmp_path / "out.parquet", tmp_path / "summary.json"
    result = CliRunner().invoke(main, [
        "run", "-i", str(source), "-o", str(output), "-m", MODEL, "--base-url",
        gateway.base_url, "-c", str(CONCURRENCY), "--checkpoint-every", str(EVERY),
        "--summary-json", str(summary)])
    assert result.exit_code == 74, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("batchrunner: error: cannot write the checkpoint")
    assert "Input/output error" in lines[0] and "check the disk" in lines[0]
    data = json.loads(summary.read_text())
    assert data["exit_code"] == 74 and data["reason"] == "storage"
    assert data["storage_fault"]["cause"] == "Input/output error"
    assert data["storage_fault"]["safe_rows"] == safe_rows(output)

    status = CliRunner().invoke(main, ["status", str(output)])
    assert status.exit_code == 0
    assert status.output.startswith(f"{output}: stopped on a storage fault: cannot write")
    as_json = json.loads(
        CliRunner().invoke(main, ["status", str(output), "--format", "json"]).output
    )
    assert as_json["storage_fault"]["errno"] == "EIO"


def test_a_full_disk_at_the_start_is_exit_74_with_one_line_and_a_summary(
    tmp_path: Path, gateway, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    source = write_input(tmp_path / "in.jsonl", 10)
    output, summary = tmp_path / "out.parquet", tmp_path / "summary.json"
    args = ["run", "-i", str(source), "-o", str(output), "-m", MODEL, "--base-url",
            gateway.base_url, "--summary-json", str(summary)]
    assert CliRunner().invoke(main, args).exit_code == 0
    output.unlink()  # the output is gone; the checkpoint is complete

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durability_module, "write_atomically", full)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 74
    assert len(result.stderr.strip().splitlines()) == 1
    data = json.loads(summary.read_text())
    assert data["exit_code"] == 74 and data["storage_fault"]["cause"] == "No space left on device"
    assert "stopped on a storage fault" in CliRunner().invoke(main, ["status", str(output)]).output


def test_a_failed_write_never_cuts_a_file_that_replaced_the_segment(tmp_path: Path) -> None:
    # The folder is moved away and a new one put in its place holding a file of the same name:
    # the write is refused (its data would go to a file nobody reads), and that file is intact.
    output = tmp_path / "out.parquet"
    with Checkpoint.open(output, {"input": {}, "settings": {}}, rows=10) as ckpt:
        for i in range(2):
            ckpt.append(Result(index=i, id=f"r{i}", status="error", model=MODEL, error="x"))
        ckpt.write_batch(ckpt.take_batch())
        folder = checkpoint_dir(output)
        folder.rename(tmp_path / "moved")
        folder.mkdir()
        stranger = folder / "part-00001.arrows"
        stranger.write_bytes(b"another run's data" * 100)
        ckpt.append(Result(index=2, id="r2", status="error", model=MODEL, error="x"))
        with pytest.raises(FileNotFoundError):
            ckpt.write_batch(ckpt.take_batch())
        assert stranger.read_bytes() == b"another run's data" * 100


# -- the other commands that write: export, score, summary's plot -------------------------------


def test_export_score_and_a_plot_on_a_full_disk_are_exit_74_with_one_line(
    small_disk: SmallDisk, tmp_path: Path, gateway: Any
) -> None:
    source = write_input(tmp_path / "in.jsonl", rows=60)
    results = tmp_path / "r.parquet"
    done = cli_run(source, results, gateway.base_url)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(results)
    big = tmp_path / "big.parquet"
    pq.write_table(pa.concat_tables([table.append_column("reference", table.column("content"))]
                                    * 100), big)  # 6,000 rows: more than the disk holds
    disk = small_disk.mount(4096)
    commands = {
        "export": ["export", str(big), "-o", str(disk / "r.csv")],
        "score": ["score", str(big), "--metric", "exact", "--reference-column", "reference",
                  "-o", str(disk / "scored.parquet")],
        "summary": ["summary", str(results), "--plot", str(disk / "cost.png")],
    }
    for name, args in commands.items():
        ended = subprocess.run([sys.executable, "-m", "batchrunner", *args],
                               capture_output=True, text=True, timeout=120)
        target = args[-1]
        assert ended.returncode == 74, (name, ended.stderr)
        assert ended.stderr.splitlines() == [
            f"batchrunner: error: cannot write {target}: No space left on device; "
            "free space and run the same command again"
        ], name
        assert list(disk.iterdir()) == [], name  # no partial file left behind
