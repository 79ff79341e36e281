"""`prime-eval report`: turn folders of runs into comparison tables (Markdown, CSV, LaTeX, HTML) and plots."""
from __future__ import annotations

import argparse

from prime_eval.errors import UserError

DESCRIPTION = """\
Build a comparison report from finished runs. RUN is an lm-eval --output_path folder (searched recursively), an
lm-eval results JSON, or a `prime-eval ppl` JSON. Read next to the results, when present: lm-eval samples logs
(samples_<task>_<date>.jsonl, for paired comparisons) and prime-eval per-request statistics
(stats_<task>_<date>.jsonl, for the Monte Carlo part of the intervals).

One row per run: model name, lm-eval model type, checkpoint (content hash) and estimator settings. Runs sharing a name
are labelled apart ("[hf]" / "[arm]", "(mc, K=4)"); re-runs of one configuration are merged only when their numbers
agree (otherwise both are shown, with a note). One ppl JSON is one row.

Tables: zero-shot accuracy (rows grouped by family, with the estimator and its K; columns = tasks with n, and the
average; 95% Wilson score intervals that include the Monte Carlo error and stay inside [0, 100]), paired differences
on shared documents (Tango's score interval; † = it excludes 0), perplexity (NLL and PPL, "≤" for upper bounds
only). What each number is comes from its bound_kind: the left-to-right process of a diffusion model (chain_rule)
and results that are not likelihoods (legacy_joint, CFG, temperature) get tables of their own. Best value per column
in bold; missing cells are "—" with the reason in a footnote. Files are written atomically. Nothing here loads a
model or needs a GPU. Formulas: prime_eval/intervals.py and prime_eval/report/.
"""

EPILOG = """\
metadata file (--meta), YAML:
  arm-tiny-a: {family: arm, params: 1.65e6, flops: 3.0e15, label: "ARM (tiny)"}
or CSV with a header:  name,family,params,flops,label
Families: arm, mdm, prime (anything else is shown as given). Runs written by our adapters carry family, estimator
and size in lm-eval's config.prime_eval; the file overrides them. Plain lm-eval runs default to family "other".

examples:
  prime-eval report runs/ --out reports/demo
  prime-eval report runs/arm runs/prime ppl/*.json --out report --meta models.yaml --formats md,html
  prime-eval report runs/ --out report --baseline arm-110m --metric piqa=acc
"""


def _formats(text: str) -> list[str]:
    from prime_eval.report import FORMATS

    items = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown format(s) {', '.join(bad) or text!r}; choose from {','.join(FORMATS)}")
    return items


def _metric(text: str) -> tuple[str, str]:
    task, sep, metric = text.partition("=")
    if not sep or not task or not metric:
        raise argparse.ArgumentTypeError(f"expected TASK=METRIC (e.g. piqa=acc), got {text!r}")
    return task.strip(), metric.strip()


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="comparison tables (md/csv/tex/html) and plots from lm-eval and prime-eval results",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="folders (searched recursively) or result/ppl JSON files")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--meta", metavar="FILE", help="YAML or CSV with name, family, params, flops, label per model")
    p.add_argument("--formats", type=_formats, default=["md", "csv", "tex", "html"], metavar="LIST",
                   help="comma-separated subset of md,csv,tex,html (default: all four)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (faster; the HTML then has no images)")
    p.add_argument("--baseline", metavar="MODEL",
                   help="paired comparisons only against this model: a name (all its rows) or a row label "
                        "(default: all pairs)")
    p.add_argument("--metric", type=_metric, action="append", default=[], metavar="TASK=METRIC",
                   help="report METRIC for TASK instead of the literature's choice (repeatable), e.g. piqa=acc")
    p.add_argument("--title", default="prime-eval report", help="report title (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="do not print the tables on the console")
    return p


def main(args) -> int:
    from prime_eval import report as rp

    if not args.runs:
        raise UserError("give at least one RUN folder or file")
    meta = rp.load_meta(args.meta)
    collection = rp.load(args.runs, meta)
    rep = rp.build(collection, metric_override=dict(args.metric) or None, baseline=args.baseline, title=args.title)
    written = rp.write_report(rep, collection, args.out, formats=args.formats, plots=not args.no_plots)
    if not args.quiet:
        rp.render_console(rep)
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written))
    return 0
