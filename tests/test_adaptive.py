"""`prime_eval.adaptive`: the stopping rule of adaptive sampling, values in and decisions out (no lm-eval, no network).

The reference is written out by hand: the paired z of two choices is mean(d)/SE(d) of the per-sample differences.
"""
from __future__ import annotations

import math

import pytest
import torch

from prime_eval.adaptive import CAP, FUTILE, SETTLED, AdaptiveRule, decide, ranking_z
from prime_eval.intervals import z_value


def test_schedule_doubles_the_total_up_to_the_cap():
    assert AdaptiveRule(cap=128, round_samples=16).schedule() == [16, 16, 32, 64]
    assert AdaptiveRule(cap=100, round_samples=16).schedule() == [16, 16, 32, 36]
    assert AdaptiveRule(cap=4, round_samples=16).schedule() == [4]
    rule = AdaptiveRule(cap=128, round_samples=16)
    assert [rule.next_round(t) for t in (0, 16, 32, 64, 128)] == [16, 16, 32, 64, 0]


def test_ranking_z_is_the_paired_z_of_the_worst_pair():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # per-sample NLL of choice 0 (the best)
    b = a + torch.tensor([0.5, 1.5, 0.5, 1.5], dtype=torch.float64)  # choice 1: worse by d = 0.5, 1.5, 0.5, 1.5
    d = b - a
    expected = float(d.mean()) / (float(d.std(unbiased=True)) / math.sqrt(4))
    assert ranking_z([a, b], [1, 1]) == pytest.approx(expected, rel=1e-15)
    # per character (acc_norm) the ranking flips: with 10x the characters b/10 is the best; the result is the
    # smaller z of the two rankings
    dc = a - b / 10
    z_char = float(dc.mean()) / (float(dc.std(unbiased=True)) / math.sqrt(4))
    assert ranking_z([a, b], [1, 10]) == pytest.approx(min(expected, z_char), rel=1e-15)
    c = a + torch.tensor([0.1, 3.0, 0.1, 3.0], dtype=torch.float64)  # noisier difference: the worse pair counts
    dac = c - a
    z_ac = float(dac.mean()) / (float(dac.std(unbiased=True)) / math.sqrt(4))
    assert ranking_z([a, b, c], [1, 1, 1]) == pytest.approx(min(expected, z_ac), rel=1e-15)
    assert ranking_z([a, a.clone()], [3, 3]) == 0.0  # an exact tie never settles
    assert ranking_z([a, a + 1.0], [1, 1]) == math.inf  # a constant difference: SE 0, settled
    assert ranking_z([a, b], [1, 1], target_se=10.0) == math.inf  # every choice's SE is below the target


def _pair(k: int, mean_diff: float):
    """Two choices whose per-sample differences are mean_diff ± 1 (alternating): z = mean_diff·√k / sd."""
    a = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    return [a, a + mean_diff + torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(k // 2)]


def test_decide_settles_stops_futile_ties_and_caps():
    rule = AdaptiveRule(cap=128, round_samples=16, confidence=0.99, futility_after=64)
    z99 = z_value(0.99)
    far = _pair(16, 5.0)
    assert ranking_z(far, [1, 1]) >= z99 and decide(rule, far, [1, 1]) == SETTLED
    tie16 = _pair(16, 0.01)
    assert ranking_z(tie16, [1, 1]) * math.sqrt(128 / 16) < 1 and decide(rule, tie16, [1, 1]) is None  # too early
    tie64 = _pair(64, 0.01)
    assert ranking_z(tie64, [1, 1]) * math.sqrt(128 / 64) < 1 and decide(rule, tie64, [1, 1]) == FUTILE
    open64 = _pair(64, 0.2)  # z·√2 ≥ 1: worth more samples
    assert 1 <= ranking_z(open64, [1, 1]) * math.sqrt(2) and decide(rule, open64, [1, 1]) is None
    close = _pair(128, 0.2)
    assert 1 <= ranking_z(close, [1, 1]) < z99 and decide(rule, close, [1, 1]) == CAP  # neither settled nor futile


def test_decisions_depend_only_on_the_document():
    """The rule reads one document's values: the same values give the same decision in any run."""
    g = torch.Generator().manual_seed(1)
    rule = AdaptiveRule(cap=64, round_samples=8, futility_after=16)
    vals = [torch.randn(32, generator=g, dtype=torch.float64) for _ in range(3)]
    assert decide(rule, vals, [3, 5, 7]) == decide(rule, [v.clone() for v in vals], [3, 5, 7])
