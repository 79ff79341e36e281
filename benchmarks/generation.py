"""Benchmark (issue 16): generation speed and cost.

1. ARM: tokens per second of our `arm` generate_until (key/value cache, batched across requests) against lm-eval's
   `hf` (transformers' `generate`), same model, same requests (real boolq passages from $PRIME_EVAL_DATA as prompts,
   greedy, no stop string, --max-gen-toks each), both at --batch-size; also checks that the answers are identical.
   The model: --shape as in benchmarks/arm_vs_hf.py (default a SmolLM-135M-shaped Llama, random weights).
2. Diffusion samplers: forward passes (network rows) per generated token, at their documented defaults and a few
   documented options, on random lit_gpt TransEncoder networks (MDM ℓ = 1; Prime ℓ = 16, b = 2 over the GPT-2
   vocabulary, as the Megatron Prime-v2 runs) — the count is a property of the sampler and its settings, not of the
   weights — with the wall time per token (--temperature, default 0: greedy, what generative tasks ask).

    .venv/bin/python benchmarks/generation.py [--docs 8] [--max-gen-toks 16] [--batch-size 8] [--answer 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.arm_vs_hf import build_model  # noqa: E402
from benchmarks.common import DATA  # noqa: E402


def prompts(n: int) -> list[str]:
    """lm-eval boolq-seq2seq prompts of the first n boolq documents."""
    rows = [json.loads(line) for _, line in zip(range(n), (DATA / "boolq" / "validation.jsonl").open())]
    return [f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:" for r in rows]


def arm_tokens_per_second(args, folder: Path) -> None:
    import lm_eval
    from lm_eval.api.instance import Instance

    from model_adapters import ARMLM

    reqs = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": args.max_gen_toks, "do_sample": False}),
                     0, ("boolq-seq2seq", i, 1)) for i, p in enumerate(prompts(args.docs))]
    hf = lm_eval.api.registry.get_model("hf").create_from_arg_string(
        f"pretrained={folder},dtype=float32,max_length=512", {"batch_size": args.batch_size, "device": "cpu"})
    ours = ARMLM(checkpoint=str(folder), device="cpu", rows_per_pass=args.batch_size, max_length=512)
    times, outs = {}, {}
    for kind, lm in (("hf", hf), ("arm", ours)):
        t0 = time.perf_counter()
        outs[kind] = lm.generate_until(reqs, disable_tqdm=True)
        times[kind] = time.perf_counter() - t0
    rows = [r for r in ours.stats if r.get("kind") == "generate_until"]
    tokens = sum(r["generated_tokens"] for r in rows)
    same = sum(a == b for a, b in zip(outs["hf"], outs["arm"]))
    print(f"ARM generation: {args.docs} boolq prompts, greedy, {args.max_gen_toks} new tokens each, batch "
          f"{args.batch_size}; {tokens} tokens generated")
    for kind in ("hf", "arm"):
        print(f"  {'lm-eval hf' if kind == 'hf' else 'prime-eval arm':<15} {times[kind]:7.2f} s  "
              f"{tokens / times[kind]:7.2f} tokens/s")
    print(f"  speed-up hf/arm {times['hf'] / times['arm']:.2f}; identical answers {same}/{len(reqs)}")


def diffusion_passes(args) -> None:
    import torch

    from prime_eval.generation import GenRequest, generate
    from prime_eval.networks.lit_gpt import Config, TransEncoder
    from prime_eval.subtokenizer import SubTokenizer

    torch.manual_seed(0)
    cfg = Config(n_layer=2, n_embd=64, n_head=4, intermediate_size=128, vocab_size=50257, block_size=256)
    mdm = TransEncoder(cfg).eval()
    prime = TransEncoder(cfg, ell=16, base=2).eval()
    st = SubTokenizer(50257, ell=16, base=2)
    L = args.answer
    reqs = [GenRequest(tuple(range(100 + i, 120 + i)), L, seed=i, temperature=args.temperature)
            for i in range(args.requests)]
    runs = [("mdm", "low_confidence (default): steps = answer length", mdm, {}),
            ("mdm", "low_confidence, block_length = L/4", mdm, {"block_length": L // 4}),
            ("mdm", "low_confidence, steps = L/2", mdm, {"steps": L // 2}),
            ("mdm", "random remasking", mdm, {"remasking": "random"}),
            ("mdm", "ancestral (MDLM)", mdm, {"remasking": "ancestral"}),
            ("mdm", "low_confidence, cfg = 0.5", mdm, {"cfg": 0.5}),
            ("prime", "partial masking (default): steps = L, ℓ = 16", prime, {"subtokenizer": st}),
            ("prime", "chunk_point = 0 (whole tokens, the release's default)", prime,
             {"subtokenizer": st, "chunk_point": 0.0}),
            ("prime", "chunk_point = 0.5", prime, {"subtokenizer": st, "chunk_point": 0.5}),
            ("prime", "steps = 4L", prime, {"subtokenizer": st, "steps": 4 * L})]
    print(f"\nDiffusion samplers: {args.requests} requests, 20-token prompts, answers of {L} tokens, temperature "
          f"{args.temperature} (forward rows per generated token; a CFG step is two rows)")
    for family, label, net, opts in runs:
        t0 = time.perf_counter()
        gens = generate(family, net, reqs, **opts)
        seconds = time.perf_counter() - t0
        per_token = sum(g.forward_passes for g in gens) / sum(len(g.tokens) for g in gens)
        print(f"  {family:<5} {label:<58} {per_token:6.3f} passes/token  {seconds / (len(reqs) * L) * 1e3:7.2f} "
              "ms/token")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=8, help="ARM: prompts")
    ap.add_argument("--max-gen-toks", type=int, default=16, help="ARM: new tokens per prompt")
    ap.add_argument("--batch-size", type=int, default=8, help="ARM: batch size of both")
    ap.add_argument("--shape", choices=("smollm-135m", "gpt2-small"), default="smollm-135m")
    ap.add_argument("--answer", type=int, default=32, help="diffusion: answer length in tokens")
    ap.add_argument("--requests", type=int, default=8, help="diffusion: requests")
    ap.add_argument("--temperature", type=float, default=0.0, help="diffusion: sampling temperature (0: greedy, as "
                    "lm-eval's generative tasks)")
    ap.add_argument("--skip-arm", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()
    if not args.skip_arm:
        folder = Path(tempfile.mkdtemp(prefix="generation_")) / "model"
        print(f"model: {build_model(args.shape, folder)}")
        arm_tokens_per_second(args, folder)
    diffusion_passes(args)
    print(f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
