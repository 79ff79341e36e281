"""Any Hugging Face causal LM (`AutoModelForCausalLM`, a local directory or a hub id) behind the network contract, as
family "arm", so public ARM baselines sit in the same tables as the diffusion models.

The wrapped model keeps its own names (`model.*`), so `state_dict()` is the HF one. `hidden` is the base model's last
hidden state, `head` its output embeddings (checked once against the model's own logits). Logits are returned over the
first `vocab_size` classes (default: the model config's `vocab_size`; pass the tokenizer's size to drop padded rows).

Packed passes (`hidden_cached(..., explicit=(positions, Parts))`, scoring's shared contexts): the model runs with the
attention function `prime_eval_parts` (registered in transformers' `AttentionInterface`; `kv_cache.part_attention`),
which computes each part of the pass on its own. `packed_passes` says whether the model can: its attention goes
through that interface (transformers' own test, `_can_set_attn_implementation`), it keeps a plain cache (no sliding
window, no attention sinks or soft-capping), and a probe pass equals the model's own logits.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from prime_eval.networks.contract import HiddenHead, at_positions
from prime_eval.networks.kv_cache import KVCache, Parts, layout, part_attention

PARTS_ATTENTION = "prime_eval_parts"  # transformers AttentionInterface name of `_parts_attention`


class HFCausalLM(HiddenHead, nn.Module):
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
        self._kv_cache: bool | None = None  # `kv_cache`, decided on first use
        self._halves_checked = False  # `_check_halves`, on first use
        self._packed: bool | None = None  # `packed_passes`, decided on first use
        params = inspect.signature(model.base_model.forward).parameters  # transformers 5: past_key_values -> cache
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                        vocab_size: int | None = None, **kwargs) -> "HFCausalLM":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
        model.to(device).eval().requires_grad_(False)
        return cls(model, vocab_size=vocab_size)

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, L) -> the base model's last hidden states (final norm applied) (B, L, d), or (N, d) at the True
        entries of `at` (B, L), row-major.

        attention_mask (B, L) bool, True = real token. Padding is on the right and attention is causal, so no real
        position ever attends to padding: the mask is not passed on (as lm-eval's `hf` does), which keeps the fast
        causal attention kernel.
        """
        self._check_halves(idx.device)
        h = self.model.base_model(input_ids=idx, use_cache=False).last_hidden_state  # (B, L, d)
        return at_positions(h, at)

    def head(self, h: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d) -> fp32 logits (..., V): the model's output embeddings over the first V classes, then what its
        causal-LM class applies after them (`final_logit_softcapping`, `logit_scale`, `logits_scaling`)."""
        out = self.model.get_output_embeddings()
        bias = getattr(out, "bias", None)
        logits = F.linear(h, out.weight[: self.vocab_size], None if bias is None else bias[: self.vocab_size])
        cfg = self.model.config
        if getattr(cfg, "logit_scale", None) is not None:  # Cohere
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None) is not None:  # Granite
            logits = logits / cfg.logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2 / 3
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    @torch.no_grad()
    def _check_halves(self, device) -> None:
        """Once: head(hidden(x)) must reproduce the model's own logits (a model that post-processes its logits in a
        way `head` does not know would otherwise be scored silently wrong)."""
        if self._halves_checked:
            return
        x = torch.arange(min(4, self.vocab_size), device=device)[None]  # (1, 4)
        ref = self.model(input_ids=x, use_cache=False).logits[..., : self.vocab_size].float()
        got = self.head(self.model.base_model(input_ids=x, use_cache=False).last_hidden_state)
        if not torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max())):
            raise ValueError(f"{type(self.model).__name__}: its logits are not its output layer applied to its last "
                             "hidden states (some post-processing prime-eval does not know); it cannot be scored")
        self._halves_checked = True

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
    def hidden_cached(self, idx: torch.Tensor, cache: KVCache | None = None, *, valid: torch.Tensor | None = None,
                      at: torch.Tensor | None = None, explicit=None,
                      keep_cache: bool = True) -> tuple[torch.Tensor, KVCache | None]:
        """New tokens idx (B, L) after the cached ones -> (hidden states as `hidden`, the extended cache or None
        without `keep_cache`), through the base model's cache (a `DynamicCache` rebuilt from our per-layer tensors),
        `attention_mask` = the slots' validity and `position_ids` = the tokens' positions
        (`prime_eval.networks.kv_cache`). explicit: (positions (1, M), `Parts`) of a packed pass without a cache
        (`packed_passes`), with keep_cache=False."""
        from transformers import DynamicCache

        self._check_halves(idx.device)
        valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(idx.device)
        pos, mask, all_valid, length = layout(cache, valid, self.max_length, explicit, keep_cache)
        if isinstance(mask, Parts):
            if not self.packed_passes:
                raise ValueError(f"{type(self.model).__name__} cannot run packed passes (`packed_passes`)")
            with _attention(self.model, PARTS_ATTENTION):
                out = self.model.base_model(input_ids=idx, position_ids=pos, use_cache=False, prime_eval_parts=mask)
            return at_positions(out.last_hidden_state, at), None
        past = DynamicCache(config=self.model.config) if cache is None else DynamicCache(
            list(zip(cache.keys, cache.values)), config=self.model.config)
        out = self.model.base_model(input_ids=idx, attention_mask=all_valid.long(), position_ids=pos, use_cache=True,
                                    **{self._cache_arg: past})
        h = at_positions(out.last_hidden_state, at)
        if not keep_cache:
            return h, None
        layers = (out.get("cache") or out.get("past_key_values")).layers
        return h, KVCache([layer.keys for layer in layers], [layer.values for layer in layers], all_valid, length)

    @property
    def packed_passes(self) -> bool:
        """Whether the model can run packed passes (module docstring); decided once, by a probe pass of two parts
        (a context, and a continuation over it) against the model's own logits of the whole sequence."""
        if self._packed is None:
            self._packed = False
            if self.kv_cache and type(self.model)._can_set_attn_implementation():
                _register_parts_attention()
                dev = next(self.model.parameters()).device
                x = torch.arange(1, min(7, self.vocab_size), device=dev)[None]  # (1, n ≤ 6)
                n = x.shape[1]
                c = n // 2
                parts = Parts(((0, c, 0, 0), (c, n - c, 0, c)))
                with torch.no_grad():
                    ref = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state
                    try:
                        with _attention(self.model, PARTS_ATTENTION):
                            got = self.model.base_model(input_ids=x, position_ids=torch.arange(n, device=dev)[None],
                                                        use_cache=False, prime_eval_parts=parts).last_hidden_state
                    except _NotParts:
                        got = None
                self._packed = got is not None and torch.allclose(got, ref, rtol=1e-3,
                                                                  atol=1e-3 * float(ref.abs().max()))
        return self._packed


