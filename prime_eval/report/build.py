"""From loaded runs to the report's tables: metric per task, per-document data, then one table per section."""
from __future__ import annotations

from prime_eval.errors import UserError
from prime_eval.report.accuracy_table import CAPTION, accuracy_table
from prime_eval.report.conventions import LOG_SAMPLES_HINT, choose_metric, order_tasks
from prime_eval.report.documents import doc_data
from prime_eval.report.paired_table import paired_runs, paired_table
from prime_eval.report.perplexity_table import perplexity_tables
from prime_eval.report.table_model import Report, sorted_runs

ACCURACY_SECTIONS = {
    "likelihood": ("accuracy", "Zero-shot accuracy (likelihood-based)", ""),
    "left_to_right": ("accuracy-left-to-right",
                      "Zero-shot accuracy: left-to-right process (chain_rule)",
                      "Scored with the exact likelihood of left-to-right decoding with a diffusion model's "
                      "conditionals: a different generative process than the model's own, so these rows are kept "
                      "apart from the model likelihoods above. "),
    "not_a_likelihood": ("accuracy-other",
                         "Zero-shot accuracy: NOT likelihood-based (legacy_joint / CFG / temperature)",
                         "Scores from guided, tempered or non-bound estimators. They answer a different question "
                         "than the likelihood table above and must not be compared with it. "),
}
GENERATION = ("accuracy-generation", "Generation (generate_until tasks)",
              "Scores of the answers each model generated (lm-eval `generate_until`, e.g. exact_match): no "
              "likelihood and no estimator is involved, so these tasks are kept apart from the likelihood-based "
              "tables and have no Monte Carlo term; the model labels carry the decoding settings that tell runs "
              "apart. ")
GENERATION_CAPTION = ("Accuracy in percent with its 95% interval [low, high] (Wilson's score interval, inside [0, 100]); "
                      "n = documents scored per task; best per column in bold.")


def build(collection, *, metric_override: dict | None = None, baseline: str | None = None,
          title: str = "prime-eval report") -> Report:
    """Turn loaded runs (loading.Collection) into the report's tables (no I/O besides reading samples/stats logs)."""
    runs = collection.runs
    tasks = order_tasks(t for r in runs for t in r.tasks)
    available: dict[str, set] = {t: set() for t in tasks}
    for r in runs:
        for t, tr in r.tasks.items():
            available[t] |= {m for m, (v, _) in tr.metrics.items() if v is not None}
    metric = {t: choose_metric(t, available[t], metric_override) or "acc" for t in tasks}
    if metric_override:
        unknown = sorted(set(metric_override) - set(tasks))
        if unknown:
            raise UserError(f"--metric names tasks that no run reports: {', '.join(unknown)} (known: {', '.join(tasks)})")
    docs: dict = {}
    for r in runs:
        for t, tr in r.tasks.items():
            if tr.status == "ok" and t in metric:
                docs[(id(r), t)] = doc_data(tr, sorted({metric[t], "acc"}))
    generated = {t for r in runs for t, tr in r.tasks.items() if tr.output_type == "generate_until"}
    tables = []
    for section, (key, name, lead) in ACCURACY_SECTIONS.items():
        rows = sorted_runs([r for r in runs if r.section == section and set(r.tasks) - generated])
        if rows:  # the columns: the tasks its rows report (or tried to), generation apart
            cols = [t for t in order_tasks(t for r in rows for t in r.tasks) if t not in generated]
            tables.append(accuracy_table(key, name, lead + CAPTION, rows, cols, metric, docs))
    gen_rows = sorted_runs([r for r in runs if set(r.tasks) & generated])
    if gen_rows:
        key, name, lead = GENERATION
        cols = [t for t in order_tasks(t for r in gen_rows for t in r.tasks) if t in generated]
        tables.append(accuracy_table(key, name, lead + GENERATION_CAPTION, gen_rows, cols, metric, docs,
                                     likelihood=False))
    like = sorted_runs([r for r in runs if r.section == "likelihood" and set(r.tasks) - generated])
    if baseline and not any(baseline in (r.name, r.display, r.base) for r in like):
        raise UserError(f"--baseline {baseline!r} is not a likelihood-based model of this report "
                        f"(models: {', '.join(r.display for r in like)})")
    notes = list(collection.notes)
    if len(like) >= 2:
        like_tasks = [t for t in order_tasks(t for r in like for t in r.tasks) if t not in generated]
        usable = {id(r) for r in paired_runs(like, like_tasks, docs)}
        if len(usable) >= 2:
            tables.append(paired_table(like, like_tasks, metric, docs, baseline))
        else:  # never an empty table: say what it needs
            without = [r.display for r in like if id(r) not in usable]
            notes.append(f"no paired comparisons: they need the per-document outcomes of at least two runs, and "
                         f"{', '.join(without)} have no lm-eval samples log ({LOG_SAMPLES_HINT})")
    tables += perplexity_tables(collection.ppl)
    if not tables:
        skipped = [n for n in collection.notes if n.startswith("skipped ")]
        raise UserError("no lm-eval results and no perplexity JSONs found in the given paths"
                        + ("".join(f"; {n}" for n in skipped) + " (a half-written file: rerun that evaluation)"
                           if skipped else ""))
    return Report(title=title, tables=tables, notes=notes)
