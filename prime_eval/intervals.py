"""Interval maths, in one place: normal quantiles and intervals, the normal CDF, and intervals for proportions.

Pure Python + numpy (no torch), so the report, the perplexity protocol, the demo and the adapters' sequential tests
all use the same formulas:

    z(0.95) = Φ⁻¹(0.975) = 1.959964                     normal quantile of a two-sided level
    normal_interval(v, se) = v ± z·se                   a mean or a log-likelihood (unbounded)
    wilson_interval(p, n) = (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)   a proportion: stays in [0, 1]

Proportions measured with Monte Carlo noise (accuracies scored with estimated log-likelihoods)
-----------------------------------------------------------------------------------------------
An accuracy p̂ on n documents has, besides the dataset (binomial) variance, a Monte Carlo variance V (what a re-run
with another seed would change; V = 0 for deterministic scores). The intervals below invert a *score test* with the
known extra variance V added to the binomial variance at the hypothesised value, instead of a normal interval
around p̂ (which leaves [0, 1] at small n or p̂ near 0 or 1, e.g. "20.0 ± 26.1"):

    wilson_interval(p̂, n, extra_var=V) = {π ∈ [0, 1] : (p̂ − π)² ≤ z²·(π(1−π)/n + V)}
        closed form: (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n² + V(1 + z²/n))) / (1 + z²/n), clipped to [0, 1].
        V = 0 gives Wilson's interval exactly. Unlike a Wilson interval at an "effective sample size"
        n_eff = p̂(1−p̂)/SE², it stays defined at p̂ = 0 or 1 (SE_data = 0 there while V may not be): the lower end is
        then 0 and the upper end widens with V.
    mean_proportion_interval(p̂_t, n_t, V_t)   the average of T independent proportions (a table's "Avg"):
        the same inversion for p̄ = Σp̂_t/T with Var = π(1−π)·Σ_t(1/n_t)/T² + Σ_t V_t/T², i.e. under a common
        accuracy π. π(1−π) is concave, so when the tasks' accuracies differ this over-states the binomial part for
        equal n_t (Jensen): conservative.
    paired_difference_interval(b, c, n, extra_var=V)   the difference δ = p_A − p_B of two models scored on the
        same n documents, b = #(A right, B wrong), c = #(A wrong, B right): Tango's asymptotic score interval
        (Tango 1998, Stat Med 17:891; recommended by Fagerland, Lydersen & Laake 2014, Stat Med 33:2850) with V
        added to the variance: {δ ∈ [−1, 1] : (b − c − nδ)² ≤ z²·(n(2p̃₂₁ + δ − δ²) + n²V)}, p̃₂₁(δ) the
        restricted maximum-likelihood estimate of P(A wrong, B right) (closed form below). It lies in [−1, 1], is
        not of zero width when the models agree on every document (then it is ±z²/(n + z²)), and V = 0 gives Tango.
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


def wilson_interval(p: float, n: float, confidence: float = 0.95, *, extra_var: float = 0.0) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials (Wilson 1927): inside [0, 1] for any p, n > 0.

    (p + z²/2n ± z·√(p(1−p)/n + z²/4n² + V(1 + z²/n))) / (1 + z²/n) with V = `extra_var`, a known extra variance
    (Monte Carlo) added to the binomial one at the hypothesised π (module docstring); V = 0 is Wilson's interval.
    A non-integer n (an effective sample size) is allowed.
    """
    if n <= 0:
        raise ValueError(f"a proportion needs n > 0 trials, got {n}")
    if extra_var < 0:
        raise ValueError(f"a variance cannot be negative, got extra_var={extra_var}")
    z = Z95 if confidence == 0.95 else z_value(confidence)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n) + extra_var * (1 + z2 / n)) / (1 + z2 / n)
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


def normal_quantile(u: float) -> float:
    """Φ⁻¹(u), the standard normal quantile, for 0 < u < 1."""
    return NormalDist().inv_cdf(u)


