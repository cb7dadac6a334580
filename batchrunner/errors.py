"""The error tree of batchrunner.

Every expected failure is one of these; each carries its context and, for the ones that end a
command, the exit code (docs/exit-codes.md). Retry decisions key on these classes, never on text.

    BatchrunnerError
    ├── UsageError                exit 2: bad options, job file or settings
    │   ├── InputError            exit 2: the input as a whole (file, format, column, template)
    │   ├── CheckpointMismatch    exit 2: input or settings changed since the checkpoint
    │   └── OutputLocked          exit 2: another run holds the output
    ├── AuthRefused               exit 4: the gateway refused the key (401/403)
    ├── StorageError              exit 74: the checkpoint or the output could not be written
    └── RequestError              one HTTP attempt failed (never ends a command by itself)
        ├── RetryableError        worth another attempt
        │   ├── ConnectionFailed  refused, reset or dropped connection
        │   │   └── GatewayUnreachable  no connection at all: refused, DNS, TLS
        │   ├── AttemptTimeout    no complete answer within --timeout
        │   ├── RateLimited       429, with the Retry-After the gateway asked for
        │   ├── ServerError       5xx, 408, 409
        │   └── InvalidResponse   a body that is not a valid chat completion
        └── PermanentError        other 4xx: the row fails with the gateway's message
"""

from __future__ import annotations

__all__ = [
    "AttemptTimeout",
    "AuthRefused",
    "BatchrunnerError",
    "CheckpointMismatch",
    "ConnectionFailed",
    "GatewayUnreachable",
    "InputError",
    "InvalidResponse",
    "OutputLocked",
    "PermanentError",
    "RateLimited",
    "RequestError",
    "RetryableError",
    "ServerError",
    "StorageError",
    "UsageError",
]


class BatchrunnerError(Exception):
    """Base of every error batchrunner raises on purpose."""

    exit_code = 1


class UsageError(BatchrunnerError):
    """Options, job file or settings that cannot be run; nothing was sent."""

    exit_code = 2


class InputError(UsageError):
    """The input as a whole cannot be used: missing file, unknown format, missing column."""


class CheckpointMismatch(UsageError):
    """The input or the request settings changed since the checkpoint was written."""


class OutputLocked(UsageError):
    """Another live run holds the lock on this output."""


class AuthRefused(BatchrunnerError):
    """The gateway answered 401 or 403: every row would fail, so the run stops."""

    exit_code = 4

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class StorageError(BatchrunnerError):
    """The checkpoint or the output could not be written (disk full, read-only, I/O error).

    `path` is what could not be written and `cause` the system's reason; nothing more is sent.
    """

    exit_code = 74

    def __init__(self, message: str, *, path: str | None = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.cause = cause


class RequestError(BatchrunnerError):
    """One HTTP attempt failed; `http_status` is None where no answer came back."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class RetryableError(RequestError):
    """A failure that another attempt may cure."""


class ConnectionFailed(RetryableError):
    """The connection was refused, reset or dropped before a full answer."""


class GatewayUnreachable(ConnectionFailed):
    """No connection could be made: refused, a host name that does not resolve, a failed TLS
    handshake. The request never reached the gateway (nothing was sent, nothing billed).

    `cause` is "refused", "dns", "tls" or "connect" (any other failure to connect).
    """

    def __init__(self, message: str, *, cause: str = "connect") -> None:
        super().__init__(message)
        self.cause = cause


class AttemptTimeout(RetryableError):
    """No complete answer within the per-attempt timeout.

    `sent` is False when the time ran out while connecting (the gateway never had the
    request), True when it ran out after the request went out: the gateway may have answered,
    and billed, an answer that came too late.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class RateLimited(RetryableError):
    """HTTP 429; `retry_after` is the wait the gateway asked for, in seconds, if it said."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = 429,
        retry_after: float | None = None,
        rate_headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, http_status=http_status)
        self.retry_after = retry_after
        self.rate_headers = rate_headers or {}


class ServerError(RetryableError):
    """HTTP 5xx, 408 or 409."""

    def __init__(
        self, message: str, *, http_status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, http_status=http_status)
        self.retry_after = retry_after


class InvalidResponse(RetryableError):
    """A 2xx answer whose body is not a valid chat completion (cut short, not JSON, wrong shape)."""


class PermanentError(RequestError):
    """A 4xx other than 401/403/408/409/429: the request itself is wrong; not retried.

    `code` is the gateway's `error.code` (such as "model_not_found"), where it sent one.
    """

    def __init__(
        self, message: str, *, http_status: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, http_status=http_status)
        self.code = code
