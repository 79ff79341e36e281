"""Megatron-Core networks of the MDM-Prime-v2 C4 scaling runs: the causal `GPTModel` (ARM) and the bidirectional
`MaskedDiffModel` (MDM with ℓ = 1, MDM-Prime-v2 with concatenated sub-token embeddings).

Written from the description in `shared/reference/checkpoint-formats.md` §4 and the released run scripts
(chen-hao-chao/mdm-prime-v2 `megatron/scripts/{arm,mdm,mdm-prime-v2}`): `--swiglu --normalization RMSNorm
--disable-bias-linear --qk-layernorm --position-embedding-type rope`, Transformer-Engine layer spec. Only that
variant is implemented: pre-norm RMSNorm (eps 1e-5) fused into the following linear (`layer_norm_weight`), fused
group-interleaved q/k/v, RMSNorm over the head dimension of every query and key head (shared gains) after the split
and before RoPE, RoPE base 10000 in the rotate-half convention over token positions, SwiGLU with
`linear_fc1` = [gate; up], no biases, final RMSNorm. Module attribute names are the checkpoint keys (canonical
form; `prime_eval.checkpoints.megatron_files` maps the other layouts onto them), so files load with `strict=True`:

    embedding.word_embeddings.weight                    ARM (V_pad, d) | MDM (V+1+pad_in, d) | Prime per §4.2
    {decoder|encoder}.layers.{i}.self_attention.linear_qkv.layer_norm_weight   (d,)
    {decoder|encoder}.layers.{i}.self_attention.linear_qkv.weight              ((H + 2g)·hs, d)
    {decoder|encoder}.layers.{i}.self_attention.q_layernorm.weight             (hs,)
    {decoder|encoder}.layers.{i}.self_attention.k_layernorm.weight             (hs,)
    {decoder|encoder}.layers.{i}.self_attention.linear_proj.weight             (d, H·hs)
    {decoder|encoder}.layers.{i}.mlp.linear_fc1.layer_norm_weight              (d,)
    {decoder|encoder}.layers.{i}.mlp.linear_fc1.weight                         (2·FFN, d)   [gate; up]
    {decoder|encoder}.layers.{i}.mlp.linear_fc2.weight                         (d, FFN)
    {decoder|encoder}.final_layernorm.weight                                   (d,)
    output_layer.weight                                 (V + pad_out, d); absent when tied (every released ARM,
                                                        and the 2359M / 3426M MDM scripts that omit --untie-...)
    subtokenizer.{mask, lookup_table, perm, inv_perm}   buffers of the sub-tokenizer, when saved (MaskedDiffModel)

Extra output classes (the ARM's vocabulary padding 50257 → 50304, `--padded-output 1`, the mask row of a tied MDM)
are never targets; logits are returned over the V = 50257 real tokens only, so every softmax is over real tokens
(docs/checkpoints.md, "Megatron C4 family").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from prime_eval.networks.contract import HiddenHead, at_positions
from prime_eval.networks.kv_cache import KVCache, begin, cached_attention, rope_rows, through_blocks
from prime_eval.networks.lit_gpt import (RMSNorm, apply_rope, build_rope_cache, grouped_attention, padding_key_mask,
                                         rms_norm, split_grouped_qkv)

GPT2_VOCAB = 50257  # every C4 run uses the GPT-2 BPE tokenizer

# size tag -> (num_layers, hidden_size, num_attention_heads, ffn_hidden_size): checkpoint-formats.md §4.1 (the tags
# of the run scripts `{arm,mdm,prime}_param_<tag>_iter_*.sh`; 315M is an ARM-only size)
SIZE_TAGS: dict[str, tuple[int, int, int, int]] = {
    "14M": (6, 448, 7, 1792), "25M": (8, 512, 8, 2048), "36M": (9, 576, 9, 2304), "49M": (10, 640, 10, 2560),
    "64M": (13, 640, 10, 2560), "79M": (16, 640, 10, 2560), "106M": (15, 768, 12, 3072),
    "154M": (16, 896, 16, 3584), "201M": (16, 1024, 16, 4096), "252M": (20, 1024, 16, 4096),
    "315M": (16, 1280, 10, 5120), "354M": (18, 1280, 10, 5120), "413M": (21, 1280, 10, 5120),
    "571M": (24, 1408, 11, 5632), "771M": (20, 1792, 14, 7168), "1107M": (22, 2048, 16, 8192),
    "1529M": (24, 2304, 18, 9216), "2359M": (30, 2560, 20, 10240), "3426M": (36, 2816, 22, 11264),
}
EMBEDDING_TYPES = ("cat-share", "cat")


def size_tag(num_layers: int, hidden_size: int, num_attention_heads: int, ffn_hidden_size: int) -> str | None:
    """The run scripts' size tag ("1107M") of these dimensions, or None."""
    dims = (num_layers, hidden_size, num_attention_heads, ffn_hidden_size)
    return next((tag for tag, t in SIZE_TAGS.items() if t == dims), None)


