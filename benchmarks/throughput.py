"""Throughput of Monte Carlo likelihood scoring: cross-request batching (the adapters' path) vs one request at a time.

    .venv/bin/python benchmarks/throughput.py                      # MDM, lit_gpt TransEncoder ~8 M params
    .venv/bin/python benchmarks/throughput.py --family prime --ell 4 --requests 48 --samples 32

Three ways to score the same requests with the same estimator, seeds and number of samples (so the same numbers):
  published   one request at a time, its K rows in MC mini-batches of --mc-batch, full (B, L, V) logits
              (SMDM / LLaDA / Prime-v2 adapters: `batch_size` is the MC mini-batch);
  per-request one request at a time, logits only where the loss needs them (`forward_rows` on one request);
  batched     the adapters' path: rows of all requests packed into passes of --rows-per-pass rows, logits only
              where needed (`prime_eval.estimators.forward_rows` over the whole request list).
rows/s counts the MC rows that carry a loss term (the same useful work in every mode).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from prime_eval.estimators import forward_rows, get_estimator
from prime_eval.networks.lit_gpt import Config, TransEncoder
from prime_eval.subtokenizer import SubTokenizer


def make_requests(n: int, vocab: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Multiple-choice-like requests: contexts of 32-96 tokens, continuations of 1-12 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lc, lt = int(torch.randint(32, 97, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
        x = torch.randint(0, vocab, (lc + lt,), generator=g)
        target = torch.zeros(lc + lt, dtype=torch.bool)
        target[lc:] = True
        out.append((x, target, 1000 + i))
    return out


def published(net, est, reqs, K, mc_batch):
    means = []
    for x, target, seed in reqs:
        rows = est.rows(x, target, torch.Generator().manual_seed(seed), K)
        logits = []
        with torch.no_grad():
            for s in range(0, rows.num_rows, mc_batch):
                dev = rows.inputs[s:s + mc_batch].to(next(net.parameters()).device)
                full = net(dev).cpu()  # (B, L, V): every position, as the published loops do
                logits.append(full[rows.logits_at[s:s + mc_batch]])
        means.append(float(est.cost(rows, torch.cat(logits)).mean()))
    return means


def per_request(net, est, reqs, K, rows_per_pass):
    means = []
    for x, target, seed in reqs:
        rows = est.rows(x, target, torch.Generator().manual_seed(seed), K)
        (logits,) = forward_rows(net, [rows], rows_per_pass)
        means.append(float(est.cost(rows, logits).mean()))
    return means


def batched(net, est, reqs, K, rows_per_pass):
    rows = [est.rows(x, t, torch.Generator().manual_seed(seed), K) for x, t, seed in reqs]
    return [float(est.cost(r, lg).mean()) for r, lg in zip(rows, forward_rows(net, rows, rows_per_pass))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("mdm", "prime"), default="mdm")
    p.add_argument("--estimator", default="mc")
    p.add_argument("--ell", type=int, default=4, help="Prime ℓ")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--samples", type=int, default=16, help="Monte Carlo samples per request (K)")
    p.add_argument("--mc-batch", type=int, default=16, help="published loop: MC rows per forward pass")
    p.add_argument("--rows-per-pass", type=int, default=64, help="rows per forward pass (ours)")
    p.add_argument("--repeats", type=int, default=3, help="modes run interleaved this many times; the best is kept")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Config(n_layer=a.layers, n_embd=a.d, n_head=max(1, a.d // 64), intermediate_size=4 * a.d,
                 vocab_size=a.vocab, block_size=256)
    ell = a.ell if a.family == "prime" else 1
    net = TransEncoder(cfg, ell=ell).to(a.device).eval().requires_grad_(False)
    if a.family == "prime":
        est = get_estimator("prime", a.estimator, subtokenizer=SubTokenizer(a.vocab, ell=ell, base=net.base))
    else:
        est = get_estimator("mdm", a.estimator, mask_id=net.mask_id)
    reqs = make_requests(a.requests, a.vocab, 0)
    useful = sum(int(est.rows(x, t, torch.Generator().manual_seed(s), a.samples).logits_at.any(1).sum())
                 for x, t, s in reqs)
    params = sum(q.numel() for q in net.parameters())
    print(f"{a.family} TransEncoder {params / 1e6:.1f} M params, V={a.vocab}, ℓ={ell}, estimator {a.estimator}, "
          f"{a.requests} requests x K={a.samples} samples = {useful} MC rows with a loss term; "
          f"{torch.get_num_threads()} threads")
    batched(net, est, reqs[:2], a.samples, a.rows_per_pass)  # warm-up
    results: dict[str, tuple[float, list[float]]] = {}
    for _ in range(a.repeats):  # interleaved, best of N: robust to other load on the machine
        for name, fn, arg in (("published (1 request at a time, full logits)", published, a.mc_batch),
                              ("per-request (1 request at a time, logits_at)", per_request, a.rows_per_pass),
                              ("batched across requests (adapters)", batched, a.rows_per_pass)):
            t0 = time.perf_counter()
            means = fn(net, est, reqs, a.samples, arg)
            wall = time.perf_counter() - t0
            results[name] = min(results.get(name, (wall, means)), (wall, means), key=lambda r: r[0])
    ref = results["published (1 request at a time, full logits)"]
    print(f"best of {a.repeats} interleaved runs")
    print(f"{'mode':48s} {'wall s':>8s} {'rows/s':>9s} {'speed-up':>9s}")
    for name, (wall, means) in results.items():
        assert all(math.isclose(m, r, rel_tol=1e-4, abs_tol=1e-4) for m, r in zip(means, ref[1])), name
        print(f"{name:48s} {wall:8.2f} {useful / wall:9.1f} {ref[0] / wall:8.2f}x")
    print(f"ratio batched / published wall time: {results['batched across requests (adapters)'][0] / ref[0]:.3f} "
          f"(same per-request estimates in every mode)")


if __name__ == "__main__":
    main()
