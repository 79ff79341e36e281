"""Output files that are never half-written, and an output-folder check that runs before the long work.

    check_output_dir("runs/", need_bytes=50 * 2**20)      # UserError now, not after hours of scoring
    write_json("runs/results.json", results)               # readers see the old file or the new one, never a part

Atomic writes: the data go to a temporary file in the same folder (same filesystem, so the rename is atomic),
which is flushed and fsync'ed, then `os.replace`d over the target, and the folder is fsync'ed so the rename itself
survives a crash. On any error the temporary file is removed and the previous file (if any) is untouched.
Errors the user can fix (no space left, no permission, a path that is a file) are raised as `UserError`.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prime_eval.errors import UserError

DEFAULT_FREE_BYTES = 64 * 2**20  # what check_output_dir asks for when the caller gives no estimate


def _user_error(path: Path, e: OSError, what: str) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the device while writing {path} ({what}); free some space or choose "
                         "another output folder, then rerun (cached results are reused)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: {e.strerror}; choose a writable output folder")
    return UserError(f"cannot write {path}: {e.strerror or e}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically (temporary file + fsync + os.replace + folder fsync). Returns the path.

    The new file gets `mode` (default: 0o666 minus the umask, as `open` would give), not mkstemp's 0o600.
    """
    path = Path(path)
    return _atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, default: Callable | None = None,
               **dumps_kwargs) -> Path:
    """`json.dumps(obj)` + newline, written atomically."""
    text = json.dumps(obj, indent=indent, default=default, ensure_ascii=False, **dumps_kwargs)
    return atomic_write_text(path, text + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], *, default: Callable | None = None) -> Path:
    """One JSON object per line, written atomically (the whole file, or nothing)."""
    path = Path(path)

    def write(f):
        for row in rows:
            f.write((json.dumps(row, default=default, ensure_ascii=False) + "\n").encode("utf-8"))

    return _atomic_write(path, write, None)


def _atomic_write(path: Path, write: Callable, mode: int | None) -> Path:
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise _user_error(path, e, "creating a temporary file") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _user_error(path, e, "writing") from e
        raise
    _fsync_dir(folder)
    return path


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some filesystems (and Windows) cannot open a folder: then it is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def staging_dir(dest: str | os.PathLike) -> Path:
    """A new hidden folder inside `dest` (same filesystem, so `publish_tree` can rename out of it atomically)."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".prime-eval-staging-", dir=dest))
    except OSError as e:
        raise _user_error(dest, e, "creating a staging folder") from e


def publish_tree(staging: str | os.PathLike, dest: str | os.PathLike, *, last: Callable[[Path], bool] | None = None,
                 ) -> list[Path]:
    """Move every file under `staging` to the same relative path under `dest`, each by an atomic `os.replace`
    after an fsync, files for which `last(path)` is true at the end (e.g. the results JSON, so that its presence
    means the whole set is there), then remove `staging`. Returns the new paths.

    Tools that write non-atomically (lm-eval's tracker) write into `staging_dir(dest)` first; readers of `dest`
    then see each file whole or not at all. A run killed mid-write leaves only a hidden `.prime-eval-staging-*`
    folder behind.
    """
    staging, dest = Path(staging), Path(dest)
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (bool(last and last(p)), str(p)))
    out = []
    for src in files:
        target = dest / src.relative_to(staging)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(src, target)
        except OSError as e:
            raise _user_error(target, e, f"moving it from {staging}") from e
        _fsync_dir(target.parent)
        out.append(target)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def check_output_dir(path: str | os.PathLike, *, need_bytes: int = DEFAULT_FREE_BYTES, create: bool = True,
                     what: str = "output") -> Path:
    """Check, before any long work, that `path` is (or can be made) a writable folder with `need_bytes` free.

    Creates the folder when `create` (else checks its nearest existing parent), writes and removes a probe file,
    and compares `shutil.disk_usage(...).free` with `need_bytes`. Raises UserError naming the folder and the fix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} path {path} exists and is not a folder; give a folder")
    probe_dir = path
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the {what} folder {path}: {e.strerror}; choose a writable location") from e
    else:
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".prime-eval-probe.", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"the {what} folder {probe_dir} is not writable ({e.strerror}); choose another folder or "
                        "fix its permissions") from e
    free = shutil.disk_usage(probe_dir).free
    if free < need_bytes:
        raise UserError(f"only {_size(free)} free on the disk of {probe_dir}, and this run needs about "
                        f"{_size(need_bytes)} for its {what}; free some space or choose another folder")
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
