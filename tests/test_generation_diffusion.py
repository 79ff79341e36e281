"""Diffusion samplers against exact answers: on networks small enough to enumerate every intermediate state, the
distribution of the MDM sampler's answers (LLaDA low-confidence / random remasking, MDLM ancestral steps, blocks) and
of the Prime partial-masking sampler's (with and without the chunk schedule) equals the process the docstrings
define — Monte Carlo frequencies of 4,000 seeded requests within 4 standard errors of the exact probabilities — no
invalid code ever appears, temperature 0 is deterministic, and answers do not depend on the batch."""
from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import pytest
import torch

from prime_eval.generation import GenRequest, generate
from prime_eval.networks.toy import OracleDenoiser, TinyDenoiser
from prime_eval.subtokenizer import SubTokenizer, make_permutation

N = 4000
PROMPT = (1, 3)


def _requests(L, temperature=1.0, n=N, prompt=PROMPT):
    return [GenRequest(prompt, L, seed=s, temperature=temperature) for s in range(n)]


def _softmax(row, tau=1.0):
    m = max(row)
    e = [math.exp((v - m) / tau) for v in row]
    z = sum(e)
    return [v / z for v in e]


def _answer_logits(net, ids) -> list[list[float]]:
    """Logits (float64) at every position of one clean forward pass on `ids`."""
    with torch.no_grad():
        return net(torch.tensor([ids]))[0].double().tolist()


def _check(samples: list[tuple], exact: dict, n: int = N) -> None:
    """Every answer's frequency within 4 standard errors of its exact probability (answers expected fewer than 10
    times pooled into one, where the normal approximation holds); impossible answers never seen."""
    assert abs(sum(exact.values()) - 1.0) < 1e-9
    freq = Counter(samples)
    assert set(freq) <= {a for a, p in exact.items() if p > 0}, set(freq) - set(exact)
    rare = [a for a, p in exact.items() if 0 < n * p < 10]
    cells = [([a], p) for a, p in exact.items() if n * p >= 10] + [(rare, sum(exact[a] for a in rare))]
    worst = max(abs(sum(freq.get(a, 0) for a in cell) / n - p) / math.sqrt(p * (1 - p) / n)
                for cell, p in cells if 0 < p < 1)
    assert worst < 4.0, worst
    assert sum(1 for p in exact.values() if p > 0.01) >= 3  # a distribution worth testing, not a point mass


# ------------------------------------------------------------------------------------------------ MDM


def _exact_mdm(net, prompt, L, plan, remasking, tau):
    """Answer distribution of the MDM process by enumeration (generation/mdm.py's definition, written out)."""
    V, m = net.vocab_size, net.mask_id
    dist = {(None,) * L: 1.0}
    for first, end, S in plan:
        base, extra = divmod(end - first, S)
        counts = [base + (k < extra) for k in range(S)]
        for k in range(S):
            new: dict = defaultdict(float)
            for state, pr in dist.items():
                masked = [i for i in range(first, end) if state[i] is None]
                logits = _answer_logits(net, list(prompt) + [m if v is None else v for v in state])[len(prompt):]
                p1 = [_softmax(row) for row in logits]
                pt = [_softmax(row, tau) for row in logits]

                def put(pos, vals, w):
                    s = list(state)
                    for i, v in zip(pos, vals):
                        s[i] = v
                    new[tuple(s)] += pr * w

                if remasking == "ancestral":
                    q = 1.0 / (S - k)
                    for r in range(len(masked) + 1):
                        for sub in itertools.combinations(masked, r):
                            w = q ** r * (1 - q) ** (len(masked) - r)
                            for vals in itertools.product(range(V), repeat=r):
                                put(sub, vals, w * math.prod(pt[i][v] for i, v in zip(sub, vals)))
                    continue
                c = counts[k]
                if c == 0 or not masked:
                    new[state] += pr
                elif remasking == "random":
                    subs = list(itertools.combinations(masked, c))
                    for sub in subs:
                        for vals in itertools.product(range(V), repeat=c):
                            put(sub, vals, math.prod(pt[i][v] for i, v in zip(sub, vals)) / len(subs))
                else:  # low_confidence: draw every masked position, keep the c most confident (untempered p)
                    for vals in itertools.product(range(V), repeat=len(masked)):
                        w = math.prod(pt[i][v] for i, v in zip(masked, vals))
                        order = sorted(range(len(masked)), key=lambda j: (-p1[masked[j]][vals[j]], j))[:c]
                        put([masked[j] for j in order], [vals[j] for j in order], w)
            dist = new
    return dict(dist)


@pytest.fixture(scope="module")
def mdm_net():
    return TinyDenoiser("mdm", 4, seed=3, scale=1.5, max_length=64)


@pytest.mark.parametrize("remasking,steps,block_length,tau", [
    ("low_confidence", 3, None, 0.7), ("random", 4, 2, 1.0), ("ancestral", 3, None, 1.0), ("ancestral", 4, 2, 1.3)])
