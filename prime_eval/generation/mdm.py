"""Masked-diffusion (MDM, ℓ = 1) answer sampling: LLaDA's semi-autoregressive low-confidence remasking
(ML-GSAI/LLaDA `generate.py`) and MDLM's ancestral steps.

An answer of L tokens starts fully masked after the prompt and is cut into blocks sampled left to right, each with
steps/#blocks steps (`generation.steps`). At every step that reveals something, one forward pass on the current
sequence (with `cfg` > 0 a second one with the prompt masked: logits = un + (cfg+1)(cond - un), LLaDA's
unsupervised CFG) gives, at each still-masked position i of the block, a draw

    x0_i ~ softmax(logits_i / τ)            (τ = 0: argmax; `generation.sampling`)

and `remasking` decides which positions take their draw:

    low_confidence  the c_k positions of highest confidence p(x0_i) (softmax without τ; ties: leftmost), c_k from
                    LLaDA's `transfer_counts` (n // S per step, the first n mod S steps one more)       (LLaDA)
    random          c_k positions chosen uniformly                                      (LLaDA `remasking='random'`)
    ancestral       each position independently with probability (α_s - α_t)/(1 - α_t) = 1/(S - k)     (MDLM)

For `random` and `ancestral` the positions are drawn before the pass and only those get a token (the same
distribution as drawing every x0 first), so a step that reveals nothing costs no pass. Draws, per request from its
own generator, in this order each step: the positions' uniforms (random, ancestral), then one uniform per token
drawn (τ > 0). Positions beyond the current block are masked inputs and never revealed early.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from prime_eval.estimators.rows import Rows
from prime_eval.generation.request import GenRequest, Generation
from prime_eval.generation.steps import block_plan, reveal_probability, run_steps, transfer_counts

REMASKING = ("low_confidence", "random", "ancestral")


def answer_length(request: GenRequest, gen_length: int | None) -> int:
    """The answer's fixed length: gen_length, never more than the request's max_new_tokens."""
    return request.max_new_tokens if gen_length is None else min(gen_length, request.max_new_tokens)


def generate_mdm(net, requests: Sequence[GenRequest], *, steps: int | None = None, gen_length: int | None = None,
                 block_length: int | None = None, remasking: str = "low_confidence", cfg: float = 0.0,
                 mask_id: int | None = None, rows_per_pass: int = 64, pack: str = "bucket",
                 on_pass=None) -> list[Generation]:
    """One Generation per request (module docstring): `answer_length` tokens, `steps` (default: that length) in
    blocks of `block_length` (default: one block)."""
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}: choose one of {', '.join(REMASKING)}")
    mask_id = net.mask_id if mask_id is None else mask_id
    samplers = [_MDMSampler(r, mask_id, block_plan(answer_length(r, gen_length), steps, block_length), remasking,
                            float(cfg or 0.0)) for r in requests]
    run_steps(net, [s for s in samplers if s.length], rows_per_pass=rows_per_pass, pack=pack, on_pass=on_pass)
    return [s.result() for s in samplers]


class _MDMSampler:
    """One request's sampling state: the sequence, its block and step, and what the next pass is for."""

    def __init__(self, r: GenRequest, mask_id: int, plan: list, remasking: str, cfg: float):
        self.r, self.mask_id, self.plan, self.remasking, self.cfg = r, mask_id, plan, remasking, cfg
        self.P = len(r.prompt)
        self.length = plan[-1][1] if plan else 0
        self.x = torch.tensor(list(r.prompt) + [mask_id] * self.length, dtype=torch.long)  # (P + L,)
        self.g = r.generator()
        self.block, self.k, self.counts = 0, 0, None
        self.passes = 0
        self.todo: tuple | None = None  # (positions (n,), how many to take) of the pass in flight

    def next_rows(self) -> Rows | None:
        """Advance to the next step that reveals something; its Rows, or None when the answer is complete."""
        while self.block < len(self.plan):
            first, end, S = self.plan[self.block]
            span = torch.arange(self.P + first, self.P + end)
            masked = span[self.x[span] == self.mask_id]  # (n,) masked positions of the block
            if self.k == 0:
                self.counts = transfer_counts(masked.numel(), S)
            if self.k >= S or masked.numel() == 0:
                self.block, self.k = self.block + 1, 0
                continue
            k, self.k = self.k, self.k + 1
            if self.remasking == "ancestral":
                v = torch.rand(masked.numel(), generator=self.g, dtype=torch.float64)
                pos = masked[v < reveal_probability(k, S)]
                take = pos.numel()
            elif self.remasking == "random":
                v = torch.rand(masked.numel(), generator=self.g, dtype=torch.float64)
                take = self.counts[k]
                pos = masked[torch.argsort(v, stable=True)[:take]].sort().values
            else:
                pos, take = masked, self.counts[k]
            if take == 0:
                continue
            self.todo = (pos, take)
            at = torch.zeros(1, self.x.numel(), dtype=torch.bool)
            at[0, pos] = True
            if self.cfg:
                uncond = self.x.clone()
                uncond[:self.P] = self.mask_id  # the prompt masked: the unconditional pass
                return Rows(inputs=torch.stack([self.x, uncond]), logits_at=at.expand(2, -1), num_samples=1)
            return Rows(inputs=self.x[None], logits_at=at, num_samples=1)
        return None

    @property
    def needs_confidence(self) -> bool:
        return self.remasking == "low_confidence"

    def prepare(self, logits: torch.Tensor) -> tuple:
        """The pass's logits (n, V) (CFG: (2n, V), combined here) and the step's token uniforms (τ > 0)."""
        pos, _ = self.todo
        self.passes += 2 if self.cfg else 1
        if self.cfg:
            cond, un = logits.chunk(2)
            logits = un + (self.cfg + 1.0) * (cond - un)
        r = self.r
        u = None if r.temperature == 0 else torch.rand(pos.numel(), generator=self.g, dtype=torch.float64)
        return logits, u, r

    def finish(self, x0: torch.Tensor, conf: torch.Tensor | None) -> None:
        """Reveal the step's positions with their draws x0 (n,) (low_confidence: the `take` most confident)."""
        pos, take = self.todo
        if self.remasking == "low_confidence":
            keep = torch.argsort(-conf, stable=True)[:take]  # most confident first, ties: leftmost
            pos, x0 = pos[keep], x0[keep]
        self.x[pos] = x0

    def result(self) -> Generation:
        return Generation(self.x[self.P:].tolist(), self.passes, "length")
