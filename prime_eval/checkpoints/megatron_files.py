"""Megatron-LM checkpoint files (the C4 scaling runs of MDM-Prime-v2), read without Megatron or Transformer Engine.

    mc = read("checkpoints/prime_param_1107M_iter_87500", load=torch_load)   # the parent with the tracker file
    mc.shapes, mc.tensors()                                                   # canonical keys (networks.megatron)

Layouts (checkpoint-formats.md §4.5; upstream `megatron/training/checkpointing.py`, `core/dist_checkpointing`):
  * `torch_dist` (the default `--ckpt-format`): `iter_NNNNNNN/` with `*.distcp` shards, a PyTorch distributed-
    checkpoint `.metadata`, `common.pt` (args, iteration) and `metadata.json`; the parent holds
    `latest_checkpointed_iteration.txt`. Tensors are global (TP-merged) and read with `torch.distributed.checkpoint`
    straight into the tensors the network adopts. Two key layouts:
      - per-layer keys `decoder.layers.{i}.…` (Megatron ≥ core 0.14 with PyTorch ≥ 2.6: `singleton_local_shards`),
        where the SwiGLU `linear_fc1.weight` is saved as two tensors `…linear_fc1.weight_w` (gate) and `…_v` (up);
      - layer-stacked keys `decoder.layers.…` with a leading [num_layers] axis and `linear_fc1.weight` = [gate; up].
  * legacy `--ckpt-format torch`: `iter_NNNNNNN/mp_rank_{TP:02d}/model_optim_rng.pt`, the state dict under `model`.
    Tensor-parallel shards are merged: `linear_qkv`, `linear_fc1`, `word_embeddings`, `output_layer` along rows
    (each rank holds whole query groups / a vocabulary slice; `linear_fc1` per rank is [gate_r; up_r], merged to
    [gate_0 … gate_{TP-1}; up_0 … up_{TP-1}]), `linear_proj` and `linear_fc2` along columns, the rest replicated.
    Pipeline-parallel files (`mp_rank_XX_YYY`) are refused.
  * a torch or safetensors file holding such a state dict (for example written by `dcp_to_torch_save`).
Layer names of the local (non-TE) spec, `input_layernorm` and `pre_mlp_layernorm`, are renamed to the TE names
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`). Optimizer, RNG, rerun-state and
TE `_extra_state` entries are ignored (and counted). The result is keyed like `prime_eval.networks.megatron`;
`prime_eval.checkpoints.detect_megatron` tells which network it is.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prime_eval.errors import UserError

# Entries that are not model weights: optimizer state, RNG / rerun-machine state (torch_dist keys), TE fp8 metadata;
# `rotary_pos_emb.inv_freq` is recomputed (upstream drops it from its state dicts; tolerated if present). Every other
# tensor is a model weight and must fit the network (strict load).
IGNORED_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state", "rotary_pos_emb.")
LOCAL_SPEC_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
ROW_PARALLEL = ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
COLUMN_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
TRACKER = "latest_checkpointed_iteration.txt"
PER_LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
STACKED_KEY = re.compile(r"^(encoder|decoder)\.layers\.(.+)$")

# (file key, index along a leading layer axis or None); a canonical tensor is its parts concatenated along dim 0
Part = tuple[str, "int | None"]


@dataclass
class MegatronCheckpoint:
    path: str  # the iteration directory or the file that was read
    format: str  # "torch_dist" | "megatron-torch" (legacy) | the container of a plain state-dict file
    key_layout: str  # "per-layer" | "layer-stacked"
    layer_names: str  # "transformer_engine" | "local"
    shapes: dict[str, tuple[int, ...]]  # canonical keys (prime_eval.networks.megatron attribute names)
    dtypes: dict[str, str]
    tensors: Callable[[], dict[str, torch.Tensor]]
    args: dict = field(default_factory=dict)  # Megatron's arguments (common.pt / the pickle), plain values only
    iteration: int | None = None
    tensor_parallel: int = 1  # legacy shards merged (torch_dist tensors are global)
    ignored: list[str] = field(default_factory=list)

    def layout(self) -> str:
        where = f"{self.format} {Path(self.path).name}"
        tp = f", {self.tensor_parallel} tensor-parallel shards merged" if self.tensor_parallel > 1 else ""
        names = "Transformer-Engine names" if self.layer_names == "transformer_engine" else "local-spec names"
        return f"{where} ({self.key_layout} keys, {names}{tp})"


# ----------------------------------------------------------------------------------------------------------------
# Key plan: file keys -> canonical keys


def plan_keys(file_shapes: Mapping[str, tuple[int, ...]]):
    """(plan, canonical shapes, ignored file keys, key layout, layer names) of a Megatron state dict's keys."""
    parts: dict[str, list[tuple[str, Part, tuple[int, ...]]]] = {}  # canonical -> [(order, part, part shape)]
    ignored, stacked, local = [], False, False
    for key, shape in file_shapes.items():
        if "_extra_state" in key or key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        if (m := PER_LAYER_KEY.match(key)):
            items = [(f"{m[1]}.layers.{m[2]}.", m[3], (key, None), tuple(shape))]
        elif (m := STACKED_KEY.match(key)):
            stacked = True
            items = [(f"{m[1]}.layers.{i}.", m[2], (key, i), tuple(shape[1:])) for i in range(shape[0])]
        else:
            items = [("", key, (key, None), tuple(shape))]
        for prefix, rest, part, sh in items:
            if rest in LOCAL_SPEC_NAMES:
                rest, local = LOCAL_SPEC_NAMES[rest], True
            order = "0"
            if rest.endswith(("linear_fc1.weight_w", "linear_fc1.weight_v")):  # singleton_local_shards SwiGLU
                rest, order = rest[:-2], "0" if rest.endswith("_w") else "1"
            parts.setdefault(prefix + rest, []).append((order, part, sh))
    plan: dict[str, list[Part]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, items in parts.items():
        items.sort(key=lambda t: t[0])
        orders = [o for o, _, _ in items]
        if len(items) > 1 and orders != ["0", "1"]:
            raise UserError(f"Megatron checkpoint: {name} appears {len(items)} times "
                            f"({', '.join(p[0] for _, p, _ in items)}); the file mixes key layouts")
        if len(items) == 1 and name.endswith("linear_fc1.weight") and items[0][1][0].endswith(("_w", "_v")):
            raise UserError(f"Megatron checkpoint: {items[0][1][0]} has no `{'_v' if orders == ['0'] else '_w'}` "
                            "partner (the SwiGLU gate and up halves are saved as two tensors)")
        plan[name] = [p for _, p, _ in items]
        sh = [s for _, _, s in items]
        shapes[name] = (sum(s[0] for s in sh), *sh[0][1:]) if len(sh) > 1 else sh[0]
    layout = "layer-stacked" if stacked else "per-layer"
    return plan, shapes, ignored, layout, "local" if local else "transformer_engine"


def _assemble(plan: Mapping[str, list[Part]], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors from file tensors: a layer of a stacked tensor is a view; split halves are concatenated."""
    out = {}
    for name, parts in plan.items():
        ts = [get(k) if i is None else get(k)[i] for k, i in parts]
        out[name] = ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Finding and reading the files


def _plain_args(obj) -> dict:
    """Megatron's argparse Namespace (real, or the loader's inert stand-in) -> {name: plain value}."""
    d = vars(obj) if hasattr(obj, "__dict__") and not isinstance(obj, Mapping) else obj
    if isinstance(d, Mapping) and "_state" in d and isinstance(d["_state"], Mapping):  # stubbed Namespace
        d = d["_state"]
    if not isinstance(d, Mapping):
        return {}
    return {str(k): v for k, v in d.items() if v is None or isinstance(v, (bool, int, float, str))}


def find(path: str | Path) -> Path | None:
    """The iteration directory (or legacy file's iteration directory) a path names, or None if it is no Megatron
    checkpoint. Accepts the parent with `latest_checkpointed_iteration.txt`, an `iter_NNNNNNN/` (or `release/`)
    directory, an `mp_rank_XX/` directory or its `model_optim_rng.pt`."""
    p = Path(path)
    if p.is_file():
        return p.parent.parent if p.name == "model_optim_rng.pt" and p.parent.name.startswith("mp_rank_") else None
    if not p.is_dir():
        return None
    if p.name.startswith("mp_rank_") and (p / "model_optim_rng.pt").is_file():
        return p.parent
    if (p / TRACKER).is_file():
        text = (p / TRACKER).read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name is None or not (p / name).is_dir():
            raise UserError(f"{p / TRACKER} names iteration {text!r}, but {p / (name or text)} is not there; pass "
                            f"the iteration directory itself (found: {', '.join(_iterations(p)) or 'none'})")
        return p / name
    if _is_dist(p) or _legacy_ranks(p):
        return p
    iters = _iterations(p)
    if iters and all(_is_dist(p / i) or _legacy_ranks(p / i) for i in iters):
        if len(iters) == 1:
            return p / iters[0]
        raise UserError(f"{p} holds {len(iters)} Megatron iterations ({', '.join(iters[:6])}) and no {TRACKER}; "
                        "pass one iteration directory")
    return None


def _iterations(p: Path) -> list[str]:
    return sorted(q.name for q in p.iterdir() if q.is_dir() and (q.name.startswith("iter_") or q.name == "release"))


def _is_dist(p: Path) -> bool:
    return (p / ".metadata").is_file() and any(p.glob("*.distcp"))


def _legacy_ranks(p: Path) -> list[Path]:
    return sorted(q.parent for q in p.glob("mp_rank_*/model_optim_rng.pt"))


def read(path: str | Path, *, load: Callable[[str], object]) -> MegatronCheckpoint | None:
    """Read a Megatron checkpoint's keys, shapes and arguments (no tensor data), or None if `path` is not one.

    `load` unpickles a torch file (memory-mapped, tolerant of Megatron's non-tensor objects such as `args`)."""
    it = find(path)
    if it is None:
        return None
    return _read_dist(it, load) if _is_dist(it) else _read_legacy(it, load)


def _quiet_dcp():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    return ctx


def _read_dist(it: Path, load) -> MegatronCheckpoint:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(str(it)).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read the torch_dist metadata {it / '.metadata'}: {type(e).__name__}: {e}") from e
    tensors_md = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    file_shapes = {k: tuple(v.size) for k, v in tensors_md.items()}
    plan, shapes, ignored, key_layout, names = plan_keys(file_shapes)
    ignored += [k for k in md.state_dict_metadata if k not in tensors_md]
    args, iteration = {}, None
    if (it / "common.pt").is_file():
        common = load(str(it / "common.pt"))
        if isinstance(common, Mapping):
            args, iteration = _plain_args(common.get("args")), common.get("iteration")
    dtypes = {name: str(tensors_md[plan[name][0][0]].properties.dtype).removeprefix("torch.") for name in plan}

    def tensors() -> dict[str, torch.Tensor]:
        """Each stored tensor is read once into the tensor the network adopts: a stacked tensor is allocated whole
        and its layers are views; split SwiGLU halves are read into the two halves of one tensor."""
        from torch.distributed.checkpoint import load as dcp_load

        dest: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name, parts in plan.items():
            if len(parts) == 2 and all(i is None for _, i in parts):
                t = torch.empty(shapes[name], dtype=tensors_md[parts[0][0]].properties.dtype)
                n = file_shapes[parts[0][0]][0]
                dest[parts[0][0]], dest[parts[1][0]] = t[:n], t[n:]
                out[name] = t
            else:
                for k, _ in parts:
                    if k not in dest:
                        dest[k] = torch.empty(file_shapes[k], dtype=tensors_md[k].properties.dtype)
        ctx = _quiet_dcp()
        try:
            dcp_load(dict(dest), storage_reader=FileSystemReader(str(it)), no_dist=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read the torch_dist shards of {it}: {type(e).__name__}: {str(e)[:300]}") from e
        finally:
            ctx.__exit__(None, None, None)
        rest = {k: v for k, v in plan.items() if k not in out}
        return {**out, **_assemble(rest, dest.__getitem__)}

    return MegatronCheckpoint(str(it), "torch_dist", key_layout, names, shapes, dtypes, tensors, args,
                              iteration if isinstance(iteration, int) else None, 1, ignored)


def _model_state(obj, path) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """The model state dict inside an unpickled Megatron object ({"model": sd, "args": …} or a flat sd), tensors
    only; None if it holds no Megatron keys."""
    if not isinstance(obj, Mapping):
        return None
    sd = obj.get("model", obj.get("model0", obj)) if "model" in obj or "model0" in obj else obj
    if "model1" in obj:
        raise UserError(f"{path}: several model chunks (virtual pipeline parallelism) are not supported; re-save "
                        "the checkpoint without --num-layers-per-virtual-pipeline-stage")
    if not isinstance(sd, Mapping) or not any(isinstance(k, str) and (
            k.startswith(("embedding.word_embeddings", "encoder.layers.", "decoder.layers."))) for k in sd):
        return None
    keep = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    return keep, [k for k in sd if k not in keep]


def from_object(path: str, obj, fmt: str = "torch") -> MegatronCheckpoint | None:
    """A Megatron checkpoint from an already unpickled torch file, or None if it holds no Megatron keys."""
    found = _model_state(obj, path)
    if found is None:
        return None
    sd, skipped = found
    args = _plain_args(obj.get("args")) if isinstance(obj, Mapping) else {}
    iteration = obj.get("iteration") if isinstance(obj, Mapping) else None
    mc = from_flat(path, fmt, {k: tuple(v.shape) for k, v in sd.items()},
                   {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()}, lambda: sd, args=args)
    mc.ignored += skipped
    mc.iteration = iteration if isinstance(iteration, int) else None
    return mc


def from_flat(path: str, fmt: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str],
              tensors: Callable[[], Mapping[str, torch.Tensor]], *, args: dict | None = None) -> MegatronCheckpoint:
    """A flat Megatron state dict (file keys) whose tensors `tensors()` returns, mapped to canonical keys."""
    plan, canon, ignored, key_layout, names = plan_keys(shapes)
    return MegatronCheckpoint(path, fmt, key_layout, names, canon, {k: dtypes[plan[k][0][0]] for k in plan},
                              lambda: _assemble(plan, tensors().__getitem__), dict(args or {}), None, 1, ignored)


def _read_legacy(it: Path, load) -> MegatronCheckpoint:
    ranks = _legacy_ranks(it)
    pp = [r.name for r in ranks if re.fullmatch(r"mp_rank_\d+_\d+(_\d+)?", r.name) and int(r.name.split("_")[3]) > 0]
    if pp:
        raise UserError(f"{it}: pipeline-parallel legacy files ({', '.join(pp[:3])}) are not supported; re-save with "
                        "--pipeline-model-parallel-size 1, or with --ckpt-format torch_dist")
    objs, sds = [], []
    for r in ranks:
        f = r / "model_optim_rng.pt"
        obj = load(str(f))
        found = _model_state(obj, f)
        if found is None:
            raise UserError(f"{f}: no Megatron model state dict under 'model' (top-level entries: "
                            f"{list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__})")
        objs.append(obj)
        sds.append(found)
    args = _plain_args(objs[0].get("args"))
    tp = len(sds)
    if args.get("tensor_model_parallel_size") not in (None, tp):
        raise UserError(f"{it}: args say tensor_model_parallel_size={args['tensor_model_parallel_size']} but "
                        f"{tp} mp_rank_* files were found; is the checkpoint complete?")
    keys = list(sds[0][0])
    for r, (sd, _) in zip(ranks[1:], sds[1:]):
        if list(sd) != keys:
            diff = sorted(set(sd) ^ set(keys))[:6]
            raise UserError(f"{r}: its keys differ from {ranks[0].name}'s ({', '.join(diff)}); shards of one "
                            "checkpoint must hold the same keys")
    shapes = {k: _merged_shape(k, [tuple(sd[k].shape) for sd, _ in sds]) for k in keys}
    dtypes = {k: str(sds[0][0][k].dtype).removeprefix("torch.") for k in keys}

    def tensors() -> dict[str, torch.Tensor]:
        return {k: _merge(k, [sd[k] for sd, _ in sds]) for k in keys}

    mc = from_flat(str(it), "megatron-torch", shapes, dtypes, tensors, args=args)
    mc.tensor_parallel, mc.ignored = tp, mc.ignored + sds[0][1]
    it_ = objs[0].get("iteration")
    mc.iteration = it_ if isinstance(it_, int) else None
    return mc


def _split_axis(key: str) -> int | None:
    if key.endswith(ROW_PARALLEL):
        return 0
    if key.endswith(COLUMN_PARALLEL):
        return 1
    return None


def _merged_shape(key: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    axis = _split_axis(key)
    if len(shapes) == 1 or axis is None:
        if any(s != shapes[0] for s in shapes):
            raise UserError(f"tensor-parallel shards disagree on the replicated tensor {key}: {shapes}")
        return shapes[0]
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return tuple(out)


def _merge(key: str, ts: list[torch.Tensor]) -> torch.Tensor:
    """One global tensor from per-rank shards (Megatron's column / row / vocabulary parallel layouts)."""
    axis = _split_axis(key)
    if len(ts) == 1:
        return ts[0]
    if axis is None:
        for t in ts[1:]:
            if not torch.equal(t, ts[0]):
                raise UserError(f"tensor-parallel shards disagree on the replicated tensor {key}")
        return ts[0]
    if key.endswith("linear_fc1.weight"):  # per rank [gate_r; up_r] -> [gate_0 … gate_n; up_0 … up_n]
        halves = [t.chunk(2, dim=0) for t in ts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(ts, dim=axis)
