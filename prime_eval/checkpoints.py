"""Checkpoint detection and loading: released files as they are, no conversion step.

    net, info = load_network("mdm-prime-v2-3300flops-weight-only.pth")   # lit_gpt TransEncoder, ℓ=15, b=2
    info = inspect_checkpoint("checkpoint.ckpt")                          # shapes only; no tensor data is read

Containers (`info["format"]`):
  * `torch`        torch zip pickle: `{"model": state_dict}` (Prime-v2 `.pth`) or a flat state dict;
  * `safetensors`  flat state dict (SMDM MDM / ARM baselines);
  * `lightning`    Lightning `.ckpt` (MDLM / MDM-Prime v1): `state_dict` with a `backbone.` prefix, EMA weights in
                   `ema.shadow_params` (a list in `backbone.parameters()` order; used by default), hydra config in
                   `hyper_parameters` (unpickled with inert stand-ins for omegaconf / transformers classes);
  * `hf-dir` / `hf-hub`  a transformers model directory or hub id (any `AutoModelForCausalLM`; a directory whose
                   weights carry DiT keys, such as kuleshov-group/mdlm-owt, is loaded as a DiT).
  * `torch_dist` / `megatron-torch`  Megatron-LM checkpoints of the C4 runs (a `torch_dist` iteration directory or its
                   parent, legacy `mp_rank_XX/model_optim_rng.pt`; read by `prime_eval.megatron_files`).

Architectures (`info["arch"]`): `lit_gpt` (`prime_eval.networks.lit_gpt`), `mdlm` (`prime_eval.networks.mdlm_dit`),
`megatron` (`prime_eval.networks.megatron`), `hf` (`prime_eval.networks.hf_causal`). Family, config and (ℓ, b) are
read from tensor shapes where the shapes determine them; the rest comes from options (`family`, `config`, `ell`,
`base`, `carry_over`).

Loading streams: the network is built on the meta device, tensors come from `torch.load(mmap=True)` or safetensors
one at a time, and `load_state_dict(strict=True, assign=True)` adopts them without a second copy. Key, count and
shape mismatches raise `UserError` listing missing / unexpected / mis-shaped keys and what the file looks like.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import tempfile
import types
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch

from prime_eval.errors import UserError

# Key prefixes that wrappers add (Fabric/DDP/compile/Lightning); stripped when every key carries them.
STRIP_PREFIXES = ("_forward_module.", "module.", "_orig_mod.", "backbone.", "model.")
IGNORED_KEY_SUFFIXES = ("._extra_state",)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")

ARCH_ALIASES = {
    "lit_gpt": "lit_gpt", "litgpt": "lit_gpt", "smdm": "lit_gpt", "prime-v2": "lit_gpt", "slimpajama": "lit_gpt",
    "mdlm": "mdlm", "dit": "mdlm", "mdm-prime-v1": "mdlm", "prime-v1": "mdlm", "owt": "mdlm",
    "hf": "hf", "huggingface": "hf", "transformers": "hf",
    "megatron": "megatron", "mcore": "megatron", "c4": "megatron",
}
CONTAINER_ALIASES = {"torch": "torch", "pth": "torch", "pt": "torch", "safetensors": "safetensors",
                     "lightning": "lightning", "ckpt": "lightning", "hf-dir": "hf-dir", "hf-hub": "hf-hub",
                     "torch_dist": "torch_dist", "megatron-torch": "megatron-torch"}
FAMILIES = ("arm", "mdm", "prime")
TOKENIZER_HINTS = {
    32000: "Llama-2 SentencePiece, 32000 (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T)",
    50257: "GPT-2 BPE, 50257 (gpt2)",
}


# ----------------------------------------------------------------------------------------------------------------
# Identity


def checkpoint_sha256(path: str | os.PathLike) -> str | None:
    """Streamed sha256 of a checkpoint file; for a directory, of its sorted (relative name, content) pairs.

    Returns None for something that is not a local path (a hub id).
    """
    p = Path(path)
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file() and ".cache" not in q.parts)
    for q in files:
        if p.is_dir():
            h.update(str(q.relative_to(p)).encode() + b"\0")
        with open(q, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Unpickling Lightning checkpoints without omegaconf / transformers / Lightning


class _Stub:
    """Inert stand-in for a class the checkpoint names but the loader will not import (omegaconf, tokenizers, ...).

    It records constructor arguments, pickled state and container items so that `_plain` can recover a hydra
    config as plain dicts; it never runs code from the checkpoint.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("_list", []).extend(values)

    def __repr__(self):
        return f"<stub {type(self).__qualname__}>"


