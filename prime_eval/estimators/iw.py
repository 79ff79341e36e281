"""Importance-weighted any-order estimator (`iw`): a lower bound on log p that rises to the exact likelihood.

A masked diffusion model's generative process reveals one position at a time in a uniformly random order σ
(sub-token positions and marginals for Prime), so with n diffused positions

    p(x_T | x_C) = Σ_σ (1/n!) Π_s p_θ(x_σ(s) | x_C, x_σ(<s)) = E_{σ~q}[ w(σ) ],   w(σ) = p(x, σ) / q(σ).

With K orders σ_k ~ q:  IW_K = log (1/K) Σ_k w(σ_k)  satisfies  E[IW_K] <= log p (Jensen), is non-decreasing in K
(Burda et al. 2016) and tends to log p; K=1, q uniform gives E[IW_1] = -NELBO (the ELBO). If q(σ) = p(σ | x), every
weight equals p(x) and IW_K = log p exactly. We report NLL = -IW_K (an upper bound on NLL in expectation).

Proposals:
- `uniform`: q(σ) = 1/n!, log w = Σ_s log p_θ(x_σ(s) | …).
- `pl` (Plackett–Luce on the model's own confidences): one extra pass with every target position masked gives
  θ_j = log p_θ(x_j | x_C, all target masked); orders are drawn by the Gumbel-top-k trick on θ_j/τ and
  log q(σ) = Σ_s [θ_σ(s)/τ − logsumexp_{r>=s} θ_σ(r)/τ] is exact, so the weights stay exact.
Each order needs n conditionals, all known in advance (we score, we do not sample), so the n·K rows of a request
are independent and batch like any other Monte Carlo rows. The `pl` pre-pass runs inside `rows()` on `self.net`.

Default proposal: `uniform`. In the exact audit (`prime-eval audit`, iw rows) the uniform proposal's bias at K=1, 4,
16 is several times smaller than Plackett–Luce's on confidences: "easy first" orders are not the posterior over orders.
"""
from __future__ import annotations

import math

import torch

from prime_eval import bound_kind as BK
from prime_eval.errors import UserError
from prime_eval.estimators.mdm import MDMEstimator
from prime_eval.estimators.prime import PrimeEstimator
from prime_eval.estimators.rows import Rows, forward_rows
from prime_eval.estimators.sampler import order_masks, reveal_orders


def log_mean_exp(a: torch.Tensor) -> float:
    return float(torch.logsumexp(a, 0) - math.log(a.numel()))


def plackett_luce_log_prob(order: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log q(σ) for (K, n) orders under Plackett–Luce with scores θ (n,): Σ_s θ_σ(s) − logsumexp_{r>=s} θ_σ(r)."""
    th = theta[order]  # (K, n) scores in order
    tail_lse = torch.logcumsumexp(th.flip(1), 1).flip(1)  # logsumexp over r >= s
    return (th - tail_lse).sum(1)


class IWEstimator:
    """IW_K over K orders. `base` is the valid `mc` estimator of the family (it supplies the marginals)."""

    deterministic = False
    bound_kind = BK.UPPER_BOUND
    is_bound = True
    name = "iw"

    def __init__(self, base, *, proposal: str = "uniform", tau: float = 1.0, net=None, max_positions: int = 4096):
        if base.name != "mc" or not base.is_bound:
            raise UserError("iw builds on the valid marginals; its base must be the family's `mc` estimator")
        if proposal not in ("uniform", "pl"):
            raise UserError(f"unknown proposal {proposal!r}; choose uniform or pl (Plackett–Luce)")
        if proposal == "pl" and net is None:
            raise UserError("the pl proposal needs the network (IWEstimator(..., net=net))")
        self.base, self.family, self.proposal, self.tau, self.net = base, base.family, proposal, tau, net
        self.mask_id = base.mask_id
        self.max_positions = max_positions

    def config(self) -> dict:
        cfg = self.base.config()
        cfg.update(estimator="iw", proposal=self.proposal, tau=self.tau, bound_kind=self.bound_kind, is_bound=True)
        return cfg

    def _n(self, target: torch.Tensor) -> int:
        return int(target.sum()) * (self.base.st.ell if self.family == "prime" else 1)

    def _confidences(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """θ_j = log p_θ(x_j | context, every target position masked), (n,)."""
        n = self._n(target)
        rows = self.base.rows_from_masks(x, target, torch.ones(1, n, dtype=torch.bool),
                                         torch.ones(1, dtype=torch.float64))
        (logits,) = forward_rows(self.net, [rows], 1)
        return -self.base.masked_nll(rows, logits)[0]

    def rows(self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator, num_samples: int) -> Rows:
        x, target = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(target, dtype=torch.bool)
        n, K = self._n(target), num_samples
        if n == 0:
            raise UserError("empty continuation: there is nothing to score")
        if n * K > self.max_positions:
            raise UserError(f"iw needs n·K = {n}·{K} = {n * K} forward rows for this request (limit "
                            f"{self.max_positions}); lower orders=K or use estimator=mc")
        v = torch.rand(K, n, generator=generator, dtype=torch.float64)  # (K, n) sample-major (kept: fixed numbers)
        if self.proposal == "uniform":
            order = reveal_orders(v)  # uniform random permutations
            log_q = torch.full((K,), -math.lgamma(n + 1), dtype=torch.float64)
        else:
            theta = self._confidences(x, target) / self.tau
            order = reveal_orders(v, theta)  # Gumbel-top-k = Plackett–Luce
            log_q = plackett_luce_log_prob(order, theta)
        # row (k, s): positions σ_k(>=s) masked, σ_k(<s) revealed; the loss needs position σ_k(s) only
        rows = self.base.rows_from_masks(x, target, order_masks(order), torch.ones(K * n, dtype=torch.float64))
        scored_pos = order.reshape(-1)  # (K·n,) the diffused position scored in each row
        ell = self.base.st.ell if self.family == "prime" else 1
        tok_positions = torch.nonzero(target).flatten()
        tok = tok_positions[scored_pos // ell]
        only = torch.zeros_like(rows.logits_at)
        only[torch.arange(K * n), tok] = True
        rows.logits_at, rows.data["score"] = only, only
        rows.num_samples = K
        rows.data.update(order=order, log_q=log_q, scored_pos=scored_pos, n=n)
        return rows

    row_local = True

    def logit_terms(self, rows: Rows, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Per-position terms of logit rows start..start+C: the base estimator's (one scored position per row)."""
        return self.base.logit_terms(rows, logits, start)

    def log_weights_from_terms(self, rows: Rows, terms: torch.Tensor) -> torch.Tensor:
        """(K,) log w_k = Σ_s log p_θ(x_σk(s) | …) − log n! − log q(σ_k)."""
        d = rows.data
        K, n = rows.num_samples, d["n"]
        table = self.base.masked_nll_from_terms(rows, terms)  # (K·n, n): nll of the scored token's positions
        nll = table[torch.arange(K * n), d["scored_pos"]].view(K, n).sum(1)
        return -nll - math.lgamma(n + 1) - d["log_q"]

    def log_weights(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        return self.log_weights_from_terms(rows, self.logit_terms(rows, logits))

    def cost_from_terms(self, rows: Rows, terms: torch.Tensor) -> torch.Tensor:
        """(K,) per-order values −log w_k; the estimate is `aggregate`, not their mean."""
        return -self.log_weights_from_terms(rows, terms)

    def cost(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        return self.cost_from_terms(rows, self.logit_terms(rows, logits))

    @staticmethod
    def aggregate(values: torch.Tensor) -> tuple[float, float]:
        """NLL estimate −log mean_k w_k and its delta-method SE  sqrt(Var(w)/K)/mean(w)."""
        lw = -values
        est = -log_mean_exp(lw)
        K = lw.numel()
        if K < 2:
            return est, float("nan")
        w = torch.exp(lw - lw.max())
        se = float(w.std(unbiased=True) / math.sqrt(K) / w.mean())
        return est, se

    @staticmethod
    def ess(values: torch.Tensor) -> float:
        """Effective sample size (Σw)² / Σw² of the K importance weights."""
        w = torch.exp(-values - (-values).max())
        return float(w.sum() ** 2 / (w**2).sum())


def make_iw(family: str, *, net=None, proposal: str = "uniform", tau: float = 1.0, mask_id=None, subtokenizer=None,
            carry_over: bool = False) -> IWEstimator:
    base = (MDMEstimator("mc", mask_id=mask_id) if family == "mdm"
            else PrimeEstimator("mc", subtokenizer=subtokenizer, carry_over=carry_over))
    return IWEstimator(base, proposal=proposal, tau=tau, net=net)
