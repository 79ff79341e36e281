"""Benchmark (issue 10): log-likelihood bias against forward passes for mc, exact_count and iw (both proposals),
and accuracy with each, on the demo's trained tiny MDM and Prime-v2 models and real arc_easy (or piqa) documents.

Reference per request: iw with uniform proposal and --ref-orders orders (n·K passes), the tightest estimate of the
model's exact log p(continuation | context) available (IW_K rises to log p as K grows). For each estimator and a
budget of B forward passes per request, the mean over --repeats runs minus the reference is the bias (mc and
exact_count converge to the ELBO, whose gap to log p no number of samples closes; iw closes it).

    .venv/bin/python benchmarks/iw_bias.py [--docs 12] [--repeats 4] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import demo_models, real_requests  # noqa: E402
from prime_eval.estimators import forward_rows, get_estimator, mean_and_stderr  # noqa: E402


def estimates(net, est, reqs, k_of, seed, rows_per_pass=1024):
    """Per-request log-likelihood estimates (list) and passes used, for k_of(n_positions) samples each."""
    rows, out, passes = [], [], []
    for i, (ids, n) in enumerate(reqs):
        target = torch.zeros(ids.numel(), dtype=torch.bool)
        target[-n:] = True
        rows.append(est.rows(ids, target, torch.Generator().manual_seed(seed * 100003 + i), k_of(n)))
    for r, logits in zip(rows, forward_rows(net, rows, rows_per_pass)):
        out.append(-mean_and_stderr(est.cost(r, logits), getattr(est, "aggregate", None))[0])
        passes.append(int(r.logits_at.any(1).sum()))
    return np.array(out), np.array(passes)


def main() -> None:
    from prime_eval.demo.numerics import pin

    pin()  # first: the demo scale's models are trained with the float kernels `prime-eval demo` uses
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--ref-orders", type=int, default=64)
    ap.add_argument("--max-continuation", type=int, default=6, help="tokens; keeps n·K passes affordable")
    ap.add_argument("--task", default="arc_easy", choices=["arc_easy", "piqa"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = demo_models(quick=args.quick)
    print(f"log-likelihood bias vs forward passes ({args.task}, {args.docs} docs, continuations <= "
          f"{args.max_continuation} tokens, {args.repeats} repeats; reference: iw uniform, {args.ref_orders} orders)")
    for family in ("mdm", "prime"):
        net, tok, st = models[family]
        docs = [d for d in real_requests(args.task, 2000, tok, net.max_length)
                if all(n <= args.max_continuation for _, n in d[1])][:args.docs]
        reqs = [r for _, rr, _ in docs for r in rr]
        golds = [g for _, _, g in docs]
        spans, at = [], 0
        for _, rr, _ in docs:
            spans.append((at, at + len(rr)))
            at += len(rr)

        def accuracy(ll):
            return float(np.mean([int(np.argmax(ll[a:b]) == g) for (a, b), g in zip(spans, golds)]))
        opts = {"mask_id": net.mask_id} if family == "mdm" else {"subtokenizer": st}
        ell = st.ell if st else 1
        t0 = time.perf_counter()
        ref, ref_passes = estimates(net, get_estimator(family, "iw", net=net, proposal="uniform", **opts), reqs,
                                    lambda n: args.ref_orders, seed=999)
        print(f"\n{family}: {len(docs)} docs, reference {ref_passes.mean():.0f} passes/request "
              f"({time.perf_counter() - t0:.0f} s)")
        print(f"{'estimator':22s} {'passes/req':>10s} {'bias (nats)':>12s} {'RMSE':>8s} {'accuracy':>9s}")
        for mult in (1, 4, 16):
            for name, extra in (("mc", {}), ("exact_count", {}), ("iw", {"proposal": "uniform"}),
                                ("iw", {"proposal": "pl", "net": net})):
                est = get_estimator(family, name, **opts, **extra)
                k_of = (lambda n, m=mult: m) if name == "iw" else (lambda n, m=mult: m * n * ell)
                runs, passes = [], None
                for rep in range(args.repeats):
                    vals, passes = estimates(net, est, reqs, k_of, seed=rep)
                    runs.append(vals)
                runs = np.array(runs)  # (R, requests)
                bias = float((runs.mean(0) - ref).mean())
                rmse = float(np.sqrt(((runs - ref[None]) ** 2).mean()))
                acc = float(np.mean([accuracy(r) for r in runs]))  # accuracy of one run, averaged
                label = name + (f" ({extra['proposal']})" if "proposal" in extra else "")
                print(f"{label:22s} {passes.mean():10.0f} {bias:+12.3f} {rmse:8.3f} {acc:9.3f}")
        ref_acc = accuracy(ref)
        print(f"{'reference (iw, K=' + str(args.ref_orders) + ')':22s} {ref_passes.mean():10.0f} {0:+12.3f} "
              f"{0:8.3f} {ref_acc:9.3f}")


if __name__ == "__main__":
    main()
