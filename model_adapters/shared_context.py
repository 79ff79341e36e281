"""ARM scoring that runs each context once (issue 17): the choices of a multiple-choice document share their context,
so its keys and values are computed once and every continuation runs on top of them.

An ARM request's row is x[:-1] with logits at the positions C-1 … T-1 that predict its continuation (x = context C
tokens + continuation n tokens, T = C + n - 1). Its logits come from two kinds of passes over the network's key/value
cache (`prime_eval.networks.kv_cache`):

    1. context passes: each distinct context x[:C] once, as a causal row; its hidden state at the last token gives the
       logits that predict the continuation's first token, and its keys / values are kept for step 2;
    2. continuation passes: the inputs x[C:T] of each request (n - 1 tokens; none when n = 1) over its context's
       keys / values, at the positions they have in the request's own sequence.

Compared with lm-eval `hf` (one row per choice, the context recomputed each time) a document costs C + Σ (n_j - 1)
tokens instead of Σ (C + n_j); the logits equal the full rows' up to float rounding (a different summation shape).

Fixed shapes (docs/adapters.md, "Bits and batches"): a context is padded to a multiple of `bucket` tokens (S) and a
continuation to a multiple of `bucket // 4` (Lc); a context pass holds exactly `context_rows(S)` rows and a continuation
pass exactly `continuation_rows(S, Lc)` rows, about 8·rows_per_pass tokens each (dummy rows fill the last pass of a
length), and the head runs on `HEAD_ROWS` hidden states at a time (`estimators.rows.head_logits`). The caches of
several context passes of one S are concatenated, so continuations of one Lc share passes whichever context pass
they came from, and the head runs over the hidden states of all those passes together. Every computation a request's
logits go through then has a shape fixed by its own lengths and `rows_per_pass`, and the kernels give each row the
same bits whatever the other rows hold, so its log-likelihood never depends on which requests are scored with it, in
what order, in how many processes, or on what a resumed run still had to compute. Packing (`pack`): `bucket` (default) as above;
`length` — no padding: passes of contexts of one length and continuations of one length; `request` — each request
in passes of its own (its context run for it alone): the same shapes, so the same bits, as `bucket`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from prime_eval.errors import UserError
from prime_eval.estimators.rows import (PACKING, Pass, Rows, bucket_length, forward_rows_batch_invariant,
                                        network_device)
from prime_eval.networks.kv_cache import concat_caches

MASK_ENTRIES = 2**24  # a pass's attention mask (rows × queries × keys) stays below this many entries
CONTEXT_TOKENS_PER_ROW = 8  # a pass holds about this many tokens per unit of rows_per_pass
CACHE_BYTES = 1 << 30  # keys / values of the context passes whose continuations are packed together


def context_rows(S: int, rows_per_pass: int) -> int:
    """Rows of a context pass of S tokens: about 8·rows_per_pass tokens (at most `rows_per_pass` rows, fewer where the
    mask rows × S × S would be too large). A pass of few long rows keeps the padding of a length's last pass small;
    continuations of several context passes share their passes (`_contexts_and_continuations`)."""
    return max(1, min(rows_per_pass, CONTEXT_TOKENS_PER_ROW * rows_per_pass // S, MASK_ENTRIES // (S * S)))


def continuation_rows(S: int, Lc: int, rows_per_pass: int) -> int:
    """Rows of a continuation pass of Lc tokens over S cached slots: about 8·rows_per_pass tokens, as `context_rows`
    (at most `rows_per_pass` rows; fewer where the mask rows × Lc × (S + Lc) would be too large)."""
    return max(1, min(rows_per_pass, CONTEXT_TOKENS_PER_ROW * rows_per_pass // Lc, MASK_ENTRIES // (Lc * (S + Lc))))


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
    contexts: dict[tuple, list[tuple[int, list[int]]]] = {}  # key -> [(request, continuation inputs)]
    other = []
    for r, rows in enumerate(rows_list):
        parts = _split(rows)
        if parts is None:
            other.append(r)
        else:  # pack=request: a context of its own per request
            contexts.setdefault((parts[0], r) if pack == "request" else (parts[0],), []).append((r, parts[1]))
    if other:
        for r, logits in zip(other, forward_rows_batch_invariant(net, [rows_list[r] for r in other], rows_per_pass,
                                                                 pack=pack, bucket=bucket)):
            out[r] = logits
    width = {"bucket": bucket, "request": bucket, "length": None}[pack]
    groups: dict[int, list[tuple]] = {}
    for key in contexts:
        groups.setdefault(bucket_length(len(key[0]), width), []).append(key)
    for S in sorted(groups, reverse=True):
        keys = groups[S]
        R = context_rows(S, rows_per_pass)
        batches = [[(key[0], contexts[key]) for key in keys[a:a + R]] for a in range(0, len(keys), R)]
        _contexts_and_continuations(net, batches, S, R, rows_per_pass, None if width is None else max(1, width // 4),
                                    out)
    return out  # type: ignore[return-value]


@torch.no_grad()
def _contexts_and_continuations(net, batches: list[list], S: int, R: int, rows_per_pass: int, cont_bucket: int | None,
                                out: list) -> None:
    """The context passes of `batches` (each [(context ids, [(request, continuation inputs)])], R rows of S tokens),
    then the continuation passes of their requests over the kept keys / values; fills `out[request]`.

    Context passes are taken in groups whose caches together stay under CACHE_BYTES; within a group, continuations of
    one padded length share passes whichever context pass their context came from (their caches are concatenated), so
    only the last continuation pass of each length in a group is part padding. Every pass keeps the shape it had when
    each context pass was handled alone, so this changes no bit; the head runs once over the group's hidden states."""
    i = 0
    while i < len(batches):
        start, caches, hidden, owners, conts, size = i, [], [], [], {}, 0
        while i < len(batches) and (not caches or size < CACHE_BYTES):
            h, cache = _context_pass(net, batches[i], S, R)
            base = len(caches) * R  # this pass's rows in the concatenated cache
            hidden.append(h)
            owners += [(("first", base + b), 1) for b in range(len(batches[i]))]
            for b, (_, reqs) in enumerate(batches[i]):
                for r, x in reqs:
                    if x:  # (a one-token continuation needs only its context's first logits)
                        conts.setdefault(bucket_length(len(x), cont_bucket), []).append((r, base + b, x))
            caches.append(cache)
            size += sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
            i += 1
        cache = caches[0] if len(caches) == 1 else concat_caches(caches)
        del caches
        context_row = {}  # request -> its context's row in the group
        for Lc in sorted(conts, reverse=True):
            hidden_c, owners_c = _continuation_passes(net, cache, conts[Lc], S, Lc, rows_per_pass)
            hidden += hidden_c
            owners += owners_c
            context_row.update((r, b) for r, b, _ in conts[Lc])
        del cache
        first = _head(net, torch.cat(hidden), owners, context_row, out)
        for p, batch in enumerate(batches[start:i]):
            for b, (_, reqs) in enumerate(batch):
                for r, x in reqs:
                    if not x:
                        out[r] = first[p * R + b].clone()


