"""The SQLite result cache: exact round-trips, keys that separate runs, per-rank files, SIGKILL safety."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from prime_eval.cache import ResultCache, count_entries, fingerprint, request_key, run_identity, state_dict_sha256
from prime_eval.errors import UserError

EST = {"family": "mdm", "estimator": "mc", "eps": 0.0, "T": None, "cfg": 0.0, "is_bound": True}


def ident(**changes):
    base = dict(checkpoint_sha256="ab" * 32, estimator=EST, num_samples=128, seed=1234, dtype="float32")
    base.update(changes)
    return run_identity(**base)


def req(i: int) -> dict:
    return {"context": f"ctx {i}", "continuation": f" cont {i}", "ids": list(range(i % 7 + 1))}


def test_values_round_trip_exactly(tmp_path):
    value = {"ll": -12.345678901234567, "stderr": 0.1 + 0.2, "tiny": 5e-324, "neg0": -0.0, "nan": float("nan"),
             "inf": float("-inf"), "is_greedy": True, "rows": 128, "values": torch.tensor([1.5, -2.25]).double()}
    with ResultCache(tmp_path, ident()) as c:
        assert c.get_many("loglikelihood", [req(0)]) == [None]
        assert c.put_many("loglikelihood", [(req(0), value)]) == 1
        (got,) = c.get_many("loglikelihood", [req(0)])
        assert (c.hits, c.misses, c.stored, len(c)) == (1, 1, 1, 1)
    for k in ("ll", "stderr", "tiny", "rows", "is_greedy", "inf"):
        assert got[k] == value[k] and type(got[k]) is type(value[k])
    assert str(got["neg0"]) == "-0.0" and got["nan"] != got["nan"] and got["values"] == [1.5, -2.25]
    with ResultCache(tmp_path, ident()) as c:  # persistent across processes / reopen
        assert c.get_many("loglikelihood", [req(0), req(1)])[0]["ll"] == value["ll"]
        assert c.get_many("loglikelihood_rolling", [req(0)]) == [None]  # the request kind is part of the key


@pytest.mark.parametrize("change", [
    {"checkpoint_sha256": "cd" * 32}, {"num_samples": 64}, {"seed": 0}, {"dtype": "bfloat16"},
    {"estimator": {**EST, "eps": 1e-3}}, {"estimator": {**EST, "estimator": "exact_count"}},
    {"estimator": {**EST, "cfg": 0.5, "is_bound": False}}, {"max_length": 1024}])
def test_other_settings_never_read_these_entries(tmp_path, change):
    with ResultCache(tmp_path, ident()) as c:
        c.put_many("loglikelihood", [(req(i), {"ll": -float(i)}) for i in range(5)])
    other = ident(**change)
    assert fingerprint(other) != fingerprint(ident())
    assert request_key(fingerprint(other), "loglikelihood", req(0)) != \
        request_key(fingerprint(ident()), "loglikelihood", req(0))
    with ResultCache(tmp_path, other) as c:
        assert c.get_many("loglikelihood", [req(i) for i in range(5)]) == [None] * 5
        assert c.path.name != f"{fingerprint(ident())[:16]}.rank0.sqlite"
    assert count_entries(tmp_path, other) == 0 and count_entries(tmp_path, ident()) == 5


def test_identity_is_canonical_and_needs_the_checkpoint_hash():
    a = run_identity(checkpoint_sha256="x", estimator={"b": 1, "a": 2}, num_samples=2, seed=3)
    b = run_identity(checkpoint_sha256="x", estimator={"a": 2, "b": 1}, num_samples=2, seed=3)
    assert fingerprint(a) == fingerprint(b)  # key order does not matter
    with pytest.raises(UserError, match="content hash"):
        run_identity(checkpoint_sha256=None, estimator={}, num_samples=1, seed=0)
    net = torch.nn.Linear(3, 2)
    h = state_dict_sha256(net)
    assert h == state_dict_sha256(net)
    with torch.no_grad():
        net.bias[0] += 1e-7
    assert state_dict_sha256(net) != h


def test_each_rank_writes_its_own_file_and_reads_all(tmp_path):
    """A 2-process run killed and resumed with 1 process finds what both ranks stored."""
    with ResultCache(tmp_path, ident(), rank=0) as r0, ResultCache(tmp_path, ident(), rank=1) as r1:
        r0.put_many("loglikelihood", [(req(i), {"ll": i}) for i in range(0, 6, 2)])
        r1.put_many("loglikelihood", [(req(i), {"ll": i}) for i in range(1, 6, 2)])
        assert r0.path != r1.path
    with ResultCache(tmp_path, ident(), rank=0) as c:
        assert [v["ll"] for v in c.get_many("loglikelihood", [req(i) for i in range(6)])] == list(range(6))
        assert len(c) == 3 and len(c.summary()["other_files"]) == 1


def test_corrupt_cache_file_is_a_user_error(tmp_path):
    with ResultCache(tmp_path, ident()) as c:
        path = c.path
    path.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    with pytest.raises(UserError, match="not a readable SQLite file"):
        ResultCache(tmp_path, ident())


def test_unwritable_cache_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create the cache folder"):
        ResultCache(blocker / "cache", ident())


WRITER = textwrap.dedent("""
    import sys, time
    from prime_eval.cache import ResultCache, run_identity
    ident = run_identity(checkpoint_sha256="ab" * 32, estimator={"estimator": "mc"}, num_samples=8, seed=0)
    with ResultCache(sys.argv[1], ident, rank=int(sys.argv[2])) as c:
        for b in range(10**6):
            c.put_many("loglikelihood", [({"i": b, "j": j}, {"ll": -(b * 10 + j) / 7, "b": b}) for j in range(10)])
""")


def test_sigkill_at_any_point_keeps_whole_batches(tmp_path):
    ident8 = run_identity(checkpoint_sha256="ab" * 32, estimator={"estimator": "mc"}, num_samples=8, seed=0)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(r)]) for r in (0, 1, 1)]
    try:  # two processes share rank 1's file: the busy timeout serialises them
        deadline = time.time() + 30
        while count_entries(tmp_path, ident8) < 600 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)  # mid-transaction, most likely
            p.wait()
    n = count_entries(tmp_path, ident8)
    assert n >= 600 and n % 10 == 0  # whole batches only
    with ResultCache(tmp_path, ident8, rank=0) as c:
        batches: dict = {}
        for rank_file in sorted(tmp_path.glob("*.sqlite")):
            for (value,) in sqlite3.connect(rank_file).execute("SELECT value FROM results"):
                b = json.loads(value)["b"]
                batches[(rank_file.name, b)] = batches.get((rank_file.name, b), 0) + 1
        assert set(batches.values()) == {10}  # the two writers of rank 1 store the same keys: replaced, not doubled
        got = c.get_many("loglikelihood", [{"i": 0, "j": j} for j in range(10)])
        assert [g["ll"] for g in got] == [-j / 7 for j in range(10)]
        c.put_many("loglikelihood", [({"i": "after"}, {"ll": 1.0})])  # the killed file is writable again
    with ResultCache(tmp_path, ident8, rank=1) as c:
        c.put_many("loglikelihood", [({"i": "after1"}, {"ll": 1.0})])
