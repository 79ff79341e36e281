"""Any Hugging Face causal LM (`AutoModelForCausalLM`, a local directory or a hub id) behind the network contract, as
family "arm", so public ARM baselines sit in the same tables as the diffusion models.

The wrapped model keeps its own names (`model.*`), so `state_dict()` is the HF one. Logits are returned over the first
`vocab_size` classes (default: the model config's `vocab_size`; pass the tokenizer's size to drop padded rows).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from prime_eval.networks.kv_cache import KVCache, layout


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
        self._kv_cache: bool | None = None  # `kv_cache`, decided on first use
        params = inspect.signature(model.forward).parameters  # transformers 5 renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

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

    @property
    def kv_cache(self) -> bool:
        """Whether the model keeps its keys / values in a plain `DynamicCache` (every decoder-only transformer
        without sliding windows or recurrent state); others run without a cache (`forward`)."""
        if self._kv_cache is None:
            try:
                from transformers import DynamicCache
                from transformers.cache_utils import DynamicLayer

                probe = DynamicCache(config=self.model.config)
                self._kv_cache = all(type(layer) is DynamicLayer for layer in probe.layers) and bool(
                    getattr(self.model, "_supports_cache_class", True))
            except Exception:  # noqa: BLE001 — any model whose cache we cannot build runs uncached
                self._kv_cache = False
        return self._kv_cache

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache | None = None, *, valid: torch.Tensor | None = None,
                       logits_at: torch.Tensor | None = None, explicit=None) -> tuple[torch.Tensor, KVCache]:
        """New tokens idx (B, L) after the cached ones -> (logits as `forward`, the extended cache), through the
        model's `past_key_values` (a `DynamicCache` rebuilt from our per-layer tensors), `attention_mask` = the
        slots' validity and `position_ids` = the tokens' positions (`prime_eval.networks.kv_cache`). explicit:
        (positions, mask) of a pass without a cache, given to the model as a custom 4D additive mask."""
        from transformers import DynamicCache

        valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(idx.device)
        pos, mask, all_valid, length = layout(cache, valid, self.max_length, explicit)
        past = DynamicCache(config=self.model.config) if cache is None else DynamicCache(
            list(zip(cache.keys, cache.values)), config=self.model.config)
        attention = all_valid.long()
        if explicit is not None:
            dtype = next(self.model.parameters()).dtype
            attention = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min)  # (B, 1, L, L) additive: what eager and sdpa attention both take
        kwargs = {}
        if logits_at is not None and self._has_logits_to_keep:
            cols = logits_at.any(dim=0).nonzero().squeeze(1).to(idx.device)  # (K,) positions needed in some row
            kwargs["logits_to_keep"] = cols
        kwargs[self._cache_arg] = past
        out = self.model(input_ids=idx, attention_mask=attention, position_ids=pos, use_cache=True, **kwargs)
        logits = out.logits
        if logits_at is not None and self._has_logits_to_keep:
            logits = logits[logits_at[:, kwargs["logits_to_keep"].to(logits_at.device)].to(logits.device)]
        elif logits_at is not None:
            logits = logits[logits_at.to(logits.device)]
        layers = (out.get("cache") or out.get("past_key_values")).layers
        return logits[..., : self.vocab_size].float(), KVCache([layer.keys for layer in layers],
                                                               [layer.values for layer in layers], all_valid, length)
