"""The statistics of an evaluation: confidence intervals and paired tests, without scipy.

- `wilson_interval(k, n)`: Wilson's score interval for a proportion (0/1 scores);
- `t_interval(values)`: the Student t interval for a mean (other scores);
- `mean_interval(values)`: whichever of the two fits the values;
- `mcnemar_exact(b, c)`: the exact (binomial) McNemar p-value from the discordant pairs;
- `paired_difference(a, b)`: the mean of a - b with its t interval.

The t quantile comes from the regularised incomplete beta function (a continued fraction, as
in Numerical Recipes), found by bisection; the tests check every figure against scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "Interval",
    "is_binary",
    "mcnemar_exact",
    "mean_interval",
    "paired_difference",
    "t_interval",
    "t_quantile",
    "wilson_interval",
]

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


@dataclass(frozen=True)
class Interval:
    """A mean (or proportion) with its confidence interval; bounds are None when n < 2."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    method: str  # "wilson" or "t"

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Plain JSON-ready data."""
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n,
                "ci_method": self.method}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson's score interval for `successes` out of `n` (0/1 scores)."""
    if n == 0:
        return Interval(None, None, None, 0, "wilson")
    z = Z95 if confidence == 0.95 else NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n, "wilson")


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """The Student t interval of the mean of `values`."""
    data = np.asarray(values, dtype=np.float64)
    n = len(data)
    if n == 0:
        return Interval(None, None, None, 0, "t")
    mean = float(data.mean())
    if n < 2:
        return Interval(mean, None, None, n, "t")
    sd = float(data.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t")


def is_binary(values: np.ndarray) -> bool:
    """True when every value is 0 or 1."""
    return bool(np.all((values == 0) | (values == 1)))


def mean_interval(values: Sequence[float] | np.ndarray, *, binary: bool | None = None) -> Interval:
    """Wilson's interval for 0/1 values, else the t interval (`binary` forces the choice)."""
    data = np.asarray(values, dtype=np.float64)
    if binary is None:
        binary = is_binary(data)
    if binary:
        return wilson_interval(int(data.sum()), len(data))
    return t_interval(data)


def paired_difference(a: np.ndarray, b: np.ndarray) -> Interval:
    """The mean of a - b over paired rows, with its t interval."""
    return t_interval(np.asarray(a, np.float64) - np.asarray(b, np.float64))


def mcnemar_exact(b: int, c: int) -> float:
    """The exact McNemar p-value: two-sided binomial test of b successes in b + c at 1/2.

    `b` and `c` are the discordant pairs (first right and second wrong, and the reverse).
    """
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n may be in the millions).
    log_half = n * math.log(0.5)
    log_n = math.lgamma(n + 1)
    terms = np.array([log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half
                      for i in range(k + 1)])
    top = terms.max()
    tail = math.exp(top) * float(np.exp(terms - top).sum())
    return min(1.0, 2.0 * tail)


# -- the t distribution -----------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
        + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with `df` degrees of freedom (0 < p < 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if _t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-13 * max(1.0, high):
            break
    return (low + high) / 2.0
