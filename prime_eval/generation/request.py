"""What a sampler is asked for and what it returns: one `GenRequest` per answer, one `Generation` back.

The samplers (`generation.arm`, `generation.mdm`, `generation.prime`) are pure functions of (network, requests,
sampler settings): every random number a request uses comes from its own `torch.Generator`, seeded with
`GenRequest.seed`, so an answer depends on the seed and never on which requests share a forward pass, their order or
the number of processes. Text (stop strings, decoding) is the caller's: the samplers see token ids only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenRequest:
    """prompt: token ids (already truncated to the window); max_new_tokens: the answer's length cap (diffusion: its
    length); temperature: 0 = argmax (greedy), else softmax(logits / temperature); top_k / top_p: the candidates
    kept before sampling (transformers' order: temperature, top-k, top-p); stop_ids: tokens that end an
    autoregressive answer (EOS; not part of the answer)."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    seed: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: tuple[int, ...] = ()

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seed))


@dataclass
class Generation:
    """tokens: the answer's token ids (ARM: up to, not including, a stop token); forward_passes: network rows run
    for this request (a CFG step counts two); stop: "eos" (a stop token), "stop" (the caller's stop check, e.g. a
    stop string), "length" (max_new_tokens; a diffusion answer always ends so)."""

    tokens: list[int]
    forward_passes: int = 0
    stop: str = "length"
    extra: dict = field(default_factory=dict)
