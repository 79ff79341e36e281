"""Masked diffusion (MDM, ℓ = 1) likelihood estimators (method.md §2.1, §3.2).

The context is kept clean, the n target tokens are diffused. With the linear schedule α_t = 1 - t the
conditional NELBO is

    NELBO(x_T | x_C) = ∫_0^1 (1/t) E_{x_t ~ q_t} [ Σ_{i ∈ T: x_t^i = m} -log p_θ(x^i | x_t) ] dt       (weight -α'/(1-α) = 1/t)

Estimators (each returns K per-sample values whose mean is the estimate):
- `mc`          t_k = (u + k/K) mod 1 stratified (optionally floored at ε, or on a T-step grid), each target token
                masked with prob t_k, value = (1/t_k) Σ_masked -log p  (SMDM / MDLM).
- `exact_count` l_k = 1 + floor(n·(u + k/K) mod 1) masked tokens chosen uniformly, value = (n/l) Σ_masked -log p
                (LLaDA). Same expectation: Σ_l (1/n)(n/l) E_{|S|=l}[·] = Σ_S (|S|-1)!(n-|S|)!/n! · cost(S).
- `levels`      K random orders; for each, the nested sets of its first l = n..1 positions, value
                Σ_l (1/l) Σ_{i∈S_l} -log p (every exact-count level once: stratified over l). n rows per sample.
- `chain_rule`  left-to-right: Σ_k -log p(x_k | x_C, x_{<k}, rest masked). Deterministic, n rows. It is the exact
                NLL of the left-to-right decoding process built from the MDM's conditionals, not the ELBO.
Optional classifier-free guidance (`cfg` > 0: logits = un + (cfg+1)(cond - un), context masked in `un`) turns any of
them into a score that is *not* a likelihood; the estimator then reports `is_bound = False`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prime_eval import bound_kind as BK
from prime_eval.errors import UserError
from prime_eval.estimators.rows import Rows, stratified_uniform


def sample_times(generator: torch.Generator, k: int, *, eps: float = 0.0, T: int | None = None) -> torch.Tensor:
    """(K,) float64 diffusion times: stratified u_k, then t = ε + (1-ε)u (MDLM floor) or t = ceil(u·T)/T (T steps).

    Discrete time: with t_i = i/T, the T-step ELBO weight (α_s - α_t)/(1 - α_t) = 1/(T t_i), times T for the uniform
    draw of i, gives the same value (1/t) Σ_masked -log p on the grid.
    """
    u = stratified_uniform(generator, k)
    if T:
        return torch.ceil(u * T).clamp_min(1) / T
    return eps + (1.0 - eps) * u


def position_uniforms(generator: torch.Generator, k: int, n: int) -> torch.Tensor:
    """(K, n) float64 uniforms drawn position-major: position i's K draws do not depend on n, so the choices of one
    document, scored with the same generator seed, share t_k and the draws of their common positions (common random
    numbers: the variance of the *difference* between choices shrinks)."""
    return torch.rand(n, k, generator=generator, dtype=torch.float64).T


def mask_independent(generator: torch.Generator, t: torch.Tensor, n: int) -> torch.Tensor:
    """(K, n) bool: each of n positions masked independently with prob t_k."""
    return position_uniforms(generator, t.numel(), n) < t[:, None]


def random_ranks(generator: torch.Generator, k: int, n: int) -> torch.Tensor:
    """(K, n) long: a uniformly random reveal rank of each position (rank < l: the l first in a random order)."""
    return position_uniforms(generator, k, n).argsort(dim=1).argsort(dim=1)


def mask_exact_count(generator: torch.Generator, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, n) bool masks with l_k = 1 + floor(n·u_k) masked positions (u_k stratified), and l_k (K,)."""
    u = stratified_uniform(generator, k)
    counts = (torch.floor(u * n).long() + 1).clamp(1, n)
    return random_ranks(generator, k, n) < counts[:, None], counts