def mean_se(x, *, degenerate=None):
    """SE of the mean of the values x: sd(x, ddof=1)/√n; `degenerate` (default None, JSON null) for fewer than two."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else degenerate


def binomial_se(p: float, n: int) -> float:
    """SE of a mean of n zeros and ones with mean p, as lm-eval computes it: sd(ddof=1)/√n = √(p(1−p)/(n−1))."""
    if n < 2:
        return float("nan")
    return math.sqrt(max(p * (1.0 - p), 0.0) / (n - 1))


def mean_proportion_interval(ps, ns, extra_vars=None, confidence: float = 0.95) -> tuple[float, float]:
    """Interval of p̄ = mean(ps) for T independent proportions p̂_t on n_t trials with Monte Carlo variances V_t.

    Score inversion under a common π (module docstring): Wilson at N = T²/Σ(1/n_t) with extra variance ΣV_t/T².
    """
    ps, ns = [float(p) for p in ps], [float(n) for n in ns]
    if not ps or len(ps) != len(ns):
        raise ValueError("mean_proportion_interval needs one n per proportion (and at least one)")
    vs = [0.0] * len(ps) if extra_vars is None else [float(v) for v in extra_vars]
    t = len(ps)
    return wilson_interval(sum(ps) / t, t * t / sum(1.0 / n for n in ns), confidence,
                           extra_var=sum(vs) / (t * t))


def _tango_excess(delta: np.ndarray, b: float, c: float, n: float, extra_var: float, z: float) -> np.ndarray:
    """(b − c − nδ)² − z²·(n(2p̃₂₁ + δ − δ²) + n²V): ≤ 0 where the score test accepts δ.

    p̃₂₁ maximises the multinomial likelihood of the paired 2×2 table under p₁₂ − p₂₁ = δ; setting the derivative of
    (n−b−c)·log(1 − 2x − δ) + b·log(x + δ) + c·log x to 0 gives 2n·x² + W·x − c·δ(1−δ) = 0 with
    W = −b − c + (2n − b + c)·δ, so p̃₂₁ = (√(W² + 8n·c·δ(1−δ)) − W) / 4n.
    """
    w = -b - c + (2 * n - b + c) * delta
    p21 = (np.sqrt(np.maximum(w * w + 8 * n * c * delta * (1 - delta), 0.0)) - w) / (4 * n)
    var = np.maximum(n * (2 * p21 + delta - delta * delta), 0.0) + n * n * extra_var
    return (b - c - n * delta) ** 2 - z * z * var


def paired_difference_interval(b: float, c: float, n: float, extra_var: float = 0.0,
                               confidence: float = 0.95) -> tuple[float, float]:
    """Tango's score interval for δ = (b − c)/n, two models on the same n documents, with Monte Carlo variance
    `extra_var` (module docstring). The ends are found on a 4001-point grid of [−1, 1] and refined by 60 bisection
    steps (the hull of the accepted set); deterministic, no random numbers."""
    if n <= 0:
        raise ValueError(f"a paired difference needs n > 0 documents, got {n}")
    if not (0 <= b and 0 <= c and b + c <= n):
        raise ValueError(f"paired counts b={b}, c={c} do not fit n={n} documents")
    z = Z95 if confidence == 0.95 else z_value(confidence)
    grid = np.linspace(-1.0, 1.0, 4001)
    accepted = np.flatnonzero(_tango_excess(grid, b, c, n, extra_var, z) <= 0)
    est = (b - c) / n
    if accepted.size == 0:  # finer than the grid: only a neighbourhood of the estimate is accepted
        return float(est), float(est)

    def refine(inside: float, outside: float) -> float:
        for _ in range(60):
            mid = 0.5 * (inside + outside)
            if _tango_excess(np.array([mid]), b, c, n, extra_var, z)[0] <= 0:  # (1,)
                inside = mid
            else:
                outside = mid
        return inside

    i, j = accepted[0], accepted[-1]
    lo = -1.0 if i == 0 else refine(float(grid[i]), float(grid[i - 1]))
    hi = 1.0 if j == grid.size - 1 else refine(float(grid[j]), float(grid[j + 1]))
    return float(min(lo, est)), float(max(hi, est))
