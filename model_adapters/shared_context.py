"""ARM scoring that runs each context once, in packed passes (issue 17): the choices of a multiple-choice document
share their context, so it runs once and every continuation attends to it.

An ARM request's row is x[:-1] with logits at the positions C-1 … T-1 that predict its continuation (x = context C
tokens + continuation n tokens, T = C + n - 1). A pass is one row of M = TOKENS_PER_ROW·rows_per_pass token slots
holding whole documents side by side: each context once (positions 0 … C-1, causal), then the inputs x[C:T] of each
of its requests (n - 1 tokens at positions C … T-1), each attending to its context and causally to itself, never to
another continuation (`prime_eval.networks.kv_cache.Parts`):

    slots  | context 1 | cont 1.1 | cont 1.2 | cont 1.3 | context 2 | cont 2.1 | … | fill |
    logits at each context's last token (it predicts every continuation's first token) and at every continuation input

Compared with lm-eval `hf` (one row per choice, the context recomputed each time, every row padded to its batch's
longest) a document costs C + Σ (n_j - 1) slots instead of Σ (C + n_j); only the last pass's fill is padding. The
logits equal the full rows' up to float rounding (a different summation shape).

Bits (docs/adapters.md, "Bits and batches"): every pass has the shape (1, M), each part's attention is a call of its
own shape (`part_attention`), the kernels give a slot the same bits whatever the other slots hold, and the head runs
`HEAD_ROWS` hidden states at a time (`estimators.rows.head_logits`). A request's log-likelihood thus depends on its own
tokens, M and HEAD_ROWS, never on which requests share its passes, in what order, in how many processes, or on what a
resumed run still had to compute. A document larger than a pass is split into pieces, each with its context (run once
per piece); a context whose continuation does not fit M slots gets a pass of its own of k·M slots. Packing (`pack`):
`bucket` and `length` pack as above (there is no per-row padding to choose); `request` runs each request in a pass of
its own (its context run for it alone): the same bits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from prime_eval.errors import UserError
from prime_eval.estimators.rows import HEAD_ROWS, PACKING, Pass, Rows, forward_rows_batch_invariant, network_device
from prime_eval.networks.kv_cache import Parts

TOKENS_PER_ROW = 32  # a packed pass holds TOKENS_PER_ROW · rows_per_pass token slots
HEAD_GROUP = 8 * HEAD_ROWS  # hidden states gathered over passes before the head runs on them


def pass_tokens(rows_per_pass: int) -> int:
    """M, the token slots of a packed pass."""
    return TOKENS_PER_ROW * max(1, rows_per_pass)


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
    context run once in packed passes (module docstring). Rows of another shape go through
    `forward_rows_batch_invariant`."""
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
    M = pass_tokens(rows_per_pass)
    passes = pack_pieces(pieces(contexts, M), M, alone=pack == "request")
    hidden, owners, ones = [], [], []
    for p, (T, pass_pieces) in enumerate(passes):
        h, own, one = _packed_pass(net, pass_pieces, T, p)
        hidden.append(h)
        owners += own
        ones += one
        if sum(x.shape[0] for x in hidden) >= HEAD_GROUP or p == len(passes) - 1:
            first = _head(net, torch.cat(hidden), owners, out)
            for r, piece in ones:
                out[r] = first[piece].clone()
            hidden, owners, ones = [], [], []
    return out  # type: ignore[return-value]


def pieces(contexts: dict, M: int) -> list[tuple[int, tuple, list]]:
    """Documents cut to fit a pass: [(slots, context, [(request, continuation inputs)])], each piece its context and
    as many of its continuations as fit M slots; a continuation that does not fit with its context alone is a piece
    of its own, larger than M."""
    out = []
    for key, reqs in contexts.items():
        ctx = key[0]
        C = len(ctx)
        cur, size = [], C
        for r, x in reqs:
            if C + len(x) > M:
                out.append((C + len(x), ctx, [(r, x)]))
                continue
            if size + len(x) > M:
                out.append((size, ctx, cur))
                cur, size = [], C
            cur.append((r, x))
            size += len(x)
        if cur:
            out.append((size, ctx, cur))
    return out


