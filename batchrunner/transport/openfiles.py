"""Room for the sockets a run opens: the process's open-file limit, raised and checked.

Every request in flight holds a socket, and a socket is an open file. Linux starts most
processes with a soft limit of 1,024 open files and a hard limit far above it; a process may
raise its own soft limit to the hard one. So a run does, and a `--concurrency` that still does
not fit is a usage error before anything is sent, rather than "Too many open files" half-way
through a paid run.

    >>> ensure_room_for(concurrency=5000)   # raises UsageError naming `ulimit -n` if it cannot
"""

from __future__ import annotations

import logging
import os

from batchrunner.errors import UsageError

__all__ = ["RESERVED_FILES", "ensure_room_for", "raise_open_file_limit"]

log = logging.getLogger(__name__)

# Beyond the sockets: the checkpoint's segment and manifest, the lock, the output being written,
# the input being read, the event loop's own descriptors, DNS and TLS, a log file.
RESERVED_FILES = 64
_MACOS_OPEN_MAX = 10240  # what setrlimit accepts there when the hard limit is "unlimited"


def raise_open_file_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the soft limit (None: no limits)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft == hard:
        return None if soft == resource.RLIM_INFINITY else soft
    for target in (hard, min(hard, _MACOS_OPEN_MAX) if hard > 0 else _MACOS_OPEN_MAX):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        log.debug("open-file limit raised from %d to %d", soft, target)
        return None if target == resource.RLIM_INFINITY else target
    return soft


def _open_now() -> int:
    """Descriptors this process holds now (a guess where /proc or /dev/fd is missing)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 16


def ensure_room_for(concurrency: int) -> None:
    """Raise the limit, then fail with a UsageError if `concurrency` sockets would not fit."""
    limit = raise_open_file_limit()
    if limit is None:
        return
    needed = concurrency + _open_now() + RESERVED_FILES
    if needed <= limit:
        return
    fits = max(1, limit - (needed - concurrency))
    raise UsageError(
        f"--concurrency {concurrency} needs about {needed:,} open files, but this process may "
        f"open only {limit:,} (`ulimit -n`, already raised to the hard limit): use "
        f"--concurrency {fits} or less, or raise the hard limit (`ulimit -Hn`; "
        f"/etc/security/limits.conf, or LimitNOFILE= for a systemd service)"
    )
