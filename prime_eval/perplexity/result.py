"""The perplexity JSON (`"kind": "prime-eval/ppl"`, version 1; docs/perplexity.md) and its atomic writing."""
from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

import numpy as np
import torch

from prime_eval import bound_kind as BK


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("prime-eval", "torch", "transformers", "tokenizers", "datasets", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def tokenizer_info(tokenizer) -> dict:
    return {"name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
            "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "is_fast": bool(getattr(tokenizer, "is_fast", False))}


def protocol_record(p, source_info: dict, tokenizer, est, K: int, deterministic: bool, bos: int, eos: int,
                    batch_size: int) -> dict:
    """The JSON's `protocol`: the source, the tokenizer and every setting a number depends on."""
    arm = est.family == "arm"
    return {
        **source_info,
        "tokenizer": tokenizer_info(tokenizer),
        "L": p.L, "wrap": p.wrap, "bos_id": bos, "eos_id": eos,
        "scored_positions": "L-1 per block (BOS is context)" if arm else "L per block (all positions)",
        "estimator": est.name, "estimator_options": est.config(),
        "num_samples": K, "eps": None if arm else getattr(est, "eps", None),
        "T": None if arm else getattr(est, "T", None),
        "strata": None if deterministic else p.strata,
        "seed": p.seed, "max_tokens": p.max_tokens, "target_se": p.target_se, "min_blocks": p.min_blocks,
        "bootstrap": p.bootstrap, "batch_size": batch_size,
        "bytes_method": "offsets" if getattr(tokenizer, "is_fast", False) else "decoded-token lengths (approximate)",
    }


def model_record(net, est, model: dict | None) -> dict:
    """The JSON's `model`: the caller's record, completed with defaults from the network."""
    m = dict(model or {})
    m.setdefault("name", m.get("checkpoint") or type(net).__name__)
    m.setdefault("family", est.family)
    m.setdefault("checkpoint", None)
    m.setdefault("checkpoint_sha256", None)
    m.setdefault("params", sum(t.numel() for t in net.parameters()))
    return m


def perplexity_json(model: dict, protocol: dict, results: dict, bound_kind: str) -> dict:
    return {"kind": "prime-eval/ppl", "version": 1, "model": model, "protocol": protocol,
            "is_bound": BK.is_bound(bound_kind), "bound_kind": bound_kind,
            "results": results, "versions": package_versions()}


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write atomically (`prime_eval.io.write_json`: a temporary file in the same folder, fsync, os.replace)."""
    from prime_eval.io import write_json as atomic_write_json

    return atomic_write_json(path, result, default=_json_default)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return str(obj)
