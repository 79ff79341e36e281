"""Exact audit: which estimators are valid bounds, proved by enumeration on models small enough (method.md §5.3).

For a request (x, target) with n diffused positions (tokens for MDM, target sub-tokens for Prime):

1. Exact expectation of an MC estimator: E[est] = Σ_S w(S) · cost(S) over all 2^n mask sets S, where w(S) is the
   probability weight its sampling implies times its importance weight. For t ~ U(0,1) with weight 1/t (and for the
   exact-count estimator): w(S) = ∫ t^{|S|-1}(1-t)^{n-|S|} dt = (|S|-1)!(n-|S|)!/n!. For an importance-sampled
   count (`sqrt_count`) it is computed from the sampler's own law and weights, q(|S|)·weight(|S|)/C(n, |S|), so a
   law or a weight that does not cancel shows as an expectation off the reference.
2. Exact likelihood of the model's own any-order generative process (one position revealed at a time, uniformly at
   random, from the per-position marginals), by a dynamic programme over reveal sets R:
        g(∅) = 1,   g(R ∪ {j}) += g(R) · p_θ(y_j | y_R, ctx) / (n - |R|),   p(y_T | ctx) = g(all).
   A valid bound satisfies E[NELBO](x) >= -log p(x).
3. Oracle entropy floor: tokens i.i.d. from a known categorical with entropy H and the exact conditional as network.
   Every valid estimator gives exactly L·H; the published joint form (`legacy_joint`) gives less.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch

from prime_eval.errors import UserError
from prime_eval.estimators import MDMEstimator, PrimeEstimator, estimate, forward_rows
from prime_eval.estimators.sampler import COUNT_POWER, count_law
from prime_eval.networks.toy import OracleDenoiser, TinyDenoiser
from prime_eval.subtokenizer import SubTokenizer, make_permutation

MAX_DIFFUSED = 16  # 2^16 mask sets: the enumeration limit
MAX_IW_POSITIONS = 8  # the iw audit enumerates all n! reveal orders (8! = 40,320)
ORACLE_ESTIMATORS = ("mc", "exact_count", "sqrt_count", "levels", "legacy_joint")
MDM_ESTIMATORS = ("mc", "exact_count", "sqrt_count", "levels", "chain_rule")
PRIME_ESTIMATORS = ("mc", "exact_count", "sqrt_count", "levels", "legacy_joint")
IW_KS, IW_PROPOSALS = (1, 4, 16), ("uniform", "pl")

# progress(fraction done in [0, 1], what is being done); None: silent
Progress = Callable[[float, str], None]


class _Steps:
    """Counts `total` units of work and reports the fraction done to `progress` after each."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, max(total, 1), 0

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done / self.total, 1.0), what)


def _part(progress: Progress | None, i: int, n: int) -> Progress | None:
    """The progress of part i of n (0-based), reported as a fraction of the whole."""
    if progress is None:
        return None
    return lambda f, what: progress((i + f) / n, what)


# -- weights ----------------------------------------------------------------------------------------------------
_GL_X, _GL_W = np.polynomial.legendre.leggauss(64)


def _integrate(f, a: float, b: float) -> float:
    """∫_a^b f(t) dt by 64-point Gauss-Legendre on geometric sub-intervals (accurate near t = 0)."""
    edges = [a] + [e for e in np.geomspace(1e-12, 1.0, 25) if a < e < b] + [b]
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = 0.5 * (hi - lo) * _GL_X + 0.5 * (hi + lo)
        total += 0.5 * (hi - lo) * float(np.sum(_GL_W * f(t)))
    return total


