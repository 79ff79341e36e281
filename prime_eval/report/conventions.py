"""What the report shows by default: task order and labels, the metric per task, family order, footnote texts.

acc or acc_norm (per task; `--metric TASK=METRIC` overrides; the CSV always holds the chosen metric per task)
------------------------------------------------------------------------------------------------------------
lm-eval's `acc` takes the argmax of the summed continuation log-likelihood; `acc_norm` divides it by the character
length of the choice first. Length normalisation matters where the choices are free-form sentences of very different
lengths, since a longer continuation collects more negative log-probability whatever its meaning:

    hellaswag       acc_norm   endings are full sentences of varying length (GPT-3 paper, Open LLM Leaderboard, Mamba)
    arc_challenge   acc_norm   adversarially filtered; long distractors (Open LLM Leaderboard, Mamba, Pythia tables)
    openbookqa      acc_norm   free-form answers of varying length (LLaMA/TinyLlama-style tables)
    piqa            acc_norm   two long solutions; the LLaMA/TinyLlama/SMDM line of tables reports acc_norm
    arc_easy        acc        short answers; Mamba, Pythia and most diffusion-LM tables report plain acc
    boolq, winogrande, social_iqa, race, lambada_openai    acc    (lm-eval defines only acc for these; winogrande
                    scores a shared continuation, so normalising by length would change nothing)

Tasks not listed use `acc` when present, else the first metric lm-eval reports. Note that adapters returning a
per-token mean (as some diffusion repos do) make `acc` already length-normalised; ours return sums, as lm-eval expects.
"""
from __future__ import annotations

from typing import Iterable

PREFERRED_METRIC = {
    "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm", "piqa": "acc_norm",
    "arc_easy": "acc", "boolq": "acc", "winogrande": "acc", "social_iqa": "acc", "race": "acc",
    "lambada_openai": "acc",
}
# Metrics that are a mean of per-document 0/1 outcomes: their intervals are for a proportion (Wilson score).
PROPORTION_METRICS = {"acc", "acc_norm", "acc_mutual_info", "exact_match", "em"}
TASK_ORDER = ["lambada_openai", "arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "social_iqa",
              "winogrande", "race"]
TASK_LABEL = {"lambada_openai": "LAMBADA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "boolq": "BoolQ",
              "hellaswag": "HellaSwag", "openbookqa": "OBQA", "piqa": "PIQA", "social_iqa": "SIQA",
              "winogrande": "WinoGrande", "race": "RACE"}
FAMILY_ORDER = ["arm", "mdm", "prime", "other"]
FAMILY_LABEL = {"arm": "ARM", "mdm": "MDM", "prime": "MDM-Prime", "other": "Other"}
FORMATS = ("md", "csv", "tex", "html")

# Footnote texts (one place, so the renderers and tests agree).
LOG_SAMPLES_HINT = "rerun `prime-eval score` (or lm-eval) with --log_samples"  # what per-document tables need
NOT_RUN = "task not run for this model"
FAILED = "run failed: {what} on disk but no results JSON reports this task"
INCOMPATIBLE = ("incompatible lm-eval version in {src}: metric keys lack the ',none' filter suffix that lm-eval 0.4+ "
                "writes; re-run with lm-eval 0.4 or later")
NO_METRIC = "{metric} missing from the results of this task"
NO_AVG = "average needs every task of the table"
MIXED_N = ("runs in this column were scored on different numbers of documents (n in the cell): their accuracies "
           "are not directly comparable")


def task_label(task: str) -> str:
    return TASK_LABEL.get(task, task)


def family_key(family: str) -> tuple:
    """Sort key: ARM, MDM, MDM-Prime, then any other family (alphabetically)."""
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER) - 1, family)


def order_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = set(tasks)
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


def choose_metric(task: str, available: set[str], override: dict | None = None) -> str | None:
    """The metric reported for a task: override, else the literature's choice (PREFERRED_METRIC) when lm-eval
    reported it, else acc, else the alphabetically first metric."""
    if override and task in override:
        return override[task]
    pref = PREFERRED_METRIC.get(task)
    if pref in available:
        return pref
    if "acc" in available:
        return "acc"
    return sorted(available)[0] if available else None
