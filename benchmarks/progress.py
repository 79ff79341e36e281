"""How often the scoring progress bar moves on a real run, and how far its estimated total is from the end.

    .venv/bin/python benchmarks/progress.py                       # GPT-2-small-sized MDM, piqa, default settings
    .venv/bin/python benchmarks/progress.py --layers 4 --dim 256 --docs 10

A random-weight lit_gpt MDM (TransEncoder over the GPT-2 vocabulary) scores real piqa documents through lm-eval's
`simple_evaluate` with the default settings (sqrt_count, K ≤ 128, adaptive, greedy auto), as `prime-eval score`
does. The bar (`model_adapters.scoring`) is replaced by a recorder that timestamps each move, so the figure is the
gap between two moves of the bar the user sees, next to the run time and to the old behaviour (a bar that moved once
per chunk of requests and restarted at every adaptive round).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRIME_EVAL_DATA", ROOT.parent / "shared" / "data"))


class Recorder:
    """Stands in for tqdm: every update and total, with a timestamp."""

    bars: list = []

    def __init__(self, total=None, desc="", disable=False, **kw):
        self.total, self.desc, self.disable, self.n, self.events = total, desc, disable, 0, []
        self.t0 = time.perf_counter()
        Recorder.bars.append(self)

    def update(self, k):
        self.n += k
        self.events.append((time.perf_counter() - self.t0, self.n, self.total))

    def refresh(self):
        pass

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--docs", type=int, default=10, help="piqa documents (2 requests each)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import lm_eval
    import torch

    import model_adapters.scoring as S
    from model_adapters import MDMLM
    from prime_eval.networks.lit_gpt import Config, TransEncoder
    from prime_eval.tasks import build_task_manager

    torch.manual_seed(0)
    cfg = Config(n_layer=args.layers, n_embd=args.dim, n_head=args.dim // 64, intermediate_size=4 * args.dim,
                 vocab_size=50257, block_size=256)
    net = TransEncoder(cfg).eval()
    S.tqdm = Recorder
    passes = []
    hidden = net.hidden

    def counted(idx, **kwargs):  # a forward pass runs the trunk (`hidden`), then the head
        passes.append(int(idx.shape[0]))
        return hidden(idx, **kwargs)

    net.hidden = counted
    lm = MDMLM(model=net, tokenizer=str(DATA / "tokenizers" / "gpt2"), device="cpu")
    tm = build_task_manager(DATA, ["piqa"])
    t0 = time.perf_counter()
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"], task_manager=tm, limit=args.docs, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    (bar,) = [b for b in Recorder.bars if not b.disable]
    times = [0.0] + [t for t, _, _ in bar.events]
    gaps = [b - a for a, b in zip(times, times[1:])]
    rows = bar.n
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"model: lit_gpt MDM {args.layers} layers x {args.dim}, {params:.0f}M params, CPU threads {torch.get_num_threads()}; piqa {args.docs} docs, default settings")
    fill = rows / len(passes) / lm.rows_per_pass
    print(f"run {seconds:.0f} s, {rows} forward rows in {len(passes)} passes ({fill:.0%} "
          f"full at rows_per_pass {lm.rows_per_pass}; chunk_rows {lm.settings.resolved_chunk_rows()}, "
          f"{lm.counters.chunks} chunks), {len(bar.events)} bar moves")
    print(f"gap between bar moves: median {statistics.median(gaps):.1f} s, max {max(gaps):.1f} s "
          f"(first move after {gaps[0]:.1f} s)")
    for frac in (0.1, 0.25, 0.5, 0.75):
        t, n, total = next(e for e in bar.events if e[0] >= frac * times[-1])
        print(f"  at {t:5.0f} s: {n:5d} rows done, estimated total {total}, true total {rows}")


if __name__ == "__main__":
    main()