def _head(net, hidden: torch.Tensor, owners: list, context_row: dict, out: list) -> dict:
    """The head over a group's hidden states (N, d), HEAD_ROWS rows per call: a call's shape is fixed, so a row's
    logits depend on its own hidden state alone (pooling the passes changes no bit). `owners` [(key, rows)] in row
    order: ("first", context row) for the logits a context's last token gives, then requests. A request's logits,
    its context's first row and its own rows, go to `out` as soon as its last row arrives, so the group's logits are
    copied once and each head call's output is released when the next one comes. Returns {context row: (1, V)}."""
    first, parts = {}, {}
    for pieces in Pass([(j, n) for j, (_, n) in enumerate(owners)], hidden, None).logits(net):
        for j, piece in pieces:  # a piece is a view of this call's logits
            parts.setdefault(j, []).append(piece)
            key, n = owners[j]
            if sum(p.shape[0] for p in parts[j]) < n:
                continue
            done = parts.pop(j)
            if isinstance(key, tuple):
                first[key[1]] = done[0].clone()  # one row
            else:
                out[key] = torch.cat([first[context_row[key]], *done])
    return first


def _context_pass(net, batch: list, S: int, R: int):
    """One causal pass over the contexts of `batch` (R rows of S tokens; dummy rows hold no real token): the hidden
    state at each context's last token (it predicts every continuation's first token), (n_ctx, d), and the cache."""
    dev = network_device(net)
    idx = torch.zeros(R, S, dtype=torch.long)
    valid = torch.zeros(R, S, dtype=torch.bool)
    at = torch.zeros(R, S, dtype=torch.bool)
    for b, (ctx, _) in enumerate(batch):
        idx[b, :len(ctx)] = torch.as_tensor(ctx, dtype=torch.long)
        valid[b, :len(ctx)] = True
        at[b, len(ctx) - 1] = True
    return net.hidden_cached(idx.to(dev), None, valid=valid.to(dev), at=at.to(dev))


def _continuation_passes(net, cache, work: list, S: int, Lc: int, rows_per_pass: int):
    """Passes of `continuation_rows(S, Lc)` rows over `work` [(request, cache row, inputs)] (inputs padded to Lc; dummy
    rows read cache row 0 and hold no real token): ([hidden states (N, d) per pass], [(request, rows)])."""
    dev = network_device(net)
    R2 = continuation_rows(S, Lc, rows_per_pass)
    hidden, owners = [], []
    for a in range(0, len(work), R2):
        chunk = work[a:a + R2]
        idx = torch.zeros(R2, Lc, dtype=torch.long)
        new = torch.zeros(R2, Lc, dtype=torch.bool)
        rows = torch.zeros(R2, dtype=torch.long)
        for k, (_, b, x) in enumerate(chunk):
            idx[k, :len(x)] = torch.as_tensor(x, dtype=torch.long)
            new[k, :len(x)] = True
            rows[k] = b
        h, _ = net.hidden_cached(idx.to(dev), cache.select(rows, lazy=True), valid=new.to(dev), at=new.to(dev),
                                 keep_cache=False)  # (N, d)
        hidden.append(h)
        owners += [(r, len(x)) for r, _, x in chunk]
    return hidden, owners
