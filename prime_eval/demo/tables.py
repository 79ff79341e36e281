"""The demo's own report tables, drawn by the report's renderers (`prime_eval.report.table_model`):

    demo-entropy    every estimator against the true entropy H of the held-out documents (first: the point)
    demo-accuracy   accuracy on the synthetic tasks against the Bayes-optimal answers
    demo-generation generated sentence completions against the true language (`prime_eval.demo.generation`)
    demo-audit      exact audit: the oracle networks of `prime-eval audit` next to the trained networks

Accuracies and their differences are shown as 95% intervals [low, high] (Wilson / Tango with the Monte Carlo
variance, `prime_eval.demo.scoring`): inside [0, 100] and [−100, 100]. Nats are means, shown as ± z·SE.
"""
from __future__ import annotations

from prime_eval import bound_kind as BK
from prime_eval.demo.settings import FAMILIES, LABELS
from prime_eval.intervals import Z95, wilson_interval
from prime_eval.report.paired_table import excludes_zero
from prime_eval.report.table_model import Cell, Table, fmt_interval

WHAT = {BK.EXACT: "exact likelihood", BK.UPPER_BOUND: "upper bound (NELBO)",
        BK.EXACT_LEFT_TO_RIGHT: "exact NLL of its left-to-right process", BK.NOT_A_LIKELIHOOD: "published, NOT a bound"}


def legacy_summary(summary: dict) -> dict | None:
    """The trained Prime's legacy_joint row and its valid bound (mc), with H: what the report states in words."""
    rows = {(r["family"], r["estimator"]): r for r in summary["bounds"]}
    legacy, valid = rows.get(("prime", "legacy_joint")), rows.get(("prime", "mc"))
    if legacy is None or valid is None:
        return None
    return {"H": summary["data"]["heldout"]["nats_per_doc"], "legacy": legacy, "valid": valid,
            "below_H": legacy["gap_ci95"][1] < 0}


def legacy_sentence(summary: dict) -> str:
    """How far below (or not) H the published scorer is on the trained Prime, and why, in one paragraph."""
    s = legacy_summary(summary)
    if s is None:
        return ""
    lg, va, H = s["legacy"], s["valid"], s["H"]
    lo, hi = lg["gap_ci95"]
    vs = lg.get("vs_valid") or {}
    where = (f"{-lg['gap']:.1f} nats/doc below the true entropy H = {H:.1f} ({-100 * lg['gap'] / H:.0f}% of H; "
             f"paired 95% interval of legacy_joint − H: [{lo:+.1f}, {hi:+.1f}], excluding 0)" if s["below_H"] else
             f"{lg['gap']:+.1f} nats/doc from the true entropy H = {H:.1f} (paired 95% interval [{lo:+.1f}, {hi:+.1f}]: "
             "NOT below H on these documents)")
    return (f"On the trained MDM-Prime-v2 the published scorer legacy_joint reads {lg['nats_per_doc']:.1f} nats/doc, "
            f"{where}, while the valid bound (mc) of the same network reads {va['nats_per_doc']:.1f} "
            f"({va['gap']:+.1f} vs H) and the exact ARM {summary_row(summary, 'arm', 'exact')['gap']:+.1f}. "
            f"legacy_joint is {abs(vs.get('gap', 0.0)):.1f} nats/doc {'below' if vs.get('gap', 0.0) < 0 else 'above'} "
            "the valid bound because it charges each partly masked token the joint cross-entropy −log p̃(x|y_t) once, "
            "weighted 1/t, where the valid bound charges every masked sub-token the −log of its marginal: the "
            "difference is the conditional total correlation among a token's masked sub-tokens (the shuffled binary "
            "digits of one token determine each other; method.md §5.1), information the published form never pays "
            "for. No likelihood can be below H in expectation, so a number below H proves it is not a bound."
            + ranking_sentence(lg, va))


def ranking_sentence(legacy: dict, valid: dict) -> str:
    """The Prime against the MDM's valid bound, by the published scorer and by the valid bound (paired)."""
    a, b = legacy.get("vs_mdm"), valid.get("vs_mdm")
    if not a or not b:
        return ""

    def diff(x):
        lo, hi = x["gap_ci95"]
        return f"{x['gap']:+.1f} nats/doc [{lo:+.1f}, {hi:+.1f}]"

    return (f" Against the MDM's valid bound on the same documents (paired 95% intervals), the published scorer puts "
            f"MDM-Prime-v2 at {diff(a)}, the valid bound at {diff(b)}: "
            + ("the published scorer reverses the ranking." if (a["gap"] < 0) != (b["gap"] < 0) else
               "the same order by both, the published one off by the total correlation."))