def set_weight(est, k: int, n: int) -> float:
    """E[weight · 1{S is the masked set}] for one set S of size k among n diffused positions."""
    name = est.name
    eps, T = getattr(est, "eps", 0.0), getattr(est, "T", None)
    scheme = getattr(getattr(est, "sampler", None), "scheme", None)
    if scheme in COUNT_POWER:  # the sampler's own law q and weights, shared by the C(n, k) sets of size k
        q, w = count_law(n, COUNT_POWER[scheme])
        return 0.0 if k == 0 else float(q[k - 1] * w[k - 1]) / math.comb(n, k)
    if name in ("exact_count", "levels") or (name == "mc" and not eps and not T):
        return 0.0 if k == 0 else math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)
    if T:  # t uniform on the grid {1/T, ..., 1}
        ts = np.arange(1, T + 1) / T
        w = 1.0 / (ts + 1e-6) if name == "legacy_joint" else 1.0 / ts
        return float(np.mean(w * ts**k * (1 - ts) ** (n - k)))
    if name == "legacy_joint":
        if getattr(est, "chunks", [(0.0, 1)]) != [(0.0, 1)]:
            raise UserError("the exact audit of legacy_joint supports independent masking only (no chunk spec)")
        return _integrate(lambda t: (eps + (1 - eps) * t) ** k * (1 - eps - (1 - eps) * t) ** (n - k)
                          / (eps + (1 - eps) * t + 1e-6), 0.0, 1.0)
    # mc with an ε floor: t = ε + (1-ε)u, weight 1/t
    return 0.0 if k == 0 else _integrate(lambda u: (eps + (1 - eps) * u) ** (k - 1)
                                         * (1 - eps - (1 - eps) * u) ** (n - k), 0.0, 1.0)


# -- enumeration ------------------------------------------------------------------------------------------------
def all_masks(n: int) -> torch.Tensor:
    """(2^n, n) bool; row m has position i masked iff bit i of m is set."""
    if n > MAX_DIFFUSED:
        raise UserError(f"{n} diffused positions: too many to enumerate (limit {MAX_DIFFUSED}); shorten the "
                        "target or lower ℓ")
    return ((torch.arange(2**n)[:, None] >> torch.arange(n)) & 1).bool()


def _valid_twin(est):
    """The valid `mc` estimator with the same network settings (gives the per-position marginals)."""
    if est.family == "mdm":
        return MDMEstimator("mc", mask_id=est.mask_id)
    return PrimeEstimator("mc", subtokenizer=est.st, carry_over=est.carry_over)


def masked_nll_table(net, est, x, target, rows_per_pass: int = 512) -> torch.Tensor:
    """(2^n, n): -log p_θ(y_j | y_{-S}) for every mask set S (row) and masked position j ∈ S (0 elsewhere)."""
    twin = _valid_twin(est)
    n = int(target.sum()) * (est.st.ell if est.family == "prime" else 1)
    masks = all_masks(n)
    rows = twin.rows_from_masks(x, target, masks, torch.ones(masks.shape[0], dtype=torch.float64))
    (logits,) = forward_rows(net, [rows], rows_per_pass)
    return twin.masked_nll(rows, logits)


def exact_expectation(net, est, x, target, rows_per_pass: int = 512, table: torch.Tensor | None = None) -> float:
    """E[est](x) = Σ_S w(S) cost(S), exactly (chain_rule: its deterministic value)."""
    x, target = torch.as_tensor(x), torch.as_tensor(target, dtype=torch.bool)
    if est.name == "chain_rule":
        return estimate(net, est, x, target, None, 1, rows_per_pass).mean
    n = int(target.sum()) * (est.st.ell if est.family == "prime" else 1)
    sizes = all_masks(n).sum(1)
    w = torch.tensor([set_weight(est, k, n) for k in range(n + 1)], dtype=torch.float64)[sizes]
    if est.name == "legacy_joint":
        masks = all_masks(n)
        rows = est.rows_from_masks(x, target, masks, torch.ones(masks.shape[0], dtype=torch.float64),
                                   t=torch.full((masks.shape[0],), 0.5, dtype=torch.float64))
        (logits,) = forward_rows(net, [rows], rows_per_pass)
        return float((w * est.cost(rows, logits)).sum())
    if table is None:
        table = masked_nll_table(net, est, x, target, rows_per_pass)
    return float((w * table.sum(1)).sum())


