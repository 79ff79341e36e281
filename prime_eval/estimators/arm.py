"""Autoregressive (ARM) log-likelihood: exact teacher forcing (method.md §2.2, §3.1).

    NLL(x_T | x_C) = -Σ_{i ∈ T} log p_θ(x^i | x^{<i})

One row per request: the input is x[:-1], logits are taken at positions i-1 for every target position i.
`is_greedy`: every target token is the argmax of its conditional (lm-eval's convention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prime_eval import bound_kind as BK
from prime_eval.errors import UserError
from prime_eval.estimators.rows import Rows


class ARMEstimator:
    family = "arm"
    name = "exact"
    bound_kind = BK.EXACT
    is_bound = True
    deterministic = True

    def config(self) -> dict:
        return {"family": self.family, "estimator": self.name, "bound_kind": self.bound_kind, "is_bound": True}

    def rows(self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None,
             num_samples: int = 1) -> Rows:
        x, target = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(target, dtype=torch.bool)
        if not bool(target.any()):
            raise UserError("empty continuation: there is nothing to score")
        if bool(target[0]):
            raise UserError("the first token has no context to be predicted from; prepend BOS/EOS as prefix")
        return Rows(inputs=x[None, :-1], logits_at=target[None, 1:], num_samples=1, data={"x": x, "target": target})

    row_local = True

    def _logp(self, rows: Rows, logits: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        tgt = rows.data["x"][1:][rows.logits_at[0]][start:start + logits.shape[0]].to(logits.device)  # (C,)
        return F.log_softmax(logits, dim=-1), tgt

    def logit_terms(self, rows: Rows, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(C, 1) float64 -log p(x^i | x^{<i}) of logit rows start..start+C, on the logits' device."""
        logp, tgt = self._logp(rows, logits, start)
        return -logp.gather(1, tgt[:, None]).double()

    def cost_from_terms(self, rows: Rows, terms: torch.Tensor) -> torch.Tensor:
        return terms.sum().reshape(1).cpu()

    def cost(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        """(1,) float64: -Σ_{i ∈ T} log p(x^i | x^{<i})."""
        return self.cost_from_terms(rows, self.logit_terms(rows, logits))

    def is_greedy(self, rows: Rows, logits: torch.Tensor) -> bool:
        _, tgt = self._logp(rows, logits)
        return bool((logits.argmax(-1) == tgt).all())
