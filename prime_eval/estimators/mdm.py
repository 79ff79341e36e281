"""Masked diffusion (MDM, ℓ = 1) likelihood estimators (method.md §2.1, §3.2).

The context is kept clean, the n target tokens are diffused. With the linear schedule α_t = 1 - t the
conditional NELBO is

    NELBO(x_T | x_C) = ∫_0^1 (1/t) E_{x_t ~ q_t} [ Σ_{i ∈ T: x_t^i = m} -log p_θ(x^i | x_t) ] dt       (weight -α'/(1-α) = 1/t)

Estimators (each returns K per-sample values whose mean is the estimate):
- `mc`          t_k = (u + k/K) mod 1 stratified (optionally floored at ε, or on a T-step grid), each target token
                masked with prob t_k, value = (1/t_k) Σ_masked -log p  (SMDM / MDLM).
- `exact_count` l_k = 1 + floor(n·(u + k/K) mod 1) masked tokens chosen uniformly, value = (n/l) Σ_masked -log p
                (LLaDA). Same expectation: Σ_l (1/n)(n/l) E_{|S|=l}[·] = Σ_S (|S|-1)!(n-|S|)!/n! · cost(S).
- `sqrt_count`  l_k = F⁻¹(u_k) for q(l) ∝ l^(-1/2), masked uniformly, value = Σ_masked -log p / (q(l)·l):
                exact_count with the count importance-sampled (same expectation; lower variance where small counts,
                weighted n/l, dominate it: benchmarks/variance.py).
- `levels`      K random orders; for each, the nested sets of its first l = n..1 positions, value
                Σ_l (1/l) Σ_{i∈S_l} -log p (every exact-count level once: stratified over l). n rows per sample.
- `chain_rule`  left-to-right: Σ_k -log p(x_k | x_C, x_{<k}, rest masked). Deterministic, n rows. It is the exact
                NLL of the left-to-right decoding process built from the MDM's conditionals, not the ELBO.
Optional classifier-free guidance (`cfg` > 0: logits = un + (cfg+1)(cond - un), context masked in `un`) turns any of
them into a score that is *not* a likelihood; the estimator then reports `is_bound = False`.
Mask sets and times come from `estimators.sampler` (one formula per estimator there); `cost` is `cost_from_terms` of
the per-position `logit_terms`, so logits can be reduced chunk by chunk (`estimators.rows.forward_terms`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prime_eval import bound_kind as BK
from prime_eval.errors import UserError
from prime_eval.estimators.rows import Rows
from prime_eval.estimators.sampler import MaskDraw, MaskSampler


class MDMEstimator:
    """Shared machinery of the ℓ=1 estimators. `mask_id` is the network's mask token (V for SMDM/MDLM)."""

    family = "mdm"

    def __init__(self, name: str, *, mask_id: int, eps: float = 0.0, T: int | None = None, cfg: float = 0.0):
        if name not in ("mc", "exact_count", "sqrt_count", "levels", "chain_rule"):
            raise UserError(f"unknown MDM estimator {name!r}; choose mc, exact_count, sqrt_count, levels or "
                            "chain_rule")
        if not 0.0 <= eps < 1.0:
            raise UserError(f"eps must lie in [0, 1), got {eps}")
        self.name, self.mask_id, self.eps, self.T, self.cfg = name, mask_id, eps, T, float(cfg)
        self.sampler = MaskSampler.for_estimator("mdm", name, eps=eps, T=T)

    @property
    def bound_kind(self) -> str:
        """What the mean is (`prime_eval.bound_kind`): CFG is not a likelihood; chain_rule is the exact NLL of the
        left-to-right process; every other estimator is an upper bound (NELBO)."""
        if self.cfg != 0.0:
            return BK.NOT_A_LIKELIHOOD
        return BK.EXACT_LEFT_TO_RIGHT if self.name == "chain_rule" else BK.UPPER_BOUND

    @property
    def is_bound(self) -> bool:
        """True when the mean is an upper bound on the model's NLL."""
        return BK.is_bound(self.bound_kind)

    @property
    def deterministic(self) -> bool:
        return self.name == "chain_rule"

    def config(self) -> dict:
        return {"family": self.family, "estimator": self.name, "eps": self.eps, "T": self.T, "cfg": self.cfg,
                "bound_kind": self.bound_kind, "is_bound": self.is_bound}

    # -- rows and costs ---------------------------------------------------------------------------------------
    def draw(self, target: torch.Tensor, generator: torch.Generator | None, num_samples: int, *,
             u: torch.Tensor | None = None) -> MaskDraw:
        """K mask sets over the n target positions from `self.sampler` (`estimators.sampler`): the per-sample
        uniforms u (K,) are drawn from `generator` unless given (`ppl` gives its block-stratified u)."""
        n = int(torch.as_tensor(target, dtype=torch.bool).sum())
        if n == 0:
            raise UserError("empty continuation: there is nothing to score")
        return self.sampler.draw(generator, num_samples, n, u=u)

    def rows(self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None, num_samples: int, *,
             u: torch.Tensor | None = None) -> Rows:
        """Rows of K samples: `rows_from_draw` of `draw`."""
        return self.rows_from_draw(x, target, self.draw(target, generator, num_samples, u=u))

    def rows_from_draw(self, x: torch.Tensor, target: torch.Tensor, draw: MaskDraw) -> Rows:
        """Rows of a mask draw (or of a slice of one, `MaskDraw.samples`)."""
        x, target = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(target, dtype=torch.bool)
        return self.rows_from_masks(x, target, draw.masks, draw.weights)

    def rows_from_masks(self, x: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                        weights: torch.Tensor) -> Rows:
        """Rows for given (R, n) masks over the target positions and (R,) weights (the audit enumerates these)."""
        pos = torch.nonzero(target).flatten()  # (n,) target token positions
        n, R = pos.numel(), masks.shape[0]
        noisy = torch.zeros(R, x.numel(), dtype=torch.bool)
        noisy[:, pos] = masks
        inputs = torch.where(noisy, torch.full_like(x, self.mask_id), x.expand(R, -1))
        score = noisy.clone()
        if self.name == "chain_rule":  # score only position k in row k
            score = torch.zeros_like(noisy)
            score[torch.arange(n), pos] = True
        data = {"x": x, "weights": weights, "score": score, "pos": pos}
        if self.cfg:
            uncond = inputs.clone()
            uncond[:, ~target] = self.mask_id  # context masked for the unconditional pass
            inputs, score = torch.cat([inputs, uncond]), torch.cat([score, score])
        per_sample = {"chain_rule": R, "levels": n}.get(self.name, 1)  # rows summed into one sample value
        data["rows_per_sample"] = per_sample
        return Rows(inputs=inputs, logits_at=score, num_samples=R // per_sample, data=data)

    def combine_cfg(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        if not self.cfg:
            return logits
        cond, un = logits.chunk(2)
        return un + (self.cfg + 1.0) * (cond - un)

    @property
    def row_local(self) -> bool:
        """Whether each logit row's terms depend on that row alone (not with CFG, which pairs two rows)."""
        return not self.cfg

    def logit_terms(self, rows: Rows, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(C,) float64 -log p(x^i | x_t) of logit rows start..start+C of `rows` (row-major over `logits_at`).

        The only per-position value the cost needs, so a caller may reduce the logits chunk by chunk and free them
        (`estimators.rows.forward_terms`); the whole request at once (start = 0) with CFG."""
        logits = self.combine_cfg(rows, logits)
        score, x = rows.data["score"], rows.data["x"]
        tgt = x.expand(score.shape[0], -1)[score][start:start + logits.shape[0]].to(logits.device)  # (C,)
        return -F.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1).double().cpu()

    def masked_nll_from_terms(self, rows: Rows, terms: torch.Tensor) -> torch.Tensor:
        """(R, n) float64: the terms of every scored target position placed in its row, 0 elsewhere."""
        score, x, pos = rows.data["score"], rows.data["x"], rows.data["pos"]
        full = torch.zeros(score.shape[0], x.numel(), dtype=torch.float64)
        full[score] = terms
        return full[:, pos]

    def masked_nll(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        """(R, n) float64: -log p(x^i | x_t) at each scored target position i, 0 elsewhere."""
        return self.masked_nll_from_terms(rows, self.logit_terms(rows, logits))

    def cost_from_terms(self, rows: Rows, terms: torch.Tensor) -> torch.Tensor:
        """(K,) float64 per-sample values: weight_k · Σ_{scored i} -log p(x^i | x_t)."""
        values = rows.data["weights"] * self.masked_nll_from_terms(rows, terms).sum(1)
        return values.view(-1, rows.data["rows_per_sample"]).sum(1)

    def cost(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        """(K,) float64 per-sample values from the logits at `rows.logits_at` (N, V)."""
        return self.cost_from_terms(rows, self.logit_terms(rows, logits))
