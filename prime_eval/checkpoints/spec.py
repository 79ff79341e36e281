"""What the loader will build: the `Spec` a detector derives from a checkpoint's shapes, metadata and options.

A spec names the architecture and network class, the family, the network config, the Prime (ℓ, b), and says where
each config field came from: `inferred` (field -> the evidence: shapes, a config file, a release layout) and `assumed`
(field -> a default nothing in the checkpoint confirms, with how to override it). `prime-eval inspect` shows both.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from prime_eval.errors import UserError

FAMILIES = ("arm", "mdm", "prime")


@dataclass
class Spec:
    arch: str  # lit_gpt | mdlm | megatron | hf
    network: str  # class name
    family: str
    config: object = None  # lit_gpt.Config | DiTConfig | None
    config_name: str | None = None
    ell: int = 1
    base: int | None = None
    carry_over: bool = False
    vocab_size: int | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    inferred: dict[str, str] = field(default_factory=dict)  # config field -> evidence
    assumed: dict[str, str] = field(default_factory=dict)  # config field -> unconfirmed default and how to override


def family_option(family: str) -> str:
    """How the user chose a family, in the words of every command (`score`/`ppl` have --model, `inspect` --family)."""
    return f"family {family!r} (`--model {family}` on score/ppl, `--family {family}` on inspect)"


def layers(shapes: Mapping[str, tuple], pattern: str) -> int:
    """Number of distinct block indices: `pattern` has one group capturing the index."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def merge_config(cls, base_cfg, config):
    """Apply a `config` option (a dict of fields or a config instance; names are handled by the caller)."""
    if config is None:
        return base_cfg
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        check_fields(cls, config)
        return replace(base_cfg, **config)
    raise UserError(f"config must be a name, a dict of fields or a {cls.__name__}, got {type(config).__name__}")


def check_fields(cls, config: Mapping) -> None:
    names = {f.name for f in fields(cls)}
    bad = sorted(set(config) - names)
    if bad:
        raise UserError(f"unknown config field(s) {bad} for {cls.__module__}.{cls.__name__}; known: {sorted(names)}")


def describe(spec: Spec) -> str:
    cfg = spec.config
    dims = (f"{spec.config_name}" if spec.config_name else
            f"d={getattr(cfg, 'n_embd', getattr(cfg, 'hidden_size', '?'))}, "
            f"layers={getattr(cfg, 'n_layer', getattr(cfg, 'n_blocks', getattr(cfg, 'num_layers', '?')))}")
    prime = f", ℓ={spec.ell}, b={spec.base}" if spec.family == "prime" else ""
    return f"{spec.arch} {spec.network} (family {spec.family}{prime}, {dims})"
