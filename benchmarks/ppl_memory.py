"""Peak memory of `prime-eval ppl` (issue 14): the logits of a pass, against a plain loop; and the corpus size.

    python benchmarks/ppl_memory.py                       # logits: ppl vs a plain loop, L=512, batch 4 and 16, V=50,257
    python benchmarks/ppl_memory.py --streaming           # corpus: 1 MB vs 20 MB of text (RSS stays flat)

Logits (default). A random small-width lit_gpt MDM (1 layer, d=64) over GPT-2's vocabulary of 50,257 (a realistic V:
the head, not the trunk, is what costs memory), WikiText-2 test text in blocks of L=512 framed [BOS] ... [EOS], K=1.
Each case runs in a fresh process and reports its peak RSS (ru_maxrss), the RSS just before the loop (model,
tokenizer, libraries) and their difference, the memory of the loop itself:
  * plain: for each batch of B blocks, t ~ U(0,1) per block, mask each position with prob t, logits = net(x_t)
           (B, L, V) and the weighted cross-entropy of the masked positions: the loop anyone would write.
  * ppl:   `evaluate_perplexity` with batch_size=B over the same text (it reads the same blocks).
The plain loop holds one pass's logits (B·L·V floats, what the network returns). ppl holds one pass's hidden states
(B·L·d) and the logits of one head call (256 rows × V) at a time, so its memory stays flat in B (before issue 14 it
also held the logits of every row of a step plus a copy per block: 4.4 GB against 1.6 GB at this size).

Corpus (--streaming). Each size runs in a fresh process over a .txt file of that many MB, read as blank-line-separated
paragraphs: tokenize, block (wrap, L), score, accumulate, exactly as `prime-eval ppl` does. The network is a unigram
ARM (logits = one learned bias vector) so the measurement is the pipeline's memory, not a model's; the tokenizer is a
300-token BPE trained on the text in a second (a real one: --tokenizer).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prime_eval.networks.contract import HiddenHead  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (MB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class UnigramARM(HiddenHead, nn.Module):
    """The cheapest network of the contract: p(x_i | x_<i) = softmax(bias), whatever the context (hidden states of
    width 0, a head that returns the bias)."""

    family, ell, base, mask_id, max_length = "arm", 1, None, None, 1 << 20

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def hidden(self, idx, *, attention_mask=None, at=None):
        return self.bias.new_zeros(*idx.shape, 0) if at is None else self.bias.new_zeros(int(at.sum()), 0)

    def head(self, h, inputs=None):
        return self.bias.expand(*h.shape[:-1], -1)


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


def streaming_child(args) -> None:
    """Run one corpus size in this process and print a JSON line."""
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


def logits_child(args) -> None:
    """One logits case (plain or ppl at one batch size) in this process; prints a JSON line."""
    import torch.nn.functional as F

    from prime_eval import perplexity as P
    from prime_eval.checkpoints import load_tokenizer
    from prime_eval.networks.lit_gpt import Config, TransEncoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = load_tokenizer(Path(args.data) / "tokenizers" / "gpt2", vocab_size=50257)
    net = TransEncoder(Config(n_layer=1, n_embd=64, n_head=2, intermediate_size=128, vocab_size=len(tok),
                              padding_multiple=1, block_size=args.L)).eval()
    source = P.text_files([Path(args.data) / "wikitext2" / "test.txt"])
    max_tokens = args.blocks * args.L
    before = rss_mb()
    t0 = time.perf_counter()
    if args.case == "ppl":
        res = P.evaluate_perplexity(net, tok, source, P.Protocol(L=args.L, max_tokens=max_tokens, bootstrap=0),
                                    batch_size=args.batch_size)
        nll, blocks = res["results"]["nll"], res["results"]["blocks"]
    else:
        stream = P.BlockStream(source, tok, L=args.L, wrap=True, bos_id=50256, eos_id=50256)
        g = torch.Generator().manual_seed(0)
        total = 0.0
        blocks = 0
        batch = []
        for b in stream:
            batch.append(b.ids)
            if len(batch) == args.batch_size or blocks + len(batch) == args.blocks:
                x = torch.stack(batch)  # (B, L)
                t = 1e-3 + (1 - 1e-3) * torch.rand(x.shape[0], 1, generator=g)
                m = torch.rand(x.shape, generator=g) < t
                with torch.no_grad():
                    logits = net(torch.where(m, net.mask_id, x))  # (B, L, V)
                    ce = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view(x.shape)
                total += float((ce * m / t).sum())
                blocks += len(batch)
                batch = []
                if blocks == args.blocks:
                    break
        nll = total / (blocks * args.L)
    print(json.dumps({"case": args.case, "batch_size": args.batch_size, "before_mb": before, "peak_mb": peak_mb(),
                      "blocks": blocks, "nll": nll, "seconds": time.perf_counter() - t0}))


def _run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def logits_main(args) -> None:
    rows = []
    for bs in args.batch_sizes:
        for case in ("plain", "ppl"):
            rows.append(_run_child(["--_child", "logits", "--case", case, "--batch-size", str(bs), "--L",
                                    str(args.L), "--blocks", str(args.blocks), "--threads", str(args.threads),
                                    "--data", args.data]))
    print(f"L={args.L}, V=50,257, K=1, {args.blocks} blocks, lit_gpt MDM d=64 (1 layer); fp32 logits of one pass of "
          f"B blocks: B·L·V·4 bytes = {args.L * 50257 * 4 / 2**20:,.0f} MB per block")
    print(f"{'case':>6} {'batch':>6} {'peak RSS':>10} {'before loop':>12} {'loop':>8} {'time':>7}")
    for r in rows:
        print(f"{r['case']:>6} {r['batch_size']:>6} {r['peak_mb']:>8,.0f}MB {r['before_mb']:>10,.0f}MB "
              f"{r['peak_mb'] - r['before_mb']:>6,.0f}MB {r['seconds']:>6.1f}s")


def streaming_main(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes:
            corpus = Path(tmp) / f"corpus_{mb:g}MB.txt"
            make_corpus(corpus, mb, Path(args.data))
            rows.append(_run_child(["--_child", "streaming", "--corpus", str(corpus), "--mb", str(mb), "--L",
                                    str(args.L), "--batch-size", str(args.batch_size)]
                                   + (["--tokenizer", args.tokenizer] if args.tokenizer else [])))
            corpus.unlink()
    print(f"{'text':>8} {'peak RSS':>10} {'tokens':>12} {'blocks':>8} {'documents':>10} {'time':>8}")
    for r in rows:
        print(f"{r['megabytes']:>6g}MB {r['peak_rss_mb']:>8.0f}MB {r['tokens']:>12,} {r['blocks']:>8,} "
              f"{r['documents']:>10,} {r['seconds']:>7.1f}s")
    if len(rows) > 1:
        print(f"peak RSS ratio largest/smallest: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f} "
              f"for {rows[-1]['megabytes'] / rows[0]['megabytes']:g}x the text")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streaming", action="store_true", help="measure RSS against the corpus size instead")
    ap.add_argument("--L", type=int, default=None, help="block length (default 512; --streaming: 1024)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16], help="logits: batch sizes to compare")
    ap.add_argument("--blocks", type=int, default=32, help="logits: blocks scored per case")
    ap.add_argument("--threads", type=int, default=2, help="logits: torch threads")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 20], help="--streaming: corpus sizes in MB")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tokenizer", default=None, help="--streaming: a real tokenizer (default: a 300-token BPE)")
    ap.add_argument("--data", default=os.environ.get("PRIME_EVAL_DATA", "../shared/data"))
    ap.add_argument("--_child", choices=["logits", "streaming"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", choices=["plain", "ppl"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.L = args.L or (1024 if args.streaming or args._child == "streaming" else 512)
    if args._child == "logits":
        logits_child(args)
    elif args._child == "streaming":
        streaming_child(args)
    elif args.streaming:
        streaming_main(args)
    else:
        logits_main(args)


if __name__ == "__main__":
    main()
