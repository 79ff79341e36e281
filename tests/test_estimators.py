"""Every estimator against an exact answer (enumeration over masks, orders and sequences) on tiny models."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from prime_eval import audit
from prime_eval.errors import UserError
from prime_eval.estimators import estimate, forward_rows, get_estimator
from prime_eval.estimators.prime import PrimeEstimator, digit_marginals, parse_chunk
from prime_eval.networks.toy import OracleDenoiser, TinyDenoiser
from prime_eval.subtokenizer import SubTokenizer, make_permutation


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _oracle_expectation(probs, st, name, L=2, carry_over=False):
    net = OracleDenoiser(probs, st)
    est = get_estimator("prime", name, subtokenizer=st, carry_over=carry_over)
    support = torch.nonzero(probs > 0).flatten().tolist()
    return sum(float(torch.prod(probs[list(xs)])) * audit.exact_expectation(net, est, torch.tensor(xs),
                                                                            torch.ones(L, dtype=torch.bool))
               for xs in itertools.product(support, repeat=L))


def test_oracle_floor_published_example():
    """V=4, ℓ=2, tokens {00: ½, 11: ½} i.i.d., L=2: valid 1.386 nats, the published joint form 0.693 (method.md §5.1)."""
    st = SubTokenizer(4, ell=2)
    probs = torch.tensor([0.5, 0, 0, 0.5], dtype=torch.float64)
    assert _oracle_expectation(probs, st, "mc") == pytest.approx(2 * math.log(2), abs=1e-9)
    assert _oracle_expectation(probs, st, "exact_count") == pytest.approx(2 * math.log(2), abs=1e-9)
    assert _oracle_expectation(probs, st, "legacy_joint") == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("ell_or_base", [("ell", 1), ("ell", 2), ("base", 2)])
@pytest.mark.parametrize("perm_style", [None, "lit_gpt", "megatron"])
def test_oracle_valid_bound_equals_entropy_for_every_ell_and_permutation(ell_or_base, perm_style):
    V = 12
    probs = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.2
    probs /= probs.sum()
    H = float(-(probs * probs.log()).sum())
    st0 = SubTokenizer(V, **{ell_or_base[0]: ell_or_base[1]})
    perm = None if perm_style is None else make_permutation(st0.num_codes, V, seed=7, style=perm_style)
    st = SubTokenizer(V, ell=st0.ell, base=st0.base, perm=perm)
    for carry in (False, True):
        assert _oracle_expectation(probs, st, "mc", L=1, carry_over=carry) == pytest.approx(H, abs=1e-9)
    legacy = _oracle_expectation(probs, st, "legacy_joint", L=1)
    if st.ell == 1:
        assert legacy == pytest.approx(H, rel=1e-4)
    else:
        assert legacy < H - 1e-3  # the published form reports less than the true entropy


def test_prime_ell1_equals_mdm_exactly():
    V = 7
    x = torch.tensor([1, 2, 3, 4, 5, 6])
    target = torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool)
    mdm_net = TinyDenoiser("mdm", V, seed=3)
    prime_net = TinyDenoiser("prime", V, ell=1, base=V, seed=0)
    prime_net.load_state_dict(mdm_net.state_dict())
    st = SubTokenizer(V, ell=1)
    for name in ("mc", "exact_count", "sqrt_count"):
        mdm, prime = get_estimator("mdm", name, mask_id=V), get_estimator("prime", name, subtokenizer=st)
        ra, rb = mdm.rows(x, target, _gen(5), 32), prime.rows(x, target, _gen(5), 32)
        assert torch.equal(ra.inputs, rb.inputs) and torch.equal(ra.logits_at, rb.logits_at)  # the same draws
        a = estimate(mdm_net, mdm, x, target, _gen(5), 32)
        b = estimate(prime_net, prime, x, target, _gen(5), 32)
        # two code paths over the same float64 logits: equal up to float64 round-off on any CPU
        torch.testing.assert_close(a.values, b.values, rtol=1e-12, atol=1e-12)


def _random_cases():
    yield "mdm", TinyDenoiser("mdm", 5, seed=1), get_estimator("mdm", "mc", mask_id=5), 5
    st = SubTokenizer(6, ell=2, perm=make_permutation(9, 6, seed=2, style="megatron"))
    for carry in (False, True):
        yield "prime", TinyDenoiser("prime", 6, ell=2, base=3, seed=4), \
            get_estimator("prime", "mc", subtokenizer=st, carry_over=carry), 6


@pytest.mark.parametrize("case", list(range(3)))
def test_bound_above_exact_nll_and_mc_unbiased(case):
    family, net, est, V = list(_random_cases())[case]
    x = torch.tensor([1, 3, 0, 2, 4])
    target = torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool)
    table = audit.masked_nll_table(net, est, x, target)
    nll = audit.exact_nll(net, est, x, target, table=table)
    nelbo = audit.exact_expectation(net, est, x, target, table=table)
    for name in ("mc", "exact_count", "sqrt_count"):
        e = get_estimator(family, name, **({"mask_id": V} if family == "mdm" else
                                           {"subtokenizer": est.st, "carry_over": est.carry_over}))
        expectation = audit.exact_expectation(net, e, x, target, table=table)
        assert expectation == pytest.approx(nelbo, rel=1e-12)  # every mask-set law has the NELBO's expectation
        assert expectation >= nll - 1e-9
        r = estimate(net, e, x, target, _gen(11), 3000, rows_per_pass=1024)
        assert abs(r.mean - expectation) < 4 * r.stderr, (name, r.mean, expectation, r.stderr)


def test_discrete_time_bound_is_valid_and_looser():
    net = TinyDenoiser("mdm", 5, seed=1)
    x, target = torch.tensor([1, 3, 0, 2, 4]), torch.tensor([0, 1, 1, 1, 1], dtype=torch.bool)
    cont = get_estimator("mdm", "mc", mask_id=5)
    disc = get_estimator("mdm", "mc", mask_id=5, T=4)
    table = audit.masked_nll_table(net, cont, x, target)
    nll = audit.exact_nll(net, cont, x, target, table=table)
    e_cont = audit.exact_expectation(net, cont, x, target, table=table)
    e_disc = audit.exact_expectation(net, disc, x, target, table=table)
    assert e_disc >= e_cont >= nll
    r = estimate(net, disc, x, target, _gen(3), 4000, rows_per_pass=4096)
    assert abs(r.mean - e_disc) < 4 * r.stderr


def test_any_order_process_is_normalised():
    mdm = TinyDenoiser("mdm", 3, seed=2)
    est = get_estimator("mdm", "mc", mask_id=3)
    assert audit.total_probability(mdm, est, torch.tensor([1]), 3) == pytest.approx(1.0, abs=1e-9)
    st = SubTokenizer(3, ell=2)  # b=2: one invalid code, so some mass may be lost but never created
    prime = TinyDenoiser("prime", 3, ell=2, base=2, seed=2)
    total = audit.total_probability(prime, get_estimator("prime", "mc", subtokenizer=st), torch.tensor([1]), 2)
    assert 0.5 < total <= 1.0 + 1e-9


def test_chain_rule_is_a_normalised_likelihood():
    V = 3
    net = TinyDenoiser("mdm", V, seed=5)
    est = get_estimator("mdm", "chain_rule", mask_id=V)
    assert est.deterministic
    total = 0.0
    for xs in itertools.product(range(V), repeat=3):
        x = torch.tensor([2, *xs])
        total += math.exp(-estimate(net, est, x, torch.tensor([0, 1, 1, 1], dtype=torch.bool), None).mean)
    assert total == pytest.approx(1.0, abs=1e-9)


def test_arm_exact_and_greedy():
    net = TinyDenoiser("arm", 9, seed=1)
    x = torch.tensor([0, 4, 2, 7, 1])
    target = torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool)
    est = get_estimator("arm")
    r = estimate(net, est, x, target, None)
    with torch.no_grad():
        logp = F.log_softmax(net(x[None]).double(), -1)[0]
    assert r.mean == pytest.approx(-(logp[2, 7] + logp[3, 1]).item(), abs=1e-6)
    rows = est.rows(x, target)
    (logits,) = forward_rows(net, [rows])
    assert est.is_greedy(rows, logits) == bool(logp[2].argmax() == 7 and logp[3].argmax() == 1)


def test_seed_determinism_under_batch_splits_and_packing():
    st = SubTokenizer(8, base=2, perm=make_permutation(8, 8, seed=0, style="megatron"))
    net = TinyDenoiser("prime", 8, ell=3, base=2, seed=3)
    est = get_estimator("prime", "mc", subtokenizer=st)
    reqs = [(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 1, 1], dtype=torch.bool)),
            (torch.tensor([5, 6, 7]), torch.tensor([0, 1, 1], dtype=torch.bool)),
            (torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool))]
    alone = [estimate(net, est, x, t, _gen(i), 16, rows_per_pass=1).values for i, (x, t) in enumerate(reqs)]
    rows = [est.rows(x, t, _gen(i), 16) for i, (x, t) in enumerate(reqs)]
    for rpp in (3, 64):
        packed = forward_rows(net, rows, rows_per_pass=rpp)
        for i, r in enumerate(rows):
            torch.testing.assert_close(est.cost(r, packed[i]), alone[i], rtol=1e-6, atol=1e-6)
    again = estimate(net, est, *reqs[0], _gen(0), 16).values
    torch.testing.assert_close(again, alone[0], rtol=1e-6, atol=1e-6)
    other = estimate(net, est, *reqs[0], _gen(99), 16).values
    assert not torch.allclose(other, alone[0])


def test_marginals_are_normalised_and_carry_over_zeroes_visible_tokens():
    st = SubTokenizer(6, ell=2, perm=make_permutation(9, 6, seed=1, style="megatron"))
    logp = torch.log_softmax(torch.randn(4, 6, generator=_gen(1), dtype=torch.float64), -1)
    torch.testing.assert_close(digit_marginals(st, logp).sum(-1), torch.ones(4, 2, dtype=torch.float64))
    # legacy with carry-over, fully visible target token: exactly 0 cost
    net = TinyDenoiser("prime", 6, ell=2, base=3, seed=0)
    est = get_estimator("prime", "legacy_joint", subtokenizer=st, carry_over=True, legacy_scope="masked")
    x, target = torch.tensor([1, 2]), torch.tensor([0, 1], dtype=torch.bool)
    rows = est.rows_from_masks(x, target, torch.tensor([[False, False]]), torch.ones(1, dtype=torch.float64))
    assert rows.num_logits == 0


def test_options_and_bad_input():
    st = SubTokenizer(6, ell=2)
    with pytest.raises(UserError, match="only with estimator=legacy_joint"):
        get_estimator("prime", "mc", subtokenizer=st, cfg=0.5)
    with pytest.raises(UserError, match="only with estimator=legacy_joint"):
        get_estimator("prime", "mc", subtokenizer=st, temperature=0.5)
    with pytest.raises(UserError, match="not available"):
        get_estimator("mdm", "legacy_joint", mask_id=6)
    with pytest.raises(UserError, match="empty continuation"):
        get_estimator("mdm", "mc", mask_id=6).rows(torch.tensor([1, 2]), torch.zeros(2, dtype=torch.bool), _gen(), 4)
    assert parse_chunk("0.0_0.75/1_15") == [(0.0, 1), (0.75, 15)]
    with pytest.raises(UserError, match="bad chunk spec"):
        parse_chunk("0.5/1_2")
    legacy = get_estimator("prime", "legacy_joint", subtokenizer=st, cfg=0.5, temperature=0.2, chunk="0.0_0.5/1_2")
    assert not legacy.is_bound and get_estimator("prime", "mc", subtokenizer=st).is_bound
    assert not get_estimator("mdm", "mc", mask_id=6, cfg=1.0).is_bound
    net = TinyDenoiser("prime", 6, ell=2, base=3, seed=0)
    r = estimate(net, legacy, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1], dtype=torch.bool), _gen(), 8)
    assert r.values.shape == (8,) and torch.isfinite(r.values).all()


@pytest.mark.parametrize("family", ["mdm", "prime"])
def test_levels_estimator_unbiased_for_the_nelbo(family):
    x, target = torch.tensor([1, 3, 0, 2, 4]), torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool)
    if family == "mdm":
        net, opts = TinyDenoiser("mdm", 5, seed=1), {"mask_id": 5}
    else:
        st = SubTokenizer(6, ell=2, perm=make_permutation(9, 6, seed=2, style="megatron"))
        net, opts = TinyDenoiser("prime", 6, ell=2, base=3, seed=4), {"subtokenizer": st}
    mc, lv = get_estimator(family, "mc", **opts), get_estimator(family, "levels", **opts)
    table = audit.masked_nll_table(net, mc, x, target)
    exact = audit.exact_expectation(net, mc, x, target, table=table)
    assert audit.exact_expectation(net, lv, x, target, table=table) == pytest.approx(exact, abs=1e-12)
    r = estimate(net, lv, x, target, _gen(4), 400, rows_per_pass=4096)
    assert r.values.shape == (400,) and abs(r.mean - exact) < 4 * r.stderr
    n = int(target.sum()) * (2 if family == "prime" else 1)
    assert r.num_forward_rows == 400 * n


def test_common_random_numbers_across_choices():
    """Same generator seed, different continuation lengths: t_k and the draws of shared positions coincide."""
    est = get_estimator("mdm", "mc", mask_id=9)
    a = est.rows(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 1, 1], dtype=torch.bool), _gen(5), 16)
    b = est.rows(torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 1, 1, 1, 1, 1], dtype=torch.bool), _gen(5), 16)
    torch.testing.assert_close(a.data["weights"], b.data["weights"])
    assert torch.equal(a.logits_at[:, 1:4], b.logits_at[:, 1:4])


# -- the one sampler (estimators.sampler) -------------------------------------------------------------------------
def test_sampler_formulas_from_explicit_uniforms():
    """Each scheme is the documented function of (u, v): times, independent, exact count, levels, chunked."""
    from prime_eval.estimators.sampler import MaskSampler

    u = torch.tensor([0.05, 0.5, 0.999], dtype=torch.float64)
    v = torch.rand(3, 7, generator=_gen(1), dtype=torch.float64)
    d = MaskSampler("independent", eps=1e-3).from_uniforms(u, v, 7)
    t = 1e-3 + (1 - 1e-3) * u
    assert torch.equal(d.masks, v < t[:, None]) and torch.equal(d.weights, 1.0 / t) and torch.equal(d.t, t)
    d = MaskSampler("independent", T=4).from_uniforms(u, v, 7)
    assert d.t.tolist() == [0.25, 0.5, 1.0]
    d = MaskSampler("exact_count").from_uniforms(u, v, 7)
    counts = d.masks.sum(1)
    assert counts.tolist() == [1, 4, 7] and torch.equal(d.weights, 7 / counts.double())
    for k in range(3):  # the l_k positions of smallest v_k
        assert set(torch.nonzero(d.masks[k]).flatten().tolist()) == set(v[k].argsort()[:counts[k]].tolist())
    d = MaskSampler("sqrt_count").from_uniforms(u, v, 7)  # l = F⁻¹(u) for q(l) ∝ l^(-1/2), weight 1/(q(l)·l)
    q = 1 / torch.arange(1, 8, dtype=torch.float64).sqrt()
    q = q / q.sum()
    counts = d.masks.sum(1)
    assert counts.tolist() == [1, 3, 7] and torch.allclose(d.weights, 1 / (q[counts - 1] * counts), rtol=1e-12)
    for k in range(3):  # chosen by rank of v_k, as exact count
        assert set(torch.nonzero(d.masks[k]).flatten().tolist()) == set(v[k].argsort()[:counts[k]].tolist())
    d = MaskSampler("levels").from_uniforms(None, v[:1], 7)
    assert d.masks.sum(1).tolist() == [7, 6, 5, 4, 3, 2, 1] and torch.equal(d.weights, 1.0 / d.masks.sum(1).double())
    d = MaskSampler("chunked", chunks=((0.0, 1), (0.4, 3))).from_uniforms(u, v, 7)
    assert torch.equal(d.masks[0], v[0] < u[0])  # t = u < 0.4: independent
    assert torch.equal(d.masks[1], (v[1, torch.arange(7) // 3] < u[1]))  # groups of 3 share the draw of their group
    assert torch.equal(d.weights, 1.0 / (u + 1e-6))


def test_estimators_draw_their_masks_from_the_sampler():
    """score's rows: u stratified from the request's generator, then position-major v from the same generator."""
    from prime_eval.estimators.sampler import MaskSampler, position_uniforms, stratified_uniform

    x, target = torch.tensor([3, 1, 4, 1, 5, 2]), torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool)
    st = SubTokenizer(6, ell=2)
    for family, name, opts, ell, mask_id in [("mdm", "mc", {"mask_id": 6, "eps": 1e-3}, 1, 6),
                                             ("mdm", "exact_count", {"mask_id": 6}, 1, 6),
                                             ("mdm", "sqrt_count", {"mask_id": 6}, 1, 6),
                                             ("prime", "mc", {"subtokenizer": st}, 2, st.base),
                                             ("prime", "exact_count", {"subtokenizer": st}, 2, st.base),
                                             ("prime", "sqrt_count", {"subtokenizer": st}, 2, st.base),
                                             ("prime", "legacy_joint", {"subtokenizer": st}, 2, st.base)]:
        est = get_estimator(family, name, **opts)
        rows = est.rows(x, target, _gen(7), 5)
        g = _gen(7)
        u = stratified_uniform(g, 5)
        ref = MaskSampler.for_estimator(family, name, eps=est.eps).from_uniforms(u, position_uniforms(g, 5, 4 * ell),
                                                                                  4 * ell)
        sub = target.repeat_interleave(ell)
        assert torch.equal(rows.inputs[:, sub] == mask_id, ref.masks), (family, name)
        assert torch.equal(rows.data["weights"], ref.weights), (family, name)


def test_count_law_is_the_frequency_of_the_drawn_counts():
    """sqrt_count: stratified u gives each count l = 1..n with frequency q(l) (up to 1/K), and q(l)·weight(l) = 1/l,
    so Σ_l q(l)·weight(l)·E_{|S|=l}[Σ c] is the NELBO Σ_l (1/l) E_{|S|=l}[Σ c]."""
    from prime_eval.estimators.sampler import COUNT_POWER, MaskSampler, count_law

    n, K = 9, 100_000
    q, w = count_law(n, COUNT_POWER["sqrt_count"])
    levels = torch.arange(1, n + 1, dtype=torch.float64)
    assert q.sum() == pytest.approx(1.0, abs=1e-15) and torch.allclose(q * w, 1 / levels, rtol=1e-14)
    assert (q[:-1] > q[1:]).all()  # more samples where few positions are masked
    u = (torch.arange(K, dtype=torch.float64) + 0.5) / K
    d = MaskSampler("sqrt_count").from_uniforms(u, torch.rand(K, n, generator=_gen(2), dtype=torch.float64), n)
    freq = torch.bincount(d.masks.sum(1), minlength=n + 1)[1:].double() / K
    assert torch.allclose(freq, q, atol=2 / K)
    assert torch.allclose(count_law(n, 0.0)[1], n / levels)  # power 0 is exact count


def test_sampler_refuses_unknown_schemes_and_names():
    from prime_eval.estimators.sampler import MaskSampler

    with pytest.raises(UserError, match="unknown masking scheme"):
        MaskSampler("bernoulli")
    with pytest.raises(UserError, match="no masking scheme"):
        MaskSampler.for_estimator("mdm", "legacy_joint")
    with pytest.raises(ValueError, match="no per-sample uniform"):
        MaskSampler("levels").draw(_gen(), 2, 3, u=torch.tensor([0.1, 0.2], dtype=torch.float64))


def test_batch_masks_for_a_training_loss():
    """Rows of different lengths: padding never masked; exact count l_b ~ U{1..n_b} with weight n_b/l_b."""
    from prime_eval.estimators.sampler import batch_masks

    lengths = torch.tensor([1, 3, 6])
    seen = torch.zeros(3, 7, dtype=torch.long)
    for s in range(400):
        m, w = batch_masks(_gen(s), lengths, 7)
        counts = m.sum(1)
        assert not m[torch.arange(7)[None, :] >= lengths[:, None]].any()
        assert ((counts >= 1) & (counts <= lengths)).all() and torch.equal(w, lengths / counts.double())
        seen[torch.arange(3), counts] += 1
    assert (seen[2, 1:7] > 30).all()  # every count 1..6 occurs for the row of length 6 (400/6 ≈ 67 expected)
    m, w = batch_masks(_gen(0), lengths, 7, scheme="independent", eps=0.1)
    assert not m[torch.arange(7)[None, :] >= lengths[:, None]].any() and (w <= 1 / 0.1).all()


# -- reducing logits as they come (estimators.rows.forward_terms) ---------------------------------------------------
def test_forward_terms_reduce_in_chunks_fixed_by_the_request():
    """Chunks of at most C logit rows at offsets that depend on the request alone (any rows_per_pass); a request of
    at most C rows is reduced in one piece, exactly as `cost`; smaller chunks give the same bits (Prime's digit
    marginals are a matmul over the chunk's rows, computed in blocks of fixed shape: `matmul_fixed_rows`)."""
    from prime_eval.estimators import forward_rows_batch_invariant, forward_terms

    st = SubTokenizer(8, base=2, perm=make_permutation(8, 8, seed=0, style="megatron"))
    net = TinyDenoiser("prime", 8, ell=3, base=2, seed=3)  # Prime: a matmul over the chunk's rows
    est = get_estimator("prime", "mc", subtokenizer=st, carry_over=True)
    reqs = [(torch.tensor([1, 2, 3, 4, 5, 6, 7]), torch.tensor([0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)),
            (torch.tensor([5, 6, 7]), torch.tensor([0, 1, 1], dtype=torch.bool)),
            (torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool))]
    rows = [est.rows(x, t, _gen(i), 16) for i, (x, t) in enumerate(reqs)]
    whole = [est.cost(r, lg) for r, lg in zip(rows, forward_rows_batch_invariant(net, rows, 64))]
    got = dict(forward_terms(net, est, rows, 64, chunk_rows=10**6))
    assert all(torch.equal(est.cost_from_terms(rows[i], got[i]), whole[i]) for i in range(3))
    seen = {}
    for rpp in (1, 3, 64):
        calls = []
        est.logit_terms = lambda r, lg, start=0, f=PrimeEstimator.logit_terms.__get__(est): (
            calls.append(([id(x) for x in rows].index(id(r)), start, lg.shape[0])), f(r, lg, start))[1]
        got = dict(forward_terms(net, est, rows, rpp, chunk_rows=5))
        del est.logit_terms
        seen[rpp] = sorted(calls)
        assert max(n for _, _, n in calls) <= 5
        for i in range(3):
            assert torch.equal(est.cost_from_terms(rows[i], got[i]), whole[i])
    assert seen[1] == seen[3] == seen[64]
    assert [s for r, s, _ in seen[1] if r == 0] == list(range(0, rows[0].num_logits, 5))


def test_prime_values_do_not_depend_on_the_reduction_chunks_at_a_realistic_vocabulary():
    """V = 32,000, ℓ = 15 (Diff_LLaMA's Prime), fp32: a request's logits reduced 1, 7 or 100 rows at a time give
    the bits of `cost` on all of them (a plain (C, V) @ (V, ℓ·b) matmul rounds a row differently for other C), so
    the adapters may split a request's reductions to bound memory without changing a number."""
    from prime_eval.estimators import forward_rows_batch_invariant, forward_terms
    from prime_eval.networks.lit_gpt import Config, TransEncoder

    torch.manual_seed(0)
    net = TransEncoder(Config(n_layer=1, n_embd=64, n_head=2, intermediate_size=128, vocab_size=32000,
                              block_size=64), ell=15, base=2).eval()
    est = get_estimator("prime", "sqrt_count", subtokenizer=SubTokenizer(32000, ell=15, base=2), carry_over=True)
    target = torch.zeros(40, dtype=torch.bool)
    target[20:] = True
    rows = est.rows(torch.randint(0, 32000, (40,), generator=_gen(1)), target, _gen(2), 32)
    (logits,) = forward_rows_batch_invariant(net, [rows], 16)
    whole = est.cost(rows, logits)
    for c in (1, 7, 100):
        (_, terms), = forward_terms(net, est, [rows], 16, chunk_rows=c)
        assert torch.equal(est.cost_from_terms(rows, terms), whole), c
