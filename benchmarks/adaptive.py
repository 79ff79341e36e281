"""Benchmark 2 (issue 9): forward passes needed to reproduce the accuracy decisions of a fixed 1024-sample run.

On the demo's trained tiny MDM and Prime-v2 models and real piqa documents, through the adapters (the code path of
`prime-eval score`): a reference run with 1024 samples per request (SMDM-style: mc, fresh seed per request, no
adaptivity), then the default settings of `prime-eval score` (exact_count, common random numbers per document,
adaptive rounds up to the same cap of 1024). Prints the passes each used, their ratio, and how many of the
reference's acc / acc_norm decisions the adaptive run reproduces.

    .venv/bin/python benchmarks/adaptive.py [--docs 40] [--cap 1024] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATA, demo_models  # noqa: E402


def piqa_instances(n_docs: int):
    import json

    from lm_eval.api.instance import Instance

    out = []
    for i, line in enumerate((DATA / "piqa" / "validation.jsonl").open()):
        if i >= n_docs:
            break
        doc = json.loads(line)
        ctx = f"Question: {doc['goal']}\nAnswer:"
        for c, sol in enumerate((doc["sol1"], doc["sol2"])):
            out.append(Instance("loglikelihood", doc, (ctx, " " + sol), c, ("piqa", i, 1)))
    return out


def decisions(stats):
    by_doc = {}
    for r, inst_chars in stats:
        by_doc.setdefault(r["doc_id"], []).append((r["loglikelihood"], r["loglikelihood"] / inst_chars))
    acc = {d: max(range(len(v)), key=lambda c: v[c][0]) for d, v in by_doc.items()}
    norm = {d: max(range(len(v)), key=lambda c: v[c][1]) for d, v in by_doc.items()}
    return acc, norm


def run(cls, net, tok, instances, extra, **kw):
    lm = cls(model=net, tokenizer=tok, greedy=False, rows_per_pass=512, **extra, **kw)
    t0 = time.perf_counter()
    lm.loglikelihood(instances, disable_tqdm=True)
    seconds = time.perf_counter() - t0
    chars = [len(i.args[1]) for i in instances]
    passes = sum(r["num_forward_rows"] for r in lm.stats)
    return lm.stats, list(zip(lm.stats, chars)), passes, seconds


def main() -> None:
    from model_adapters import MDMLM, PrimeLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--cap", type=int, default=1024, help="samples of the reference run and the adaptive cap")
    ap.add_argument("--quick", action="store_true", help="the demo's quick models")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models, art = demo_models(quick=args.quick, with_artifacts=True)
    instances = piqa_instances(args.docs)
    print(f"passes to reproduce a {args.cap}-sample run's decisions: piqa, {args.docs} documents x 2 choices")
    print(f"{'model':6s} {'run':44s} {'passes':>9s} {'seconds':>8s} {'acc same':>9s} {'acc_norm same':>14s} "
          f"{'settled':>8s}")
    for family, cls in (("mdm", MDMLM), ("prime", PrimeLM)):
        net, tok, st = models[family]
        extra = {"permutation": str(art.permutation)} if family == "prime" else {}  # trained with shuffled ids
        _, ref_pairs, ref_passes, ref_s = run(cls, net, tok, instances, extra, estimator="mc", samples=args.cap,
                                              adaptive=False, crn=False)
        ref_acc, ref_norm = decisions(ref_pairs)
        print(f"{family:6s} {'reference: mc, fresh seeds, fixed ' + str(args.cap):44s} {ref_passes:9d} {ref_s:8.1f}")
        for label, kw in (("default: exact_count + CRN + adaptive", {"estimator": "exact_count"}),
                          ("mc + CRN + adaptive", {"estimator": "mc"})):
            stats, pairs, passes, s = run(cls, net, tok, instances, extra, samples=args.cap, **kw)
            acc, norm = decisions(pairs)
            same = sum(acc[d] == ref_acc[d] for d in acc)
            same_n = sum(norm[d] == ref_norm[d] for d in norm)
            settled = sum(1 for r in stats if r.get("settled")) // 2
            print(f"{'':6s} {label:44s} {passes:9d} {s:8.1f} {same:4d}/{len(acc):<4d} {same_n:9d}/{len(norm):<4d} "
                  f"{settled:4d}/{len(acc):<3d}  passes ratio {passes / ref_passes:.3f}")


if __name__ == "__main__":
    main()
