"""Key/value caches of the causal networks (ARM): run a prefix once, then extend it, token by token (generation) or
with many continuations at once (scoring whose choices share their context).

A cache holds, per layer, the keys and values of every *slot* run so far, (B, g, S, hs), and for each row which
slots hold real tokens (`valid` (B, S); False for padding) and how many real tokens it holds (`length` (B,), the
position of its next token). New tokens (B, L) with `valid_new` (B, L) (False: padding, e.g. a prompt left-padded to
its bucket) are placed at slots S … S+L-1:

    position of new token j of row b   = length_b + #(valid new tokens of row b before j)      (RoPE index)
    new token at slot S + j attends     slot k  iff  k ≤ S + j  and  (valid[b, k] or k = S + j)

so real tokens see exactly the real tokens before them (the same attention as one unpadded causal pass); a padding
token sees itself and never a NaN-producing empty row. `extend_layout` computes these; every causal network's
`forward_cached(idx, cache, valid=..., logits_at=...) -> (logits, cache)` uses it, and `cached_attention` is the
attention step. Padding a row to a length that depends on the row alone (a bucket) keeps every shape of its
computation independent of the rows that share the pass.
"""
from __future__ import annotations

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

    def select(self, index: torch.Tensor, *, lazy: bool = False) -> "KVCache":
        """Rows `index` (B',), repeats allowed: e.g. a context's cache once per continuation. `lazy`: a layer's
        rows are gathered when that layer reads them (`through_blocks`), so only one layer's copy exists at a time."""
        index = torch.as_tensor(index, dtype=torch.long)
        dev = self.valid.device
        i = index.to(dev)
        keys, values = _Gathered(self.keys, i), _Gathered(self.values, i)
        return KVCache(keys if lazy else list(keys), values if lazy else list(values), self.valid.index_select(0, i),
                       self.length.index_select(0, i.to(self.length.device)))


def concat_caches(caches: list[KVCache]) -> KVCache:
    """The caches of several passes over the same slots, one after the other along the batch: row p·B + b is row b of
    cache p (every cache has B rows of S slots)."""
    n = len(caches[0].keys)
    return KVCache([torch.cat([c.keys[k] for c in caches]) for k in range(n)],
                   [torch.cat([c.values[k] for c in caches]) for k in range(n)],
                   torch.cat([c.valid for c in caches]), torch.cat([c.length for c in caches]))


class _Gathered:
    """Per-layer tensors (B, ...) read as rows `index` of each, gathered on access (`KVCache.select`)."""

    def __init__(self, tensors: list[torch.Tensor], index: torch.Tensor):
        self.tensors, self.index = tensors, index

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, layer: int) -> torch.Tensor:
        t = self.tensors[layer]
        return t.index_select(0, self.index.to(t.device))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


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


def begin(net, idx: torch.Tensor, cache: KVCache | None, valid: torch.Tensor | None, explicit):
    """The first step of every causal network's `forward_cached`: (positions (B, L), mask (B, 1, L, S+L), the new
    cache's valid and length) of the new tokens (`layout`); valid defaults to all True."""
    if not getattr(net, "causal", False):
        raise ValueError(f"{type(net).__name__} is bidirectional: it has no key/value cache")
    valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(idx.device)
    return layout(cache, valid, getattr(net, "max_length", None), explicit)


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
           explicit: tuple[torch.Tensor, torch.Tensor] | None = None):
    """`extend_layout`, or an `explicit` (positions (B, L), mask (B, 1, L, L)) for a pass without a cache (a
    shared-prefix row, `shared_prefix_rows`); positions must stay below `max_length`."""
    if explicit is None:
        return extend_layout(cache, valid_new, max_length)
    if cache is not None:
        raise ValueError("an explicit layout is for a pass without a cache")
    pos, mask = explicit
    if max_length is not None and int(pos.max()) >= max_length:
        raise ValueError(f"position {int(pos.max())} exceeds the network's window of {max_length}")
    valid_new = valid_new.to(torch.bool)
    return pos.to(valid_new.device), mask.to(valid_new.device), valid_new, valid_new.long().sum(1)


def shared_prefix_rows(docs: list[tuple[list[int], list[list[int]]]]):
    """One row per document (context c, continuations s_1..s_k): the tokens c + s_1 + … + s_k, right-padded to the
    longest row. Context tokens sit at positions 0 … |c|-1 and attend causally among themselves; the tokens of s_j
    continue at positions |c| … and attend to the whole context and causally to s_j only, never to another s_i:
    each s_j is computed exactly as in the sequence c + s_j, the context once for all of them.

    Returns idx (B, T), valid (B, T), positions (B, T), mask (B, 1, T, T) bool (a padding token sees itself) and,
    per document, the row offsets of its segments [(start, length)] (context first)."""
    T = max(len(c) + sum(len(s) for s in conts) for c, conts in docs)
    B = len(docs)
    idx = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # segment of each slot: 0 context, j continuation j, -1 padding
    spans = []
    for b, (c, conts) in enumerate(docs):
        at, parts = 0, []
        for j, piece in enumerate([c] + list(conts)):
            n = len(piece)
            idx[b, at:at + n] = torch.as_tensor(piece, dtype=torch.long)
            pos[b, at:at + n] = torch.arange(n) + (0 if j == 0 else len(c))
            seg[b, at:at + n] = j
            parts.append((at, n))
            at += n
        spans.append(parts)
    slot = torch.arange(T)
    causal = slot[None, :] <= slot[:, None]  # (T, T): key ≤ query
    same = (seg[:, None, :] == seg[:, :, None]) | (seg[:, None, :] == 0)  # key in the query's segment or context
    mask = (causal[None] & same & (seg[:, None, :] >= 0) & (seg[:, :, None] >= 0)) | torch.eye(T, dtype=torch.bool)
    return idx, seg >= 0, pos, mask[:, None], spans


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: tuple | None, mask: torch.Tensor,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ·scale + mask) v over the past slots and the new ones, each K/V head shared by its H/g query heads.

    q (B, H, L, hs); k, v (B, g, L, hs) of the new tokens; past (k, v) (B, g, S, hs) or None; mask (B, 1, L, S+L)
    bool. Returns (B, L, H·hs) and the keys / values of all S+L slots (the layer's next cache)."""
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    B, H, L, hs = q.shape
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != H)
    return y.transpose(1, 2).reshape(B, L, H * hs), k, v


def supports_kv_cache(net) -> bool:
    """Whether `net` can run with a key/value cache (causal networks with `forward_cached`)."""
    return bool(getattr(net, "causal", False)) and callable(getattr(net, "forward_cached", None)) \
        and getattr(net, "kv_cache", True)


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A RoPE table (P, n) indexed by positions (B, L) -> (B, 1, L, n), broadcast over heads."""
    pos = positions.to(cos.device)
    return cos[pos][:, None], sin[pos][:, None]
