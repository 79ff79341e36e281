"""Build and strictly load the network a checkpoint holds (`load_network`), or describe it (`inspect_checkpoint`).

The network is built on the meta device, its expected keys and shapes are checked against the file (a mismatch is a
UserError listing missing / unexpected / mis-shaped keys, with hints at the likely cause), and tensors are adopted one
at a time with `load_state_dict(strict=True, assign=True)`: no second copy.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, is_dataclass

import torch

from prime_eval.checkpoints.containers import Source, read
from prime_eval.checkpoints.detect import detect
from prime_eval.checkpoints.spec import Spec, describe
from prime_eval.checkpoints.tokenizers import TOKENIZER_HINTS
from prime_eval.errors import UserError

ARCH_ALIASES = {
    "lit_gpt": "lit_gpt", "litgpt": "lit_gpt", "smdm": "lit_gpt", "prime-v2": "lit_gpt", "slimpajama": "lit_gpt",
    "mdlm": "mdlm", "dit": "mdlm", "mdm-prime-v1": "mdlm", "prime-v1": "mdlm", "owt": "mdlm",
    "hf": "hf", "huggingface": "hf", "transformers": "hf",
    "megatron": "megatron", "mcore": "megatron", "c4": "megatron",
}
CONTAINER_ALIASES = {"torch": "torch", "pth": "torch", "pt": "torch", "safetensors": "safetensors",
                     "lightning": "lightning", "ckpt": "lightning", "hf-dir": "hf-dir", "hf-hub": "hf-hub",
                     "torch_dist": "torch_dist", "megatron-torch": "megatron-torch"}


def build(spec: Spec) -> torch.nn.Module:
    from prime_eval.networks import lit_gpt, mdlm_dit

    if spec.arch == "megatron":
        from prime_eval.networks.megatron import NETWORKS

        return NETWORKS[spec.network](spec.config)
    if spec.network == "GPT":
        return lit_gpt.GPT(spec.config)
    if spec.network == "TransEncoder":
        return lit_gpt.TransEncoder(spec.config, ell=spec.ell, base=spec.base)
    if spec.network == "DIT":
        return mdlm_dit.DIT(spec.config)
    if spec.network == "AR":
        return mdlm_dit.AR(spec.config)
    if spec.network == "PerceiverDIT":
        return mdlm_dit.PerceiverDIT(spec.config, ell=spec.ell, base=spec.base, carry_over=spec.carry_over)
    raise AssertionError(spec.network)


def _hints(spec: Spec, missing: list, unexpected: list, misshaped: list) -> list[str]:
    """The likely cause of a lit_gpt mismatch: the head count (q/k/v rows) or the tied output layer."""
    out = []
    if spec.arch != "lit_gpt":
        return out
    cfg = spec.config
    qkv = [(k, g) for k, _, g in misshaped if k.endswith("attn.attn.weight")]
    if qkv:
        from prime_eval.networks.lit_gpt import query_groups_from_qkv_rows

        rows = qkv[0][1][0]
        g = query_groups_from_qkv_rows(rows, cfg.n_embd, cfg.n_head)
        fit = (f"with n_head={cfg.n_head} the file's {rows} rows mean n_query_groups={g}, not {cfg.n_query_groups}"
               if g else f"no n_query_groups fits {rows} rows with n_head={cfg.n_head}: n_head is probably wrong")
        out.append(f"  hint: attn.attn.weight has (n_head + 2·n_query_groups)·head_size rows; {fit}")
    if "lm_head.weight" in missing:
        out.append("  hint: the file has no lm_head.weight: a tied output layer (tie_embeddings=true, ARM only)")
    if "lm_head.weight" in unexpected:
        out.append("  hint: the file has its own lm_head.weight: drop tie_embeddings=true")
    return out


def check_keys(net: torch.nn.Module, src: Source, spec: Spec, user_opts: dict) -> None:
    """UserError unless the file's keys and shapes are exactly the network's (after prefix normalisation)."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = src.shapes
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = sorted((k, expected[k], got[k]) for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or misshaped):
        return

    def lst(items, n=12):
        items = [str(i) for i in items]
        return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")

    lines = [f"{src.path} does not fit {describe(spec)} (strict load):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {lst(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {lst(unexpected)}")
    if misshaped:
        lines.append(f"  mis-shaped keys ({len(misshaped)}): "
                     + lst(f"{k} expected {tuple(e)} got {tuple(g)}" for k, e, g in misshaped))
    lines += _hints(spec, missing, unexpected, misshaped)
    if any(user_opts.values()):
        try:
            auto = detect(src)
            lines.append(f"  without your options ({', '.join(f'{k}={v}' for k, v in user_opts.items() if v)}) "
                         f"the file looks like: {describe(auto)}")
        except UserError as e:
            lines.append(f"  (automatic detection also fails: {e})")
    lines.append("  Check the family (--model / --family) and config / ell / base, or that the file comes from one of "
                 "the supported code bases (docs/checkpoints.md).")
    raise UserError("\n".join(lines))


