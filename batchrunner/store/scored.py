"""Result files scored as a whole: read in batches, scored, written back (`batchrunner score`).

Metrics themselves (what an answer scores against its reference) are in answers/scoring.py;
this module adds the file around them: any output format, streamed, replaced atomically.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrunner.answers.scoring import (
    SCORE_BATCH_ROWS,
    Metric,
    _Warnings,
    check_reference_column,
    parse_metric,
    score_table,
    with_scores,
)
from batchrunner.errors import UsageError
from batchrunner.store.durability import replaced_atomically
from batchrunner.store.export import open_table_writer, output_format

__all__ = ["read_result_batches", "score_results"]


def read_result_batches(path: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """A results file's schema and its record batches, streamed (.parquet, .jsonl or .csv)."""
    fmt = output_format(path, what="results")
    try:
        if fmt == "parquet":
            source = pq.ParquetFile(path)
            return source.schema_arrow, source.iter_batches(batch_size=SCORE_BATCH_ROWS)
        if fmt == "jsonl":
            import pyarrow.json as pa_json

            reader = pa_json.open_json(path)
        else:
            import pyarrow.csv as pa_csv

            # Answers and references stay text, whatever they look like ("42", "true").
            strings = {name: pa.string() for name in ("id", "content", "status", "reference")}
            reader = pa_csv.open_csv(path, convert_options=pa_csv.ConvertOptions(
                column_types=strings, strings_can_be_null=True))
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: not a readable results file ({exc})") from None
    return reader.schema, iter(reader)


def score_results(
    path: Path,
    metric: Metric | str,
    reference_column: str,
    *,
    output: Path | None = None,
) -> dict[str, Any]:
    """Score (or re-score) a finished results file; write it to `output` (default: in place).

    Reads and writes .parquet, .jsonl or .csv (each by its extension), streaming record
    batches: memory stays flat however many rows there are. The file is replaced atomically.
    Returns counts: rows, scored (non-null), mean score (or None), failed (user function).
    """
    metric = parse_metric(metric) if isinstance(metric, str) else metric
    path = Path(path)
    target = Path(output) if output is not None else path
    fmt = output_format(target, what="the scored output (-o)")
    schema, batches = read_result_batches(path)
    names = schema.names
    if "content" not in names:
        raise UsageError(f"{path}: no column 'content' (is it a batchrunner result file?)")
    reference_column = check_reference_column(names, reference_column, str(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    warnings = _Warnings()
    rows = scored = 0
    total = 0.0
    writer: Any = None
    if "score" not in names:
        schema = schema.append(pa.field("score", pa.float64()))
    else:
        schema = schema.set(names.index("score"), pa.field("score", pa.float64()))
    with replaced_atomically(target) as tmp:
        try:
            writer = open_table_writer(tmp, schema, fmt)
            try:
                for batch in batches:
                    table = pa.Table.from_batches([batch])
                    scores = score_table(batch, metric, reference_column, warnings)
                    rows += len(scores)
                    valid = pc.drop_null(scores)
                    scored += len(valid)
                    total += pc.sum(valid).as_py() or 0.0
                    writer.write_table(with_scores(table, scores).cast(schema), row_group_size=65536)
            except pa.ArrowException as exc:
                raise UsageError(f"{path}: cannot be read ({exc})") from None
            writer.close()
            writer = None
        finally:
            if writer is not None:
                writer.close()
    warnings.warn(metric)
    return {
        "output": str(target),
        "metric": metric.spec,
        "rows": rows,
        "scored": scored,
        "mean": total / scored if scored else None,
        "failed": warnings.failed,
    }