def exact_nll(net, est, x, target, rows_per_pass: int = 512, table: torch.Tensor | None = None) -> float:
    """-log p(x_T | x_C) of the any-order generative process (one reveal at a time from the marginals), by DP."""
    x, target = torch.as_tensor(x), torch.as_tensor(target, dtype=torch.bool)
    if table is None:
        table = masked_nll_table(net, est, x, target, rows_per_pass)
    n = table.shape[1]
    logg = np.full(2**n, -np.inf)
    logg[2**n - 1] = 0.0  # everything masked
    nll = table.numpy()
    popcount = all_masks(n).sum(1).numpy()
    for m in sorted(range(2**n), key=lambda m: -popcount[m]):
        if m == 0 or logg[m] == -np.inf:
            continue
        base = logg[m] - math.log(popcount[m])  # choose the next position uniformly among the masked ones
        for j in range(n):
            if m >> j & 1:
                nxt = m & ~(1 << j)
                logg[nxt] = np.logaddexp(logg[nxt], base - nll[m, j])
    return float(-logg[0])


# -- cases ------------------------------------------------------------------------------------------------------
def parse_source(source: str, V: int) -> torch.Tensor:
    """'uniform', 'zipf:1.1' or a comma list of probabilities -> (V,) float64 probabilities."""
    if source == "uniform":
        p = torch.ones(V, dtype=torch.float64)
    elif source.startswith("zipf:"):
        s = float(source.split(":", 1)[1])
        p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** s
    else:
        try:
            p = torch.tensor([float(v) for v in source.split(",")], dtype=torch.float64)
        except ValueError as e:
            raise UserError(f"bad source {source!r}: use uniform, zipf:S or a comma list like 0.5,0,0,0.5") from e
        if p.numel() != V:
            raise UserError(f"source lists {p.numel()} probabilities but V = {V}")
    if bool((p < 0).any()) or float(p.sum()) <= 0:
        raise UserError(f"source {source!r}: probabilities must be >= 0 and not all 0")
    return p / p.sum()


@dataclass
class AuditRow:
    case: str
    estimator: str
    expectation: float  # exact E[estimate] in nats (per request / sequence)
    reference: float  # exact NLL (model) or L·H (oracle)
    reference_kind: str
    gap: float  # expectation - reference (>= 0 for a valid bound)
    is_bound_by_construction: bool
    verdict: str
    mc_mean: float | None = None
    mc_stderr: float | None = None
    mc_z: float | None = None
    mc_verdict: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _verdict(est, expectation: float, reference: float, kind: str) -> str:
    if est.name == "chain_rule":
        return "exact NLL (left-to-right process)"
    tol = 1e-7 * max(1.0, abs(reference))
    if expectation >= reference - tol:
        return "valid bound" if est.is_bound else "above here (not a bound in general)"
    return "VIOLATES BOUND"


