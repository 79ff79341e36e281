"""Benchmark 1 (issues 9, 17): variance at equal forward passes, per request and per choice difference.

On trained MDM and Prime-v2 models (`--scale demo`: the demo's 0.4 M-parameter networks; `--scale llama`: a
Diff_LLaMA shape with the Llama-2 tokenizer, benchmarks/common.py) and real piqa documents, each estimator scores
every choice of every document R times with fresh seeds, using about P forward passes per request; we report the
variance of the per-request log-likelihood and of the difference between the two choices of a document, times the
passes used ("variance per pass": for independent samples variance ∝ 1/passes, so this compares estimators at equal
cost), and its ratio to SMDM-style (target for Prime's default: ≥ 4× lower).

    SMDM-style   mc, t stratified, independent masks, a fresh seed per request
    LLaDA-style  exact_count, a fresh seed per request
    mc + CRN     mc with the document's seed shared by its choices (same t_k and mask draws)
    levels + CRN every exact-count level once per random order (n passes per sample), document seed shared
    exact_count + CRN  exact_count with the document's seed shared
    sqrt_count + CRN   the count importance-sampled, q(l) ∝ l^(-1/2), weight 1/(q(l)·l), document seed shared

    .venv/bin/python benchmarks/variance.py [--scale demo|llama] [--docs 16] [--repeats 8] [--passes 128]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SCALES, bench_models, load_uptime, real_requests  # noqa: E402
from prime_eval.estimators import forward_rows, get_estimator, mean_and_stderr  # noqa: E402
from prime_eval.settings import DEFAULT_ESTIMATOR  # noqa: E402

CONFIGS = [("SMDM-style mc", "mc", False), ("LLaDA-style exact_count", "exact_count", False),
           ("mc + CRN", "mc", True), ("levels + CRN", "levels", True),
           ("exact_count + CRN", "exact_count", True), ("sqrt_count + CRN", "sqrt_count", True)]
VARIANCE_TARGET = 4.0  # Prime: the default's variance of choice differences per pass, SMDM-style / default


def run(net, st, family, docs, name, crn, passes, repeats, rows_per_pass=512):
    opts = {"mask_id": net.mask_id} if family == "mdm" else {"subtokenizer": st}
    est = get_estimator(family, name, **opts)
    ell = st.ell if family == "prime" else 1
    ll = np.zeros((repeats, len(docs), 2))
    used = []
    for r in range(repeats):
        rows, where = [], []
        for d, (doc_i, reqs, _) in enumerate(docs):
            for c, (ids, n) in enumerate(reqs[:2]):
                target = torch.zeros(ids.numel(), dtype=torch.bool)
                target[-n:] = True
                seed = hash((r, doc_i)) if crn else hash((r, doc_i, c))  # int tuples: stable across runs
                k = max(1, passes // (n * ell)) if name == "levels" else passes
                rows.append(est.rows(ids, target, torch.Generator().manual_seed(seed % (2**62)), k))
                where.append((d, c))
        for (d, c), rw, logits in zip(where, rows, forward_rows(net, rows, rows_per_pass)):
            ll[r, d, c] = -mean_and_stderr(est.cost(rw, logits))[0]
            if r == 0:
                used.append(int(rw.logits_at.any(1).sum()))
    var_req = ll.var(axis=0, ddof=1).mean()
    var_diff = (ll[:, :, 0] - ll[:, :, 1]).var(axis=0, ddof=1).mean()
    p = float(np.mean(used))
    return {"passes": p, "var_req": var_req, "var_diff": var_diff, "vpp_req": var_req * p, "vpp_diff": var_diff * p,
            "mean_ll": ll.mean()}


def main() -> None:
    from prime_eval.demo.numerics import pin

    pin()  # first: the demo scale's models are trained with the float kernels `prime-eval demo` uses
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--passes", type=int, default=128, help="forward passes per request")
    ap.add_argument("--max-continuation", type=int, default=12, help="tokens (keeps levels within the budget)")
    ap.add_argument("--scale", choices=SCALES, default="demo")
    ap.add_argument("--config", default="Diff_LLaMA_6M", help="--scale llama: the Diff_LLaMA shape")
    ap.add_argument("--families", nargs="*", default=["mdm", "prime"])
    ap.add_argument("--estimators", nargs="*", default=None, help="labels' estimator names to run (SMDM first)")
    ap.add_argument("--quick", action="store_true", help="--scale demo: the demo's quick models")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = bench_models(args.scale, config=args.config, quick=args.quick)
    configs = [c for i, c in enumerate(CONFIGS) if i == 0 or not args.estimators or c[1] in args.estimators]
    print(f"variance at equal forward passes: piqa, {args.docs} docs x 2 choices, {args.repeats} repeats, "
          f"~{args.passes} passes/request; {load_uptime()} at start")
    for family in args.families:
        m = models[family]
        net, st = m.net, m.subtokenizer
        docs = [d for d in real_requests("piqa", 400, m.tokenizer, net.max_length)
                if all(n <= args.max_continuation for _, n in d[1][:2])][:args.docs]
        print(f"\n{m.label}: {len(docs)} documents" + (f", ℓ={st.ell}" if st else ""))
        print(f"{'estimator':26s} {'passes':>7s} {'var(ll)':>10s} {'var(diff)':>10s} {'var·passes(diff)':>17s} "
              f"{'ratio vs SMDM':>14s}  seconds")
        base, ratios = None, {}
        for label, name, crn in configs:
            t0 = time.perf_counter()
            r = run(net, st, family, docs, name, crn, args.passes, args.repeats)
            base = base or r
            ratios[(name, crn)] = base["vpp_diff"] / r["vpp_diff"]
            print(f"{label:26s} {r['passes']:7.1f} {r['var_req']:10.4f} {r['var_diff']:10.4f} "
                  f"{r['vpp_diff']:17.2f} {ratios[(name, crn)]:13.1f}x  {time.perf_counter() - t0:6.1f}  "
                  f"[{load_uptime()}]")
        default = DEFAULT_ESTIMATOR["score"][family]
        if (default, True) in ratios:
            ratio = ratios[(default, True)]
            met = "met" if ratio >= VARIANCE_TARGET else "NOT met"
            print(f"  -> {family}: the default ({default} + CRN) has {ratio:.1f}x lower variance of "
                  f"choice differences than SMDM-style at equal passes (target >= {VARIANCE_TARGET:.0f}x"
                  + (f": {met})" if family == "prime" else ", set for Prime)"))


if __name__ == "__main__":
    main()