def summary_row(summary: dict, family: str, estimator: str) -> dict:
    return next(r for r in summary["bounds"] if r["family"] == family and r["estimator"] == estimator)


def entropy_table(summary: dict) -> Table:
    H = summary["data"]["heldout"]
    header = ["Model", "Estimator", "What it is", "nats / document", "− H (paired)", "− H (% of H)", "bits / byte",
              "length term", "verdict"]
    rows = [["True entropy H", "exact NLL (forward algorithm)", "truth",
             Cell(main=f"{H['nats_per_doc']:.2f}", unc=f"± {Z95 * H['nats_per_doc_se']:.2f}"), Cell(main="0"),
             Cell(main="0"), Cell(main=f"{H['bits_per_byte']:.4f}", unc=f"± {Z95 * H['bits_per_byte_se']:.4f}"),
             Cell(main="—"), "the floor"]]
    for r in summary["bounds"]:
        lo, hi = r["gap_ci95"]
        rows.append([r["label"], r["estimator"], WHAT.get(r["kind"], r["kind"]),
                     Cell(main=f"{r['nats_per_doc']:.2f}", unc=f"± {Z95 * r['nats_per_doc_se']:.2f}",
                          prefix="≤" if r["kind"] == BK.UPPER_BOUND else ""),
                     Cell(main=f"{r['gap']:+.2f}", unc=f"[{lo:+.2f}, {hi:+.2f}]", value=r["gap"],
                          marker="‼" if hi < 0 else ""),
                     Cell(main=f"{100 * r['gap_relative']:+.1f}%"),
                     Cell(main=f"{r['bits_per_byte']:.4f}", unc=f"± {Z95 * r['bits_per_byte_se']:.4f}"),
                     Cell(main=f"{r['length_term']:.2f}" if r["family"] != "arm" else "—"),
                     r["verdict"]])
    cap = (f"{H['docs']} held-out documents, each scored as one block [BOS] doc [EOS] (prime-eval ppl, wrap=False); "
           "nats per document ± half-width of the 95% interval over documents; '− H' is the paired difference to the "
           "exact NLL of the same documents with its 95% interval (‼ = the interval lies below 0). A likelihood or a "
           "valid upper bound can never be below H in expectation; the published legacy_joint can. Diffusion rows "
           "include the length term −log q̂(L) (a block of known length L is scored; q̂ = training length "
           "distribution; see prime_eval/demo/__init__.py). Bits per byte: Σ NLL / (ln 2 · Σ UTF-8 bytes). "
           + legacy_sentence(summary))
    return Table("demo-entropy", "Bounds against the true entropy (held-out documents)", cap, header, rows,
                 [""] * len(rows), {}, n_labels=3)


def accuracy_table(summary: dict) -> Table:
    from prime_eval.settings import DEFAULT_ESTIMATOR  # what `prime-eval score` used (its default)

    tasks = list(summary["data"]["tasks"])
    acc = summary["accuracy"]
    header = ["Model", "Scored with"] + [f"{t} acc (%)" for t in tasks] + [f"{t}: model − Bayes" for t in tasks]
    rows = []
    bayes = ["Bayes-optimal (true process)", "exact p(cont | ctx)"]
    for t in tasks:
        s = summary["data"]["tasks"][t]
        bayes.append(Cell(main=f"{100 * s['bayes_acc']:.1f}",
                          unc=fmt_interval(*wilson_interval(s["bayes_acc"], s["docs"])), value=s["bayes_acc"]))
    rows.append(bayes + [Cell(main="0", value=0.0) for _ in tasks])
    for fam in FAMILIES:
        est = ("exact" if fam == "arm" else
               f"{DEFAULT_ESTIMATOR['score'][fam]}, K≤{summary['settings']['score_samples']} (adaptive)")
        row = [f"{LABELS[fam]} ({summary['models'][fam]['params'] / 1e6:.2f}M)", est]
        gaps = []
        for t in tasks:
            r = next((a for a in acc if a["model"] == f"{fam}-demo" and a["task"] == t), None)
            if r is None or r["acc"] is None:
                row.append(Cell())
                gaps.append(Cell())
                continue
            lo, hi = r["acc_ci95"]
            row.append(Cell(main=f"{100 * r['acc']:.1f}", unc=fmt_interval(lo, hi) if lo is not None else "",
                            value=r["acc"]))
            if r.get("gap_to_bayes_ci95"):
                glo, ghi = r["gap_to_bayes_ci95"]
                gaps.append(Cell(main=f"{100 * r['gap_to_bayes']:+.1f}", unc=fmt_interval(glo, ghi, signed=True),
                                 marker="†" if excludes_zero(glo, ghi) else "", value=r["gap_to_bayes"]))
            else:
                gaps.append(Cell())
        rows.append(row + gaps)
    rows.append(["chance", "uniform guess"] + [Cell(main=f"{100 * summary['data']['tasks'][t]['chance']:.1f}")
                                              for t in tasks] + [Cell() for _ in tasks])
    cap = ("lm-eval acc (argmax of the summed continuation log-likelihood) on the synthetic multiple-choice tasks, "
           "with the 95% interval [low, high]: Wilson's score interval with the Monte Carlo variance of the "
           "likelihood estimates added (inside [0, 100]). The Bayes-optimal answer is the argmax of the exact "
           "conditional likelihood under the true process; it is the best any scorer can do in expectation. "
           "'model − Bayes' is the paired difference on the same questions with Tango's score interval († = the "
           "interval excludes 0).")
    return Table("demo-accuracy", "Accuracy against the Bayes-optimal answer", cap, header, rows, [""] * len(rows),
                 {}, n_labels=2)


