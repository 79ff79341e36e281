"""Reading a checkpoint container: key names, shapes, dtypes and metadata, plus a streamed tensor source.

Containers (`Source.format`):
  * `torch`        torch zip pickle: `{"model": state_dict}` (Prime-v2 `.pth`) or a flat state dict;
  * `safetensors`  flat state dict (SMDM MDM / ARM baselines);
  * `lightning`    Lightning `.ckpt` (MDLM / MDM-Prime v1): `state_dict` with a `backbone.` prefix, EMA weights in
                   `ema.shadow_params`, hydra config in `hyper_parameters` (read with `unpickle.stub_pickle`);
  * `hf-dir` / `hf-hub`  a directory with `config.json` (its `*.safetensors` shards, or its one torch weights file,
                   are read for shapes) or a hub id.
  * `torch_dist` / `megatron-torch`  Megatron-LM checkpoints of the C4 runs (a `torch_dist` iteration directory or
                   its parent, legacy `mp_rank_XX/model_optim_rng.pt`), read by `megatron_files` into canonical keys.

Nothing here reads tensor data: `Source.tensors()` does, one tensor at a time, when the network is loaded.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prime_eval.checkpoints.unpickle import get, plain, stub_pickle
from prime_eval.errors import UserError

# Key prefixes that wrappers add (Fabric/DDP/compile/Lightning); stripped when every key carries them.
STRIP_PREFIXES = ("_forward_module.", "module.", "_orig_mod.", "backbone.", "model.")
IGNORED_KEY_SUFFIXES = ("._extra_state",)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


@dataclass
class Source:
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


def normalise(keys: list[str]) -> tuple[dict[str, str], str, list[str]]:
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


def torch_load(path: str, *, mmap: bool = True):
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
        return _load(weights_only=False, pickle_module=stub_pickle)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_state_dict(src: Source, sd: Mapping[str, torch.Tensor]) -> Source:
    keymap, src.prefix, src.ignored = normalise(list(sd.keys()))
    src.shapes = {new: tuple(sd[old].shape) for old, new in keymap.items()}
    src.dtypes = {new: str(sd[old].dtype).removeprefix("torch.") for old, new in keymap.items()}
    src.tensors = lambda: {new: sd[old] for old, new in keymap.items()}
    return src


def _read_torch(path: str, src: Source | None = None) -> Source:
    try:
        obj = torch_load(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: {e}") from e
    from prime_eval.checkpoints import megatron_files  # a Megatron state dict ({"model": sd, "args": …} or flat)

    if (mc := megatron_files.from_object(path, obj)) is not None:
        return megatron_source(mc)
    if isinstance(obj, Mapping) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):  # Lightning
        src = _from_state_dict(Source(path, "lightning"), obj["state_dict"])
        src.hparams = plain(get(obj, "hyper_parameters", "config")) or {}
        ema = obj.get("ema")
        shadow = get(ema, "shadow_params") if isinstance(ema, Mapping) else None
        if isinstance(shadow, (list, tuple)) and shadow and all(isinstance(t, torch.Tensor) for t in shadow):
            src.ema = list(shadow)
        return src
    src = src or Source(path, "torch")
    if isinstance(obj, Mapping) and "model" in obj and _is_state_dict(obj["model"]):  # Fabric {"model": sd}
        return _from_state_dict(src, obj["model"])
    if _is_state_dict(obj):
        return _from_state_dict(src, obj)
    top = list(obj.keys())[:12] if isinstance(obj, Mapping) else type(obj).__name__
    raise UserError(f"{path}: no state dict found (top-level entries: {top}). Expected a state dict, "
                    "{'model': state_dict} (lit_gpt .pth) or a Lightning checkpoint with 'state_dict'.")


def _read_safetensors(paths: list[str], src: Source) -> Source:
    from safetensors import safe_open

    shapes, dtypes, where = {}, {}, {}
    for p in paths:
        with safe_open(p, framework="pt", device="cpu") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k], dtypes[k], where[k] = tuple(sl.get_shape()), str(sl.get_dtype()).lower(), p
    keymap, src.prefix, src.ignored = normalise(list(shapes))
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


def _read_hf_dir(path: str) -> Source:
    """A directory with config.json: its safetensors shards, else its one torch weights file (e.g. a converted
    lit_gpt `.pth` kept next to the transformers config it came from), are read for shapes."""
    p = Path(path)
    src = Source(path, "hf-dir", hf_id=path)
    src.hparams = json.loads((p / "config.json").read_text())
    weights = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise UserError(f"{path} has a config.json but no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})"
                        ": download the weights into it (or pass the weights file itself)")
    shards = sorted(str(q) for q in weights if q.suffix == ".safetensors")
    index = p / "model.safetensors.index.json"
    if index.exists():
        shards = sorted({str(p / v) for v in json.loads(index.read_text())["weight_map"].values()})
    if shards:
        _read_safetensors(shards, src)
    elif len(weights) == 1 and weights[0].suffix in (".pth", ".pt"):
        _read_torch(str(weights[0]), src)
    return src


PERMUTATION_FILE = re.compile(r"^perm_[\d._]+\.pt$")  # perm_512.pt, perm_1.0_65536.pt (index shuffling π)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `org/name` or a legacy single name (`gpt2`)


def read(path: str | os.PathLike) -> Source:
    """Keys, shapes and metadata of a checkpoint file, model directory or hub id (no tensor data is read)."""
    path = str(path)
    p = Path(path)
    from prime_eval.checkpoints import megatron_files  # Megatron torch_dist / legacy directories (family C)

    if (mc := megatron_files.read(p, load=torch_load)) is not None:
        return megatron_source(mc)
    if p.is_dir():
        if (p / "config.json").exists():
            return _read_hf_dir(path)
        weights = [q for q in p.iterdir() if q.is_file() and q.name.endswith(WEIGHT_SUFFIXES)
                   and not PERMUTATION_FILE.match(q.name)]  # a release's perm_*.pt beside the weights is not one
        if len(weights) == 1:
            return read(weights[0])
        raise UserError(f"{path} is a directory without config.json and with {len(weights)} weight files; "
                        "pass the checkpoint file itself.")
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(8)
        if p.suffix == ".safetensors" or (len(head) == 8 and int.from_bytes(head, "little") < (1 << 28)
                                          and not head.startswith(b"PK")):
            try:
                return _read_safetensors([path], Source(path, "safetensors"))
            except Exception as e:  # noqa: BLE001
                if p.suffix == ".safetensors":
                    raise UserError(f"cannot read {path} as safetensors: {e}") from e
        return _read_torch(path)
    if HUB_ID.match(path) and not path.endswith(WEIGHT_SUFFIXES):
        src = Source(path, "hf-hub", hf_id=path)
        try:
            from transformers import AutoConfig

            src.hparams = AutoConfig.from_pretrained(path).to_dict()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path!r} is not a local file or directory, and as a Hugging Face hub id it failed: "
                            f"{type(e).__name__}: {str(e)[:300]}. Check the path, or run online / pre-download "
                            "the model (HF_HUB_OFFLINE=1 allows only cached models).") from e
        return src
    raise UserError(f"checkpoint not found: {path}")


def megatron_source(mc) -> Source:
    """A Source over a `megatron_files.MegatronCheckpoint` (keys already canonical, sub-tokenizer buffers included)."""
    return Source(mc.path, mc.format, dict(mc.shapes), dict(mc.dtypes), tensors=mc.tensors, ignored=list(mc.ignored),
                  megatron=mc)
