"""Autoregressive decoding with a key/value cache, batched across requests (lm-eval `hf`'s `generate_until`).

Per request: the prompt runs once (prefill), then one token per forward pass over the cache:

    x_{n+1} ~ softmax(logits(x_{≤n}) / τ)   (τ = 0: argmax; `generation.sampling`, one uniform per token from the
                                             request's own generator)

until a stop token (EOS; not part of the answer), the caller's stop check (`should_stop(i, tokens)`, e.g. a stop
string in the decoded text) or `max_new_tokens`. Batching (`pack`): "bucket" (default, as `hf`) — prompts longest
first, `rows_per_pass` per batch, left-padded to the longest (padding masked, positions counted from each prompt's
first token; `prime_eval.networks.kv_cache`); "length" — batches of prompts of one length; "request" — each request
alone, so its tokens cannot depend on anything else (bit for bit). With "bucket" and "length" a row's logits can
differ in the last bits with what shares its passes (docs/adapters.md, "Bits and batches"), which changes a token
only at a near tie. Networks without a cache (`supports_kv_cache`) run the whole sequence each step, one request at
a time.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prime_eval.generation.request import GenRequest, Generation
from prime_eval.generation.steps import draw_many
from prime_eval.networks.kv_cache import supports_kv_cache


def generate_arm(net, requests: Sequence[GenRequest], *, rows_per_pass: int = 64, pack: str = "bucket",
                 should_stop: Callable[[int, list[int]], bool] | None = None,
                 on_pass: Callable[[int], None] | None = None) -> list[Generation]:
    """One `Generation` per request (module docstring). on_pass(rows): called after every pass."""
    out: list[Generation | None] = [None] * len(requests)
    todo = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
    for i in set(range(len(requests))) - set(todo):
        out[i] = Generation([], 0, "length")
    if not supports_kv_cache(net):
        for i in todo:
            out[i] = _decode_uncached(net, requests[i], lambda toks, i=i: should_stop is not None
                                      and should_stop(i, toks), on_pass)
        return out  # type: ignore[return-value]
    order = sorted(todo, key=lambda i: -len(requests[i].prompt))  # longest first (stable)
    if pack == "request":
        batches = [[i] for i in order]
    elif pack == "length":
        by_len: dict[int, list[int]] = {}
        for i in order:
            by_len.setdefault(len(requests[i].prompt), []).append(i)
        batches = [g[s:s + rows_per_pass] for g in by_len.values() for s in range(0, len(g), max(1, rows_per_pass))]
    else:
        batches = [order[s:s + rows_per_pass] for s in range(0, len(order), max(1, rows_per_pass))]
    for rows in batches:
        length = max(len(requests[i].prompt) for i in rows)
        for i, g in zip(rows, _decode(net, [requests[i] for i in rows], length, rows, should_stop, on_pass)):
            out[i] = g
    return out  # type: ignore[return-value]


def _device(net) -> torch.device:
    return next(iter(net.parameters()), torch.empty(0)).device


def _next_tokens(logits: torch.Tensor, reqs: Sequence[GenRequest], gens: Sequence[torch.Generator]) -> list[int]:
    """One token per row of logits (n, V) for its request, with a uniform from the request's generator."""
    prepared = [(logits[k:k + 1], None if r.temperature == 0 else torch.rand(1, generator=g, dtype=torch.float64), r)
                for k, (r, g) in enumerate(zip(reqs, gens))]
    return [int(x0[0]) for x0, _ in draw_many(prepared, [False] * len(prepared))]


@torch.no_grad()
def _decode(net, reqs: list[GenRequest], length: int, ids: list[int], should_stop, on_pass) -> list[Generation]:
    """Requests whose prompts are left-padded to `length` tokens, decoded together."""
    dev, n = _device(net), len(reqs)
    idx = torch.zeros(n, length, dtype=torch.long)  # (n, P) padding id 0, masked
    valid = torch.zeros(n, length, dtype=torch.bool)
    for k, r in enumerate(reqs):
        idx[k, length - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        valid[k, length - len(r.prompt):] = True
    at = torch.zeros(n, length, dtype=torch.bool)
    at[:, -1] = True
    logits, cache = net.forward_cached(idx.to(dev), None, valid=valid.to(dev), logits_at=at.to(dev))  # (n, V)
    if on_pass:
        on_pass(n)
    gens = [r.generator() for r in reqs]
    done = [Generation([], 1, "length") for _ in reqs]
    active = list(range(n))
    while active:
        nxt = _next_tokens(logits, [reqs[a] for a in active], [gens[a] for a in active])
        keep = []
        for k, (a, t) in enumerate(zip(active, nxt)):
            g, r = done[a], reqs[a]
            if t in r.stop_ids:
                g.stop = "eos"
                continue
            g.tokens.append(t)
            if should_stop is not None and should_stop(ids[a], g.tokens):
                g.stop = "stop"
            elif len(g.tokens) < r.max_new_tokens:
                keep.append(k)
        if not keep:
            break
        if len(keep) < len(active):
            cache = cache.select(torch.tensor(keep))
        active = [active[k] for k in keep]
        step = torch.tensor([[done[a].tokens[-1]] for a in active], device=dev)  # (m, 1)
        logits, cache = net.forward_cached(step, cache)
        logits = logits[:, 0]  # (m, V)
        for a in active:
            done[a].forward_passes += 1
        if on_pass:
            on_pass(len(active))
    return done


@torch.no_grad()
def _decode_uncached(net, r: GenRequest, should_stop, on_pass) -> Generation:
    """The whole sequence through the network at every step (networks without a key/value cache)."""
    dev = _device(net)
    seq, g, out = list(r.prompt), r.generator(), Generation([], 0, "length")
    while len(out.tokens) < r.max_new_tokens:
        window = torch.tensor([seq[-getattr(net, "max_length", len(seq)):]], device=dev)  # (1, L)
        at = torch.zeros_like(window, dtype=torch.bool)
        at[0, -1] = True
        logits = net(window, logits_at=at)  # (1, V)
        out.forward_passes += 1
        if on_pass:
            on_pass(1)
        (t,) = _next_tokens(logits, [r], [g])
        if t in r.stop_ids:
            out.stop = "eos"
            break
        out.tokens.append(t)
        seq.append(t)
        if should_stop(out.tokens):
            out.stop = "stop"
            break
    return out
