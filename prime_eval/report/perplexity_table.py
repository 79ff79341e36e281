"""Perplexity tables: one per dataset and kind of number (`kinds`), one row per ppl JSON.

NLL (nats/token) with its 95% interval NLL ± z·SE (an average of many terms: normal), and PPL = exp(NLL) with exp of
the NLL interval (`prime_eval.intervals.ppl_interval`; exp is monotone, so the coverage carries over, asymmetric
around PPL). "≤" marks upper bounds only (bound_kind upper_bound); exact values carry no mark; the exact NLL of the
left-to-right process (chain_rule) and scores that are not likelihoods get tables of their own.
"""
from __future__ import annotations

from prime_eval import bound_kind as BK
from prime_eval.intervals import normal_interval, ppl_interval
from prime_eval.report.conventions import FAMILY_LABEL, family_key
from prime_eval.report.table_model import Cell, Notes, Table, bold_best, fmt_params, fmt_ppl, with_notes

MIXED_TOKENS = "rows of this table were scored on different numbers of tokens: their values are not directly comparable"
_TITLE = {
    "likelihood": ("Perplexity on {d}",
                   "NLL with the 95% interval [low, high] of the ppl JSON's nll_stderr: the Monte Carlo error of "
                   "the estimate on this text (none for exact values; see prime_eval/perplexity.py and the CSV's "
                   "se_method); PPL = exp(NLL) with the exp of the NLL interval. "
                   "≤ marks upper bounds on the model's NLL (diffusion NELBOs); exact values carry no mark. "
                   "Estimator: the estimator and its number of samples K per block."),
    "left_to_right": ("Perplexity on {d}: left-to-right process (chain_rule)",
                      "The exact NLL of decoding left to right with a diffusion model's conditionals: a likelihood "
                      "of a different process, neither the model's NLL nor a bound on it; not comparable with the "
                      "bounds of the table above."),
    "not_a_likelihood": ("Perplexity on {d}: NOT likelihoods (legacy_joint and similar)",
                         "These estimators do not bound the NLL; they are not comparable with the bounds above "
                         "and are kept apart on purpose."),
}
SECTION_KEY = {"likelihood": "bound", "left_to_right": "left-to-right", "not_a_likelihood": "other"}


def perplexity_tables(results: list) -> list[Table]:
    """`results`: loading.PplResult rows."""
    tables = []
    for section in ("likelihood", "left_to_right", "not_a_likelihood"):
        sel = [r for r in results if r.section == section]
        for dataset in sorted({r.dataset for r in sel}):
            rs = sorted((r for r in sel if r.dataset == dataset),
                        key=lambda r: (family_key(r.family), r.params or 0.0, r.display))
            notes = Notes()
            mixed = len({r.tokens for r in rs}) > 1
            rows, groups, records = [], [], []
            for r in rs:
                p, plo, phi = ppl_interval(r.nll, r.nll_se)
                lo, hi = normal_interval(r.nll, r.nll_se)
                prefix = "≤" if r.kind == BK.UPPER_BOUND else ""
                fam = FAMILY_LABEL.get(r.family, r.family)
                rows.append([fam, with_notes(r.display, [notes(t) for t in r.notes]), fmt_params(r.params),
                             r.estimator_label,
                             Cell(main="" if r.tokens is None else f"{r.tokens:,}",
                                  note=notes(MIXED_TOKENS) if mixed and r.tokens is not None else ""),
                             Cell(main=f"{r.nll:.3f}", unc=f"[{lo:.3f}, {hi:.3f}]", prefix=prefix, value=r.nll),
                             Cell(main=fmt_ppl(p), unc=f"[{fmt_ppl(plo)}, {fmt_ppl(phi)}]", prefix=prefix, value=p)])
                groups.append(fam)
                records.append({"section": SECTION_KEY[section], "dataset": dataset, "family": r.family,
                                "model": r.display, "params": r.params, "estimator": r.estimator_label,
                                "num_samples": r.num_samples, "bound_kind": r.kind, "upper_bound": bool(prefix),
                                "nll": r.nll, "nll_se": r.nll_se, "se_method": r.se_method,
                                "nll_ci95_low": lo, "nll_ci95_high": hi,
                                "ppl": p, "ppl_ci95_low": plo, "ppl_ci95_high": phi, "tokens": r.tokens,
                                "source": r.source})
            bold_best(rows, 5, higher=False)
            title, caption = _TITLE[section]
            header = ["Family", "Model", "Params", "Estimator", "Tokens", "NLL (nats/token)", "PPL"]
            tables.append(Table(f"ppl-{SECTION_KEY[section]}-{dataset}", title.format(d=dataset), caption, header,
                                rows, groups, notes.texts, n_labels=4, records=records))
    return tables
