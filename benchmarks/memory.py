"""Peak resident memory of `prime-eval score` and `prime-eval ppl`, against weights + one batch of activations.

    .venv/bin/python benchmarks/memory.py                         # tiny (Diff_LLaMA_6M) and 1.1B (Diff_LLaMA_1028M)
    .venv/bin/python benchmarks/memory.py --configs Diff_LLaMA_6M --data ../shared/data

For each config a random-weight lit_gpt MDM (TransEncoder, Llama-2 vocabulary of 32000) is saved to a temporary
file (by a child process, so this one never holds the weights; the 1.1B file is 4.1 GB fp32 and is deleted at the
end). Then, each in a fresh child process, whose peak RSS (`ru_maxrss` from wait4) is read:

  imports  python -c "import torch, lm_eval, prime_eval.commands.score, model_adapters, prime_eval.perplexity"
  score    prime-eval score --model mdm ... --tasks piqa --limit 3 (6 requests, 2 MC samples, greedy off)
  ppl      prime-eval ppl --model mdm ... --files wikitext2/test.txt --L 128 --max-tokens 256 (K = 1)

The claim checked (issue 8): peak − imports ≤ 1.3 × weights + one batch of activations, where one batch is
`rows_per_pass` rows of `max_length` tokens through one block (hidden states, q/k/v, attention weights, SwiGLU
intermediates, fp32) plus its logits (fp32 and the estimator's fp64 copy):
    A = 4·R·L·(10·d + 4·I + H·L) + 12·R·L·V.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAVE = """
import sys, torch
from prime_eval.networks.lit_gpt import Config, TransEncoder
torch.manual_seed(0)
cfg = Config.from_name(sys.argv[1])
with torch.device("meta"):
    net = TransEncoder(cfg)
net = net.to_empty(device="cpu")
with torch.no_grad():
    for p in net.parameters():
        p.normal_(0, 0.02)
torch.save(net.state_dict(), sys.argv[2])
"""
IMPORTS = "import torch, lm_eval, prime_eval.commands.score, model_adapters, prime_eval.perplexity"


def run(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run a child; return (its peak RSS in bytes, the tail of its output). Fails loudly on a non-zero exit."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return usage.ru_maxrss * 1024, out[-400:]  # Linux: kilobytes


def activation_bytes(cfg, rows: int, length: int) -> int:
    d, inter, heads, V = cfg.n_embd, cfg.intermediate_size, cfg.n_head, cfg.vocab_size
    return 4 * rows * length * (10 * d + 4 * inter + heads * length) + 12 * rows * length * V


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="Diff_LLaMA_6M,Diff_LLaMA_1028M")
    ap.add_argument("--data", default=os.environ.get("PRIME_EVAL_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--rows-per-pass", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--tmp", default=None, help="folder for the weight files (default: the system temp folder)")
    args = ap.parse_args()

    from prime_eval.networks.lit_gpt import Config

    data = Path(args.data)
    tok = data / "tokenizers" / "llama2" / "tokenizer.model"
    text = data / "wikitext2" / "test.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    py = sys.executable
    base_rss, _ = run([py, "-c", IMPORTS], env)
    rows = []
    for name in args.configs.split(","):
        cfg = Config.from_name(name)
        tmp = Path(tempfile.mkdtemp(prefix="prime-eval-mem-", dir=args.tmp))
        try:
            ckpt = tmp / f"{name}.pt"
            params = (cfg.padded_vocab_size + 1) * cfg.n_embd + cfg.padded_vocab_size * cfg.n_embd \
                + cfg.non_embedding_params()
            weights = 4 * params
            free = shutil.disk_usage(tmp).free
            if free < 1.2 * weights:
                raise SystemExit(f"{name}: {weights / 2**30:.1f} GiB of weights, only {free / 2**30:.1f} GiB free "
                                 f"in {tmp}; pass --tmp DIR")
            run([py, "-c", SAVE, name, str(ckpt)], env)
            act = activation_bytes(cfg, args.rows_per_pass, args.max_length)
            margs = (f"checkpoint={ckpt},tokenizer={tok},samples=2,greedy=false,"
                     f"rows_per_pass={args.rows_per_pass},max_length={args.max_length}")
            score_rss, _ = run([py, "-m", "prime_eval.cli", "score", "--model", "mdm", "--model_args", margs,
                                "--tasks", "piqa", "--limit", "3", "--data-dir", str(data),
                                "--bootstrap_iters", "0"], env)
            ppl_rss, _ = run([py, "-m", "prime_eval.cli", "ppl", "--model", "mdm", "--model_args",
                              f"checkpoint={ckpt},tokenizer={tok}", "--files", str(text), "--L",
                              str(args.max_length), "--max-tokens", str(2 * args.max_length), "--batch-size",
                              str(args.rows_per_pass), "--bootstrap", "0", "--no-progress"], env)
            for what, rss in (("score", score_rss), ("ppl", ppl_rss)):
                rows.append((name, what, params, weights, act, rss - base_rss))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    mib = 2**20
    print(f"imports alone: {base_rss / mib:.0f} MiB peak RSS (subtracted below)")
    print(f"{'config':<18}{'run':<7}{'params':>14}{'weights MiB':>13}{'1 batch MiB':>13}{'bound MiB':>11}"
          f"{'peak MiB':>10}{'peak/(W+A)':>12}  ok")
    for name, what, params, w, a, peak in rows:
        bound = 1.3 * w + a
        print(f"{name:<18}{what:<7}{params:>14,}{w / mib:>13.0f}{a / mib:>13.0f}{bound / mib:>11.0f}"
              f"{peak / mib:>10.0f}{peak / (w + a):>12.2f}  {'yes' if peak <= bound else 'NO'}")


if __name__ == "__main__":
    main()
