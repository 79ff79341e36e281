"""The exact audit in the demo: its generic cases (`prime_eval.audit.default_cases`, oracle and random networks) and
exact enumeration on the demo's trained MDM and Prime networks.

On a trained network the reference is the exact NLL of the network's own any-order generative process (dynamic
programming over reveal orders, `audit.exact_nll`), and every estimator's exact expectation over all mask sets
(`audit.exact_expectation`) is compared with it: a valid bound is never below; legacy_joint can be.
"""
from __future__ import annotations

import time

from prime_eval.demo.models import ModelArtifacts, load_demo_network
from prime_eval.demo.settings import LABELS, DemoSettings
from prime_eval.demo.tokenizer import encode_texts
from prime_eval.synthetic import SyntheticData

TRAINED_ESTIMATORS = {"mdm": ("mc", "exact_count", "chain_rule"), "prime": ("mc", "exact_count", "legacy_joint")}
TARGET_TOKENS = {"mdm": 4, "prime": 1}  # MDM: 4 tokens (4! orders); Prime: 1 token = ℓ sub-tokens (2^ℓ mask sets)
CONTEXT_TOKENS = 4


def audit_trained(art: ModelArtifacts, settings: DemoSettings, data: SyntheticData) -> list[dict]:
    """Rows (case, estimator, expectation, reference, gap, verdict) on short held-out targets of the trained
    networks: `settings.audit_targets` documents, each `CONTEXT_TOKENS` tokens of context ([BOS] first)."""
    import torch

    from prime_eval import audit
    from prime_eval.estimators import MDMEstimator, PrimeEstimator

    out = []
    for family in ("mdm", "prime"):
        net, tok, st, _ = load_demo_network(family, art, settings)
        n_target = TARGET_TOKENS[family]
        docs = encode_texts(tok, data.heldout.texts[: 4 * settings.audit_targets])
        picked = [d for d in docs if len(d) >= CONTEXT_TOKENS + n_target][: settings.audit_targets]
        for i, d in enumerate(picked):
            x = torch.tensor([tok.bos_token_id, *d[: CONTEXT_TOKENS + n_target - 1]], dtype=torch.long)
            target = torch.arange(x.numel()) >= x.numel() - n_target
            if family == "mdm":
                ests = [MDMEstimator(n, mask_id=net.mask_id) for n in TRAINED_ESTIMATORS[family]]
            else:
                ests = [PrimeEstimator(n, subtokenizer=st) for n in TRAINED_ESTIMATORS[family]]
            table = audit.masked_nll_table(net, ests[0], x, target)
            ref = audit.exact_nll(net, ests[0], x, target, table=table)
            for est in ests:
                e = audit.exact_expectation(net, est, x, target,
                                            table=table if est.name in ("mc", "exact_count") else None)
                gap = e - ref
                if est.name == "chain_rule":
                    v = "exact NLL (left-to-right process)"
                elif gap >= -1e-7 * max(1.0, abs(ref)):
                    v = "valid bound" if est.is_bound else "above here (not a bound in general)"
                else:
                    v = "VIOLATES BOUND"
                out.append({"case": f"trained {LABELS[family]}, held-out doc {i}, {n_target} target token"
                                    + ("s" if n_target > 1 else ""),
                            "estimator": est.name, "expectation": e, "reference": ref, "gap": gap,
                            "is_bound_by_construction": bool(est.is_bound), "verdict": v})
    return out


def run_audit(art: ModelArtifacts, settings: DemoSettings, data: SyntheticData) -> dict:
    """The generic audit (`--fast`; the quick demo: one oracle case) and the trained networks' rows."""
    from prime_eval import audit

    t0 = time.perf_counter()
    if settings.quick:
        generic = [r.as_dict() for r in audit.oracle_case(16, base=2, source="zipf:1.1", perm_seed=0, L=1)]
    else:
        generic = [r.as_dict() for r in audit.default_cases(fast=True)]
    rows = generic + audit_trained(art, settings, data)
    failed = [r for r in rows if r["is_bound_by_construction"] and r["verdict"] == "VIOLATES BOUND"]
    return {"rows": rows, "seconds": time.perf_counter() - t0, "valid_estimators_pass": not failed,
            "legacy_violations": sum(1 for r in rows if r["estimator"].startswith("legacy_joint")
                                     and r["verdict"] == "VIOLATES BOUND")}
