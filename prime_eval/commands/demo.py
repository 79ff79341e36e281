"""`prime-eval demo`: train (or load) reference ARM / MDM / MDM-Prime-v2 models on a synthetic language with known
entropy, score them through lm-eval, compare every likelihood estimator with the true entropy, run the audit, and
build the report. See `prime_eval.demo`. This command registers the lm-eval adapters (`import model_adapters`); the
library package never imports them."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
The whole harness on a language whose entropy is known, offline and on CPU:
  1. a random sparse automaton over a few hundred pseudo-words (seeded): training text, held-out documents with
     their exact NLL, two multiple-choice tasks with Bayes-optimal answers (lm-eval format);
  2. a byte-level BPE tokenizer trained on the training text;
  3. tiny lit_gpt ARM, MDM and MDM-Prime-v2 (binary, shuffled) models, trained on CPU and cached;
  4. lm-eval scores (adapters arm/mdm/prime) and bound perplexity of every estimator next to the true entropy;
  5. the exact audit, also on the trained networks;
  6. the report (Markdown, HTML, LaTeX, CSV, plots) in --out.
A cold run trains for a few minutes; a cached run takes about a minute. Deterministic given --seed.
"""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="reference models on a language with known entropy, end to end",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/demo", metavar="DIR", help="report folder (default: %(default)s)")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None, metavar="DIR",
                   help="where trained models are cached (default: $PRIME_EVAL_CACHE/demo, else "
                        "~/.cache/prime-eval/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the language, the training and the estimates")
    p.add_argument("--quick", "--reduced", dest="quick", action="store_true",
                   help="much smaller language, corpus and models (tests; under a minute)")
    p.add_argument("--retrain", action="store_true", help="ignore cached models and train again")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for scoring (default 1: robust on a shared 2-core machine; 2 is faster "
                        "only when idle); training always runs on one thread, so the weights do not depend on it")
    p.add_argument("--compare", default=None, metavar="DIR",
                   help="after the run, compare --out with the demo report in DIR (e.g. the committed reports/demo) "
                        "up to wall times and absolute paths; exit status 1 when they differ")
    return p


def main(args) -> int:
    from prime_eval.demo.numerics import pin

    pin()  # before torch computes anything: the float kernels that reproduce on any AVX2 CPU (numerics.py)
    import model_adapters  # noqa: F401  (registers the lm-eval models arm, mdm, prime that the demo scores)
    from prime_eval.demo import run_demo

    run_demo(args.out, cache_dir=args.cache_dir, seed=args.seed, quick=args.quick, retrain=args.retrain,
             threads=args.threads)
    if args.compare:
        from prime_eval.demo.reproduce import compare, report

        return report(compare(args.compare, args.out), args.compare, args.out)
    return 0
