"""The demo's report: the standard `prime-eval report` of its runs with the demo's tables and plots first, in every
format (Markdown, LaTeX, HTML, CSV, PNG), every file written atomically (`prime_eval.io`)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from prime_eval.demo.plots import demo_plots
from prime_eval.demo.settings import FAMILIES, LABELS
from prime_eval.demo.tables import demo_tables
from prime_eval.io import atomic_write_bytes, atomic_write_text, write_json

TITLE = "prime-eval demo: reference models on a language with known entropy"
CSV_COLUMNS = {
    "demo_accuracy.csv": ("accuracy", ["model", "family", "task", "n", "acc", "acc_se", "acc_se_data", "acc_se_mc",
                                       "acc_ci95", "acc_interval", "acc_norm", "bayes_acc", "bayes_acc_se",
                                       "bayes_acc_ci95", "gap_to_bayes", "gap_to_bayes_se", "gap_to_bayes_ci95",
                                       "chance"]),
    "demo_entropy.csv": ("bounds", ["model", "family", "estimator", "kind", "is_bound", "docs", "nats_per_doc",
                                    "nats_per_doc_se", "gap", "gap_se", "gap_ci95", "gap_relative", "bits_per_byte",
                                    "bits_per_byte_se", "gap_bits_per_byte", "length_term", "mc_se",
                                    "nll_per_token", "ppl_per_token", "samples", "verdict"]),
}


def run_labels(summary: dict) -> dict:
    """The `--meta` of the report: family, parameters and label of each demo run."""
    return {f"{f}-demo": {"family": f, "params": summary["models"][f]["params"], "label": f"{LABELS[f]} (demo)"}
            for f in FAMILIES}


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ";".join("" if x is None else repr(float(x)) for x in v)
    return v


def demo_csvs(summary: dict) -> dict[str, str]:
    """name -> CSV text of the demo's own tables (one row per model and task / estimator)."""
    out = {}
    for name, (key, cols) in CSV_COLUMNS.items():
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in summary[key]:
            w.writerow({k: _csv_value(r.get(k)) for k in cols})
        out[name] = buf.getvalue()
    return out


def build_report(summary: dict, runs_dir: Path, out: Path, collection=None):
    """Write the report of the demo's runs into `out`; returns (written paths, the Report)."""
    import dataclasses

    from prime_eval import report as rp

    if collection is None:
        collection = rp.load([runs_dir], run_labels(summary))
    rep = rp.build(collection, title=TITLE)
    rep.tables = demo_tables(summary) + rep.tables
    rep.notes = [f"Demo settings: seed {summary['settings']['seed']}, "
                 f"{'quick' if summary['settings']['quick'] else 'full'} mode; everything in demo.json."] + rep.notes
    # The perplexity-versus-size plot needs several sizes per family; the demo has one (and several estimators per
    # model), so only the standard accuracy plot is drawn from the collection.
    rep.plots = {**demo_plots(summary), **rp.make_plots(rep, dataclasses.replace(collection, ppl=[]))}
    # (prime_eval.report.write_report draws its own plots; a `plots=` argument there would let it write these.)
    written, plot_files = [], {}
    for name, (caption, png) in rep.plots.items():
        written.append(atomic_write_bytes(out / "plots" / f"{name}.png", png))
        plot_files[name] = (caption, f"plots/{name}.png")
    written.append(atomic_write_text(out / "report.md", rp.render_markdown(rep, plot_files)))
    written.append(atomic_write_text(out / "report.tex", rp.render_latex(rep)))
    written.append(atomic_write_text(out / "report.html", rp.render_html(rep)))
    for name, text in {**rp.render_csv(rep), **demo_csvs(summary)}.items():
        written.append(atomic_write_text(out / name, text))
    return written, rep


def write_summary(summary: dict, out: Path) -> Path:
    """demo.json: every number of the demo (settings, data, models, bounds, accuracies, audit, timings)."""
    return write_json(out / "demo.json", summary, default=float)
