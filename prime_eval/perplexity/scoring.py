"""Score blocks: K per-sample values per block, from a result cache where stored, else computed and stored as soon as
they are final.

    values, rows_used = scored[b.index]        # (K,) float64 nats, forward rows that needed logits

Blocks missing from the cache become rows (`sampling.block_rows`) and go through the network in passes of rows of
one padded length (`estimators.rows.forward_terms`, the passes of `forward_rows_batch_invariant`): a block's values
never depend on which blocks share its pass, so resumed and data-parallel runs give the same bits. The logits of a
pass are reduced at once to the per-position values the estimator's cost needs (-log p of the target; Prime: the
true digits' marginals) in chunks of bounded size, so memory does not grow with batch × L × V across blocks. A block
is scored in slices of at most 16 of its K samples (a slice's masks are those of the block's one draw of all K, and
the slices are fixed by K alone), and each slice is written to the cache the moment its last logits are reduced: a
killed run loses at most the slices of the forward pass in progress, and never more than 16 samples of a block,
whatever K, the batch size or the number of processes (a deterministic chain_rule block is one slice of L rows).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from prime_eval.estimators.rows import forward_terms, logits_chunk_rows
from prime_eval.perplexity.blocks import Block
from prime_eval.perplexity.protocol import Protocol
from prime_eval.perplexity.sampling import block_rows

CACHE_KIND = "ppl_block"


def cache_identity(net, est, p: Protocol, K: int, deterministic: bool, bos: int, eos: int,
                   model: dict | None) -> dict:
    """Everything a block's values depend on besides the block itself: the key of a run in a result cache (with the
    logit rows reduced at a time, which can move a Prime value in its last bits)."""
    from prime_eval.cache import estimator_identity, run_identity, state_dict_sha256

    sha = (model or {}).get("checkpoint_sha256") or state_dict_sha256(net)
    param = next(iter(net.parameters()), None)
    return run_identity(checkpoint_sha256=sha, estimator=estimator_identity(est), num_samples=K, seed=p.seed,
                        kind="ppl", strata=None if deterministic else p.strata, L=p.L, wrap=p.wrap, bos_id=bos,
                        eos_id=eos, dtype=str(param.dtype) if param is not None else None,
                        device_type=param.device.type if param is not None else "cpu",
                        logit_chunk_rows=logits_chunk_rows(getattr(net, "vocab_size", None) or 1))


SAMPLES_PER_SLICE = 16  # a fixed number: a block's slices (and their cached keys) never depend on the batch size


def slices(K: int, deterministic: bool) -> list[tuple[int, int]]:
    """The sample ranges [a, b) a block's K samples are scored and stored in."""
    if deterministic:
        return [(0, 1)]
    return [(a, min(a + SAMPLES_PER_SLICE, K)) for a in range(0, K, SAMPLES_PER_SLICE)]


def slice_key(block: Block, a: int, b: int) -> dict:
    return {"index": block.index, "ids": block.ids.tolist(), "samples": [a, b]}


def score_blocks(net, est, blocks: Sequence[Block], p: Protocol, K: int, batch_size: int,
                 cache=None) -> tuple[dict[int, tuple[torch.Tensor, int]], int]:
    """{block index: ((K,) float64 CPU values, forward rows)} for `blocks`, and how many blocks came wholly from the
    cache.

    `cache`: None, or an object with `get_many(kind, keys)` and `put_many(kind, [(key, value)])`
    (`prime_eval.cache.ResultCache`, opened by the caller under `cache_identity`)."""
    deterministic = est.family == "arm" or bool(getattr(est, "deterministic", False))
    work = [(b, a, z) for b in blocks for a, z in slices(K, deterministic)]
    keys = [slice_key(b, a, z) for b, a, z in work]
    stored = cache.get_many(CACHE_KIND, keys) if cache is not None else [None] * len(work)
    done: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    todo = []
    for (b, a, z), key, hit in zip(work, keys, stored):
        if hit is not None:
            done[b.index, a] = (torch.tensor(hit["values"], dtype=torch.float64), int(hit["rows"]))
        else:
            todo.append((b, a, z, key))
    missing: dict[int, tuple[Block, list[tuple[int, int]]]] = {}
    for b, a, z, _ in todo:
        missing.setdefault(b.index, (b, []))[1].append((a, z))
    rows = [r for b, ranges in missing.values() for r in block_rows(est, b, p, K, ranges)]  # one draw per block
    for i, terms in forward_terms(net, est, rows, batch_size):
        (b, a, _, key), r = todo[i], rows[i]
        values = est.cost_from_terms(r, terms).detach().to("cpu", torch.float64)
        n_rows = int(r.logits_at.any(1).sum())
        done[b.index, a] = (values, n_rows)
        if cache is not None:  # final: store it now, not after the step
            cache.put_many(CACHE_KIND, [(key, {"values": values.tolist(), "rows": n_rows})])
    out = {}
    for b in blocks:
        parts = [done[b.index, a] for a, _ in slices(K, deterministic)]
        out[b.index] = (torch.cat([v for v, _ in parts]), sum(n for _, n in parts))
    fresh = {b.index for b, *_ in todo}
    return out, sum(b.index not in fresh for b in blocks)