class _NotParts(Exception):
    """An attention call `_parts_attention` cannot compute as the model means it."""


def _parts_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function (query (1, H, M, hs), key / value (1, g, M, hs)) -> ((1, M, H, hs), None):
    each part of `kwargs["prime_eval_parts"]` on its own (`kv_cache.part_attention`)."""
    parts = kwargs.get("prime_eval_parts")
    if parts is None or attention_mask is not None or any(
            kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias")):
        raise _NotParts(f"{type(module).__name__}: an attention this function does not compute")
    return part_attention(query, key, value, parts, scaling).transpose(1, 2).contiguous(), None


def _register_parts_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PARTS_ATTENTION, _parts_attention)


class _attention:
    """Within the block, the model's configs (its own and its base model's) name `implementation` as their attention
    function; restored after. No mask function is registered under that name, so transformers builds no mask."""

    def __init__(self, model, implementation: str):
        self.configs = list({id(c): c for c in (model.config, model.base_model.config)}.values())
        self.implementation = implementation

    def __enter__(self):
        self.saved = [c._attn_implementation_internal for c in self.configs]
        for c in self.configs:
            c._attn_implementation_internal = self.implementation

    def __exit__(self, *exc):
        for c, saved in zip(self.configs, self.saved):
            c._attn_implementation_internal = saved