def _param_count(src: Source) -> int:
    return sum(math.prod(sh) for k, sh in src.shapes.items() if not k.endswith("inv_freq"))


def _hf_param_count(src: Source) -> int | None:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(src.hf_id)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001
        return None


def describe_checkpoint(src: Source, spec: Spec) -> dict:
    """The `info` dict of `inspect_checkpoint` / `load_network` (docs/checkpoints.md lists the fields)."""
    cfg = spec.config
    info = {
        "path": src.path, "format": src.format, "arch": spec.arch, "network": spec.network, "family": spec.family,
        "config": spec.config_name,
        "dims": {k: v for k, v in asdict(cfg).items() if k != "name"} if is_dataclass(cfg) else {},
        "params": _param_count(src) if src.shapes else None,
        "vocab_size": spec.vocab_size,
        "mask_id": None, "ell": spec.ell, "base": spec.base,
        "needs_permutation": spec.arch == "lit_gpt" and spec.family == "prime",
        "permutation": spec.extra.get("permutation"),
        "carry_over": spec.carry_over if spec.network == "PerceiverDIT" else None,
        "has_ema": src.ema is not None, "weights": None,
        "dtype": sorted(set(src.dtypes.values())) if src.dtypes else None,
        "key_prefix": src.prefix or None, "ignored_keys": len(src.ignored),
        "tokenizer": TOKENIZER_HINTS.get(spec.vocab_size) if spec.arch != "hf" else (src.hf_id or src.path),
        "max_length": None, "notes": list(spec.notes),
        "inferred": dict(spec.inferred), "assumed": dict(spec.assumed),
    }
    if "ell_candidates" in spec.extra:
        info["ell_candidates"] = spec.extra["ell_candidates"]
    if spec.arch == "lit_gpt":
        emb = sum(math.prod(src.shapes[k]) for k in ("transformer.wte.weight", "lm_head.weight") if k in src.shapes)
        info["non_embedding_params"] = info["params"] - emb
        info["max_length"] = cfg.block_size
        info["mask_id"] = {"mdm": cfg.padded_vocab_size, "prime": spec.base}.get(spec.family)
    elif spec.arch == "mdlm":
        info["max_length"] = cfg.length
        info["mask_id"] = {"mdm": cfg.vocab_size, "prime": spec.base}.get(spec.family)
    elif spec.arch == "megatron":  # sub-tokenizer buffers are not parameters
        info.update(spec.extra["info"], params=sum(math.prod(sh) for k, sh in src.shapes.items()
                                                   if not k.startswith("subtokenizer.")))
    else:
        hp = src.hparams or {}
        info["dims"] = {k: hp[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size", "vocab_size",
                                           "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions")
                        if k in hp}
        info["max_length"] = hp.get("max_position_embeddings") or hp.get("n_positions")
        if info["params"] is None or not src.shapes:
            info["params"] = _hf_param_count(src)
    return info


def _resolve_format(fmt: str | None) -> tuple[str | None, str | None]:
    if fmt in (None, "", "auto"):
        return None, None
    f = fmt.lower()
    if f in ARCH_ALIASES:
        return ARCH_ALIASES[f], None
    if f in CONTAINER_ALIASES:
        return None, CONTAINER_ALIASES[f]
    raise UserError(f"unknown format {fmt!r}; architectures: lit_gpt, mdlm, megatron, hf; containers: "
                    f"{', '.join(sorted(set(CONTAINER_ALIASES)))}")


def parse_config_option(config):
    """CLI strings: a name (`Diff_LLaMA_1028M`, `1028`, `small`) or `k=v;k=v` field overrides."""
    if not (isinstance(config, str) and "=" in config):
        return config

    def value(v: str):
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    out = {}
    for part in re.split(r"[;:]", config):
        if part.strip():
            k, _, v = part.partition("=")
            out[k.strip()] = value(v.strip())
    return out


def _source_and_spec(path, *, family, format, config, ell, base, carry_over) -> tuple[Source, Spec]:
    arch, container = _resolve_format(format)
    src = read(path)
    if container and container != src.format:
        raise UserError(f"format {format!r} given, but {path} is a {src.format} file")
    spec = detect(src, family=family, arch=arch, config=parse_config_option(config), ell=ell, base=base,
                  carry_over=carry_over)
    return src, spec


