"""Key/value caches of the causal networks (ARM): run a prefix once, then extend it token by token (generation); and
packed passes (`Parts`): several sequences' pieces side by side in one row, each its own attention (scoring, where
the choices of a document share their context: `model_adapters.shared_context`).

A cache holds, per layer, the keys and values of every *slot* run so far, (B, g, S, hs), and for each row which
slots hold real tokens (`valid` (B, S); False for padding) and how many real tokens it holds (`length` (B,), the
position of its next token). New tokens (B, L) with `valid_new` (B, L) (False: padding, e.g. a prompt left-padded to
its bucket) are placed at slots S … S+L-1:

    position of new token j of row b   = length_b + #(valid new tokens of row b before j)      (RoPE index)
    new token at slot S + j attends     slot k  iff  k ≤ S + j  and  (valid[b, k] or k = S + j)

so real tokens see exactly the real tokens before them (the same attention as one unpadded causal pass); a padding
token sees itself and never a NaN-producing empty row. `extend_layout` computes these; every causal network's
`forward_cached(idx, cache, valid=..., logits_at=...) -> (logits, cache)` uses it, and `cached_attention` is the
attention step (`part_attention` for a packed pass: `hidden_cached(idx, None, explicit=(positions, Parts))`). Padding a
row to a length that depends on the row alone (a bucket) keeps every shape of its computation independent of the rows
that share the pass.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Keys / values per layer, (B, g, S, hs) each; `valid` (B, S) bool; `length` (B,) long."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    length: torch.Tensor

    @property
    def slots(self) -> int:
        return int(self.valid.shape[1])

    @property
    def batch(self) -> int:
        return int(self.valid.shape[0])

    def select(self, index: torch.Tensor) -> "KVCache":
        """Rows `index` (B',), repeats allowed (e.g. the requests still decoding)."""
        i = torch.as_tensor(index, dtype=torch.long).to(self.valid.device)
        return KVCache([t.index_select(0, i.to(t.device)) for t in self.keys],
                       [t.index_select(0, i.to(t.device)) for t in self.values], self.valid.index_select(0, i),
                       self.length.index_select(0, i.to(self.length.device)))


def extend_layout(cache: KVCache | None, valid_new: torch.Tensor,
                  max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For new tokens with `valid_new` (B, L): their positions (B, L), the attention mask (B, 1, L, S+L) (True =
    attend), the cache's new `valid` (B, S+L) and `length` (B,) (module docstring). Positions must stay below
    `max_length` (the network's window)."""
    B, L = valid_new.shape
    dev = valid_new.device
    valid_new = valid_new.to(torch.bool)
    S = 0 if cache is None else cache.slots
    start = torch.zeros(B, dtype=torch.long, device=dev) if cache is None else cache.length.to(dev)
    pos = (start[:, None] + valid_new.long().cumsum(1) - 1).clamp_min(0)  # (B, L); padding: a neighbour's index
    length = start + valid_new.long().sum(1)
    if max_length is not None and int(length.max()) > max_length:
        raise ValueError(f"sequence of {int(length.max())} tokens exceeds the network's window of {max_length}")
    valid = valid_new if cache is None else torch.cat([cache.valid.to(dev), valid_new], 1)  # (B, S+L)
    slot = torch.arange(S + L, device=dev)
    query = S + torch.arange(L, device=dev)
    causal = slot[None, :] <= query[:, None]  # (L, S+L)
    mask = (causal[None] & valid[:, None, :]) | (slot[None, :] == query[:, None])[None]  # (B, L, S+L)
    return pos, mask[:, None], valid, length


def begin(net, idx: torch.Tensor, cache: KVCache | None, valid: torch.Tensor | None, explicit, keep: bool):
    """The first step of every causal network's `forward_cached`: (positions (B, L), mask (B, 1, L, S+L), the new
    cache's valid and length) of the new tokens (`layout`); valid defaults to all True."""
    if not getattr(net, "causal", False):
        raise ValueError(f"{type(net).__name__} is bidirectional: it has no key/value cache")
    valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(idx.device)
    return layout(cache, valid, getattr(net, "max_length", None), explicit, keep)


def through_blocks(blocks, x: torch.Tensor, cos, sin, cache: KVCache | None, mask: torch.Tensor, *,
                   keep: bool = True):
    """x (B, L, d) through the blocks' `forward_cached(x, cos, sin, past, mask) -> (x, keys, values)`, layer i over
    the cache's layer i: (x, [keys], [values]); without `keep` the lists stay empty (each layer's keys and values
    are freed as soon as the next layer runs: a pass whose cache is not extended further)."""
    keys, values = [], []
    for i, block in enumerate(blocks):
        past = None if cache is None else (cache.keys[i], cache.values[i])
        x, k, v = block.forward_cached(x, cos, sin, past, mask)
        if keep:
            keys.append(k)
            values.append(v)
        past = k = v = None
    return x, keys, values


def layout(cache: KVCache | None, valid_new: torch.Tensor, max_length: int | None,
           explicit: tuple[torch.Tensor, "Parts"] | None = None, keep: bool = True):
    """`extend_layout`, or an `explicit` (positions (B, L), `Parts`) for a packed pass without a cache (scoring:
    `model_adapters.shared_context`); positions must stay below `max_length`. A packed pass neither reads nor
    keeps a cache (its keys sit side by side, not in a sequence that could be extended): `keep` must be False."""
    if explicit is None:
        return extend_layout(cache, valid_new, max_length)
    if cache is not None or keep:
        raise ValueError("an explicit layout is for a pass without a cache: pass cache=None and keep_cache=False")
    pos, parts = explicit
    if not isinstance(parts, Parts):
        raise TypeError(f"explicit layout: expected (positions, Parts), got a {type(parts).__name__}")
    if max_length is not None and int(pos.max()) >= max_length:
        raise ValueError(f"position {int(pos.max())} exceeds the network's window of {max_length}")
    valid_new = valid_new.to(torch.bool)
    return pos.to(valid_new.device), parts, valid_new, valid_new.long().sum(1)


@dataclass(frozen=True)
class Parts:
    """The attention layout of a packed pass: one row (1, M) holding several sequences' pieces side by side. Part
    (start, n, prefix_start, P): its n queries at slots start … start+n-1 attend to the P keys of its prefix (slots
    prefix_start …, e.g. a shared context; P = 0 for none) and causally to its own n keys, nothing else:

        part query i attends  prefix key j (all j < P)  and  own key j ≤ i

    Each part is one attention call of its own shape (`part_attention`), so its values depend on its own tokens and
    lengths alone, whatever else the pass holds and wherever the part sits in it. Slots in no part (the fill of a
    pass of fixed length) get zeros. `rows`: the request rows the pass serves (the progress bar's unit)."""

    parts: tuple[tuple[int, int, int, int], ...]
    rows: int = 1


def part_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: Parts,
                   scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v of each part of a packed pass (`Parts`), each K/V head shared by its H/g query
    heads: q (1, H, M, hs); k, v (1, g, M, hs) -> (1, H, M, hs)."""
    y = torch.zeros_like(q)
    gqa = k.shape[1] != q.shape[1]
    for start, n, p0, P in parts.parts:
        own = slice(start, start + n)
        if P == 0:
            y[:, :, own] = F.scaled_dot_product_attention(q[:, :, own], k[:, :, own], v[:, :, own], is_causal=True,
                                                          scale=scale, enable_gqa=gqa)
        else:
            pre = slice(p0, p0 + P)
            y[:, :, own] = F.scaled_dot_product_attention(
                q[:, :, own], torch.cat([k[:, :, pre], k[:, :, own]], 2), torch.cat([v[:, :, pre], v[:, :, own]], 2),
                attn_mask=_prefix_causal_mask(n, P, q.device), scale=scale, enable_gqa=gqa)
    return y


@functools.lru_cache(maxsize=256)
def _prefix_causal_mask(n: int, P: int, device) -> torch.Tensor:
    """(n, P+n) bool: query i sees every prefix key and its own keys ≤ i (`Parts`)."""
    j = torch.arange(P + n, device=device)
    return (j[None, :] < P) | (j[None, :] - P <= torch.arange(n, device=device)[:, None])


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: tuple | None, mask,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ·scale + mask) v over the past slots and the new ones, each K/V head shared by its H/g query heads.

    q (B, H, L, hs); k, v (B, g, L, hs) of the new tokens; past (k, v) (B, g, S, hs) or None; mask (B, 1, L, S+L)
    bool, or `Parts` (a packed pass: `part_attention`). Returns (B, L, H·hs) and the keys / values of all S+L slots
    (the layer's next cache)."""
    B, H, L, hs = q.shape
    if isinstance(mask, Parts):
        return part_attention(q, k, v, mask, scale).transpose(1, 2).reshape(B, L, H * hs), k, v
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != H)
    return y.transpose(1, 2).reshape(B, L, H * hs), k, v


def supports_kv_cache(net) -> bool:
    """Whether `net` can run with a key/value cache (causal networks with `forward_cached`)."""
    return bool(getattr(net, "causal", False)) and callable(getattr(net, "forward_cached", None)) \
        and getattr(net, "kv_cache", True)


def supports_packed_passes(net) -> bool:
    """Whether `net` can run packed passes (`Parts`): a causal network with a cache whose attention is
    `cached_attention`, or a Hugging Face model whose attention `part_attention` can replace (`packed_passes`)."""
    return supports_kv_cache(net) and bool(getattr(net, "packed_passes", True))


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A RoPE table (P, n) indexed by positions (B, L) -> (B, 1, L, n), broadcast over heads."""
    pos = positions.to(cos.device)
    return cos[pos][:, None], sin[pos][:, None]