def _mc_check(row: AuditRow, net, est, x, target, samples: int, seed: int, rows_per_pass: int,
              weights: list[tuple[float, torch.Tensor]] | None = None, step: Callable[[str], None] | None = None,
              ) -> None:
    """MC mean over `samples` draws must lie within 4 standard errors of the exact expectation."""
    if est.deterministic or samples <= 0:
        return
    if est.name == "levels":  # n rows per sample
        samples = max(100, samples // 8)
    if weights is None:
        weights = [(1.0, torch.as_tensor(x))]
    g = torch.Generator().manual_seed(seed)
    vals = []
    for w, xx in weights:  # oracle: mix over x with probability w, one stratified batch each
        r = estimate(net, est, xx, target, g, samples, rows_per_pass)
        vals.append((w, r.mean, r.stderr))
        if step is not None:
            step(f"{row.estimator}: Monte Carlo check")
    mean = sum(w * m for w, m, _ in vals)
    se = math.sqrt(sum((w * s) ** 2 for w, _, s in vals))
    row.mc_mean, row.mc_stderr = mean, se
    row.mc_z = (mean - row.expectation) / se if se > 0 else 0.0
    row.mc_verdict = "converges" if abs(row.mc_z) <= 4 else "MC MEAN OFF (>4 SE)"


def oracle_case(V: int, ell: int | None = None, base: int | None = None, source: str = "uniform",
                perm_seed: int | None = None, perm_style: str = "megatron", L: int = 1,
                estimators=ORACLE_ESTIMATORS, carry_over: bool = False, mc_samples: int = 0, seed: int = 0,
                name: str | None = None, progress: Progress | None = None) -> list[AuditRow]:
    """Entropy floor: i.i.d. tokens, exact-conditional network; every valid estimator must give L·H.

    `estimators` may include "iw": the importance-weighted estimator (`iw_values`), exact over reveal orders, mixed
    over the token sequences like the others."""
    estimators = estimators or ORACLE_ESTIMATORS
    probs = parse_source(source, V)
    st0 = SubTokenizer(V, ell=ell, base=base)
    perm = None if perm_seed is None else make_permutation(st0.num_codes, V, seed=perm_seed, style=perm_style)
    st = SubTokenizer(V, ell=st0.ell, base=st0.base, perm=perm)
    net = OracleDenoiser(probs, st)
    H = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
    support = torch.nonzero(probs > 0).flatten().tolist()
    target = torch.ones(L, dtype=torch.bool)
    label = name or (f"oracle {source} V={V} ℓ={st.ell} b={st.base} "
                     f"π={'id' if perm is None else f'seed{perm_seed}'} L={L}")
    seqs = [(float(torch.prod(probs[list(xs)])), torch.tensor(xs)) for xs in itertools.product(support, repeat=L)]
    plain = [en for en in estimators if en != "iw"]
    mc_runs = sum(not PrimeEstimator(en, subtokenizer=st).deterministic for en in plain) if mc_samples > 0 else 0
    step = _Steps(progress, len(seqs) * (len(plain) + mc_runs + ("iw" in estimators)))
    out = []
    for en in plain:
        est = PrimeEstimator(en, subtokenizer=st, carry_over=carry_over)
        total = 0.0
        for px, xs in seqs:
            total += px * exact_expectation(net, est, xs, target)
            step(f"{en}: exact expectation")
        row = AuditRow(label, en + (" +carry" if carry_over else ""), total, L * H, "L·H (true entropy)",
                       total - L * H, est.is_bound, _verdict(est, total, L * H, "H"))
        _mc_check(row, net, est, None, target, mc_samples, seed, 4096, weights=seqs, step=step)
        out.append(row)
    if "iw" in estimators:
        twin = PrimeEstimator("mc", subtokenizer=st, carry_over=carry_over)
        _check_iw_positions(L * st.ell)
        mixed: dict[tuple[str, int], tuple[float, float]] = {}
        for px, xs in seqs:
            for key, (v, se) in iw_values(masked_nll_table(net, twin, xs, target), mc_draws=20_000).items():
                m, var = mixed.get(key, (0.0, 0.0))
                mixed[key] = (m + px * v, var + (px * se) ** 2)
            step("iw: exact expectation over reveal orders")
        values = {k: (m, math.sqrt(var)) for k, (m, var) in mixed.items()}
        out += _iw_rows(label, values, L * H, "L·H (true entropy)", " +carry" if carry_over else "")
    return out


def _random_case(family, V, ell, base, perm_seed, context, target_len, model_seed, data_seed, scale):
    """(network, sub-tokenizer or None, x, target) of a random tiny case: ids from `data_seed`, weights from
    `model_seed`, a megatron-style permutation from `perm_seed` (Prime)."""
    g = torch.Generator().manual_seed(data_seed)
    L = context + target_len
    x = torch.randint(0, V, (L,), generator=g)
    target = torch.arange(L) >= context
    if family == "mdm":
        return TinyDenoiser("mdm", V, seed=model_seed, scale=scale), None, x, target
    st0 = SubTokenizer(V, ell=ell, base=base)
    perm = None if perm_seed is None else make_permutation(st0.num_codes, V, seed=perm_seed, style="megatron")
    st = SubTokenizer(V, ell=st0.ell, base=st0.base, perm=perm)
    return TinyDenoiser("prime", V, ell=st.ell, base=st.base, seed=model_seed, scale=scale), st, x, target


def model_case(family: str, V: int, *, ell: int | None = None, base: int | None = None, perm_seed: int | None = None,
               context: int = 2, target_len: int = 3, estimators=None, carry_over: bool = False,
               model_seed: int = 0, data_seed: int = 0, mc_samples: int = 2000, T: int | None = None,
               scale: float = 1.0, name: str | None = None, progress: Progress | None = None) -> list[AuditRow]:
    """A random tiny network: every estimator's exact expectation against the exact any-order NLL.

    `estimators` (default: the family's, without iw) may include "iw" (`iw_values`: uniform and Plackett–Luce
    proposals, K in `IW_KS`, and the posterior proposal)."""
    net, st, x, target = _random_case(family, V, ell, base, perm_seed, context, target_len, model_seed, data_seed,
                                      scale)
    names = list(estimators or (MDM_ESTIMATORS if family == "mdm" else PRIME_ESTIMATORS))
    plain = [e for e in names if e != "iw"]
    if family == "mdm":
        make = partial(MDMEstimator, mask_id=V)
        label = name or f"random MDM V={V} ctx={context} n={target_len}"
    else:
        make = partial(PrimeEstimator, subtokenizer=st, carry_over=carry_over)
        label = name or (f"random Prime V={V} ℓ={st.ell} b={st.base} π={'id' if st.is_identity else 'shuffled'} "
                         f"ctx={context} n={target_len}{' carry-over' if carry_over else ''}")
    ests = [make(e) for e in plain] + ([make("mc", T=T)] if T else [])
    if "iw" in names:
        _check_iw_positions(target_len * (st.ell if st is not None else 1))
    step = _Steps(progress, 1 + len(ests) * (1 + (mc_samples > 0)) + ("iw" in names))
    twin = make("mc")  # the table of masked NLLs is the valid mc estimator's, whatever the estimator
    table = masked_nll_table(net, twin, x, target)
    ref = exact_nll(net, twin, x, target, table=table)
    step("exact any-order NLL")
    out = []
    for est in ests:
        e = exact_expectation(net, est, x, target,
                              table=table if est.name in ("mc", "exact_count", "sqrt_count", "levels") else None)
        en = est.name + (f" T={est.T}" if getattr(est, "T", None) else "")
        step(f"{en}: exact expectation")
        row = AuditRow(label, en, e, ref, "-log p (any-order process, exact)", e - ref, est.is_bound,
                       _verdict(est, e, ref, "nll"))
        _mc_check(row, net, est, x, target, mc_samples, model_seed + 1, 4096)
        if mc_samples > 0:
            step(f"{en}: Monte Carlo check")
        out.append(row)
    if "iw" in names:
        out += _iw_rows(label, iw_values(table), ref, "-log p (any-order process, exact)")
        step("iw: exact expectation over reveal orders")
    return out


def default_cases(fast: bool = False, progress: Progress | None = None) -> list[AuditRow]:
    """The cases `prime-eval audit` runs by default (about 10-30 s on 2 CPU cores)."""
    mc = 0 if fast else 4000
    cases = [
        lambda p: oracle_case(4, ell=2, source="0.5,0,0,0.5", L=2, mc_samples=mc,
                              name="oracle {00:½, 11:½} V=4 ℓ=2 L=2", progress=p),
        lambda p: oracle_case(16, base=2, source="zipf:1.1", perm_seed=0, L=1, mc_samples=mc, progress=p),
        lambda p: oracle_case(16, base=2, source="zipf:1.1", perm_seed=0, L=1, carry_over=True, mc_samples=mc,
                              estimators=("mc",), progress=p),
        lambda p: oracle_case(27, ell=3, source="zipf:1.5", L=1, mc_samples=mc, progress=p),
        lambda p: model_case("mdm", 6, context=2, target_len=4, T=8, mc_samples=mc, progress=p),
        lambda p: model_case("prime", 6, ell=2, perm_seed=1, context=1, target_len=3, T=8, mc_samples=mc,
                             progress=p),
        lambda p: model_case("prime", 6, ell=2, perm_seed=1, context=1, target_len=3, carry_over=True,
                             estimators=("mc", "legacy_joint"), mc_samples=mc, progress=p),
        lambda p: model_case("prime", 8, base=2, perm_seed=2, context=2, target_len=4, mc_samples=mc,
                             estimators=("mc", "exact_count", "sqrt_count", "levels", "legacy_joint"), progress=p),
        lambda p: iw_case("mdm", 6, context=1, target_len=4, Ks=(1, 4, 16), progress=p),
        lambda p: iw_case("prime", 8, base=2, perm_seed=1, context=1, target_len=2, Ks=(1, 4, 16), progress=p),
    ]
    return [row for i, case in enumerate(cases) for row in case(_part(progress, i, len(cases)))]


def total_probability(net, est, context: torch.Tensor, target_len: int) -> float:
    """Σ over all V^n continuations of p(x_T | x_C) under the any-order process (1 for MDM; <= 1 for Prime, the
    rest being the mass the process puts on invalid sub-token codes)."""
    V = net.vocab_size
    total = 0.0
    for xs in itertools.product(range(V), repeat=target_len):
        x = torch.cat([torch.as_tensor(context, dtype=torch.long), torch.tensor(xs, dtype=torch.long)])
        target = torch.arange(x.numel()) >= len(context)
        total += math.exp(-exact_nll(net, est, x, target))
    return total


# -- importance-weighted any-order estimator (iw) ----------------------------------------------------------------
def order_log_likelihoods(table: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """All n! reveal orders σ and log Π_s p(x_σ(s) | x_σ(<s)) from the masked-NLL table (rows = mask bitsets)."""
    n = table.shape[1]
    nll = table.numpy()
    orders = np.array(list(itertools.permutations(range(n))), dtype=np.int64)
    logp = np.zeros(len(orders))
    full = 2**n - 1
    for o, order in enumerate(orders):
        m, acc = full, 0.0
        for j in order:
            acc -= nll[m, j]
            m &= ~(1 << j)
        logp[o] = acc
    return orders, logp


def iw_proposal_log_q(orders: np.ndarray, table: torch.Tensor, proposal: str, tau: float = 1.0,
                      logp: np.ndarray | None = None) -> np.ndarray:
    """log q(σ) for every order: uniform, pl (Plackett–Luce on θ_j = log p(x_j | all masked)/τ) or posterior."""
    n = orders.shape[1]
    if proposal == "uniform":
        return np.full(len(orders), -math.lgamma(n + 1))
    if proposal == "posterior":  # q(σ) = p(x, σ)/p(x): every weight equals p(x)
        return logp - np.logaddexp.reduce(logp)
    theta = -table[2**n - 1].numpy() / tau
    th = theta[orders]
    tail = np.logaddexp.accumulate(th[:, ::-1], axis=1)[:, ::-1]
    return (th - tail).sum(1)


def iw_exact_expectation(table: torch.Tensor, K: int, proposal: str = "uniform", tau: float = 1.0,
                         max_tuples: int = 2_000_000, mc_draws: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """E[-IW_K] (an NLL): exact over all K-tuples of orders when n!^K <= max_tuples, else Monte Carlo (value, SE)."""
    orders, logp = order_log_likelihoods(table)
    n = orders.shape[1]
    log_q = iw_proposal_log_q(orders, table, proposal, tau, logp)
    q = np.exp(log_q - np.logaddexp.reduce(log_q))
    log_w = logp - math.lgamma(n + 1) - log_q  # log p(x, σ)/q(σ), with p(σ) = 1/n!
    N = len(orders)
    if N**K <= max_tuples:
        idx = np.stack(np.meshgrid(*[np.arange(N)] * K, indexing="ij"), -1).reshape(-1, K)
        probs = np.prod(q[idx], axis=1)
        iw = np.logaddexp.reduce(log_w[idx], axis=1) - math.log(K)
        return float(-(probs * iw).sum()), 0.0
    rng = np.random.default_rng(seed)
    idx = rng.choice(N, size=(mc_draws, K), p=q)
    iw = np.logaddexp.reduce(log_w[idx], axis=1) - math.log(K)
    return float(-iw.mean()), float(iw.std(ddof=1) / math.sqrt(mc_draws))


def diffused_positions(kind: str, V: int, *, ell: int | None = None, base: int | None = None, tokens: int) -> int:
    """Diffused positions of a case with `tokens` target tokens: tokens for MDM, tokens·ℓ sub-tokens for Prime and
    the oracle (ℓ from `ell` or `base` as `SubTokenizer` derives it)."""
    return tokens if kind == "mdm" else tokens * SubTokenizer(V, ell=ell, base=base).ell


def _check_iw_positions(n: int) -> None:
    if n > MAX_IW_POSITIONS:
        raise UserError(f"the iw audit enumerates all n! reveal orders: n = {n} diffused positions is too many "
                        f"(limit {MAX_IW_POSITIONS}); leave iw out of --estimators, or shorten the target / lower ℓ")


def iw_values(table: torch.Tensor, Ks=IW_KS, proposals=IW_PROPOSALS,
              mc_draws: int = 200_000) -> dict[tuple[str, int], tuple[float, float]]:
    """(proposal, K) -> E[-IW_K] and its Monte Carlo SE (0 when exact), for every proposal and K in order, then
    ("posterior", 2), whose value must equal the exact NLL (every weight is p(x))."""
    out = {(proposal, K): iw_exact_expectation(table, K, proposal, mc_draws=mc_draws)
           for proposal in proposals for K in Ks}
    out[("posterior", 2)] = iw_exact_expectation(table, 2, "posterior", mc_draws=mc_draws)
    return out


def _iw_rows(label: str, values: dict[tuple[str, int], tuple[float, float]], ref: float, ref_kind: str,
             suffix: str = "") -> list[AuditRow]:
    """Rows of `iw_values`: each at or above `ref` (a bound), non-increasing in K per proposal, the posterior tight."""
    out, prev = [], {}
    for (proposal, K), (val, se) in values.items():
        if proposal == "posterior":
            verdict = "valid bound (tight)" if abs(val - ref) < 1e-9 * max(1.0, abs(ref)) else "POSTERIOR NOT TIGHT"
            out.append(AuditRow(label, f"iw posterior K={K}{suffix}", val, ref, ref_kind, val - ref, True, verdict))
            continue
        verdict = "valid bound" if val >= ref - 1e-7 - 4 * se else "VIOLATES BOUND"
        if val > prev.get(proposal, math.inf) + 1e-9 + 4 * se:
            verdict = "NOT MONOTONE IN K"
        prev[proposal] = val
        row = AuditRow(label, f"iw {proposal} K={K}{suffix}", val, ref, ref_kind, val - ref, True, verdict)
        if se:
            row.mc_mean, row.mc_stderr, row.mc_verdict = val, se, "converges"
        out.append(row)
    return out


def iw_case(family: str, V: int, *, ell: int | None = None, base: int | None = None, perm_seed: int | None = None,
            context: int = 1, target_len: int = 2, Ks=(1, 2, 4, 16), proposals=IW_PROPOSALS,
            carry_over: bool = False, model_seed: int = 0, data_seed: int = 0, scale: float = 1.0,
            name: str | None = None, progress: Progress | None = None) -> list[AuditRow]:
    """IW_K against the exact NLL: below it in log-likelihood (above in NLL), non-increasing NLL in K."""
    net, st, x, target = _random_case(family, V, ell, base, perm_seed, context, target_len, model_seed, data_seed,
                                      scale)
    if family == "mdm":
        est = MDMEstimator("mc", mask_id=V)
        label = name or f"iw: random MDM V={V} ctx={context} n={target_len}"
    else:
        est = PrimeEstimator("mc", subtokenizer=st, carry_over=carry_over)
        label = name or f"iw: random Prime V={V} ℓ={st.ell} b={st.base} ctx={context} n={target_len}"
    step = _Steps(progress, 2)
    table = masked_nll_table(net, est, x, target)
    ref = exact_nll(net, est, x, target, table=table)
    elbo = exact_expectation(net, est, x, target, table=table)
    step("exact any-order NLL and ELBO")
    out = [AuditRow(label, "mc (ELBO)", elbo, ref, "-log p (any-order process, exact)", elbo - ref, True,
                    _verdict(est, elbo, ref, "nll"))]
    out += _iw_rows(label, iw_values(table, Ks, proposals), ref, "-log p (any-order process, exact)")
    step("iw: exact expectation over reveal orders")
    return out
