"""One loader for `score`, `ppl` and the demo: a network with its tokenizer, sub-tokenizer, carry-over and dtype.

    bundle = load_model("prime", Settings.parse({"checkpoint": ..., "tokenizer": ..., "permutation": ...},
                                               family="prime", command="ppl"))
    bundle.network, bundle.tokenizer, bundle.subtokenizer, bundle.carry_over, bundle.identity

What can fail without the weights fails first: the tokenizer and the permutation file are read before the
checkpoint's weights, and checked against the network's vocabulary and b^ℓ once it is built.

`identity` is everything about the model that a number depends on besides the settings of the estimator: the
checkpoint's content hash, the permutation's, the weights read (EMA or raw), the architecture and its config, the
tokenizer, dtype and carry-over. It keys the result caches and goes into every results file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prime_eval.errors import UserError
from prime_eval.settings import DTYPES, Settings


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an accepted dtype name (`prime_eval.settings.DTYPES`: float32/fp32, bfloat16/bf16, ...)."""
    if name not in DTYPES:
        raise UserError(f"dtype={name!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


@dataclass
class ModelBundle:
    """A loaded model and everything that goes with it."""

    family: str
    network: torch.nn.Module
    tokenizer: Any
    subtokenizer: Any  # prime_eval.subtokenizer.SubTokenizer for Prime (ℓ, b, π), else None
    carry_over: bool | None  # Prime: what the estimator applies; None for the other families
    dtype: torch.dtype
    device: torch.device
    name: str
    checkpoint: str | None
    permutation: str | None  # the file (or "identity") given
    tokenizer_spec: str | None
    info: dict = field(default_factory=dict)  # load_network's description ({} for a network built in Python)
    identity: dict = field(default_factory=dict)

    def content_sha256(self) -> str:
        """The checkpoint's content hash, or for a network built in Python the hash of its parameters."""
        sha = self.identity.get("checkpoint_sha256")
        if not sha:
            from prime_eval.cache import state_dict_sha256

            sha = self.identity["checkpoint_sha256"] = state_dict_sha256(self.network)
        return sha

    def describe(self) -> dict:
        """The model record of a results file (ppl JSON `model`; score `config.prime_eval`)."""
        net, info = self.network, self.info
        return {"name": self.name, "family": self.family, "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.identity.get("checkpoint_sha256"), "params": info.get("params"),
                "arch": info.get("arch"), "network": info.get("network"), "config": info.get("config"),
                "format": info.get("format"), "weights": info.get("weights"), "vocab_size": net.vocab_size,
                "ell": getattr(net, "ell", 1), "base": getattr(net, "base", None), "permutation": self.permutation,
                "permutation_sha256": self.identity.get("permutation_sha256"),
                "permutation_source": self.identity.get("permutation_source"), "tokenizer": self.tokenizer_spec, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", "")}


def load_model(family: str, settings: Settings, *, network=None, tokenizer=None,
               device: str | torch.device | None = None) -> ModelBundle:
    """Load `settings.checkpoint` (or take `network`, built in Python) with its tokenizer and Prime sub-tokenizer.

    tokenizer: an already-built tokenizer object (Python use); else `settings.tokenizer`, else the checkpoint itself
      for Hugging Face models. device: default `settings.device`, else cuda:LOCAL_RANK / cuda / cpu.
    """
    from prime_eval import distributed as D
    from prime_eval.checkpoints import check_tokenizer_vocab, checkpoint_sha256, load_network, load_tokenizer

    s = settings
    dev = torch.device(device) if device is not None else D.local_device(D.dist_info(), s.device)
    dtype = torch_dtype(s.dtype)
    ckpt = None if s.checkpoint is None else str(s.checkpoint)
    if network is None and ckpt is None:
        raise UserError(f"`{family}` needs checkpoint=PATH|HUB_ID in --model_args (or model=<network> from Python)")
    # before the weights: the tokenizer and the permutation file the user named
    tok_spec = s.tokenizer
    if tokenizer is None and tok_spec is not None:
        tokenizer = load_tokenizer(tok_spec)
    perm = None
    if family == "prime" and s.permutation not in (None, "identity"):
        from prime_eval.subtokenizer import load_permutation

        perm = load_permutation(s.permutation)
    info: dict = {}
    if network is not None:
        net = network.to(dev).eval().requires_grad_(False)
    else:
        net, info = load_network(ckpt, family=family, format=s.format, config=s.config, ell=s.ell, base=s.base,
                                 carry_over=s.carry_over, use_ema=s.use_ema, device=dev, dtype=dtype)
    if getattr(net, "family", None) != family:
        raise UserError(f"model family {getattr(net, 'family', None)!r} given to the `{family}` adapter")
    hf = info.get("arch") == "hf"
    if tokenizer is None:
        if not hf:
            hint = info.get("tokenizer")
            raise UserError("pass tokenizer=DIR|FILE|HUB_ID in --model_args"
                            + (f" (this checkpoint uses the {hint} tokenizer)" if hint else ""))
        tok_spec = ckpt
        tokenizer = load_tokenizer(ckpt)
    if isinstance(tok_spec, (str, Path)):
        check_tokenizer_vocab(tokenizer, net.vocab_size, exact=not hf, name=str(tok_spec))
    st = carry = perm_source = None
    if family == "prime":
        st, perm_source, carry = _prime_parts(net, info, s, perm)
    identity = {
        "checkpoint_sha256": checkpoint_sha256(ckpt) if ckpt is not None else None,
        "permutation_sha256": checkpoint_sha256(s.permutation) if perm is not None and perm_source == str(s.permutation)
        else None,  # a permutation saved with the weights is part of the checkpoint's own hash
        "weights": info.get("weights"), "arch": info.get("arch"), "network": info.get("network") or
        type(net).__name__, "config": info.get("config"), "dims": info.get("dims"),
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
                      "class": type(tokenizer).__name__, "size": len(tokenizer)},
        "dtype": str(next(iter(net.parameters())).dtype) if any(True for _ in net.parameters()) else None,
        "vocab_size": net.vocab_size, "ell": getattr(net, "ell", None), "base": getattr(net, "base", None),
        "carry_over": carry, "permutation": None if st is None else ("identity" if st.is_identity else "shuffled"),
        "permutation_source": perm_source}
    name = s.name or (Path(ckpt).name or ckpt if ckpt else type(net).__name__)
    return ModelBundle(family=family, network=net, tokenizer=tokenizer, subtokenizer=st, carry_over=carry,
                       dtype=dtype, device=dev, name=str(name), checkpoint=ckpt, permutation=s.permutation,
                       tokenizer_spec=None if tok_spec is None else str(tok_spec), info=info, identity=identity)


def _beside_checkpoint(checkpoint, name: str) -> Path | None:
    """`name` in the checkpoint's folder (or the folder of a checkpoint file), if it is there: a hint, never used
    unasked (a wrong π gives wrong numbers silently)."""
    if not checkpoint or not Path(checkpoint).exists():
        return None
    p = Path(checkpoint)
    cand = (p if p.is_dir() else p.parent) / name
    return cand if cand.is_file() else None


def _prime_parts(net, info: dict, s: Settings, perm) -> tuple:
    """The sub-tokenizer f_ℓ∘π, its permutation's source and the carry-over flag of a Prime network.

    π: the permutation saved with the weights (Megatron `subtokenizer.perm`) when there is one — a given file must then
    equal it — else the file given (read before the weights), else the identity (an error for a checkpoint trained on
    shuffled ids). Carry-over: the setting, else the checkpoint's config, else the network's own flag."""
    from prime_eval.subtokenizer import SubTokenizer, check_permutation, resolve_permutation

    if (s.ell and s.ell != net.ell) or (s.base and s.base != net.base):
        raise UserError(f"ell={s.ell}, base={s.base} contradict the network (ℓ={net.ell}, b={net.base})")
    saved = getattr(net, "saved_perm", None)
    if saved is not None:
        perm, source = resolve_permutation(s.permutation, net.base ** net.ell, saved=saved)
    else:
        if s.permutation is None and info.get("needs_permutation"):
            name = info.get("permutation")
            beside = _beside_checkpoint(s.checkpoint, name) if name else None
            raise UserError(f"this checkpoint was trained on shuffled ids: pass permutation=FILE "
                            f"({f'{beside} is next to the checkpoint' if beside else name or 'perm_<b^ℓ>.pt'}"
                            f"{'' if beside else ' from the release'}), or permutation=identity to score without one")
        if perm is not None:
            check_permutation(perm, net.base ** net.ell, source=f"permutation file {s.permutation}")
        source = "identity" if perm is None else str(s.permutation)
    st = SubTokenizer(net.vocab_size, ell=net.ell, base=net.base, perm=perm)
    carry = s.carry_over
    if carry is None:  # the checkpoint's config (v1 PerceiverDIT), else the network's own flag
        carry = info.get("carry_over") if info.get("carry_over") is not None else getattr(net, "carry_over", False)
    return st, source, bool(carry)
