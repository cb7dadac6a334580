"""Object-store inputs, outputs and checkpoints (`s3://…` and pyarrow's other schemes).

A run whose input or output is a URI works on local copies in a staging folder, kept in step
with the store:

- the input is downloaded once (streamed to disk, never into memory) and kept while the
  object's size and modification time are unchanged; its copy carries the object's
  modification time, so the checkpoint's fingerprint of it does not change between runs;
- the checkpoint is pulled from the store before the run (the store is the truth: a run on
  another machine resumes from it) and pushed as the run goes: a segment is an append-only
  file, so each push uploads only the bytes added since the last one, as an object of its
  own (`part-00001.arrows@0000000000004096`); pulling lays them end to end again. The
  manifest is uploaded whole when it changes. A push follows every checkpoint write within
  PUSH_SECONDS, so a killed run loses at most that much more than on a local disk;
- the output is uploaded at the end as one finished object (one PUT, or a multipart upload
  that S3 shows only once it completes): no reader sees a partial file.

Credentials come from the environment as pyarrow reads them (`AWS_ACCESS_KEY_ID`, …);
`AWS_ENDPOINT_URL` points `s3://` at another S3-compatible store (MinIO, moto, R2).
Two runs on different machines writing one object-store output are not kept apart: the lock
is a local one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from batchrunner.config.paths import is_uri
from batchrunner.errors import StorageError, UsageError
from batchrunner.store import layout

__all__ = ["PUSH_SECONDS", "StagedOutput", "is_uri", "stage_input", "staged_run", "staging_root"]

log = logging.getLogger(__name__)

PUSH_SECONDS = 2.0
_CHUNK = 8 << 20
_DELTA = re.compile(r"(.+\.arrows)@(\d{16})")


def staging_root() -> Path:
    """Where staged copies live: $BATCHRUNNER_STAGING, else the user's cache folder."""
    explicit = os.environ.get("BATCHRUNNER_STAGING")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "batchrunner" / "staging"


def _filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow's filesystem for a URI and the path in it; AWS_ENDPOINT_URL honoured for s3."""
    from pyarrow import fs

    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if parts.scheme == "s3" and endpoint and "endpoint_override" not in query:
        query["endpoint_override"] = endpoint
        uri = urlunsplit(parts._replace(query=urlencode(query)))
    try:
        return fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{_shown(uri)}: cannot open this location: {exc}") from None


def _shown(uri: str) -> str:
    """A URI as messages show it: without its query (which may carry credentials)."""
    return urlunsplit(urlsplit(uri)._replace(query=""))


def _folder_for(uri: str) -> Path:
    return staging_root() / hashlib.sha256(_shown(uri).encode()).hexdigest()[:16]


# -- the input ------------------------------------------------------------------------------


