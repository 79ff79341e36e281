"""The perplexity protocol: every choice that changes a number (`Protocol`), the estimators it allows, the stop rules,
and the checks that a network, its tokenizer and the protocol fit together (method.md §2).

    ARM         -Σ_{i=1}^{L-1} log p(x^i | x^{<i}) per block    exact, L-1 scored positions (the BOS is context)
    MDM/Prime   NELBO(x) of all L positions (BOS and EOS included, as MDLM), K Monte Carlo samples, their mean
    NLL = Σ_blocks score / Σ_blocks scored positions, per token of the original tokenizer; PPL = exp(NLL)

Stop rules, checked after every block (so the batch size never changes where a run stops): `max_tokens` (the block
that reaches it is the last), `target_se` (nll_stderr_sampling / NLL ≤ target_se, never before `min_blocks`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from prime_eval.errors import UserError
from prime_eval.estimators import DEFAULT_ESTIMATOR, get_estimator

ALLOWED = {"arm": ("exact",), "mdm": ("mc", "exact_count", "chain_rule"),
           "prime": ("mc", "exact_count", "legacy_joint")}


@dataclass
class Protocol:
    """Every choice that changes a number. `eps`/`T` apply to MDM/Prime only (`T` > 0: the T-step bound)."""

    L: int = 1024
    wrap: bool = True
    num_samples: int = 1  # K Monte Carlo samples per block
    eps: float = 1e-3
    T: int | None = None
    seed: int = 0
    strata: int = 16  # blocks per stratification group (MDLM: its eval batch of 16)
    max_tokens: int | None = None  # stop once this many positions are scored
    target_se: float | None = None  # stop once nll_stderr_sampling / nll <= target_se
    min_blocks: int = 32  # --target-se never stops before this many blocks
    bootstrap: int = 1000  # Poisson bootstrap replicates (0: none)
    bos_id: int | None = None  # default: tokenizer BOS, else EOS (GPT-2: both 50256)
    eos_id: int | None = None

    def __post_init__(self):
        if self.num_samples < 1:
            raise UserError(f"--samples must be >= 1, got {self.num_samples}")
        if self.strata < 1:
            raise UserError(f"--strata must be >= 1, got {self.strata}")
        if not 0.0 <= self.eps < 1.0:
            raise UserError(f"--eps must lie in [0, 1), got {self.eps}")
        if self.T is not None and self.T < 1:
            self.T = None
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.target_se is not None and not self.target_se > 0:
            raise UserError(f"--target-se must be > 0 (a relative standard error, e.g. 0.001), got {self.target_se}")


    def stop_reason(self, stats) -> str | None:
        """"max_tokens" or "target_se" once `stats` (a PerplexityStats) meets a stop rule, else None."""
        if self.max_tokens and stats.tokens >= self.max_tokens:
            return "max_tokens"
        if (self.target_se and stats.blocks >= max(2, self.min_blocks)
                and stats.stderr_sampling() <= self.target_se * abs(stats.nll)):
            return "target_se"
        return None


def build_estimator(net, name: str | None = None, *, eps: float = 1e-3, T: int | None = None, subtokenizer=None,
                    **options):
    """The estimator for `net.family` with the protocol's ε and T; Prime needs the sub-tokenizer (ℓ, b, π)."""
    family = getattr(net, "family", None)
    if family not in ALLOWED:
        raise UserError(f"network family {family!r} is not one of arm, mdm, prime")
    name = name or DEFAULT_ESTIMATOR[family]
    check_allowed(family, name)
    if options.get("cfg"):
        raise UserError("cfg (classifier-free guidance) is not a likelihood: a whole block has no context to guide on")
    if family == "arm":
        return get_estimator("arm", "exact")
    if family == "mdm":
        return get_estimator("mdm", name, mask_id=net.mask_id, eps=eps, T=T, **options)
    if subtokenizer is None:
        from prime_eval.subtokenizer import SubTokenizer

        subtokenizer = SubTokenizer(net.vocab_size, ell=net.ell, base=net.base)
    if (subtokenizer.ell, subtokenizer.base) != (net.ell, net.base):
        raise UserError(f"sub-tokenizer ℓ={subtokenizer.ell}, b={subtokenizer.base} does not match the network's "
                        f"ℓ={net.ell}, b={net.base}")
    options.setdefault("carry_over", bool(getattr(net, "carry_over", False)))
    return get_estimator("prime", name, subtokenizer=subtokenizer, eps=eps, T=T, **options)


def check_allowed(family: str, name: str) -> None:
    """UserError unless estimator `name` of `family` is one the protocol knows (anything else would be scored
    with masks it was not built for)."""
    if name not in ALLOWED.get(family, ()):
        raise UserError(f"estimator {name!r} is not available for perplexity of a {family} model; choose one of "
                        f"{', '.join(ALLOWED.get(family, ()))} (importance-weighted and other scoring estimators "
                        "are for `prime-eval score`)")


def resolve_estimator(net, estimator, p: Protocol, options: dict | None):
    """(estimator, K, deterministic): an estimator object as given (checked) or built from a name."""
    if estimator is None or isinstance(estimator, str):
        est = build_estimator(net, estimator, eps=p.eps, T=p.T, **(options or {}))
    else:
        est = estimator
        check_allowed(est.family, est.name)
    if est.family != getattr(net, "family", est.family):
        raise UserError(f"estimator family {est.family!r} does not match the network's {net.family!r}")
    deterministic = est.family == "arm" or bool(getattr(est, "deterministic", False))
    if deterministic and p.num_samples > 1:
        warnings.warn(f"{est.family} {est.name} is deterministic: --samples {p.num_samples} ignored (K = 1)")
    if est.family == "mdm" and est.name == "chain_rule":
        warnings.warn("chain_rule costs L forward rows per block and is the exact NLL of a left-to-right decoding "
                      "process, not the NELBO; prefer mc for the bound")
    return est, (1 if deterministic else p.num_samples), deterministic


def special_ids(net, tokenizer, p: Protocol) -> tuple[int, int]:
    """(BOS, EOS) ids of the blocks (default: the tokenizer's BOS, else its EOS), after checking that the tokenizer,
    the ids and L fit the network."""
    bos = p.bos_id if p.bos_id is not None else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                                 else tokenizer.eos_token_id)
    eos = p.eos_id if p.eos_id is not None else tokenizer.eos_token_id
    if bos is None or eos is None:
        raise UserError("the tokenizer has no EOS token; give bos_id and eos_id in the protocol")
    V = getattr(net, "vocab_size", None)
    if V is not None and max(bos, eos) >= V:
        raise UserError(f"BOS/EOS ids {bos}/{eos} are outside the network's vocabulary of {V}")
    if V is not None and len(tokenizer) > V:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the network only {V} outputs; pass the "
                        "model's own tokenizer")
    max_len = getattr(net, "max_length", None)
    if max_len is not None and p.L > max_len:
        raise UserError(f"L = {p.L} exceeds the network's maximum length of {max_len} tokens")
    return bos, eos


def scored_positions(est, block) -> int:
    """Positions of `block` that carry a term: L - 1 for an ARM (the BOS is context), L otherwise."""
    return block.ids.numel() - (1 if est.family == "arm" else 0)


def rows_per_block(est, K: int, L: int) -> int:
    """Forward rows one block costs: 1 (ARM), L (a deterministic diffusion estimator), else K (2K with CFG)."""
    if est.family == "arm":
        return 1
    if getattr(est, "deterministic", False):
        return L
    return K * (2 if getattr(est, "cfg", 0) else 1)
