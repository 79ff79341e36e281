"""Interval maths, in one place: normal quantiles and intervals, the normal CDF, and intervals for proportions.

Pure Python + numpy (no torch), so the report, the perplexity protocol, the demo and the adapters' sequential tests
all use the same formulas:

    z(0.95) = Φ⁻¹(0.975) = 1.959964                     normal quantile of a two-sided level
    normal_interval(v, se) = v ± z·se                   a mean or a log-likelihood (unbounded)
    wilson_interval(p, n) = (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)   a proportion: stays in [0, 1]
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

Z95 = 1.959963984540054  # Φ⁻¹(0.975), the value every module used (NormalDist gives it to 4e-16)


def z_value(confidence: float = 0.95) -> float:
    """Two-sided normal quantile Φ⁻¹(1 − (1 − confidence)/2); z_value(0.95) = 1.959964."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


_erf = np.frompyfunc(math.erf, 1, 1)


def normal_cdf(x):
    """Φ(x) = ½(1 + erf(x/√2)) with `math.erf`; a float for a scalar, an array (float64) for an array."""
    if np.ndim(x) == 0:
        return 0.5 * (1.0 + math.erf(float(x) / math.sqrt(2.0)))
    return 0.5 * (1.0 + _erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)).astype(np.float64))


def normal_interval(value: float, se: float, confidence: float = 0.95) -> tuple[float, float]:
    """value ± z·se."""
    z = Z95 if confidence == 0.95 else z_value(confidence)
    return value - z * se, value + z * se


def wilson_interval(p: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials (Wilson 1927): inside [0, 1] for any p, n > 0.

    (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n). A non-integer n (an effective sample size) is allowed.
    """
    if n <= 0:
        raise ValueError(f"a proportion needs n > 0 trials, got {n}")
    z = Z95 if confidence == 0.95 else z_value(confidence)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo = 0.0 if p <= 0 else max(0.0, centre - half)  # exact ends at p = 0 and 1 (no round-off below 0)
    hi = 1.0 if p >= 1 else min(1.0, centre + half)
    return lo, hi


def ppl_interval(nll: float, nll_se: float, confidence: float = 0.95) -> tuple[float, float, float]:
    """PPL = exp(NLL) and exp of the NLL interval (exp is monotone, so the coverage carries over)."""
    lo, hi = normal_interval(nll, nll_se, confidence)
    return _exp(nll), _exp(lo), _exp(hi)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
