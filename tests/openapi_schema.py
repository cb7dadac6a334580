"""Validate JSON against the official OpenAI schema in `tests/data/openai-chat-schema.json`.

The file is a subset of OpenAI's OpenAPI document: schemas under `components.schemas`, refs as
`#/components/schemas/NAME`, and OpenAPI's `nullable: true`, which JSON Schema does not know.
Here every schema marked `nullable: true` becomes `anyOf: [itself, {"type": "null"}]`, and refs
resolve inside the document.

The file is part of the repository (tests/data/README.md says where it comes from and its
licence), so a clean clone validates with nothing beside it. If it is missing, `validate`
raises: a test that relies on it fails, never skips.

    validate(body, "CreateChatCompletionResponse")
    validate_stream(sse_text)  # every chunk of a stream, and the closing [DONE]
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

__all__ = ["SCHEMA_NAMES", "schema_path", "validate", "validate_stream"]

SCHEMA_FILE = "openai-chat-schema.json"
SCHEMA_NAMES = (
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CompletionUsage",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)  # the names most tests need; any name under components.schemas works


SCHEMA_DIR = Path(__file__).resolve().parent / "data"


def schema_path() -> Path:
    """Where the schema file is: `tests/data/`, inside the repository."""
    return SCHEMA_DIR / SCHEMA_FILE


def _without_nullable(node: Any) -> Any:
    """Rewrite OpenAPI's `nullable: true` as JSON Schema, everywhere in `node`."""
    if isinstance(node, list):
        return [_without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _without_nullable(value) for key, value in node.items()}
    if converted.pop("nullable", None) is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@functools.cache
def _document() -> dict[str, Any]:
    path = schema_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the OpenAI schema is not at {path}: it belongs to the repository "
            f"(tests/data/README.md)"
        )
    document = json.loads(path.read_text(encoding="utf-8"))
    return {"components": {"schemas": _without_nullable(document["components"]["schemas"])}}


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    document = _document()
    if name not in document["components"]["schemas"]:
        raise KeyError(f"no schema named {name!r} in {schema_path()}")
    schema = {"$ref": f"#/components/schemas/{name}", **document}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate(instance: Any, schema_name: str) -> None:
    """Raise `jsonschema.ValidationError` unless `instance` fits the named OpenAI schema."""
    error = jsonschema.exceptions.best_match(_validator(schema_name).iter_errors(instance))
    if error is not None:
        raise error


def validate_stream(text: str) -> list[dict[str, Any]]:
    """Validate every `data:` chunk of an SSE chat stream; return the chunks, in order.

    Raises AssertionError unless the stream ends with `data: [DONE]`, and
    `jsonschema.ValidationError` for a chunk that is not a `CreateChatCompletionStreamResponse`.
    """
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    assert data and data[-1] == "[DONE]", f"the stream does not end with [DONE]: {data[-1:]}"
    chunks = [json.loads(item) for item in data[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks
