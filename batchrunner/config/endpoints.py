"""The endpoints of a run: each a base URL with its own key variable and limits (docs/run.md).

A run sends to one endpoint (`base_url`, `api_key_env`), or to several: the job key
`endpoints = [{ base_url = "...", api_key_env = "KEY_A", rpm = 600, tpm = 200000 }, ...]`, or
`--endpoint URL` repeated with `--api-key-env NAME` repeated in the same order. Several key
variables on one gateway (`--api-key-env KEY_A,KEY_B`, the Ray engine's form) are the same
thing: one endpoint per key. Plain values here; the checks live in options.py and settings.py.

    >>> endpoint_name("https://user:pw@gw.example.com/v1?api-version=2024-06-01")
    'https://gw.example.com/v1'
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ENDPOINT_KEYS", "Endpoint", "endpoint_name"]

#: The keys of one entry of the job key `endpoints`.
ENDPOINT_KEYS = ("base_url", "api_key_env", "rpm", "tpm", "concurrency")


def endpoint_name(base_url: str) -> str:
    """How outputs and messages name an endpoint: its base URL without credentials or query.

    The user and password (`https://user:pw@host`), the query string (`?api-version=...`, which
    may carry a key) and the fragment are left out; the scheme, host, port and path stay.

    >>> endpoint_name("http://127.0.0.1:8000/v1/")
    'http://127.0.0.1:8000/v1'
    """
    parts = urlsplit(base_url.strip())
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One gateway a run sends to: its base URL, the variable holding its key, its limits.

    `api_key_env` None means the default variables (RU_LLM_API_KEY, else OPENAI_API_KEY).
    `rpm`, `tpm` and `concurrency` None mean the run's own (`--rpm`, `--tpm`,
    `--concurrency`), applied to this endpoint. The key itself is never held here.
    """

    base_url: str
    api_key_env: str | None = None
    rpm: float | None = None
    tpm: float | None = None
    concurrency: int | None = None

    @property
    def name(self) -> str:
        """The `endpoint` output column's value: the base URL without credentials or query."""
        return endpoint_name(self.base_url)

    def to_dict(self) -> dict[str, object]:
        """The job-file form: the keys that are set."""
        return {key: getattr(self, key) for key in ENDPOINT_KEYS if getattr(self, key) is not None}
