"""Checking a chat-completions request body as the real API does: `parse_request`.

A body the real API would refuse raises `ApiError`, carrying the HTTP status (400, or 404 for an
unknown model) and the OpenAI error body the server sends; a good body becomes a `ChatRequest`,
the checked values the simulator answers from (see `batchrunner.simulator.completions`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from batchrunner.simulator.config import MODELS

__all__ = ["ApiError", "ChatRequest", "parse_request"]

ROLES = ("system", "user", "assistant", "developer", "tool", "function")
MAX_N = 128
MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """A request the simulator refuses, with the HTTP status and OpenAI error body to send.

    Server side only: this is the simulator's answer, not part of batchrunner's error tree.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ChatRequest:
    """A checked request body: what the simulator needs to answer it."""

    model: str
    messages: tuple[dict[str, Any], ...]
    n: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None  # a checked json_object or json_schema one
    tools: tuple[dict[str, Any], ...] = ()  # the checked `function` of each tool
    tool_choice: str | None = None  # "required", or the name of the function to call
    logprobs: bool = False
    top_logprobs: int = 0




def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "decimal"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _missing(param: str) -> ApiError:
    return ApiError(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def _wrong_type(param: str, expected: str, value: Any) -> ApiError:
    return ApiError(
        400,
        f"Invalid type for '{param}': expected {expected}, "
        f"but got {_a(_json_type(value))} instead.",
        param=param,
        code="invalid_type",
    )


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a decimal", value)
    _check_range(name, "decimal", value, low, high)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    _check_range(name, "integer", value, low, high)
    return value


def _check_range(name: str, kind: str, value: float, low: float, high: float | None) -> None:
    """The API's 400 for a number out of its range, worded as the API words it."""
    if value < low:
        side, code, sign, bound = "below minimum", "below_min", ">=", low
    elif high is not None and value > high:
        side, code, sign, bound = "above maximum", "above_max", "<=", high
    else:
        return
    shown = f"{bound:g}" if kind == "decimal" else str(bound)
    raise ApiError(
        400,
        f"Invalid '{name}': {kind} {side} value. "
        f"Expected a value {sign} {shown}, but got {value} instead.",
        param=name,
        code=f"{kind}_{code}_value",
    )


def _check_message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _wrong_type(where, "an object", message)
    role = message.get("role")
    if role is None:
        raise _missing(f"{where}.role")
    if role not in ROLES:
        supported = ", ".join(f"'{r}'" for r in ROLES[:-1]) + f", and '{ROLES[-1]}'"
        raise ApiError(
            400,
            f"Invalid value: '{role}'. Supported values are: {supported}.",
            param=f"{where}.role",
            code="invalid_value",
        )
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise _missing(f"{where}.content")
    elif isinstance(content, list):
        if not content:
            raise ApiError(
                400,
                f"Invalid '{where}.content': empty array. Expected an array with minimum "
                "length 1, but got an empty array instead.",
                param=f"{where}.content",
                code="empty_array",
            )
        for number, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _wrong_type(f"{where}.content[{number}]", "an object with a type", part)
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise _missing(f"{where}.content[{number}].text")
    elif not isinstance(content, str):
        raise _wrong_type(f"{where}.content", "one of a string or array of objects", content)
    return message


def parse_request(body: Any) -> ChatRequest:
    """Check a chat-completions body like the real API; raise ApiError where it would refuse."""
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request: expected a JSON object.",
        )
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of objects", messages)
    if not messages:
        raise ApiError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    checked = tuple(_check_message(message, i) for i, message in enumerate(messages))
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    n = _integer(body, "n", 1, MAX_N) or 1
    max_tokens = _integer(body, "max_tokens", 1)
    max_completion_tokens = _integer(body, "max_completion_tokens", 1)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_SEQUENCES:
            raise ApiError(
                400,
                f"Invalid 'stop': array too long. Expected an array with maximum length "
                f"{MAX_STOP_SEQUENCES}, but got an array with length {len(stop)} instead.",
                param="stop",
                code="array_above_max_length",
            )
        stops = tuple(stop)
    else:
        raise _wrong_type("stop", "one of a string or array of strings", stop)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )
        if not isinstance(options, dict):
            raise _wrong_type("stream_options", "an object", options)
        include_usage = options.get("include_usage") is True
    response_format = _response_format(body.get("response_format"))
    tools, tool_choice = _tools(body.get("tools"), body.get("tool_choice"))
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _wrong_type("logprobs", "a boolean", logprobs)
    top_logprobs = _integer(body, "top_logprobs", 0, 20)
    if top_logprobs is not None and not logprobs:
        raise ApiError(
            400,
            "Invalid value for 'top_logprobs': 'logprobs' must be set to true.",
            param="top_logprobs",
            code="invalid_value",
        )
    if model not in MODELS:
        raise ApiError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    return ChatRequest(
        model=model,
        messages=checked,
        n=n,
        max_tokens=max_tokens,
        stop=tuple(s for s in stops if s),
        stream=bool(stream),
        include_usage=include_usage,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        logprobs=bool(logprobs),
        top_logprobs=top_logprobs or 0,
    )


