"""Peak RSS of `evaluate_perplexity` on 1 MB vs 20 MB of text: streaming keeps it flat (issue 5).

    python benchmarks/ppl_memory.py                      # WikiText-2 from $PRIME_EVAL_DATA, repeated to each size
    python benchmarks/ppl_memory.py --sizes 1 20 50 --L 1024 --tokenizer ../shared/data/tokenizers/gpt2

Each size runs in a fresh process (peak RSS = ru_maxrss of that process) over a .txt file of that many MB, read as
blank-line-separated paragraphs: tokenize, block (wrap, L), score, accumulate, exactly as `prime-eval ppl` does.
The network is a unigram ARM (logits = one learned bias vector) so the measurement is the pipeline's memory, not a
model's; by default the tokenizer is a 300-token BPE trained on the text in a second (a real one: --tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn


class UnigramARM(nn.Module):
    """The cheapest network of the contract: p(x_i | x_<i) = softmax(bias), whatever the context."""

    family, ell, base, mask_id, max_length = "arm", 1, None, None, 1 << 20

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, idx, *, attention_mask=None, logits_at=None):
        n = int(logits_at.sum()) if logits_at is not None else idx.numel()
        out = self.bias.expand(n, -1)
        return out if logits_at is not None else out.view(*idx.shape, -1)


def make_corpus(path: Path, megabytes: float, data: Path) -> None:
    """WikiText-2 test + valid, repeated until the file holds `megabytes` MB (1 MB = 10^6 bytes)."""
    text = (data / "wikitext2" / "test.txt").read_text(encoding="utf-8") + \
        (data / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    need = int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while need > 0:
            piece = text[:need]
            f.write(piece)
            need -= len(piece.encode("utf-8"))


def small_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    with open(path, encoding="utf-8") as f:
        sample = f.read(300_000)
    t.train_from_iterator([sample], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def child(args) -> None:
    """Run one size in this process and print a JSON line."""
    from prime_eval import perplexity as P

    torch.set_num_threads(1)
    if args.tokenizer:
        from prime_eval.checkpoints import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    else:
        tok = small_tokenizer(Path(args.corpus))
    net = UnigramARM(len(tok))
    t0 = time.perf_counter()
    res = P.evaluate_perplexity(net, tok, P.text_files([args.corpus]), P.Protocol(L=args.L, bootstrap=1000),
                                batch_size=args.batch_size)
    r = res["results"]
    print(json.dumps({"megabytes": args.mb, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "tokens": r["tokens"], "blocks": r["blocks"], "documents": r["documents"],
                      "bytes": r["bytes"], "seconds": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 20], help="corpus sizes in MB")
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tokenizer", default=None, help="a real tokenizer (default: 300-token BPE trained on the text)")
    ap.add_argument("--data", default=os.environ.get("PRIME_EVAL_DATA", "../shared/data"))
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes:
            corpus = Path(tmp) / f"corpus_{mb:g}MB.txt"
            make_corpus(corpus, mb, Path(args.data))
            cmd = [sys.executable, __file__, "--_child", "--corpus", str(corpus), "--mb", str(mb), "--L", str(args.L),
                   "--batch-size", str(args.batch_size)] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ,
                                 "TOKENIZERS_PARALLELISM": "false"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            corpus.unlink()
    print(f"{'text':>8} {'peak RSS':>10} {'tokens':>12} {'blocks':>8} {'documents':>10} {'time':>8}")
    for r in rows:
        print(f"{r['megabytes']:>6g}MB {r['peak_rss_mb']:>8.0f}MB {r['tokens']:>12,} {r['blocks']:>8,} "
              f"{r['documents']:>10,} {r['seconds']:>7.1f}s")
    if len(rows) > 1:
        print(f"peak RSS ratio largest/smallest: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f} "
              f"for {rows[-1]['megabytes'] / rows[0]['megabytes']:g}x the text")


if __name__ == "__main__":
    main()
