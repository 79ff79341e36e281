"""Likelihood estimators, one file per model family: `arm` (exact), `mdm` (ℓ=1 NELBO), `prime` (sub-token NELBO).

    est = get_estimator("prime", "mc", subtokenizer=st)
    result = estimate(net, est, x, target, torch.Generator().manual_seed(0), num_samples=128)
    result.mean, result.stderr      # NLL of the target in nats, Monte Carlo standard error

Every estimator is split into `rows` (sampling, from the request's own generator, through `sampler`) and `cost`
(logits -> K values, = `cost_from_terms` of the per-position `logit_terms`) so that adapters can pack rows of many
requests into one forward pass, and reduce the logits chunk by chunk, without changing any number.
"""
from __future__ import annotations

import torch

from prime_eval.errors import UserError
from prime_eval.estimators.arm import ARMEstimator
from prime_eval.estimators.mdm import MDMEstimator
from prime_eval.estimators.prime import PrimeEstimator
from prime_eval.estimators.iw import IWEstimator, make_iw
from prime_eval.estimators.rows import (PACKING, Estimate, Rows, forward_rows, forward_rows_batch_invariant,
                                        forward_terms, mean_and_stderr)
from prime_eval.estimators.sampler import MaskSampler

ESTIMATORS = {
    "arm": ("exact",),
    "mdm": ("mc", "exact_count", "sqrt_count", "levels", "chain_rule", "iw"),
    "prime": ("mc", "exact_count", "sqrt_count", "levels", "legacy_joint", "iw"),
}
DEFAULT_ESTIMATOR = {"arm": "exact", "mdm": "mc", "prime": "mc"}


def get_estimator(family: str, name: str | None = None, **options):
    """Build an estimator. Options: mask_id (mdm), subtokenizer, carry_over (prime), eps, T, cfg, temperature,
    chunk, legacy_scope (prime legacy_joint); for `iw`: net, proposal (uniform|pl), tau."""
    if family not in ESTIMATORS:
        raise UserError(f"unknown model family {family!r}; choose one of {', '.join(ESTIMATORS)}")
    name = name or DEFAULT_ESTIMATOR[family]
    if name not in ESTIMATORS[family]:
        raise UserError(f"estimator {name!r} is not available for {family}; choose one of "
                        f"{', '.join(ESTIMATORS[family])}")
    if family == "arm":
        extra = {k: v for k, v in options.items() if v not in (None, 0, 0.0, False)}
        if extra:
            raise UserError(f"options {sorted(extra)} do not apply to the exact ARM likelihood")
        return ARMEstimator()
    if name == "iw":
        iw_opts = {k: options.pop(k) for k in ("net", "proposal", "tau") if k in options and options[k] is not None}
        bad = {k for k, v in options.items() if k not in ("mask_id", "subtokenizer", "carry_over")
               and v not in (None, False, 0, 0.0)}
        if bad:
            raise UserError(f"options {sorted(bad)} do not apply to the iw estimator")
        base = get_estimator(family, "mc", **{k: v for k, v in options.items()
                                              if k in ("mask_id", "subtokenizer", "carry_over")})
        return IWEstimator(base, **iw_opts)
    if family == "mdm":
        allowed = {"mask_id", "eps", "T", "cfg"}
        bad = {k for k, v in options.items() if k not in allowed and v not in (None, False, 0, 0.0)}
        if bad:
            raise UserError(f"options {sorted(bad)} do not apply to MDM estimators (allowed: {sorted(allowed)})")
        return MDMEstimator(name, **{k: v for k, v in options.items() if k in allowed and v is not None})
    return PrimeEstimator(name, **{k: v for k, v in options.items() if v is not None})


def estimate(net, est, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None,
             num_samples: int = 1, rows_per_pass: int = 64) -> Estimate:
    """All K per-sample values for one request (convenience wrapper around rows -> forward -> cost)."""
    rows = est.rows(x, target, generator, num_samples)
    (logits,) = forward_rows(net, [rows], rows_per_pass)
    return Estimate(values=est.cost(rows, logits), num_forward_rows=int(rows.logits_at.any(1).sum()),
                    aggregate=getattr(est, "aggregate", None))


__all__ = ["get_estimator", "estimate", "forward_rows", "forward_rows_batch_invariant", "forward_terms", "PACKING",
           "mean_and_stderr", "Rows", "Estimate", "MaskSampler", "ARMEstimator", "MDMEstimator", "PrimeEstimator",
           "IWEstimator", "make_iw", "ESTIMATORS", "DEFAULT_ESTIMATOR"]
