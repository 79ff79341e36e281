"""Draws of the masking (forward) process, from explicit uniforms: the one place masks and times are sampled.

Every Monte Carlo estimator's randomness is two sets of uniforms, drawn from the request's own generator in this
order (method.md §2.1, §2.3):

    u  (K,)    one per sample: its time t_k or its masked count l_k (stratified, below)
    v  (K, n)  one per sample and diffused position (n tokens, or n·ℓ sub-tokens): which positions are masked,
               or their reveal order; drawn position-major, `rand(n, K).T`, so position i's K draws do not depend
               on n (the choices of one document share the draws of their common positions)

and every mask set is a pure function of them:

    stratified    u_k = (u_0 + k/K) mod 1, one u_0 ~ U(0,1)                      (SMDM / VDM low discrepancy)
    time          t_k = ε + (1-ε)·u_k  (MDLM's floor ε)   or   t_k = max(⌈u_k·T⌉, 1)/T  (T-step grid)
    independent   position i masked in sample k iff v_ki < t_k;                 weight 1/t_k          (`mc`)
    exact count   l_k = min(1 + ⌊n·u_k⌋, n); the l_k positions of smallest rank(v_k) masked;
                  weight n/l_k                                                                   (`exact_count`)
    sqrt count    l_k = F⁻¹(u_k) for the law q(l) ∝ l^(-1/2) on 1..n (`count_law`); masked as exact count;
                  weight 1/(q(l_k)·l_k): importance sampling over the count, more samples where few
                  positions are masked and the exact-count weight n/l is large                  (`sqrt_count`)
    levels        r = rank(v_k); the nested sets {i : r_i < l}, l = n..1, weight 1/l each;
                  n rows per sample, no u                                                         (`levels`)
    chunked       legacy_joint (MDM-Prime v2's evaluate_prime.py): for t_k ≥ point, groups of `size`
                  consecutive positions share one draw: position i masked iff v_{k, ⌊i/size⌋} < t_k;
                  weight 1/(t_k + 1e-6)                                                      (`legacy_joint`)
    left-to-right row k masks positions ≥ k (no uniforms; deterministic)                           (`chain_rule`)

`score` draws u from the request's generator (`stratified_uniform`); `ppl` hands over its own u, stratified across a
group of blocks (`prime_eval.perplexity.sampling`). Both then draw v from the same generator and call the same
function, so identical uniforms give identical masks. `batch_masks` is the entry point for a training loss (a batch
of rows of different lengths, padding never masked).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prime_eval.errors import UserError

SCHEMES = ("independent", "exact_count", "sqrt_count", "levels", "chunked", "left_to_right")
SCHEME_OF = {  # estimator name -> masking scheme
    "mdm": {"mc": "independent", "exact_count": "exact_count", "sqrt_count": "sqrt_count", "levels": "levels",
            "chain_rule": "left_to_right"},
    "prime": {"mc": "independent", "exact_count": "exact_count", "sqrt_count": "sqrt_count", "levels": "levels",
              "legacy_joint": "chunked"},
}
COUNT_POWER = {"sqrt_count": 0.5}  # q(l) ∝ l^(-power) of the importance-sampled count schemes
LEGACY_WEIGHT_EPS = 1e-6  # legacy_joint's weight 1/(t + 1e-6), as published


# -- uniforms ----------------------------------------------------------------------------------------------------
def stratified_uniform(generator: torch.Generator, k: int) -> torch.Tensor:
    """(K,) float64 u_k = (u_0 + k/K) mod 1 with one shared u_0 ~ U(0,1) drawn from `generator`."""
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    return (u + torch.arange(k, dtype=torch.float64) / k) % 1.0


def position_uniforms(generator: torch.Generator, k: int, n: int) -> torch.Tensor:
    """(K, n) float64 uniforms drawn position-major (`rand(n, K).T`): position i's K draws do not depend on n."""
    return torch.rand(n, k, generator=generator, dtype=torch.float64).T


# -- mask sets from uniforms (pure) --------------------------------------------------------------------------------
def times(u: torch.Tensor, *, eps: float = 0.0, T: int | None = None) -> torch.Tensor:
    """t = max(⌈u·T⌉, 1)/T on the T-step grid, else t = ε + (1-ε)·u.

    Discrete time: with t_i = i/T the T-step ELBO weight (α_s - α_t)/(1 - α_t) = 1/(T·t_i), times T for the uniform
    draw of i, gives the same value (1/t) Σ_masked -log p on the grid."""
    if T:
        return torch.ceil(u * T).clamp_min(1) / T
    return eps + (1.0 - eps) * u


