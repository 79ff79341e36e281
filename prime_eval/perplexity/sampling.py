"""The randomness of a perplexity run: per-block generators, block-stratified times, bootstrap weights.

Time sampling (MDM/Prime) is "stratified across the batch as MDLM does", made independent of the batch size. Blocks
are grouped by *index* into fixed groups of `strata` blocks (default 16, MDLM's eval batch). The G·K samples of a
group get one stratum each of [0, 1), in a random order (a permutation drawn from the group's own generator), with
independent jitter inside the stratum:

    u = (stratum + v) / (G·K),   v ~ U(0,1) the first draw of the block's own generator

Every sample is marginally U(0,1) — so every block's estimate is unbiased on its own, unlike a fixed stratum per
batch position — and the group's sum has the variance of stratified sampling. The block's estimator then turns u into
t = ε + (1-ε)u or ⌈uT⌉/T (or a masked count) and draws its masks from the same generator, through the one sampler
`prime-eval score` uses too (`prime_eval.estimators.sampler`): identical uniforms give identical masks. All randomness
of block i comes from generators seeded by (seed, i) and (seed, group of i): batch size and order never change a
number. With ε > 0 the estimate is a bound only up to O(ε) (the dropped [0, ε) and the 1/(1-ε) rescaling).
"""
from __future__ import annotations

import numpy as np
import torch

from prime_eval.estimators.rows import Rows
from prime_eval.perplexity.protocol import Protocol, check_allowed

TAG_GROUP, TAG_BLOCK, TAG_BOOT = 1, 2, 3  # the three streams of a run


def block_generator(seed: int, tag: int, index: int) -> torch.Generator:
    """A generator owned by (seed, tag, index) alone (numpy SeedSequence hashing), so no batch shares one."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, tag, int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def block_uniforms(seed: int, index: int, num_samples: int, strata: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(K,) float64 u ~ U(0,1) for block `index`, stratified over its group of `strata` blocks (module docstring).

    The group's G·K strata are assigned by a permutation from the group's generator; the jitter inside the stratum
    comes from the block's own `generator` (its first draw).
    """
    g, p = divmod(index, strata)
    n = strata * num_samples
    perm = torch.randperm(n, generator=block_generator(seed, TAG_GROUP, g))
    cells = perm[p * num_samples:(p + 1) * num_samples].double()
    v = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    return (cells + v) / n


def block_rows(est, block, p: Protocol, K: int, slices: list[tuple[int, int]] | None = None) -> list[Rows]:
    """Rows of one block (`blocks.Block`), all positions scored (ARM: all after the BOS); one Rows per sample range
    [a, b) in `slices` (default: all K at once). A Monte Carlo estimator gets the block's stratified u (K,) and
    draws its masks from the block's generator after it (`est.draw(u=...)`, what `est.rows` does for `score`); the
    slices are cut from that one draw. A deterministic estimator gets the generator alone (one Rows). An estimator
    the protocol does not know raises."""
    check_allowed(est.family, est.name)
    g = block_generator(p.seed, TAG_BLOCK, block.index)
    target = torch.ones(block.ids.numel(), dtype=torch.bool)
    if est.family == "arm":
        target[0] = False
    if est.family == "arm" or getattr(est, "deterministic", False):
        return [est.rows(block.ids, target, g, 1)]
    draw = est.draw(target, g, K, u=block_uniforms(p.seed, block.index, K, p.strata, g))
    return [est.rows_from_draw(block.ids, target, draw.samples(a, b)) for a, b in (slices or [(0, K)])]


def bootstrap_weights(seed: int, index: int, replicates: int) -> np.ndarray | None:
    """(B,) Poisson(1) weights of block `index` in the B bootstrap replicates (own generator per block), or None."""
    if not replicates:
        return None
    return torch.poisson(torch.ones(replicates, dtype=torch.float64),
                         generator=block_generator(seed, TAG_BOOT, index)).numpy()
