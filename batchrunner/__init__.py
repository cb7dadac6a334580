"""batchrunner: batch jobs for OpenAI-compatible chat-completions gateways.

>>> import batchrunner
>>> report = batchrunner.run(batchrunner.RunConfig(
...     input=Path("sample_data/prompts.jsonl"), output=Path("out/r.parquet"),
...     model="gpt-4o-mini", local=True))
"""

from __future__ import annotations

from ._version import __version__
from .checkpoint import CheckpointStatus, read_status
from .config import RunConfig
from .engine import RunControl, RunReport, check_job, list_models
from .errors import (
    AuthRefused,
    BatchrunnerError,
    CheckpointMismatch,
    InputError,
    OutputLocked,
    StorageError,
    UsageError,
)
from .export import export_results
from .jobs import build_config, load_job
from .pricing import PriceTable
from .reports import estimate, summarize
from .results import Result, Row, Usage
from .reports.compare import compare
from .frame import arun, read_results, run
from .scoring import parse_metric, score_results


__all__ = [
    "AuthRefused",
    "BatchrunnerError",
    "CheckpointMismatch",
    "CheckpointStatus",
    "InputError",
    "OutputLocked",
    "PriceTable",
    "Result",
    "Row",
    "RunConfig",
    "RunControl",
    "RunReport",
    "StorageError",
    "Usage",
    "UsageError",
    "arun",
    "build_config",
    "check_job",
    "compare",
    "estimate",
    "export_results",
    "list_models",
    "load_job",
    "parse_metric",
    "read_results",
    "read_status",
    "run",
    "score_results",
    "summarize",
]
