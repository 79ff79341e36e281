"""Zero-shot accuracy tables: one row per run, one column per task, cells with a 95% interval inside [0, 100].

A cell: the accuracy p̂ of lm-eval's chosen metric on n documents, and its interval from `prime_eval.intervals`:

    proportion metrics (acc, acc_norm, ...)   wilson_interval(p̂, n, extra_var=Var_MC): Wilson's score interval with
                                              the Monte Carlo variance added (0 where the scores are deterministic)
    other metrics                             p̂ ± z·√(SE_data² + Var_MC) (lm-eval's stderr)
    Avg over the table's tasks                mean_proportion_interval over the tasks (common-π score interval)

Var_MC = Σ_i q_i(1−q_i)/n² from the per-request statistics (`mc_error`, `documents`): 0 for exact and
exact_left_to_right rows (deterministic by definition) and for deterministic is_greedy checks; unknown (left out,
with a footnote) where statistics or the samples log are missing. The CSV keeps lm-eval's SE_data (sd(ddof=1)/√n,
or √(p(1−p)/(n−1)) where lm-eval wrote "N/A"), the MC SE and the interval's ends.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from prime_eval import bound_kind as BK
from prime_eval.intervals import binomial_se, mean_proportion_interval, normal_interval, wilson_interval
from prime_eval.report.conventions import (FAMILY_LABEL, LOG_SAMPLES_HINT, MIXED_N, NO_AVG, NO_METRIC, NOT_RUN, PROPORTION_METRICS,
                                           task_label)
from prime_eval.report.mc_error import mc_variance
from prime_eval.report.table_model import Cell, Notes, Table, bold_best, fmt_interval, fmt_params, with_notes

DETERMINISTIC_KINDS = (BK.EXACT, BK.EXACT_LEFT_TO_RIGHT)  # exact values: no Monte Carlo error by definition
NO_SAMPLES_LOG = f"MC error not included: per-request statistics found but no lm-eval samples log ({LOG_SAMPLES_HINT})"
NO_STATS = "MC error not included: no per-request statistics (stats_<task>_<date>.jsonl) found"
NOT_BINARY = "MC error not included: {metric} is not a 0/1 outcome per document in the samples log"
UNKNOWN_GOLD = ("MC term bounded from above for {k} document(s) whose gold answer is not in the samples log "
                "(largest q(1−q) over the possible answers)")
CAPTION = ("Accuracy in percent with its 95% interval [low, high]: Wilson's score interval, with the Monte Carlo "
           "variance of the likelihood estimates added where per-request statistics exist (0 for exact values); "
           "it stays inside [0, 100]. n = documents scored per task. Estimator: the log-likelihood estimator and "
           "its number of samples K (K≤: adaptive, at most K). Best per column in bold. acc/acc_norm per task as "
           "in the literature; formulas in prime_eval/intervals.py and prime_eval/report/accuracy_table.py.")


@dataclass
class AccCell:
    value: float | None = None
    se_data: float | None = None
    se_mc: float | None = None     # None: unknown (no statistics); 0.0: deterministic
    n: int | None = None
    lo: float | None = None
    hi: float | None = None
    method: str = ""               # "wilson" | "wilson+mc" | "normal"
    status: str = "not run"
    reason: str | None = None
    mc_note: str | None = None

    @property
    def se(self) -> float | None:
        """√(SE_data² + Var_MC), for the CSV."""
        if self.value is None or self.se_data is None:
            return None
        return math.sqrt(self.se_data ** 2 + (self.se_mc or 0.0) ** 2)


def accuracy_cell(run, task: str, metric: str, docs, *, likelihood: bool = True) -> AccCell:
    """The cell of `run` (loading.ModelRun) on `task`; `docs`: its documents.DocData or None. Without `likelihood`
    (generated answers) no Monte Carlo term applies: no likelihood estimate enters the score."""
    tr = run.tasks.get(task)
    if tr is None:
        return AccCell(reason=NOT_RUN)
    if tr.status != "ok":
        return AccCell(status=tr.status, reason=tr.reason)
    value, se = tr.metrics.get(metric, (None, None))
    if value is None:
        return AccCell(status="missing", reason=NO_METRIC.format(metric=metric))
    n = tr.n or (len(docs.correct) if docs is not None else None)
    if se is None and n:
        se = binomial_se(value, n)
    cell = AccCell(value=value, se_data=se, n=n, status="ok")
    q = docs.q.get(metric) if likelihood and docs is not None and docs.q is not None else None
    if q:
        cell.se_mc = math.sqrt(mc_variance(list(q.values())))
        if docs.unknown_gold:
            cell.mc_note = UNKNOWN_GOLD.format(k=docs.unknown_gold)
    elif run.kind in DETERMINISTIC_KINDS or not likelihood:
        cell.se_mc = 0.0
    elif docs is not None and docs.note:
        cell.mc_note = docs.note
    elif docs is not None and docs.q is not None:
        cell.mc_note = NOT_BINARY.format(metric=metric)
    elif docs is None and tr.stats:
        cell.mc_note = NO_SAMPLES_LOG
    elif not tr.stats:
        cell.mc_note = NO_STATS
    var_mc = (cell.se_mc or 0.0) ** 2
    if metric in PROPORTION_METRICS and n:
        cell.lo, cell.hi = wilson_interval(value, n, extra_var=var_mc)
        cell.method = "wilson+mc" if var_mc > 0 else "wilson"
    elif cell.se is not None:
        cell.lo, cell.hi = normal_interval(value, cell.se)
        cell.method = "normal"
    return cell


def _average(cells: list[AccCell], metric_of: list[str]) -> tuple[float, float | None, float | None]:
    vals = [c.value for c in cells]
    avg = sum(vals) / len(vals)
    if all(m in PROPORTION_METRICS for m in metric_of) and all(c.n for c in cells):
        lo, hi = mean_proportion_interval(vals, [c.n for c in cells], [(c.se_mc or 0.0) ** 2 for c in cells])
        return avg, lo, hi
    if all(c.se is not None for c in cells):
        return (avg, *normal_interval(avg, math.sqrt(sum(c.se ** 2 for c in cells)) / len(cells)))
    return avg, None, None


def accuracy_table(key: str, title: str, caption: str, runs: list, tasks: list[str], metric: dict,
                   docs: dict, *, likelihood: bool = True) -> Table:
    """One table; `docs`: (id(run), task) -> DocData | None. `likelihood`: scores from a log-likelihood estimator
    (an Estimator column, the MC term); False for generated answers, which involve none."""
    notes = Notes()
    cells = {(id(r), t): accuracy_cell(r, t, metric[t], docs.get((id(r), t)), likelihood=likelihood)
             for r in runs for t in tasks}
    n_of = {t: Counter(cells[(id(r), t)].n for r in runs if cells[(id(r), t)].value is not None) for t in tasks}
    header = ["Family", "Model", "Params"] + (["Estimator"] if likelihood else [])
    labels = len(header)
    for t in tasks:
        ns = list(n_of[t])
        header.append(f"{task_label(t)} ({metric[t]}, n={ns[0]})" if len(ns) == 1 and ns[0] else
                      f"{task_label(t)} ({metric[t]})")
    header.append("Avg")
    rows, groups, records = [], [], []
    for run in runs:
        fam = FAMILY_LABEL.get(run.family, run.family)
        row = [fam, run.display, fmt_params(run.params)] + ([run.estimator_label] if likelihood else [])
        letters = [notes(text) for text in run.notes]
        for t in tasks:
            c = cells[(id(run), t)]
            if c.value is None:
                row.append(Cell(note=notes(c.reason)))
            else:
                mixed = len(n_of[t]) > 1
                row.append(Cell(main=f"{100 * c.value:.1f}", unc=fmt_interval(c.lo, c.hi) if c.lo is not None else "",
                                value=c.value, detail=f"n={c.n}" if mixed else "",
                                note=notes(MIXED_N) if mixed else ""))
            if c.mc_note:
                letters.append(notes(c.mc_note))
            records.append({"section": key, "family": run.family, "model": run.display, "model_type": run.model_type,
                            "checkpoint": run.checkpoint, "params": run.params,
                            "estimator": run.estimator_label if likelihood else "",
                            "num_samples": run.num_samples, "bound_kind": run.kind, "task": t, "metric": metric[t],
                            "n": c.n, "value": c.value, "se_data": c.se_data, "se_mc": c.se_mc, "se_total": c.se,
                            "ci95_low": c.lo, "ci95_high": c.hi, "interval": c.method, "status": c.status,
                            "reason": c.reason or "", "source": run.tasks[t].source if t in run.tasks else ""})
        present = [cells[(id(run), t)] for t in tasks]
        if tasks and all(c.value is not None for c in present):
            avg, lo, hi = _average(present, [metric[t] for t in tasks])
            row.append(Cell(main=f"{100 * avg:.1f}", unc=fmt_interval(lo, hi) if lo is not None else "", value=avg))
        else:
            row.append(Cell(note=notes(NO_AVG)))
        row[1] = with_notes(run.display, letters)
        rows.append(row)
        groups.append(fam)
    bold_best(rows, labels, higher=True)
    return Table(key, title, caption, header, rows, groups, notes.texts, n_labels=labels, records=records)
