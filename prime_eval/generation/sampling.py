"""Drawing a token from logits with an explicit uniform: the one categorical sampler of every family.

    x = min{c : F(c) > u · F(V-1)},   F(c) = Σ_{c' ≤ c} p(c'),   p = softmax(logits / τ) in float64

(the inverse CDF, so one uniform u ∈ [0, 1) per token and a token of probability 0 is never drawn). Before it, as in
transformers' sampling: top-k keeps the k largest logits (ties with the k-th kept), top-p keeps the smallest set of
most probable tokens whose probability reaches p (at least one). τ = 0 is the argmax (first maximum) and uses no u.
"""
from __future__ import annotations

import torch


def filtered_log_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                       top_p: float | None = None) -> torch.Tensor:
    """(N, V) -> float64 log softmax(logits / τ) restricted to the top-k / top-p candidates (-inf elsewhere); τ > 0."""
    x = logits.double() / float(temperature)
    if top_k is not None and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, int(top_k), dim=-1).values[..., -1:]  # (N, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1)  # ascending
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum <= 1.0 - float(top_p)
        drop[..., -1] = False  # the most probable token always stays
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x.log_softmax(-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(N, V) float64 probabilities (rows need not be normalised), (N,) uniforms -> (N,) long: the first c with
    F(c) > u · F(V-1); never a class of probability 0."""
    cdf = probs.cumsum(-1)  # (N, V)
    x = (u.to(cdf) * cdf[..., -1]).unsqueeze(-1)  # (N, 1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)  # (N,)
    last = (probs > 0).long().cumsum(-1).argmax(-1)  # the last class with mass (u·F rounded up to F)
    return torch.minimum(idx, last)


def sample(logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_k: int | None = None,
           top_p: float | None = None) -> torch.Tensor:
    """(N, V) logits -> (N,) token ids: argmax for τ = 0, else the inverse-CDF draw with uniforms u (N,)."""
    if temperature == 0:
        return logits.argmax(-1)
    return inverse_cdf(filtered_log_probs(logits, temperature, top_k, top_p).exp(), u)
