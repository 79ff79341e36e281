"""`estimator=iw` end to end through the adapters and lm-eval, next to `mc` on the same requests."""
from __future__ import annotations

import math

import pytest
import torch

from model_adapters import MDMLM, PrimeLM
from prime_eval.errors import UserError
from prime_eval.networks.toy import TinyDenoiser


@pytest.fixture(scope="module")
def gpt2_tok(shared_data):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(str(shared_data / "tokenizers" / "gpt2"))


@pytest.fixture(scope="module")
def task_manager(shared_data, tmp_path_factory):
    from prime_eval.tasks import build_task_manager

    return build_task_manager(data_dir=shared_data, tasks=["piqa"],
                              cache_dir=tmp_path_factory.mktemp("offline_tasks"))


@pytest.mark.parametrize("family", ["mdm", "prime"])
def test_iw_through_simple_evaluate(family, gpt2_tok, task_manager, tmp_path):
    import lm_eval

    V = len(gpt2_tok)
    if family == "mdm":
        net, cls, extra = TinyDenoiser("mdm", V, d=16, max_length=256, seed=0, dtype=torch.float32), MDMLM, {}
    else:
        net = TinyDenoiser("prime", V, ell=16, base=2, d=16, max_length=256, seed=0, dtype=torch.float32)
        cls, extra = PrimeLM, {"permutation": "identity"}
    results = {}
    for est, opts in (("mc", {"samples": 8}), ("iw", {"orders": 4, "proposal": "uniform"})):
        lm = cls(model=net, tokenizer=gpt2_tok, estimator=est, seed=3, greedy=False, **opts, **extra)
        res = lm_eval.simple_evaluate(model=lm, tasks=["piqa"], task_manager=task_manager, limit=3,
                                      log_samples=True, bootstrap_iters=0)
        info = res["config"]["prime_eval"]
        assert info["estimator"] == est and info["is_bound"]
        results[est] = lm.stats
    iw = results["iw"]
    assert all(r["estimator"] == "iw" and r["num_samples"] == 4 and len(r["log_weights"]) == 4 for r in iw)
    assert all(1.0 <= r["ess"] <= 4.0 and math.isfinite(r["loglikelihood"]) for r in iw)
    # same requests: the ELBO (mc) and IW_K estimate nearly the same quantity on a near-uniform random model
    for a, b in zip(results["mc"], iw):
        assert (a["doc_id"], a["choice"]) == (b["doc_id"], b["choice"])
        se = math.hypot(a["mc_stderr"], b["mc_stderr"])
        assert abs(a["loglikelihood"] - b["loglikelihood"]) < 5 * se + 0.5


def test_iw_options_rejected_elsewhere(gpt2_tok):
    net = TinyDenoiser("mdm", len(gpt2_tok), d=16, max_length=64, seed=0, dtype=torch.float32)
    with pytest.raises(UserError, match="apply only to estimator=iw"):
        MDMLM(model=net, tokenizer=gpt2_tok, estimator="mc", orders=4)
