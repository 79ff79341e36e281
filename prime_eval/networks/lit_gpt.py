"""lit_gpt networks of the SMDM / MDM-Prime-v2 SlimPajama releases: the causal `GPT` (ARM) and the bidirectional
`TransEncoder` (MDM with ℓ = 1, MDM-Prime with summed sub-token embeddings).

Written from the description in `shared/reference/checkpoint-formats.md` §1 (upstream: `lit_gpt/model.py` and
`lit_gpt/diffmodel.py` of ML-GSAI/SMDM and chen-hao-chao/mdm-prime-v2). Only the variant every `Diff_LLaMA_*M`
config uses is implemented: pre-norm sequential blocks, RMSNorm (eps 1e-5), no biases, SwiGLU MLP, full-head
GPT-NeoX-style RoPE, group-interleaved fused q/k/v, untied `lm_head` (`tie_embeddings=True`: an ARM whose output
layer is `wte`, for Llama-architecture models converted to this layout). Module attribute names are the upstream
state-dict keys, so released files load with `strict=True`:

    transformer.wte.weight                  ARM (V_pad, d) | MDM (V_pad + 1, d) | Prime ((b+1)·ℓ, d)
    transformer.h.{i}.norm_1.weight         (d,)
    transformer.h.{i}.attn.attn.weight      ((H + 2g)·hs, d)   rows per group k: [q_{k·q..} | k_k | v_k]
    transformer.h.{i}.attn.proj.weight      (d, H·hs)
    transformer.h.{i}.norm_2.weight         (d,)
    transformer.h.{i}.mlp.swiglu.w1.weight  (I, d)   gate (SiLU)
    transformer.h.{i}.mlp.swiglu.w2.weight  (I, d)   up
    transformer.h.{i}.mlp.swiglu.w3.weight  (d, I)   down
    transformer.ln_f.weight                 (d,)
    lm_head.weight                          (V_pad, d)   absent with tie_embeddings (the head is wte)

The lit_gpt ARM is the Llama architecture; `tests/test_networks.py` checks it against transformers' `LlamaForCausalLM`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from prime_eval.networks.contract import HiddenHead, at_positions
from prime_eval.networks.kv_cache import KVCache, begin, cached_attention, rope_rows, through_blocks
from prime_eval.subtokenizer import base_from_ell

# name -> (n_layer, n_embd, n_head, intermediate_size, non-embedding params (blocks + ln_f) used upstream for FLOPs)
# n_query_groups = n_head (plain MHA) in every config; block_size 2048, vocab 32000.
DIFF_LLAMA_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "Diff_LLaMA_6M": (6, 256, 4, 1024, 6_294_784),
    "Diff_LLaMA_19M": (8, 384, 6, 1536, 18_880_896),
    "Diff_LLaMA_34M": (8, 512, 8, 2048, 33_563_136),
    "Diff_LLaMA_48M": (9, 576, 9, 2304, 47_786_688),
    "Diff_LLaMA_66M": (10, 640, 10, 2560, 65_549_440),
    "Diff_LLaMA_85M": (13, 640, 10, 2560, 85_214_080),
    "Diff_LLaMA_75M": (16, 640, 8, 1600, 75_387_520),
    "Diff_LLaMA_113M": (12, 768, 12, 3072, 113_265_408),
    "Diff_LLaMA_142M": (15, 768, 12, 3072, 141_581_568),
    "Diff_LLaMA_170M": (18, 768, 12, 3072, 169_897_728),
    "Diff_LLaMA_180M": (14, 896, 14, 3584, 179_856_768),
    "Diff_LLaMA_206M": (16, 896, 14, 3584, 205_550_464),
    "Diff_LLaMA_231M": (18, 896, 14, 3584, 231_244_160),
    "Diff_LLaMA_268M": (16, 1024, 16, 4096, 268_469_248),
    "Diff_LLaMA_302M": (18, 1024, 16, 4096, 302_027_776),
    "Diff_LLaMA_336M": (20, 1024, 16, 4096, 335_586_304),
    "Diff_LLaMA_472M": (18, 1280, 10, 5120, 471_906_560),
    "Diff_LLaMA_551M": (21, 1280, 10, 5120, 550_557_440),
    "Diff_LLaMA_571M": (18, 1408, 11, 5632, 571_001_728),
    "Diff_LLaMA_629M": (24, 1280, 10, 5120, 629_208_320),
    "Diff_LLaMA_666M": (21, 1408, 11, 5632, 666_168_448),
    "Diff_LLaMA_717M": (19, 1536, 12, 6144, 717_285_888),
    "Diff_LLaMA_761M": (24, 1408, 11, 5632, 761_335_168),
    "Diff_LLaMA_831M": (22, 1536, 12, 6144, 830_541_312),
    "Diff_LLaMA_944M": (25, 1536, 12, 6144, 943_796_736),
    "Diff_LLaMA_1028M": (20, 1792, 14, 7168, 1_027_677_952),
    "Diff_LLaMA_1233M": (24, 1792, 14, 7168, 1_233_213_184),
    "Diff_LLaMA_1476M": (22, 2048, 16, 8192, 1_476_487_168),
    "Diff_LLaMA_1678M": (25, 2048, 16, 8192, 1_677_826_048),
    "Diff_LLaMA_2121M": (28, 2176, 17, 8704, 2_121_393_280),
}


# Per-block keys and their transformers `LlamaForCausalLM` names (`model.layers.{i}.` + name); the fused
# `attn.attn` is q_proj / k_proj / v_proj interleaved per query group (module docstring), `transformer.wte` is
# `model.embed_tokens`, `transformer.ln_f` is `model.norm`, `lm_head` is `lm_head`.
LLAMA_BLOCK_KEYS = {
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp.swiglu.w1.weight": "mlp.gate_proj.weight",
    "mlp.swiglu.w2.weight": "mlp.up_proj.weight",
    "mlp.swiglu.w3.weight": "mlp.down_proj.weight",
    "norm_1.weight": "input_layernorm.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
}


@dataclass
class Config:
    """lit_gpt `Config`, restricted to the fields the Diff_LLaMA models use (defaults = every Diff_LLaMA config)."""

    name: str = ""
    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    n_query_groups: int | None = None  # None -> n_head (plain MHA, as in every released config)
    intermediate_size: int = 1024
    block_size: int = 2048  # max tokens; RoPE table length
    vocab_size: int = 32000  # tokenizer vocabulary V: logits are returned over exactly these classes
    padding_multiple: int = 64  # lm_head / ARM wte rows = vocab_size rounded up to this (32000 stays 32000)
    padded_vocab_size: int | None = None
    rotary_percentage: float = 1.0
    rope_base: int = 10000
    condense_ratio: int = 1
    norm_eps: float = 1e-5
    # Upstream builds the cos/sin table in fp32 and rounds it to bf16 (always, even for fp32 runs). True reproduces
    # the released models' arithmetic; False keeps fp32 tables (what transformers' Llama does). Difference ~1e-3 rel.
    rope_bf16: bool = True
    # ARM only: the output layer is the input embedding `wte` (no `lm_head.weight`), as in tied HF Llama models.
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.padded_vocab_size is None:
            m = self.padding_multiple
            self.padded_vocab_size = ((self.vocab_size + m - 1) // m) * m
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        """`Diff_LLaMA_1028M`, `1028M` or `1028` (the upstream scripts' `model_name=1028`)."""
        key = name if name in DIFF_LLAMA_CONFIGS else f"Diff_LLaMA_{str(name).removesuffix('M')}M"
        if key not in DIFF_LLAMA_CONFIGS:
            raise KeyError(f"unknown lit_gpt config {name!r}; known: {', '.join(DIFF_LLAMA_CONFIGS)}")
        n_layer, n_embd, n_head, inter, _ = DIFF_LLAMA_CONFIGS[key]
        base = cls(name=key, n_layer=n_layer, n_embd=n_embd, n_head=n_head, intermediate_size=inter)
        return replace(base, **overrides) if overrides else base

    def non_embedding_params(self) -> int:
        """n_layer·(d·(H+2g)·hs + d·H·hs + 3·d·I + 2·d) + d: the count the upstream FLOPs table uses."""
        d, hs, H, g, inter = self.n_embd, self.head_size, self.n_head, self.n_query_groups, self.intermediate_size
        return self.n_layer * (d * (H + 2 * g) * hs + d * H * hs + 3 * d * inter + 2 * d) + d


def query_groups_from_qkv_rows(rows: int, n_embd: int, n_head: int) -> int | None:
    """n_query_groups g from the fused q/k/v rows (H + 2g)·hs with hs = n_embd / H: g = (rows/hs − H)/2.

    None when no g ≥ 1 dividing H fits (then n_head, or the layout, is wrong).
    """
    if n_head < 1 or n_embd % n_head:
        return None
    hs = n_embd // n_head
    if rows % hs or (rows // hs - n_head) % 2:
        return None
    g = (rows // hs - n_head) // 2
    return g if g >= 1 and n_head % g == 0 else None


def find_config(n_layer: int, n_embd: int, intermediate_size: int) -> str | None:
    """Name of the Diff_LLaMA config with these shape-visible dims (n_head is not recoverable from shapes)."""
    for name, (nl, d, _, inter, _) in DIFF_LLAMA_CONFIGS.items():
        if (nl, d, inter) == (n_layer, n_embd, intermediate_size):
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------
# Layers (dependency order)


class RMSNorm(nn.Module):
    """y = x · rsqrt(mean(x², -1) + eps) · weight, computed in fp32, returned in the input dtype."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x · rsqrt(mean(x², -1) + eps) · weight, computed in fp32, returned in the input dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def build_rope_cache(seq_len: int, n_elem: int, *, base: int = 10000, condense_ratio: int = 1,
                     device=None, round_bf16: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, n_elem/2): θ_i = base^(−2i/n_elem), positions p / condense_ratio."""
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device, dtype=torch.float32) / n_elem))  # (n_elem/2,)
    pos = torch.arange(seq_len, device=device, dtype=torch.float32) / condense_ratio  # (L,)
    angles = torch.outer(pos, theta)  # (L, n_elem/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    if round_bf16:  # upstream stores the table in bf16
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX half-split rotation of x (B, nh, L, n) with cos/sin (L, n/2): dims i and i + n/2 are paired.

    out₁ = x₁·cos − x₂·sin, out₂ = x₁·sin + x₂·cos (= x·cos + rotate_half(x)·sin, as in HF Llama).
    """
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


class CausalSelfAttention(nn.Module):
    """Fused q/k/v projection `attn` with the per-group interleaved layout, RoPE, SDPA, output projection `proj`.

    (Upstream calls the class CausalSelfAttention in both models; `causal` is chosen by the owning network.)
    """

    def __init__(self, config: Config):
        super().__init__()
        hs, H, g = config.head_size, config.n_head, config.n_query_groups
        self.attn = nn.Linear(config.n_embd, (H + 2 * g) * hs, bias=False)
        self.proj = nn.Linear(H * hs, config.n_embd, bias=False)
        self.n_head, self.n_query_groups, self.head_size = H, g, hs
        self.rope_n_elem = int(config.rotary_percentage * hs)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, causal: bool,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin)
        return self.proj(grouped_attention(q, k, v, causal=causal, key_mask=key_mask))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (B, H, L, hs), k and v (B, g, L, hs), RoPE applied to the first `rope_n_elem` dims of q and k."""
        q, k, v = split_grouped_qkv(self.attn(x), self.n_head, self.n_query_groups, self.head_size)
        n = self.rope_n_elem
        q = torch.cat((apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        return q, k, v

    def forward_cached(self, x, cos, sin, past, mask):
        """New tokens x (B, L, d) over the cached slots (`prime_eval.networks.kv_cache`): (out, keys, values)."""
        q, k, v = self.qkv(x, cos, sin)
        y, k, v = cached_attention(q, k, v, past, mask, scale=1.0 / math.sqrt(self.head_size))
        return self.proj(y), k, v


def split_grouped_qkv(qkv: torch.Tensor, n_head: int, n_query_groups: int,
                      head_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused projection (B, L, (H + 2g)·hs), group-interleaved (per group k: its H/g query heads, one key head,
    one value head) -> q (B, H, L, hs) with query head k·(H/g) + j, k and v (B, g, L, hs). Megatron's
    `linear_qkv` uses the same layout (checkpoint-formats.md §1.5)."""
    B, L, _ = qkv.shape
    H, g, hs = n_head, n_query_groups, head_size
    q_per_kv = H // g
    qkv = qkv.view(B, L, g, q_per_kv + 2, hs).permute(0, 2, 3, 1, 4)  # (B, g, q_per_kv + 2, L, hs)
    q, k, v = qkv.split((q_per_kv, 1, 1), dim=2)
    return q.reshape(B, H, L, hs), k.reshape(B, g, L, hs), v.reshape(B, g, L, hs)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      key_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / √hs) v with each K/V head shared by its H/g query heads.

    q (B, H, L, hs), k and v (B, g, L, hs), key_mask (B, 1, 1, L) bool or None -> (B, L, H·hs), head h at columns
    h·hs … (h+1)·hs.
    """
    B, H, L, hs = q.shape
    g = k.shape[1]
    if g != H:
        k = k.repeat_interleave(H // g, dim=1)  # (B, H, L, hs)
        v = v.repeat_interleave(H // g, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=causal and key_mask is None,
                                       scale=1.0 / math.sqrt(hs))  # (B, H, L, hs)
    return y.transpose(1, 2).reshape(B, L, H * hs)


def padding_key_mask(attention_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """attention_mask (B, L) bool, True = real token -> key mask (B, 1, 1, L) for a bidirectional model (padded keys
    ignored), or None. An all-padding row attends everywhere (no NaN)."""
    if attention_mask is None:
        return None
    am = attention_mask.to(device=device, dtype=torch.bool)
    am = am | ~am.any(dim=1, keepdim=True)
    return am[:, None, None, :]  # (B, 1, 1, L) broadcast over heads and queries


class SwiGLU(nn.Module):
    """out = w3(SiLU(w1 x) ⊙ w2 x): the unpacked `xformers.ops.SwiGLU(bias=False)` the checkpoints were saved from."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w1 = nn.Linear(in_features, hidden_features, bias=False)  # gate
        self.w2 = nn.Linear(in_features, hidden_features, bias=False)  # up
        self.w3 = nn.Linear(hidden_features, in_features, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.swiglu = SwiGLU(config.n_embd, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swiglu(x)


class Block(nn.Module):
    """x ← x + attn(norm_1(x)); x ← x + mlp(norm_2(x))  (pre-norm, sequential residual)."""

    def __init__(self, config: Config):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = LLaMAMLP(config)

    def forward(self, x, cos, sin, *, causal: bool, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, causal=causal, key_mask=key_mask)
        return x + self.mlp(self.norm_2(x))

    def forward_cached(self, x, cos, sin, past, mask):
        h, k, v = self.attn.forward_cached(self.norm_1(x), cos, sin, past, mask)
        x = x + h
        return x + self.mlp(self.norm_2(x)), k, v


# ----------------------------------------------------------------------------------------------------------------
# Networks


class _LitBase(HiddenHead, nn.Module):
    """Shared trunk: `transformer.{wte,h,ln_f}` (`hidden`) and `lm_head` (`head`). Subclasses define the embedding and
    causality."""

    family = "arm"
    causal = True

    def __init__(self, config: Config, wte_rows: int):
        super().__init__()
        self.config = config
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(wte_rows, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.vocab_size = config.vocab_size  # V: logits are sliced to these classes
        self.max_length = config.block_size  # tokens
        self.ell, self.base, self.mask_id = 1, None, None

    def embed(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, L, d)
        return self.transformer.wte(idx)

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, L·ℓ) -> final hidden states ln_f(x) (B, L, d), or (N, d) at the True entries of `at` (B, L).

        attention_mask (B, L) bool, True = real token, padding on the right. Bidirectional models mask the padded
        keys; causal models need no mask for right padding (real positions never see later ones).
        """
        x = self.embed(idx)  # (B, L, d)
        B, L, _ = x.shape
        if L > self.max_length:
            raise ValueError(f"sequence of {L} tokens exceeds block_size={self.max_length}")
        cfg = self.config
        cos, sin = build_rope_cache(L, int(cfg.rotary_percentage * cfg.head_size), base=cfg.rope_base,
                                    condense_ratio=cfg.condense_ratio, device=x.device, round_bf16=cfg.rope_bf16)
        key_mask = None if self.causal else padding_key_mask(attention_mask, x.device)
        for block in self.transformer.h:
            x = block(x, cos, sin, causal=self.causal, key_mask=key_mask)
        return at_positions(self.transformer.ln_f(x), at)

    def head(self, h: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (..., d) -> fp32 logits (..., V): `lm_head` (or `wte` when tied), padded rows sliced away."""
        out = self.transformer.wte if self.config.tie_embeddings else self.lm_head
        return F.linear(h, out.weight[: self.vocab_size]).float()

    @torch.no_grad()
    def hidden_cached(self, idx: torch.Tensor, cache: KVCache | None = None, *, valid: torch.Tensor | None = None,
                      at: torch.Tensor | None = None, explicit=None,
                      keep_cache: bool = True) -> tuple[torch.Tensor, KVCache | None]:
        """`hidden` over a key/value cache (the contract of `prime_eval.networks.kv_cache`; causal GPT only): new
        tokens idx (B, L), valid (B, L) (False: padding), explicit (positions, mask) -> (hidden states, extended cache
        or None without `keep_cache`)."""
        pos, mask, all_valid, length = begin(self, idx, cache, valid, explicit, keep_cache)
        x = self.embed(idx)  # (B, L, d)
        cfg = self.config
        cos, sin = build_rope_cache(int(pos.max()) + 1, int(cfg.rotary_percentage * cfg.head_size),
                                    base=cfg.rope_base, condense_ratio=cfg.condense_ratio, device=x.device,
                                    round_bf16=cfg.rope_bf16)
        cos, sin = rope_rows(cos, sin, pos)  # (B, 1, L, n/2)
        x, keys, values = through_blocks(self.transformer.h, x, cos, sin, cache, mask, keep=keep_cache)
        return at_positions(self.transformer.ln_f(x), at), \
            (KVCache(keys, values, all_valid, length) if keep_cache else None)


class GPT(_LitBase):
    """ARM: causal attention; `wte` (V_pad, d); logits at position p predict token p+1. With
    `config.tie_embeddings` the output layer is `wte` (no `lm_head`)."""

    family = "arm"
    causal = True

    def __init__(self, config: Config):
        super().__init__(config, wte_rows=config.padded_vocab_size)


class TransEncoder(_LitBase):
    """Bidirectional encoder of SMDM (ℓ = 1) and MDM-Prime-v2 (ℓ > 1, `sum_emb=True`).

    ℓ = 1 (MDM): `wte` has V_pad + 1 rows, row V_pad is [MASK] (mask_id = V_pad = 32000).
    ℓ > 1 (Prime): idx is (B, L·ℓ) base-b digits, token-major, mask digit b. Position q uses row
    `idx[q] + (q mod ℓ)·(b+1)` of a ((b+1)·ℓ, d) table; the ℓ vectors of a token are summed.
    The released Prime model: ℓ = 15, b = 2, table (45, 1792), ids shuffled by `perm_32768.pt` first.
    """

    causal = False

    def __init__(self, config: Config, ell: int = 1, base: int | None = None):
        if config.tie_embeddings:
            raise ValueError("tie_embeddings applies to the ARM (GPT) only: the encoder's wte holds a mask row or "
                             "sub-token digits, so it cannot be the output layer")
        if ell > 1:
            if base is None:
                base = base_from_ell(config.vocab_size, ell)
            if base ** ell < config.vocab_size:
                raise ValueError(f"base={base}, ell={ell} give {base ** ell} codes < vocab_size={config.vocab_size}")
            rows = (base + 1) * ell
        else:
            rows = config.padded_vocab_size + 1
        super().__init__(config, wte_rows=rows)
        self.ell = ell
        if ell > 1:
            self.family, self.base, self.mask_id = "prime", base, base
        else:
            self.family, self.base, self.mask_id = "mdm", None, config.padded_vocab_size

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        if self.ell == 1:
            return self.transformer.wte(idx)  # (B, L, d)
        B, T = idx.shape
        if T % self.ell:
            raise ValueError(f"input length {T} is not a multiple of ell={self.ell}")
        slot = torch.arange(T, device=idx.device) % self.ell  # (T,) digit position j
        emb = self.transformer.wte(idx + slot * (self.base + 1))  # (B, L·ℓ, d)
        return emb.view(B, T // self.ell, self.ell, -1).sum(dim=2)  # (B, L, d)
