"""What a bug leaves behind: one line for the user, the traceback in `crash.log` (docs/exit-codes.md).

An exception that batchrunner did not expect is a bug. The command says so in one line on
stderr and exits 70 (EX_SOFTWARE); the traceback goes to a file, with every API key scrubbed
from it, so that it can be attached to a report without leaking anything:

- `run`: `crash.log` in the checkpoint folder of the output (`OUT.parquet.checkpoint/`), the
  checkpoint itself left as the run left it, readable and resumable;
- `status`: the same, for the output it was asked about, when that folder exists;
- any other command (or a run that failed before its checkpoint folder existed):
  `batchrunner-crash.log` in the current folder, else in the system's temporary folder.

    path = write_crash_log(exc, folder=checkpoint_dir(output))
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import traceback
from collections.abc import Iterable
from pathlib import Path

from batchrunner._version import __version__
from batchrunner.redaction import key_values, scrub
from batchrunner.store.layout import CRASH_LOG

__all__ = ["EXIT_INTERNAL", "crash_line", "write_crash_log"]

#: The exit code of an internal error (sysexits' EX_SOFTWARE).
EXIT_INTERNAL = 70

FALLBACK_LOG = "batchrunner-crash.log"


def crash_line(exc: BaseException, log_path: Path | None) -> str:
    """The one line a user sees: what broke (scrubbed, shortened) and where the traceback is."""
    detail = scrub(str(exc).splitlines()[0] if str(exc) else "")[:200]
    what = type(exc).__name__ + (f": {detail}" if detail else "")
    where = f"the traceback is in {log_path}" if log_path else "no crash.log could be written"
    return f"batchrunner: internal error (a bug, please report it): {what}; {where}"


def write_crash_log(
    exc: BaseException,
    *,
    folder: Path | None = None,
    argv: list[str] | None = None,
    key_variables: Iterable[str] = (),
) -> Path | None:
    """Append the scrubbed traceback of `exc` to the crash log; return its path (None: nowhere).

    `folder` is the checkpoint folder of the run, used when it exists; otherwise the current
    folder, else the temporary folder. The key never reaches the file.
    """
    argv = sys.argv if argv is None else argv
    text = "".join(traceback.format_exception(exc))
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    entry = scrub(
        f"--- {stamp} batchrunner {__version__} pid {os.getpid()}\n"
        f"command: {' '.join(argv)}\n{text}\n",
        key_values(key_variables),
    )
    places: list[Path] = []
    if folder is not None and folder.is_dir():
        places.append(folder / CRASH_LOG)
    places += [Path.cwd() / FALLBACK_LOG, Path(tempfile.gettempdir()) / FALLBACK_LOG]
    for path in places:
        try:
            # Owner-only: a traceback says things about the machine, even scrubbed.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as handle:
                handle.write(entry)
        except OSError:
            continue
        return path
    return None
