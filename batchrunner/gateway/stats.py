"""Live counters of what the simulator served, for tests and benchmarks."""

from __future__ import annotations

from typing import Any

__all__ = ["GatewayStats"]


class GatewayStats:
    """Counters of chat-completion requests; also served at `GET /_simulator/stats`.

    `requests` counts every chat-completion request received, refused ones included;
    `by_status` counts answers by HTTP status; `dropped` counts answers cut off on purpose
    (they are in no status). `in_flight` is live; `max_in_flight` is its peak since the reset.
    `invalid_json` counts json_schema answers made invalid on purpose (`invalid_json_rate`).
    """

    __slots__ = ("by_status", "dropped", "in_flight", "invalid_json", "max_in_flight", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.dropped = 0
        self.invalid_json = 0
        self.by_status: dict[int, int] = {}

    def reset(self) -> None:
        """Zero the counters; requests in flight stay counted in `in_flight`."""
        self.requests = 0
        self.max_in_flight = self.in_flight
        self.dropped = 0
        self.invalid_json = 0
        self.by_status = {}

    def to_json(self) -> dict[str, Any]:
        """The counters as JSON: `by_status` keys are the statuses as strings."""
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "dropped": self.dropped,
            "invalid_json": self.invalid_json,
            "by_status": {str(status): count for status, count in sorted(self.by_status.items())},
        }

    def __repr__(self) -> str:
        return f"GatewayStats({self.to_json()})"
