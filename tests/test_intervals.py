"""prime_eval.intervals against hand-computed values and against brute-force inversions of the score tests they
solve in closed form (a fine grid of hypothesised values, independent of the closed forms)."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from prime_eval import intervals as I

Z = 1.959963984540054


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_normal_pieces():
    assert I.normal_cdf(0.0) == pytest.approx(0.5, abs=1e-15)
    assert I.normal_cdf(Z) == pytest.approx(0.975, abs=1e-12)
    assert np.allclose(I.normal_cdf(np.array([-1.0, 0.0, 1.0])), [phi(-1), 0.5, phi(1)], atol=1e-15)
    assert I.normal_quantile(0.975) == pytest.approx(Z, abs=1e-12)
    assert I.normal_interval(0.5, 0.1) == pytest.approx((0.5 - Z * 0.1, 0.5 + Z * 0.1), abs=1e-12)
    assert I.binomial_se(0.25, 20) == pytest.approx(math.sqrt(0.1875 / 19), rel=1e-12)  # lm-eval's sd(ddof=1)/√n
    assert math.isnan(I.binomial_se(0.5, 1))


def _accepted_hull(grid, accepted):
    idx = np.flatnonzero(accepted)
    return grid[idx[0]], grid[idx[-1]]


@pytest.mark.parametrize("p,n,v", [(0.2, 10, 0.0), (0.0, 8, 0.0), (1.0, 8, 0.0), (0.0, 8, 0.004), (0.25, 8, 0.02),
                                   (0.5, 20, 0.01), (0.95, 40, 0.001), (1.0, 5, 0.03)])
def test_wilson_with_extra_variance_is_the_score_inversion(p, n, v):
    """{π ∈ [0,1] : (p − π)² ≤ z²(π(1−π)/n + V)} by brute force equals the closed form, and stays in [0, 1]."""
    lo, hi = I.wilson_interval(p, n, extra_var=v)
    assert 0.0 <= lo <= p <= hi <= 1.0
    grid = np.linspace(0.0, 1.0, 200_001)
    blo, bhi = _accepted_hull(grid, (p - grid) ** 2 <= Z * Z * (grid * (1 - grid) / n + v))
    assert (lo, hi) == pytest.approx((blo, bhi), abs=1e-5)


def test_wilson_hand_values():
    assert I.wilson_interval(0.2, 10) == pytest.approx((0.0567, 0.5098), abs=1e-4)  # the "20.0 ± 26.1" cell
    assert I.wilson_interval(0.0, 8) == pytest.approx((0.0, Z * Z / (8 + Z * Z)), abs=1e-12)  # the LAMBADA cell
    wider = I.wilson_interval(0.2, 10, extra_var=0.01)
    assert wider[0] < 0.0567 and wider[1] > 0.5098  # Monte Carlo noise only widens
    with pytest.raises(ValueError):
        I.wilson_interval(0.5, 10, extra_var=-1.0)


def test_mean_proportion_interval():
    # one task: Wilson itself
    assert I.mean_proportion_interval([0.3], [20], [0.001]) == I.wilson_interval(0.3, 20, extra_var=0.001)
    # equal n: Wilson at T·n trials (common π), extra variance ΣV/T²
    lo, hi = I.mean_proportion_interval([0.2, 0.4], [10, 10], [0.004, 0.0])
    assert (lo, hi) == pytest.approx(I.wilson_interval(0.3, 20, extra_var=0.001), abs=1e-15)
    # brute force with unequal n: {π : (p̄ − π)² ≤ z²(π(1−π)·Σ(1/n_t)/T² + ΣV_t/T²)}
    ps, ns, vs = [0.0, 0.5, 0.9], [8, 20, 40], [0.0, 0.003, 0.001]
    lo, hi = I.mean_proportion_interval(ps, ns, vs)
    grid = np.linspace(0, 1, 200_001)
    pbar = sum(ps) / 3
    acc = (pbar - grid) ** 2 <= Z * Z * (grid * (1 - grid) * sum(1 / n for n in ns) / 9 + sum(vs) / 9)
    assert (lo, hi) == pytest.approx(_accepted_hull(grid, acc), abs=1e-5)


def _tango_bruteforce(b, c, n, v, grid):
    """Score test of δ with the restricted MLE of p21 found numerically (a grid over the feasible p21), not from the
    closed form the module uses."""
    m = n - b - c
    ok = np.zeros(grid.shape, dtype=bool)
    for i, d in enumerate(grid):
        x = np.linspace(max(0.0, -d), (1 - d) / 2, 20_001)[1:-1]  # p21 with p12 = x + d ≥ 0, p11 + p22 = 1−2x−d ≥ 0
        if x.size == 0:
            continue
        ll = m * np.log(np.maximum(1 - 2 * x - d, 1e-300)) + b * np.log(np.maximum(x + d, 1e-300)) \
            + c * np.log(np.maximum(x, 1e-300))
        p21 = x[np.argmax(ll)]
        ok[i] = (b - c - n * d) ** 2 <= Z * Z * (n * (2 * p21 + d - d * d) + n * n * v)
    return ok


@pytest.mark.parametrize("b,c,n,v", [(5, 1, 20, 0.0), (2, 7, 30, 0.0), (3, 3, 12, 0.0), (4, 0, 10, 0.002),
                                     (6, 2, 25, 0.01)])
def test_paired_difference_interval_is_tangos_score_interval(b, c, n, v):
    lo, hi = I.paired_difference_interval(b, c, n, v)
    d = (b - c) / n
    assert -1.0 <= lo <= d <= hi <= 1.0
    grid = np.linspace(-0.999, 0.999, 1999)
    blo, bhi = _accepted_hull(grid, _tango_bruteforce(b, c, n, v, grid))
    assert lo == pytest.approx(blo, abs=2e-3) and hi == pytest.approx(bhi, abs=2e-3)  # grid step 1e-3


def test_paired_difference_interval_edge_cases():
    # the models agree on every document: not a zero-width interval, ±z²/(n + z²) (closed form of the score test)
    for n in (8, 20, 100):
        assert I.paired_difference_interval(0, 0, n) == pytest.approx((-Z * Z / (n + Z * Z), Z * Z / (n + Z * Z)),
                                                                       abs=1e-9)
    assert I.paired_difference_interval(20, 0, 20)[1] == 1.0  # A right everywhere, B wrong everywhere
    assert I.paired_difference_interval(0, 20, 20)[0] == -1.0
    narrow, wide = I.paired_difference_interval(5, 1, 20), I.paired_difference_interval(5, 1, 20, 0.01)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]
    with pytest.raises(ValueError):
        I.paired_difference_interval(5, 6, 10)


def test_z_value():
    assert I.z_value(0.95) == pytest.approx(NormalDist().inv_cdf(0.975), abs=1e-15)
    assert I.wilson_interval(0.5, 10, 0.99)[0] < I.wilson_interval(0.5, 10)[0]