def mask_levels(generator: torch.Generator, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K·n, n) nested masks: for each of K random orders, the sets of its first l = n..1 positions; weights 1/l.

    Σ_l (1/l) Σ_{i∈S_l} -log p(x_i | x_{-S_l}) has expectation Σ_l (1/l) E_{|S|=l}[...] = the NELBO (each level l is
    the exact-count estimator at l, every level taken once: stratification over l, with nested sets as common
    random numbers between levels). n rows per sample."""
    ranks = random_ranks(generator, k, n)  # (K, n)
    levels = torch.arange(n, 0, -1)  # l = n, n-1, ..., 1
    masks = ranks[:, None, :] < levels[None, :, None]  # (K, n_levels, n)
    return masks.reshape(k * n, n), (1.0 / levels.double()).repeat(k)


class MDMEstimator:
    """Shared machinery of the ℓ=1 estimators. `mask_id` is the network's mask token (V for SMDM/MDLM)."""

    family = "mdm"

    def __init__(self, name: str, *, mask_id: int, eps: float = 0.0, T: int | None = None, cfg: float = 0.0):
        if name not in ("mc", "exact_count", "levels", "chain_rule"):
            raise UserError(f"unknown MDM estimator {name!r}; choose mc, exact_count, levels or chain_rule")
        if not 0.0 <= eps < 1.0:
            raise UserError(f"eps must lie in [0, 1), got {eps}")
        self.name, self.mask_id, self.eps, self.T, self.cfg = name, mask_id, eps, T, float(cfg)

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

    # -- masks ------------------------------------------------------------------------------------------------
    def masks(self, n: int, generator: torch.Generator, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K', n) bool masks over the target and (K',) float64 weights; K' = n for chain_rule."""
        if self.name == "mc":
            t = sample_times(generator, k, eps=self.eps, T=self.T)
            return mask_independent(generator, t, n), 1.0 / t
        if self.name == "exact_count":
            m, counts = mask_exact_count(generator, k, n)
            return m, n / counts.double()
        if self.name == "levels":
            return mask_levels(generator, k, n)
        # chain_rule: row k masks target positions >= k and scores position k
        ar = torch.arange(n)
        return ar[None, :] >= ar[:, None], torch.ones(n, dtype=torch.float64)

    # -- rows and costs ---------------------------------------------------------------------------------------
    def rows(self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator, num_samples: int) -> Rows:
        x, target = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(target, dtype=torch.bool)
        n = int(target.sum())
        if n == 0:
            raise UserError("empty continuation: there is nothing to score")
        masks, weights = self.masks(n, generator, num_samples)
        return self.rows_from_masks(x, target, masks, weights)

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

    def masked_nll(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        """(R, n) float64: -log p(x^i | x_t) at each scored target position i, 0 elsewhere."""
        logits = self.combine_cfg(rows, logits)
        score, x, pos = rows.data["score"], rows.data["x"], rows.data["pos"]
        R = score.shape[0]
        tgt = x.expand(R, -1)[score].to(logits.device)  # (N,) row-major, matching the logits
        nll = -F.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1).double().cpu()
        full = torch.zeros(R, x.numel(), dtype=torch.float64)
        full[score] = nll
        return full[:, pos]

    def cost(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        """(K,) float64 per-sample values: weight_k · Σ_{scored i} -log p(x^i | x_t)."""
        values = rows.data["weights"] * self.masked_nll(rows, logits).sum(1)
        return values.view(-1, rows.data["rows_per_sample"]).sum(1)


def mask_set_weight(k: int, n: int, T: int | None = None) -> float:
    """Exact probability-weight product E[w(t)·1{S masked}] for a set S of size k among n (audit reference).

    Continuous time, t ~ U(0,1), w = 1/t:  ∫ t^{k-1}(1-t)^{n-k} dt = (k-1)!(n-k)!/n!.
    T-step grid t_i = i/T, i uniform:      (1/T) Σ_i t_i^{k-1} (1-t_i)^{n-k}.
    """
    if k == 0:
        return 0.0
    if T:
        return sum((i / T) ** (k - 1) * (1 - i / T) ** (n - k) for i in range(1, T + 1)) / T
    return math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)
