"""Why the output head runs on HEAD_ROWS = 256 hidden states at a time (`prime_eval.estimators.rows`).

    python benchmarks/head_rows.py

For realistic widths (d, V) and random N(0, 0.02) weights, the logits h @ Wᵀ of the first 16 of 1024 hidden states
computed with N rows in the matrix, N = 1 … 1024, compared bit for bit with N = 1024 ("=1024"); and, at each N, whether
a row's logits depend on its slot (the rows permuted) or on the other rows' values (replaced by zeros). A BLAS picks
its kernel by shape, so "=1024" can fail for small N; "slot" and "content" must hold for fixed shapes to make a
request's numbers independent of what shares its head call.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = (1, 4, 16, 64, 128, 256, 512, 1024)
    print(f"{'d':>5} {'V':>6}  " + " ".join(f"{n:>5}" for n in sizes) + "   (=1024 / slot / content at each N)")
    for d, V in ((64, 50257), (576, 4096), (576, 49152), (768, 50257), (1792, 32000)):
        W = torch.randn(V, d) * 0.02
        h = torch.randn(1024, d)
        ref = F.linear(h, W)[:16]
        cells = []
        for n in sizes:
            y = F.linear(h[:n].clone(), W)
            perm = torch.randperm(n)
            zeros = h[:n].clone()
            zeros[1:] = 0
            k = min(n, 16)
            cells.append("".join("y" if ok else "n" for ok in (
                torch.equal(y[:k], ref[:k]), torch.equal(F.linear(h[:n][perm], W), y[perm]),
                torch.equal(F.linear(zeros, W)[0], y[0]))))
        print(f"{d:>5} {V:>6}  " + " ".join(f"{c:>5}" for c in cells))


if __name__ == "__main__":
    main()
