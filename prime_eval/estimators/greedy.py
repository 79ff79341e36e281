"""`is_greedy` for diffusion models: greedy confidence-ordered unmasking (LLaDA `is_check_greedy`, SMDM `greddy`).

Rule, per request (context clean, all n target tokens masked at the start):

    repeat n times:
        one forward pass on the current sequence; at every still-masked target token i take
        the argmax token c_i = argmax_c p_θ(c | x_t) and its confidence p_θ(c_i | x_t)
        reveal the single most confident token (ties: leftmost) with its argmax c_i
    is_greedy = every revealed token equals the true continuation token

Stopping at the first wrong reveal gives the same answer (a revealed token is never re-masked) and saves passes.
Prime reveals whole tokens: a masked token has all ℓ sub-tokens masked, so p_θ(c | y_t) is the network's V-way
softmax and revealing writes the token's ℓ digits f_ℓ(π(c)). CFG and temperature are not applied (argmax of the plain
conditional). Steps are batched across requests: step s packs the s-th pass of every still-undecided request.
Cost: at most n forward rows per request.
"""
from __future__ import annotations

import torch

from prime_eval.estimators.rows import Rows, forward_rows


def greedy_unmask(net, requests: list[tuple[torch.Tensor, torch.Tensor]], *, mask_id: int, subtokenizer=None,
                  rows_per_pass: int = 64) -> tuple[list[bool], list[int]]:
    """Greedy check for many (x (L,), target (L,) bool) requests. Returns (is_greedy, forward rows used) per request.

    `subtokenizer` (Prime): inputs are f_ℓ(π(x)) with sub-token mask id `mask_id` (= b); None for MDM.
    """
    ell = subtokenizer.ell if subtokenizer is not None else 1
    state, remaining, ok, rows_used = [], [], [True] * len(requests), [0] * len(requests)
    for x, target in requests:
        y = subtokenizer.encode(x) if subtokenizer is not None else x.clone()  # (L·ℓ,)
        y = y.view(-1, ell).clone()
        y[target] = mask_id
        state.append(y)  # (L, ℓ)
        remaining.append(target.clone())
    while True:
        active = [r for r in range(len(requests)) if ok[r] and bool(remaining[r].any())]
        if not active:
            break
        rows = [Rows(inputs=state[r].flatten()[None], logits_at=remaining[r][None], num_samples=1) for r in active]
        for r, logits in zip(active, forward_rows(net, rows, rows_per_pass)):
            rows_used[r] += 1
            conf, pred = torch.softmax(logits.double(), dim=-1).max(dim=-1)  # (n_remaining,)
            pos = torch.nonzero(remaining[r]).flatten()
            k = int(conf.argmax())  # first maximum = leftmost among ties
            i, c = int(pos[k]), int(pred[k])
            x = requests[r][0]
            if c != int(x[i]):
                ok[r] = False
                continue
            remaining[r][i] = False
            state[r][i] = subtokenizer.encode(x[i:i + 1]) if subtokenizer is not None else x[i]
    return ok, rows_used
