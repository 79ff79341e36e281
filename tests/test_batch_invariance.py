"""Determinism at realistic widths: a request's numbers depend on the request and its seed, never on which other
requests share its forward passes, in what order, in how many processes, or on what a resumed run still had to compute
(docs/adapters.md "Bits and batches", docs/scale-out.md "Determinism").

A CPU BLAS picks its kernel, and so a row's rounding, by the shape of the matrices: a request's logits used to change
in the last bits with the rows that shared its passes (an (N, d) @ (d, V) head rounds row 0 differently for N < 256 at
d = 1792). The passes now have fixed shapes: `rows_per_pass` rows (dummy rows fill the last pass of a padded length),
the head `HEAD_ROWS` hidden states at a time (`prime_eval.estimators.rows`), ARM contexts and continuations likewise
(`model_adapters.shared_context`). `rows_per_pass` is itself part of those shapes, so it is held fixed here.
"""
from __future__ import annotations

import pytest
import torch

from model_adapters.shared_context import forward_rows_shared_context
from prime_eval.estimators import forward_rows_batch_invariant, forward_terms, get_estimator
from prime_eval.networks.lit_gpt import GPT, Config, TransEncoder

ROWS_PER_PASS = 4


def _random_net(cls, **config):
    """A lit_gpt network with N(0, 0.02) weights (built on "meta", then filled once: fast)."""
    with torch.device("meta"):
        net = cls(Config(block_size=128, **config))
    net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return net.eval()


WIDE = dict(n_layer=1, n_embd=1792, n_head=14, intermediate_size=7168, vocab_size=32000)  # Diff_LLaMA_1028M's width


def _mdm_rows(net, lengths, K=2):
    g = torch.Generator().manual_seed(1)
    est = get_estimator("mdm", "mc", mask_id=net.mask_id)
    rows = []
    for i, n in enumerate(lengths):
        x = torch.randint(0, net.vocab_size, (n,), generator=g)
        target = torch.zeros(n, dtype=torch.bool)
        target[n // 3:] = True
        rows.append(est.rows(x, target, torch.Generator().manual_seed(100 + i), K))
    return est, rows


def _values(net, est, rows, idx) -> dict[int, torch.Tensor]:
    """{i: K values} of requests idx scored together, by the scoring path of the adapters (logits held per chunk)."""
    logits = forward_rows_batch_invariant(net, [rows[i] for i in idx], ROWS_PER_PASS)
    return {i: est.cost(rows[i], lg) for i, lg in zip(idx, logits)}


def test_mdm_values_do_not_depend_on_what_shares_the_passes():
    """d = 1792, V = 32,000. Six requests in one bucket of 32 tokens and one in the next (K = 2 rows each, 4 rows per
    pass), scored together by `forward_terms` (ppl: logits reduced per head call), then alone and with other
    neighbours in another order by the adapters' path (logits held whole): the same bits."""
    net = _random_net(TransEncoder, **WIDE)
    est, rows = _mdm_rows(net, [30, 17, 25, 32, 9, 21, 40])
    together = {i: est.cost_from_terms(rows[i], terms) for i, terms in forward_terms(net, est, rows, ROWS_PER_PASS)}
    assert torch.equal(_values(net, est, rows, [1])[1], together[1])  # alone: a resumed run, another rank
    other = _values(net, est, rows, [5, 3, 4, 6])  # another order, other neighbours
    assert all(torch.equal(v, together[i]) for i, v in other.items())


def _arm_rows(net, docs):
    """ARM requests: documents (context length, continuation lengths), every choice sharing its document's context."""
    g = torch.Generator().manual_seed(2)
    est = get_estimator("arm", "exact")
    rows = []
    for c, conts in docs:
        ctx = torch.randint(0, net.vocab_size, (c,), generator=g)
        for n in conts:
            x = torch.cat([ctx, torch.randint(0, net.vocab_size, (n,), generator=g)])
            target = torch.zeros(c + n, dtype=torch.bool)
            target[c:] = True
            rows.append(est.rows(x, target, None, 1))
    return est, rows


def test_arm_values_do_not_depend_on_the_choices_scored_with_them():
    """d = 1792, V = 32,000. ARM scoring runs each context once: a choice's log-likelihood is the same bits whether its
    document's other choices (and other documents) are scored with it or not, in any order."""
    net = _random_net(GPT, **WIDE)
    est, rows = _arm_rows(net, [(20, [70, 1, 65, 80]), (45, [4, 9]), (7, [2, 5])])

    def ll(idx):
        logits = forward_rows_shared_context(net, [rows[i] for i in idx], ROWS_PER_PASS)
        return {i: est.cost(rows[i], lg) for i, lg in zip(idx, logits)}

    together = ll(range(8))
    assert torch.equal(ll([0])[0], together[0])  # alone
    assert all(torch.equal(v, together[i]) for i, v in ll([7, 2, 5]).items())  # part of the documents, shuffled