def inspect_checkpoint(path: str | os.PathLike, *, family: str | None = None, format: str | None = None,
                       config=None, ell: int | None = None, base: int | None = None,
                       carry_over: bool | None = None) -> dict:
    """What `load_network` would build, from shapes and metadata only (tensor data is not read)."""
    src, spec = _source_and_spec(path, family=family, format=format, config=config, ell=ell, base=base,
                                 carry_over=carry_over)
    info = describe_checkpoint(src, spec)
    info["weights"] = "ema" if src.ema is not None else "raw"
    return info


def load_network(path: str | os.PathLike, *, family: str | None = None, format: str | None = None, config=None,
                 ell: int | None = None, base: int | None = None, carry_over: bool | None = None,
                 use_ema: bool = True, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict]:
    """Detect, build and strictly load a network from a released checkpoint. Returns (network in eval mode, info).

    Args:
      path: a `.pth` / `.pt` / `.safetensors` / Lightning `.ckpt` file, a Hugging Face model directory, a hub id, or
        a Megatron checkpoint (iteration directory, its parent, or a legacy `model_optim_rng.pt`).
      family: "arm" | "mdm" | "prime" to check (or, where shapes cannot tell, choose) the family.
      format: architecture ("lit_gpt", "mdlm", "megatron", "hf") or container ("torch", "safetensors", "lightning",
        "torch_dist", "megatron-torch"); auto if None.
      config: a config name (`Diff_LLaMA_1028M`, `1028`, `small`), a dict of config fields (e.g. {"n_head": 4,
        "rope_base": 100000}), "k=v;k=v", or a config instance. Needed only where the checkpoint does not determine
        the config; `info["inferred"]` / `info["assumed"]` say where each field came from.
      ell, base: Prime ℓ and b where the shapes are ambiguous (lit_gpt: 45 rows fit ℓ=15/b=2, ℓ=9/b=4, ℓ=5/b=8).
      carry_over: v1 Prime carry-over; default from the checkpoint's config, else False.
      use_ema: Lightning checkpoints: EMA weights (default, as upstream evaluated) or the raw weights.
      device, dtype: where the network lives; floating weights are cast to `dtype` (buffers stay fp32).
    Raises:
      UserError: unreadable file, unknown layout, or keys/shapes that do not fit (listing them).
    """
    src, spec = _source_and_spec(path, family=family, format=format, config=config, ell=ell, base=base,
                                 carry_over=carry_over)
    info = describe_checkpoint(src, spec)
    if spec.arch == "hf":
        from prime_eval.networks.hf_causal import HFCausalLM

        try:
            net = HFCausalLM.from_pretrained(src.hf_id, dtype=dtype, device=device, vocab_size=spec.vocab_size)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"transformers could not load {src.hf_id!r} as AutoModelForCausalLM: "
                            f"{type(e).__name__}: {str(e)[:400]}") from e
        info.update(weights="raw", params=sum(p.numel() for p in net.parameters()), vocab_size=net.vocab_size,
                    max_length=net.max_length)
        return net, info

    with torch.device("meta"):
        net = build(spec)
    check_keys(net, src, spec, {"family": family, "config": config, "ell": ell, "base": base})
    sd = src.tensors()
    weights = "raw"
    if src.ema is not None and use_ema:
        names = [n for n, _ in net.named_parameters()]  # registration order = upstream backbone.parameters()
        if len(names) != len(src.ema):
            raise UserError(f"{path}: EMA has {len(src.ema)} shadow params, the network {len(names)} parameters; "
                            "pass use_ema=False (CLI: use_ema=false) to load the raw weights")
        for n, t in zip(names, src.ema):
            if tuple(t.shape) != tuple(sd[n].shape):
                raise UserError(f"{path}: EMA shadow param for {n} has shape {tuple(t.shape)}, expected "
                                f"{tuple(sd[n].shape)} (order mismatch); pass use_ema=False to load raw weights")
            sd[n] = t
        weights = "ema"
    elif src.ema is None and src.format == "lightning" and use_ema:
        info["notes"].append("no EMA in the checkpoint; raw weights loaded")
    for k, t in sd.items():
        if t.is_floating_point() and t.dtype != dtype and not k.endswith("inv_freq"):
            sd[k] = t.to(dtype)  # one tensor at a time
    net.load_state_dict(sd, strict=True, assign=True)
    del sd
    net.to(device).eval().requires_grad_(False)
    info["weights"] = weights
    info["mask_id"] = net.mask_id
    return net, info