def stage_input(uri: str) -> Path:
    """A local copy of an input object, downloaded unless the copy is already current."""
    from pyarrow import fs

    filesystem, path = _filesystem(uri)
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:
        raise UsageError(f"input {_shown(uri)}: cannot be read: {exc}") from None
    if info.type != fs.FileType.File:
        raise UsageError(f"input file not found: {_shown(uri)}")
    local = _folder_for(uri) / "input" / Path(path).name
    mtime_ns = info.mtime_ns or 0
    if local.exists():
        stat = local.stat()
        if stat.st_size == info.size and stat.st_mtime_ns == mtime_ns:
            return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    try:
        with filesystem.open_input_stream(path) as source, open(tmp, "wb") as sink:
            while chunk := source.read(_CHUNK):
                sink.write(chunk)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, local)
    except OSError as exc:
        raise UsageError(f"input {_shown(uri)}: cannot be read: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return local


# -- the output and its checkpoint ----------------------------------------------------------


class StagedOutput:
    """An object-store output, its checkpoint mirrored in a local folder."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._fs, self._path = _filesystem(uri)
        self.local = _folder_for(uri) / "output" / Path(self._path).name
        self._remote_checkpoint = self._path + layout.CHECKPOINT_SUFFIX
        self._pushed: dict[str, int] = {}  # segment name -> bytes already in the store
        self._manifest_seen: tuple[int, int] | None = None

    @property
    def local_checkpoint(self) -> Path:
        """The local mirror of the checkpoint folder."""
        return layout.checkpoint_dir(self.local)

    def pull(self) -> None:
        """Make the local checkpoint what the store holds (nothing there: an empty one)."""
        from pyarrow import fs

        folder = self.local_checkpoint
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.name != layout.LOCK:
                stale.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.local.unlink()
        selector = fs.FileSelector(self._remote_checkpoint, allow_not_found=True)
        try:
            infos = self._fs.get_file_info(selector)
        except OSError as exc:
            raise UsageError(f"{_shown(self.uri)}: cannot read the checkpoint: {exc}") from None
        deltas: dict[str, list[tuple[int, str]]] = {}
        for info in infos:
            if info.type != fs.FileType.File:
                continue
            name = info.path.rsplit("/", 1)[-1]
            match = _DELTA.fullmatch(name)
            if match:
                deltas.setdefault(match[1], []).append((int(match[2]), info.path))
            elif name == layout.MANIFEST:
                (folder / name).write_bytes(self._read(info.path))
        for segment, parts in deltas.items():
            with open(folder / segment, "wb") as sink:
                for offset, path in sorted(parts):
                    if offset != sink.tell():
                        break  # a gap: a push that never finished; what follows is unusable
                    sink.write(self._read(path))
            self._pushed[segment] = (folder / segment).stat().st_size
        manifest = folder / layout.MANIFEST
        if manifest.exists():
            stat = manifest.stat()
            self._manifest_seen = (stat.st_size, stat.st_mtime_ns)

    def push(self) -> None:
        """Upload what the local checkpoint gained since the last push (safe in a thread)."""
        folder = self.local_checkpoint
        for segment in layout.segments(folder):
            size = segment.stat().st_size
            done = self._pushed.get(segment.name, 0)
            if size <= done:
                continue
            with open(segment, "rb") as source:
                source.seek(done)
                data = source.read(size - done)
            self._write(f"{self._remote_checkpoint}/{segment.name}@{done:016d}", data)
            self._pushed[segment.name] = done + len(data)
        manifest = folder / layout.MANIFEST
        if manifest.exists():
            stat = manifest.stat()
            seen = (stat.st_size, stat.st_mtime_ns)
            if seen != self._manifest_seen:
                self._write(f"{self._remote_checkpoint}/{layout.MANIFEST}", manifest.read_bytes())
                self._manifest_seen = seen

    def push_output(self) -> None:
        """Upload the finished output as one object."""
        with open(self.local, "rb") as source, self._fs.open_output_stream(self._path) as sink:
            shutil.copyfileobj(source, sink, _CHUNK)

    def _read(self, path: str) -> bytes:
        with self._fs.open_input_stream(path) as source:
            return source.read()

    def _write(self, path: str, data: bytes) -> None:
        with self._fs.open_output_stream(path) as sink:
            sink.write(data)


@contextlib.asynccontextmanager
async def _pushing(staged: StagedOutput) -> AsyncIterator[None]:
    """Push the checkpoint every PUSH_SECONDS while the body runs, and once more at the end."""

    async def loop() -> None:
        warned = False
        while True:
            await asyncio.sleep(PUSH_SECONDS)
            try:
                await asyncio.to_thread(staged.push)
            except OSError as exc:  # the store is away for a moment: the next push catches up
                if not warned:
                    log.warning("%s: the checkpoint could not be pushed (%s); retrying",
                                _shown(staged.uri), exc)
                    warned = True

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await asyncio.to_thread(staged.push)
        except OSError as exc:
            raise StorageError(
                f"{_shown(staged.uri)}.checkpoint: the checkpoint could not be pushed ({exc}); "
                f"it is kept in {staged.local_checkpoint}: run the same command again",
                path=_shown(staged.uri), cause=str(exc),
            ) from None


async def staged_run(config: Any, run: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `run(config)` on local copies of a URI input and output, kept in step with the store.

    Returns what `run` returns, its `output` the URI again where it was one.
    """
    changes: dict[str, Any] = {}
    if is_uri(config.input):
        changes["input"] = await asyncio.to_thread(stage_input, str(config.input))
    if not is_uri(config.output):
        return await run(config.replace(**changes))
    staged = StagedOutput(str(config.output))
    await asyncio.to_thread(staged.pull)
    staged.local.parent.mkdir(parents=True, exist_ok=True)
    async with _pushing(staged):
        report = await run(config.replace(output=staged.local, **changes))
    if staged.local.exists():
        try:
            await asyncio.to_thread(staged.push_output)
        except OSError as exc:
            raise StorageError(
                f"{_shown(staged.uri)}: the output could not be uploaded ({exc}); the checkpoint "
                "is complete: run the same command again to write it without sending anything",
                path=_shown(staged.uri), cause=str(exc),
            ) from None
    return dataclasses.replace(report, output=staged.uri)  # the RunReport names the URI


def local_view(output: str | Path) -> Path:
    """A local path whose checkpoint is the store's, for `status` on an object-store output."""
    if not is_uri(output):
        return Path(output)
    staged = StagedOutput(str(output))
    staged.pull()
    return staged.local
