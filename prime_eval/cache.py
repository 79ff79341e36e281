"""Persistent, resumable cache of per-request results (SQLite), keyed by everything a result depends on.

    ident = run_identity(checkpoint_sha256=sha, estimator=est.config(), num_samples=128, seed=1234, dtype="float32")
    with ResultCache("runs/cache", ident, rank=rank) as cache:
        hits = cache.get_many("loglikelihood", requests)          # one value or None per request
        ...compute the misses...
        cache.put_many("loglikelihood", list(zip(missed_requests, values)))   # one transaction per batch

Key. A run's *fingerprint* is sha256 of the canonical JSON of its identity: the checkpoint's content hash, the
estimator and all its settings (`est.config()`), the number of Monte Carlo samples, the seed, and whatever else the
caller adds (dtype, device type, max length, BOS rule, tokenizer). A request's key is
sha256(fingerprint, request kind, request), where the request is any JSON value (token ids and the strings the
per-request seed is drawn from). A run whose identity differs in any field has another fingerprint, hence other keys
*and other files*: it can never read another run's entries (lm-eval's own `--use_cache` keys on the request text only,
shared/reference/lm-eval-and-peers.md §1.6).

Files. `DIR/<fingerprint[:16]>.rank<R>.sqlite`, one per (run, rank): a process only ever writes its own file, so
ranks never contend for a write lock (and a shared filesystem never sees two writers of one file). Lookups read the
process's own file and every other rank file of the same run that existed when the cache was opened, so a run
resumed with another number of processes still finds every stored result. Each file also stores its full
fingerprint and identity (table `meta`), checked on open.

Crash safety. WAL journal, `synchronous=NORMAL`, one transaction per `put_many`: a SIGKILL at any instant leaves
every committed batch readable and no partial batch (an OS crash or power cut may lose the last few batches, which
are then recomputed — never corrupted). Values are JSON (floats round-trip exactly), so a resumed run returns the
very numbers the killed one computed.
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prime_eval.errors import UserError

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 60.0
_SQL_CHUNK = 500  # keys per SELECT ... IN (...) (SQLite's default limit on host parameters is 999 or 32766)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, non-finite floats as strings (JSON has no NaN)."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _plain(obj: Any, nan_as_str: bool = True) -> Any:
    """JSON-able copy: tuples -> lists, tensors/arrays -> lists, paths -> str; nan/inf -> strings (keys) or kept
    (values: Python's JSON round-trips them)."""
    if isinstance(obj, float) and not math.isfinite(obj) and nan_as_str:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, nan_as_str) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, nan_as_str) for v in obj]
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy array / scalar
        return _plain(obj.tolist(), nan_as_str)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot put a {type(obj).__name__} into a cache key: use JSON values (str, int, float, "
                    "lists, dicts)")


def run_identity(*, checkpoint_sha256: str | None, estimator: Mapping, num_samples: int, seed: int,
                 **extra: Any) -> dict:
    """Everything a per-request result depends on besides the request itself.

    checkpoint_sha256: content hash of the weights (`prime_eval.checkpoints.checkpoint_sha256`, or
                       `state_dict_sha256(net)` for a network built in Python).
    estimator:         `est.config()`: family, estimator name and every option (eps, T, cfg, ℓ, b, π digest, ...).
    num_samples, seed: K and the run seed the per-request generators are derived from.
    extra:             anything else that changes a number (dtype, device type, max_length, add_bos, tokenizer).
    """
    if not checkpoint_sha256:
        raise UserError("the result cache needs the checkpoint's content hash (checkpoint_sha256); for a network "
                        "built in Python pass state_dict_sha256(net), or run without the cache")
    return {"schema": SCHEMA_VERSION, "checkpoint_sha256": str(checkpoint_sha256), "estimator": dict(estimator),
            "num_samples": int(num_samples), "seed": int(seed), **extra}


def estimator_identity(est) -> dict:
    """`est.config()` plus what it only summarises: the content hash of a Prime permutation π (the config only says
    "identity" or "shuffled"). An `iw` estimator's proposal network is the scored network itself (same checkpoint)."""
    import torch

    cfg = dict(est.config())
    for owner in (est, getattr(est, "base", None)):
        st = getattr(owner, "st", None)
        if st is not None and getattr(st, "perm", None) is not None:
            perm = st.perm.detach().cpu().contiguous().to(torch.long)
            cfg["permutation_sha256"] = hashlib.sha256(perm.numpy().tobytes()).hexdigest()
    return cfg


def fingerprint(identity: Mapping) -> str:
    """sha256 (hex) of the canonical JSON of a run identity."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def request_key(run: str, kind: str, request: Any) -> str:
    """sha256 (hex) of (run fingerprint, request kind, request): the primary key of one stored result."""
    return hashlib.sha256(canonical_json([run, kind, request]).encode()).hexdigest()


def state_dict_sha256(net) -> str:
    """Content hash of a network's parameters and buffers (names, dtypes, shapes, bytes), for networks without a
    checkpoint file. Reads every weight once (about a second per GB)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)  # autocommit; explicit BEGIN/COMMIT
    db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    return db


