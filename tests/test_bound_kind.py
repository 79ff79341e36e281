"""One label for what a number is (`prime_eval.bound_kind`): every estimator declares it, and the score statistics,
the results config and the ppl JSON all carry the same label for the same estimator."""
from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

from model_adapters import ARMLM, MDMLM, PrimeLM
from prime_eval import bound_kind as BK
from prime_eval import perplexity as P
from prime_eval.estimators import ESTIMATORS, get_estimator
from prime_eval.networks.toy import TinyDenoiser
from prime_eval.subtokenizer import SubTokenizer

EXPECTED = {
    ("arm", "exact"): BK.EXACT,
    ("mdm", "mc"): BK.UPPER_BOUND, ("mdm", "exact_count"): BK.UPPER_BOUND, ("mdm", "levels"): BK.UPPER_BOUND,
    ("mdm", "iw"): BK.UPPER_BOUND, ("mdm", "chain_rule"): BK.EXACT_LEFT_TO_RIGHT, ("mdm", "sqrt_count"): BK.UPPER_BOUND,
    ("prime", "mc"): BK.UPPER_BOUND, ("prime", "exact_count"): BK.UPPER_BOUND, ("prime", "levels"): BK.UPPER_BOUND,
    ("prime", "iw"): BK.UPPER_BOUND, ("prime", "legacy_joint"): BK.NOT_A_LIKELIHOOD,
    ("prime", "sqrt_count"): BK.UPPER_BOUND,
}


def _estimator(family, name, **kw):
    opts = {"mdm": {"mask_id": 8}, "prime": {"subtokenizer": SubTokenizer(8, ell=3, base=2)}}.get(family, {})
    return get_estimator(family, name, **opts, **kw)


@pytest.mark.parametrize("family,name", [(f, n) for f, names in ESTIMATORS.items() for n in names])
def test_every_estimator_declares_its_kind(family, name):
    est = _estimator(family, name)
    assert est.bound_kind == EXPECTED[(family, name)]
    cfg = est.config()
    assert cfg["bound_kind"] == est.bound_kind and cfg["is_bound"] == BK.is_bound(est.bound_kind) == est.is_bound


def test_guidance_is_not_a_likelihood():
    assert _estimator("mdm", "mc", cfg=1.0).bound_kind == BK.NOT_A_LIKELIHOOD
    assert _estimator("mdm", "chain_rule", cfg=1.0).bound_kind == BK.NOT_A_LIKELIHOOD
    assert _estimator("prime", "legacy_joint", temperature=0.5).bound_kind == BK.NOT_A_LIKELIHOOD


def test_labels_and_legacy_name():
    assert BK.normalise("not_a_bound") == BK.NOT_A_LIKELIHOOD
    assert BK.is_bound(BK.EXACT) and BK.is_bound(BK.UPPER_BOUND)
    assert not BK.is_bound(BK.EXACT_LEFT_TO_RIGHT) and BK.is_likelihood(BK.EXACT_LEFT_TO_RIGHT)
    assert not BK.is_likelihood(BK.NOT_A_LIKELIHOOD)
    with pytest.raises(ValueError):
        BK.normalise("lower_bound")


@pytest.fixture(scope="module")
def tok(shared_data):
    from prime_eval.checkpoints import load_tokenizer

    return load_tokenizer(shared_data / "tokenizers" / "gpt2")


@pytest.mark.parametrize("family,name", [("arm", "exact"), ("mdm", "chain_rule"), ("mdm", "mc"),
                                         ("prime", "legacy_joint")])
def test_score_stats_results_config_and_ppl_json_agree(family, name, tok):
    """chain_rule used to be `is_bound: true` in the score statistics and false in the ppl JSON."""
    net = TinyDenoiser(family, len(tok), ell=4 if family == "prime" else 1, base=15, seed=1)
    cls = {"arm": ARMLM, "mdm": MDMLM, "prime": PrimeLM}[family]
    lm = cls(model=net, tokenizer=tok, estimator=name, samples=4)
    lm.loglikelihood([Instance("loglikelihood", {}, ("The cat", " sat"), 0, ("toy", 0, 1))])
    (row,) = lm.stats
    info = lm.get_model_info()["prime_eval"]
    ppl = P.evaluate_perplexity(net, tok, ["the cat sat on the mat and looked at the dog"],
                                P.Protocol(L=8, num_samples=2, eps=0.0), estimator=name, progress=False)
    kind = EXPECTED[(family, name)]
    assert row["bound_kind"] == info["bound_kind"] == ppl["bound_kind"] == kind
    assert row["is_bound"] == info["is_bound"] == ppl["is_bound"] == BK.is_bound(kind)