def test_mdm_sampler_distribution_is_exact(mdm_net, remasking, steps, block_length, tau):
    from prime_eval.generation.steps import block_plan

    L = 3
    got = generate("mdm", mdm_net, _requests(L, tau), steps=steps, block_length=block_length, remasking=remasking,
                   rows_per_pass=512, pack="length")
    exact = _exact_mdm(mdm_net, PROMPT, L, block_plan(L, steps, block_length), remasking, tau)
    _check([tuple(g.tokens) for g in got], exact)
    if remasking == "ancestral":  # a step that reveals nothing costs no pass: fewer passes than steps on average
        assert sum(g.forward_passes for g in got) / N < steps
    else:
        assert all(g.forward_passes == steps - (block_length is not None) for g in got)  # the 1-token block: 1


def test_mdm_cfg_is_llada_guidance(mdm_net):
    """cfg > 0: logits = un + (cfg+1)(cond - un), un with the prompt masked; two rows per step."""
    L, cfg = 2, 0.8
    got = generate("mdm", mdm_net, _requests(L, 1.0, n=2000), steps=2, remasking="random", cfg=cfg,
                   rows_per_pass=512, pack="length")
    m = mdm_net.mask_id

    def guided(ids):
        cond = torch.tensor(_answer_logits(mdm_net, ids))
        un = torch.tensor(_answer_logits(mdm_net, [m] * len(PROMPT) + ids[len(PROMPT):]))
        return (un + (cfg + 1) * (cond - un))[len(PROMPT):].tolist()

    exact: dict = defaultdict(float)
    for first in range(L):  # random remasking, one token per step: which position first, then the other
        p_a = _softmax(guided(list(PROMPT) + [m, m])[first])
        for a in range(4):
            s = [m, m]
            s[first] = a
            p_b = _softmax(guided(list(PROMPT) + s)[1 - first])
            for b in range(4):
                s2 = list(s)
                s2[1 - first] = b
                exact[tuple(s2)] += 0.5 * p_a[a] * p_b[b]
    _check([tuple(g.tokens) for g in got], dict(exact), n=2000)
    assert all(g.forward_passes == 4 for g in got)


def test_mdm_temperature_zero_is_deterministic(mdm_net):
    """low_confidence at τ = 0 draws no random numbers: every seed gives the exact process's single answer."""
    from prime_eval.generation.steps import block_plan

    got = generate("mdm", mdm_net, _requests(3, 0.0, n=50), steps=3)
    assert len({tuple(g.tokens) for g in got}) == 1
    exact = _exact_mdm(mdm_net, PROMPT, 3, block_plan(3, 3, None), "low_confidence", 1e-3)
    assert max(exact, key=exact.get) == tuple(got[0].tokens) and max(exact.values()) > 0.999


def test_mdm_answers_do_not_depend_on_the_batch(mdm_net):
    reqs = [GenRequest(tuple(i % 4 for i in range(n)), L, seed=7 * n, temperature=1.0)
            for n, L in ((1, 3), (2, 5), (6, 2), (3, 4))]
    together = generate("mdm", mdm_net, reqs, steps=None, remasking="ancestral", rows_per_pass=64)
    alone = [generate("mdm", mdm_net, [r], remasking="ancestral", rows_per_pass=1)[0] for r in reqs]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert [len(g.tokens) for g in together] == [3, 5, 2, 4]
    capped = generate("mdm", mdm_net, reqs, gen_length=3)
    assert [len(g.tokens) for g in capped] == [3, 3, 2, 3]  # gen_length, never more than max_new_tokens


def test_steps_must_divide_into_blocks(mdm_net):
    from prime_eval.errors import UserError

    with pytest.raises(UserError, match="multiple of 2"):
        generate("mdm", mdm_net, _requests(4, n=1), steps=3, block_length=2)


# ------------------------------------------------------------------------------------------------ Prime


