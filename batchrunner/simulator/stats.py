"""Live counters of what the simulator served, for tests and benchmarks."""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["GatewayStats", "key_label"]


class GatewayStats:
    """Counters of chat-completion requests; also served at `GET /_simulator/stats`.

    `requests` counts every chat-completion request received, refused ones included;
    `by_status` counts answers by HTTP status; `dropped` counts answers cut off on purpose
    (they are in no status). `in_flight` is live; `max_in_flight` is its peak since the reset.
    `invalid_json` counts json_schema answers made invalid on purpose (`invalid_json_rate`).
    `by_key` counts accepted requests by key, each key named by `key_label` (a digest, never
    the key itself). `files_created` and `batches_created` count the Batch API's uploads
    (`POST /v1/files`) and batches (`POST /v1/batches`).
    """

    __slots__ = (
        "batches_created", "by_key", "by_status", "dropped", "files_created", "in_flight",
        "invalid_json", "max_in_flight", "requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.dropped = 0
        self.invalid_json = 0
        self.by_status: dict[int, int] = {}
        self.by_key: dict[str, int] = {}
        self.files_created = 0
        self.batches_created = 0

    def count_key(self, key: str) -> None:
        """Count one accepted request under its key's label."""
        label = key_label(key)
        self.by_key[label] = self.by_key.get(label, 0) + 1

    def reset(self) -> None:
        """Zero the counters; requests in flight stay counted in `in_flight`."""
        self.requests = 0
        self.max_in_flight = self.in_flight
        self.dropped = 0
        self.invalid_json = 0
        self.by_status = {}
        self.by_key = {}
        self.files_created = 0
        self.batches_created = 0

    def to_json(self) -> dict[str, Any]:
        """The counters as JSON: `by_status` keys are the statuses as strings."""
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "dropped": self.dropped,
            "invalid_json": self.invalid_json,
            "by_status": {str(status): count for status, count in sorted(self.by_status.items())},
            "by_key": dict(sorted(self.by_key.items())),
            "files_created": self.files_created,
            "batches_created": self.batches_created,
        }

    def __repr__(self) -> str:
        return f"GatewayStats({self.to_json()})"


def key_label(key: str) -> str:
    """A key's name in the counters: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]
