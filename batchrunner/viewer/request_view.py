"""The request a row sent, rebuilt from its carried input columns and the run's settings.

The output keeps every input column, and the checkpoint manifest beside it keeps the request
settings (model, system, template, columns, body fields): with both, the request body is built
again by the same `RequestBuilder` the run used, so the page shows the messages exactly as
they were sent. Without the manifest (a file copied elsewhere) there is nothing to rebuild
from, and the page shows the input columns instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchrunner.config.settings import RunConfig
from batchrunner.errors import BatchrunnerError
from batchrunner.inputs.requests import RequestBuilder
from batchrunner.store.segments import RESULT_SCHEMA
from batchrunner.viewer.sources import RESULT_COLUMNS, Source

__all__ = ["RequestRenderer"]

_SETTINGS = ("system", "template", "prompt_column", "messages_column", "id_column")


class RequestRenderer:
    """Rebuilds the request body of a source's rows (see the module docstring)."""

    def __init__(
        self,
        builder: RequestBuilder,
        names: dict[str, str],
        response_format: dict[str, Any] | None = None,
    ) -> None:
        self._builder = builder
        self._response_format = response_format
        self._names = names  # output column -> the input column it carries
        by_input = {v: k for k, v in names.items()}
        self.needed: list[str] = [by_input[c] for c in builder.columns if c in by_input]
        """Output columns the rebuild reads."""

    @classmethod
    def for_source(cls, source: Source) -> RequestRenderer | None:
        """A renderer for a finished output whose manifest is beside it, else None."""
        if source.live:
            return None  # a checkpoint holds results only, not the input columns
        manifest = source.manifest() or {}
        settings = (manifest.get("fingerprint") or {}).get("settings")
        if not isinstance(settings, dict):
            return None
        names = _input_names(source.columns)
        try:
            params = settings.get("params") or {}
            config = RunConfig(
                input=Path("input.parquet"),
                output=source.path,
                model=settings.get("model") or "(model)",
                params=dict(params) if isinstance(params, dict) else {},
                stream=bool(settings.get("stream")),
                **{k: settings.get(k) for k in _SETTINGS},
            )
            builder = RequestBuilder(config, list(names.values()))
        except (BatchrunnerError, TypeError, ValueError):
            return None
        return cls(builder, names, _response_format(settings.get("json_schema")))

    def request(self, record: dict[str, Any]) -> dict[str, Any]:
        """The body sent for this output row (or {"error": ...} when it could not be built)."""
        inputs = {self._names[k]: v for k, v in record.items() if k in self._names}
        row = self._builder.build(0, inputs, None)
        if row.body is None:
            return {"error": row.error}
        body = dict(row.body)
        if self._response_format is not None and "response_format" not in body:
            body["response_format"] = self._response_format  # --json-schema (docs/structured.md)
        if record.get("model"):
            body["model"] = record["model"]  # the output's model: the one this row asked for
        return body

    def prompt_text(self, record: dict[str, Any]) -> str | None:
        """The last user message of the request: what a table cell shows as the prompt."""
        body = self.request(record)
        for message in reversed(body.get("messages") or []):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
        return None


def _response_format(schema: Any) -> dict[str, Any] | None:
    """The `response_format` a --json-schema run sent, from what its manifest records."""
    if not isinstance(schema, dict) or "schema" not in schema:
        return None
    return {
        "type": "json_schema",
        "json_schema": {"name": schema.get("name", "response"), "schema": schema["schema"],
                        "strict": True},
    }


def _input_names(columns: list[str]) -> dict[str, str]:
    """Output column -> input column: carried as is, or as `input_X` where X is a result name."""
    result_names = set(RESULT_SCHEMA.names)
    names: dict[str, str] = {}
    for column in columns:
        if column.startswith("input_") and column[len("input_"):] in result_names:
            names[column] = column[len("input_"):]
        elif column not in RESULT_COLUMNS:
            names[column] = column
    if "id" in columns and "id" not in names.values():
        names["id"] = "id"  # the input's id column is the output's id (never carried twice)
    return names
