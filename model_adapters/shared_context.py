"""ARM scoring that runs each shared context once (issue 17): the choices of a multiple-choice document share their
context, so its keys and values are computed once and every continuation is scored on top of them.

An ARM request's row is x[:-1] with logits at the positions C-1 … T-1 that predict its continuation (x = context C
tokens + continuation n tokens, T = C + n - 1). Here:

    prefill       each distinct context x[:C] once: its key/value cache and the logits at its last position
                  (they predict the first continuation token, the same for every choice);
    continuation  x[C:T] (n - 1 tokens) on a copy of its context's cache: the logits predicting tokens 2 … n.

The logits equal those of the full rows up to float rounding (a different summation shape). Batch invariance as in
`forward_rows_batch_invariant`: a context is left-padded to the next multiple of `bucket` tokens and a continuation
right-padded to its own bucket (pack="bucket"; "length": exact lengths; "request": every context and continuation in
passes of its own), so each row's computation has shapes that depend on that row alone and passes are formed of
rows of equal padded shape: a request's numbers do not depend on what else is scored with it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from prime_eval.estimators.rows import PACKING, Rows, bucket_length, forward_rows_batch_invariant
from prime_eval.errors import UserError


def _split(rows: Rows) -> tuple[tuple[int, ...], torch.Tensor] | None:
    """(context ids x[:C], continuation inputs x[C:T]) of a one-row ARM Rows whose logits are a suffix; else None."""
    if rows.num_rows != 1:
        return None
    at = rows.logits_at[0]
    T = int(rows.inputs.shape[1])
    where = torch.nonzero(at).flatten()
    if where.numel() == 0 or at.shape[0] != T or int(where[-1]) != T - 1 or where.numel() != T - int(where[0]):
        return None
    C = int(where[0]) + 1
    ids = rows.inputs[0]
    return tuple(ids[:C].tolist()), ids[C:]


def forward_rows_shared_context(net, rows_list: Sequence[Rows], rows_per_pass: int = 64, *, pack: str = "bucket",
                                bucket: int = 32) -> list[torch.Tensor]:
    """For each Rows, its logits at `logits_at`, (n_r, V) on the network's device (as `forward_rows`), each distinct
    context run once (module docstring). Rows of another shape go through `forward_rows_batch_invariant`."""
    if pack not in PACKING:
        raise UserError(f"pack={pack!r}: choose one of {', '.join(PACKING)}")
    width = None if pack == "length" else bucket
    per_pass = 1 if pack == "request" else max(1, rows_per_pass)
    out: list[torch.Tensor | None] = [None] * len(rows_list)
    contexts: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    other = []
    for r, rows in enumerate(rows_list):
        parts = _split(rows)
        if parts is None:
            other.append(r)
        else:
            contexts.setdefault(parts[0], []).append((r, parts[1]))
    if other:
        for r, logits in zip(other, forward_rows_batch_invariant(net, [rows_list[r] for r in other], rows_per_pass,
                                                                 pack=pack, bucket=bucket)):
            out[r] = logits
    groups: dict[int, list[tuple[int, ...]]] = {}
    for ctx in contexts:
        groups.setdefault(bucket_length(len(ctx), width), []).append(ctx)
    dev = next(iter(net.parameters()), torch.empty(0)).device
    for P in sorted(groups, reverse=True):
        ctxs = groups[P]
        for s in range(0, len(ctxs), per_pass):
            _context_pass(net, ctxs[s:s + per_pass], P, contexts, out, per_pass, width, dev)
    return out  # type: ignore[return-value]


@torch.no_grad()
def _context_pass(net, ctxs, P: int, contexts: dict, out: list, per_pass: int, width, dev) -> None:
    """Prefill `ctxs` (left-padded to P), then every continuation of them in passes of equal padded length."""
    m = len(ctxs)
    idx = torch.zeros(m, P, dtype=torch.long)
    valid = torch.zeros(m, P, dtype=torch.bool)
    for k, ctx in enumerate(ctxs):
        idx[k, P - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
        valid[k, P - len(ctx):] = True
    at = torch.zeros(m, P, dtype=torch.bool)
    at[:, -1] = True
    first, cache = net.forward_cached(idx.to(dev), None, valid=valid.to(dev), logits_at=at.to(dev))  # (m, V)
    conts: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # padded length -> [(request, context row, inputs)]
    for k, ctx in enumerate(ctxs):
        for r, cont in contexts[ctx]:
            if cont.numel() == 0:
                out[r] = first[k:k + 1]
            else:
                conts.setdefault(bucket_length(cont.numel(), width), []).append((r, k, cont))
    for Lc in sorted(conts, reverse=True):
        batch = conts[Lc]
        for s in range(0, len(batch), per_pass):
            part = batch[s:s + per_pass]
            x = torch.zeros(len(part), Lc, dtype=torch.long)
            ok = torch.zeros(len(part), Lc, dtype=torch.bool)
            for j, (_, _, cont) in enumerate(part):
                x[j, :cont.numel()] = cont
                ok[j, :cont.numel()] = True
            sub = cache.select(torch.tensor([k for _, k, _ in part]))
            logits, _ = net.forward_cached(x.to(dev), sub, valid=ok.to(dev), logits_at=ok.to(dev))  # (N, V)
            for (r, k, cont), piece in zip(part, torch.split(logits, ok.sum(1).tolist())):
                out[r] = torch.cat([first[k:k + 1], piece])
