"""Turn an input row into a request body (docs/input.md).

The rules, in order, for a row:

1. a messages column (`--messages-column`, or a column called `messages` when neither
   `--template` nor `--prompt-column` is given) holding a list of messages, or a JSON string
   of one, is used as is (any message the OpenAI API accepts; only the shape is checked);
2. otherwise the user message is `--template` rendered with the row's columns, or else the
   prompt column (`--prompt-column`, default `prompt`);
3. `--system` adds a system message first, unless the messages already have a system (or
   developer) message;
4. a `model` column, where present and not null, overrides `--model` for that row;
5. an OpenAI Batch API line (`custom_id`, `method`, `url`, `body`) is taken as is: `body` is the
   request, the job's settings filling only what it lacks (a null counts as lacking).

A row that cannot become a request gets `Row.error` starting with `input:` and naming the
line (JSONL, 1-based) or the row (other formats, 0-based), and no body.

Bodies share their unchanging parts (the system message, nested parameter values) with each
other: treat them as read-only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from batchrunner.config.settings import RunConfig
from batchrunner.inputs.columns import id_text, resolve_columns
from batchrunner.inputs.formats import detect_format
from batchrunner.results import Row

__all__ = ["CHARS_PER_TOKEN", "MESSAGE_TOKENS", "REPLY_TOKENS", "ROLES", "RequestBuilder"]

#: The roles of the OpenAI chat API. Informative only: any string role is sent as it is.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# A row that brings its own instructions (`developer` is the newer models' `system`) does not
# get --system added in front of them.
_SYSTEM_ROLES = frozenset({"system", "developer"})

#: How many tokens a request's prompt is reckoned at before any answer says (the pacing of
#: --tpm and `batchrunner estimate` both use it): characters of the message contents / 4, plus
#: 4 tokens of framing per message and 3 per request that open the reply (OpenAI's published
#: counting recipe; English comes out near 4 characters a token).
CHARS_PER_TOKEN = 4.0
MESSAGE_TOKENS = 4
REPLY_TOKENS = 3
_STREAM_OPTIONS = {"include_usage": True}
_TEMPLATE_ERRORS = (KeyError, IndexError, AttributeError, TypeError, ValueError)


class _RowProblem(Exception):
    """Why one row cannot become a request; becomes `Row.error`."""


class RequestBuilder:
    """Builds the request body of every row of a run; the column rules are resolved once.

    >>> builder = RequestBuilder(config, info.columns)   # config.model == "gpt-4o"
    >>> builder.build(0, {"id": 7, "prompt": "Hi"}, None).body
    {'model': 'gpt-4o', 'messages': [{'role': 'user', 'content': 'Hi'}]}
    """

    def __init__(self, config: RunConfig, columns: Sequence[str]) -> None:
        plan = resolve_columns(config, tuple(columns))
        self.columns: tuple[str, ...] = plan.needed
        """The input columns that `build` reads: pass them to `iter_records(columns=...)`."""
        self._by_line = detect_format(config.input) == "jsonl"
        params = dict(config.params)
        params.pop("messages", None)
        if config.json_schema is not None and "response_format" not in params:
            from batchrunner.answers.structured import (
                load_schema,  # a --param response_format wins over --json-schema
            )

            params["response_format"] = load_schema(config.json_schema).response_format()
        self._model: str | None = config.model or params.pop("model", None)
        params.pop("model", None)
        if config.stream:
            params["stream"] = True
        if params.get("stream"):
            params.setdefault("stream_options", _STREAM_OPTIONS)
        self._params = params
        self._streaming = bool(params.get("stream"))
        # What a Batch API body lacks is filled from these; streaming is settled per body.
        self._fill = {k: v for k, v in params.items() if k not in ("stream", "stream_options")}
        self._system = {"role": "system", "content": config.system} if config.system else None
        self._template = config.template
        self._fields = plan.template_fields
        self._id_column = plan.id_column
        self._messages_column = plan.messages_column
        self._prompt_column = plan.prompt_column
        self._model_column = plan.model_column
        self._batch_api = plan.batch_api

    def build(
        self,
        index: int,
        record: dict[str, Any] | None,
        error: str | None,
        input_hash: int | None = None,
    ) -> Row:
        """The request of row `index` (0-based), or a Row with the reason it has none.

        `record`, `error` and `input_hash` are as `iter_records` or `iter_hashed_records`
        yield them: a row that could not be read has no record and its error is passed through.
        """
        if record is None:
            error = error or self._error(index, "the row cannot be read")
            return Row(index, self._fallback_id(index), None, error)
        id_column = self._id_column
        if id_column is None:
            row_id = str(index)
        else:
            value = record.get(id_column)
            row_id = self._fallback_id(index) if value is None else id_text(value)
        try:
            body = None
            if self._batch_api:
                raw = record.get("body")
                if raw is not None:
                    body = self._batch_body(record, raw)
            if body is None:
                body = {"model": self._row_model(record), "messages": self._messages(record)}
                body.update(self._params)
        except _RowProblem as problem:
            return Row(index, row_id, None, self._error(index, str(problem)))
        return Row(index, row_id, body, input_hash=input_hash)

    # --- the parts of a body ---------------------------------------------------------------

    def _error(self, index: int, problem: str) -> str:
        where = f"line {index + 1}" if self._by_line else f"row {index} (0-based)"
        return f"input: {where}: {problem}"

    def _fallback_id(self, index: int) -> str:
        """The id of a row whose own id cannot be read: its number, marked so it cannot clash."""
        if self._id_column is None:
            return str(index)
        return f"<line {index + 1}>" if self._by_line else f"<row {index}>"

    def _row_model(self, record: dict[str, Any]) -> str:
        if self._model_column is not None:
            model = record.get(self._model_column)
            if model is not None and model != "":
                return model if type(model) is str else str(model)
        if self._model is None:
            if self._model_column is not None:
                raise _RowProblem("no model (the 'model' column is null and there is no --model)")
            raise _RowProblem("no model (the body has none and there is no --model)")
        return self._model

    def _messages(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        column = self._messages_column
        if column is not None:
            value = record.get(column)
            if value is not None:
                return self._with_system(_checked_messages(value, f"column {column!r}"))
        if self._template is not None:
            for name in self._fields:
                if record.get(name) is None:
                    raise _RowProblem(f"template value {{{name}}} is null")
            try:
                text = self._template.format_map(record)
            except _TEMPLATE_ERRORS as exc:
                problem = f"template cannot be rendered ({type(exc).__name__}: {exc})"
                raise _RowProblem(problem) from None
            if not text or text.isspace():
                raise _RowProblem("template gives an empty prompt")
        elif self._prompt_column is not None:
            column = self._prompt_column
            text = record.get(column)
            if text is None:
                raise _RowProblem(f"prompt is null (column {column!r})")
            if type(text) is not str:
                if isinstance(text, (list, dict, tuple)):
                    kind = "a list" if not isinstance(text, dict) else "an object"
                    raise _RowProblem(f"prompt is {kind}, not text (column {column!r})")
                text = str(text)
            if not text or text.isspace():
                raise _RowProblem(f"prompt is empty (column {column!r})")
        elif column is not None:
            raise _RowProblem(
                f"messages are null (column {column!r}) and there is no prompt column"
            )
        else:
            raise _RowProblem("no prompt: no messages, template or prompt column")
        user = {"role": "user", "content": text}
        return [self._system, user] if self._system is not None else [user]

    def _with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._system is None:
            return messages
        for message in messages:
            if message["role"] in _SYSTEM_ROLES:
                return messages
        return [self._system, *messages]

    def _batch_body(self, record: dict[str, Any], raw: Any) -> dict[str, Any]:
        if type(raw) is str:
            try:
                raw = json.loads(raw)
            except ValueError:
                raise _RowProblem("body is not valid JSON") from None
        if type(raw) is not dict:
            raise _RowProblem("body is not a JSON object")
        method = record.get("method")
        if method is not None and str(method).upper() != "POST":
            raise _RowProblem(f"method {method!r} is not POST")
        url = record.get("url")
        if url is not None and not str(url).rstrip("/").endswith("/chat/completions"):
            raise _RowProblem(f"url {url!r} is not /v1/chat/completions")
        body = {key: value for key, value in raw.items() if value is not None}
        messages = body.get("messages")
        if messages is None:
            raise _RowProblem("body has no messages")
        model = body.get("model") or self._row_model(record)
        out = {**self._fill, **body}
        out["model"] = model
        out["messages"] = self._with_system(_checked_messages(messages, "body.messages", False))
        if body.get("stream", self._streaming):
            out["stream"] = True
            out.setdefault("stream_options", _STREAM_OPTIONS)
        return out


def _checked_messages(value: Any, where: str, text_allowed: bool = True) -> list[dict[str, Any]]:
    """A list of messages, or a _RowProblem saying what is wrong with it.

    Only the shape is checked: a list of objects, each with a string `role`.
    Whatever else the OpenAI API accepts passes as it is (roles `developer` and `tool`, content
    parts, `tool_calls`, `tool_call_id`, `name`, null content): the gateway judges the rest.
    A column may hold the list as JSON text; a body, already JSON, may not.
    """
    if text_allowed and type(value) is str:
        try:
            value = json.loads(value)
        except ValueError:
            raise _RowProblem(f"messages are not valid JSON ({where})") from None
    if type(value) is not list:
        raise _RowProblem(f"messages are not a list of {{role, content}} ({where})")
    if not value:
        raise _RowProblem(f"messages are empty ({where})")
    cleaned = value
    for i, message in enumerate(value):
        if type(message) is not dict:
            raise _RowProblem(f"message {i} is not an object {{role, content}} ({where})")
        role = message.get("role")
        if type(role) is not str or not role:
            if role is None:
                got = "no role"
            elif role == "":
                got = "an empty role"
            else:
                got = f"role {role!r}, not a string"
            raise _RowProblem(f"message {i} has {got} ({where})")
        if len(message) > 2 and _has_null(message):
            # Parquet structs give every message every field, absent ones as null (and so do
            # nested structs such as content parts and tool calls): drop them.
            if cleaned is value:
                cleaned = list(value)
            cleaned[i] = _without_nulls(message)
    return cleaned


def _has_null(value: Any) -> bool:
    if type(value) is dict:
        return any(v is None or _has_null(v) for v in value.values())
    if type(value) is list:
        return any(_has_null(v) for v in value)
    return False


def _without_nulls(value: Any) -> Any:
    if type(value) is dict:
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if type(value) is list:
        return [_without_nulls(v) for v in value]
    return value
