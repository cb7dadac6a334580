"""Values that flow through a run: a row to send, its usage, its result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Result", "Row", "Usage"]


@dataclass(frozen=True, slots=True)
class Row:
    """One input row, ready to send: its position, its id and its request body.

    `error` is set (and `body` is None) for a row that cannot be sent; it starts with `input:`.
    """

    index: int
    id: str
    body: dict[str, Any] | None
    error: str | None = None
    sweep_model: str | None = None  # a sweep's model for a row that has no body
    input_hash: int | None = None  # of the input values the body is built from (rowhash.py)

    @property
    def model(self) -> str | None:
        """The model this row asks for."""
        return self.sweep_model if self.body is None else self.body.get("model")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the gateway reported them; None where it did not."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    # completion_tokens_details.reasoning_tokens: already inside completion_tokens
    reasoning_tokens: int | None = None

    @classmethod
    def from_json(cls, usage: dict[str, Any] | None) -> Usage:
        """Read an OpenAI `usage` object (None gives an empty Usage)."""
        if not usage:
            return cls()
        details = usage.get("prompt_tokens_details") or {}
        completion = usage.get("completion_tokens_details") or {}
        reasoning = completion.get("reasoning_tokens") if isinstance(completion, dict) else None
        return cls(
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            cached_tokens=details.get("cached_tokens") if isinstance(details, dict) else None,
            reasoning_tokens=reasoning if isinstance(reasoning, int) else None,
        )


# Not frozen, though read-only by intent: one is made for every row, and a frozen dataclass's
# __init__ (22 fields, each set through object.__setattr__) costs 4x as much. It still hashes
# and compares by value.
@dataclass(slots=True, unsafe_hash=True)
class Result:
    """The outcome of one row: its output columns (docs/output.md) less the carried input ones."""

    index: int
    id: str
    status: str  # "ok" or "error"
    model: str | None
    content: str | None = None
    choices: tuple[str | None, ...] | None = None
    finish_reason: str | None = None
    response_model: str | None = None
    usage: Usage = Usage()
    cost_usd: float | None = None
    attempts: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    http_status: int | None = None
    error: str | None = None
    response_id: str | None = None
    refusal: str | None = None  # the first choice's message.refusal, when the model refused
    cache_hit: bool = False  # served from the response cache: nothing was sent or paid
    # structured output (docs/structured.md): the valid answer as canonical JSON, the answers asked
    # again for the schema and their cost; None where the run has no --json-schema
    parsed: str | None = None
    reasks: int | None = None
    reask_cost_usd: float | None = None
    # an answer kept whole: the first choice's tool calls and logprobs as JSON text, and every
    # choice's tool calls (JSON text each, null for a choice with none) when n > 1 and some
    # choice called a tool; None where there were none
    tool_calls: str | None = None
    logprobs: str | None = None
    choices_tool_calls: tuple[str | None, ...] | None = None
    # where the answer came from: the endpoint's name (its base URL without credentials or
    # query, config.endpoints.endpoint_name), and the Batch API batch that answered the row
    # (None online; its cost is at batch prices)
    endpoint: str | None = None
    batch_id: str | None = None

    @property
    def ok(self) -> bool:
        """True when the row got an answer."""
        return self.status == "ok"
