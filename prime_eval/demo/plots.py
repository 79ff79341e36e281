"""The demo's plots (PNG bytes): accuracy against the Bayes-optimal answers, and every estimator against H."""
from __future__ import annotations

from prime_eval import bound_kind as BK
from prime_eval.demo.settings import FAMILIES, LABELS

COLORS = {"arm": "#4c72b0", "mdm": "#dd8452", "prime": "#55a868"}


def accuracy_plot(summary: dict) -> bytes:
    """Bars with their 95% intervals (Wilson with MC, asymmetric), the Bayes-optimal accuracy and chance."""
    import matplotlib.pyplot as plt

    from prime_eval.report.plots import png

    tasks = list(summary["data"]["tasks"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.8 / len(FAMILIES)
    for i, fam in enumerate(FAMILIES):
        xs, ys, lo, hi = [], [], [], []
        for j, t in enumerate(tasks):
            r = next((a for a in summary["accuracy"] if a["model"] == f"{fam}-demo" and a["task"] == t), None)
            if r and r["acc"] is not None and r["acc_ci95"][0] is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(100 * r["acc"])
                lo.append(100 * (r["acc"] - r["acc_ci95"][0]))
                hi.append(100 * (r["acc_ci95"][1] - r["acc"]))
        ax.bar(xs, ys, width * 0.9, yerr=[lo, hi], capsize=3, color=COLORS[fam], label=LABELS[fam])
    for j, t in enumerate(tasks):
        s = summary["data"]["tasks"][t]
        ax.hlines(100 * s["bayes_acc"], j - 0.45, j + 0.45, colors="k", linewidth=2,
                  label="Bayes-optimal" if j == 0 else None)
        ax.hlines(100 * s["chance"], j - 0.45, j + 0.45, colors="gray", linestyles="dotted",
                  label="chance" if j == 0 else None)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def bounds_plot(summary: dict) -> bytes:
    """Each estimator minus the exact NLL of the same documents, with its paired 95% interval."""
    import matplotlib.pyplot as plt

    from prime_eval.report.plots import png

    rows = summary["bounds"]
    fig, ax = plt.subplots(figsize=(7.0, 0.42 * len(rows) + 1.6))
    ax.axvline(0, color="k", linewidth=1.2, label="true entropy: exact NLL of the same documents")
    for k, r in enumerate(rows):
        y = len(rows) - 1 - k
        lo, hi = r["gap_ci95"]
        ax.errorbar(r["gap"], y, xerr=[[r["gap"] - lo], [hi - r["gap"]]], fmt="o", capsize=3,
                    color="#c44e52" if r["kind"] == BK.NOT_A_LIKELIHOOD else COLORS[r["family"]])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['label']} · {r['estimator']}" for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("estimate − exact NLL (nats per document, paired 95% interval)")
    ax.set_title("Left of the line = below the true entropy: impossible for a likelihood", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return png(fig)


def demo_plots(summary: dict) -> dict[str, tuple[str, bytes]]:
    """name -> (caption, PNG bytes), the bounds first."""
    import matplotlib

    matplotlib.use("Agg")
    return {
        "demo_bounds": ("Each estimator minus the exact NLL of the same held-out documents. Valid bounds and exact "
                        "likelihoods lie right of 0; the published legacy_joint (red) can fall left of it.",
                        bounds_plot(summary)),
        "demo_accuracy": ("Accuracy of each reference model on the synthetic tasks with its 95% interval; black bar: "
                          "Bayes-optimal accuracy (exact posterior), dotted: chance.", accuracy_plot(summary)),
    }
