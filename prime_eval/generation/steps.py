"""The step schedule shared by the diffusion samplers, and the loop that batches their steps across requests.

Blocks (LLaDA's semi-autoregressive sampling): an answer of L tokens is cut into blocks of `block_length` tokens
(the last one may be shorter), sampled left to right; each block gets steps / #blocks steps (steps must be a
multiple of the number of blocks, as in LLaDA). Within a block of S steps, step k goes from t = 1 - k/S to
s = 1 - (k+1)/S on the linear schedule α_t = 1 - t, so a still-masked position is revealed with probability

    (α_s - α_t) / (1 - α_t) = 1 / (S - k)                       (MDLM's ancestral step; 1 at the last step)

and LLaDA's deterministic counts reveal n // S positions per step, the first n mod S steps one more
(`transfer_counts`). A step that reveals nothing changes nothing, so it needs no forward pass (MDLM's caching).

`run_steps` drives many requests' samplers (objects with `next_rows()` -> Rows or None when done, and
`advance(logits)`): each round packs the next pass of every unfinished request into passes of one padded length
(`forward_rows_batch_invariant`, without fixed shapes: padding every pass to `rows_per_pass` rows would multiply the
cost of a round with few requests left), so a request's answer depends on what shares its passes only where the last
bits of its logits decide a draw (a near tie).
"""
from __future__ import annotations

import torch

from prime_eval.errors import UserError
from prime_eval.estimators.rows import forward_rows_batch_invariant
from prime_eval.generation.sampling import sample


def block_plan(length: int, steps: int | None, block_length: int | None) -> list[tuple[int, int, int]]:
    """[(first, end, steps)] per block of an answer of `length` tokens (defaults: one block, `length` steps)."""
    if length <= 0:
        return []
    block = length if block_length is None else min(block_length, length)
    n_blocks = -(-length // block)
    steps = length if steps is None else steps
    if steps % n_blocks:
        raise UserError(f"steps={steps} is not a multiple of the {n_blocks} blocks of block_length={block} in an "
                        f"answer of {length} tokens; choose steps as a multiple of {n_blocks}")
    per = steps // n_blocks
    return [(b * block, min((b + 1) * block, length), per) for b in range(n_blocks)]


def transfer_counts(n: int, steps: int) -> list[int]:
    """LLaDA's `get_num_transfer_tokens`: n positions over `steps` steps, n // steps each, the first n mod steps
    steps one more."""
    base, extra = divmod(n, steps)
    return [base + (1 if k < extra else 0) for k in range(steps)]


def reveal_probability(k: int, steps: int) -> float:
    """(α_s - α_t)/(1 - α_t) of step k of `steps` on the linear schedule: 1/(steps - k)."""
    return 1.0 / (steps - k)


def run_steps(net, samplers: list, *, rows_per_pass: int = 64, pack: str = "bucket", on_pass=None) -> None:
    """Advance every sampler until done, one forward pass per round for each that needs one (module docstring).

    A sampler has `next_rows()` (the Rows of its next pass, or None when its answer is complete), `prepare(logits)`
    -> (logits to draw from (n, V), uniforms (n,) or None for τ = 0, its GenRequest) and `finish(x0, confidence)`
    with the n tokens drawn and, when its `needs_confidence`, their untempered probabilities p(x0). The draws of a
    round are computed together (`draw_many`): the same numbers as one request at a time, in fewer tensor calls."""
    while True:
        pending = []
        for s in samplers:
            rows = s.next_rows()
            if rows is not None:
                pending.append((s, rows))
        if not pending:
            return
        logits = forward_rows_batch_invariant(net, [r for _, r in pending], rows_per_pass, pack=pack, fixed=False)
        if on_pass:
            on_pass(sum(r.num_rows for _, r in pending))
        prepared = [s.prepare(lg) for (s, _), lg in zip(pending, logits)]
        draws = draw_many(prepared, [s.needs_confidence for s, _ in pending])
        for (s, _), (x0, conf) in zip(pending, draws):
            s.finish(x0, conf)


def draw_many(prepared: list, confidence: list[bool]) -> list[tuple]:
    """[(logits (n_i, V), uniforms (n_i,) | None, GenRequest)] -> [(x0 (n_i,), p(x0) (n_i,) | None)]: requests with
    the same temperature / top-k / top-p drawn in one `sample` call (row-wise, so the same numbers as alone)."""
    out: list = [None] * len(prepared)
    groups: dict = {}
    for i, (_, _, r) in enumerate(prepared):
        groups.setdefault((r.temperature, r.top_k, r.top_p), []).append(i)
    for (tau, top_k, top_p), idx in groups.items():
        logits = torch.cat([prepared[i][0] for i in idx])
        u = None if tau == 0 else torch.cat([prepared[i][1] for i in idx])
        x0 = sample(logits, u, tau, top_k, top_p)
        conf = None
        if any(confidence[i] for i in idx):  # p(x0) = exp(logit(x0) - logsumexp(logits)), float64
            lg = logits.double()
            conf = (lg.gather(1, x0[:, None]).squeeze(1) - torch.logsumexp(lg, -1)).exp().cpu()
        x0 = x0.cpu()
        start = 0
        for i in idx:
            n = prepared[i][0].shape[0]
            out[i] = (x0[start:start + n], None if conf is None else conf[start:start + n])
            start += n
    return out