def pack_pieces(items: list, M: int, *, alone: bool = False) -> list[tuple[int, list]]:
    """Passes [(slots T, [pieces])]: first-fit decreasing into passes of M slots; a piece larger than M (or every
    piece, `alone`) gets a pass of its own of the next multiple of M."""
    passes: list[list] = []  # [slots used, T, pieces]
    for item in sorted(items, key=lambda it: -it[0]):  # stable: equal sizes keep their order
        size = item[0]
        if size > M or alone:
            passes.append([size, -(-size // M) * M, [item]])
            continue
        for ps in passes:
            if ps[1] == M and ps[0] + size <= M:
                ps[0] += size
                ps[2].append(item)
                break
        else:
            passes.append([size, M, [item]])
    return [(T, its) for _, T, its in passes]


@torch.no_grad()
def _packed_pass(net, items: list, T: int, p: int):
    """One packed pass of T slots over `items` (module docstring): (hidden states at the logit slots (N, d), owners
    [(key, rows)] in slot order: ((p, i), 1) for piece i's context, then its requests (request, n - 1), and the
    one-token requests [(request, (p, i))] whose logits are their context's)."""
    idx = torch.zeros(1, T, dtype=torch.long)
    pos = torch.zeros(1, T, dtype=torch.long)
    at = torch.zeros(1, T, dtype=torch.bool)
    parts, owners, ones, a = [], [], [], 0
    for i, (_, ctx, reqs) in enumerate(items):
        C = len(ctx)
        idx[0, a:a + C] = torch.as_tensor(ctx, dtype=torch.long)
        pos[0, a:a + C] = torch.arange(C)
        at[0, a + C - 1] = True
        parts.append((a, C, 0, 0))
        owners.append(((p, i), 1))
        c0, a = a, a + C
        for r, x in reqs:
            m = len(x)
            if m == 0:  # a one-token continuation needs only its context's logits
                ones.append((r, (p, i)))
                continue
            idx[0, a:a + m] = torch.as_tensor(x, dtype=torch.long)
            pos[0, a:a + m] = torch.arange(C, C + m)
            at[0, a:a + m] = True
            parts.append((a, m, c0, C))
            owners.append((r, m))
            a += m
    valid = torch.zeros(1, T, dtype=torch.bool)
    valid[0, :a] = True
    dev = network_device(net)
    layout = Parts(tuple(parts), rows=sum(len(reqs) for _, _, reqs in items))
    h, _ = net.hidden_cached(idx.to(dev), None, valid=valid.to(dev), at=at.to(dev), explicit=(pos.to(dev), layout),
                             keep_cache=False)
    return h, owners, ones


def _head(net, hidden: torch.Tensor, owners: list, out: list) -> dict:
    """The head over the hidden states (N, d) of some passes, HEAD_ROWS rows per call: a call's shape is fixed, so a
    row's logits depend on its own hidden state alone. `owners` [(key, rows)] in row order: (pass, piece) for the
    logits a context's last token gives, then that piece's requests. A request's logits (its context's row, then its
    own rows) go to `out` as soon as its last row arrives, so the logits are copied once and each head call's output
    is released when the next one comes. Returns {(pass, piece): (1, V)}."""
    first, parts, context = {}, {}, None
    for pieces_ in Pass([(j, n) for j, (_, n) in enumerate(owners)], hidden, None).logits(net):
        for j, piece in pieces_:  # a piece is a view of this call's logits
            parts.setdefault(j, []).append(piece)
            key, n = owners[j]
            if sum(x.shape[0] for x in parts[j]) < n:
                continue
            done = parts.pop(j)
            if isinstance(key, tuple):
                context = key
                first[key] = done[0].clone()  # one row
            else:
                out[key] = torch.cat([first[context], *done])
    return first
