"""The importance-weighted any-order estimator against exact enumeration over reveal orders."""
import math

import numpy as np
import pytest
import torch

from prime_eval import audit
from prime_eval.errors import UserError
from prime_eval.estimators import estimate, get_estimator
from prime_eval.estimators.iw import plackett_luce_log_prob
from prime_eval.networks.toy import TinyDenoiser
from prime_eval.subtokenizer import SubTokenizer, make_permutation


def _prime_case():
    st = SubTokenizer(8, base=2, perm=make_permutation(8, 8, seed=1, style="megatron"))
    net = TinyDenoiser("prime", 8, ell=3, base=2, seed=0)
    x, target = torch.tensor([3, 5, 1]), torch.tensor([0, 1, 1], dtype=torch.bool)
    return net, {"subtokenizer": st}, x, target, "prime"


def _mdm_case():
    net = TinyDenoiser("mdm", 6, seed=2)
    x, target = torch.tensor([1, 3, 0, 2, 4]), torch.tensor([0, 1, 1, 1, 1], dtype=torch.bool)
    return net, {"mask_id": 6}, x, target, "mdm"


@pytest.mark.parametrize("case", [_mdm_case, _prime_case])
def test_iw_exact_properties(case):
    net, opts, x, target, family = case()
    mc = get_estimator(family, "mc", **opts)
    table = audit.masked_nll_table(net, mc, x, target)
    nll = audit.exact_nll(net, mc, x, target, table=table)
    elbo = audit.exact_expectation(net, mc, x, target, table=table)
    orders, logp = audit.order_log_likelihoods(table)
    # the any-order identity: p = mean over orders of Π p, and the ELBO = mean over orders of -Σ log p
    assert -np.logaddexp.reduce(logp - math.lgamma(orders.shape[1] + 1)) == pytest.approx(nll, abs=1e-9)
    assert -logp.mean() == pytest.approx(elbo, abs=1e-9)
    for proposal in ("uniform", "pl"):
        values = [audit.iw_exact_expectation(table, K, proposal, max_tuples=200_000)[0] for K in (1, 2)]
        assert all(v >= nll - 1e-9 for v in values)
        assert values[1] <= values[0] + 1e-12  # non-increasing NLL in K
    assert audit.iw_exact_expectation(table, 1, "uniform")[0] == pytest.approx(elbo, abs=1e-9)
    assert audit.iw_exact_expectation(table, 2, "posterior")[0] == pytest.approx(nll, abs=1e-9)


@pytest.mark.parametrize("case", [_mdm_case, _prime_case])
@pytest.mark.parametrize("proposal", ["uniform", "pl"])
def test_iw_monte_carlo_matches_exact_expectation(case, proposal):
    net, opts, x, target, family = case()
    mc = get_estimator(family, "mc", **opts)
    table = audit.masked_nll_table(net, mc, x, target)
    exact, _ = audit.iw_exact_expectation(table, 1, proposal)
    est = get_estimator(family, "iw", net=net, proposal=proposal, **opts)
    # each per-order value is -log w(σ_k) with σ_k ~ q i.i.d.; their mean estimates the exact E[-IW_1]
    vals = estimate(net, est, x, target, torch.Generator().manual_seed(0), 600, rows_per_pass=4096).values
    se = float(vals.std() / math.sqrt(vals.numel()))
    assert abs(float(vals.mean()) - exact) < 4 * se


def test_iw_plackett_luce_normalised():
    theta = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    import itertools
    orders = torch.tensor(list(itertools.permutations(range(3))))
    assert float(plackett_luce_log_prob(orders, theta).exp().sum()) == pytest.approx(1.0)


def test_iw_options_and_cost_guard():
    net, opts, x, target, family = _mdm_case()
    est = get_estimator("mdm", "iw", net=net, **opts)
    r = estimate(net, est, x, target, torch.Generator().manual_seed(1), 8)
    assert r.values.shape == (8,) and math.isfinite(r.mean) and r.stderr >= 0
    assert 1.0 <= est.ess(r.values) <= 8.0
    with pytest.raises(UserError, match="pl proposal needs the network"):
        get_estimator("mdm", "iw", proposal="pl", **opts)
    with pytest.raises(UserError, match="forward rows"):
        est.max_positions = 10
        est.rows(x, target, torch.Generator(), 8)
