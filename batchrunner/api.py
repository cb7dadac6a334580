"""The notebook face: results as a pandas DataFrame, and a DataFrame as a run's input.

    import batchrunner, pandas as pd
    df = pd.DataFrame({"id": ["a", "b"], "prompt": ["What is 2+2?", "Name a prime."]})
    batchrunner.run({"output": "out/df.parquet", "model": "gpt-4o-mini", "local": True}, input=df)
    results = batchrunner.read_results("out/df.parquet")

A DataFrame input is written once, as Parquet, beside the output (`.OUT.input.parquet`): the run
then reads, fingerprints and resumes it like any other input. Its index is not an id unless
`id_column` names it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.config.jobs import build_config
from batchrunner.config.settings import RunConfig
from batchrunner.errors import OutputLocked, UsageError
from batchrunner.reports import expand_paths
from batchrunner.store.durability import replaced_atomically
from batchrunner.store.scored import read_result_batches

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["arun", "input_from_frame", "read_results", "run"]


def _nullable_types() -> dict[pa.DataType, Any]:
    """pandas' nullable dtypes for the Arrow types of the output (pandas imported only here)."""
    import pandas as pd

    return {
        pa.int64(): pd.Int64Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.bool_(): pd.BooleanDtype(),
        pa.string(): pd.StringDtype(),
        pa.large_string(): pd.StringDtype(),
    }


def read_results(
    paths: str | Path | Sequence[str | Path],
    *,
    flatten: bool = False,
    json_schema: Path | str | Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Result files (globs and folders too) as one DataFrame with the output's types.

    Integer columns stay integers where they have nulls (`Int64`, `Int32`), strings are
    pandas strings, booleans `boolean`, floats float64 (null as NaN), lists Python lists.
    `flatten` makes `parsed` (a --json-schema run's answers) a column per top-level field of
    `json_schema`, else of the schema the results record (docs/structured.md).

    >>> df = batchrunner.read_results("out/nightly-*.parquet")
    >>> entities = batchrunner.read_results("out/entities.parquet", flatten=True)
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    tables = []
    for path in expand_paths(paths):
        if path.suffix.lower() not in (".parquet", ".pq"):  # .jsonl and .csv outputs
            schema, batches = read_result_batches(path)
            tables.append(pa.Table.from_batches(list(batches), schema))
            continue
        try:
            tables.append(pq.read_table(path))
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 \
        else tables[0]
    if flatten:
        from batchrunner.answers.flatten import flatten as flatten_parsed

        table = flatten_parsed(table, json_schema)
    return table.to_pandas(types_mapper=_nullable_types().get)


def _frame_path(output: Path) -> Path:
    """Where a DataFrame input is written: beside the output, hidden (globs of results skip
    it)."""
    return output.with_name(f".{output.name}.input.parquet")


def input_from_frame(config: RunConfig | Mapping[str, Any], frame: pd.DataFrame) -> RunConfig:
    """A RunConfig whose input is `frame`, written as Parquet beside the output.

    `config` is a RunConfig (its `input` is replaced) or a mapping of run options (the keys
    of a job file, as `build_config` takes them, without `input`).
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise UsageError(f"input= must be a pandas DataFrame, not {type(frame).__name__}")
    if isinstance(config, RunConfig):
        output, id_column = Path(config.output), config.id_column
    else:
        if config.get("output") is None:
            raise UsageError("no output: give `output` with a DataFrame input")
        output, id_column = Path(config["output"]), config.get("id_column")
    names = [n for n in frame.index.names if n is not None]
    if id_column is not None and id_column in names and id_column not in frame.columns:
        frame = frame.reset_index(level=id_column)
    path = _frame_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise UsageError(f"input DataFrame: cannot be stored as Parquet ({exc})") from None
    with replaced_atomically(path) as tmp:  # the same frame gives the same bytes: resume sees it
        pq.write_table(table.replace_schema_metadata(None), tmp, compression="zstd")
    if isinstance(config, RunConfig):
        return config.replace(input=path)
    options = {k: v for k, v in config.items() if k != "input"}
    options["input"] = path
    options["output"] = output
    return build_config(None, options)


def _config(config: RunConfig | Mapping[str, Any], input: Any) -> RunConfig:
    if input is not None:
        return input_from_frame(config, input)
    if isinstance(config, RunConfig):
        return config
    return build_config(None, dict(config))


@contextlib.contextmanager
def _frame_input(config: RunConfig | Mapping[str, Any], input: Any) -> Iterator[RunConfig]:
    """The run's config; a DataFrame input's Parquet copy is removed again when the run is
    refused before anything was sent (a usage error) and this call made the copy: it is kept
    only for a run that may be resumed, and never taken from under another run."""
    made = False
    if input is not None:
        output = config.output if isinstance(config, RunConfig) else config.get("output")
        if output is not None:
            made = not _frame_path(Path(output)).exists()
    resolved = _config(config, input)
    try:
        yield resolved
    except UsageError as exc:
        if made and not isinstance(exc, OutputLocked):
            with contextlib.suppress(OSError):
                Path(resolved.input).unlink()
        raise


def run(config: RunConfig | Mapping[str, Any], *, input: pd.DataFrame | None = None,
        **kwargs: Any) -> Any:
    """`engine.run`, taking a DataFrame as the input and a mapping of options as the config.

    >>> report = batchrunner.run({"output": "out/r.parquet", "model": "gpt-4o", "local": True},
    ...                          input=df)
    """
    from batchrunner.engine import runner as engine

    with _frame_input(config, input) as resolved:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return engine.run(resolved, **kwargs)
        # Called where an event loop is already running (a Jupyter cell): asyncio.run cannot
        # be nested, so the run gets its own loop in a thread; Ctrl-C is the kernel's then.
        kwargs["handle_signals"] = False
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrunner") as pool:
            return pool.submit(engine.run, resolved, **kwargs).result()


async def arun(config: RunConfig | Mapping[str, Any], *, input: pd.DataFrame | None = None,
               **kwargs: Any) -> Any:
    """`engine.arun`, with `run`'s DataFrame input and mapping config."""
    from batchrunner.engine import runner as engine

    with _frame_input(config, input) as resolved:
        return await engine.arun(resolved, **kwargs)
