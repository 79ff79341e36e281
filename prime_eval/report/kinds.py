"""What each number in the files is (`prime_eval.bound_kind`), as the report reads it, and the table it goes to.

The label is read where the producers write it (first found wins):

    results JSON     config.prime_eval.bound_kind        (one per run: the row)
    stats rows       bound_kind                          (per request; used when the results config lacks it)
    ppl JSON         bound_kind

Fallbacks, for files written by other harnesses or by prime-eval before the label existed (`normalise` also maps the
old `not_a_bound`):

    results without config.prime_eval (lm-eval's own models: hf, vllm, ...)  exact: lm-eval's `loglikelihood`
        contract is log p of an autoregressive model, computed exactly
    config.prime_eval / stats row / ppl JSON without bound_kind, from the fields older versions wrote:
        cfg ≠ 0, temperature ≠ 1 or estimator legacy_joint     not_a_likelihood
        estimator chain_rule                                   exact_left_to_right (older ppl JSONs said is_bound
                                                               false for it, older stats true: both are replaced)
        family arm or estimator exact / ar / teacher_forcing   exact
        is_bound false                                         not_a_likelihood
        otherwise                                              upper_bound

Tables (one per section; nothing is mixed across them):

    likelihood        exact and upper_bound: the model's likelihood; "≤" marks upper bounds (NELBO), exact values have
                      no mark
    left_to_right     exact_left_to_right: the exact NLL of left-to-right decoding with a diffusion model's
                      conditionals (`chain_rule`). A likelihood, but of a different process: neither the model's NLL
                      nor a bound on it, so it is neither marked "≤" nor put next to the model's bounds
    not_a_likelihood  scores that are not likelihoods (legacy_joint, CFG, temperature)
"""
from __future__ import annotations

from prime_eval import bound_kind as BK

SECTIONS = ("likelihood", "left_to_right", "not_a_likelihood")
_SECTION = {BK.EXACT: "likelihood", BK.UPPER_BOUND: "likelihood", BK.EXACT_LEFT_TO_RIGHT: "left_to_right",
            BK.NOT_A_LIKELIHOOD: "not_a_likelihood"}
_EXACT_NAMES = {"ar", "arm", "exact", "teacher_forcing"}  # estimator names older files wrote for exact ARM values


def section(kind: str) -> str:
    """The table section of a bound kind (module docstring)."""
    return _SECTION[BK.normalise(kind)]


def _from_fields(estimator, family, is_bound, cfg=None, temperature=None) -> str:
    """The fallback for files without a `bound_kind` (module docstring)."""
    if estimator == "legacy_joint" or cfg not in (None, 0, 0.0, False) or temperature not in (None, 1, 1.0):
        return BK.NOT_A_LIKELIHOOD
    if estimator == "chain_rule":
        return BK.EXACT_LEFT_TO_RIGHT
    if family == "arm" or estimator in _EXACT_NAMES:
        return BK.EXACT
    if is_bound is False:
        return BK.NOT_A_LIKELIHOOD
    return BK.UPPER_BOUND


def of_run(prime_eval_config: dict | None, stats_row: dict | None = None) -> str:
    """Bound kind of a results JSON: config.prime_eval.bound_kind, else a stats row's, else the fallbacks."""
    pe = prime_eval_config
    if not pe:
        return BK.EXACT  # lm-eval's own model types
    if pe.get("bound_kind"):
        return BK.normalise(pe["bound_kind"])
    if stats_row and stats_row.get("bound_kind"):
        return BK.normalise(stats_row["bound_kind"])
    return _from_fields(pe.get("estimator"), pe.get("family"), pe.get("is_bound"), pe.get("cfg"),
                        pe.get("temperature"))


def of_stats_row(row: dict, family: str | None = None) -> str:
    """Bound kind of one per-request statistics row (its own label, else the fallbacks)."""
    if row.get("bound_kind"):
        return BK.normalise(row["bound_kind"])
    return _from_fields(row.get("estimator"), family, row.get("is_bound"))


def of_ppl(obj: dict) -> str:
    """Bound kind of a `prime-eval/ppl` JSON: its `bound_kind`, else the fallbacks."""
    if obj.get("bound_kind"):
        return BK.normalise(obj["bound_kind"])
    model, proto = obj.get("model") or {}, obj.get("protocol") or {}
    opts = proto.get("estimator_options") or {}
    return _from_fields(proto.get("estimator"), model.get("family"), obj.get("is_bound"), opts.get("cfg"),
                        opts.get("temperature"))