ORACLE_ESTIMATORS = ("mc", "legacy_joint")


def audit_table(summary: dict) -> Table:
    header = ["Network", "Case", "Estimator", "E[estimate] (exact)", "reference", "gap", "verdict"]
    rows = []
    audit = summary["audit"]["rows"]
    oracle = [r for r in audit if r["case"].startswith("oracle") and r["estimator"] in ORACLE_ESTIMATORS]
    trained = [r for r in audit if r["case"].startswith("trained")]
    for kind, group in (("oracle (exact conditionals, i.i.d. tokens)", oracle),
                        ("trained (this demo)", trained)):
        for r in group:
            case = r["case"].removeprefix("oracle ").removeprefix("trained ")
            gap = r["gap"] if abs(r["gap"]) >= 5e-5 else 0.0  # no "-0.0000" for a round-off difference
            rows.append([kind, case, r["estimator"], Cell(main=f"{r['expectation']:.4f}"),
                         Cell(main=f"{r['reference']:.4f}"), Cell(main=f"{gap:+.4f}", value=r["gap"]),
                         r["verdict"]])
    a = summary["audit"]
    cap = ("Exact enumeration (every mask set). Oracle rows: a network that returns the exact conditional of i.i.d. "
           "tokens; the reference is the true entropy (L·H), so legacy_joint below it is the total-correlation "
           "deficit with no model error at all. Trained rows: the demo's networks on short held-out targets; the "
           "reference is the exact NLL of the network's own any-order generative process (dynamic programming over "
           f"reveal orders). The whole generic audit (`prime-eval audit --fast`, "
           f"{len(a['rows']) - len(trained)} rows) is in demo.json; legacy_joint rows below the reference across "
           f"both: {a['legacy_violations']}; every valid estimator a bound: "
           f"{'yes' if a['valid_estimators_pass'] else 'NO'}.")
    return Table("demo-audit", "Exact audit: oracle networks and the trained networks", cap, header, rows,
                 [""] * len(rows), {}, n_labels=3)


def _pct(p: float | None, ci=None, detail: str = "") -> Cell:
    if p is None:
        return Cell()
    return Cell(main=f"{100 * p:.1f}", unc=fmt_interval(*ci) if ci else "", value=p, detail=detail)


def _nats(x: float | None, se: float | None = None, digits: int = 2, detail: str = "") -> Cell:
    if x is None:
        return Cell()
    unc = f"± {Z95 * se:.{digits}f}" if se is not None else ""
    return Cell(main=f"{x:.{digits}f}", unc=unc, value=x, detail=detail)


