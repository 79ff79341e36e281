"""The identity of a checkpoint: a sha256 of the content that determines its numbers (issue 13 §1).

    checkpoint_sha256("model.pth")                                   # = `sha256sum model.pth`
    checkpoint_sha256("./my-model", extra={"tokenizer": tok_dir, "permutation": "perm_32768.pt"})
    checkpoint_sha256("gpt2")                                        # hub id: the cached snapshot, else None

A file is hashed as its bytes. A directory is hashed as the manifest of its files: one line
`relative/path \\0 sha256(content)` per file, sorted, with symlinks followed (hub snapshots are symlinks into
`blobs/`). Only the checkpoint's own housekeeping is skipped, judged by the path *relative to the checkpoint*:
version-control and cache folders inside it (`.git`, `.cache`, ...) and lock / partial-download files. A checkpoint
under `~/.cache` is hashed like any other. A hub id that is not a local path is resolved offline to its snapshot in
the local Hugging Face cache (the files `from_pretrained` loaded) and hashed as that directory; when it is not cached
the result is None and callers hash the loaded state dict instead (`prime_eval.cache.state_dict_sha256`).

`extra` adds files the numbers also depend on but that are given separately (tokenizer, permutation). With extras the
identity is the sha256 of the sorted lines `role \\0 identity-of-part`, so changing any part changes it.

A Megatron checkpoint given as its run folder (with `latest_checkpointed_iteration.txt`) or as one rank's
`model_optim_rng.pt` is identified by the iteration directory the loader reads (`megatron_files.find`), not by every
iteration saved in the run.

A checkpoint from which no weight bytes were hashed (an empty file, a folder without weight files) is a UserError.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from prime_eval.errors import UserError

# Files whose bytes are weights (a directory must hold at least one, non-empty).
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin", ".msgpack", ".h5", ".gguf", ".distcp")
# The checkpoint's own housekeeping, judged relative to the checkpoint: never part of its identity.
HOUSEKEEPING_DIRS = frozenset({".cache", ".git", ".hg", ".svn", "__pycache__", ".ipynb_checkpoints"})
HOUSEKEEPING_SUFFIXES = (".lock", ".incomplete")
HOUSEKEEPING_NAMES = frozenset({".DS_Store"})
_CHUNK = 1 << 22  # 4 MiB


def file_sha256(path: str | os.PathLike) -> str:
    """Streamed sha256 (hex) of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def identity_files(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every file that belongs to the directory checkpoint `root`, sorted.

    Symlinks are followed (a directory reached twice through links is walked once); housekeeping folders and lock
    files are skipped only by their path relative to `root`.
    """
    root = Path(root)
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in HOUSEKEEPING_DIRS)
        for name in filenames:
            if name in HOUSEKEEPING_NAMES or name.endswith(HOUSEKEEPING_SUFFIXES):
                continue
            p = Path(dirpath) / name
            if p.is_file():  # follows symlinks; a dangling link is not a file
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _hub_snapshot(hub_id: str) -> Path | None:
    """The local snapshot folder of a hub model id (offline: refs/main of the HF cache), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _part_sha256(path: str | os.PathLike, *, weights: bool) -> str | None:
    """Identity of one part: a file's sha256, a directory's manifest sha256, a cached hub id's snapshot; else None.

    weights=True: the part is the checkpoint, which must contribute weight bytes.
    """
    p = Path(path)
    if not p.exists():
        snap = _hub_snapshot(str(path)) if not os.path.isabs(str(path)) else None
        if snap is None:
            return None
        p = snap
    if weights:
        from prime_eval.checkpoints.megatron_files import find

        p = find(p) or p  # a Megatron run folder / rank file: the iteration directory that is loaded
    if p.is_file():
        if weights and p.stat().st_size == 0:
            raise UserError(f"checkpoint {path} is an empty file: no weight bytes to identify it by")
        return file_sha256(p)
    files = identity_files(p)
    if weights and not any(rel.endswith(WEIGHT_FILE_SUFFIXES) and q.stat().st_size > 0 for rel, q in files):
        raise UserError(f"checkpoint folder {path} holds no weight files ({', '.join(WEIGHT_FILE_SUFFIXES)}): "
                        "nothing identifies its weights. Download the weights into it, or pass the weights file.")
    manifest = hashlib.sha256()
    for rel, q in files:
        manifest.update(f"{rel}\0{file_sha256(q)}\n".encode())
    return manifest.hexdigest()


def checkpoint_sha256(path: str | os.PathLike, *,
                      extra: Mapping[str, str | os.PathLike | None] | None = None) -> str | None:
    """sha256 (hex) identity of a checkpoint and of the extra files its numbers depend on (module docstring).

    Args:
      path: a weights file, a model directory, or a hub id.
      extra: role -> file, directory or hub id (e.g. {"tokenizer": DIR, "permutation": "perm_32768.pt"});
        None values are left out. A hub id that is not cached counts by its name.
    Returns:
      The hex digest; None only when `path` is neither a local path nor a cached hub id.
    Raises:
      UserError: the checkpoint contributes no weight bytes (empty file, folder without weight files).
    """
    ident = _part_sha256(path, weights=True)
    parts = {k: v for k, v in (extra or {}).items() if v is not None}
    if ident is None or not parts:
        return ident
    lines = [f"checkpoint\0{ident}"]
    for role in sorted(parts):
        sub = _part_sha256(parts[role], weights=False)
        lines.append(f"{role}\0{sub if sub is not None else 'name:' + str(parts[role])}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
