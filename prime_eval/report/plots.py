"""Plots (matplotlib, Agg backend, PNG bytes): per-task accuracy with its 95% intervals, perplexity versus size."""
from __future__ import annotations

import io
import re

from prime_eval.intervals import ppl_interval
from prime_eval.report.conventions import FAMILY_LABEL, family_key, task_label


def png(fig) -> bytes:
    """The figure as PNG bytes (no timestamp in the metadata, so equal figures give equal bytes); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _accuracy_plot(acc) -> bytes:
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in acc.records))
    models = list(dict.fromkeys(r["model"] for r in acc.records if r["value"] is not None))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tasks) + 2), 3.8))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for j, t in enumerate(tasks):
            rec = next(r for r in acc.records if r["model"] == model and r["task"] == t)
            if rec["value"] is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(100 * rec["value"])
                has = rec["ci95_low"] is not None
                lo.append(100 * (rec["value"] - rec["ci95_low"]) if has else 0.0)  # asymmetric, inside [0, 100]
                hi.append(100 * (rec["ci95_high"] - rec["value"]) if has else 0.0)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=model)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{task_label(t)}\n({next(r['metric'] for r in acc.records if r['task'] == t)})"
                        for t in tasks])
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return png(fig)


def _ppl_plot(rs: list) -> bytes | None:
    import matplotlib.pyplot as plt

    axes_x = [("params", "parameters")] if any(r.params for r in rs) else []
    if any(r.flops for r in rs):
        axes_x.append(("flops", "training FLOPs"))
    if not axes_x:
        return None
    fig, axs = plt.subplots(1, len(axes_x), figsize=(5.2 * len(axes_x), 3.8), squeeze=False)
    for ax, (attr, xlabel) in zip(axs[0], axes_x):
        for fam in sorted({r.family for r in rs}, key=family_key):
            pts = sorted(((getattr(r, attr), r) for r in rs if r.family == fam and getattr(r, attr)),
                         key=lambda p: (p[0], p[1].display))
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [ppl_interval(r.nll, r.nll_se) for _, r in pts]
            ax.errorbar(xs, [y[0] for y in ys], yerr=[[y[0] - y[1] for y in ys], [y[2] - y[0] for y in ys]],
                        marker="o", capsize=3, label=FAMILY_LABEL.get(fam, fam))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PPL (≤ for diffusion bounds)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return png(fig)


def make_plots(report, collection) -> dict:
    """name -> (caption, PNG bytes): per-task accuracy of the likelihood-based rows with their 95% intervals;
    perplexity (model likelihoods) versus parameters (and FLOPs) per family and dataset."""
    import matplotlib

    matplotlib.use("Agg")
    plots = {}
    acc = next((t for t in report.tables if t.key == "accuracy"), None)
    if acc is not None and acc.records:
        plots["accuracy"] = ("Per-task accuracy with 95% intervals (likelihood-based rows).", _accuracy_plot(acc))
    like = [r for r in collection.ppl if r.section == "likelihood"]
    for dataset in sorted({r.dataset for r in like}):
        image = _ppl_plot([r for r in like if r.dataset == dataset])
        if image is not None:
            safe = re.sub(r"[^A-Za-z0-9]+", "_", dataset).strip("_")
            plots[f"ppl_{safe}"] = (f"Perplexity on {dataset} versus model size, one line per family (log axes).",
                                    image)
    return plots