def generation_table(summary: dict) -> Table:
    """Greedy answers against the Bayes answer, temperature-1 answers' true NLL against the truth, per family."""
    g = summary["generation"]
    gs, tr = g["settings"], g["truth"]
    n = tr["docs"]
    header = ["Model", "Sampler", "greedy: = Bayes answer (%)", "greedy: = realised (%)", "greedy: invalid (%)",
              "T=1: true NLL (nats/answer)", "T=1: nats/symbol", "T=1: − truth (paired)", "T=1: invalid (%)",
              "passes / token (greedy; T=1)"]
    dash = Cell(main="—")
    rows = [["Bayes-optimal answer", "MAP completion, exact search", _pct(1.0),
             _pct(tr["bayes_em"], wilson_interval(tr["bayes_em"], n), f"expected {100 * tr['bayes_expected']:.1f}"),
             _pct(tr["bayes_over_budget"], detail="over budget"), dash, dash, dash, dash, dash],
            ["True process", "the realised continuation", _pct(tr["bayes_em"], wilson_interval(tr["bayes_em"], n)),
             _pct(1.0), dash, _nats(tr["answer_nll"], tr["answer_nll_se"]),
             _nats(tr["answer_nll_per_symbol"], digits=3),
             Cell(main="0", value=0.0), _pct(tr["over_budget"], detail="over budget"), dash]]
    for r in g["rows"]:
        gr, sa = r["greedy"], r["sampled"]
        gap = Cell()
        if sa["nll_gap"] is not None and sa["nll_gap_ci95"]:
            lo, hi = sa["nll_gap_ci95"]
            gap = Cell(main=f"{sa['nll_gap']:+.2f}", unc=f"[{lo:+.2f}, {hi:+.2f}]", value=sa["nll_gap"],
                       marker="†" if excludes_zero(lo, hi) else "")
        valid = sa["answers"] - sa["invalid"]
        passes = " ; ".join(f"{x['passes_per_token']:.2f}" if x["passes_per_token"] is not None else "—"
                            for x in (gr, sa))
        rows.append([f"{r['label']} ({summary['models'][r['family']]['params'] / 1e6:.2f}M)", r["sampler"],
                     _pct(gr["em_bayes"], gr["em_bayes_ci95"]), _pct(gr["em_realised"], gr["em_realised_ci95"]),
                     _pct(gr["invalid_frac"], gr["invalid_frac_ci95"]),
                     _nats(sa["nll_valid"], sa["nll_valid_se"], detail=f"{valid} valid" if sa["invalid"] else ""),
                     _nats(sa["nll_per_symbol_valid"], digits=3), gap,
                     _pct(sa["invalid_frac"], sa["invalid_frac_ci95"]), Cell(main=passes)])
    H = summary["data"]["heldout"]
    cap = (f"synth_complete: {n} held-out document prefixes that end inside a sentence; the answer is the rest of the "
           "sentence (its words up to the '.'), generated through lm-eval generate_until with each family's adapter "
           f"(the prime-eval score path; budget {gs['max_gen_toks']} tokens, the diffusion answer's fixed length). "
           "Greedy columns (temperature 0): exact match of the answer with the Bayes-optimal answer (the most "
           "probable completion under the true language, found by exact best-first search over the automaton) and "
           "with the continuation that actually followed, with Wilson 95% intervals; the Bayes answer's own match "
           "with the realised continuation is the best any answerer can expect (its expected value: the mean "
           "probability of the MAP completion). T=1 columns (temperature 1; MDM with random remasking, a draw from "
           "its any-order process): the exact negative log-likelihood of the generated answer (its words and the "
           "'.') under the true language by the forward algorithm, a generative perplexity that needs no judge model, "
           "± half-width of the 95% interval over answers; '− truth' is its paired difference to the realised "
           "continuation of the same context (an unbiased estimate of the conditional entropy; † = interval "
           "excludes 0). Below the truth means mode-seeking samples; above, poor ones. An invalid answer (no '.' "
           "within the budget, a word the language does not have, or a completion of probability 0) has true NLL "
           "+∞: it is counted in the invalid column, and the NLL means and paired differences are over the valid "
           "answers only, so a model with many invalid answers is better than it deserves there. The true process's "
           "invalid entry is the fraction of realised answers longer than the budget. For scale: the held-out "
           f"documents' entropy rate is {H.get('nats_per_symbol', float('nan')):.3f} nats/symbol. Passes per token: "
           "network forward rows per generated token (ARM up to its stop; diffusion over the whole fixed-length "
           "answer).")
    return Table("demo-generation", "Generation against the true language (sentence completion)", cap, header, rows,
                 [""] * len(rows), {}, n_labels=2)


def demo_tables(summary: dict) -> list[Table]:
    """The demo's tables, in the report's order: the point first."""
    gen = [generation_table(summary)] if summary.get("generation") else []
    return [entropy_table(summary), accuracy_table(summary), *gen, audit_table(summary)]