def _digits(st: SubTokenizer) -> list[tuple]:
    """Digits of π(x) for every token x, computed here from the permutation (not from the digit table)."""
    b, ell = st.base, st.ell
    return [tuple((int(st.perm[x]) // b ** (ell - 1 - j)) % b for j in range(ell)) for x in range(st.vocab_size)]


def _exact_prime(net, st, prompt, L, plan, tau, chunk_point, restricted=True):
    """Answer distribution (digit patterns per token) of the partial-masking process by enumeration."""
    V, ell, b = st.vocab_size, st.ell, st.base
    digits = _digits(st)
    y_prompt = [d for x in prompt for d in digits[x]]
    dist = {((None,) * ell,) * L: 1.0}
    for first, end, S in plan:
        for k in range(S):
            q, chunk = 1.0 / (S - k), chunk_point is not None and 1.0 - k / S > chunk_point
            new: dict = defaultdict(float)
            for state, pr in dist.items():
                ids = y_prompt + [b if d is None else d for tok in state for d in tok]
                logits = _answer_logits(net, ids)[len(prompt):]
                options = []
                for i in range(L):
                    tok = state[i]
                    M = [j for j in range(ell) if tok[j] is None]
                    if not (first <= i < end) or not M:
                        options.append([(tok, 1.0)])
                        continue
                    subs = ([((), 1 - q), (tuple(M), q)] if chunk else
                            [(s, q ** len(s) * (1 - q) ** (len(M) - len(s)))
                             for r in range(len(M) + 1) for s in itertools.combinations(M, r)])
                    ok = [x for x in range(V) if not restricted
                          or all(digits[x][j] == tok[j] for j in range(ell) if tok[j] is not None)]
                    px = _softmax([logits[i][x] for x in ok], tau)
                    opts: dict = defaultdict(float)
                    for sub, w in subs:
                        if not sub:
                            opts[tok] += w
                            continue
                        for x, p in zip(ok, px):
                            t = list(tok)
                            for j in sub:
                                t[j] = digits[x][j]
                            opts[tuple(t)] += w * p
                    options.append(list(opts.items()))
                for combo in itertools.product(*options):
                    new[tuple(t for t, _ in combo)] += pr * math.prod(w for _, w in combo)
            dist = new
    by_token = {d: x for x, d in enumerate(digits)}
    out: dict = defaultdict(float)
    for state, p in dist.items():
        out[tuple(by_token.get(tok, -1) for tok in state)] += p  # -1: an invalid code
    return dict(out)


@pytest.fixture(scope="module")
def prime_setup():
    """V = 6 tokens in ℓ = 2 base-3 digits: 9 codes, 3 of them invalid, scattered by a full permutation."""
    st = SubTokenizer(6, ell=2, base=3, perm=make_permutation(9, 6, seed=3, style="megatron"))
    assert st.num_invalid_codes == 3 and int(st.invalid_codes().min()) < 6  # not just the top codes
    net = TinyDenoiser("prime", 6, ell=2, base=3, seed=5, scale=1.5, max_length=64)
    return net, st


@pytest.mark.parametrize("steps,chunk_point,tau", [(3, None, 1.0), (2, None, 0.6), (4, 0.5, 1.0)])
def test_prime_sampler_distribution_is_exact_and_never_invalid(prime_setup, steps, chunk_point, tau):
    from prime_eval.generation.steps import block_plan

    net, st = prime_setup
    L = 2
    got = generate("prime", net, _requests(L, tau), subtokenizer=st, steps=steps, chunk_point=chunk_point,
                   rows_per_pass=512, pack="length")
    plan = block_plan(L, steps, None)
    exact = _exact_prime(net, st, PROMPT, L, plan, tau, chunk_point)
    assert all(-1 not in a for a, p in exact.items() if p > 0)
    samples = [tuple(g.tokens) for g in got]
    assert all(0 <= x < 6 for a in samples for x in a)  # never an invalid code
    _check(samples, exact)
    if steps == 3:  # the release's unrestricted draw would produce invalid codes here: the restriction prevents them
        loose = _exact_prime(net, st, PROMPT, L, plan, tau, chunk_point, restricted=False)
        assert sum(p for a, p in loose.items() if -1 in a) > 0.01


def test_prime_chunk_point_zero_reveals_whole_tokens(prime_setup):
    """chunk_point = 0 (the release's default): every token is revealed in one step, like a token-level MDM."""
    from prime_eval.generation.steps import block_plan

    net, st = prime_setup
    got = generate("prime", net, _requests(2, 1.0, n=2000), subtokenizer=st, steps=3, chunk_point=0.0,
                   rows_per_pass=512, pack="length")
    exact = _exact_prime(net, st, PROMPT, 2, block_plan(2, 3, None), 1.0, 0.0)
    _check([tuple(g.tokens) for g in got], exact, n=2000)


def test_prime_temperature_zero_and_batch_invariance():
    """On the oracle (i.i.d. tokens, exact conditionals) τ = 0 gives the most probable token everywhere, whatever
    the seed and reveal order; with sampling, answers do not depend on the batch."""
    st = SubTokenizer(6, ell=3, base=2, perm=make_permutation(8, 6, seed=1, style="megatron"))
    probs = torch.tensor([0.05, 0.1, 0.4, 0.15, 0.2, 0.1])
    oracle = OracleDenoiser(probs, st)
    got = generate("prime", oracle, _requests(5, 0.0, n=30), subtokenizer=st, steps=4)
    assert all(g.tokens == [2] * 5 for g in got)
    net = TinyDenoiser("prime", 6, ell=3, base=2, seed=2, scale=2.0, max_length=64)
    reqs = [GenRequest(tuple(range(n)), L, seed=n, temperature=1.0) for n, L in ((1, 4), (3, 2), (5, 6))]
    together = generate("prime", net, reqs, subtokenizer=st, steps=None, block_length=2, rows_per_pass=64)
    alone = [generate("prime", net, [r], subtokenizer=st, block_length=2, rows_per_pass=1)[0] for r in reqs]
    assert [g.tokens for g in together] == [g.tokens for g in alone] and [len(g.tokens) for g in alone] == [4, 2, 6]
