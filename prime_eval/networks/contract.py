"""The two halves of every network (docs/ARCHITECTURE.md, "Network contract"): the trunk's final hidden states at the
positions that need logits, and the output head that turns them into logits, with forward = head ∘ hidden:

    h = net.hidden(idx, attention_mask=am, at=logits_at)          # (N, d): after the final norm / modulation
    logits = net.head(h, position_inputs(idx, net.ell, logits_at))  # (N, V) fp32 (fp64: exact toy networks)

Callers that hold many positions apply the head a fixed number of rows at a time (`estimators.rows`), so the logits of
a pass are never held at once and every head call has the same shape. `head` is position-wise: a row's logits depend
on its hidden state (and, for carry-over, its own input digits) alone.
"""
from __future__ import annotations

import torch


def at_positions(x: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
    """Per-position values (B, L, ...) -> (N, ...) at the True entries of `at` (B, L), row-major; all without `at`."""
    return x if at is None else x[at.to(x.device)]


def position_inputs(idx: torch.Tensor, ell: int, at: torch.Tensor | None = None) -> torch.Tensor:
    """idx (B, L·ℓ) -> each token position's input ids (B, L, ℓ), or (N, ℓ) at the True entries of `at` (B, L),
    row-major: what a head that reads its inputs (carry-over) needs next to the hidden states."""
    B, T = idx.shape
    return at_positions(idx.view(B, T // ell, ell), at)  # (B, L, ℓ) | (N, ℓ)


class HiddenHead:
    """`forward` and `forward_cached` of a network from its halves (mixed into the network classes):

        forward(idx, attention_mask, logits_at)  = head(hidden(idx, attention_mask, at=logits_at), inputs at logits_at)
        forward_cached(idx, cache, ..., logits_at) = head(h), cache   with  h, cache = hidden_cached(...)

    A network defines `hidden(idx, *, attention_mask=None, at=None, **options)`, `head(h, inputs=None)` and, when it
    has a key/value cache (causal networks, `prime_eval.networks.kv_cache`), `hidden_cached(idx, cache=None, *,
    valid=None, at=None, explicit=None, keep_cache=True) -> (h, cache or None)`."""

    def forward(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, **options) -> torch.Tensor:
        """idx (B, L·ℓ) -> logits (B, L, V), or (N, V) at the True entries of `logits_at` (B, L), row-major.

        attention_mask (B, L) bool, True = real token, padding on the right (docs/ARCHITECTURE.md)."""
        h = self.hidden(idx, attention_mask=attention_mask, at=logits_at, **options)
        return self.head(h, position_inputs(idx, self.ell, logits_at))

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache=None, *, valid: torch.Tensor | None = None,
                       logits_at: torch.Tensor | None = None, explicit=None):
        """`forward` over a key/value cache (`prime_eval.networks.kv_cache`): new tokens idx (B, L), valid (B, L)
        (False: padding), explicit (positions, `Parts`) -> (logits as `forward`, the extended cache; None for a
        packed pass, which keeps none)."""
        h, cache = self.hidden_cached(idx, cache, valid=valid, at=logits_at, explicit=explicit,
                                      keep_cache=explicit is None)
        return self.head(h, position_inputs(idx, self.ell, logits_at)), cache
