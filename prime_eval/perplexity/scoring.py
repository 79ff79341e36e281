"""Score blocks: K per-sample values per block, from a result cache where stored, else computed and stored as soon as
each block is final.

    values, rows_used = scored[b.index]        # (K,) float64 nats, forward rows that needed logits

Blocks missing from the cache become rows (`sampling.block_rows`) and go through the network in passes of rows of
one padded length (`estimators.rows.forward_terms`, the passes of `forward_rows_batch_invariant`): a block's values
never depend on which blocks share its pass, so resumed and data-parallel runs give the same bits. The logits of a
pass are reduced at once to the per-position values the estimator's cost needs (-log p of the target; Prime: the
true digits' marginals) in chunks of bounded size, so memory does not grow with batch × L × V across blocks. A block
is written to the cache the moment its last logits are reduced: a killed run loses at most the blocks of the forward
pass in progress (or, for a block larger than one pass, that block).
"""
from __future__ import annotations

from collections.abc import Sequence
import torch

from prime_eval.estimators.rows import forward_terms
from prime_eval.perplexity.blocks import Block
from prime_eval.perplexity.protocol import Protocol
from prime_eval.perplexity.sampling import block_rows

CACHE_KIND = "ppl_block"


def cache_identity(net, est, p: Protocol, K: int, deterministic: bool, bos: int, eos: int,
                   model: dict | None) -> dict:
    """Everything a block's values depend on besides the block itself: the key of a run in a result cache."""
    from prime_eval.cache import estimator_identity, run_identity, state_dict_sha256

    sha = (model or {}).get("checkpoint_sha256") or state_dict_sha256(net)
    param = next(iter(net.parameters()), None)
    return run_identity(checkpoint_sha256=sha, estimator=estimator_identity(est), num_samples=K, seed=p.seed,
                        kind="ppl", strata=None if deterministic else p.strata, L=p.L, wrap=p.wrap, bos_id=bos,
                        eos_id=eos, dtype=str(param.dtype) if param is not None else None,
                        device_type=param.device.type if param is not None else "cpu")


def block_key(block: Block) -> dict:
    return {"index": block.index, "ids": block.ids.tolist()}


def score_blocks(net, est, blocks: Sequence[Block], p: Protocol, K: int, batch_size: int,
                 cache=None) -> tuple[dict[int, tuple[torch.Tensor, int]], int]:
    """{block index: ((K,) float64 CPU values, forward rows)} for `blocks`, and the number read from the cache.

    `cache`: None, or an object with `get_many(kind, keys)` and `put_many(kind, [(key, value)])`
    (`prime_eval.cache.ResultCache`, opened by the caller under `cache_identity`)."""
    out: dict[int, tuple[torch.Tensor, int]] = {}
    keys = [block_key(b) for b in blocks]
    stored = cache.get_many(CACHE_KIND, keys) if cache is not None else [None] * len(blocks)
    todo = []
    for b, key, hit in zip(blocks, keys, stored):
        if hit is not None:
            out[b.index] = (torch.tensor(hit["values"], dtype=torch.float64), int(hit["rows"]))
        else:
            todo.append((b, key))
    rows = [block_rows(est, b, p, K) for b, _ in todo]
    for i, terms in forward_terms(net, est, rows, batch_size):
        (b, key), r = todo[i], rows[i]
        values = est.cost_from_terms(r, terms).detach().to("cpu", torch.float64)
        n_rows = int(r.logits_at.any(1).sum())
        out[b.index] = (values, n_rows)
        if cache is not None:  # final: store it now, not after the step
            cache.put_many(CACHE_KIND, [(key, {"values": values.tolist(), "rows": n_rows})])
    return out, len(blocks) - len(todo)
