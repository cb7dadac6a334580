"""Calibration of an estimate: what finished results say about a job's tokens.

`calibrate(config, paths)` reads the ok rows of finished result files, rebuilds the messages
each sent (from its carried input columns, with the job's own request rules), and measures
tokens per character, completion length and the share of prompt tokens cached. `estimate`
narrows its ranges with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.config.settings import RunConfig
from batchrunner.errors import UsageError
from batchrunner.inputs.requests import CHARS_PER_TOKEN, MESSAGE_TOKENS, REPLY_TOKENS
from batchrunner.reports.result_files import expand_paths
from batchrunner.store.segments import RESULT_SCHEMA

__all__ = ["CALIBRATION_MAX_ROWS", "Calibration", "calibrate", "text_length"]

#: At most this many rows of the calibration files are read (the first ones).
CALIBRATION_MAX_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class Calibration:
    """What finished results say about a job's tokens, from their ok rows."""

    files: tuple[str, ...]
    rows: int
    chars: int
    tokens_per_char: float  # prompt tokens beyond the per-message framing, per character
    prompt_residual_std: float  # per row, tokens
    completion_mean: float  # per request (all n choices), tokens
    completion_std: float
    cached_fraction: float  # of prompt tokens


def text_length(content: Any) -> int:
    """Characters of a message's text (text parts of a list content; other parts are free)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def calibrate(config: RunConfig, paths: Sequence[str | Path]) -> Calibration:
    """Measure tokens per character, completion length and cache hits on finished results."""
    files = expand_paths(paths, what="--calibrate")
    chars: list[int] = []
    messages: list[int] = []
    prompt: list[int] = []
    completion: list[int] = []
    cached: list[int] = []
    for path in files:
        for record, usage in _calibration_rows(config, path, CALIBRATION_MAX_ROWS - len(chars)):
            c = m = 0
            for message in record:
                c += text_length(message.get("content"))
                m += 1
            chars.append(c)
            messages.append(m)
            prompt.append(usage[0])
            completion.append(usage[1])
            cached.append(usage[2] or 0)
        if len(chars) >= CALIBRATION_MAX_ROWS:
            break
    if not chars:
        raise UsageError(
            f"--calibrate: no ok row with token counts in {', '.join(map(str, files))}"
        )
    c, t = np.array(chars, float), np.array(prompt, float)
    overhead = MESSAGE_TOKENS * np.array(messages, float) + REPLY_TOKENS
    ratio = float((t - overhead).sum() / c.sum()) if c.sum() else 1 / CHARS_PER_TOKEN
    residual = t - (ratio * c + overhead)
    done = np.array(completion, float)
    k = len(chars)
    return Calibration(
        files=tuple(str(p) for p in files),
        rows=k,
        chars=int(c.sum()),
        tokens_per_char=ratio,
        prompt_residual_std=float(residual.std(ddof=1)) if k > 1 else float(abs(residual[0])),
        completion_mean=float(done.mean()),
        completion_std=float(done.std(ddof=1)) if k > 1 else float(done[0]),
        cached_fraction=float(np.sum(cached) / t.sum()) if t.sum() else 0.0,
    )


_RESULT_NAMES = frozenset(RESULT_SCHEMA.names)


def _calibration_rows(
    config: RunConfig, path: Path, limit: int
) -> Iterator[tuple[list[dict[str, Any]], tuple[int, int, int | None]]]:
    """The messages each ok row of a result file sent, rebuilt from its carried input columns.

    The job's own request rules are tried first (template, prompt column, system message);
    where the file lacks the columns they read, its `messages` or `prompt` column is used.
    """
    from batchrunner.inputs.requests import RequestBuilder

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"--calibrate: {path}: not a readable Parquet file ({exc})") from None
    usage = ("status", "prompt_tokens", "completion_tokens", "cached_tokens")
    for name in ("model", *usage):
        if name not in schema.names:
            raise UsageError(f"--calibrate: {path}: no column {name!r} (not a result file?)")
    # The input's columns as the run saw them: carried ones were renamed input_X on a clash.
    physical: dict[str, str] = {}
    for name in schema.names:
        if name.startswith("input_") and name[6:] in _RESULT_NAMES:
            physical[name[6:]] = name
        elif name not in _RESULT_NAMES:
            physical.setdefault(name, name)
    physical["model"] = "model"  # the model each row requested
    columns = tuple(physical)
    cal_config = config.replace(input=Path(path), limit=None)
    try:
        builder = RequestBuilder(cal_config, columns)
    except UsageError:
        generic = cal_config.replace(
            template=None, prompt_column=None, messages_column=None, id_column=None
        )
        try:
            builder = RequestBuilder(generic, columns)
        except UsageError:
            raise UsageError(
                f"--calibrate: {path} carries neither the input columns this job reads nor a "
                "'messages' or 'prompt' column: its prompts cannot be measured"
            ) from None
    read = [physical[c] for c in builder.columns if c in physical]
    wanted = list(dict.fromkeys([*read, *usage]))
    logical = {v: k for k, v in physical.items()}
    pf = pq.ParquetFile(path)
    done = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=8192):
        for raw in batch.to_pylist():
            if done >= limit:
                return
            if raw["status"] != "ok" or raw["prompt_tokens"] is None:
                continue
            if raw["completion_tokens"] is None:
                continue
            record = {logical[c]: raw[c] for c in read}
            body = builder.build(done, record, None).body
            if body is None:
                continue
            done += 1
            yield body["messages"], (
                raw["prompt_tokens"],
                raw["completion_tokens"],
                raw["cached_tokens"],
            )
