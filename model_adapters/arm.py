"""lm-eval model `arm`: autoregressive models (lit_gpt GPT, MDLM AR, any Hugging Face causal LM).

    lm_eval --model arm --model_args checkpoint=ar.safetensors,tokenizer=tokenizers/llama2/tokenizer.model ...

Log-likelihood: exact teacher forcing, summed over the continuation; `is_greedy`: every continuation token is the
argmax of its conditional (lm-eval's `hf` convention). `generate_until`: greedy decoding through the network.
Every model argument: `prime-eval score --help` (`prime_eval.settings`).
"""
from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from tqdm import tqdm

from model_adapters.base import PrimeEvalLM
from prime_eval.errors import UserError


@register_model("arm")
class ARMLM(PrimeEvalLM):
    family = "arm"

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, one request at a time, until a stop string, EOS or `max_gen_toks` new tokens."""
        out = []
        for req in tqdm(requests, desc="arm generate_until", disable=disable_tqdm or self.rank != 0):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0.0:
                raise UserError("arm generate_until decodes greedily only; drop do_sample / temperature")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            until = until + [eos_text] if eos_text not in until else until
            max_gen = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_gen):] or [self.prefix_token_id]
            out.append(self._decode_greedy(ids, max_gen, until))
        return out

    @torch.no_grad()
    def _decode_greedy(self, ids: list[int], max_gen: int, until: list[str]) -> str:
        seq = torch.tensor([ids], device=self.device)  # (1, L)
        new: list[int] = []
        for _ in range(max_gen):
            window = seq[:, -self.max_length:]
            at = torch.zeros_like(window, dtype=torch.bool)
            at[0, -1] = True
            nxt = int(self.net(window, logits_at=at).argmax(-1)[0])  # logits (1, V) at the last position
            if nxt == self.eot_token_id:
                break
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]], device=self.device)], dim=1)
            text = self.tok_decode(new)
            if any(u in text for u in until):
                break
        text = self.tok_decode(new)
        for u in until:
            text = text.split(u)[0] if u else text
        return text
