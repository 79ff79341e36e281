"""Data-parallel helpers: index sharding, ordered gathering, and bit-identical results with 1 and 2 processes
(two CPU processes over gloo, started with torch.multiprocessing.spawn)."""
from __future__ import annotations

import os
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp

from prime_eval import distributed as D
from prime_eval.errors import UserError
from prime_eval.estimators import forward_rows, forward_rows_batch_invariant, get_estimator
from prime_eval.networks.lit_gpt import Config, TransEncoder

LENGTHS = [9, 23, 17, 40, 9, 31, 12, 23, 5, 40, 18]  # mixed, with repeats: rows of one length share passes
K, ROWS_PER_PASS = 4, 6


def _net() -> TransEncoder:
    torch.manual_seed(0)
    net = TransEncoder(Config(n_layer=2, n_embd=64, n_head=4, intermediate_size=128, vocab_size=96,
                              padding_multiple=32, block_size=64, rope_bf16=False)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def _requests() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(1)
    reqs = []
    for i, n in enumerate(LENGTHS):
        x = torch.randint(0, 96, (n,), generator=g)
        target = torch.zeros(n, dtype=torch.bool)
        target[n // 2:] = True
        reqs.append((x, target, 1000 + i))  # per-request seed
    return reqs


def _score(net, reqs, forward) -> list[torch.Tensor]:
    """Per-request K values: rows from each request's own generator, packed across requests by `forward`."""
    est = get_estimator("mdm", "mc", mask_id=net.mask_id)
    rows = [est.rows(x, t, torch.Generator().manual_seed(s), K) for x, t, s in reqs]
    return [est.cost(r, lg) for r, lg in zip(rows, forward(net, rows, ROWS_PER_PASS))]


# ---------------------------------------------------------------------------------------------------------------
def test_shard_unshard_roundtrip():
    for n in range(8):
        items = list(range(100, 100 + n))
        for world in (1, 2, 3):
            parts = [D.shard(items, r, world) for r in range(world)]
            assert sorted(sum(parts, [])) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert [list(D.shard_indices(n, r, world)) for r in range(world)] == \
                [[i - 100 for i in p] for p in parts]
            assert D.unshard(parts, n) == items
    with pytest.raises(ValueError):
        D.unshard([[1, 2], [3, 4]], 3)  # rank 1 should hold one item
    with pytest.raises(ValueError):
        D.shard([1], 2, 2)


def test_dist_info_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.dist_info() == D.DistInfo(0, 1, 0)
    assert D.init_distributed().world_size == 1  # no launcher: nothing initialised
    assert not torch.distributed.is_initialized()
    assert D.gather_in_order(["a", "b"], 2) == ["a", "b"] and D.all_gather_object(3) == [3]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.dist_info() == D.DistInfo(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UserError, match="RANK=4"):
        D.dist_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UserError, match="not an integer"):
        D.dist_info()


def test_padding_changes_last_bits_and_equal_length_passes_do_not():
    """Why `forward_rows_batch_invariant` exists: the same request scored alone and next to longer requests."""
    net, reqs = _net(), _requests()
    alone = _score(net, reqs[:1], forward_rows_batch_invariant)
    together = _score(net, reqs, forward_rows_batch_invariant)
    assert torch.equal(alone[0], together[0])
    # equal-length rows in passes of different sizes: identical on CPU
    twice = _score(net, [reqs[0], reqs[4]], forward_rows_batch_invariant)  # both of length 9
    assert torch.equal(twice[0], alone[0])
    # each request in passes of its own (pack="request", for GPUs): the same bits on CPU
    per_request = _score(net, reqs, lambda n, r, k: forward_rows_batch_invariant(n, r, k, pack="request"))
    assert all(torch.equal(a, b) for a, b in zip(per_request, together))
    with pytest.raises(UserError, match="pack='rows'"):
        forward_rows_batch_invariant(net, [], 4, pack="rows")
    # mixed-length passes pad the short rows; the values agree to float tolerance (not necessarily bitwise)
    mixed = _score(net, reqs, forward_rows)
    for a, b in zip(together, mixed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PRIME_EVAL_DIST_BACKEND="gloo")
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    try:
        assert (info.rank, info.world_size) == (rank, world) and torch.distributed.get_backend() == "gloo"
        reqs = _requests()
        mine = D.shard(reqs, info.rank, info.world_size)
        values = _score(_net(), mine, forward_rows_batch_invariant)
        ordered = D.gather_in_order(values, len(reqs))
        counts = D.all_gather_tensor(torch.tensor(len(mine)))  # lm-eval's LM.all_gather on a 0-d tensor
        token = D.broadcast_object({"from": info.rank})
        everyone = D.all_gather_object(info.rank)
        try:
            D.all_ok(info.rank == 0, f"bad input on rank {info.rank}")
            all_ok_error = None
        except UserError as e:
            all_ok_error = str(e)
        D.barrier()
        if info.is_main:
            with open(out_path, "wb") as f:
                pickle.dump({"values": ordered, "counts": counts.tolist(), "token": token, "everyone": everyone,
                             "all_ok_error": all_ok_error}, f)
        else:
            assert ordered is None
    finally:
        D.destroy()


def test_two_gloo_processes_give_bit_identical_results(tmp_path):
    out = tmp_path / "gathered.pkl"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = pickle.loads(out.read_bytes())
    single = _score(_net(), _requests(), forward_rows_batch_invariant)
    assert len(got["values"]) == len(single)
    for a, b in zip(got["values"], single):
        assert torch.equal(a, b), (a, b)  # bit for bit
    assert got["counts"] == [6, 5]
    assert got["token"] == {"from": 0} and got["everyone"] == [0, 1]
    assert got["all_ok_error"] == "rank 1: bad input on rank 1"
