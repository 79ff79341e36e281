"""Benchmark 3 (issue 9): achieved forward FLOP/s while scoring, over this machine's fp32 matmul peak, in one run.

Peak: the best of several (n x n) @ (n x n) fp32 matmuls (2n³ FLOPs each). Scoring: Monte Carlo rows of many
requests through `forward_rows` (the adapters' path, logits only where the loss needs them) on a lit_gpt
TransEncoder; useful FLOPs per row = Σ_layers [2·L·(4d² + 3·d·I) + 4·L²·d] + 2·d·V per computed logit.

    .venv/bin/python benchmarks/flops.py [--layers 4] [--width 512] [--length 256] [--requests 24] [--samples 16]
"""
from __future__ import annotations

import argparse
import time

import torch

from prime_eval.estimators import forward_rows, get_estimator
from prime_eval.networks.lit_gpt import Config, TransEncoder


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--rows-per-pass", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, inter, L, V = args.width, int(2.75 * args.width), args.length, args.vocab
    cfg = Config(n_layer=args.layers, n_embd=d, n_head=max(1, d // 64), intermediate_size=inter, vocab_size=V,
                 block_size=L)
    torch.manual_seed(0)
    net = TransEncoder(cfg).eval().requires_grad_(False)
    est = get_estimator("mdm", "mc", mask_id=net.mask_id)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.requests):
        x = torch.randint(0, V, (L,), generator=g)
        target = torch.zeros(L, dtype=torch.bool)
        target[-32:] = True  # a 32-token continuation after a 224-token context
        rows.append(est.rows(x, target, torch.Generator().manual_seed(i), args.samples))
    forward_rows(net, rows[:1], args.rows_per_pass)  # warm-up
    peak = max(matmul_peak() for _ in range(2))
    t0 = time.perf_counter()
    logits = forward_rows(net, rows, args.rows_per_pass)
    for r, lg in zip(rows, logits):
        est.cost(r, lg)
    seconds = time.perf_counter() - t0
    n_rows = sum(int(r.logits_at.any(1).sum()) for r in rows)
    n_logits = sum(r.num_logits for r in rows)
    per_row = args.layers * (2 * L * (4 * d * d + 3 * d * inter) + 4 * L * L * d)
    flops = n_rows * per_row + n_logits * 2 * d * V
    peak2 = max(matmul_peak() for _ in range(2))
    peak = max(peak, peak2)
    print(f"lit_gpt TransEncoder {args.layers}x{d} (I={inter}), V={V}, L={L}, {n_rows} rows, {n_logits} logits, "
          f"{args.threads} threads, fp32")
    print(f"matmul peak (1024^3, best)  {peak / 1e9:8.1f} GFLOP/s")
    print(f"scoring                     {flops / seconds / 1e9:8.1f} GFLOP/s  ({seconds:.2f} s, "
          f"{n_rows / seconds:.1f} rows/s)")
    print(f"ratio achieved / peak       {flops / seconds / peak:8.3f}")


if __name__ == "__main__":
    main()
