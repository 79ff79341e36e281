"""lm-eval model `prime`: MDM-Prime models over sub-tokens y = f_ℓ(π(x)) (v2 lit_gpt TransEncoder, v2 Megatron
MaskedDiffModel, v1 MDLM DiT).

    lm_eval --model prime --model_args checkpoint=mdm-prime-v2.pth,tokenizer=...,permutation=perm_32768.pt

Model args: `permutation` (upstream perm file, or `identity`; required when the checkpoint needs one and does not
carry one: a permutation saved with the weights is used, and a given file must equal it), `ell` / `base`
(where shapes are ambiguous), `carry_over` (v1; default from the checkpoint). Estimators: `mc` (default, valid bound),
`exact_count`, `iw` (importance-weighted any-order bound; `orders=K`, `proposal=uniform|pl`, `tau`), `legacy_joint` (the published score; with `cfg`, `temperature`, `chunk`, `legacy_scope`; not a bound).
`is_greedy`: greedy confidence-ordered unmasking of whole tokens (`prime_eval.estimators.greedy`).
"""
from __future__ import annotations

from lm_eval.api.registry import register_model

from model_adapters.base import DEFAULT_SCORE_ESTIMATOR, PrimeEvalLM, _bool
from prime_eval.errors import UserError
from prime_eval.estimators import get_estimator
from prime_eval.estimators.greedy import greedy_unmask
from prime_eval.subtokenizer import SubTokenizer, resolve_permutation


@register_model("prime")
class PrimeLM(PrimeEvalLM):
    family = "prime"
    OPTIONS = ("permutation", "ell", "base", "carry_over", "eps", "T", "cfg", "temperature", "chunk", "legacy_scope",
               "orders", "proposal", "tau")

    def _load_options(self, options: dict) -> dict:
        co = options.get("carry_over")
        return {"ell": options.get("ell"), "base": options.get("base"),
                "carry_over": None if co is None else _bool(co, "carry_over")}

    def _make_estimator(self, name, options: dict):
        opts = self._iw_options(name, options)
        perm_file, ell, base = opts.pop("permutation", None), opts.pop("ell", None), opts.pop("base", None)
        net = self.net
        if (ell and int(ell) != net.ell) or (base and int(base) != net.base):
            raise UserError(f"ell={ell}, base={base} contradict the network (ℓ={net.ell}, b={net.base})")
        perm, self.permutation_source = resolve_permutation(
            perm_file, net.base ** net.ell, saved=getattr(net, "saved_perm", None),
            required=bool(self.info.get("needs_permutation")), hint=self.info.get("permutation"))
        st = SubTokenizer(net.vocab_size, ell=net.ell, base=net.base, perm=perm)
        co = opts.pop("carry_over", None)
        co = _bool(co, "carry_over") if co is not None else bool(self.info.get("carry_over") or False)
        self.subtokenizer, self.permutation_file = st, perm_file
        return get_estimator("prime", name or DEFAULT_SCORE_ESTIMATOR, subtokenizer=st, carry_over=co, **opts)

    def _greedy(self, items: list[dict]) -> None:
        ok, rows = greedy_unmask(self.net, [(it["x"], it["target"]) for it in items], mask_id=self.net.mask_id,
                                 subtokenizer=self.subtokenizer, rows_per_pass=self.rows_per_pass)
        for it, g, r in zip(items, ok, rows):
            it["is_greedy"], it["greedy_rows"] = g, r

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["prime_eval"]["permutation_file"] = None if self.permutation_file is None else str(self.permutation_file)
        info["prime_eval"]["permutation_source"] = self.permutation_source  # checkpoint | the file | identity
        return info