@dataclass
class MegatronConfig:
    """The Megatron arguments the networks read (Megatron's names), plus the row counts taken from the tensors."""

    name: str = ""  # size tag, e.g. "1107M"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None -> num_attention_heads (no --group-query-attention in the runs)
    ffn_hidden_size: int = 256
    kv_channels: int | None = None  # head size hs; None -> hidden_size / num_attention_heads
    vocab_size: int = GPT2_VOCAB  # V real tokens: logits are returned over exactly these classes
    embedding_rows: int | None = None  # rows of embedding.word_embeddings (None: ARM V, MDM V + 1, Prime per type)
    output_rows: int | None = None  # rows of output_layer.weight (None: V); tied: the embedding's rows
    untie_embeddings_and_output_weights: bool = True
    seq_length: int = 2048  # max tokens
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    norm_epsilon: float = 1e-5
    # MaskedDiffModel: sub-tokens per token ℓ, base b (MDM: ℓ = 1, b = V), embedding type, and the shapes of the
    # sub-tokenizer buffers saved with the weights ({} when the file has none)
    target_length: int = 1
    base: int | None = None
    embedding_type: str = "cat-share"
    subtokenizer_buffers: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_query_groups={self.num_query_groups}")
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"embedding_type={self.embedding_type!r}: only {EMBEDDING_TYPES} are implemented "
                             "(every released run uses cat-share)")

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_percent)

    def non_embedding_params(self) -> int:
        """Per layer 2d + 2hs + d·(H + 2g)·hs + H·hs·d + 3·d·FFN, plus the final norm d."""
        d, hs, H, g, f = self.hidden_size, self.kv_channels, self.num_attention_heads, self.num_query_groups, \
            self.ffn_hidden_size
        return self.num_layers * (2 * d + 2 * hs + d * (H + 2 * g) * hs + H * hs * d + 3 * d * f) + d


# ----------------------------------------------------------------------------------------------------------------
# Layers (dependency order)


class LayerNormLinear(nn.Module):
    """Transformer Engine's `LayerNormColumnParallelLinear` with RMSNorm: y = W · RMSNorm(x; layer_norm_weight)."""

    def __init__(self, in_features: int, out_features: int, eps: float):
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features))
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.layer_norm_weight, self.eps), self.weight)


