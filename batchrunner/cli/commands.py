"""The commands of `batchrunner`, each registered on the `main` group of `batchrunner.cli.group`.

Each command parses its options, builds one config, calls the library and renders; the group maps
errors to exit codes. `batchrunner.cli.commands:main` is the console script. Every command body
is short: the work is in the library.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from batchrunner.cli.group import (
    _PATH_OR_URI,
    _config,
    _configure_logging,
    _crash_folder,
    _error_format,
    _writing,
    job_options,
    main,
)
from batchrunner.errors import BatchrunnerError, StorageError, UsageError

# -- commands -------------------------------------------------------------------------------


@main.command()
@job_options("run")
def run(job: Path | None, **kwargs: Any) -> None:
    """Send every row of the input and write the results to Parquet.

    \b
    Examples:
      batchrunner run -i sample_data/prompts.jsonl -o out/results.parquet -m gpt-4o-mini --local
      batchrunner run jobs/nightly-eval.toml
      batchrunner run jobs/nightly-eval.toml --limit 10 -o out/smoke.parquet
      batchrunner run jobs/nightly-eval.toml --engine ray --api-key-env KEY_A,KEY_B
      batchrunner run jobs/nightly-eval.toml --engine batch
      batchrunner run jobs/nightly-eval.toml --endpoint https://gw-a.example/v1 \\
          --api-key-env KEY_A --endpoint https://gw-b.example/v1 --api-key-env KEY_B
      RU_LLM_API_KEY=sk-ru-... batchrunner run -i qs.parquet -o out/qs.parquet -m gpt-4o \\
          --template 'Answer briefly: {question}' --temperature 0 --rpm 600 --max-cost 5

    Running the same command again resumes: only rows with no result are sent.
    --max-cost is the spending on the output across all its runs.
    Exit codes: 0 all ok, 1 some rows failed, 2 usage/input error (an unknown model
    too), 3 every answered row failed the same way, or the gateway is unreachable
    or down (resumable: the rows with no answer stay pending), 4 key refused,
    5 stopped by --max-cost/--deadline, 130/143 interrupted, 70 internal error (a bug:
    the traceback is in crash.log in the checkpoint folder), 74 checkpoint or output
    could not be written (disk full, read-only, I/O error).
    """
    from batchrunner.cli.progress import ProgressDisplay
    from batchrunner.engine import runner as engine
    from batchrunner.engine.ending import write_summary_json
    from batchrunner.store.checkpoint import use_system_allocator

    _configure_logging()  # warnings about the options themselves (a --param typo)
    _error_format["json"] = kwargs.get("log_format") == "json"
    config = _config(job, kwargs)
    from batchrunner.config.settings import resolved_key_names

    _crash_folder(config.output, ",".join(n for n in resolved_key_names(config) if n))
    _configure_logging(quiet=config.quiet, log_format=config.log_format)
    use_system_allocator()
    with ProgressDisplay(config) as display:
        try:
            report = engine.run(config, on_result=display.update, on_start=display.start)
        except BatchrunnerError as exc:
            if config.summary_json is not None:
                data: dict[str, Any] = {"exit_code": exc.exit_code, "error": str(exc)}
                if isinstance(exc, StorageError):
                    data["storage_fault"] = {"path": exc.path, "cause": exc.cause}
                with contextlib.suppress(OSError):  # on the same full disk: the error says it
                    write_summary_json(config.summary_json, data)
            raise
    display.final_summary(report)
    sys.exit(report.exit_code)


@main.command()
@click.argument("output", type=_PATH_OR_URI)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def status(output: Path | str, fmt: str) -> None:
    """Rows done, failed and pending, tokens and cost so far, for OUTPUT.

    Works while a run is going on, after an interruption and after the end.

    \b
    Examples:
      batchrunner status out/results.parquet
      batchrunner status out/results.parquet --format json
    """
    from batchrunner.cli.progress import plural
    from batchrunner.inputs.storage import local_view
    from batchrunner.store.batches import read_ledger
    from batchrunner.store.checkpoint import read_status
    from batchrunner.store.failures import render_errors
    from batchrunner.store.layout import checkpoint_dir

    _crash_folder(output)
    state = read_status(local_view(output))
    batches = read_ledger(checkpoint_dir(Path(state.output)))
    if fmt == "json":
        data = {k: getattr(state, k) for k in state.__dataclass_fields__}
        data.update(output=str(state.output), pending=state.pending,
                    errors=[e.to_dict() for e in state.errors])
        if batches:
            data["batches"] = [dataclasses.asdict(entry) for entry in batches]
        click.echo(json.dumps(data, indent=2))
        return
    phase = "running" if state.live else ("finished" if state.finished else "stopped")
    if phase == "stopped" and state.storage_fault is not None:
        phase = f"stopped on a storage fault: {state.storage_fault['message']}"
    click.echo(
        f"{state.output}: {phase}\n"
        f"  rows     {state.rows:>12,}\n"
        f"  done     {state.done:>12,}   ok {state.ok:,}, failed {state.failed:,}\n"
        f"  pending  {state.pending:>12,}\n"
        f"  tokens   {state.total_tokens:>12,}   prompt {state.prompt_tokens:,}, "
        f"cached {state.cached_tokens:,}, completion {state.completion_tokens:,}\n"
        f"  cost     {'$' + format(state.cost_usd, ',.4f'):>12}"
        + (f"   ({plural(state.unpriced_rows, 'row')} of unpriced models)"
           if state.unpriced_rows else "")
        + (f"\n  reused   {'$' + format(state.reused_cost_usd, ',.4f'):>12}   "
           f"{state.cache_hits:,} rows from the response cache, not paid again"
           if state.cache_hits else "")
    )
    if state.reasoning_tokens:
        click.echo(f"  reasoning {state.reasoning_tokens:>11,}   of the completion tokens "
                   "(counted in them)")
    if state.reasoning_cut_rows:
        from batchrunner.reports.render import reasoning_cut_advice

        click.echo(f"  {reasoning_cut_advice(state.reasoning_cut_rows)}")
    if state.errors:
        click.echo("  most frequent errors (rows, error):")
        click.echo("\n".join(render_errors(state.errors, indent="    ")))
    if batches:
        click.echo("  batches (--engine batch; state in this output, last status seen):")
        for entry in batches:
            counts = entry.counts
            done = counts.get("completed", 0) + counts.get("failed", 0)
            click.echo(f"    {entry.batch_id or '-':<34} {entry.state:<10} "
                       f"{entry.status or '-':<11} {done:,}/{entry.rows:,} requests, "
                       f"{counts.get('failed', 0):,} failed")


@main.command()
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base-url", help="The gateway [the one the run used, from its checkpoint].")
@click.option("--api-key-env", metavar="NAME", help="Variable holding the key.")
def cancel(output: Path, base_url: str | None, api_key_env: str | None) -> None:
    """Cancel OUTPUT's pending Batch API batches (--engine batch).

    What they finished is kept: running the same `run` command again collects it and sends
    the rows they never answered in a new batch (do not run it if you want none sent).

    \b
    Examples:
      batchrunner cancel out/nightly.parquet
    """
    from batchrunner.engine.batch.cancel import cancel_batches

    _crash_folder(output, api_key_env)
    cancelled = asyncio.run(cancel_batches(output, base_url=base_url, api_key_env=api_key_env))
    if not cancelled:
        click.echo(f"{output}: no pending batch")
        return
    for batch in cancelled:
        click.echo(f"{batch['batch_id']}: {batch['status']}, {batch['completed']:,} of "
                   f"{batch['total']:,} requests answered before the cancel (kept)")
    click.echo("run the same command again to collect what they finished")


@main.command()
@click.argument("results", nargs=-1, required=True)
@click.option("--prices", type=click.Path(dir_okay=False, path_type=Path),
              help="Recompute cost with this TOML price table.")
@click.option("--by", default="model", show_default=True, help="Group by this column.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw cost and tokens per model (and per day) to this PNG.")
def summary(results: tuple[str, ...], prices: Path | None, by: str, fmt: str,
            plot: Path | None) -> None:
    """Usage and cost of one or many result files (globs too).

    \b
    Examples:
      batchrunner summary out/results.parquet
      batchrunner summary 'out/nightly-*.parquet' --by topic --format csv
      batchrunner summary out/*.parquet --prices my-prices.toml --plot cost.png
    """
    from batchrunner import reports
    from batchrunner.config.pricing import PriceTable

    _configure_logging()
    table = PriceTable.load(prices) if prices else None
    report = reports.summarize(list(results), by=by, prices=table)
    render = {"table": reports.render_table, "json": reports.to_json, "csv": reports.to_csv}[fmt]
    with _writing(None):
        click.echo(_with_scores(render(report), list(results), by, fmt))
    if plot is not None:
        with _writing(plot):
            reports.plot_summary(list(results), plot, by=by, prices=table)
        click.echo(f"plot written to {plot}", err=True)


def _with_scores(text: str, results: list[str], by: str, fmt: str) -> str:
    """A summary with the score section (docs/evaluations.md) where the results have scores."""
    from batchrunner.reports.compare import render_groups, score_summary

    scores = score_summary(results, by=by)
    if scores is None:
        return text
    if fmt == "json":
        data = json.loads(text)
        data["scores"] = [g.to_dict() for g in scores.groups]
        return json.dumps(data, indent=2, allow_nan=False)
    table = "\n".join(render_groups(scores))
    if fmt == "csv":  # one table a stream: stdout stays one CSV that pandas.read_csv reads
        click.echo(f"scores (not in the CSV; --format json holds both):\n{table}", err=True)
        return text
    return text + "\n\nscores\n" + table


@main.command()
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--metric", required=True, metavar="M",
              help="exact, normalized, contains, regex:PATTERN, numeric[:TOL], choice, "
                   "json:FIELD, f1, python:MODULE:FUNCTION (or python:file.py:FUNCTION).")
@click.option("--reference-column", required=True, metavar="COL",
              help="The column holding the reference answers.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the scored results here [default: RESULTS, replaced atomically].")
def score(results: Path, metric: str, reference_column: str, output: Path | None) -> None:
    """Score (or re-score) finished results against references; sends nothing.

    \b
    Examples:
      batchrunner score out/nightly-eval-2026-12-01.parquet --metric choice --reference-column reference
      batchrunner score out/arith.parquet --metric numeric:0.001 --reference-column reference \\
          -o out/arith-scored.parquet
      batchrunner score out/qa.parquet --metric python:my_metrics.py:judge --reference-column gold
    """
    from batchrunner.store.scored import score_results

    _configure_logging()
    with _writing(output or results):
        done = score_results(results, metric, reference_column, output=output)
    mean = "-" if done["mean"] is None else f"{done['mean']:.4f}"
    click.echo(f"{done['output']}: {done['scored']:,} of {done['rows']:,} rows scored "
               f"with {done['metric']}, mean {mean}")


@main.command("compare")
@click.argument("results", nargs=-1, required=True)
@click.option("--by", default="model", show_default=True,
              help="Group by this column, or 'file' for one group per file.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
def compare_command(results: tuple[str, ...], by: str, fmt: str) -> None:
    """Compare models (or files, or any column) on the same scored rows, paired by id.

    \b
    Examples:
      batchrunner compare out/nightly-eval-2026-12-01.parquet
      batchrunner compare out/eval-t0.parquet out/eval-t1.parquet --by file --format json
      batchrunner compare 'out/nightly-*.parquet' --by model --format csv
    """
    from batchrunner.reports.compare import compare, render_table, to_csv, to_json

    report = compare(list(results), by=by)
    render = {"table": render_table, "json": to_json, "csv": to_csv}[fmt]
    click.echo(render(report))


@main.command()
@job_options("estimate")
@click.option("--calibrate", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Finished result files whose real token counts tighten the estimate.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def estimate(job: Path | None, calibrate: tuple[Path, ...], fmt: str, **kwargs: Any) -> None:
    """Estimate rows, tokens and cost of a job before running it; sends nothing.

    \b
    Examples:
      batchrunner estimate jobs/nightly-eval.toml
      batchrunner estimate -i sample_data/prompts.jsonl -o out/x.parquet -m gpt-4o --max-tokens 200
      batchrunner estimate jobs/nightly-eval.toml --calibrate out/nightly-eval-2026-12-01.parquet
    """
    from batchrunner import reports
    from batchrunner.config.pricing import PriceTable

    _configure_logging()
    if kwargs.get("output_") is None and kwargs.get("output") is None:
        kwargs["output"] = Path("estimate.parquet")  # estimate writes nothing; output is moot
    config = _config(job, kwargs)
    result = reports.estimate(config, prices=PriceTable.load(config.prices), calibrate=calibrate)
    click.echo(reports.estimate_to_json(result) if fmt == "json" else reports.render_estimate(result))


@main.command()
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "batch-api"]),
              help="jsonl, csv, or the OpenAI Batch API's output lines [from -o's extension].")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write to this file (replaced atomically) [stdout].")
@click.option("--flatten", is_flag=True,
              help="Make `parsed` (a --json-schema run's answers) a column per top-level field.")
@click.option("--json-schema", type=click.Path(dir_okay=False, path_type=Path),
              help="The schema --flatten follows [the one the results record].")
def export(results: Path, fmt: str | None, output: Path | None, flatten: bool,
           json_schema: Path | None) -> None:
    """Write a Parquet results file as JSONL, CSV or OpenAI Batch API output lines.

    \b
    Examples:
      batchrunner export out/results.parquet --format csv > results.csv
      batchrunner export out/results.parquet -o out/results.jsonl
      batchrunner export out/results.parquet --format batch-api -o out/batch_output.jsonl
      batchrunner export out/entities.parquet --flatten --format csv -o out/entities.csv
    """
    from batchrunner.store.export import export_results

    if fmt is None:
        suffix = output.suffix.lower() if output is not None else ""
        fmt = {".jsonl": "jsonl", ".csv": "csv"}.get(suffix)
        if fmt is None:
            raise UsageError("give --format jsonl, csv or batch-api")
    with _writing(output):
        rows = export_results(results, fmt, output, flatten=flatten, json_schema=json_schema)
    if output is not None:
        click.echo(f"{rows:,} rows written to {output}", err=True)


@main.command()
@click.option("--base-url", help="Gateway base URL [RU_LLM_BASE_URL, OPENAI_BASE_URL].")
@click.option("--api-key-env", metavar="NAME", help="Variable holding the key.")
@click.option("--local", is_flag=True, help="Ask the built-in gateway simulator.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def models(base_url: str | None, api_key_env: str | None, local: bool, fmt: str) -> None:
    """The models the gateway lists.

    \b
    Examples:
      batchrunner models
      batchrunner models --local --format json
    """
    from batchrunner.engine.runner import list_models

    data = asyncio.run(list_models(base_url=base_url, api_key_env=api_key_env, local=local))
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    for model in data:
        click.echo(f"{model.get('id', '?'):<40} {model.get('owned_by', '')}")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base-url", help="Check the models against this gateway [the job's].")
@click.option("--local", is_flag=True, default=None,
              help="Check the models against the built-in gateway simulator.")
def validate(job: Path, base_url: str | None, local: bool | None) -> None:
    """Dry-run a job file: check everything a run would, and estimate it; send nothing.

    The job and its paths, the JSON schema (compiled, $refs resolved), the models (against
    the gateway's GET /models where it answers), every input row (rows a run could not send
    are counted, the first few shown) and the estimate. No chat completion is requested.
    Exit 0 when the run would send every row, 2 otherwise.

    \b
    Examples:
      batchrunner validate jobs/nightly-eval.toml
      batchrunner validate jobs/nightly-eval.toml --local
    """
    from batchrunner import reports
    from batchrunner.cli.progress import plural
    from batchrunner.config.jobs import build_config, load_job
    from batchrunner.reports.validation import validate_job

    _configure_logging()
    overrides = {k: v for k, v in {"base_url": base_url, "local": local}.items() if v}
    config = build_config(load_job(job), overrides)
    check = validate_job(config)
    info = check.info
    click.echo(f"{job}: {plural(info.rows, 'row')} from {config.input} ({info.format}), "
               f"results to {config.output}")
    if config.json_schema is not None:
        where = config.json_schema if isinstance(config.json_schema, Path) else "inline"
        click.echo(f"  schema: {where}: compiled, every $ref resolved")
    if info.rows == 0:
        click.echo("  the input has no rows: a run writes an empty output and exits 0")
    models = ", ".join(check.models) or "none named"
    if check.models_note is None:
        click.echo(f"  models: {models}: listed by the gateway")
    else:
        click.echo(f"  models: {models}: not checked: {check.models_note}")
    click.echo(reports.render_estimate(check.estimate))
    if check.problem_rows:
        click.echo(f"  problem rows: {check.problem_rows:,} (a run records them as errors, "
                   "unsent), the first:")
        click.echo("\n".join(f"    {problem}" for problem in check.problems))
        raise UsageError(f"{job}: {plural(check.problem_rows, 'input row')} of "
                         f"{info.rows:,} cannot be sent; a run would exit 1: fix them first")
    click.echo(f"{job}: ok: nothing was sent")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace sample files that were changed.")
def samples(folder: Path, force: bool) -> None:
    """Write sample prompts, an evaluation set and job files into FOLDER.

    The job files run against the gateway simulator built into batchrunner: no key, no
    network. A file already in FOLDER with other content is not replaced without --force.

    \b
    Examples:
      batchrunner samples demo && cd demo && batchrunner run job.toml
      batchrunner summary out/quickstart.parquet
      batchrunner run eval.toml && batchrunner compare out/eval.parquet
    """
    from batchrunner.samples import write_samples

    for path in write_samples(folder, force=force):
        click.echo(path)
    click.echo(f"next: cd {shlex.quote(str(folder))} && batchrunner run job.toml "
               f"(README.md there says what else to try)", err=True)


@main.group()
def cache() -> None:
    """The response cache (never pay twice for one request): stats, prune, clear.

    \b
    Examples:
      batchrunner cache stats
      batchrunner cache prune --older-than 30d
      batchrunner cache clear --path ~/.cache/batchrunner/responses.sqlite
    """


_cache_path = click.option(
    "--path", type=click.Path(dir_okay=False, path_type=Path),
    help="The cache file [$BATCHRUNNER_CACHE, else ~/.cache/batchrunner/responses.sqlite].",
)


@cache.command("stats")
@_cache_path
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def cache_stats(path: Path | None, fmt: str) -> None:
    """Entries, size, hits by model and cost saved."""
    from batchrunner.cache.responses import cache_stats as read_stats

    stats = read_stats(path)
    if fmt == "json":
        click.echo(json.dumps(stats.to_dict(), indent=2))
        return
    lines = [f"{stats.path}", f"  entries     {stats.entries:>12,}",
             f"  size        {stats.size_bytes / 1e6:>10,.1f} MB",
             f"  hits        {sum(stats.hits_by_model.values()):>12,}",
             f"  cost saved  {'$' + format(stats.cost_saved_usd, ',.4f'):>12}"]
    lines += [f"    {model or '(no model)':<30} {n:>10,} hits"
              for model, n in stats.hits_by_model.items()]
    click.echo("\n".join(lines))


@cache.command("prune")
@_cache_path
@click.option("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 90m.")
def cache_prune(path: Path | None, older_than: str) -> None:
    """Remove the answers stored longer ago than AGE."""
    from batchrunner.cache.responses import prune_cache

    removed = prune_cache(path, older_than)
    click.echo(f"removed {removed:,} answers stored more than {older_than} ago")


@cache.command("clear")
@_cache_path
def cache_clear(path: Path | None) -> None:
    """Remove every stored answer."""
    from batchrunner.cache.responses import clear_cache

    removed = clear_cache(path)
    click.echo(f"removed {removed:,} answers")


_FRACTION = click.FloatRange(0.0, 1.0)
_NOT_NEGATIVE = click.FloatRange(min=0.0)
_PORT = click.IntRange(0, 65535)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=_PORT, help="0: any free port.")
@click.option("--key", "keys", multiple=True, help="Accept only this key (repeatable).")
@click.option("--latency-ms", type=_NOT_NEGATIVE, default=0.0, help="Added latency, mean.")
@click.option("--jitter-ms", type=_NOT_NEGATIVE, default=0.0, help="Added latency, jitter.")
@click.option("--error-rate", type=_FRACTION, default=0.0, help="Fraction answered 500/503.")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute before 429s.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute before 429s.")
@click.option("--drop-rate", type=_FRACTION, default=0.0, help="Fraction of connections dropped.")
@click.option("--rate-window", "rate_window_s", type=click.FloatRange(min=0.0, min_open=True),
              default=60.0, show_default=True,
              help="Seconds of the --rpm/--tpm window (shorter for quick tests).")
@click.option("--invalid-json-rate", type=_FRACTION, default=0.0,
              help="Fraction of json_schema answers made invalid (not JSON, a field missing).")
@click.option("--fault-seed", type=int, help="Seed for reproducible faults.")
@click.option("--cache-min-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Shortest prompt prefix reported as cached.")
@click.option("--batch-seconds", type=_NOT_NEGATIVE, default=2.0, show_default=True,
              help="Seconds a Batch API batch takes to finish (about).")
@click.option("--batch-expire-after", type=click.IntRange(min=0), metavar="N",
              help="Every batch expires once N of its lines are done (they are kept).")
@click.option("--prompt-cache-ttl", type=_NOT_NEGATIVE, default=300.0, show_default=True,
              metavar="S", help="Seconds a cached prompt prefix stays without use.")
def gateway(**kwargs: Any) -> None:
    """Serve the gateway simulator: the ru-llm API on loopback, for tests and demos.

    \b
    Examples:
      batchrunner gateway --port 8000
      batchrunner gateway --latency-ms 50 --jitter-ms 10 --error-rate 0.02 --rpm 600
      OPENAI_BASE_URL=http://127.0.0.1:8000/v1 RU_LLM_API_KEY=sk-ru-test batchrunner models
    """
    from batchrunner.simulator import CannotListen, GatewayConfig, serve

    kwargs["keys"] = tuple(kwargs["keys"])
    try:
        serve(GatewayConfig(**kwargs))
    except CannotListen as exc:  # a port in use, an address not of this machine: usage
        raise UsageError(str(exc)) from None


@main.command()
@click.argument("results", nargs=-1, required=True)
@click.option("--port", default=8765, show_default=True, type=int, help="0: any free port.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback is guarded by the token.")
@click.option("--token", help="Access token for every request [random, in the printed URL].")
@click.option("--no-browser", is_flag=True, help="Only print the URL.")
def view(results: tuple[str, ...], port: int, host: str, token: str | None,
         no_browser: bool) -> None:
    """A local web page to browse, filter and compare results (Ctrl-C stops it).

    Reads finished Parquet results, or the checkpoint of a run still going (refreshed
    every few seconds). Several files (globs too) are shown together: a sweep's models side
    by side on the same id.

    \b
    Examples:
      batchrunner view out/nightly-eval.parquet
      batchrunner view out/eval-gpt-4o.parquet out/eval-gpt-4o-mini.parquet --port 9000
      batchrunner view 'out/nightly-*.parquet' --no-browser
      batchrunner view out/big.parquet --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    from batchrunner.store.checkpoint import use_system_allocator
    from batchrunner.viewer import ViewerConfig, return_freed_memory, serve

    _configure_logging()
    use_system_allocator()  # decoded row groups go back to the system once a page is drawn
    return_freed_memory()
    config = ViewerConfig(paths=results, host=host, port=port, token=token,
                          open_browser=not no_browser)

    def ready(url: str) -> None:
        click.echo(f"batchrunner view: serving {len(results)} result path(s) at {url}")
        click.echo("Ctrl-C stops it.", err=True)

    try:
        serve(config, on_ready=ready)
    except KeyboardInterrupt:
        click.echo("batchrunner view: stopped", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
