"""Tiny networks for audits and tests: small enough to enumerate every mask, order and sequence.

- `TinyDenoiser`: a 1-layer transformer (bidirectional for MDM/Prime, causal for ARM), random from a seed, float64.
  Prime inputs use the lit_gpt layout: a (b+1)·ℓ-row sub-token table, row digit + j·(b+1), summed per token.
- `OracleDenoiser`: tokens i.i.d. from a known categorical π_V; returns the *exact* conditional
  p(c | y_t) ∝ π_V(c)·1[c consistent with the token's visible digits], so the model's distribution is the data's.
Both satisfy the network contract of docs/ARCHITECTURE.md (`hidden`, `head`; forward = head ∘ hidden).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from prime_eval.networks.contract import HiddenHead, at_positions, position_inputs
from prime_eval.subtokenizer import SubTokenizer


class TinyDenoiser(HiddenHead, nn.Module):
    def __init__(self, family: str, vocab_size: int, *, ell: int = 1, base: int | None = None, d: int = 32,
                 n_head: int = 2, max_length: int = 64, seed: int = 0, scale: float = 1.0,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        self.family, self.vocab_size, self.ell, self.max_length = family, vocab_size, ell, max_length
        self.base = base if family == "prime" else None
        if family == "prime":
            self.mask_id = base
            n_rows = (base + 1) * ell
        else:
            self.mask_id = vocab_size if family == "mdm" else None
            n_rows = vocab_size + (1 if family == "mdm" else 0)
        g = torch.Generator().manual_seed(seed)
        self.wte = nn.Embedding(n_rows, d)
        self.wpe = nn.Embedding(max_length, d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.lm_head = nn.Linear(d, vocab_size)
        self.n_head = n_head
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5)
        self.to(dtype)  # float64 by default: audits compare against exact sums to ~1e-9

    def hidden(self, idx, *, attention_mask=None, at=None):
        """idx (B, L·ℓ) -> the states after the block (B, L, d), or (N, d) at `at` (B, L)."""
        if self.family == "prime":
            B, T = idx.shape
            L = T // self.ell
            rows = idx.view(B, L, self.ell) + torch.arange(self.ell, device=idx.device) * (self.base + 1)
            h = self.wte(rows).sum(2)  # (B, L, d) summed sub-token embeddings
        else:
            B, L = idx.shape
            h = self.wte(idx)
        h = h + self.wpe(torch.arange(L, device=idx.device))
        q, k, v = self.attn(h).view(B, L, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # (B, nh, L, hs) each
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :]  # (B, 1, 1, L) keys
        if self.family == "arm":
            causal = torch.ones(L, L, dtype=torch.bool, device=idx.device).tril()
            mask = causal if mask is None else mask & causal
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, -1))
        h = h + self.mlp(h)
        return at_positions(h, at)

    def head(self, h, inputs=None):
        """(..., d) -> logits (..., V) in the network's dtype (float64 by default)."""
        return self.lm_head(h)


class OracleDenoiser(HiddenHead, nn.Module):
    """Exact conditional of i.i.d. tokens with probabilities `probs` (V,), under the sub-tokenizer `st`."""

    def __init__(self, probs: torch.Tensor, st: SubTokenizer | None = None, family: str = "prime"):
        super().__init__()
        self.family, self.vocab_size = family, probs.numel()
        self.st = st or SubTokenizer(self.vocab_size, ell=1)
        self.ell, self.base = (self.st.ell, self.st.base) if family == "prime" else (1, None)
        self.mask_id = self.st.base if family == "prime" else self.vocab_size
        self.max_length = 1 << 20
        self.register_buffer("log_probs", probs.double().clamp_min(1e-300).log())
        self._dummy = nn.Parameter(torch.zeros(0))

    def hidden(self, idx, *, attention_mask=None, at=None):
        """The oracle's state of a position is its input: (B, L, ℓ) input ids as float64, or (N, ℓ) at `at`."""
        return position_inputs(idx, self.ell, at).double()

    def head(self, h, inputs=None):
        """(..., ℓ) input ids -> log π_V (..., V), -1e30 where a class disagrees with a visible digit (Prime)."""
        y = h.long()
        lp = self.log_probs.expand(*y.shape[:-1], -1)
        if self.family == "prime":
            ok = self.st.consistent(y.masked_fill(y == self.mask_id, -1))  # (..., V)
            lp = lp.masked_fill(~ok, -1e30)
        return lp.contiguous()  # float64: exact enough for audits