class ResultCache:
    """One run's stored per-request results; see the module docstring for the key, files and crash safety.

    Counters: `hits` (requests answered from disk), `misses` (requests asked for and not found), `stored`.
    """

    def __init__(self, directory: str | Path, identity: Mapping, *, rank: int = 0, timeout: float = _BUSY_TIMEOUT_S):
        self.directory = Path(directory)
        self.identity = dict(identity)
        self.run = fingerprint(self.identity)
        self.rank = int(rank)
        self.hits = self.misses = self.stored = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the cache folder {self.directory}: {e.strerror}; choose a writable "
                            "--cache-dir") from e
        self.path = self.directory / f"{self.run[:16]}.rank{self.rank}.sqlite"
        self._db = self._open_own(timeout)
        # other ranks' files of this run (e.g. of a killed run with another number of processes), read-only
        self._others: list[tuple[Path, sqlite3.Connection]] = []
        for p in sorted(self.directory.glob(f"{self.run[:16]}.rank*.sqlite")):
            if p != self.path:
                conn = self._open_other(p, timeout)
                if conn is not None:
                    self._others.append((p, conn))

    # -- opening ----------------------------------------------------------------------------------------------
    def _open_own(self, timeout: float) -> sqlite3.Connection:
        try:
            db = _connect(self.path, timeout)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                       "value TEXT NOT NULL, created REAL NOT NULL)")
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO meta (k, v) VALUES (?, ?)",
                           [("schema", str(SCHEMA_VERSION)), ("run", self.run),
                            ("identity", canonical_json(self.identity))])
            db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise UserError(f"result cache {self.path} is not a readable SQLite file ({e}); delete it (its results "
                            "are then recomputed) or choose another --cache-dir") from e
        self._check_meta(self.path, db)
        return db

    def _open_other(self, path: Path, timeout: float) -> sqlite3.Connection | None:
        try:
            conn = _connect(path, timeout)
            conn.execute("PRAGMA query_only = ON")
            if not self._check_meta(path, conn, strict=False):
                conn.close()
                return None
            return conn
        except sqlite3.DatabaseError:  # a file another process is creating, or a damaged one: not ours to judge
            return None

    def _check_meta(self, path: Path, db: sqlite3.Connection, strict: bool = True) -> bool:
        meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
        ok = meta.get("schema") == str(SCHEMA_VERSION) and meta.get("run") == self.run
        if not ok and strict:
            raise UserError(f"result cache {path} belongs to another run or cache version (schema "
                            f"{meta.get('schema')}, run {meta.get('run', '?')[:16]}); delete it or choose another "
                            "--cache-dir")
        return ok

    # -- lookups and writes -----------------------------------------------------------------------------------
    def key(self, kind: str, request: Any) -> str:
        return request_key(self.run, kind, request)

    def get_many(self, kind: str, requests: Sequence[Any]) -> list[Any]:
        """The stored value of each request, or None where nothing is stored (counted in hits / misses)."""
        keys = [self.key(kind, r) for r in requests]
        found = self.get_keys(keys)
        values = [found.get(k) for k in keys]
        n_hit = sum(k in found for k in keys)
        self.hits += n_hit
        self.misses += len(keys) - n_hit
        return values

    def get_keys(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        todo = list(dict.fromkeys(keys))
        for path, conn in [(self.path, self._db), *self._others]:
            if not todo:
                break
            try:
                for s in range(0, len(todo), _SQL_CHUNK):
                    part = todo[s:s + _SQL_CHUNK]
                    q = f"SELECT key, value FROM results WHERE key IN ({','.join('?' * len(part))})"
                    for k, v in conn.execute(q, part):
                        found[k] = json.loads(v)
            except sqlite3.DatabaseError as e:
                if conn is self._db:
                    raise UserError(f"result cache {path} cannot be read ({e}); delete it to recompute") from e
                continue  # another rank's file: skip it, its results are recomputed
            todo = [k for k in todo if k not in found]
        return found

    def put_many(self, kind: str, items: Iterable[tuple[Any, Any]]) -> int:
        """Store (request, value) pairs in one transaction (all or none survive a crash). Returns the count."""
        rows = [(self.key(kind, req), kind, json.dumps(_plain(val, nan_as_str=False)), time.time())
                for req, val in items]
        if not rows:
            return 0
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO results (key, kind, value, created) VALUES (?, ?, ?, ?)",
                                 rows)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if "disk" in str(e).lower() or "full" in str(e).lower():
                raise UserError(f"cannot write the result cache {self.path}: {e}; free disk space (results "
                                "stored so far are kept and reused by the next run)") from e
            raise
        self.stored += len(rows)
        return len(rows)

    def __len__(self) -> int:
        """Entries in this process's own file."""
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def summary(self) -> dict:
        return {"path": str(self.path), "run": self.run, "hits": self.hits, "misses": self.misses,
                "stored": self.stored, "other_files": [str(p) for p, _ in self._others]}

    def close(self) -> None:
        for _, conn in self._others:
            conn.close()
        self._others = []
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "ResultCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def count_entries(directory: str | Path, identity: Mapping | None = None) -> int:
    """Stored results in a cache folder (of one run when `identity` is given): for progress and tests."""
    pattern = f"{fingerprint(identity)[:16]}.rank*.sqlite" if identity is not None else "*.rank*.sqlite"
    total = 0
    for p in Path(directory).glob(pattern):
        try:
            conn = _connect(p, 5.0)
            try:
                total += int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            continue
    return total