class SelfAttention(nn.Module):
    """linear_qkv (fused pre-norm) → split per query group → q/k RMSNorm per head → RoPE → SDPA → linear_proj."""

    def __init__(self, config: MegatronConfig):
        super().__init__()
        d, hs = config.hidden_size, config.kv_channels
        H, g = config.num_attention_heads, config.num_query_groups
        self.linear_qkv = LayerNormLinear(d, (H + 2 * g) * hs, config.norm_epsilon)
        self.q_layernorm = RMSNorm(hs, eps=config.norm_epsilon)
        self.k_layernorm = RMSNorm(hs, eps=config.norm_epsilon)
        self.linear_proj = nn.Linear(H * hs, d, bias=False)
        self.n_head, self.n_query_groups, self.head_size, self.rotary_dim = H, g, hs, config.rotary_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, causal: bool,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin)
        return self.linear_proj(grouped_attention(q, k, v, causal=causal, key_mask=key_mask))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q, k, v = split_grouped_qkv(self.linear_qkv(x), self.n_head, self.n_query_groups, self.head_size)
        q, k = self.q_layernorm(q), self.k_layernorm(k)  # (B, H, L, hs), (B, g, L, hs): over hs, before RoPE
        n = self.rotary_dim
        q = torch.cat((apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        return q, k, v

    def forward_cached(self, x, cos, sin, past, mask):
        """New tokens x (B, L, d) over the cached slots (`prime_eval.networks.kv_cache`): (out, keys, values)."""
        q, k, v = self.qkv(x, cos, sin)
        y, k, v = cached_attention(q, k, v, past, mask, scale=1.0 / math.sqrt(self.head_size))
        return self.linear_proj(y), k, v


class MLP(nn.Module):
    """linear_fc2(SiLU(gate) ⊙ up), [gate; up] = linear_fc1(RMSNorm(x)) (Megatron's gated linear unit)."""

    def __init__(self, config: MegatronConfig):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.linear_fc1 = LayerNormLinear(d, 2 * f, config.norm_epsilon)
        self.linear_fc2 = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)  # (B, L, FFN) each
        return self.linear_fc2(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    """x ← x + self_attention(x); x ← x + mlp(x)  (the pre-norms live inside linear_qkv and linear_fc1)."""

    def __init__(self, config: MegatronConfig):
        super().__init__()
        self.self_attention = SelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, *, causal: bool, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attention(x, cos, sin, causal=causal, key_mask=key_mask)
        return x + self.mlp(x)

    def forward_cached(self, x, cos, sin, past, mask):
        h, k, v = self.self_attention.forward_cached(x, cos, sin, past, mask)
        x = x + h
        return x + self.mlp(x), k, v


class TransformerBlock(nn.Module):
    def __init__(self, config: MegatronConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.norm_epsilon)


class LanguageModelEmbedding(nn.Module):
    """`embedding.word_embeddings` only: RoPE runs need no position table; dropout is off at evaluation."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(rows, width)


class SubtokenizerBuffers(nn.Module):
    """The buffers of upstream's `BasebLayer` / `BasebShufflingLayer`, as saved with the weights:
    `mask` (ℓ,) = b^(ℓ-1-j), `lookup_table` (b^ℓ, ℓ) big-endian digits, `perm` / `inv_perm` (b^ℓ,) π and π⁻¹.
    Checked when loaded: a table that is not f_ℓ for (b, ℓ), or a `perm` that is not a permutation with `inv_perm`
    its inverse, is an error (the network would be fed digits of a different sub-tokenizer)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], base: int, ell: int):
        super().__init__()
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.long))
        self.base, self.ell = base, ell
        self.register_load_state_dict_post_hook(lambda module, _keys: module.check())

    def permutation(self) -> torch.Tensor | None:
        """`perm` when saved and non-empty (upstream stores empty buffers for ℓ = 1), else None."""
        p = self._buffers.get("perm")
        return p if p is not None and p.numel() else None

    def check(self) -> None:
        from prime_eval.errors import UserError
        from prime_eval.subtokenizer import check_permutation

        b, ell = self.base, self.ell
        powers = b ** torch.arange(ell - 1, -1, -1)  # (ℓ,)
        mask, table = self._buffers.get("mask"), self._buffers.get("lookup_table")
        if mask is not None and mask.numel() and not torch.equal(mask.cpu(), powers):
            raise UserError(f"subtokenizer.mask in the checkpoint is {mask.tolist()[:4]}…, not the powers of b={b} "
                            f"for ℓ={ell}: the file's sub-tokenizer differs from the one detected")
        if table is not None and table.numel():
            digits = (torch.arange(table.shape[0])[:, None] // powers) % b  # (b^ℓ, ℓ)
            if table.shape != digits.shape or not torch.equal(table.cpu(), digits):
                raise UserError(f"subtokenizer.lookup_table {tuple(table.shape)} in the checkpoint is not the "
                                f"base-{b} digit table of ℓ={ell}: the file's sub-tokenizer differs")
        perm, inv = self.permutation(), self._buffers.get("inv_perm")
        if perm is not None:
            check_permutation(perm.cpu(), b ** ell, source="subtokenizer.perm in the checkpoint")
            if inv is None or not torch.equal(inv.cpu()[perm.cpu()], torch.arange(b ** ell)):
                raise UserError("subtokenizer.inv_perm in the checkpoint is not the inverse of subtokenizer.perm")


# ----------------------------------------------------------------------------------------------------------------
# Networks


class _MegatronBase(HiddenHead, nn.Module):
    """Embedding → transformer block → final norm (`hidden`) → logits over the V real tokens (`head`: untied
    `output_layer`, or tied to the embedding table). Subclasses name the block (`decoder` / `encoder`) and define
    `embed`."""

    family = "arm"
    causal = True

    def __init__(self, config: MegatronConfig, *, embedding_rows: int, embedding_width: int):
        super().__init__()
        self.config = config
        self.embedding = LanguageModelEmbedding(embedding_rows, embedding_width)
        if config.untie_embeddings_and_output_weights:
            self.output_layer = nn.Linear(config.hidden_size, config.output_rows or config.vocab_size, bias=False)
        self.vocab_size = config.vocab_size
        self.max_length = config.seq_length  # tokens
        self.ell, self.base, self.mask_id = 1, None, None

    @property
    def block(self) -> TransformerBlock:
        raise NotImplementedError

    def output_weight(self) -> torch.Tensor:
        """(V, d): the output rows of the real tokens; padding / never-target rows are dropped here."""
        w = self.output_layer.weight if self.config.untie_embeddings_and_output_weights \
            else self.embedding.word_embeddings.weight
        return w[: self.vocab_size]

    def embed(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, L, d)
        return self.embedding.word_embeddings(idx)

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, L·ℓ) -> final hidden states (after `final_layernorm`) (B, L, d), or (N, d) at the True entries
        of `at` (B, L).

        attention_mask (B, L) bool, True = real token, padding on the right: the bidirectional model ignores padded
        keys; the causal model needs no mask for right padding.
        """
        x = self.embed(idx)  # (B, L, d)
        L = x.shape[1]
        if L > self.max_length:
            raise ValueError(f"sequence of {L} tokens exceeds seq_length={self.max_length}")
        cfg = self.config
        cos, sin = build_rope_cache(L, cfg.rotary_dim, base=cfg.rotary_base, device=x.device, round_bf16=False)
        key_mask = None if self.causal else padding_key_mask(attention_mask, x.device)
        for layer in self.block.layers:
            x = layer(x, cos, sin, causal=self.causal, key_mask=key_mask)
        return at_positions(self.block.final_layernorm(x), at)  # (B, L, d) | (N, d)

    def head(self, h: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d) -> fp32 logits (..., V) over the real tokens (`output_weight`)."""
        return F.linear(h, self.output_weight()).float()

    @torch.no_grad()
    def hidden_cached(self, idx: torch.Tensor, cache: KVCache | None = None, *, valid: torch.Tensor | None = None,
                      at: torch.Tensor | None = None, explicit=None,
                      keep_cache: bool = True) -> tuple[torch.Tensor, KVCache | None]:
        """GPTModel: `hidden` over a key/value cache, as in `prime_eval.networks.kv_cache` (idx (B, L) new tokens,
        valid (B, L) False at padding, explicit (positions, mask) without a cache) -> (hidden states, extended
        cache or None without `keep_cache`)."""
        pos, mask, all_valid, length = begin(self, idx, cache, valid, explicit, keep_cache)
        x = self.embed(idx)  # (B, L, d)
        cfg = self.config
        cos, sin = build_rope_cache(int(pos.max()) + 1, cfg.rotary_dim, base=cfg.rotary_base, device=x.device,
                                    round_bf16=False)
        cos, sin = rope_rows(cos, sin, pos)  # (B, 1, L, n/2)
        x, keys, values = through_blocks(self.block.layers, x, cos, sin, cache, mask, keep=keep_cache)
        return at_positions(self.block.final_layernorm(x), at), \
            (KVCache(keys, values, all_valid, length) if keep_cache else None)


