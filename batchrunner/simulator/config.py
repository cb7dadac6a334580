"""The simulator's settings and the models it serves."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

__all__ = ["MODELS", "GatewayConfig", "ModelInfo"]


@dataclass(frozen=True)
class GatewayConfig:
    """How the simulator listens, which keys it accepts and which faults it injects.

    Port 0 means a free port, chosen by the system. Every fault is off by default; the faults
    drawn for a given sequence of requests repeat exactly when `fault_seed` is set.

    >>> GatewayConfig(port=0, error_rate=0.1, rpm=600, fault_seed=7)
    """

    host: str = "127.0.0.1"
    port: int = 8000
    keys: tuple[str, ...] = ()  # empty: accept any key that starts with "sk-ru-"
    latency_ms: float = 0.0  # mean delay before answering
    jitter_ms: float = 0.0  # the delay is spread uniformly over latency_ms +- jitter_ms
    error_rate: float = 0.0  # fraction answered 500 or 503
    rpm: int | None = None  # requests per sliding 60 s window; beyond it, 429
    tpm: int | None = None  # tokens (prompt + completion) per sliding 60 s window
    drop_rate: float = 0.0  # fraction of answers whose connection is dropped midway
    rate_window_s: float = 60.0  # the rpm/tpm window; shorter only so tests see a limit reset
    invalid_json_rate: float = 0.0  # fraction of json_schema answers made invalid on purpose
    fault_seed: int | None = None
    cache_min_tokens: int = 1024  # shortest prompt prefix that is cached
    cache_step_tokens: int = 128  # cached prefixes grow in steps of this many tokens
    batch_seconds: float = 2.0  # a Batch API batch finishes in about this many seconds
    batch_expire_after: int | None = None  # every batch expires once this many lines are done
    prompt_cache_ttl: float = 300.0  # seconds a cached prefix stays without use

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, not {self.port}")
        for name in ("error_rate", "drop_rate", "invalid_json_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}")
        for name in ("latency_ms", "jitter_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if self.rate_window_s <= 0:
            raise ValueError(f"rate_window_s must be positive, not {self.rate_window_s}")
        if self.batch_seconds < 0:
            raise ValueError(f"batch_seconds must not be negative, not {self.batch_seconds}")
        if self.batch_expire_after is not None and self.batch_expire_after < 0:
            raise ValueError(
                f"batch_expire_after must not be negative, not {self.batch_expire_after}"
            )
        if self.cache_min_tokens < 1 or self.cache_step_tokens < 1:
            raise ValueError("cache_min_tokens and cache_step_tokens must be at least 1")
        if self.prompt_cache_ttl < 0:
            raise ValueError(f"prompt_cache_ttl must not be negative, not {self.prompt_cache_ttl}")
        if isinstance(self.keys, str):  # a lone key would otherwise become its characters
            object.__setattr__(self, "keys", (self.keys,))
        else:
            object.__setattr__(self, "keys", tuple(self.keys))


@dataclass(frozen=True)
class ModelInfo:
    """A model the simulator lists and answers as; `snapshot` is what responses name."""

    id: str
    owned_by: str
    created: int
    snapshot: str
    reasoning: bool = False  # a reasoning model: it reports reasoning_tokens, spent first


MODELS: Mapping[str, ModelInfo] = MappingProxyType(
    {
        info.id: info
        for info in (
            ModelInfo("gpt-4o", "openai", 1715367049, "gpt-4o-2024-08-06"),
            ModelInfo("gpt-4o-mini", "openai", 1721172741, "gpt-4o-mini-2024-07-18"),
            ModelInfo("o4-mini", "openai", 1744225351, "o4-mini-2025-04-16", reasoning=True),
            ModelInfo(
                "claude-3-5-sonnet-20241022", "anthropic", 1729555200, "claude-3-5-sonnet-20241022"
            ),
            ModelInfo(
                "claude-3-5-haiku-20241022", "anthropic", 1729555200, "claude-3-5-haiku-20241022"
            ),
        )
    }
)
"""The models served, by id; a response names the model's dated snapshot, as OpenAI's do."""
