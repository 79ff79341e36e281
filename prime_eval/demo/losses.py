"""The training objective of each family, per real token of a batch (pure: network, batch, generator in; a scalar
torch tensor out). Masks come from the harness's one sampler (`prime_eval.estimators.sampler.batch_masks`).

    ARM     next-token cross-entropy of `[BOS] doc [EOS]`
    MDM     the NELBO in its exact-count form (LLaDA): l ~ U{1..n} of the n positions masked uniformly, the masked
            positions' cross-entropy weighted n/l (same expectation as t ~ U(0, 1) with weight 1/t, lower variance)
    Prime   a mixture (1−λ)·marginal + λ·joint over y = f_ℓ(π(x)), l ~ U{1..N} of the N = n·ℓ sub-tokens masked,
            weight N/l:
              marginal  the valid NELBO (method.md §2.4): each masked sub-token pays −log of its marginal
                        p_θ(y^{i,j} | y_t) = Σ_{c: digit_j(π(c)) = y^{i,j}} p̃_θ(c | y_t)   (what `mc` charges)
              joint     the published v2 objective (method.md §2.3): every real token pays its V-way cross-entropy
                        −log p̃_θ(x^i | y_t), fully visible tokens included   (what `legacy_joint` charges)
            λ = `TrainSpec.joint_weight`. Both terms have the true posterior as their minimiser; the joint term is the
            only one that shows the network fully visible tokens (a network trained on the marginal loss alone never
            learns to copy them, and legacy_joint charges them), the marginal term trains what the valid bound
            charges.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prime_eval.estimators.sampler import batch_masks


def real_positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: position p of row b is a real token (p < lengths[b]); the rest is right padding."""
    return torch.arange(width)[None, :] < lengths[:, None]


def arm_loss(net, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real positions after the first: x (B, L), lengths (B,)."""
    valid = real_positions(lengths, x.shape[1])[:, 1:]  # (B, L-1)
    logits = net(x[:, :-1], logits_at=valid)  # (N, V)
    return F.cross_entropy(logits, x[:, 1:][valid])


def mdm_loss(net, x: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exact-count NELBO per real token: Σ_b (n_b/l_b) Σ_{masked} CE / Σ_b n_b."""
    B, L = x.shape
    real = real_positions(lengths, L)
    masks, weights = batch_masks(generator, lengths, L)  # (B, L) bool, (B,) n_b / l_b
    xin = torch.where(masks, torch.full_like(x, net.mask_id), x)
    logits = net(xin, attention_mask=real, logits_at=masks)  # (N, V)
    ce = F.cross_entropy(logits, x[masks], reduction="none")  # (N,)
    w = weights.float()[:, None].expand(B, L)[masks]
    return (ce * w).sum() / real.sum()


def prime_loss(net, x: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator, st,
               joint_weight: float) -> torch.Tensor:
    """(1−λ)·marginal + λ·joint per real token (module docstring); st: the `SubTokenizer` (V, ℓ, b, π)."""
    B, L = x.shape
    ell, b = st.ell, st.base
    real = real_positions(lengths, L)  # (B, L)
    y = st.encode(x).view(B, L, ell)  # (B, L, ℓ) digits
    masks, weights = batch_masks(generator, lengths * ell, L * ell)  # (B, L·ℓ) bool, (B,) N_b / l_b
    masks = masks.view(B, L, ell)
    yin = torch.where(masks, torch.full_like(y, b), y).view(B, L * ell)
    logits = net(yin, attention_mask=real, logits_at=real)  # (N, V) at every real token, row-major
    w = weights.float()[:, None].expand(B, L)[real]  # (N,)
    n_real = real.sum()
    loss = torch.zeros(())
    if joint_weight > 0:
        joint = F.cross_entropy(logits, x[real], reduction="none")  # (N,) −log p̃(x^i | y_t)
        loss = loss + joint_weight * (joint * w).sum() / n_real
    if joint_weight < 1:
        sub = masks[real]  # (N, ℓ) which digits are masked
        probs = torch.softmax(logits, dim=-1)  # (N, V)
        marg = probs @ st.digit_onehot().to(probs.dtype)  # (N, ℓ·b): p(y^j = v | y_t)
        cols = y[real] + torch.arange(ell) * b  # (N, ℓ) column of the true digit
        q = marg.gather(1, cols).clamp_min(torch.finfo(marg.dtype).tiny)  # (N, ℓ)
        marginal = (-q.log() * sub).sum(1)  # (N,) Σ over the token's masked digits
        loss = loss + (1.0 - joint_weight) * (marginal * w).sum() / n_real
    return loss


def loss_fn(family: str, net, x: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator, *, st=None,
            joint_weight: float = 0.0) -> torch.Tensor:
    """The training objective of `family` on a batch (x (B, L) right-padded, lengths (B,))."""
    if family == "arm":
        return arm_loss(net, x, lengths)
    if family == "mdm":
        return mdm_loss(net, x, lengths, generator)
    return prime_loss(net, x, lengths, generator, st, joint_weight)
