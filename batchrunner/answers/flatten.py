"""Parsed answers as columns: `flatten` turns the JSON text of `parsed` into typed values.

With the run's schema (docs/structured.md), objects become structs and arrays lists, typed by
the schema; deeper or recursive parts stay JSON text. Used by `export --flatten` and
`read_results(..., flatten=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrunner.answers.structured import METADATA_KEY, Schema, canonical, load_schema
from batchrunner.errors import UsageError

__all__ = ["flatten"]


_MAX_DEPTH = 8  # deeper (or recursive) parts of a schema stay JSON text


def flatten(data: Any, schema: Schema | Mapping[str, Any] | Path | str | None = None) -> Any:
    """`parsed` as typed columns, one per top-level property of the schema, in its place.

    `data` is a pyarrow Table or a pandas DataFrame (the same kind is returned). Types follow
    the schema: string, integer (int64), number (float64), boolean, arrays as lists, objects
    with properties as structs; anything else (no type, a union) is JSON text. A property
    whose name is already a column is called `parsed_<name>`. `schema` may be omitted for a
    table read from a structured run's Parquet output, which records its schema.

    >>> flatten(pq.read_table("out/entities.parquet")).column_names[-2:]
    ['entities', 'language']
    """
    is_pandas = not isinstance(data, pa.Table)
    table = pa.Table.from_pandas(data, preserve_index=False) if is_pandas else data
    document = _schema_document(schema, table)
    properties = document.get("properties")
    if document.get("type", "object") != "object" or not isinstance(properties, dict):
        raise UsageError("--flatten: the schema has no top-level properties to make columns of")
    if "parsed" not in table.column_names:
        raise UsageError("--flatten: the results have no `parsed` column (no --json-schema run)")
    values = [None if text is None else json.loads(text) for text in table["parsed"].to_pylist()]
    taken = set(table.column_names) - {"parsed"}
    columns: list[tuple[str, pa.Array]] = []
    for name, node in properties.items():
        kind = _arrow_type(node, document, 0)
        cells = [
            None if not isinstance(v, dict) or name not in v else _cell(v[name], kind)
            for v in values
        ]
        column = f"parsed_{name}" if name in taken else name
        columns.append((column, pa.array(cells, type=kind or pa.string())))
    position = table.column_names.index("parsed")
    out = table.remove_column(position)
    for offset, (name, array) in enumerate(columns):
        out = out.add_column(position + offset, name, array)
    return out.to_pandas() if is_pandas else out


def _schema_document(schema: Any, table: pa.Table) -> dict[str, Any]:
    if isinstance(schema, Schema):
        return schema.document
    if isinstance(schema, Mapping):
        return load_schema(schema).document
    if isinstance(schema, (str, Path)):
        return load_schema(Path(schema)).document
    recorded = (table.schema.metadata or {}).get(METADATA_KEY)
    if recorded is None:
        raise UsageError("--flatten: no schema given and the results record none")
    return json.loads(recorded)


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    ref = node.get("$ref") if isinstance(node, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#"):
        return node
    target: Any = root
    for part in ref[1:].strip("/").split("/") if ref != "#" else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            return {}
        target = target[part]
    return target


def _arrow_type(node: Any, root: dict[str, Any], depth: int) -> pa.DataType | None:
    """The Arrow type of values matching `node`; None means JSON text."""
    if depth > _MAX_DEPTH:
        return None
    node = _resolve(node, root)
    if not isinstance(node, dict):
        return None
    for union in ("anyOf", "oneOf"):
        if union in node:
            branches = [b for b in node[union] if _resolve(b, root).get("type") != "null"]
            return _arrow_type(branches[0], root, depth + 1) if len(branches) == 1 else None
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None:
        options = node.get("enum", [node["const"]] if "const" in node else None)
        if options and all(isinstance(o, str) for o in options):
            return pa.string()
        return None
    if kind == "array":
        items = _arrow_type(node.get("items", {}), root, depth + 1)
        return pa.list_(items or pa.string())
    if kind == "object":
        properties = node.get("properties")
        if not isinstance(properties, dict) or not properties:
            return None
        return pa.struct(
            [
                pa.field(key, _arrow_type(sub, root, depth + 1) or pa.string())
                for key, sub in properties.items()
            ]
        )
    return {
        "string": pa.string(),
        "integer": pa.int64(),
        "number": pa.float64(),
        "boolean": pa.bool_(),
    }.get(kind)


def _cell(value: Any, kind: pa.DataType | None) -> Any:
    """A JSON value shaped for `kind` (what does not fit becomes JSON text)."""
    if value is None:
        return None
    if kind is None or pa.types.is_string(kind):
        return value if isinstance(value, str) else canonical(value)
    if pa.types.is_list(kind):
        if not isinstance(value, list):
            return None
        return [_cell(v, kind.value_type) for v in value]
    if pa.types.is_struct(kind):
        if not isinstance(value, dict):
            return None
        return {f.name: _cell(value.get(f.name), f.type) for f in kind}
    if pa.types.is_boolean(kind):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if pa.types.is_integer(kind):
        return int(value) if float(value).is_integer() else None
    return float(value)


# -- summary ---------------------------------------------------------------------------------
