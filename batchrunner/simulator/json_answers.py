"""JSON answers for `response_format` requests, and the invalid ones `--invalid-json-rate` makes.

`json_value(schema, seed, words)` builds a value valid against a JSON Schema: objects (every
required property, and the optional ones half of the time), arrays within minItems/maxItems
(uniqueItems respected), enums and consts, integers and numbers within their bounds and
multipleOf, booleans, strings within minLength/maxLength (and the usual formats: date,
date-time, time, email, uri, uuid), `anyOf`/`oneOf`/`allOf` and local `$ref`s (`$defs`,
`definitions`). It is a pure function of its arguments: the same request gets the same answer.
`pattern` is not honoured (a string is then what the words make of it).

`spoil(text, schema, u)` turns a valid answer into an invalid one: text that is not JSON, or
the object without one of its required properties.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

__all__ = ["json_value", "render", "spoil"]

_WORDS = (
    "alpha", "beacon", "cedar", "delta", "ember", "fjord", "granite", "harbor", "iris",
    "juniper", "kestrel", "lumen", "meadow", "nimbus", "orchard", "prairie", "quartz", "river",
    "summit", "tundra", "umber", "valley", "willow", "yonder", "zephyr",
)  # fmt: skip
_MAX_DEPTH = 6  # below this depth only what is required is generated (recursive schemas end)
_NOT_JSON = (
    "Sure! Here is the JSON you asked for:\n",
    "I'm sorry, but I can't produce that in JSON.",
)


def json_value(schema: Any, seed: bytes, words: tuple[str, ...] = ()) -> Any:
    """A value valid against `schema`, derived from `seed` (and weaving in `words`)."""
    rng = random.Random(hashlib.sha256(seed).digest())
    return _Generator(schema, rng, words or _WORDS).value(schema, 0)


def render(value: Any) -> str:
    """A JSON answer as a model writes one: compact, keys in schema order."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def spoil(text: str, schema: Any, u: float) -> str:
    """An invalid variant of a valid answer: `u` < 0.5 gives text that is not JSON, else the
    object without a required property (or, where nothing is required, not JSON either)."""
    required = schema.get("required") if isinstance(schema, dict) else None
    if u >= 0.5 and required:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            missing = required[int((u - 0.5) * 2 * len(required)) % len(required)]
            value.pop(missing, None)
            return render(value)
    if u < 0.25:
        return _NOT_JSON[0] + text  # prose before the JSON
    return text[: max(1, len(text) // 2)]  # cut in the middle


class _Generator:
    def __init__(self, root: Any, rng: random.Random, words: tuple[str, ...]) -> None:
        self.root = root
        self.rng = rng
        self.words = words

    def resolve(self, node: Any) -> Any:
        seen = 0
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 32:
            ref = node["$ref"]
            if not ref.startswith("#"):
                return {}
            target: Any = self.root
            for part in ref[1:].strip("/").split("/") if ref.strip("#/") else ():
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part, {}) if isinstance(target, dict) else {}
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node = {**target, **rest} if rest and isinstance(target, dict) else target
            seen += 1
        return node

    def value(self, node: Any, depth: int) -> Any:
        node = self.resolve(node)
        if node is True or not isinstance(node, dict):
            return self.string({}, depth)
        if "const" in node:
            return node["const"]
        if "enum" in node and node["enum"]:
            return self.rng.choice(node["enum"])
        for union in ("anyOf", "oneOf"):
            branches = node.get(union)
            if branches:
                concrete = [b for b in branches if self.resolve(b).get("type") != "null"]
                return self.value(self.rng.choice(concrete or branches), depth + 1)
        if node.get("allOf"):
            merged: dict[str, Any] = {k: v for k, v in node.items() if k != "allOf"}
            for part in node["allOf"]:
                part = self.resolve(part)
                if isinstance(part, dict):
                    for key, item in part.items():
                        if key == "properties":
                            merged["properties"] = {**merged.get("properties", {}), **item}
                        elif key == "required":
                            merged["required"] = [*merged.get("required", []), *item]
                        else:
                            merged.setdefault(key, item)
            return self.value(merged, depth + 1)
        kind = node.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or kind
            kind = kinds[0] if len(kinds) == 1 else self.rng.choice(kinds)
        if kind is None:
            kind = "object" if "properties" in node else "array" if "items" in node else "string"
        make = {
            "object": self.object,
            "array": self.array,
            "string": self.string,
            "integer": self.integer,
            "number": self.number,
            "boolean": lambda n, d: self.rng.random() < 0.5,
            "null": lambda n, d: None,
        }.get(kind, self.string)
        return make(node, depth)

    def object(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = node.get("properties") or {}
        required = set(node.get("required") or ())
        out: dict[str, Any] = {}
        for name, sub in properties.items():
            if name in required or (depth < _MAX_DEPTH and self.rng.random() < 0.5):
                out[name] = self.value(sub, depth + 1)
        for name in required - out.keys():  # required but not described
            out[name] = self.string({}, depth)
        return out

    def array(self, node: dict[str, Any], depth: int) -> list[Any]:
        low = int(node.get("minItems", 0))
        high = int(node.get("maxItems", max(low, 3) + 1))
        if depth >= _MAX_DEPTH:
            high = low
        count = self.rng.randint(max(low, min(1, high)), max(low, min(high, low + 4)))
        items = node.get("items", {})
        out: list[Any] = []
        for _ in range(count * 8 if node.get("uniqueItems") else count):
            if len(out) == count:
                break
            item = self.value(items, depth + 1)
            if node.get("uniqueItems") and item in out:
                continue
            out.append(item)
        while len(out) < low:  # unique items ran short: numbered strings are always new
            out.append(f"{self.rng.choice(self.words)}-{len(out)}")
        return out

    def string(self, node: dict[str, Any], depth: int) -> str:
        fmt = node.get("format")
        rng = self.rng
        if fmt == "date":
            text = f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        elif fmt == "date-time":
            text = (
                f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                f"T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"
            )
        elif fmt == "time":
            text = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
        elif fmt == "email":
            text = f"{rng.choice(self.words)}@example.com"
        elif fmt in ("uri", "url"):
            text = f"https://example.com/{rng.choice(self.words)}"
        elif fmt == "uuid":
            text = "-".join(
                "".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4, 4, 12)
            )
        else:
            count = rng.randint(1, 3)
            text = " ".join(rng.choice(self.words).capitalize() for _ in range(count))
        low = int(node.get("minLength", 0))
        high = node.get("maxLength")
        while len(text) < low:
            text += " " + rng.choice(self.words)
        if high is not None:
            text = text[: int(high)]
        return text

    def integer(self, node: dict[str, Any], depth: int) -> int:
        low, high = _bounds(node, integer=True)
        step = node.get("multipleOf")
        if isinstance(step, int) and step > 0:
            first, last = math.ceil(low / step), math.floor(high / step)
            return step * self.rng.randint(first, max(first, last))
        return self.rng.randint(int(low), int(max(low, high)))

    def number(self, node: dict[str, Any], depth: int) -> float | int:
        low, high = _bounds(node, integer=False)
        step = node.get("multipleOf")
        if isinstance(step, (int, float)) and step > 0:
            first, last = math.ceil(low / step), math.floor(high / step)
            value = step * self.rng.randint(first, max(first, last))
            return int(value) if isinstance(step, int) else value
        value = round(low + (high - low) * self.rng.random(), 2)
        if not low <= value <= high:
            value = low
        exclusive_low, exclusive_high = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
        if isinstance(exclusive_low, (int, float)) and value <= exclusive_low:
            value = (low + high) / 2
        if isinstance(exclusive_high, (int, float)) and value >= exclusive_high:
            value = (low + high) / 2
        return value


def _bounds(node: dict[str, Any], *, integer: bool) -> tuple[float, float]:
    """The closed range a number may take (exclusive bounds stepped inwards)."""
    nudge = 1 if integer else 1e-6
    low = node.get("minimum")
    high = node.get("maximum")
    if isinstance(node.get("exclusiveMinimum"), (int, float)):
        bound = node["exclusiveMinimum"] + nudge
        low = bound if low is None else max(low, bound)
    if isinstance(node.get("exclusiveMaximum"), (int, float)):
        bound = node["exclusiveMaximum"] - nudge
        high = bound if high is None else min(high, bound)
    if low is None and high is None:
        low, high = 0, 100
    elif low is None:
        low = high - 100
    elif high is None:
        high = low + 100
    if integer:
        low, high = math.ceil(low), math.floor(high)
    return low, max(low, high)
