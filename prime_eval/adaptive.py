"""Adaptive sampling of a multiple-choice document: when to stop drawing Monte Carlo samples (issue 9).

A document's choices are scored in rounds. The first round has `round_samples` samples and each later round doubles
the total, up to the cap K:  k_0 = min(r, K),  k_{i+1} = min(total_i, K − total_i)  (16, 16, 32, 64 for r = 16,
K = 128). After each round, with v_c,k the per-sample NLL values of choice c (aligned across choices by common
random numbers: the choices share the document's seed and rounds):

    settled  if for the top choice a and every other choice b,  z_ab = mean(d) / SE(d) ≥ z_confidence,
             d_k = v_b,k − v_a,k, for the ranking by log-likelihood (acc) and by log-likelihood per character
             (acc_norm); or every choice's SE ≤ target_se
    futile   if not settled, total ≥ futility_after and z·√(K/total) < 1: even at the cap the difference would stay
             within about one SE (a near tie no affordable number of samples settles)
    cap      if total = K
    else     another round

A two-sided normal test applied after each round (a sequential test; the doubling limits the looks to
log2(K/r) + 1). Pure functions of the values: a document's rounds depend on that document alone, never on which
other documents are scored with it, so a resumed or data-parallel run stops every document where one run would.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prime_eval.intervals import z_value

SETTLED, FUTILE, CAP = "settled", "futile", "cap"


@dataclass(frozen=True)
class AdaptiveRule:
    """The stopping rule's settings: cap K (`samples`), first round, level, optional SE target, futility start."""

    cap: int
    round_samples: int = 16
    confidence: float = 0.99
    target_se: float | None = None
    futility_after: int = 64

    def next_round(self, total: int) -> int:
        """Samples of the next round after `total` samples (0: the cap is reached)."""
        return min(self.round_samples, self.cap) if total == 0 else min(total, self.cap - total)

    def schedule(self) -> list[int]:
        """Every round size up to the cap: [16, 16, 32, 64] for r = 16, K = 128."""
        sizes, total = [], 0
        while (k := self.next_round(total)) > 0:
            sizes.append(k)
            total += k
        return sizes


def ranking_z(values: Sequence[torch.Tensor], chars: Sequence[int], target_se: float | None = None) -> float:
    """The smallest paired z-statistic mean(d)/SE(d) between the top choice and any other, over the rankings by
    log-likelihood (acc) and per character (acc_norm); inf if every SE <= target_se.

    values: per choice, the (K,) per-sample NLL values so far (aligned across choices); chars: per choice, the
    continuation's length in characters (acc_norm's divisor).
    """
    if target_se is not None and all(float(v.std(unbiased=True)) / math.sqrt(v.numel()) <= target_se
                                     for v in values):
        return math.inf
    worst = math.inf
    for per_char in (False, True):
        v = [vals / max(1, c) if per_char else vals for vals, c in zip(values, chars)]
        best = min(range(len(v)), key=lambda c: float(v[c].mean()))  # lowest NLL = highest log-likelihood
        for c in range(len(v)):
            if c != best:
                d = v[c] - v[best]
                se = float(d.std(unbiased=True)) / math.sqrt(d.numel())
                worst = min(worst, math.inf if se == 0.0 and float(d.mean()) > 0 else
                            float(d.mean()) / se if se > 0 else 0.0)
    return worst


def decide(rule: AdaptiveRule, values: Sequence[torch.Tensor], chars: Sequence[int]) -> str | None:
    """After a round: SETTLED, FUTILE, CAP (stop), or None (draw the next round). `values` as for `ranking_z`."""
    total = int(values[0].numel())
    z = ranking_z(values, chars, rule.target_se)
    if z >= z_value(rule.confidence):
        return SETTLED
    if total >= rule.futility_after and z * math.sqrt(rule.cap / total) < 1:
        return FUTILE
    return CAP if total >= rule.cap else None
