"""lm-eval model `arm`: autoregressive models (lit_gpt GPT, MDLM AR, Megatron GPTModel, any Hugging Face causal LM).

    lm_eval --model arm --model_args checkpoint=ar.safetensors,tokenizer=tokenizers/llama2/tokenizer.model ...

Log-likelihood: exact teacher forcing, summed over the continuation; the choices of a document share one run of
their context, in packed passes (`model_adapters.shared_context`); `is_greedy`: every continuation token is the
argmax of its conditional (lm-eval's `hf` convention). `generate_until`: lm-eval `hf`'s contract
(`model_adapters.generate_until`) with cached decoding batched across requests (`prime_eval.generation.arm`).
Every model argument: `prime-eval score --help` (`prime_eval.settings`).
"""
from __future__ import annotations

from lm_eval.api.registry import register_model

from model_adapters import generate_until as G
from model_adapters.base import PrimeEvalLM
from model_adapters.shared_context import forward_rows_shared_context
from prime_eval.generation.arm import generate_arm
from prime_eval.networks.kv_cache import supports_kv_cache, supports_packed_passes


@register_model("arm")
class ARMLM(PrimeEvalLM):
    family = "arm"

    def _forward(self, rows_list: list) -> list:
        """Logits of many requests' rows; each distinct context runs once and its continuations attend to it, in
        packed passes (the same numbers up to float rounding), where the network can run them."""
        if not supports_packed_passes(self.net):
            return super()._forward(rows_list)
        return forward_rows_shared_context(self.net, rows_list, self.rows_per_pass, pack=self.settings.pack)

    def _generate(self, items: list, on_pass) -> list:
        return generate_arm(self.net, [it.request for it in items], rows_per_pass=self.rows_per_pass,
                            pack=self.settings.pack, on_pass=on_pass,
                            should_stop=lambda i, toks: G.stop_string_seen(self, items[i].until, toks))

    def generation_info(self) -> dict:
        return {**super().generation_info(), "kv_cache": supports_kv_cache(self.net), "pack": self.settings.pack}
