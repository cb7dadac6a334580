"""The `batchrunner` click group and the plumbing every command shares.

The group maps errors to exit codes and one clear line; here too are logging setup (text or
JSON, keys scrubbed), the crash folder a bug's `crash.log` goes to, the job options that every
run-like command takes, and the config built from a job file and those options. The commands
themselves are in `batchrunner.cli.commands`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from batchrunner._version import __version__
from batchrunner.errors import BatchrunnerError, UsageError
from batchrunner.redaction import scrub

log = logging.getLogger("batchrunner")

_error_format = {"json": False}  # --log-format json also shapes the error line


# -- shared plumbing ------------------------------------------------------------------------


class _Group(click.Group):
    """Maps batchrunner's expected errors to one line on stderr and their exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Seen before the command parses its options, so that even their errors are JSON.
        wanted = [a.partition("=")[2] if a.startswith("--log-format=") else None for a in args]
        wanted += [b for a, b in zip(args, args[1:]) if a == "--log-format"]
        _error_format["json"] = "json" in wanted
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchrunnerError as exc:
            _echo_error(str(exc), exc.exit_code)
            ctx.exit(exc.exit_code)
        except click.ClickException as exc:  # a bad option, with --log-format json: one object
            if not _error_format["json"]:
                raise
            _echo_error(exc.format_message(), exc.exit_code)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:  # `batchrunner export ... | head`: the reader has had enough
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit cannot fail again
            ctx.exit(EXIT_BROKEN_PIPE)
        except OSError as exc:
            if exc.errno not in _STORAGE_ERRNOS:
                return self._crash(ctx, exc)
            # stdout on a full disk (`status > /dev/full`): storage, as in `run`, not a bug
            from batchrunner.store.durability import write_error

            error = write_error(exc, exc.filename or "stdout")
            _echo_error(str(error), error.exit_code)
            ctx.exit(error.exit_code)
        except Exception as exc:  # a bug: one line and exit 70, the traceback in crash.log
            self._crash(ctx, exc)

    def _crash(self, ctx: click.Context, exc: Exception) -> None:
        """A bug: one line and exit 70, the traceback in crash.log."""
        from batchrunner.cli.crash import EXIT_INTERNAL, crash_line, write_crash_log

        path = write_crash_log(exc, folder=ctx.meta.get(_CRASH_FOLDER),
                               key_variables=ctx.meta.get(_KEY_VARIABLES, ()))
        line = crash_line(exc, path)
        if _error_format["json"]:
            _echo_error(line.removeprefix("batchrunner: "), EXIT_INTERNAL)
        else:
            click.echo(line, err=True)
        ctx.exit(EXIT_INTERNAL)


def _echo_error(message: str, exit_code: int) -> None:
    """The one error line on stderr: text, or one JSON object with --log-format json."""
    message = scrub(message)
    if _error_format["json"]:
        record = {"time": round(time.time(), 3), "level": "error", "logger": "batchrunner",
                  "message": message, "exit_code": exit_code}
        click.echo(json.dumps(record), err=True)
    else:
        click.echo(f"batchrunner: error: {message}", err=True)


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
# What a write that failed for want of storage says (the others are bugs until shown not to be).
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
_CRASH_FOLDER = "batchrunner.crash_folder"  # ctx.meta: where a bug's crash.log goes
_KEY_VARIABLES = "batchrunner.key_variables"  # ctx.meta: variables whose values are scrubbed


def _crash_folder(output: Path | str, api_key_env: str | None = None) -> None:
    """Have a bug in this command write its crash.log in `output`'s checkpoint folder."""
    from batchrunner.inputs.storage import is_uri
    from batchrunner.store.layout import checkpoint_dir

    meta = click.get_current_context().meta
    if not is_uri(output):  # an object-store output's log goes to the current folder
        meta[_CRASH_FOLDER] = checkpoint_dir(Path(output))
    if api_key_env:
        meta[_KEY_VARIABLES] = tuple(api_key_env.split(","))


@contextlib.contextmanager
def _writing(where: Path | str | None) -> Iterator[None]:
    """A failed write of `where` (None: stdout): one line naming the path and the cause.

    A full disk or an I/O error is exit 74, as in `run`; a folder that cannot be written is
    exit 2. A reader that left (`| head`) is neither: that stays a BrokenPipeError (exit 141).
    """
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        from batchrunner.store.durability import write_error

        raise write_error(exc, exc.filename or (where if where is not None else "stdout")) from None


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        return json.dumps(payload)


