"""Data-parallel helpers for runs launched by `torchrun` or `accelerate launch` (torch.distributed).

    dist = init_distributed()                  # reads RANK / WORLD_SIZE / LOCAL_RANK; no-op for one process
    mine = shard(items, dist.rank, dist.world_size)            # items[rank::world]
    results = [work(x) for x in mine]
    everything = gather_in_order(results, len(items))        # rank 0: one result per item, original order; else None
    print_rank0("done")

Launchers set RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) in every process; the process group
uses NCCL when CUDA is available and gloo otherwise (`PRIME_EVAL_DIST_BACKEND` overrides). With WORLD_SIZE unset or 1
every helper is the single-process identity, so code written with them runs unchanged without a launcher.

Sharding is by index (`items[rank::world]`), so which rank scores an item depends only on its index, and every
per-item result depends only on the item (per-request seeds, `model_adapters.base.request_seed`). Results are then
bit-identical for any number of processes provided no number depends on which items share a forward pass: see
docs/scale-out.md ("Determinism") and `estimators.rows.forward_rows_batch_invariant`, which forms such passes.
"""
from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from prime_eval.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun / accelerate)")


def dist_info() -> DistInfo:
    """This process's rank, world size and local rank: from the live process group if there is one, else from the
    launcher's environment variables (RANK, WORLD_SIZE, LOCAL_RANK), else a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                        _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank}, WORLD_SIZE={world}: the rank must lie in [0, WORLD_SIZE); launch with "
                        "torchrun or accelerate launch")
    return DistInfo(rank, world, _env_int("LOCAL_RANK", 0))


def active_info() -> DistInfo:
    """Rank and world size of the live process group, or a single process when none is initialised: what code that
    shards work must use (sharding by the environment without a group would silently drop the other ranks' items)."""
    if _active():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), _env_int("LOCAL_RANK", 0))
    return DistInfo()


def default_backend(device: str | torch.device | None = None) -> str:
    forced = os.environ.get("PRIME_EVAL_DIST_BACKEND")
    if forced:
        return forced
    dev = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if dev is None else dev.type == "cuda"
    return "nccl" if use_cuda and torch.distributed.is_nccl_available() else "gloo"


def init_distributed(device: str | torch.device | None = None, *, backend: str | None = None,
                     timeout_s: float | None = None) -> DistInfo:
    """Join the launcher's process group (once per process) and return this process's DistInfo.

    Single process (WORLD_SIZE unset or 1): nothing is initialised. With NCCL the process's CUDA device is set to
    `cuda:LOCAL_RANK`. `timeout_s` (default 3 hours: one rank may finish its share long before another) bounds how
    long a collective waits for a straggler; `PRIME_EVAL_DIST_TIMEOUT` overrides it.
    """
    info = dist_info()
    if not info.enabled or torch.distributed.is_initialized():
        return info
    if not torch.distributed.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    backend = backend or default_backend(device)
    timeout_s = float(os.environ.get("PRIME_EVAL_DIST_TIMEOUT", timeout_s or 3 * 3600))
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    torch.distributed.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    return dist_info()


def local_device(info: DistInfo | None = None, device: str | None = None) -> torch.device:
    """`cuda:LOCAL_RANK` for a multi-process GPU run (a bare "cuda" or no device given), else `device` / cpu."""
    info = info or dist_info()
    if device not in (None, "cuda", "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{info.local_rank}" if info.enabled else "cuda")
    return torch.device("cpu")


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _object_device() -> torch.device | None:
    """NCCL moves pickled objects through the current CUDA device; gloo through the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items `rank, rank + world, rank + 2·world, ...`: deterministic, balanced to within one item."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return list(items[rank::world_size])


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Indices of the items `shard` gives this rank."""
    return range(rank, n, world_size)


def unshard(per_rank: Sequence[Sequence[T]], n: int) -> list[T]:
    """Inverse of `shard`: per_rank[r][j] is item r + j·world; returns the n items in their original order."""
    world = len(per_rank)
    out: list[Any] = [None] * n
    for r, part in enumerate(per_rank):
        expected = len(shard_indices(n, r, world))
        if len(part) != expected:
            raise ValueError(f"rank {r} returned {len(part)} results for {expected} items")
        out[r::world] = list(part)
    return out


def barrier() -> None:
    if _active():
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, on every rank (a one-element list without a process group)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` on rank `dst` (a list indexed by rank), None elsewhere."""
    if not _active():
        return [obj]
    rank = torch.distributed.get_rank()
    out = [None] * torch.distributed.get_world_size() if rank == dst else None
    if torch.distributed.get_backend() == "nccl":  # gather_object is not supported by every NCCL build
        everything = all_gather_object(obj)
        return everything if rank == dst else None
    torch.distributed.gather_object(obj, out, dst=dst)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's tensor (0-d tensors become one element each), as lm-eval's
    `LM.all_gather` expects (accelerate's `gather`). All ranks must pass the same shape."""
    if not _active():
        return tensor
    t = tensor.reshape(1) if tensor.dim() == 0 else tensor
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_in_order(local_results: Sequence[T], n: int, dst: int = 0) -> list[T] | None:
    """The results of `shard(items, rank, world)` from every rank, on `dst`, in the items' original order."""
    parts = gather_object(list(local_results), dst=dst)
    if parts is None:
        return None
    return unshard(parts, n)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def all_ok(ok: bool, message: str = "") -> None:
    """Collective check: if any rank reports `ok=False`, every rank raises UserError with the failing ranks'
    messages (so one rank's bad input does not leave the others waiting at the next collective)."""
    reports = all_gather_object((bool(ok), message))
    bad = [(r, m) for r, (o, m) in enumerate(reports) if not o]
    if bad:
        raise UserError("; ".join(f"rank {r}: {m}" for r, m in bad))


def print_rank0(*args, file=None, **kwargs) -> None:
    """`print`, on rank 0 only."""
    if dist_info().is_main:
        print(*args, file=file if file is not None else sys.stdout, **kwargs)


def destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