class GPTModel(_MegatronBase):
    """ARM (`pretrain_gpt.py`): causal `decoder`; the embedding has Megatron's padded vocabulary (50257 rounded up to
    a multiple of 128·TP: 50304 or 50432 rows), tied to the output unless `output_layer.weight` is present."""

    family = "arm"
    causal = True

    def __init__(self, config: MegatronConfig):
        super().__init__(config, embedding_rows=config.embedding_rows or config.vocab_size,
                         embedding_width=config.hidden_size)
        self.decoder = TransformerBlock(config)

    @property
    def block(self) -> TransformerBlock:
        return self.decoder


class MaskedDiffModel(_MegatronBase):
    """MDM (ℓ = 1) and MDM-Prime-v2 (ℓ > 1) of `pretrain_mask_diff.py`: bidirectional `encoder`.

    ℓ = 1: idx (B, L) token ids, mask id V = 50257; table (V + 1 + padded_input, d).
    ℓ > 1: idx (B, L·ℓ) base-b digits of π(x), token-major, mask digit b (upstream `get_batch`: mask_id = args.base).
      `cat-share`: one (b + 1 + padded_input, d/ℓ) table for every digit position;
      `cat`: row idx + (q mod ℓ)·(b+1) of a ((b+1)·ℓ, d/ℓ) table;
      the ℓ vectors of a token are concatenated, digit 0 (most significant) in the first d/ℓ features.
    The released Prime runs: ℓ = 16, b = 2, cat-share, ids shuffled by `perm_1.0_65536.pt` (also saved as
    `subtokenizer.perm` when the checkpoint carries the sub-tokenizer buffers; see `saved_perm`).
    """

    causal = False

    def __init__(self, config: MegatronConfig):
        ell, V = config.target_length, config.vocab_size
        base = config.base or V
        if ell == 1:
            rows, width = config.embedding_rows or V + 1, config.hidden_size
        else:
            if config.hidden_size % ell:
                raise ValueError(f"hidden_size={config.hidden_size} is not divisible by target_length={ell}")
            if base ** ell < V:
                raise ValueError(f"base={base}, target_length={ell} give {base ** ell} codes < vocab_size={V}")
            default_rows = base + 1 if config.embedding_type == "cat-share" else (base + 1) * ell
            rows, width = config.embedding_rows or default_rows, config.hidden_size // ell
        super().__init__(config, embedding_rows=rows, embedding_width=width)
        self.encoder = TransformerBlock(config)
        if config.subtokenizer_buffers:
            self.subtokenizer = SubtokenizerBuffers(config.subtokenizer_buffers, base, ell)
        self.ell, self.base, self.mask_id = ell, (base if ell > 1 else None), base
        self.family = "prime" if ell > 1 else "mdm"

    @property
    def block(self) -> TransformerBlock:
        return self.encoder

    @property
    def saved_perm(self) -> torch.Tensor | None:
        """π as saved with the weights (`subtokenizer.perm`), or None when the checkpoint does not carry it."""
        st = getattr(self, "subtokenizer", None)
        return None if st is None else st.permutation()

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        if self.ell == 1:
            return self.embedding.word_embeddings(idx)  # (B, L, d)
        B, T = idx.shape
        if T % self.ell:
            raise ValueError(f"input length {T} is not a multiple of ell={self.ell}")
        if self.config.embedding_type == "cat":
            slot = torch.arange(T, device=idx.device) % self.ell  # (T,) digit position j
            idx = idx + slot * (self.base + 1)
        emb = self.embedding.word_embeddings(idx)  # (B, L·ℓ, d/ℓ)
        return emb.reshape(B, T // self.ell, -1)  # (B, L, d): digit j in features j·d/ℓ … (j+1)·d/ℓ


NETWORKS = {"GPTModel": GPTModel, "MaskedDiffModel": MaskedDiffModel}
