"""MDM-Prime answer sampling: partial masking over sub-tokens y = f_ℓ(π(x)) (method.md §1, §2.3; the release's
`lit_gpt/sampling.py`), in blocks of tokens as the MDM sampler (`generation.steps`).

The answer's L tokens start with all L·ℓ sub-tokens masked (digit b). Step k of a block of S steps goes from
t = 1 - k/S to s = 1 - (k+1)/S (α_t = 1 - t); each still-masked sub-token of the block is revealed with probability

    (α_s - α_t) / (1 - α_t) = 1 / (S - k)          (1 at the last step: the answer is complete)

With `chunk_point` (the release's chunk schedule, `chunk_pt`): while t > chunk_point the masked sub-tokens of a
token are revealed together (one draw per token; chunk_point = 0: whole tokens always, as the release's default).
A revealed sub-token takes its digit from a token drawn for its position,

    x0_i ~ p̃(x | y_t) restricted to the tokens consistent with the visible digits of token i, at temperature τ

(p̃: the network's V-way softmax; consistent: Digits[x, j] = y^{i,j} at every visible j, `SubTokenizer.consistent`;
τ = 0: the most probable consistent token). For a carry-over model p̃ already is this restriction; for one without,
it is p̃ conditioned on what is visible. Revealed digits copy x0_i's, so a token's visible digits are always those of
some token: **no invalid code** (a digit pattern that maps to no token, b^ℓ > V) can appear, and a token revealed in
several steps is drawn from the conditional of the same model given its earlier digits. (The release draws x0 from
the unrestricted softmax and can produce invalid codes.) A step that reveals nothing needs no pass.

Draws, per request from its own generator, each step: the reveal uniforms (one per masked sub-token of the block,
token-major; one per token with a masked sub-token while chunking), then one uniform per token drawn (τ > 0).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from prime_eval.estimators.rows import Rows
from prime_eval.generation.mdm import answer_length
from prime_eval.generation.request import GenRequest, Generation
from prime_eval.generation.steps import block_plan, reveal_probability, run_steps
from prime_eval.subtokenizer import SubTokenizer


def generate_prime(net, requests: Sequence[GenRequest], *, subtokenizer: SubTokenizer, steps: int | None = None,
                   gen_length: int | None = None, block_length: int | None = None, chunk_point: float | None = None,
                   rows_per_pass: int = 64, pack: str = "bucket", on_pass=None) -> list[Generation]:
    """One Generation per request (module docstring); its tokens are ids < V, decoded from the final digits."""
    samplers = [_PrimeSampler(r, subtokenizer, block_plan(answer_length(r, gen_length), steps, block_length),
                              chunk_point) for r in requests]
    run_steps(net, [s for s in samplers if s.length], rows_per_pass=rows_per_pass, pack=pack, on_pass=on_pass)
    return [s.result() for s in samplers]


class _PrimeSampler:
    """One request's state: the sub-token sequence (P + L, ℓ), its block and step, the pass in flight."""

    def __init__(self, r: GenRequest, st: SubTokenizer, plan: list, chunk_point: float | None):
        self.r, self.st, self.plan, self.chunk_point = r, st, plan, chunk_point
        self.mask = st.base
        self.P = len(r.prompt)
        self.length = plan[-1][1] if plan else 0
        prompt = st.encode(torch.tensor(r.prompt, dtype=torch.long)).view(-1, st.ell)  # (P, ℓ)
        self.y = torch.cat([prompt, torch.full((self.length, st.ell), self.mask, dtype=torch.long)])  # (P + L, ℓ)
        self.g = r.generator()
        self.block, self.k, self.passes = 0, 0, 0
        self.todo: tuple | None = None  # (tokens (n,), revealed digits (n, ℓ) bool) of the pass in flight

    def next_rows(self) -> Rows | None:
        while self.block < len(self.plan):
            first, end, S = self.plan[self.block]
            block = self.y[self.P + first:self.P + end]  # (m, ℓ) view
            masked = block == self.mask  # (m, ℓ)
            if self.k >= S or not bool(masked.any()):
                self.block, self.k = self.block + 1, 0
                continue
            k, self.k = self.k, self.k + 1
            p = reveal_probability(k, S)
            if self.chunk_point is not None and 1.0 - k / S > self.chunk_point:
                has = masked.any(1)  # (m,) tokens with a masked sub-token: one draw each
                v = torch.rand(int(has.sum()), generator=self.g, dtype=torch.float64)
                hit = torch.zeros_like(has)
                hit[has] = v < p
                reveal = masked & hit[:, None]
            else:
                v = torch.rand(int(masked.sum()), generator=self.g, dtype=torch.float64)  # token-major
                reveal = torch.zeros_like(masked)
                reveal[masked] = v < p
            toks = torch.nonzero(reveal.any(1)).flatten()  # (n,) block tokens with a revealed sub-token
            if toks.numel() == 0:
                continue
            self.todo = (self.P + first + toks, reveal[toks])
            at = torch.zeros(1, self.y.shape[0], dtype=torch.bool)
            at[0, self.todo[0]] = True
            return Rows(inputs=self.y.flatten()[None], logits_at=at, num_samples=1)
        return None

    needs_confidence = False

    def prepare(self, logits: torch.Tensor) -> tuple:
        """The pass's logits (n, V) restricted to the tokens consistent with each token's visible digits, and the
        step's token uniforms (τ > 0)."""
        pos, _ = self.todo
        self.passes += 1
        visible = self.y[pos].masked_fill(self.y[pos] == self.mask, -1)  # (n, ℓ), -1 where masked
        seen = (visible >= 0).any(1)  # tokens with a visible digit: only these are restricted
        if bool(seen.any()):
            ok = self.st.consistent(visible[seen].to(logits.device))  # (n', V)
            logits = logits.clone()
            logits[seen.to(logits.device)] = logits[seen.to(logits.device)].masked_fill(~ok, float("-inf"))
        r = self.r
        u = None if r.temperature == 0 else torch.rand(pos.numel(), generator=self.g, dtype=torch.float64)
        return logits, u, r

    def finish(self, x0: torch.Tensor, conf=None) -> None:
        """Reveal the step's digits from the consistent tokens x0 (n,) drawn for its positions."""
        pos, reveal = self.todo
        digits = self.st.digit_table[x0]  # (n, ℓ) f_ℓ(π(x0))
        self.y[pos] = torch.where(reveal, digits, self.y[pos])

    def result(self) -> Generation:
        tokens = self.st.decode(self.y[self.P:].flatten())  # (L,), -1 for an invalid code (never: docstring)
        if bool((tokens < 0).any()):
            raise AssertionError("the Prime sampler produced an invalid code")
        return Generation(tokens.tolist(), self.passes, "length")
