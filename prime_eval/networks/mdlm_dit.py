"""MDLM / MDM-Prime v1 networks (OpenWebText, GPT-2 tokenizer): the diffusion transformer `DIT` (MDM, ℓ = 1), its
Prime variant `PerceiverDIT` (concatenated sub-token embeddings, optional carry-over), and the causal `AR` baseline.

Written from the description in `shared/reference/checkpoint-formats.md` §3 (upstream: `models/dit.py` and
`models/autoregressive.py` of kuleshov-group/mdlm and chen-hao-chao/mdm-prime). Module attribute names are the
upstream backbone keys (Lightning checkpoints prefix them with `backbone.`), registered in upstream order so that
`parameters()` lines up with the EMA `shadow_params` list:

    vocab_embed.embedding                 DIT/AR (V+1, d) | PerceiverDIT (b+1, d/ℓ)   a raw Parameter
    sigma_map.mlp.{0,2}.{weight,bias}     (cond, 256), (cond, cond)                    DIT/PerceiverDIT only
    rotary_emb.inv_freq                   (hs/2,)                                      persistent buffer
    blocks.{i}.norm1.weight               (d,)     LayerNorm without bias
    blocks.{i}.attn_qkv.weight            (3d, d)  [Q all heads | K | V], head-major inside each block
    blocks.{i}.attn_out.weight            (d, d)
    blocks.{i}.norm2.weight               (d,)
    blocks.{i}.mlp.{0,2}.{weight,bias}    (4d, d), (d, 4d)   Linear → GELU(tanh) → Linear
    blocks.{i}.adaLN_modulation.{weight,bias}   (6d, cond)   DIT/PerceiverDIT only
    output_layer.norm_final.weight        (d,)
    output_layer.linear.{weight,bias}     (V_out, d)   V_out = V+1 (DIT, AR: mask class) | V (PerceiverDIT)
    output_layer.adaLN_modulation.{weight,bias}  (2d, cond)   DIT/PerceiverDIT only

Every released run has `time_conditioning: False`, so σ = 0 and the conditioning vector is a constant that is still
pushed through the adaLN layers. Logits are returned over exactly V = 50257 token classes: the mask class of DIT and
AR is sliced away, which equals upstream's "−∞ on the mask logit, then log-softmax".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from prime_eval.networks.contract import HiddenHead, at_positions
from prime_eval.networks.kv_cache import KVCache, begin, cached_attention, rope_rows, through_blocks
from prime_eval.subtokenizer import SubTokenizer, base_from_ell

# hydra `configs/model/*.yaml`: name -> (hidden_size, n_blocks, n_heads, cond_dim, length)
DIT_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (512, 8, 8, 128, 1024),
    "small": (768, 12, 12, 128, 1024),  # every released OWT run
    "medium": (1024, 24, 16, 128, 1024),
}


@dataclass
class DiTConfig:
    """The `config.model` fields the backbones read (hydra names)."""

    name: str = ""
    hidden_size: int = 768
    n_blocks: int = 12
    n_heads: int = 12
    cond_dim: int = 128
    length: int = 1024  # max tokens
    mlp_ratio: int = 4
    vocab_size: int = 50257  # tokenizer vocabulary V (GPT-2); the mask id is V for DIT / AR
    rope_base: int = 10000

    def __post_init__(self):
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiTConfig":
        key = name.removesuffix("-ar")
        if key not in DIT_CONFIGS:
            raise KeyError(f"unknown DiT config {name!r}; known: {', '.join(DIT_CONFIGS)}")
        d, n, h, c, length = DIT_CONFIGS[key]
        return cls(**{**dict(name=key, hidden_size=d, n_blocks=n, n_heads=h, cond_dim=c, length=length), **overrides})


def find_config(hidden_size: int, n_blocks: int) -> str | None:
    for name, (d, n, *_rest) in DIT_CONFIGS.items():
        if (d, n) == (hidden_size, n_blocks):
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------
# Layers


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Holds the (persistent) `inv_freq` buffer; cos/sin (L, hs) are built per call, half-split convention."""

    def __init__(self, dim: int, base: int = 10000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float())  # (L, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, hs)
        return emb.cos(), emb.sin()


