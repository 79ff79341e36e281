"""Sufficient statistics of bound perplexity, update / merge / compute (the torchmetrics pattern, MDLM's MeanMetric).

    NLL = Σ_b v_b / Σ_b n_b   (v_b: a block's score, the mean of its K samples; n_b: its scored positions)
    PPL = exp(NLL), a ratio of sums;  bits per byte = Σ v_b / ln 2 / Σ bytes_b

Standard errors (`nll_stderr`, the Monte Carlo SE of the headline, and its 95% interval NLL ± z·SE):
  * deterministic estimators (ARM, chain_rule): 0.
  * K > 1: from the within-block sample variances, SE² = Σ_b s_b²/K / (Σ_b n_b)². Blocks are independent given the
    data, so this is the MC uncertainty of the bound *on the blocks scored*. Conservative under stratification.
  * K = 1: a block's MC variance cannot be estimated from one draw, so the between-block SE below is used. Since
    E[between-block variance] = Var_data + E[Var_MC] ≥ E[Var_MC], it over-covers the MC error (it also includes the
    variation of the data) — conservative, and the right SE if the scored blocks are read as a sample of a corpus.
`nll_stderr_sampling` is always that between-block SE: the delta-method SE of the ratio Σv/Σn treating blocks as an
i.i.d. sample, sqrt(B/(B-1) Σ(v_b - R n_b)²) / Σn. A Poisson(1) bootstrap over blocks (per-block weights from the
caller) gives a percentile interval as a check. Intervals: `prime_eval.intervals` (the PPL interval is exp of the
NLL interval).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np
import torch

from prime_eval.intervals import normal_interval, ppl_interval


class PerplexityStats:
    """Σ over blocks of the per-block score v_b (mean of its K samples) and scored positions n_b, plus what the
    standard errors need. `update` adds one block, `merge` adds another accumulator, `compute` gives the numbers.

    Between-block variance of the ratio R = Σv/Σn is kept as centred sums around a reference r0 (the first block's
    v/n): w_b = v_b - r0·n_b, Σw², Σwn, Σn² — exact algebra, no cancellation at r0 ≈ R.
    """

    def __init__(self, bootstrap: int = 0):
        self.blocks = self.tokens = self.bytes = self.samples = 0
        self.sum_v = 0.0
        self.r0: float | None = None
        self.sw = self.sw2 = self.swn = 0.0
        self.sn2 = 0.0
        self.mc_var = 0.0  # Σ_b s_b²/K_b over blocks with K_b > 1
        self.mc_blocks = 0
        self.boot_v = np.zeros(bootstrap)
        self.boot_n = np.zeros(bootstrap)

    def update(self, values: torch.Tensor, tokens: int, n_bytes: int = 0, boot_weights: np.ndarray | None = None):
        """values: (K,) per-sample NLL of one block (nats); tokens: its scored positions; n_bytes: its text bytes."""
        values = torch.as_tensor(values, dtype=torch.float64).flatten()
        k = values.numel()
        v = float(values.mean())
        if self.r0 is None:
            self.r0 = v / tokens if tokens else 0.0
        w = v - self.r0 * tokens
        self.blocks += 1
        self.tokens += tokens
        self.bytes += n_bytes
        self.samples += k
        self.sum_v += v
        self.sw += w
        self.sw2 += w * w
        self.swn += w * tokens
        self.sn2 += float(tokens) * tokens
        if k > 1:
            self.mc_var += float(values.var(unbiased=True)) / k
            self.mc_blocks += 1
        if self.boot_v.size:
            bw = np.ones(self.boot_v.size) if boot_weights is None else boot_weights
            self.boot_v += bw * v
            self.boot_n += bw * tokens

    def _rebased(self, r: float) -> tuple[float, float, float]:
        """(Σw, Σw², Σwn) with w = v - r·n."""
        d = r - (self.r0 or 0.0)
        return (self.sw - d * self.tokens, self.sw2 - 2 * d * self.swn + d * d * self.sn2, self.swn - d * self.sn2)

    def merge(self, other: PerplexityStats) -> PerplexityStats:
        if other.blocks == 0:
            return self
        if self.blocks == 0:
            self.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in other.__dict__.items()})
            return self
        sw, sw2, swn = other._rebased(self.r0)
        self.blocks += other.blocks
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.samples += other.samples
        self.sum_v += other.sum_v
        self.sw, self.sw2, self.swn = self.sw + sw, self.sw2 + sw2, self.swn + swn
        self.sn2 += other.sn2
        self.mc_var += other.mc_var
        self.mc_blocks += other.mc_blocks
        self.boot_v = self.boot_v + other.boot_v
        self.boot_n = self.boot_n + other.boot_n
        return self

    @property
    def nll(self) -> float:
        return self.sum_v / self.tokens if self.tokens else float("nan")

    def stderr_sampling(self) -> float:
        """Delta-method SE of R = Σv/Σn over i.i.d. blocks: sqrt(B/(B-1) Σ(v_b - R n_b)²) / Σn."""
        if self.blocks < 2 or not self.tokens:
            return float("nan")
        _, sw2, _ = self._rebased(self.nll)
        return math.sqrt(max(sw2, 0.0) * self.blocks / (self.blocks - 1)) / self.tokens

    def stderr_mc_within(self) -> float | None:
        """MC SE from the within-block variances (only when every block has K > 1)."""
        if self.mc_blocks == 0 or self.mc_blocks != self.blocks:
            return None
        return math.sqrt(self.mc_var) / self.tokens

    def compute(self, *, deterministic: bool = False) -> dict:
        nll = self.nll
        sampling = self.stderr_sampling()
        within = self.stderr_mc_within()
        if deterministic:
            se, method = 0.0, "exact (deterministic estimator: no Monte Carlo error)"
        elif within is not None:
            se, method = within, "within-block (K > 1): sqrt(Σ s_b²/K)/Σn"
        else:
            se, method = sampling, "between-block (K = 1; conservative: includes data variation)"
        lo, hi = normal_interval(nll, se)
        ppl, ppl_lo, ppl_hi = ppl_interval(nll, se)
        ln2 = math.log(2.0)
        bpb = self.sum_v / ln2 / self.bytes if self.bytes else None
        out = {
            "nll": nll, "nll_stderr": se, "nll_ci95": [lo, hi],
            "ppl": ppl, "ppl_ci95": [ppl_lo, ppl_hi],
            "bits_per_byte": bpb,
            "bits_per_byte_ci95": ([lo * self.tokens / ln2 / self.bytes, hi * self.tokens / ln2 / self.bytes]
                                   if self.bytes else None),
            "nll_stderr_method": method,
            "nll_stderr_sampling": sampling, "nll_stderr_mc_within": within,
            "nll_total": self.sum_v, "tokens": self.tokens, "blocks": self.blocks, "bytes": self.bytes,
            "samples": self.samples,
        }
        if self.boot_v.size and self.blocks >= 2:
            ok = self.boot_n > 0
            r = self.boot_v[ok] / self.boot_n[ok]
            out["nll_ci95_bootstrap"] = [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]
            out["bootstrap_replicates"] = int(self.boot_v.size)
        return out


def perplexity(values: Iterable, tokens: Iterable[int], n_bytes: Iterable[int] | None = None, *,
               deterministic: bool = False) -> dict:
    """Functional form: compute ∘ update over per-block (K,) values, scored positions and bytes (one shot)."""
    stats = PerplexityStats()
    for v, n, b in zip(values, tokens, n_bytes if n_bytes is not None else itertools.repeat(0)):
        stats.update(torch.as_tensor(v), int(n), int(b))
    return stats.compute(deterministic=deterministic)
