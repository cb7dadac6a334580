"""Which input columns feed which part of a request (docs/input.md), and how an id reads.

`resolve_columns` decides, once a run, the id, messages, prompt, template and model columns
from the options and the input's column names (`ColumnPlan`); `template_fields` lists the
columns a --template reads; `id_text` is the one rule by which an id becomes text.
"""

from __future__ import annotations

import _string  # the parser str.format uses for field names such as "a.b[0]"
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchrunner.config.settings import RunConfig
from batchrunner.errors import InputError

__all__ = ["ColumnPlan", "id_text", "resolve_columns", "template_fields"]

_BATCH_API_COLUMNS = ("custom_id", "method", "url", "body")

@dataclass(frozen=True)
class ColumnPlan:
    """Which input columns feed which part of a request, resolved once a run."""

    id_column: str | None  # None: ids are 0-based row numbers
    messages_column: str | None
    prompt_column: str | None
    template_fields: tuple[str, ...]
    model_column: str | None
    batch_api: bool  # rows may be OpenAI Batch API lines (custom_id, method, url, body)

    @property
    def needed(self) -> tuple[str, ...]:
        """The input columns that building a request reads, in a stable order."""
        names: dict[str, None] = {}
        for name in (self.id_column, self.messages_column, self.prompt_column, self.model_column):
            if name is not None:
                names[name] = None
        names.update(dict.fromkeys(self.template_fields))
        if self.batch_api:
            names.update(dict.fromkeys(_BATCH_API_COLUMNS))
        return tuple(names)


def id_text(value: Any) -> str:
    """An id as the output holds it: always a string (the int 7 becomes "7")."""
    return value if type(value) is str else str(value)


def template_fields(template: str | None) -> tuple[str, ...]:
    """The columns a `str.format` template reads: `{question}` and `{meta[lang]}` read
    `question` and `meta`; `{{` is a literal brace. A positional `{}` or `{0}` is an error."""
    if template is None:
        return ()
    fields: dict[str, None] = {}

    def walk(text: str, depth: int) -> None:
        for _literal, field, spec, _conversion in string.Formatter().parse(text):
            if field is None:
                continue
            first, rest = _string.formatter_field_name_split(field)
            list(rest)  # a malformed "{a[}" only fails here
            if first == "" or isinstance(first, int):
                raise InputError(
                    f"template {template!r}: placeholder {{{field}}} is positional; "
                    "name a column, as in {prompt}"
                )
            fields[first] = None
            if spec and depth < 2:
                walk(spec, depth + 1)

    try:
        walk(template, 0)
    except ValueError as exc:
        raise InputError(f"template {template!r}: {exc}") from None
    return tuple(fields)


def resolve_columns(config: RunConfig, columns: Sequence[str]) -> ColumnPlan:
    """Decide which columns give the id, messages, prompt and model.

    Raises InputError for a column named by the options that the input lacks, a template
    placeholder with no column, no prompt source at all, or no model. With no columns known
    (an empty JSONL file) nothing can be checked and nothing is raised.

    An explicit --template or --prompt-column wins over a column that is merely *called*
    "messages"; an explicit --messages-column comes first, the template or prompt filling in
    for rows whose messages are null.
    """
    where = config.input
    have = set(columns)
    checking = bool(columns)
    fields = template_fields(config.template)

    def listing() -> str:
        shown = ", ".join(columns[:20])
        return shown + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")

    if checking:
        for name in (config.prompt_column, config.messages_column, config.id_column):
            if name is not None and name not in have:
                raise InputError(f"{where}: no column {name!r} (columns: {listing()})")
        for name in fields:
            if name not in have:
                raise InputError(
                    f"{where}: template placeholder {{{name}}} has no column (columns: {listing()})"
                )

    batch_api = "body" in have and "custom_id" in have
    if config.id_column is not None:
        id_column: str | None = config.id_column
    else:
        id_column = next((c for c in ("id", "custom_id") if c in have), None)
    if config.messages_column is not None:
        messages_column: str | None = config.messages_column
    elif config.template is None and config.prompt_column is None and "messages" in have:
        messages_column = "messages"
    else:
        messages_column = None
    if config.template is not None:
        prompt_column = None
    elif config.prompt_column is not None:
        prompt_column = config.prompt_column
    else:
        prompt_column = "prompt" if "prompt" in have else None
    model_column = "model" if "model" in have else None

    if checking:
        if not (batch_api or messages_column or prompt_column or config.template is not None):
            raise InputError(
                f"{where}: no column 'prompt' (columns: {listing()}); name the prompt column "
                "with --prompt-column, or give --template, or a 'messages' column"
            )
        if not (config.model or config.params.get("model") or model_column or batch_api):
            raise InputError(f"{where}: no model: give --model, or a 'model' column")
    return ColumnPlan(
        id_column=id_column,
        messages_column=messages_column,
        prompt_column=prompt_column,
        template_fields=fields,
        model_column=model_column,
        batch_api=batch_api,
    )