_BUILTINS_OK = {"set", "frozenset", "list", "dict", "tuple", "slice", "range", "complex", "bytearray", "bytes",
                "int", "float", "str", "bool"}


class _StubUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding and plain-container globals; every other global becomes a `_Stub` subclass."""

    _stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        root = module.split(".")[0]
        allowed = (
            (module == "builtins" and name in _BUILTINS_OK)
            or (module == "collections" and name in {"OrderedDict", "defaultdict", "deque", "Counter"})
            or (module == "_codecs" and name == "encode")
            or (module == "copyreg" and name == "_reconstructor")
            or (module == "torch._utils" and name.startswith("_rebuild"))
            or (module == "torch._tensor" and name.startswith("_rebuild"))
            or (module == "torch.nn.parameter" and name == "Parameter")
            or (module == "torch" and (name in {"Size", "device", "Tensor"} or name.endswith("Storage")
                                       or isinstance(getattr(torch, name, None), torch.dtype)))
            or (root == "numpy" and (name in {"_reconstruct", "scalar", "ndarray", "dtype"} or name.endswith("DType")))
        )
        if allowed:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (_Stub,), {"__module__": "prime_eval.checkpoints._stubbed." + module,
                                                     "__qualname__": f"{module}.{name}"})
        return self._stubs[key]


_stub_pickle = types.ModuleType("prime_eval_stub_pickle")
_stub_pickle.Unpickler = _StubUnpickler
_stub_pickle.load = lambda f, **kw: _StubUnpickler(f, **kw).load()
_stub_pickle.loads = pickle.loads
_stub_pickle.__name__ = "pickle"


def _plain(obj, depth: int = 0):
    """Hydra / omegaconf config (real or stubbed) -> plain dicts, lists and scalars; opaque objects -> None."""
    if depth > 64:
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, _Stub):
        d = obj.__dict__
        st = d.get("_state")
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], dict):  # (state, slotstate)
            st = {**(st[0] or {}), **st[1]}
        if isinstance(st, dict):
            if "_content" in st:
                return _plain(st["_content"], depth + 1)
            if "_val" in st:
                return _plain(st["_val"], depth + 1)
        if "_items" in d:
            return _plain(d["_items"], depth + 1)
        if "_list" in d:
            return _plain(d["_list"], depth + 1)
        return None
    if isinstance(obj, Mapping) or hasattr(obj, "items"):
        try:
            return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
        except Exception:  # noqa: BLE001 - an unresolvable interpolation in a real omegaconf object
            return None
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    return None


def _get(d, *path, default=None):
    for k in path:
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return d


# ----------------------------------------------------------------------------------------------------------------
# Reading a checkpoint: keys, shapes, metadata, and a streamed tensor source


@dataclass
class _Source:
    path: str
    format: str  # torch | safetensors | lightning | hf-dir | hf-hub
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # normalised keys
    dtypes: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    hparams: dict = field(default_factory=dict)  # hydra config (lightning) or config.json (hf)
    ema: list | None = None  # EMA shadow params (lightning)
    tensors: Callable[[], dict[str, torch.Tensor]] | None = None  # raw weights, normalised keys
    ignored: list[str] = field(default_factory=list)
    hf_id: str | None = None  # for hf: what to hand to from_pretrained
    megatron: object = None  # megatron_files.MegatronCheckpoint (Megatron layouts; keys already canonical)


def _normalise(keys: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """original -> normalised key map, the stripped prefix, ignored keys (TE `_extra_state`)."""
    ignored = [k for k in keys if k.endswith(IGNORED_KEY_SUFFIXES)]
    kept = [k for k in keys if not k.endswith(IGNORED_KEY_SUFFIXES)]
    prefix = ""
    changed = True
    while changed and kept:
        changed = False
        for p in STRIP_PREFIXES:
            if all(k.startswith(prefix + p) for k in kept):
                prefix += p
                changed = True
                break
    return {k: k[len(prefix):] for k in kept}, prefix, ignored


def _torch_load(path: str, *, mmap: bool = True):
    """torch.load with mmap (no data read until touched); weights_only first, then the stub unpickler."""
    def _load(**kw):
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, **kw)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # legacy (non-zip) serialization cannot be memory-mapped
                return torch.load(path, map_location="cpu", mmap=False, **kw)
            raise
    try:
        return _load(weights_only=True)
    except pickle.UnpicklingError:
        return _load(weights_only=False, pickle_module=_stub_pickle)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_state_dict(src: _Source, sd: Mapping[str, torch.Tensor]) -> _Source:
    keymap, src.prefix, src.ignored = _normalise(list(sd.keys()))
    src.shapes = {new: tuple(sd[old].shape) for old, new in keymap.items()}
    src.dtypes = {new: str(sd[old].dtype).removeprefix("torch.") for old, new in keymap.items()}
    src.tensors = lambda: {new: sd[old] for old, new in keymap.items()}
    return src


def _read_torch(path: str) -> _Source:
    try:
        obj = _torch_load(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: {e}") from e
    from prime_eval import megatron_files  # a Megatron state dict ({"model": sd, "args": …} or flat): family C

    if (mc := megatron_files.from_object(path, obj)) is not None:
        return _megatron_source(mc)
    if isinstance(obj, Mapping) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):  # Lightning
        src = _from_state_dict(_Source(path, "lightning"), obj["state_dict"])
        src.hparams = _plain(_get(obj, "hyper_parameters", "config")) or {}
        ema = obj.get("ema")
        shadow = _get(ema, "shadow_params") if isinstance(ema, Mapping) else None
        if isinstance(shadow, (list, tuple)) and shadow and all(isinstance(t, torch.Tensor) for t in shadow):
            src.ema = list(shadow)
        return src
    if isinstance(obj, Mapping) and "model" in obj and _is_state_dict(obj["model"]):  # Fabric {"model": sd}
        return _from_state_dict(_Source(path, "torch"), obj["model"])
    if _is_state_dict(obj):
        return _from_state_dict(_Source(path, "torch"), obj)
    top = list(obj.keys())[:12] if isinstance(obj, Mapping) else type(obj).__name__
    raise UserError(f"{path}: no state dict found (top-level entries: {top}). Expected a state dict, "
                    "{'model': state_dict} (lit_gpt .pth) or a Lightning checkpoint with 'state_dict'.")


def _read_safetensors(paths: list[str], src: _Source) -> _Source:
    from safetensors import safe_open

    shapes, dtypes, where = {}, {}, {}
    for p in paths:
        with safe_open(p, framework="pt", device="cpu") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k], dtypes[k], where[k] = tuple(sl.get_shape()), str(sl.get_dtype()).lower(), p
    keymap, src.prefix, src.ignored = _normalise(list(shapes))
    src.shapes = {new: shapes[old] for old, new in keymap.items()}
    src.dtypes = {new: dtypes[old] for old, new in keymap.items()}

    def tensors() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for p in dict.fromkeys(where.values()):
            with safe_open(p, framework="pt", device="cpu") as f:
                for old, new in keymap.items():
                    if where[old] == p:
                        out[new] = f.get_tensor(old)  # one tensor at a time
        return out

    src.tensors = tensors
    return src


def _read_hf_dir(path: str) -> _Source:
    p = Path(path)
    src = _Source(path, "hf-dir", hf_id=path)
    if (p / "config.json").exists():
        src.hparams = json.loads((p / "config.json").read_text())
    shards = sorted(str(q) for q in p.glob("*.safetensors"))
    index = p / "model.safetensors.index.json"
    if index.exists():
        shards = sorted({str(p / v) for v in json.loads(index.read_text())["weight_map"].values()})
    if shards:
        _read_safetensors(shards, src)
    return src


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `org/name` or a legacy single name (`gpt2`)


def _read(path: str | os.PathLike) -> _Source:
    path = str(path)
    p = Path(path)
    from prime_eval import megatron_files  # Megatron torch_dist / legacy directories (family C)

    if (mc := megatron_files.read(p, load=_torch_load)) is not None:
        return _megatron_source(mc)
    if p.is_dir():
        if (p / "config.json").exists():
            return _read_hf_dir(path)
        weights = [q for q in p.iterdir() if q.is_file() and q.name.endswith(WEIGHT_SUFFIXES)]
        if len(weights) == 1:
            return _read(weights[0])
        raise UserError(f"{path} is a directory without config.json and with {len(weights)} weight files; "
                        "pass the checkpoint file itself.")
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(8)
        if p.suffix == ".safetensors" or (len(head) == 8 and int.from_bytes(head, "little") < (1 << 28)
                                          and not head.startswith(b"PK")):
            try:
                return _read_safetensors([path], _Source(path, "safetensors"))
            except Exception as e:  # noqa: BLE001
                if p.suffix == ".safetensors":
                    raise UserError(f"cannot read {path} as safetensors: {e}") from e
        return _read_torch(path)
    if _HUB_ID.match(path) and not path.endswith(WEIGHT_SUFFIXES):
        src = _Source(path, "hf-hub", hf_id=path)
        try:
            from transformers import AutoConfig

            src.hparams = AutoConfig.from_pretrained(path).to_dict()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path!r} is not a local file or directory, and as a Hugging Face hub id it failed: "
                            f"{type(e).__name__}: {str(e)[:300]}. Check the path, or run online / pre-download "
                            "the model (HF_HUB_OFFLINE=1 allows only cached models).") from e
        return src
    raise UserError(f"checkpoint not found: {path}")


# ----------------------------------------------------------------------------------------------------------------
# Detection: which network, which config, from shapes (+ hyper-parameters, + options)


@dataclass
class _Spec:
    arch: str  # lit_gpt | mdlm | hf
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


def _layers(shapes: Mapping[str, tuple], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _guess_arch(src: _Source) -> str | None:
    s = src.shapes
    if "lm_head.weight" in s and "transformer.wte.weight" in s:
        return "lit_gpt"
    if "vocab_embed.embedding" in s and any(k.startswith("blocks.") for k in s):
        return "mdlm"
    if any(k.startswith(("embedding.word_embeddings", "encoder.layers.", "decoder.layers.")) for k in s):
        return "megatron"
    if src.format in ("hf-dir", "hf-hub"):
        return "hf"
    return None


def _prime_candidates(rows: int, vocab: int) -> list[tuple[int, int]]:
    """(ℓ, b) with b = ⌈V^(1/ℓ)⌉ and (b+1)·ℓ = rows (the lit_gpt Prime table size)."""
    out = []
    for ell in range(2, 65):
        b = math.ceil(round(vocab ** (1.0 / ell), 9))
        if (b + 1) * ell == rows:
            out.append((ell, b))
    return sorted(out, key=lambda t: t[1])  # smallest base (the binary release) first


def _merge_config(cls, base_cfg, config):
    """Apply a `config` option (name handled by caller; dict of fields or a config instance) over `base_cfg`."""
    if config is None:
        return base_cfg
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        names = {f.name for f in fields(cls)}
        bad = sorted(set(config) - names)
        if bad:
            raise UserError(f"unknown config field(s) {bad} for {cls.__module__}.{cls.__name__}; "
                            f"known: {sorted(names)}")
        return replace(base_cfg, **config)
    raise UserError(f"config must be a name, a dict of fields or a {cls.__name__}, got {type(config).__name__}")


def _detect_lit_gpt(src: _Source, family, config, ell, base) -> _Spec:
    from prime_eval.networks import lit_gpt

    s = src.shapes
    d = s["transformer.ln_f.weight"][0] if "transformer.ln_f.weight" in s else s["lm_head.weight"][1]
    n_layer = _layers(s, r"transformer\.h\.(\d+)\.")
    inter = s.get("transformer.h.0.mlp.swiglu.w1.weight", (None,))[0]
    v_pad = s["lm_head.weight"][0]
    rows = s["transformer.wte.weight"][0]
    notes: list[str] = []
    if isinstance(config, (str, int)):  # a name: its dims (a wrong name shows up as mis-shaped keys)
        try:
            cfg = lit_gpt.Config.from_name(str(config))
        except KeyError as e:
            raise UserError(str(e.args[0]) + " (or pass a dict of Config fields)") from e
        name, overrides = cfg.name, None
    else:  # dims from shapes; n_head from the matching Diff_LLaMA name or from the options
        name = lit_gpt.find_config(n_layer, d, inter) if inter else None
        overrides = asdict(config) if is_dataclass(config) else dict(config or {})
        if name:
            cfg = lit_gpt.Config.from_name(name)
        elif "n_head" in overrides:
            cfg = lit_gpt.Config(n_layer=n_layer, n_embd=d, n_head=overrides["n_head"], intermediate_size=inter or 4 * d)
        else:
            raise UserError(
                f"lit_gpt checkpoint with n_layer={n_layer}, n_embd={d}, intermediate_size={inter} matches no "
                "Diff_LLaMA config, and n_head cannot be read from shapes; pass config={'n_head': H, ...} "
                "(CLI: --config n_head=H) or a config name.")
    # The vocabulary is lm_head's row count unless the options say otherwise (32000 for every release).
    cfg = replace(cfg, vocab_size=v_pad, padded_vocab_size=v_pad)
    cfg = _merge_config(lit_gpt.Config, cfg, overrides)
    V = cfg.vocab_size
    # Family from the embedding rows: ARM V_pad, MDM V_pad + 1, Prime (b+1)·ℓ.
    shape_family = "arm" if rows == cfg.padded_vocab_size else "mdm" if rows == cfg.padded_vocab_size + 1 else "prime"
    fam = family or shape_family
    if family and family != shape_family:
        raise UserError(f"--family {family} does not fit this lit_gpt file: transformer.wte.weight has {rows} rows "
                        f"and lm_head {cfg.padded_vocab_size} (ARM: equal, MDM: one more, Prime: (b+1)·ℓ); "
                        f"it looks like family {shape_family!r}.")
    spec = _Spec("lit_gpt", "GPT" if fam == "arm" else "TransEncoder", fam, cfg, name, vocab_size=V, notes=notes)
    if fam == "prime":
        if ell and base:
            if (base + 1) * ell != rows:
                raise UserError(f"ell={ell}, base={base} need a ({(base + 1) * ell}, d) sub-token table, the file has "
                                f"{rows} rows; candidates from the shapes: {_prime_candidates(rows, V) or 'none'}")
            spec.ell, spec.base = ell, base
        elif ell or base:
            if ell and rows % ell == 0:
                spec.ell, spec.base = ell, rows // ell - 1
            elif base and rows % (base + 1) == 0:
                spec.ell, spec.base = rows // (base + 1), base
            else:
                raise UserError(f"ell={ell} base={base} do not divide the {rows}-row sub-token table")
        else:
            cands = _prime_candidates(rows, V)
            if not cands:
                raise UserError(f"transformer.wte.weight has {rows} rows: not ARM ({cfg.padded_vocab_size}), MDM "
                                f"({cfg.padded_vocab_size + 1}) nor a Prime table (b+1)·ℓ with b = ⌈{V}^(1/ℓ)⌉; "
                                "pass ell and base.")
            spec.ell, spec.base = cands[0]
            spec.extra["ell_candidates"] = [list(c) for c in cands]
            if len(cands) > 1:
                notes.append(f"(ℓ, b) not unique from shapes: {cands} all give {rows} rows; assumed ℓ={spec.ell}, "
                             f"b={spec.base} (the released model); pass ell/base to override")
        if spec.base ** spec.ell < V:
            raise UserError(f"base={spec.base}, ell={spec.ell}: {spec.base ** spec.ell} codes < vocabulary {V}")
        spec.extra["permutation"] = f"perm_{spec.base ** spec.ell}.pt"
    return spec


def _detect_mdlm(src: _Source, family, config, ell, base, carry_over) -> _Spec:
    from prime_eval.networks import mdlm_dit

    s, hp = src.shapes, src.hparams or {}
    notes: list[str] = []
    d = s["blocks.0.norm1.weight"][0]
    n_blocks = _layers(s, r"blocks\.(\d+)\.")
    rows, width = s["vocab_embed.embedding"]
    v_out = s["output_layer.linear.weight"][0]
    adaln = "sigma_map.mlp.0.weight" in s
    hs = 2 * s["rotary_emb.inv_freq"][0] if "rotary_emb.inv_freq" in s else None
    model_hp = _get(hp, "model", default={}) or {}
    n_heads = model_hp.get("n_heads") or hp.get("n_heads") or (d // hs if hs else None)
    if n_heads is None:
        n_heads = d // 64
        notes.append(f"n_heads not in the file; assumed head size 64 (n_heads={n_heads})")
    cond = s["sigma_map.mlp.2.weight"][0] if adaln else (model_hp.get("cond_dim") or hp.get("cond_dim") or 128)
    length = model_hp.get("length") or hp.get("model_length") or 1024
    mlp_ratio = s["blocks.0.mlp.0.weight"][0] // d if "blocks.0.mlp.0.weight" in s else 4
    name = mdlm_dit.find_config(d, n_blocks)
    if not adaln:
        shape_family, V = "arm", v_out - 1
    elif width == d:
        shape_family, V = "mdm", v_out - 1
    else:
        shape_family, V = "prime", v_out
    fam = family or shape_family
    if family and family != shape_family:
        raise UserError(f"--family {family} does not fit this MDLM-style file: it looks like {shape_family!r} "
                        f"(σ-map present: {adaln}, vocab_embed {rows}×{width}, d={d}, output {v_out}).")
    cfg = mdlm_dit.DiTConfig(name=name or "", hidden_size=d, n_blocks=n_blocks, n_heads=int(n_heads), cond_dim=cond,
                             length=int(length), mlp_ratio=mlp_ratio, vocab_size=V)
    if isinstance(config, str):
        try:
            named = mdlm_dit.DiTConfig.from_name(config, vocab_size=V)
        except KeyError as e:
            raise UserError(str(e.args[0])) from e
        cfg, name = named, named.name
    else:
        cfg = _merge_config(mdlm_dit.DiTConfig, cfg, config)
    network = {"arm": "AR", "mdm": "DIT", "prime": "PerceiverDIT"}[fam]
    spec = _Spec("mdlm", network, fam, cfg, name, vocab_size=cfg.vocab_size, notes=notes)
    if fam == "prime":
        if d % width:
            raise UserError(f"vocab_embed width {width} does not divide hidden size {d}")
        spec.ell, spec.base = d // width, rows - 1
        if (ell and ell != spec.ell) or (base and base != spec.base):
            raise UserError(f"ell={ell}, base={base} contradict the file: vocab_embed ({rows}, {width}) with d={d} "
                            f"means ℓ={spec.ell}, b={spec.base}")
        if spec.base ** spec.ell < cfg.vocab_size:
            raise UserError(f"b={spec.base}, ℓ={spec.ell}: {spec.base ** spec.ell} codes < vocabulary {cfg.vocab_size}")
        co_hp = _get(hp, "prime", "carry_over")
        if carry_over is not None:
            spec.carry_over = bool(carry_over)
            if co_hp is not None and bool(co_hp) != spec.carry_over:
                notes.append(f"carry_over={spec.carry_over} overrides the checkpoint's config ({co_hp})")
        elif co_hp is not None:
            spec.carry_over = bool(co_hp)
        else:
            notes.append("carry_over not recorded in the file; using False (pass carry_over=True for *_co_* runs)")
        hp_ell = _get(hp, "prime", "target_length")
        if hp_ell is not None and int(hp_ell) != spec.ell:
            notes.append(f"config target_length={hp_ell} differs from the shapes (ℓ={spec.ell}); shapes win")
    if _get(hp, "time_conditioning") or _get(hp, "model", "time_conditioning"):
        notes.append("trained with time_conditioning; the network evaluates σ = 0 unless forward(sigma=...) is given")
    return spec


# ---- Megatron C4 family (prime_eval.megatron_files, megatron_detect; prime_eval.networks.megatron) --------------


def _megatron_source(mc) -> _Source:
    return _Source(mc.path, mc.format, dict(mc.shapes), dict(mc.dtypes), tensors=mc.tensors, ignored=list(mc.ignored),
                   megatron=mc)


def _detect_megatron(src: _Source, family, config, ell, base) -> _Spec:
    from prime_eval import megatron_detect, megatron_files

    if src.megatron is None:  # a flat state dict in another container (safetensors): map its keys first
        mc = megatron_files.from_flat(src.path, src.format, src.shapes, src.dtypes, src.tensors)
        src.shapes, src.dtypes, src.tensors, src.megatron = dict(mc.shapes), dict(mc.dtypes), mc.tensors, mc
        src.ignored += mc.ignored
    det = megatron_detect.detect(src.megatron, family=family, config=config, ell=ell, base=base)
    cfg = det.config
    return _Spec("megatron", det.network, det.family, cfg, cfg.name or None, ell=cfg.target_length,
                 base=cfg.base if cfg.target_length > 1 else None, vocab_size=cfg.vocab_size, notes=det.notes,
                 extra={"info": det.info})


def _detect(src: _Source, *, family=None, arch=None, config=None, ell=None, base=None, carry_over=None) -> _Spec:
    if family is not None and family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    guessed = _guess_arch(src)
    arch = arch or guessed
    if arch is None:
        sample = ", ".join(list(src.shapes)[:8])
        raise UserError(f"{src.path}: unrecognised checkpoint layout (keys: {sample}, ...). Supported: lit_gpt "
                        "(transformer.wte / lm_head), MDLM DiT (vocab_embed / blocks / output_layer), and Hugging "
                        "Face model directories or hub ids.")
    if guessed and arch != guessed and not (arch == "hf" and guessed in (None, "hf")):
        raise UserError(f"format {arch!r} does not match the file, whose keys look like {guessed!r}")
    if arch == "lit_gpt":
        spec = _detect_lit_gpt(src, family, config, ell, base)
    elif arch == "mdlm":
        spec = _detect_mdlm(src, family, config, ell, base, carry_over)
    elif arch == "megatron":
        spec = _detect_megatron(src, family, config, ell, base)
    else:
        if family not in (None, "arm"):
            raise UserError(f"Hugging Face causal LMs are ARMs; --family {family} is not possible")
        hp = src.hparams or {}
        vs = config.get("vocab_size") if isinstance(config, Mapping) else None
        spec = _Spec("hf", "HFCausalLM", "arm", None, hp.get("_name_or_path") or None,
                     vocab_size=vs or hp.get("vocab_size"))
    return spec


# ----------------------------------------------------------------------------------------------------------------
# Building, checking, loading


def _build(spec: _Spec) -> torch.nn.Module:
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


def _describe(spec: _Spec) -> str:
    cfg = spec.config
    dims = (f"{spec.config_name}" if spec.config_name else
            f"d={getattr(cfg, 'n_embd', getattr(cfg, 'hidden_size', '?'))}, "
            f"layers={getattr(cfg, 'n_layer', getattr(cfg, 'n_blocks', getattr(cfg, 'num_layers', '?')))}")
    prime = f", ℓ={spec.ell}, b={spec.base}" if spec.family == "prime" else ""
    return f"{spec.arch} {spec.network} (family {spec.family}{prime}, {dims})"


def _check_keys(net: torch.nn.Module, src: _Source, spec: _Spec, user_opts: dict) -> None:
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

    lines = [f"{src.path} does not fit {_describe(spec)} (strict load):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {lst(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {lst(unexpected)}")
    if misshaped:
        lines.append(f"  mis-shaped keys ({len(misshaped)}): "
                     + lst(f"{k} expected {tuple(e)} got {tuple(g)}" for k, e, g in misshaped))
    if any(user_opts.values()):
        try:
            auto = _detect(src)
            lines.append(f"  without your options ({', '.join(f'{k}={v}' for k, v in user_opts.items() if v)}) "
                         f"the file looks like: {_describe(auto)}")
        except UserError as e:
            lines.append(f"  (automatic detection also fails: {e})")
    lines.append("  Check --family/--config/--ell/--base, or that the file comes from one of the supported code "
                 "bases (docs/checkpoints.md).")
    raise UserError("\n".join(lines))


def _param_count(src: _Source) -> int:
    return sum(math.prod(sh) for k, sh in src.shapes.items() if not k.endswith("inv_freq"))


def _info(src: _Source, spec: _Spec) -> dict:
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
    }
    if "ell_candidates" in spec.extra:
        info["ell_candidates"] = spec.extra["ell_candidates"]
    if spec.arch == "lit_gpt":
        emb = math.prod(src.shapes["transformer.wte.weight"]) + math.prod(src.shapes["lm_head.weight"])
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


def _hf_param_count(src: _Source) -> int | None:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(src.hf_id)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001
        return None


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


def _parse_config_option(config):
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


def inspect_checkpoint(path: str | os.PathLike, *, family: str | None = None, format: str | None = None,
                       config=None, ell: int | None = None, base: int | None = None,
                       carry_over: bool | None = None) -> dict:
    """What `load_network` would build, from shapes and metadata only (tensor data is not read)."""
    arch, container = _resolve_format(format)
    src = _read(path)
    if container and container != src.format:
        raise UserError(f"format {format!r} given, but {path} is a {src.format} file")
    spec = _detect(src, family=family, arch=arch, config=_parse_config_option(config), ell=ell, base=base,
                   carry_over=carry_over)
    info = _info(src, spec)
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
      config: a config name (`Diff_LLaMA_1028M`, `1028`, `small`, Megatron `1107M`), a dict of config fields
        (e.g. {"n_head": 4}), "k=v;k=v", or a config instance. Needed only where shapes do not determine the config.
      ell, base: Prime ℓ and b where the shapes are ambiguous (lit_gpt: 45 rows fit ℓ=15/b=2, ℓ=9/b=4, ℓ=5/b=8).
      carry_over: v1 Prime carry-over; default from the checkpoint's config, else False.
      use_ema: Lightning checkpoints: EMA weights (default, as upstream evaluated) or the raw weights.
      device, dtype: where the network lives; floating weights are cast to `dtype` (buffers stay fp32).
    Raises:
      UserError: unreadable file, unknown layout, or keys/shapes that do not fit (listing them).
    """
    arch, container = _resolve_format(format)
    src = _read(path)
    if container and container != src.format:
        raise UserError(f"format {format!r} given, but {path} is a {src.format} file")
    config = _parse_config_option(config)
    spec = _detect(src, family=family, arch=arch, config=config, ell=ell, base=base, carry_over=carry_over)
    info = _info(src, spec)
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
        net = _build(spec)
    _check_keys(net, src, spec, {"family": family, "config": config, "ell": ell, "base": base})
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


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(spec: str | os.PathLike, *, vocab_size: int | None = None, exact: bool = True):
    """A transformers tokenizer from a local directory, a SentencePiece `*.model` file, a `tokenizer.json`, or a
    hub id. With `vocab_size`, check that `len(tokenizer)` equals it (`exact=False`: at most it, for HF ARMs whose
    output rows are padded).

    Llama-2 `tokenizer.model` -> `LlamaTokenizer` (32000); a directory with `vocab.json` + `merges.txt` ->
    `GPT2Tokenizer` (50257; transformers 5's fast GPT-2 class cannot be built from those files alone).
    """
    from transformers import AutoTokenizer, GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    s = str(spec)
    p = Path(s)
    try:
        if p.is_file() and p.suffix == ".model":
            with tempfile.TemporaryDirectory() as tmp:
                os.symlink(p.resolve(), Path(tmp) / "tokenizer.model")
                tok = LlamaTokenizer.from_pretrained(tmp)
        elif p.is_file() and p.suffix == ".json":
            tok = PreTrainedTokenizerFast(tokenizer_file=s)
        elif p.is_dir():
            files = {q.name for q in p.iterdir()}
            if files & {"tokenizer.json", "tokenizer_config.json"}:
                tok = AutoTokenizer.from_pretrained(s)
            elif "tokenizer.model" in files:
                tok = LlamaTokenizer.from_pretrained(s)
            elif {"vocab.json", "merges.txt"} <= files:
                tok = GPT2Tokenizer.from_pretrained(s)
            else:
                raise UserError(f"tokenizer directory {s} has no tokenizer.json, tokenizer_config.json, "
                                "tokenizer.model or vocab.json + merges.txt")
        elif p.exists():
            raise UserError(f"tokenizer {s}: expected a directory, a SentencePiece .model or a tokenizer.json file")
        else:
            tok = AutoTokenizer.from_pretrained(s)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load tokenizer {s!r}: {type(e).__name__}: {str(e)[:300]}. Pass a local "
                        "directory (or tokenizer.model file), or a hub id that is cached / reachable.") from e
    if vocab_size is not None:
        check_tokenizer_vocab(tok, vocab_size, exact=exact, name=s)
    return tok


def check_tokenizer_vocab(tokenizer, vocab_size: int, *, exact: bool = True, name: str = "tokenizer") -> None:
    n = len(tokenizer)
    if n == vocab_size or (not exact and n <= vocab_size):
        return
    hint = TOKENIZER_HINTS.get(vocab_size)
    raise UserError(f"tokenizer {name} has {n} tokens but the checkpoint's vocabulary is {vocab_size}"
                    + (f"; this checkpoint family uses the {hint} tokenizer" if hint else "")
                    + ". Pass the matching tokenizer (tokenizer=DIR).")