class _ScrubbingFormatter(logging.Formatter):
    """Another formatter's lines with every API key masked (a message may quote a gateway)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return scrub(self._inner.format(record))


def _configure_logging(*, quiet: bool = False, log_format: str = "text") -> None:
    _error_format["json"] = log_format == "json"
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_ScrubbingFormatter(_JsonFormatter()))
    else:
        handler.setFormatter(_ScrubbingFormatter(
            logging.Formatter("batchrunner: %(levelname)s: %(message)s")))
    root = logging.getLogger("batchrunner")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def _params(param: tuple[str, ...]) -> dict[str, Any]:
    """`--param KEY=JSON` options as a dict; a value that is not JSON is a usage error."""
    from batchrunner.config.jobs import param_value

    params: dict[str, Any] = {}
    for item in param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r}: expected KEY=JSON, e.g. --param seed=7")
        params[key] = param_value(key, value)
    return params


class _PathOrUri(click.ParamType):
    """A local path, or an object-store URI kept as text (a Path would fold its `//`)."""

    name = "path"

    def convert(self, value: Any, param: Any, ctx: Any) -> Path | str:
        from batchrunner.inputs.storage import is_uri

        if isinstance(value, str) and is_uri(value):
            return value
        return Path(value)


_PATH_OR_URI = _PathOrUri()


def _click_option(option: Any) -> Callable[..., Any]:
    """The click option of one `run` option of options.py."""
    kinds: dict[str, dict[str, Any]] = {
        "text": {},
        "int": {"type": int},
        "float": {"type": float},
        "path": {"type": _PATH_OR_URI},
        "file": {"type": click.Path(dir_okay=False, path_type=Path)},
        "choice": {"type": click.Choice(list(option.choices))},
        "flag": {"is_flag": True, "default": None},
        "switch": {"default": None},
        "many": {"multiple": True},
        "optional": {"is_flag": False, "flag_value": "", "default": None},
    }
    names = (*option.flags, option.dest) if option.dest else option.flags
    return click.option(*names, help=option.help, metavar=option.metavar, **kinds[option.kind])


def job_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The JOB argument and the options of `command` ("run" or "estimate"), from options.py."""
    from batchrunner.config.options import OPTIONS

    decorators = [
        click.argument("job", required=False, type=click.Path(dir_okay=False, path_type=Path)),
        *(_click_option(o) for o in OPTIONS if o.flags and command in o.commands),
    ]

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return decorate


def _overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Command-line values the user gave, keyed by RunConfig field (request options too)."""
    params = _params(kwargs.pop("param"))
    kwargs["input"] = kwargs.pop("input_")
    model = kwargs.pop("model", ())
    if len(model) == 1:
        kwargs["model"] = model[0]
    elif model:
        kwargs["models"] = tuple(model)
    urls, key_envs = kwargs.pop("endpoint", ()), kwargs.pop("api_key_env", ())
    if urls:  # --endpoint URL ... with --api-key-env NAME ... in the same order
        from batchrunner.config.settings import endpoints_from_options

        kwargs["endpoints"] = endpoints_from_options(urls, key_envs)
    elif key_envs:  # several: one endpoint per key at the one base URL (KEY_A,KEY_B alike)
        kwargs["api_key_env"] = ",".join(key_envs)
    stop = kwargs.pop("stop")
    if stop:
        kwargs["stop"] = list(stop) if len(stop) > 1 else stop[0]
    if str(kwargs.get("cache") or "").endswith(".toml"):
        raise UsageError(f"--cache {kwargs['cache']}: that is a job file; write the job first "
                         "(`run JOB.toml --cache`) or give the cache as --cache=PATH")
    if kwargs.get("cache") is not None:
        kwargs["cache"] = Path(kwargs["cache"]) if kwargs["cache"] else True  # bare --cache
    overrides = {k: v for k, v in kwargs.items() if v is not None}
    if params:
        overrides["params"] = params
    return overrides


def _config(job: Path | None, kwargs: dict[str, Any]):  # type: ignore[no-untyped-def]
    from batchrunner.config.jobs import build_config, load_job

    return build_config(load_job(job) if job else None, _overrides(kwargs))


# -- commands -------------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchrunner")
def main() -> None:
    """Batch jobs for OpenAI-compatible chat-completions gateways.

    \b
    Try it with no key and no network (the samples come with batchrunner):
      batchrunner samples demo && cd demo && batchrunner run job.toml
      batchrunner summary out/quickstart.parquet
    """