def _pad_excluded(v: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """v with positions i ≥ lengths[k] set to +inf (never below a time, ranked last)."""
    if lengths is None:
        return v
    pad = torch.arange(v.shape[1], device=v.device)[None, :] >= lengths[:, None]
    return v.masked_fill(pad, math.inf)


def independent_masks(t: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(K, n) bool: position i masked in sample k iff v_ki < t_k (positions ≥ lengths[k] never)."""
    return _pad_excluded(v, lengths) < t[:, None]


def reveal_ranks(v: torch.Tensor) -> torch.Tensor:
    """(K, n) long: rank of v_ki within row k, a uniformly random order (rank < l: the first l positions)."""
    return v.argsort(dim=1).argsort(dim=1)


def exact_count_masks(u: torch.Tensor, v: torch.Tensor,
                      lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, n) bool masks with l_k = min(1 + ⌊n_k·u_k⌋, n_k) positions masked, chosen by rank of v_k, and l_k (K,).

    n_k = n, or lengths[k] for rows of different lengths (the positions beyond a row's length are never masked)."""
    n = torch.full_like(u, v.shape[1]) if lengths is None else lengths.to(u.dtype)
    counts = torch.minimum(torch.floor(u * n).long() + 1, n.long()).clamp_min(1)
    return reveal_ranks(_pad_excluded(v, lengths)) < counts[:, None], counts


def count_law(n: int, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float64 probabilities q(l) ∝ l^(-power) of l = 1..n masked positions, and the (n,) weights 1/(q(l)·l)
    that keep the NELBO's expectation: Σ_l q(l) · 1/(q(l)·l) · E_{|S|=l}[Σ_{i∈S} c_i] = Σ_l (1/l) E_{|S|=l}[·].
    power = 0 is exact count (q = 1/n, weight n/l)."""
    levels = torch.arange(1, n + 1, dtype=torch.float64)
    q = levels ** -power
    q = q / q.sum()
    return q, 1.0 / (q * levels)


def weighted_count_masks(u: torch.Tensor, v: torch.Tensor, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, n) bool masks of l_k = F⁻¹(u_k) positions (the law `count_law(n, power)`), chosen by rank of v_k as in
    `exact_count_masks`, and their weights (K,) 1/(q(l_k)·l_k)."""
    n = v.shape[1]
    q, w = count_law(n, power)
    idx = torch.searchsorted(q.cumsum(0), u, right=True).clamp(max=n - 1)  # l_k - 1: P(idx = l-1) = q(l)
    return reveal_ranks(v) < (idx + 1)[:, None], w[idx]


def level_masks(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K·n, n) nested masks: for each of K random orders, its first l = n..1 positions; weights (K·n,) 1/l.

    Σ_l (1/l) Σ_{i∈S_l} -log p(x_i | x_{-S_l}) has expectation Σ_l (1/l) E_{|S|=l}[...] = the NELBO (every
    exact-count level once: stratified over l, with nested sets as common random numbers between levels)."""
    k, n = v.shape
    ranks = reveal_ranks(v)  # (K, n)
    levels = torch.arange(n, 0, -1)  # l = n, n-1, ..., 1
    masks = ranks[:, None, :] < levels[None, :, None]  # (K, n_levels, n)
    return masks.reshape(k * n, n), (1.0 / levels.double()).repeat(k)


def chunked_masks(t: torch.Tensor, v: torch.Tensor, chunks: tuple[tuple[float, int], ...]) -> torch.Tensor:
    """(K, n) bool legacy chunked masks: for t_k ≥ point, groups of `size` consecutive positions share the draw
    v_{k, ⌊i/size⌋} (the largest point ≤ t_k decides the size; size 1 is independent masking)."""
    if tuple(chunks) == ((0.0, 1),):
        return v < t[:, None]
    n = v.shape[1]
    out = torch.empty_like(v, dtype=torch.bool)
    for k in range(t.numel()):
        size = ([s for p, s in chunks if float(t[k]) >= p] or [1])[-1]
        group = torch.arange(n) // size
        out[k] = v[k, group] < t[k]  # one draw per group of `size` positions decides the whole group
    return out


def left_to_right_masks(n: int) -> torch.Tensor:
    """(n, n) bool: row k masks positions ≥ k (chain rule: row k scores position k)."""
    ar = torch.arange(n)
    return ar[None, :] >= ar[:, None]


def reveal_orders(v: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    """(K, n) long orders σ_k from (K, n) uniforms by the Gumbel-top-k trick: argsort of θ + Gumbel(v), descending.

    θ = None: uniformly random permutations; scores θ (n,): Plackett–Luce orders with those log-weights."""
    gumbel = -torch.log(-torch.log(v.clamp(1e-300, 1 - 1e-16)))
    return (gumbel if theta is None else theta[None] + gumbel).argsort(1, descending=True)


def order_masks(order: torch.Tensor) -> torch.Tensor:
    """(K·n, n) bool: row (k, s) masks the positions revealed at step ≥ s of order σ_k (σ_k(<s) visible)."""
    k, n = order.shape
    rank = order.argsort(1)  # rank[k, j] = step at which j is revealed
    steps = torch.arange(n)
    return (rank[:, None, :] >= steps[None, :, None]).reshape(k * n, n)


# -- a scheme: which of the above an estimator uses -----------------------------------------------------------------
@dataclass
class MaskDraw:
    """R mask sets over n diffused positions: masks (R, n) bool, weights (R,) float64, times t (K,) or None;
    R = K · rows_per_sample (levels: n rows per sample; left-to-right: all n rows are one value)."""

    masks: torch.Tensor
    weights: torch.Tensor
    t: torch.Tensor | None = None
    rows_per_sample: int = 1

    def samples(self, a: int, b: int) -> MaskDraw:
        """Samples a..b of the draw (their masks are those of the whole draw: a slice never changes a sample)."""
        r = slice(a * self.rows_per_sample, b * self.rows_per_sample)
        return MaskDraw(self.masks[r], self.weights[r], None if self.t is None else self.t[a:b], self.rows_per_sample)


@dataclass(frozen=True)
class MaskSampler:
    """How an estimator draws its mask sets (module docstring). `scheme` is one of SCHEMES."""

    scheme: str
    eps: float = 0.0
    T: int | None = None
    chunks: tuple[tuple[float, int], ...] = ((0.0, 1),)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise UserError(f"unknown masking scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")

    @classmethod
    def for_estimator(cls, family: str, name: str, **options) -> MaskSampler:
        """The sampler of estimator `name` of `family` (mdm or prime); an unknown name raises."""
        schemes = SCHEME_OF.get(family, {})
        if name not in schemes:
            raise UserError(f"estimator {name!r} of family {family!r} has no masking scheme; known: "
                            f"{', '.join(schemes) or 'none'}")
        return cls(schemes[name], **options)

    @property
    def uses_sample_uniforms(self) -> bool:
        """Whether the draw has one uniform u_k per sample (a time or a count), which a caller may supply."""
        return self.scheme in ("independent", "exact_count", "sqrt_count", "chunked")

    def draw(self, generator: torch.Generator | None, k: int, n: int, u: torch.Tensor | None = None) -> MaskDraw:
        """K samples over n positions: u (stratified from `generator`, unless given), then v from `generator`."""
        if self.scheme == "left_to_right":
            return self.from_uniforms(None, None, n)
        if u is None and self.uses_sample_uniforms:
            u = stratified_uniform(generator, k)
        elif u is not None and not self.uses_sample_uniforms:
            raise ValueError(f"the {self.scheme} scheme has no per-sample uniform to supply")
        if u is not None and u.numel() != k:
            raise ValueError(f"{u.numel()} per-sample uniforms for K = {k} samples")
        return self.from_uniforms(u, position_uniforms(generator, k, n), n)

    def from_uniforms(self, u: torch.Tensor | None, v: torch.Tensor | None, n: int) -> MaskDraw:
        """The mask sets of u (K,) and v (K, n) (module docstring: one formula per scheme)."""
        if self.scheme == "left_to_right":
            return MaskDraw(left_to_right_masks(n), torch.ones(n, dtype=torch.float64), rows_per_sample=n)
        if self.scheme == "levels":
            return MaskDraw(*level_masks(v), rows_per_sample=n)
        if self.scheme == "exact_count":
            masks, counts = exact_count_masks(u, v)
            return MaskDraw(masks, n / counts.double())
        if self.scheme in COUNT_POWER:
            return MaskDraw(*weighted_count_masks(u, v, COUNT_POWER[self.scheme]))
        t = times(u, eps=self.eps, T=self.T)
        if self.scheme == "chunked":
            return MaskDraw(chunked_masks(t, v, self.chunks), 1.0 / (t + LEGACY_WEIGHT_EPS), t)
        return MaskDraw(independent_masks(t, v), 1.0 / t, t)


def batch_masks(generator: torch.Generator, lengths: torch.Tensor, width: int, *, scheme: str = "exact_count",
                eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-loss entry point: (B, width) bool masks of B rows with `lengths` (B,) real positions each (the rest
    is padding, never masked), one independent draw per row; and the per-row weights (B,) float64.

    exact_count: l_b = min(1 + ⌊n_b·u_b⌋, n_b) masked, weight n_b/l_b;  independent: t_b = ε + (1-ε)u_b,
    weight 1/t_b. u (B,) is drawn first, then v (B, width), both from `generator`."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    B = lengths.numel()
    u = torch.rand(B, generator=generator, dtype=torch.float64)
    v = torch.rand(B, width, generator=generator, dtype=torch.float64)
    if scheme == "exact_count":
        masks, counts = exact_count_masks(u, v, lengths)
        return masks, lengths.double() / counts.double()
    if scheme == "independent":
        t = times(u, eps=eps)
        return independent_masks(t, v, lengths), 1.0 / t
    raise UserError(f"batch_masks: scheme {scheme!r} is not a training scheme; choose exact_count or independent")


__all__ = ["MaskSampler", "MaskDraw", "SCHEMES", "SCHEME_OF", "COUNT_POWER", "stratified_uniform", "position_uniforms",
           "times", "independent_masks", "exact_count_masks", "count_law", "weighted_count_masks", "level_masks",
           "chunked_masks", "left_to_right_masks",
           "reveal_ranks", "reveal_orders", "order_masks", "batch_masks"]
