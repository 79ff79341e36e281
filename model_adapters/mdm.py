"""lm-eval model `mdm`: masked diffusion models with ℓ = 1 (SMDM lit_gpt TransEncoder, MDLM DiT).

    lm_eval --model mdm --model_args checkpoint=mdm.safetensors,tokenizer=...,estimator=mc,samples=128

Estimators (`estimator=`): `sqrt_count` (default for scoring: LLaDA's exact count, importance-sampled), `exact_count`
(LLaDA), `mc` (stratified t, independent masking, weight 1/t), `levels`, `chain_rule` (deterministic left-to-right; not the ELBO), `iw` (importance-weighted any-order
bound, `orders=K`, `proposal=uniform|pl`, `tau`). Options: `eps`, `T`, `cfg` (cfg > 0 is not a likelihood: flagged
`is_bound: false`). `is_greedy`: greedy confidence-ordered unmasking (`prime_eval.estimators.greedy`).
`generate_until`: LLaDA's semi-autoregressive low-confidence remasking or MDLM's ancestral steps
(`prime_eval.generation.mdm`; `steps`, `gen_length`, `block_length`, `remasking`, `cfg`), stop strings applied to the
decoded answer as lm-eval does (`model_adapters.generate_until`).
Every model argument: `prime-eval score --help` (`prime_eval.settings`).
"""
from __future__ import annotations

from lm_eval.api.registry import register_model

from model_adapters.base import PrimeEvalLM
from prime_eval.estimators.greedy import greedy_unmask
from prime_eval.generation.mdm import generate_mdm


@register_model("mdm")
class MDMLM(PrimeEvalLM):
    family = "mdm"

    def _family_options(self) -> dict:
        return {"mask_id": self.net.mask_id}

    def _greedy(self, items: list[dict]) -> None:
        ok, rows = greedy_unmask(self.net, [(it["x"], it["target"]) for it in items], mask_id=self.net.mask_id,
                                 rows_per_pass=self.rows_per_pass)
        for it, g, r in zip(items, ok, rows):
            it["is_greedy"], it["greedy_rows"] = g, r

    def _generate(self, items: list, on_pass) -> list:
        return generate_mdm(self.net, [it.request for it in items], mask_id=self.net.mask_id,
                            rows_per_pass=self.rows_per_pass, pack=self.settings.pack, on_pass=on_pass,
                            **self.settings.generation_options("mdm"))
