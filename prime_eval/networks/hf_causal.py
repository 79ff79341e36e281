"""Any Hugging Face causal LM (`AutoModelForCausalLM`, a local directory or a hub id) behind the network contract, as
family "arm", so public ARM baselines sit in the same tables as the diffusion models.

The wrapped model keeps its own names (`model.*`), so `state_dict()` is the HF one. Logits are returned over the first
`vocab_size` classes (default: the model config's `vocab_size`; pass the tokenizer's size to drop padded rows).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn


class HFCausalLM(nn.Module):
    family = "arm"
    causal = True

    def __init__(self, model: nn.Module, *, vocab_size: int | None = None):
        super().__init__()
        self.model = model
        cfg = model.config
        model_vocab = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
        self.vocab_size = int(vocab_size) if vocab_size is not None else model_vocab
        if self.vocab_size > model_vocab:
            raise ValueError(f"vocab_size={self.vocab_size} exceeds the model's {model_vocab} output classes")
        self.max_length = int(next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "n_ctx",
                                                               "max_sequence_length", "seq_length")
                                    if getattr(cfg, k, None)), 2048))
        self.ell, self.base, self.mask_id = 1, None, None
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                        vocab_size: int | None = None, **kwargs) -> "HFCausalLM":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
        model.to(device).eval().requires_grad_(False)
        return cls(model, vocab_size=vocab_size)

    def forward(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, L) -> logits (B, L, V) or (N, V) at the True entries of `logits_at` (B, L), row-major.

        attention_mask (B, L) bool, True = real token. Padding is on the right and attention is causal, so no real
        position ever attends to padding: the mask is not passed on (as lm-eval's `hf` does), which keeps the fast
        causal attention kernel.
        """
        kwargs = {}
        if logits_at is not None and self._has_logits_to_keep:
            cols = logits_at.any(dim=0).nonzero().squeeze(1).to(idx.device)  # (K,) positions needed in some row
            kwargs["logits_to_keep"] = cols
            logits = self.model(input_ids=idx, use_cache=False, **kwargs).logits  # (B, K, V')
            sel = logits_at[:, cols.to(logits_at.device)].to(logits.device)  # (B, K)
            return logits[sel][:, : self.vocab_size].float()  # (N, V)
        logits = self.model(input_ids=idx, use_cache=False, **kwargs).logits[..., : self.vocab_size].float()
        if logits_at is not None:
            logits = logits[logits_at.to(logits.device)]
        return logits
