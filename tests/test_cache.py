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


# -- a killed scoring run resumes with the default settings (issue 13 §2) --------------------------------------------
class ByteTokenizer:
    """Bytes as tokens (V = 257, EOS 256): a tiny vocabulary keeps a multi-chunk run fast on any CPU."""

    bos_token, bos_token_id, eos_token, eos_token_id, name_or_path = None, None, "</s>", 256, "bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def __len__(self) -> int:
        return 257


def _requests():
    """Multiple-choice documents (2-4 choices, adaptive) and one-request documents (fixed samples, is_greedy)."""
    import random

    from lm_eval.api.instance import Instance

    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat table quickly slowly red blue".split()
    out = []
    for doc in range(14):
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        for c in range(1 if doc % 5 == 4 else 2 + doc % 3):
            cont = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 2)))
            out.append(Instance("loglikelihood", {}, (ctx, cont), c, ("toy", doc, 1)))
    return out


class Killed(Exception):
    pass


def _score(tmp_path, cache: str, settings: dict, kill_after: int | None = None):
    """Score the requests with a fresh adapter on `cache`; with kill_after, raise inside the forward pass that comes
    after that many passes. Returns (adapter or None, rows of estimator passes, rows at the last commit)."""
    from model_adapters import MDMLM
    from prime_eval.networks.toy import TinyDenoiser

    net = TinyDenoiser("mdm", 257, d=16, max_length=64, seed=3, dtype=torch.float32)
    lm = MDMLM(model=net, tokenizer=ByteTokenizer(), cache_dir=str(tmp_path / cache), **settings)
    seen = {"passes": 0, "rows": 0, "committed": 0}
    terms, put, hidden = lm._terms, lm.cache.put_many, net.hidden

    def counted_terms(rows_list):  # the estimator's passes (is_greedy passes go to the network directly)
        yield from terms(rows_list)
        seen["rows"] += sum(int(r.logits_at.any(1).sum()) for r in rows_list)

    def counted_put(kind, items):
        seen["committed"] = seen["rows"]
        return put(kind, items)

    def counted_hidden(idx, **kwargs):  # a forward pass runs the network's trunk, then its head
        seen["passes"] += 1
        if kill_after is not None and seen["passes"] > kill_after:
            raise Killed
        return hidden(idx, **kwargs)

    lm._terms, lm.cache.put_many, net.hidden = counted_terms, counted_put, counted_hidden
    try:
        lm.loglikelihood(_requests(), disable_tqdm=True)
    except Killed:
        return None, seen
    return lm, seen


@pytest.mark.parametrize("settings", [{}, {"adaptive": False}], ids=["defaults", "adaptive=false"])
def test_killed_run_resumes_losing_at_most_one_chunk(tmp_path, settings):
    """Kill at several points (an exception inside a forward pass, as a SIGKILL would stop it), rerun: the numbers
    equal an uninterrupted run's, the rerun computes exactly what was not stored, and the work lost is at most one
    chunk (chunk_rows forward rows of the estimator)."""
    ref, seen = _score(tmp_path, "ref", settings)
    total_rows = ref.counters.rows_computed
    chunk_rows = ref.settings.resolved_chunk_rows()
    assert ref.counters.chunks >= 4 and seen["rows"] > 3 * chunk_rows  # the default chunk bounds a real run
    if not settings:
        assert ref.adaptive and {r["stop"] for r in ref.stats if "stop" in r} >= {"settled"}
    passes = seen["passes"]
    for i, kill_after in enumerate(sorted({1, passes // 3, (2 * passes) // 3, passes - 1})):
        dead, killed = _score(tmp_path, f"run{i}", settings, kill_after=kill_after)
        assert dead is None
        again, _ = _score(tmp_path, f"run{i}", settings)
        assert again.stats == ref.stats  # bit for bit: values, stop reasons, rounds, is_greedy
        c = again.counters
        assert c.rows_computed + c.rows_reused == total_rows  # only what was not stored is computed
        lost = killed["rows"] - killed["committed"]
        assert 0 <= lost <= chunk_rows, (kill_after, lost)
        assert c.rows_reused >= killed["committed"]  # every committed row is reused (and its is_greedy passes)
        if killed["committed"]:
            assert c.hits + c.rounds_reused > 0


def test_other_settings_never_read_a_runs_entries(tmp_path):
    """The cache key holds everything the numbers depend on: changing any of these settings gives another run."""
    ref, _ = _score(tmp_path, "c", {})
    assert ref.counters.hits == 0
    same, _ = _score(tmp_path, "c", {})
    assert same.counters.hits == len(same.stats) and same.counters.rows_computed == 0 and same.stats == ref.stats
    from model_adapters import MDMLM
    from prime_eval.networks.toy import TinyDenoiser

    net = TinyDenoiser("mdm", 257, d=16, max_length=64, seed=3, dtype=torch.float32)
    runs = set()
    for change in ({}, {"round_samples": 8}, {"confidence": 0.95}, {"futility_after": 32}, {"target_se": 0.5},
                   {"samples": 64}, {"seed": 1}, {"greedy": "true"}, {"estimator": "mc"}, {"pack": "length"},
                   {"adaptive": "false"}, {"eps": 0.01}):
        lm = MDMLM(model=net, tokenizer=ByteTokenizer(), cache_dir=str(tmp_path / "c"), **change)
        runs.add(lm.cache.run)
    assert ref.cache.run in runs and len(runs) == 12
    net2 = TinyDenoiser("mdm", 257, d=16, max_length=64, seed=4, dtype=torch.float32)  # other weights
    assert MDMLM(model=net2, tokenizer=ByteTokenizer(), cache_dir=str(tmp_path / "c")).cache.run not in runs
