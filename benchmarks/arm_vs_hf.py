"""Benchmark 4 (issue 9): wall time of our `arm` adapter over lm-eval's own `hf` model, same model, same tasks.

A GPT-2-architecture model (random weights, --layers x --width) saved with `save_pretrained`, the real GPT-2
tokenizer from $PRIME_EVAL_DATA, real piqa / arc_easy / hellaswag documents (--limit each), scored through
`lm_eval.simple_evaluate` by both model classes in the same process, alternating, best of --repeats.
Also checks that both return the same log-likelihoods. Target ratio (ours / hf): at most 1.0.

    .venv/bin/python benchmarks/arm_vs_hf.py [--limit 100] [--layers 4] [--width 256] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATA  # noqa: E402

TASKS = ["piqa", "arc_easy", "hellaswag"]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import lm_eval
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from model_adapters import ARMLM
    from prime_eval.tasks import build_task_manager

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="arm_vs_hf_"))
    tok = GPT2Tokenizer.from_pretrained(str(DATA / "tokenizers" / "gpt2"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64),
                                       n_positions=1024))
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    tm = build_task_manager(data_dir=DATA, tasks=TASKS, cache_dir=tmp / "tasks")

    def run(kind):
        if kind == "hf":
            lm = lm_eval.api.registry.get_model("hf").create_from_arg_string(
                f"pretrained={tmp / 'model'},dtype=float32", {"batch_size": args.batch_size, "device": "cpu"})
        else:
            lm = ARMLM(checkpoint=str(tmp / "model"), rows_per_pass=args.batch_size, device="cpu")
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, limit=args.limit, log_samples=True,
                                      bootstrap_iters=0, verbosity="ERROR")
        seconds = time.perf_counter() - t0
        lls = [r[0][0] for t in TASKS for s in res["samples"][t] for r in s["resps"]]
        return seconds, lls

    best = {"hf": float("inf"), "arm": float("inf")}
    outputs = {}
    for _ in range(args.repeats):
        for kind in ("hf", "arm"):
            seconds, lls = run(kind)
            best[kind] = min(best[kind], seconds)
            outputs[kind] = lls
    diff = max(abs(a - b) for a, b in zip(outputs["hf"], outputs["arm"]))
    n = len(outputs["hf"])
    print(f"{n} loglikelihood requests ({', '.join(TASKS)}, limit {args.limit}), GPT-2 arch {args.layers}x"
          f"{args.width}, batch {args.batch_size}, CPU, best of {args.repeats}")
    print(f"lm-eval hf      {best['hf']:7.2f} s")
    print(f"prime-eval arm  {best['arm']:7.2f} s")
    print(f"ratio arm/hf    {best['arm'] / best['hf']:7.3f}   (max |Δ loglikelihood| = {diff:.2e})")


if __name__ == "__main__":
    main()
