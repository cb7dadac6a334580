"""The pre-run estimate: rows, tokens and cost of a run from its input alone, and calibration.

    >>> est = estimate(config, prices=PriceTable.load(), calibrate=["out/last.parquet"])

Nothing is sent. Calibration measures tokens per character, completion length and cache hits
on the ok rows of finished result files, and narrows the ranges to prediction intervals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchrunner.config.pricing import PRICES_AS_OF, PriceTable
from batchrunner.config.settings import RunConfig
from batchrunner.inputs.requests import CHARS_PER_TOKEN, MESSAGE_TOKENS, REPLY_TOKENS
from batchrunner.reports.calibration import (
    CALIBRATION_MAX_ROWS,
    Calibration,
    text_length,
)
from batchrunner.reports.calibration import calibrate as measure
from batchrunner.reports.summary import _json_value

__all__ = [
    "CALIBRATED_MIN_MARGIN",
    "CALIBRATION_MAX_ROWS",
    "Calibration",
    "Estimate",
    "ModelEstimate",
    "Range",
    "SPREAD_SIGMAS",
    "estimate",
]


#: The prompt-token rule of an estimate is requests.py's (CHARS_PER_TOKEN, MESSAGE_TOKENS,
#: REPLY_TOKENS); its range allows 6 (plain English prose) to 2 (code, Cyrillic) characters a
#: token. CJK text can fall outside it: calibrate.
CHARS_PER_TOKEN_LOW, CHARS_PER_TOKEN_HIGH = 6.0, 2.0
#: A calibrated range is the expected figure +- this many standard deviations of a total of
#: that many rows, given how the calibration rows varied (a prediction interval that assumes
#: the calibration run is representative of the job: same kind of prompts and answers).
SPREAD_SIGMAS = 3.0
#: ...but never narrower than this share of the expected figure either way: another job's
#: prompts and answers differ from the calibration run's by more than sampling noise (other
#: words, other tokens per character), which the rows' own spread cannot show.
CALIBRATED_MIN_MARGIN = 0.10


@dataclass(frozen=True, slots=True)
class Range:
    """An estimated figure: `low` <= `expected` <= `high`.

    `expected` is None when nothing says where in the range the figure lies (completion
    length before any calibration); `high` is None when there is no upper bound (rows with no
    `max_tokens` and no calibration).
    """

    low: float
    expected: float | None
    high: float | None

    def __add__(self, other: Range) -> Range:
        return Range(
            self.low + other.low,
            None if self.expected is None or other.expected is None
            else self.expected + other.expected,
            None if self.high is None or other.high is None else self.high + other.high,
        )


_ZERO = Range(0, 0, 0)


@dataclass(frozen=True, slots=True)
class ModelEstimate:
    """The estimate for the rows of one model; `cost_usd` is None for a model with no price."""

    model: str | None
    rows: int
    prompt_tokens: Range
    completion_tokens: Range
    cost_usd: Range | None
    batch_cost_usd: Range | None = None  # at the Batch API's prices (--engine batch)
    # --order prefix: prompt tokens a gateway's prompt cache is expected to serve, and what
    # that saves against paying them in full (None for a model with no price)
    cached_tokens: int = 0
    cache_saving_usd: float | None = None
    cache_saving_batch_usd: float | None = None


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a run would send and cost, computed from the input alone (nothing is sent).

    Token and cost figures cover the rows that would be sent (not input errors). `cost_usd` is
    None when some of those rows ask for a model with no price (`unpriced_rows`); then
    `cost_usd_known` is the estimate for the priced rows alone. Costs assume no cache hits,
    except that a calibrated estimate applies the calibration run's share of cached prompt
    tokens to its low and expected figures.
    """

    input: str
    rows: int
    rows_to_send: int
    input_errors: int
    chars: int
    messages: int
    unbounded_rows: int  # rows with no max_tokens: no upper bound on their completions
    prompt_tokens: Range
    completion_tokens: Range
    cost_usd: Range | None
    cost_usd_known: Range
    unpriced_rows: int
    models: tuple[ModelEstimate, ...]
    calibration: Calibration | None = None
    prices_as_of: str = PRICES_AS_OF
    prices_file: str | None = None
    done_rows: int = 0  # rows the output's checkpoint already has a result for: not sent
    checkpoint: str | None = None  # the output whose checkpoint was read, if any
    checkpoint_note: str | None = None  # why a checkpoint was not used
    cached_rows: int = 0  # with --cache: rows the response cache holds (not sent, no cost)
    # the same rows through the Batch API (--engine batch): None as cost_usd is
    batch_cost_usd: Range | None = None
    batch_cost_usd_known: Range = Range(0, 0, 0)
    engine: str = "local"  # the job's engine: which of the two costs it will pay
    # The prompt cache with --order prefix (inputs/prefixes.py): a group's first request pays
    # in full, the others their prefix shared with an earlier one, in steps of 128 tokens, at
    # the estimate's expected tokens. `cache_saving_usd` is against no caching, at online
    # prices (`cache_saving_batch_usd` at batch prices); None where a model has no price.
    order: str = "prefix"
    prefix_cached_tokens: int = 0
    prefix_cached_share: float | None = None  # of the expected prompt tokens
    cache_saving_usd: float | None = None
    cache_saving_batch_usd: float | None = None

    @property
    def unpriced_models(self) -> tuple[str | None, ...]:
        """The models of rows that have no price."""
        return tuple(m.model for m in self.models if m.cost_usd is None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the figures of `render_estimate`, costs at full precision."""
        data = asdict(self)
        data["unpriced_models"] = list(self.unpriced_models)
        data["rule"] = _RULE
        return _plain_tree(data)


_RULE = (
    f"prompt tokens = characters of the message contents / {CHARS_PER_TOKEN:g} "
    f"(range / {CHARS_PER_TOKEN_LOW:g} .. / {CHARS_PER_TOKEN_HIGH:g}) + {MESSAGE_TOKENS} per "
    f"message + {REPLY_TOKENS} per request; completion tokens 1 per choice .. max_tokens; "
    f"calibrated: measured tokens per character and completion length, +-{SPREAD_SIGMAS:g} "
    f"sigma and at least +-{CALIBRATED_MIN_MARGIN:.0%}"
)


class _ModelTally:
    """Running sums of the rows of one model while the input is read."""

    __slots__ = ("rows", "chars", "messages", "choices", "cap", "unbounded", "cached")

    def __init__(self) -> None:
        self.rows = self.chars = self.messages = self.choices = self.cap = self.unbounded = 0
        self.cached = 0  # prompt tokens the prompt cache would serve (--order prefix)


def estimate(
    config: RunConfig,
    *,
    prices: PriceTable,
    calibrate: Sequence[str | Path] = (),
) -> Estimate:
    """Rows, prompt and completion tokens, and cost of the run `config` describes, as ranges.

    Reads the input as the run would (checking it the same way: an unusable input is an
    InputError) and builds every request, sending nothing. Prompt tokens follow the rule of
    `CHARS_PER_TOKEN`; completions range from 1 token per choice to `max_tokens` per choice.
    With `calibrate` (finished result files of this job or a similar one), tokens per character,
    completion length and cache hits are measured on their ok rows, and the ranges become
    prediction intervals around the measured figures (`SPREAD_SIGMAS`, at least
    `CALIBRATED_MIN_MARGIN`), capped by `max_tokens`.

    >>> est = estimate(config, prices=PriceTable.load(), calibrate=[Path("out/last.parquet")])
    >>> print(render_estimate(est))
    """
    from batchrunner.engine.sweep import sweep_config
    from batchrunner.inputs.prefixes import PrefixCache
    from batchrunner.inputs.requests import RequestBuilder
    from batchrunner.inputs.scan import scan_input

    config = sweep_config(config)
    info = scan_input(config)
    builder = RequestBuilder(config, info.columns)
    tallies: dict[str | None, _ModelTally] = {}
    rows = input_errors = cached_rows = 0
    done, checkpoint_note = _checkpointed(config)
    prompt_cache = PrefixCache()
    for body, cached in _cache_marked(config, _bodies_to_send(config, builder, done)):
        rows += 1
        if body is None:
            input_errors += 1
            continue
        if cached:
            cached_rows += 1
            continue
        model = body.get("model")
        tally = tallies.get(model)
        if tally is None:
            tally = tallies[model] = _ModelTally()
        tally.rows += 1
        for message in body["messages"]:
            tally.chars += text_length(message.get("content"))
            tally.messages += 1
        n = body.get("n") or 1
        tally.choices += n
        tally.cached += prompt_cache.cached_tokens(body)
        bound = body.get("max_completion_tokens") or body.get("max_tokens")
        if bound is None:
            tally.unbounded += 1
        else:
            tally.cap += int(bound) * n

    calibration = measure(config, calibrate) if calibrate else None
    models = tuple(
        _model_estimate(model, t, prices, calibration)
        for model, t in sorted(tallies.items(), key=lambda kv: (kv[0] is None, str(kv[0])))
    )
    def total(name: str) -> Range:
        return sum((getattr(m, name) for m in models), _ZERO)

    priced = [m.cost_usd for m in models if m.cost_usd is not None]
    unpriced_rows = sum(m.rows for m in models if m.cost_usd is None)
    known = sum(priced, _ZERO)
    batch_known = sum((m.batch_cost_usd for m in models if m.batch_cost_usd is not None), _ZERO)
    prompt_expected = sum(
        m.prompt_tokens.expected or 0 for m in models  # always set: the rule's figure
    )
    prefix_cached = sum(m.cached_tokens for m in models)
    savings = [m.cache_saving_usd for m in models]
    batch_savings = [m.cache_saving_batch_usd for m in models]
    done_rows = 0
    if done is not None:  # output rows: in a sweep, an input row's for each of its models
        from batchrunner.engine.sweep import Sweep

        output_rows = (Sweep.plan(config, info.columns, info.rows).total
                       if len(config.models) > 1 else info.rows)
        done_rows = max(0, output_rows - rows)
    return Estimate(
        input=str(config.input),
        rows=rows + done_rows,
        rows_to_send=rows - input_errors - cached_rows,
        input_errors=input_errors,
        chars=sum(t.chars for t in tallies.values()),
        messages=sum(t.messages for t in tallies.values()),
        unbounded_rows=sum(t.unbounded for t in tallies.values()),
        prompt_tokens=total("prompt_tokens"),
        completion_tokens=total("completion_tokens"),
        cost_usd=None if unpriced_rows else known,
        cost_usd_known=known,
        unpriced_rows=unpriced_rows,
        models=models,
        calibration=calibration,
        prices_file=None if prices.source is None else str(prices.source),
        done_rows=done_rows,
        checkpoint=None if done is None else str(config.output),
        checkpoint_note=checkpoint_note,
        cached_rows=cached_rows,
        batch_cost_usd=None if unpriced_rows else batch_known,
        batch_cost_usd_known=batch_known,
        engine=config.engine,
        order=config.order,
        prefix_cached_tokens=prefix_cached,
        prefix_cached_share=prefix_cached / prompt_expected if prompt_expected else None,
        cache_saving_usd=None if None in savings else float(sum(savings)),  # type: ignore[arg-type]
        cache_saving_batch_usd=(
            None if None in batch_savings else float(sum(batch_savings))  # type: ignore[arg-type]
        ),
    )


def _bodies_to_send(
    config: RunConfig, builder: Any, done: Any
) -> Iterator[dict[str, Any] | None]:
    """The body of every output row `run` would still send (None for an input error).

    One per input row, or in a sweep one per input row and model; rows the checkpoint
    (`done`, a DoneSet or None) already has are left out, as `run` leaves them.
    """
    from batchrunner.engine.sweep import slot_bodies
    from batchrunner.inputs.formats import detect_format
    from batchrunner.inputs.readers import iter_records

    if done is None or not len(done):
        yield from slot_bodies(config, builder)
        return
    sweep = config.models if len(config.models) > 1 else ()
    if sweep:  # a sweep's checkpoint is keyed by output row: count them one by one
        slot = 0
        for index, record, error in iter_records(config, builder.columns):
            row = builder.build(index, record, error)
            own = record is not None and record.get("model") not in (None, "")
            for model in (None,) if own else sweep:
                if not done.contains(slot, row.id):
                    yield row.body if model is None or row.body is None else {
                        **row.body, "model": model
                    }
                slot += 1
        return
    one_by_one = detect_format(config.input) == "jsonl"  # Parquet and CSV skip in bulk
    for index, record, error in iter_records(config, builder.columns, skip=done.mask):
        row = builder.build(index, record, error)
        if one_by_one and done.contains(index, row.id):
            continue  # already has a result: `run` would not send it
        yield row.body


def _checkpointed(config: RunConfig) -> tuple[Any, str | None]:
    """The rows of `config.output` that have a checkpointed result (a DoneSet), if the
    checkpoint is one `run` would resume; else None and, for a checkpoint it would refuse,
    why."""
    from batchrunner.inputs.scan import fingerprint_input
    from batchrunner.store.checkpoint import read_done
    from batchrunner.store.manifest import describe_changes

    found = read_done(Path(config.output))
    if found is None:
        return None, None
    done, fingerprint = found
    now = {"input": fingerprint_input(config.input), "settings": config.request_settings()}
    changes = describe_changes(fingerprint, now)
    if changes and fingerprint.get("settings") == now["settings"]:
        return None, (
            f"the input changed since the checkpoint of {config.output} was made: run will "
            "keep the results of unchanged rows; this estimate is for every row (at most)"
        )
    if changes:
        return None, (
            f"the checkpoint of {config.output} was made with other settings "
            f"({'; '.join(changes)}): run would refuse it without --restart, so this estimate "
            "is for every row"
        )
    return done, None


def _cache_marked(
    config: RunConfig, bodies: Iterable[dict[str, Any] | None]
) -> Iterable[tuple[dict[str, Any] | None, bool]]:
    """Each body, with True where the response cache (`config.cache`) holds its answer."""
    from batchrunner.cache.responses import ResponseCache, cache_key, default_cache_path
    from batchrunner.cache.session import LOOKUP_ROWS
    from batchrunner.config.settings import resolve_base_url

    path = None
    if config.cache is not None and config.cache is not False:
        path = default_cache_path() if config.cache is True else Path(config.cache)
    if path is None or not path.exists() or config.cache_mode in ("write-only", "refresh"):
        for body in bodies:
            yield body, False
        return
    url = "batchrunner:local" if config.local else resolve_base_url(config.base_url)
    with ResponseCache.open(path) as cache:
        chunk: list[dict[str, Any] | None] = []
        for body in bodies:
            chunk.append(body)
            if len(chunk) >= LOOKUP_ROWS:
                yield from _marked_chunk(cache, chunk, url, cache_key)
                chunk = []
        yield from _marked_chunk(cache, chunk, url, cache_key)


def _marked_chunk(cache: Any, chunk: list[Any], url: str, key: Any) -> Iterable[tuple[Any, bool]]:
    keys = [None if body is None else key(body, url) for body in chunk]
    found = cache.lookup([k for k in keys if k is not None])
    for body, k in zip(chunk, keys):
        yield body, k is not None and k in found


def _model_estimate(
    model: str | None, t: _ModelTally, prices: PriceTable, cal: Calibration | None
) -> ModelEstimate:
    overhead = MESSAGE_TOKENS * t.messages + REPLY_TOKENS * t.rows
    cap = None if t.unbounded else t.cap  # most completion tokens these rows can produce
    if cal is None:
        prompt = Range(
            t.chars / CHARS_PER_TOKEN_LOW + overhead,
            t.chars / CHARS_PER_TOKEN + overhead,
            t.chars / CHARS_PER_TOKEN_HIGH + overhead,
        )
        completion = Range(t.choices, None, cap)
        cached = 0.0
    else:
        expected = cal.tokens_per_char * t.chars + overhead
        # The rows' own spread, plus the uncertainty of the ratio measured on cal.rows rows
        # (which grows with how much more text this input has than the calibration rows).
        share = t.chars / cal.chars if cal.chars else 0.0
        sd = cal.prompt_residual_std * math.sqrt(t.rows + cal.rows * share**2)
        prompt = _interval(expected, sd, floor=overhead, ceiling=None)
        sd = cal.completion_std * math.sqrt(t.rows + t.rows**2 / cal.rows)
        completion = _interval(cal.completion_mean * t.rows, sd, floor=t.choices, ceiling=cap)
        cached = cal.cached_fraction
    prompt, completion = _whole(prompt), _whole(completion)
    price = prices.get(model, warn=True)
    # the prompt cache's tokens were counted at the rule's CHARS_PER_TOKEN: scaled to this
    # estimate's expected prompt tokens (a calibrated ratio moves both alike)
    rule_tokens = t.chars / CHARS_PER_TOKEN + overhead
    scale = (prompt.expected or 0) / rule_tokens if rule_tokens else 0.0
    prefix_cached = min(round(t.cached * scale), int(prompt.expected or 0))
    if price is None:
        return ModelEstimate(model, t.rows, prompt, completion, None, None, prefix_cached)

    def dollars(batch: bool) -> Range:
        def at(p: float, c: float, cached_share: float) -> float:
            return price.cost(p, c, p * cached_share, batch=batch)  # type: ignore[arg-type]

        return Range(
            at(prompt.low, completion.low, cached),
            None if completion.expected is None or prompt.expected is None
            else at(prompt.expected, completion.expected, cached),
            None if completion.high is None or prompt.high is None
            else at(prompt.high, completion.high, 0.0),
        )

    return ModelEstimate(
        model, t.rows, prompt, completion, dollars(False), dollars(True), prefix_cached,
        price.cache_saving(prefix_cached), price.cache_saving(prefix_cached, batch=True),
    )


def _interval(expected: float, sd: float, *, floor: float, ceiling: float | None) -> Range:
    margin = max(SPREAD_SIGMAS * sd, CALIBRATED_MIN_MARGIN * expected)
    low = max(expected - margin, floor)
    high = expected + margin
    if ceiling is not None:
        high = min(high, ceiling)
        low = min(low, ceiling)
    return Range(low, min(max(expected, low), high), high)


def _whole(r: Range) -> Range:
    """Token counts are whole: the low bound rounds down, the high bound up."""
    return Range(
        math.floor(r.low),
        None if r.expected is None else round(r.expected),
        None if r.high is None else math.ceil(r.high),
    )


def _plain_tree(value: Any) -> Any:
    """JSON-ready: dicts and lists all the way down, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _plain_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_tree(v) for v in value]
    return _json_value(value)
