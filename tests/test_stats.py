"""The evaluation statistics against independent computations (scipy, statsmodels)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from batchrunner.reports.stats import (
    mcnemar_exact,
    mean_interval,
    paired_difference,
    t_interval,
    t_quantile,
    wilson_interval,
)


@pytest.mark.parametrize("df", [1, 2, 3, 7, 29, 299, 10_000])
@pytest.mark.parametrize("p", [0.975, 0.9, 0.6, 0.025])
def test_t_quantile_equals_scipy(df: int, p: float) -> None:
    assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (1, 2), (266, 300), (205, 300),
                                  (5, 1_000_000)])
def test_wilson_equals_statsmodels(k: int, n: int) -> None:
    got = wilson_interval(k, n)
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert got.mean == k / n and got.n == n and got.method == "wilson"
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))


def test_t_interval_equals_scipy() -> None:
    values = np.random.default_rng(7).uniform(0, 1, 57)
    got = t_interval(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=values.mean(),
                                       scale=scipy_stats.sem(values))
    assert (got.low, got.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert t_interval([0.5]).low is None and t_interval([]).mean is None


def test_mean_interval_picks_wilson_for_binary_scores() -> None:
    assert mean_interval([1, 0, 1, 1]).method == "wilson"
    assert mean_interval([1, 0.5, 1]).method == "t"


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (5, 5), (82, 21), (3, 17), (400, 520)])
def test_mcnemar_exact_equals_statsmodels(b: int, c: int) -> None:
    table = [[10, b], [c, 10]]
    expected = mcnemar(table, exact=True).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


def test_paired_difference_equals_scipy() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 200).astype(float), rng.integers(0, 2, 200).astype(float)
    got = paired_difference(a, b)
    d = a - b
    low, high = scipy_stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    assert got.mean == pytest.approx(d.mean())
    assert (got.low, got.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