def _tools(value: Any, choice: Any) -> tuple[tuple[dict[str, Any], ...], str | None]:
    """Checked `tools` (their functions) and what `tool_choice` asks for: "required", a
    function's name, or None (the model answers in text: "auto", "none" or no choice)."""
    functions: list[dict[str, Any]] = []
    if value is not None:
        if not isinstance(value, list):
            raise _wrong_type("tools", "an array of objects", value)
        for index, tool in enumerate(value):
            where = f"tools[{index}]"
            if not isinstance(tool, dict):
                raise _wrong_type(where, "an object", tool)
            if tool.get("type") != "function":
                raise ApiError(400, f"Invalid value: '{tool.get('type')}'. Supported values "
                               "are: 'function'.", param=f"{where}.type", code="invalid_value")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise _missing(f"{where}.function")
            name = function.get("name")
            if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
                raise _missing(f"{where}.function.name")
            parameters = function.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(parameters, dict):
                raise _wrong_type(f"{where}.function.parameters", "an object", parameters)
            functions.append({"name": name, "parameters": parameters})
    if choice is None or choice in ("auto", "none"):
        return tuple(functions), None
    if choice == "required" or isinstance(choice, dict):
        if not functions:
            raise ApiError(400, "Invalid value for 'tool_choice': 'tool_choice' is only "
                           "allowed when 'tools' are specified.", param="tool_choice",
                           code="invalid_value")
        if choice == "required":
            return tuple(functions), "required"
        named = choice.get("function") if choice.get("type") == "function" else None
        name = named.get("name") if isinstance(named, dict) else None
        if not any(f["name"] == name for f in functions):
            raise ApiError(400, f"Invalid value for 'tool_choice': function '{name}' is not "
                           "one of the tools.", param="tool_choice", code="invalid_value")
        return tuple(functions), name
    raise _wrong_type("tool_choice", "one of a string or object", choice)


_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _response_format(value: Any) -> dict[str, Any] | None:
    """A checked `response_format`: None for text, else the json_object or json_schema one."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _wrong_type("response_format", "an object", value)
    kind = value.get("type")
    if kind is None:
        raise _missing("response_format.type")
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError(
            400,
            f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', "
            "and 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    spec = value.get("json_schema")
    if spec is None:
        raise _missing("response_format.json_schema")
    if not isinstance(spec, dict):
        raise _wrong_type("response_format.json_schema", "an object", spec)
    name = spec.get("name")
    if name is None:
        raise _missing("response_format.json_schema.name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ApiError(
            400,
            "Invalid 'response_format.json_schema.name': string does not match pattern. "
            "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
            param="response_format.json_schema.name",
            code="invalid_value",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _wrong_type("response_format.json_schema.schema", "an object", schema)
    return {"type": "json_schema", "name": name, "schema": schema}
