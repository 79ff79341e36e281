"""Report builder: comparison tables of runs with honest 95% intervals, from results files only.

Reads lm-eval results JSONs (ours or anyone's), lm-eval samples logs (`samples_<task>_<date>.jsonl`), our per-request
statistics (`stats_<task>_<date>.jsonl`) and perplexity JSONs (`"kind": "prime-eval/ppl"`), and renders Markdown,
CSV, LaTeX (booktabs), a self-contained HTML page with PNG plots, and rich tables on the console. It never imports
torch or a model: reports can be rebuilt anywhere from the files.

    files.py             finding the input files; the --meta file
    run_identity.py      what makes a row one run (model, lm-eval model type, checkpoint hash, estimator settings);
                         labels that tell rows sharing a name apart; when re-runs may be merged
    kinds.py             what each number is (prime_eval.bound_kind) and the table it goes to, with fallbacks
    loading.py           files → rows (ModelRun) and perplexity rows (PplResult)
    documents.py         per-document correctness and the probability q_i of being scored correct on a re-run
    mc_error.py          q_i under Monte Carlo noise, and the MC variance of an accuracy
    conventions.py       task order and labels, acc vs acc_norm per task, footnote texts
    table_model.py       cells, tables and number formats that every renderer draws
    accuracy_table.py    accuracy tables (Wilson score intervals with the MC variance; n and estimator per row)
    paired_table.py      paired differences (Tango's score interval with the MC variances)
    perplexity_table.py  NLL / PPL tables ("≤" for upper bounds only)
    build.py             loaded runs → the report's tables
    plots.py, render.py  PNG plots; Markdown / LaTeX / HTML / CSV / console, written atomically (prime_eval.io)

Interval formulas live in `prime_eval/intervals.py`. Tables: accuracy per section (model likelihoods; the
left-to-right process of a diffusion model; not likelihoods; generated answers of `generate_until` tasks, apart from
all of these, without estimator or MC term), paired differences of the likelihood rows, perplexity per dataset and
section. Best value per column in bold; missing cells read "—" with a lettered footnote (task not
run, run failed, incompatible lm-eval version, metric missing).
"""
from __future__ import annotations

from prime_eval.report.build import build  # noqa: F401
from prime_eval.report.conventions import (FORMATS, NOT_RUN, PREFERRED_METRIC, choose_metric,  # noqa: F401
                                           order_tasks, task_label)
from prime_eval.report.documents import DocData, doc_data  # noqa: F401
from prime_eval.report.files import discover, load_meta  # noqa: F401
from prime_eval.report.loading import Collection, ModelRun, PplResult, TaskResult, load  # noqa: F401
from prime_eval.report.mc_error import mc_variance, prob_correct  # noqa: F401
from prime_eval.report.paired_table import excludes_zero, paired_difference  # noqa: F401
from prime_eval.report.plots import make_plots  # noqa: F401
from prime_eval.report.render import (render_console, render_csv, render_html, render_latex,  # noqa: F401
                                      render_markdown, write_report)
from prime_eval.report.table_model import Cell, Label, Report, Table  # noqa: F401
