"""lm-eval model `prime`: MDM-Prime models over sub-tokens y = f_ℓ(π(x)) (v2 lit_gpt TransEncoder, v1 MDLM DiT).

    lm_eval --model prime --model_args checkpoint=mdm-prime-v2.pth,tokenizer=...,permutation=perm_32768.pt

Model args: `permutation` (upstream perm file, or `identity`; required when the checkpoint needs one and does not
carry one: a permutation saved with the weights is used, and a given file must equal it), `ell` / `base`
(where shapes are ambiguous), `carry_over` (v1; default from the checkpoint); the loader (`prime_eval.loading`) builds
the sub-tokenizer from them. Estimators: `sqrt_count` (default for scoring), `exact_count`, `mc` (valid bound),
`levels`, `iw`
(importance-weighted any-order bound; `orders=K`, `proposal=uniform|pl`, `tau`), `legacy_joint` (the published
score; with `cfg`, `temperature`, `chunk`, `legacy_scope`; not a bound).
`is_greedy`: greedy confidence-ordered unmasking of whole tokens (`prime_eval.estimators.greedy`).
`generate_until`: partial masking over sub-tokens, each token drawn among those consistent with its visible digits
(never an invalid code; `prime_eval.generation.prime`; `steps`, `gen_length`, `block_length`, `chunk_point`).
Every model argument: `prime-eval score --help` (`prime_eval.settings`).
"""
from __future__ import annotations

from lm_eval.api.registry import register_model

from model_adapters.base import PrimeEvalLM
from prime_eval.estimators.greedy import greedy_unmask
from prime_eval.generation.prime import generate_prime


@register_model("prime")
class PrimeLM(PrimeEvalLM):
    family = "prime"

    @property
    def subtokenizer(self):
        return self.bundle.subtokenizer

    def _family_options(self) -> dict:
        return {"subtokenizer": self.bundle.subtokenizer, "carry_over": self.bundle.carry_over}

    def _greedy(self, items: list[dict]) -> None:
        ok, rows = greedy_unmask(self.net, [(it["x"], it["target"]) for it in items], mask_id=self.net.mask_id,
                                 subtokenizer=self.subtokenizer, rows_per_pass=self.rows_per_pass)
        for it, g, r in zip(items, ok, rows):
            it["is_greedy"], it["greedy_rows"] = g, r

    def _generate(self, items: list, on_pass) -> list:
        return generate_prime(self.net, [it.request for it in items], subtokenizer=self.subtokenizer,
                              rows_per_pass=self.rows_per_pass, pack=self.settings.pack, on_pass=on_pass,
                              **self.settings.generation_options("prime"))

    def generation_info(self) -> dict:
        return {**super().generation_info(), "carry_over": self.bundle.carry_over,
                "consistent_tokens_only": True}
