"""What a reported number is — one label, defined here and nowhere else.

Every producer writes it (per-request score statistics, the results config `config.prime_eval`, the ppl JSON) and
the report reads it to file each number in the right table:

    exact                 exact log-likelihood of the model (ARM teacher forcing)
    upper_bound           a variational bound: E[estimate] >= NLL of the model (MDM / Prime NELBO, IW_K)
    exact_left_to_right   exact NLL of a *different* process: left-to-right decoding with the MDM's conditionals
                          (`chain_rule`); neither the model's NLL nor a bound on it
    not_a_likelihood      a score, not a likelihood: the published joint Prime form (`legacy_joint`), CFG, temperature

Pure Python (no torch), so the report can import it.
"""
from __future__ import annotations

EXACT = "exact"
UPPER_BOUND = "upper_bound"
EXACT_LEFT_TO_RIGHT = "exact_left_to_right"
NOT_A_LIKELIHOOD = "not_a_likelihood"

DESCRIPTION = {
    EXACT: "exact likelihood",
    UPPER_BOUND: "upper bound on NLL (NELBO)",
    EXACT_LEFT_TO_RIGHT: "exact NLL of the left-to-right process (not the model's NLL, not a bound)",
    NOT_A_LIKELIHOOD: "not a likelihood",
}
KINDS = tuple(DESCRIPTION)
_LEGACY = {"not_a_bound": NOT_A_LIKELIHOOD}  # the name ppl JSONs used before this module existed


def is_bound(kind: str) -> bool:
    """True when the number bounds the model's NLL from above (exact counts as the tightest bound)."""
    return normalise(kind) in (EXACT, UPPER_BOUND)


def is_likelihood(kind: str) -> bool:
    """True for every kind that is a likelihood of some generative process (all but `not_a_likelihood`)."""
    return normalise(kind) != NOT_A_LIKELIHOOD


def normalise(kind: str) -> str:
    """The canonical name of `kind` (older files wrote `not_a_bound`); ValueError for an unknown label."""
    kind = _LEGACY.get(kind, kind)
    if kind not in DESCRIPTION:
        raise ValueError(f"unknown bound kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind
