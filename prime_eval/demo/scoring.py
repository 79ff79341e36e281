"""Zero-shot scores of the demo's models on the synthetic tasks (the `prime-eval score` code path), and their
accuracies against the Bayes-optimal answers.

Intervals (`prime_eval.intervals`, the report's machinery): an accuracy gets Wilson's score interval with the Monte
Carlo variance of the likelihood estimates added (`report.accuracy_table.accuracy_cell`), so it stays in [0, 1];
a model − Bayes difference on the same questions gets Tango's paired score interval with the MC variance
(`report.paired_difference`), so it stays in [−1, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from prime_eval.demo.models import ModelArtifacts
from prime_eval.demo.settings import DemoSettings
from prime_eval.synthetic import SyntheticData, task_summary


def score_model(family: str, art: ModelArtifacts, settings: DemoSettings, tasks_dir: Path, runs_dir: Path,
                task_names: list[str]) -> Path:
    """Score one model on the synthetic tasks with the run `prime-eval score` makes (`prime_eval.lm_eval_run`: the
    registered adapter, lm-eval's `simple_evaluate`, its files, the adapter's per-request statistics), with a task
    index that holds only the synthetic tasks (building lm-eval's full index would cost ~10 s per model). The
    adapters must be registered by the caller (`prime-eval demo` imports `model_adapters`; the library never does).
    Returns the results JSON path."""
    from lm_eval.tasks import TaskManager

    from prime_eval import lm_eval_run as R

    extra = {"seed": settings.seed, "rows_per_pass": 256}
    if family != "arm":
        extra.update(samples=settings.score_samples, greedy="false")
    model_args = art.model_args(family, settings, **extra)
    plan = R.prepare_tasks(task_names, TaskManager(include_path=[str(tasks_dir)], include_defaults=False))
    lm = R.model_spec(family, model_args, device="cpu").build()
    out = R.run(lm, plan, model=family, model_args=model_args, output_path=runs_dir, display_name=f"{family}-demo",
                log_samples=True, seeds=(settings.seed,) * 4, verbosity="ERROR")
    return out.results_file


def accuracy_rows(collection, data: SyntheticData) -> list[dict]:
    """Per (model, task): lm-eval acc with its 95% interval (Wilson with the MC variance), and the paired difference
    to the Bayes-optimal answers on the same questions (Tango with the MC variance)."""
    from prime_eval import report as rp
    from prime_eval.intervals import wilson_interval
    from prime_eval.report.accuracy_table import accuracy_cell

    out = []
    for run in collection.runs:
        for task, tr in sorted(run.tasks.items()):
            if task not in data.tasks or tr.status != "ok":
                continue
            items = data.tasks[task]
            dd = rp.doc_data(tr, ["acc"])
            cell = accuracy_cell(run, task, "acc", dd)
            s = task_summary(items)
            row = {"model": run.name, "family": run.family, "task": task, "n": cell.n, "acc": cell.value,
                   "acc_se_data": cell.se_data, "acc_se_mc": cell.se_mc, "acc_se": cell.se,
                   "acc_ci95": [cell.lo, cell.hi], "acc_interval": cell.method,
                   "acc_norm": tr.metrics.get("acc_norm", (None, None))[0],
                   "bayes_acc": s["bayes_acc"], "bayes_acc_se": s["bayes_acc_se"],
                   "bayes_acc_ci95": list(wilson_interval(s["bayes_acc"], s["docs"])), "chance": s["chance"],
                   "gap_to_bayes": None, "gap_to_bayes_se": None, "gap_to_bayes_ci95": None}
            if dd is not None and len(dd.correct) == len(items):
                c = np.array([dd.correct[i]["acc"] for i in range(len(items))])
                bayes = np.array([float(it["bayes_correct"]) for it in items])
                mc = rp.mc_variance([dd.q["acc"][i] for i in range(len(items))]) if dd.q else 0.0
                d, se, lo, hi = rp.paired_difference(c, bayes, mc, 0.0)
                row.update(gap_to_bayes=d, gap_to_bayes_se=se, gap_to_bayes_ci95=[lo, hi])
            out.append(row)
    return out
