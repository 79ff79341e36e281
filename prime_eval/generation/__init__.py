"""Answer generation, one sampler per model family (docs/adapters.md, "Generation"): pure functions of a network,
requests and the sampler's settings, returning token ids.

    from prime_eval.generation import GenRequest, generate
    reqs = [GenRequest(prompt=(1, 17, 42), max_new_tokens=16, seed=0)]          # temperature 0: greedy
    [g] = generate("arm", net, reqs)                                            # g.tokens, g.forward_passes
    [g] = generate("mdm", net, reqs, steps=16, remasking="low_confidence")     # LLaDA
    [g] = generate("prime", net, reqs, subtokenizer=st, steps=16)              # partial masking over sub-tokens

| family | module | process |
|---|---|---|
| arm | `generation/arm.py` | left to right with a key/value cache, stop tokens / stop check / max_new_tokens |
| mdm | `generation/mdm.py` | LLaDA semi-autoregressive blocks, low-confidence or random remasking; MDLM ancestral |
| prime | `generation/prime.py` | partial masking over sub-tokens, consistent tokens only (never an invalid code) |

Every draw comes from the request's own generator (`GenRequest.seed`), so an answer never depends on batch size,
request order or the number of processes.
"""
from __future__ import annotations

from prime_eval.generation.request import GenRequest, Generation

__all__ = ["GenRequest", "Generation", "generate", "generate_arm", "generate_mdm", "generate_prime"]


def generate(family: str, net, requests, **options) -> list[Generation]:
    """The family's sampler on `requests` (options: the sampler's keyword arguments)."""
    if family not in ("arm", "mdm", "prime"):
        raise ValueError(f"unknown model family {family!r}; choose arm, mdm or prime")
    return __getattr__(f"generate_{family}")(net, requests, **options)


def __getattr__(name):  # generate_arm / generate_mdm / generate_prime, imported on first use
    if name in ("generate_arm", "generate_mdm", "generate_prime"):
        import importlib

        return getattr(importlib.import_module(f"prime_eval.generation.{name.removeprefix('generate_')}"), name)
    raise AttributeError(name)
