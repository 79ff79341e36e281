"""The Monte Carlo part of an accuracy's uncertainty: how likely a re-run (another seed) scores a document correct.

Each log-likelihood ŝ_ij of document i, choice j is an MC mean with standard error σ_ij (0 where the number is
deterministic). Normal approximation, plug-in: a re-run would give s_ij ~ N(ŝ_ij, σ_ij²) independently, so the
document is scored correct with probability q_i = P(argmax_j s_ij = gold) (`prob_correct`). Documents are
independent, so the MC variance of the accuracy is Var_MC = Σ_i q_i(1−q_i) / n² (`mc_variance`). No random numbers:
the result is reproducible without a seed. Where the outcome is deterministic (σ = 0, or an `is_greedy` check by
argmax decoding) q_i is 0 or 1 and the document adds nothing.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from prime_eval.intervals import normal_cdf, normal_quantile

_U_NODES = 2048  # midpoint rule in u = Φ(z): error ≤ 1/_U_NODES even for step-shaped integrands
_Z_NODES: np.ndarray | None = None


def _z_nodes() -> np.ndarray:
    global _Z_NODES
    if _Z_NODES is None:
        _Z_NODES = np.array([normal_quantile((k + 0.5) / _U_NODES) for k in range(_U_NODES)])  # (M,)
    return _Z_NODES


def prob_correct(scores: Sequence[float], ses: Sequence[float], gold: int) -> float:
    """q = P(argmax_j S_j = gold) for independent S_j ~ N(scores_j, ses_j²).

    Two choices: q = Φ((s_g − s_o)/√(σ_g² + σ_o²)).
    More: q = E_z[Π_{j≠g} Φ((s_g + σ_g z − s_j)/σ_j)], z ~ N(0, 1), integrated by the midpoint rule in u = Φ(z)
    (z_k = Φ⁻¹((k+½)/M), M = 2048), with Φ(·/0) read as the step 1[· > 0].
    All σ = 0: q = 1 if gold is the (first) argmax, as lm-eval breaks ties, else 0.
    """
    s = np.asarray(scores, dtype=np.float64)
    sd = np.asarray(ses, dtype=np.float64)
    others = np.arange(len(s)) != gold
    if not np.any(sd > 0):
        return 1.0 if int(np.argmax(s)) == gold else 0.0
    if len(s) == 2:
        o = int(np.flatnonzero(others)[0])
        return float(normal_cdf((s[gold] - s[o]) / math.hypot(sd[gold], sd[o])))
    xg = s[gold] + sd[gold] * _z_nodes()  # (M,)
    prod = np.ones_like(xg)
    for j in np.flatnonzero(others):
        diff = xg - s[j]
        prod *= normal_cdf(diff / sd[j]) if sd[j] > 0 else (diff > 0).astype(np.float64)
    return float(prod.mean())


def mc_variance(q: Sequence[float]) -> float:
    """MC variance of an accuracy over n documents scored correct with probabilities q_i: Σ q_i(1−q_i) / n²."""
    q = np.asarray(q, dtype=np.float64)
    return float(np.sum(q * (1.0 - q)) / len(q) ** 2) if len(q) else 0.0
