"""Paired comparisons: accuracy of run A minus run B on the documents both scored, with an interval in [−100, 100].

On the n shared documents (same doc_id and doc_hash), b = #(A right, B wrong), c = #(A wrong, B right), d̄ = (b − c)/n.
The interval is Tango's score interval for paired proportions with the Monte Carlo variances of both runs added
(`prime_eval.intervals.paired_difference_interval`; the MC noise of two runs is independent). For metrics that are
not 0/1 per document, the normal interval d̄ ± z·SE is used, clipped to [−1, 1] (stated in the CSV's `interval`).
The CSV also keeps the paired SE = √(sd(d, ddof=1)²/n + Var_MC,A + Var_MC,B). † marks an interval that excludes 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from prime_eval.intervals import normal_interval, paired_difference_interval
from prime_eval.report.conventions import LOG_SAMPLES_HINT, task_label
from prime_eval.report.mc_error import mc_variance
from prime_eval.report.table_model import Cell, Notes, Table, fmt_interval

CAPTION = ("Accuracy of A minus accuracy of B in points on the documents both scored (same doc_id and doc_hash), "
           "with the 95% interval [low, high] of the paired difference (Tango's score interval, with the Monte "
           "Carlo error of both runs added when per-request statistics exist; prime_eval/intervals.py); † = the "
           "interval excludes 0.")


def excludes_zero(lo: float, hi: float) -> bool:
    """True when the interval [lo, hi] lies strictly on one side of 0."""
    return lo > 0 or hi < 0


def paired_difference(correct_a: Sequence[float], correct_b: Sequence[float], mc_var_a: float = 0.0,
                      mc_var_b: float = 0.0) -> tuple[float, float, float, float]:
    """Paired accuracy difference on the same n ≥ 2 documents: (d̄, SE, lo, hi) (module docstring)."""
    a = np.asarray(correct_a, dtype=np.float64)
    b_ = np.asarray(correct_b, dtype=np.float64)
    d = a - b_
    n = len(d)
    if n < 2:
        raise ValueError("a paired difference needs at least 2 shared documents")
    mean = float(d.mean())
    se = math.sqrt(float(d.var(ddof=1)) / n + mc_var_a + mc_var_b)
    if np.all(np.isin(a, (0.0, 1.0))) and np.all(np.isin(b_, (0.0, 1.0))):
        lo, hi = paired_difference_interval(int(np.sum(d > 0)), int(np.sum(d < 0)), n, mc_var_a + mc_var_b)
    else:
        lo, hi = normal_interval(mean, se)
        lo, hi = max(-1.0, lo), min(1.0, hi)
    return mean, se, lo, hi


def _pairs(runs: list, baseline: str | None) -> list[tuple]:
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    if not baseline:
        return pairs
    is_base = lambda r: baseline in (r.name, r.display, r.base)  # noqa: E731
    return [(b, a) if is_base(a) else (a, b) for a, b in pairs if is_base(a) or is_base(b)]


def paired_runs(runs: list, tasks: list[str], docs: dict) -> list:
    """The runs a paired comparison can use: those with a samples log (per-document outcomes) for some task."""
    return [r for r in runs if any(docs.get((id(r), t)) is not None for t in tasks)]


def paired_table(runs: list, tasks: list[str], metric: dict, docs: dict, baseline: str | None) -> Table:
    """All pairs of `runs` (or each against `baseline`); `docs`: (id(run), task) -> DocData | None."""
    notes = Notes()
    header = ["Model A", "Model B"] + [f"{task_label(t)} ({metric[t]})" for t in tasks]
    rows, records = [], []
    runs = paired_runs(runs, tasks, docs)  # needs samples logs
    for a, b in _pairs(runs, baseline):
        row = [a.display, b.display]
        for t in tasks:
            m = metric[t]
            da, db = docs.get((id(a), t)), docs.get((id(b), t))
            rec = {"model_a": a.display, "model_b": b.display, "task": t, "metric": m}
            if da is None or db is None:
                who = [r.display for r, d in ((a, da), (b, db)) if d is None]
                reason = (f"no result for {', '.join(who)}" if any(t not in r.tasks or r.tasks[t].status != "ok"
                                                                     for r in (a, b))
                          else f"no lm-eval samples log for {', '.join(who)} ({LOG_SAMPLES_HINT})")
                row.append(Cell(note=notes(reason)))
                records.append({**rec, "reason": reason})
                continue
            shared = sorted(d for d in da.correct if d in db.correct and m in da.correct[d] and m in db.correct[d]
                            and da.hashes.get(d) == db.hashes.get(d))
            if len(shared) < 2:
                reason = "fewer than 2 shared documents (different limits or data)"
                row.append(Cell(note=notes(reason)))
                records.append({**rec, "reason": reason})
                continue
            ca, cb = [da.correct[d][m] for d in shared], [db.correct[d][m] for d in shared]
            qa = da.q.get(m) if da.q else None
            qb = db.q.get(m) if db.q else None
            va = mc_variance([qa[d] for d in shared]) if qa else 0.0
            vb = mc_variance([qb[d] for d in shared]) if qb else 0.0
            diff, se, lo, hi = paired_difference(ca, cb, va, vb)
            sig = excludes_zero(lo, hi)
            binary = all(x in (0.0, 1.0) for x in ca + cb)
            row.append(Cell(main=f"{100 * diff:+.1f}", unc=fmt_interval(lo, hi, signed=True),
                            marker="†" if sig else "", value=diff))
            records.append({**rec, "n": len(shared), "diff": diff, "se": se, "ci95_low": lo, "ci95_high": hi,
                            "interval": ("tango+mc" if va + vb > 0 else "tango") if binary else "normal, clipped", "mc_included": bool(qa or qb),
                            "excludes_zero": sig, "reason": ""})
        rows.append(row)
    return Table("paired", "Paired comparisons (likelihood-based rows)", CAPTION, header, rows, [""] * len(rows),
                 notes.texts, n_labels=2, records=records)
