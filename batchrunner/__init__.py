"""batchrunner: batch jobs for OpenAI-compatible chat-completions gateways.

>>> import batchrunner
>>> report = batchrunner.run(batchrunner.RunConfig(
...     input=Path("sample_data/prompts.jsonl"), output=Path("out/r.parquet"),
...     model="gpt-4o-mini", local=True))
"""

from __future__ import annotations

from batchrunner._version import __version__
from batchrunner.answers.flatten import flatten
from batchrunner.answers.scoring import parse_metric
from batchrunner.api import arun, read_results, run
from batchrunner.config.jobs import build_config, load_job
from batchrunner.config.pricing import PriceTable
from batchrunner.config.settings import RunConfig
from batchrunner.engine.runner import check_job, list_models
from batchrunner.engine.state import RunControl, RunReport
from batchrunner.errors import (
    AuthRefused,
    BatchrunnerError,
    CheckpointMismatch,
    InputError,
    OutputLocked,
    StorageError,
    UsageError,
)
from batchrunner.reports import estimate, summarize
from batchrunner.reports.compare import compare
from batchrunner.results import Result, Row, Usage
from batchrunner.store.checkpoint import CheckpointStatus, read_status
from batchrunner.store.export import export_results
from batchrunner.store.scored import score_results

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
    "flatten",
    "list_models",
    "load_job",
    "parse_metric",
    "read_results",
    "read_status",
    "run",
    "score_results",
    "summarize",
]
