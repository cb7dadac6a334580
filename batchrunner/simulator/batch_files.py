"""The simulator's Batch API files: uploads kept on disk, their lines checked as they arrive.

An upload (`POST /v1/files`, `purpose=batch`) is written to a temporary folder a chunk at a
time and each line checked on the way (a JSON object, a `custom_id` not seen before in the
file, `method` `POST`, `url` `/v1/chat/completions`, a `body` object). Problems do not refuse
the upload, as OpenAI's do not: they are kept on the file, and a batch made from it fails in
`validating` with them as its `errors`. Nothing is held per line but an 8-byte digest of each
`custom_id`, so a file of a million lines costs tens of MB, not the lines as dicts.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, MultipartReader

from batchrunner.simulator.chat_request import ApiError

__all__ = ["CHAT_URL", "FileRecord", "FileStore", "LineChecker"]

CHAT_URL = "/v1/chat/completions"
MAX_PROBLEMS = 100  # problems kept on a file (a file of bad lines would otherwise keep them all)
CHUNK_BYTES = 1 << 16


@dataclass
class FileRecord:
    """A stored file: its OpenAI file object's fields, where it is, and what its lines hold."""

    id: str
    filename: str
    purpose: str
    created_at: int
    path: Path
    bytes: int = 0
    lines: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None  # the first line's model

    def to_json(self) -> dict[str, Any]:
        """The OpenAI file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class LineChecker:
    """Checks a batch input file's lines one at a time, keeping what is wrong with them."""

    def __init__(self, record: FileRecord) -> None:
        self._record = record
        self._seen: set[int] = set()

    def check(self, raw: bytes) -> None:
        """Check one line (blank lines are skipped, as everywhere in the simulator)."""
        if not raw.strip():
            return
        record = self._record
        record.lines += 1
        problem = self._problem(raw)
        if problem is not None and len(record.problems) < MAX_PROBLEMS:
            code, message, param = problem
            record.problems.append(
                {"code": code, "message": message, "param": param, "line": record.lines}
            )

    def finish(self) -> None:
        """After the last line: an empty file is a problem too."""
        if self._record.lines == 0:
            self._record.problems.append(
                {"code": "empty_file", "message": "The batch input file is empty.",
                 "param": None, "line": None}
            )

    def _problem(self, raw: bytes) -> tuple[str, str, str | None] | None:
        try:
            line = json.loads(raw)
        except ValueError:
            return "invalid_json_line", "This line is not parseable as valid JSON.", None
        if not isinstance(line, dict):
            return "invalid_json_line", "This line is not a JSON object.", None
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return "missing_required_parameter", "custom_id must be a non-empty string.", \
                "custom_id"
        digest = int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest())
        if digest in self._seen:
            return "duplicate_custom_id", (
                f"The custom_id '{custom_id}' is used more than once in this file; each "
                "request needs a unique custom_id."), "custom_id"
        self._seen.add(digest)
        if line.get("method") != "POST":
            return "invalid_method", "method must be POST.", "method"
        if line.get("url") != CHAT_URL:
            return "invalid_url", (
                f"The url {line.get('url')!r} does not match the batch's endpoint {CHAT_URL}."
            ), "url"
        body = line.get("body")
        if not isinstance(body, dict):
            return "missing_required_parameter", "body must be a JSON object.", "body"
        if self._record.model is None and isinstance(body.get("model"), str):
            self._record.model = body["model"]
        return None


class FileStore:
    """The files the simulator holds, in a temporary folder made on first use."""

    def __init__(self) -> None:
        self.files: dict[str, FileRecord] = {}
        self._folder: Path | None = None

    def _path(self, file_id: str) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="batchrunner-gateway-"))
        return self._folder / f"{file_id}.jsonl"

    def new(self, filename: str, purpose: str, created_at: int) -> FileRecord:
        """A new, empty file record with its place on disk (not yet listed)."""
        file_id = f"file-{secrets.token_hex(12)}"
        return FileRecord(file_id, filename, purpose, created_at, self._path(file_id))

    def add(self, record: FileRecord) -> FileRecord:
        """List a file whose content is on disk."""
        record.bytes = record.path.stat().st_size if record.path.exists() else 0
        self.files[record.id] = record
        return record

    async def upload(self, reader: MultipartReader, created_at: int) -> FileRecord:
        """`POST /v1/files`: the multipart form's `purpose` and `file`, streamed to disk."""
        purpose: str | None = None
        record: FileRecord | None = None
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    record = self.new(part.filename or "upload.jsonl", "batch", created_at)
                    await _receive(part, record)
        except BaseException:
            if record is not None:
                record.path.unlink(missing_ok=True)
            raise
        if record is None:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        if purpose != "batch":
            record.path.unlink(missing_ok=True)
            raise ApiError(
                400,
                f"Invalid value for 'purpose': {purpose!r}; this gateway takes files for "
                "'batch' only.",
                param="purpose",
            )
        return self.add(record)

    def get(self, file_id: str) -> FileRecord:
        """The file of that id, or a 404 ApiError."""
        record = self.files.get(file_id)
        if record is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return record

    def delete(self, file_id: str) -> FileRecord:
        """Forget a file and remove it from disk (a batch reading it keeps its open handle)."""
        record = self.get(file_id)
        del self.files[file_id]
        record.path.unlink(missing_ok=True)
        return record

    def close(self) -> None:
        """Remove every file and the folder."""
        self.files.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


async def _receive(part: BodyPartReader, record: FileRecord) -> None:
    """Write the part to the record's path, checking each line as it arrives."""
    checker = LineChecker(record)
    rest = b""
    with record.path.open("wb") as out:
        while chunk := await part.read_chunk(CHUNK_BYTES):
            out.write(chunk)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                checker.check(line)
    checker.check(rest)
    checker.finish()
