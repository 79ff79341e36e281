"""ARM scoring that runs each shared context once (issue 17): the choices of a multiple-choice document share their
context, so its keys and values are computed once and every continuation attends to them.

An ARM request's row is x[:-1] with logits at the positions C-1 … T-1 that predict its continuation (x = context C
tokens + continuation n tokens, T = C + n - 1). The requests of a chunk that share a context become ONE row
(`prime_eval.networks.kv_cache.shared_prefix_rows`): the context once, then the inputs x[C:T] of each continuation,
each attending to the context's keys and values and to its own earlier tokens only, at the positions it has in its
own sequence. The logits at the context's last token predict every choice's first token; those at a continuation's
tokens predict the rest. Compared with lm-eval `hf` (one row per choice, the context recomputed each time) the pass
holds C + Σ n_j tokens instead of Σ (C + n_j), and one row per document instead of one per choice; the logits equal
the full rows' up to float rounding (a different summation shape).

Only contexts with several requests are shared, in rows of at most `MAX_SHARED_TOKENS` (a context with more
continuations than fit gets several rows); a request alone with its context (a loglikelihood task, a rolling window)
keeps its own plain causal row (`forward_rows_batch_invariant`), as does a continuation too long for a shared row.
Packing (`pack`): `bucket` (default) — shared rows longest first, `rows_per_pass` per pass (fewer where the pass's
T×T attention mask would exceed `MASK_ENTRIES`), right-padded to the longest; `length` — passes of rows of one
length (no padding); `request` — no sharing: each request's own row in passes of its own, so a request's numbers
cannot depend on what else is scored.
With `bucket` and `length` a request's log-likelihood depends in the last bits (~1e-7 relative) on the rows it
shares passes with: CPU matrix multiplications round a row differently for different numbers of rows, and padding
changes the attention's summation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from prime_eval.errors import UserError
from prime_eval.estimators.rows import PACKING, Rows, forward_rows_batch_invariant
from prime_eval.networks.kv_cache import shared_prefix_rows


MAX_SHARED_TOKENS = 1024  # tokens of one shared row
MASK_ENTRIES = 2**24  # a pass's attention mask (rows × T × T) stays below this many entries


def _split(rows: Rows) -> tuple[tuple[int, ...], list[int]] | None:
    """(context ids x[:C], continuation inputs x[C:T]) of a one-row ARM Rows whose logits are a suffix; else None."""
    if rows.num_rows != 1:
        return None
    at = rows.logits_at[0]
    T = int(rows.inputs.shape[1])
    where = torch.nonzero(at).flatten()
    if where.numel() == 0 or at.shape[0] != T or int(where[-1]) != T - 1 or where.numel() != T - int(where[0]):
        return None
    C = int(where[0]) + 1
    ids = rows.inputs[0].tolist()
    return tuple(ids[:C]), ids[C:]


def forward_rows_shared_context(net, rows_list: Sequence[Rows], rows_per_pass: int = 64, *, pack: str = "bucket",
                                bucket: int = 32) -> list[torch.Tensor]:
    """For each Rows, its logits at `logits_at`, (n_r, V) on the network's device (as `forward_rows`), each distinct
    context run once (module docstring). Rows of another shape go through `forward_rows_batch_invariant`."""
    if pack not in PACKING:
        raise UserError(f"pack={pack!r}: choose one of {', '.join(PACKING)}")
    out: list[torch.Tensor | None] = [None] * len(rows_list)
    docs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    other = []
    for r, rows in enumerate(rows_list):
        parts = None if pack == "request" else _split(rows)
        if parts is None:
            other.append(r)
        else:
            docs.setdefault(parts[0], []).append((r, parts[1]))
    shared = []  # (context, [(request, continuation inputs)]) rows of at most MAX_SHARED_TOKENS
    for ctx, reqs in docs.items():
        fits = [q for q in reqs if len(ctx) + len(q[1]) <= MAX_SHARED_TOKENS]
        if len(reqs) < 2 or len(fits) < 2:
            other += [r for r, _ in reqs]
            continue
        other += [r for r, x in reqs if len(ctx) + len(x) > MAX_SHARED_TOKENS]
        row, used = [], len(ctx)
        for q in fits:
            if row and used + len(q[1]) > MAX_SHARED_TOKENS:
                shared.append((ctx, row))
                row, used = [], len(ctx)
            row.append(q)
            used += len(q[1])
        shared.append((ctx, row))
    if other:
        other.sort()
        for r, logits in zip(other, forward_rows_batch_invariant(net, [rows_list[r] for r in other], rows_per_pass,
                                                                 pack=pack, bucket=bucket)):
            out[r] = logits
    length = [len(c) + sum(len(x) for _, x in reqs) for c, reqs in shared]
    order = sorted(range(len(shared)), key=lambda i: -length[i])  # longest first (stable)
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None and len(g) < rows_per_pass and (pack != "length" or length[g[0]] == length[i]) \
                and (len(g) + 1) * length[g[0]] ** 2 <= MASK_ENTRIES:
            g.append(i)
        else:
            groups.append([i])
    dev = next(iter(net.parameters()), torch.empty(0)).device
    for g in groups:
        _pass(net, [(list(shared[i][0]), [x for _, x in shared[i][1]]) for i in g], [shared[i][1] for i in g],
              out, dev)
    return out  # type: ignore[return-value]


@torch.no_grad()
def _pass(net, rows: list, owners: list, out: list, dev) -> None:
    """One forward pass over shared-prefix rows; each request gets its context's last logits and its own."""
    idx, valid, pos, mask, spans = shared_prefix_rows(rows)
    at = torch.zeros_like(valid)
    for b, parts in enumerate(spans):
        start, n = parts[0]
        at[b, start + n - 1] = True  # the context's last token
        for s, m in parts[1:]:
            at[b, s:s + m] = True
    logits, _ = net.forward_cached(idx.to(dev), None, valid=valid.to(dev), logits_at=at.to(dev),
                                   explicit=(pos.to(dev), mask.to(dev)))  # (N, V) row-major
    pieces = torch.split(logits, at.sum(1).tolist())
    for piece, parts, reqs in zip(pieces, spans, owners):
        first, at_ = piece[:1], 1
        for (_, m), (r, _) in zip(parts[1:], reqs):
            out[r] = torch.cat([first, piece[at_:at_ + m]])
            at_ += m