class LayerNorm(nn.Module):
    """Layer norm over d in fp32 (eps 1e-5), no bias, times `weight`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), [self.dim]).to(x.dtype) * self.weight


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of σ (256 dims, cos half first) → Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, cond)
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma[:, None].float() * freqs[None]  # (B, 128)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_dim, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[x]


class DDiTBlock(nn.Module):
    """adaLN block (DIT) or plain pre-norm block (AR: `adaln=False`, gates 1, no shift/scale)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, *, adaln: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim, bias=True), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim, bias=True))
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        self.adaln = adaln

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor | None, *,
                causal: bool, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, d = x.shape
        H = self.n_heads
        if self.adaln:  # each (1 or B, 1, d)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
                self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
            h = modulate(self.norm1(x), shift_msa, scale_msa)
        else:
            h = self.norm1(x)
        qkv = self.attn_qkv(h).view(B, L, 3, H, d // H)  # 'b s (three h d) -> b s three h d'
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, hs)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=causal and key_mask is None)
        y = self.attn_out(y.transpose(1, 2).reshape(B, L, d))  # (B, L, d)
        if self.adaln:
            x = x + gate_msa * y
            return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + y
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x, cos, sin, past, mask):
        """The AR block (no adaLN) on new tokens x (B, L, d) over cached slots (`prime_eval.networks.kv_cache`);
        cos/sin (B, 1, L, hs) at the tokens' positions. Returns (out, keys, values)."""
        B, L, d = x.shape
        H = self.n_heads
        qkv = self.attn_qkv(self.norm1(x)).view(B, L, 3, H, d // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, hs)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y, k, v = cached_attention(q, k, v, past, mask)
        x = x + self.attn_out(y)
        return x + self.mlp(self.norm2(x)), k, v


class DDitFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, cond_dim: int, *, adaln: bool = True):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)
        self.adaln = adaln

    def pre_linear(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Everything before `linear` (position-wise, so logits can be taken at a subset of positions)."""
        if not self.adaln:
            return self.norm_final(x)
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)  # shift first
        return modulate(self.norm_final(x), shift, scale)


# ----------------------------------------------------------------------------------------------------------------
# Networks


class _DiTBase(HiddenHead, nn.Module):
    family = "mdm"
    causal = False
    adaln = True

    def __init__(self, config: DiTConfig, *, embed_rows: int, embed_dim: int, out_classes: int):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.vocab_embed = EmbeddingLayer(embed_dim, embed_rows)
        if self.adaln:
            self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(d // config.n_heads, base=config.rope_base)
        self.blocks = nn.ModuleList(DDiTBlock(d, config.n_heads, config.cond_dim, config.mlp_ratio, adaln=self.adaln)
                                    for _ in range(config.n_blocks))
        self.output_layer = DDitFinalLayer(d, out_classes, config.cond_dim, adaln=self.adaln)
        self.vocab_size = config.vocab_size
        self.max_length = config.length
        self.ell, self.base, self.mask_id = 1, None, None
        self.carry_over = False

    def embed(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, L, d)
        return self.vocab_embed(idx)

    def conditioning(self, batch: int, device, sigma: torch.Tensor | None) -> torch.Tensor | None:
        """c = SiLU(sigma_map(σ)); σ = 0 (time_conditioning False in every release) unless `sigma` (B,) is given."""
        if not self.adaln:
            return None
        if sigma is None:
            sigma = torch.zeros(1, device=device)
        return F.silu(self.sigma_map(sigma.to(device)))  # (1 or B, cond)

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               at: torch.Tensor | None = None, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, L·ℓ) -> the output layer's input (final norm and adaLN modulation applied) (B, L, d), or (N, d) at
        the True entries of `at` (B, L).

        attention_mask (B, L) bool over tokens (True = real, right padding): padded keys are ignored.
        """
        x = self.embed(idx)  # (B, L, d)
        B, L, _ = x.shape
        if L > self.max_length:
            raise ValueError(f"sequence of {L} tokens exceeds model length {self.max_length}")
        c = self.conditioning(B, x.device, sigma)
        cos, sin = self.rotary_emb(L, x.device)
        key_mask = None
        if attention_mask is not None and not self.causal:
            am = attention_mask.to(device=x.device, dtype=torch.bool)
            am = am | ~am.any(dim=1, keepdim=True)  # an all-padding row attends everywhere (no NaN)
            key_mask = am[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, cos.to(x.dtype), sin.to(x.dtype), c, causal=self.causal, key_mask=key_mask)
        return at_positions(self.output_layer.pre_linear(x, c), at)  # (B, L, d) | (N, d)

    def head(self, h: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d) -> fp32 logits (..., V): `output_layer.linear` over the V token classes (the mask class sliced
        away); with carry-over, `inputs` (..., ℓ) are the positions' input digits (`apply_carry_over`)."""
        lin = self.output_layer.linear
        logits = F.linear(h, lin.weight[: self.vocab_size], lin.bias[: self.vocab_size]).float()
        if self.carry_over:
            if inputs is None:
                raise ValueError("a carry-over head needs the positions' input digits (`inputs`)")
            logits = self.apply_carry_over(logits, inputs)
        return logits

    def apply_carry_over(self, logits, inputs):  # overridden by PerceiverDIT
        return logits

    @torch.no_grad()
    def hidden_cached(self, idx: torch.Tensor, cache: KVCache | None = None, *, valid: torch.Tensor | None = None,
                      at: torch.Tensor | None = None, explicit=None,
                      keep_cache: bool = True) -> tuple[torch.Tensor, KVCache | None]:
        """The AR's `hidden` over a key/value cache (`prime_eval.networks.kv_cache`: new tokens idx (B, L) after the
        cached ones, valid (B, L), explicit (positions, mask)) -> (hidden states, extended cache or None without
        `keep_cache`); DIT has none."""
        pos, mask, all_valid, length = begin(self, idx, cache, valid, explicit, keep_cache)
        x = self.embed(idx)  # (B, L, d)
        cos, sin = self.rotary_emb(int(pos.max()) + 1, x.device)  # (P, hs)
        cos, sin = rope_rows(cos.to(x.dtype), sin.to(x.dtype), pos)  # (B, 1, L, hs)
        x, keys, values = through_blocks(self.blocks, x, cos, sin, cache, mask, keep=keep_cache)
        return at_positions(self.output_layer.pre_linear(x, None), at), \
            (KVCache(keys, values, all_valid, length) if keep_cache else None)


class DIT(_DiTBase):
    """MDLM (ℓ = 1): `vocab_embed` (V+1, d), mask id V = 50257, bidirectional; output V+1 classes, mask sliced away."""

    family = "mdm"

    def __init__(self, config: DiTConfig):
        V = config.vocab_size
        super().__init__(config, embed_rows=V + 1, embed_dim=config.hidden_size, out_classes=V + 1)
        self.mask_id = V


class AR(_DiTBase):
    """v1 autoregressive baseline: same trunk without σ-map / adaLN, causal attention; output V+1, mask sliced away."""

    family = "arm"
    causal = True
    adaln = False

    def __init__(self, config: DiTConfig):
        V = config.vocab_size
        super().__init__(config, embed_rows=V + 1, embed_dim=config.hidden_size, out_classes=V + 1)


class PerceiverDIT(_DiTBase):
    """MDM-Prime v1 (ℓ > 1): one shared (b+1, d/ℓ) digit table; the ℓ digit vectors of a token are concatenated
    (digit 0, most significant, in the first d/ℓ features). Input (B, L·ℓ) big-endian base-b digits of the raw GPT-2
    id (no shuffling in v1), mask digit b; output (B, L, V) with V = 50257.

    carry_over=True reproduces upstream's carry-over parameterisation: classes whose digit disagrees with an observed
    (unmasked) input digit get the most negative finite logit (upstream: −∞; finite keeps rows NaN-free), so a
    log-softmax renormalises over the consistent classes only. The rule is `SubTokenizer.consistent` (identity π).
    """

    family = "prime"

    def __init__(self, config: DiTConfig, ell: int, base: int | None = None, carry_over: bool = False):
        V = config.vocab_size
        if base is None:
            base = base_from_ell(V, ell)
        if config.hidden_size % ell:
            raise ValueError(f"hidden_size={config.hidden_size} is not divisible by ell={ell}")
        if base ** ell < V:
            raise ValueError(f"base={base}, ell={ell} give {base ** ell} codes < vocab_size={V}")
        super().__init__(config, embed_rows=base + 1, embed_dim=config.hidden_size // ell, out_classes=V)
        self.ell, self.base, self.mask_id = ell, base, base
        self.carry_over = carry_over
        self._subtokenizer: SubTokenizer | None = None  # built on first use (the network may be built on "meta")

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T % self.ell:
            raise ValueError(f"input length {T} is not a multiple of ell={self.ell}")
        return self.vocab_embed(idx).reshape(B, T // self.ell, -1)  # (B, L·ℓ, d/ℓ) -> (B, L, d)

    @property
    def subtokenizer(self) -> SubTokenizer:
        """f_ℓ of v1: base-b digits of the raw token id (no index shuffling)."""
        if self._subtokenizer is None:
            self._subtokenizer = SubTokenizer(self.vocab_size, ell=self.ell, base=self.base)
        return self._subtokenizer

    def apply_carry_over(self, logits, inputs):
        """logits (…, V) with `inputs` (…, ℓ) the positions' input digits (mask digit b where masked)."""
        visible = inputs.masked_fill(inputs == self.mask_id, -1)  # (…, ℓ), -1 where masked
        ok = self.subtokenizer.consistent(visible)  # (…, V)
        return logits.masked_fill(~ok.to(logits.device), torch.finfo(logits.dtype).min)
