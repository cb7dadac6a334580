"""The price table and the cost of a request (docs/cost.md).

Prices are US dollars per million tokens, for input, cached input and output tokens. The built-in
table holds the providers' public list prices as they were on `PRICES_AS_OF`; a TOML file adds
models or replaces the price of a built-in one:

    [models."gpt-4o"]
    input = 2.50
    cached_input = 1.25      # optional: defaults to `input`
    output = 10.00
    batch_input = 1.25       # optional, the Batch API's prices: default half the online ones
    batch_cached_input = 0.625
    batch_output = 5.00

    >>> prices = PriceTable.load(Path("prices.toml"))
    >>> prices.cost("gpt-4o", prompt_tokens=1200, completion_tokens=300, cached_tokens=1024)
    >>> prices.cost("gpt-4o", prompt_tokens=1200, completion_tokens=300, batch=True)

Cost is by the model the row *requested* (the `model` column), matched exactly: a dated name
such as `gpt-4o-2024-08-06` has a price only where the table lists it. A model with no price has
a null cost and one warning per table, never a guessed figure.
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batchrunner.errors import UsageError

__all__ = ["BATCH_DISCOUNT", "BUILTIN_PRICES", "PRICES_AS_OF", "ModelPrice", "PriceTable"]

logger = logging.getLogger(__name__)

#: The day the built-in prices were taken from the providers' public price pages. Prices change:
#: check them against the providers' pages after this date, and override with `--prices FILE`.
PRICES_AS_OF = "2026-11-25"


#: The Batch API's price against the online one, where a price table gives no batch price.
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """US dollars per million input, cached input and output tokens of one model.

    The `batch_` prices are the Batch API's (`--engine batch`); None means the default, half
    the online price (`BATCH_DISCOUNT`).
    """

    input: float
    cached_input: float
    output: float
    batch_input: float | None = None
    batch_cached_input: float | None = None
    batch_output: float | None = None

    def rates(self, *, batch: bool = False) -> tuple[float, float, float]:
        """(input, cached input, output) per million tokens, online or at batch prices."""
        if not batch:
            return self.input, self.cached_input, self.output
        return (
            self.input * BATCH_DISCOUNT if self.batch_input is None else self.batch_input,
            self.cached_input * BATCH_DISCOUNT
            if self.batch_cached_input is None else self.batch_cached_input,
            self.output * BATCH_DISCOUNT if self.batch_output is None else self.batch_output,
        )

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        *,
        batch: bool = False,
    ) -> float:
        """((prompt - cached) * input + cached * cached_input + completion * output) / 1e6.

        With `batch`, at the Batch API's prices.
        """
        input_, cached_input, output = self.rates(batch=batch)
        return (
            (prompt_tokens - cached_tokens) * input_
            + cached_tokens * cached_input
            + completion_tokens * output
        ) / 1e6

    def cache_saving(self, cached_tokens: float, *, batch: bool = False) -> float:
        """What `cached_tokens` prompt tokens saved against paying them full: USD."""
        input_, cached_input, _ = self.rates(batch=batch)
        return cached_tokens * (input_ - cached_input) / 1e6


def _p(input: float, cached_input: float, output: float) -> ModelPrice:
    return ModelPrice(input=input, cached_input=cached_input, output=output)


# Public list prices, USD per 1M tokens, as of PRICES_AS_OF. Anthropic's cache *writes* (1.25x
# input) are not modelled: the gateway reports only cached reads (`cached_tokens`), and uncached
# prompt tokens are charged at the input price. Where a provider gives no cached-input discount,
# cached_input equals input.
BUILTIN_PRICES: Mapping[str, ModelPrice] = MappingProxyType(
    {
        # OpenAI
        "gpt-4o": _p(2.50, 1.25, 10.00),
        "gpt-4o-2024-08-06": _p(2.50, 1.25, 10.00),
        "gpt-4o-2024-11-20": _p(2.50, 1.25, 10.00),
        "gpt-4o-mini": _p(0.15, 0.075, 0.60),
        "gpt-4o-mini-2024-07-18": _p(0.15, 0.075, 0.60),
        "gpt-4.1": _p(2.00, 0.50, 8.00),
        "gpt-4.1-mini": _p(0.40, 0.10, 1.60),
        "gpt-4.1-nano": _p(0.10, 0.025, 0.40),
        "gpt-4-turbo": _p(10.00, 10.00, 30.00),
        "gpt-3.5-turbo": _p(0.50, 0.50, 1.50),
        "o1": _p(15.00, 7.50, 60.00),
        "o1-mini": _p(1.10, 0.55, 4.40),
        "o3-mini": _p(1.10, 0.55, 4.40),
        "o4-mini": _p(1.10, 0.275, 4.40),  # reasoning tokens are inside completion_tokens
        "o4-mini-2025-04-16": _p(1.10, 0.275, 4.40),
        # Anthropic
        "claude-3-5-sonnet-20241022": _p(3.00, 0.30, 15.00),
        "claude-3-5-haiku-20241022": _p(0.80, 0.08, 4.00),
        "claude-3-7-sonnet-20250219": _p(3.00, 0.30, 15.00),
        "claude-sonnet-4-20250514": _p(3.00, 0.30, 15.00),
        "claude-3-opus-20240229": _p(15.00, 1.50, 75.00),
        "claude-3-haiku-20240307": _p(0.25, 0.03, 1.25),
    }
)

_PRICE_KEYS = ("input", "cached_input", "output")
_BATCH_KEYS = ("batch_input", "batch_cached_input", "batch_output")  # optional all three


class PriceTable:
    """Prices by model name, and the cost of requests by them.

    Unknown models are logged once per model per table (a summary over a million rows of an
    unpriced model warns once, not a million times).
    """

    def __init__(self, prices: Mapping[str, ModelPrice], *, source: Path | None = None) -> None:
        self._prices = dict(prices)
        self.source = source  # the TOML file overlaid on the built-in prices, if any
        self._warned: set[str] = set()

    @classmethod
    def builtin(cls) -> PriceTable:
        """The built-in list prices (as of `PRICES_AS_OF`)."""
        return cls(BUILTIN_PRICES)

    @classmethod
    def load(cls, path: Path | str | None = None) -> PriceTable:
        """The built-in prices, overlaid by the models of the TOML file at `path` (if given).

        A file that cannot be read or parsed, an unknown key, a missing or non-numeric price is a
        `UsageError` that names the file and the key.
        """
        prices = dict(BUILTIN_PRICES)
        if path is None:
            return cls(prices)
        path = Path(path)
        prices.update(_read_price_file(path))
        return cls(prices, source=path)

    def __contains__(self, model: object) -> bool:
        return model in self._prices

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        source = f", source={str(self.source)!r}" if self.source else ""
        return f"PriceTable({len(self._prices)} models{source})"

    def get(self, model: str | None, *, warn: bool = False) -> ModelPrice | None:
        """The price of `model`, or None where it has none (with `warn`, log that once)."""
        price = self._prices.get(model) if model is not None else None
        if price is None and warn and model is not None:
            self._warn_unknown(model)
        return price

    def cost(
        self,
        model: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = 0,
        *,
        batch: bool = False,
    ) -> float | None:
        """The cost in USD of one request; None for a model with no price or missing counts.

        `cached_tokens` None means the gateway reported no cache hit: it counts as 0. With
        `batch`, at the model's Batch API prices (a row answered by a batch).
        """
        if prompt_tokens is None or completion_tokens is None:
            return None
        price = self.get(model, warn=True)
        if price is None:
            return None
        return price.cost(prompt_tokens, completion_tokens, cached_tokens or 0, batch=batch)

    def worst_case(
        self,
        model: str | None,
        prompt_tokens_estimate: int,
        max_tokens: int | None,
        *,
        n: int = 1,
        batch: bool = False,
    ) -> float | None:
        """The most one request can cost: every prompt token uncached, `n * max_tokens` out.

        With `batch`, at the Batch API's prices (what `--max-cost` checks before a submission).

        None where no bound exists: the model has no price, or `max_tokens` is not set (the
        caller decides, e.g. by refusing a budget it cannot keep).
        """
        if max_tokens is None:
            return None
        price = self.get(model, warn=True)
        if price is None:
            return None
        return price.cost(prompt_tokens_estimate, n * max_tokens, 0, batch=batch)

    def warned_models(self) -> frozenset[str]:
        """The unknown models this table has warned about so far."""
        return frozenset(self._warned)

    def _warn_unknown(self, model: str) -> None:
        if model in self._warned:
            return
        self._warned.add(model)
        where = f" or in {self.source}" if self.source else ""
        logger.warning(
            "no price for model %r in the built-in table%s: its cost is left null "
            "(add it with --prices FILE: [models.%s] input = ..., output = ...)",
            model,
            where,
            _toml_key(model),
        )


def _toml_key(model: str) -> str:
    return model if model.replace("-", "").replace("_", "").isalnum() else f'"{model}"'


def _read_price_file(path: Path) -> dict[str, ModelPrice]:
    """The models of a price file, validated; every error names the file and the key."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"price file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"price file {path} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"price file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"price file {path} is not valid UTF-8 TOML: {exc}") from None

    unknown = sorted(set(doc) - {"models"})
    if unknown:
        raise UsageError(
            f"price file {path}: unknown key {unknown[0]!r} (expected [models.\"NAME\"] tables)"
        )
    models = doc.get("models", {})
    if not isinstance(models, dict):
        raise UsageError(f"price file {path}: 'models' must be a table of [models.\"NAME\"]")

    prices: dict[str, ModelPrice] = {}
    for model, entry in models.items():
        where = f"price file {path}: models.{_toml_key(model)}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where} must be a table with input, cached_input and output")
        extra = sorted(set(entry) - set(_PRICE_KEYS) - set(_BATCH_KEYS))
        if extra:
            raise UsageError(
                f"{where}.{extra[0]}: unknown key (expected input, cached_input, output, "
                "batch_input, batch_cached_input, batch_output)"
            )
        values: dict[str, float] = {}
        for key in _PRICE_KEYS:
            if key not in entry:
                if key == "cached_input":
                    continue
                raise UsageError(f"{where}.{key} is missing (USD per million tokens)")
            values[key] = _price_value(entry[key], f"{where}.{key}")
        values.setdefault("cached_input", values["input"])
        for key in _BATCH_KEYS:
            if key in entry:
                values[key] = _price_value(entry[key], f"{where}.{key}")
        prices[model] = ModelPrice(**values)
    return prices


def _price_value(value: Any, where: str) -> float:
    # bool is an int to Python, but `input = true` is a mistake, not a price of 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{where} must be a number (USD per million tokens), not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{where} must be a finite non-negative number, not {value!r}")
    return float(value)
