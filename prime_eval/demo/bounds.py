"""Bound perplexity of every estimator on the held-out documents, against their exact NLL (the true entropy H).

Each held-out document is one block `[BOS] doc [EOS]` (`prime-eval ppl`'s protocol with wrap=False). Per document i,
an estimator's value m_i (nats; for MDM/Prime plus the length term −log q̂(L_i), `prime_eval.demo` docstring) is
compared with the exact NLL h_i of the same document: the paired difference d_i = m_i − h_i, its mean d̄ and the
95% interval d̄ ± z·sd(d)/√n (`prime_eval.intervals.normal_interval`; a mean of nats, unbounded). The interval covers
both the documents' sampling and the Monte Carlo noise of the estimate (each d_i carries its own draw).

A likelihood, or a valid upper bound on one, has E[m_i] ≥ E[h_i] = H (Gibbs), so its interval can exclude 0 from
below only by a bug. The published Prime scorer `legacy_joint` can: it misses, for every token, the conditional
total correlation among the token's masked sub-tokens (method.md §5.1), which a valid bound pays.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from prime_eval import bound_kind as BK
from prime_eval.demo.models import ModelArtifacts, load_demo_network
from prime_eval.demo.settings import FAMILIES, LABELS, DemoSettings
from prime_eval.intervals import normal_interval
from prime_eval.synthetic import SyntheticData, entropy_stats

PPL_ESTIMATORS = {"arm": ("exact",), "mdm": ("mc", "exact_count", "chain_rule"),
                  "prime": ("mc", "exact_count", "legacy_joint")}
VALID_TWIN = "mc"  # the valid bound a non-likelihood row of the same network is compared with


def paired_gap(d: np.ndarray) -> dict:
    """Per-document differences d = a − b of two values on the same documents: their mean `gap`, SE and 95%
    interval."""
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"gap": float(d.mean()), "gap_se": se, "gap_ci95": list(normal_interval(float(d.mean()), se))}


def paired_stats(model_nll: np.ndarray, true_nll: np.ndarray, n_bytes: np.ndarray) -> dict:
    """Per-document model values against the exact NLL on the same documents: nats/doc, bits/byte, and the paired
    difference `gap` with its SE and 95% interval (module docstring)."""
    s = entropy_stats(model_nll, n_bytes)
    diff = np.asarray(model_nll, dtype=np.float64) - np.asarray(true_nll, dtype=np.float64)
    n = diff.size
    s.update(paired_gap(diff))
    s["gap_bits_per_byte"] = float(diff.sum() / math.log(2) / n_bytes.sum())
    s["gap_bits_per_byte_se"] = s["gap_se"] * n / math.log(2) / float(n_bytes.sum())
    return s


def verdict(row: dict, H: float) -> str:
    """How a row relates to the true entropy H (per document), read from its paired 95% interval."""
    lo, hi = row["gap_ci95"]
    if BK.is_likelihood(row["kind"]):
        if hi < 0:
            return "BELOW H (impossible for a likelihood or a valid bound: check the estimator)"
        return "≥ H, as a likelihood must be" if row["kind"] != BK.UPPER_BOUND else "≥ H (valid bound)"
    if hi < 0:
        return (f"BELOW H by {-row['gap']:.1f} nats/doc ({-100 * row['gap'] / H:.0f}% of H): a likelihood the data "
                "cannot have; NOT a bound")
    rel = row.get("vs_valid")
    if rel is None:
        return "NOT a bound (not below H on these documents)"
    side = "below" if rel["gap"] < 0 else "above"
    return (f"NOT a bound: {abs(rel['gap']):.1f} nats/doc {side} the valid bound of the same network; not below H "
            "on these documents")


def compare_with_valid(rows: list[dict], values: dict) -> None:
    """Every non-likelihood row gets `vs_valid`: its paired difference to the valid bound (`VALID_TWIN`) of the same
    network on the same documents (negative: below the valid bound, as legacy_joint is on a well-trained network);
    every Prime row gets `vs_mdm`: the same against the MDM's valid bound, the ranking a reader of the published
    numbers would make (legacy_joint) and the true one (mc)."""
    for r in rows:
        key = (r["family"], VALID_TWIN)
        own = values[(r["family"], r["estimator"])]
        if not BK.is_likelihood(r["kind"]) and key in values:
            r["vs_valid"] = {"estimator": VALID_TWIN, **paired_gap(own - values[key])}
        if r["family"] == "prime" and ("mdm", VALID_TWIN) in values:
            r["vs_mdm"] = {"estimator": VALID_TWIN, **paired_gap(own - values[("mdm", VALID_TWIN)])}


def bound_vs_entropy(art: ModelArtifacts, settings: DemoSettings, data: SyntheticData, ppl_dir, console=None,
                     progress_bar=None) -> list[dict]:
    """Every estimator of every model on the held-out documents; writes the perplexity JSONs (`ppl_dir`) and
    returns one row per (model, estimator). `progress_bar(label)`: a context manager that is a `progress=` callback
    of `evaluate_perplexity` (e.g. `prime_eval.ppl_progress.PplProgressBar`), or None for no display."""
    import contextlib

    from prime_eval import perplexity as P
    from prime_eval.checkpoints import checkpoint_sha256

    texts = data.heldout.texts
    true = np.asarray(data.heldout.nll, dtype=np.float64)
    H = float(true.mean())
    n_bytes = data.heldout.n_bytes
    source = P.TextSource(lambda: iter(texts), {"dataset": "synthetic-heldout", "split": f"seed{settings.seed}",
                                                "text_field": "text"}, num_docs=len(texts))
    rows, values = [], {}
    for family in FAMILIES:
        net, tok, st, _ = load_demo_network(family, art, settings)
        options = {"subtokenizer": st} if st is not None else None
        sha = checkpoint_sha256(art.checkpoints[family])
        for est in PPL_ESTIMATORS[family]:
            vals: dict[int, tuple[float, float, int]] = {}

            def on_block(block, v, n, vals=vals):
                v = v.double()
                k = v.numel()
                vals[block.index] = (float(v.mean()), float(v.var(unbiased=True) / k) if k > 1 else 0.0,
                                     int(block.ids.numel()))

            proto = P.Protocol(L=art.max_len, wrap=False, num_samples=settings.ppl_samples, seed=settings.seed,
                               bootstrap=0)
            bar = progress_bar(f"{LABELS[family]} · {est}") if progress_bar else contextlib.nullcontext()
            with bar as show, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deterministic estimators ignore K; chain_rule's cost warning
                res = P.evaluate_perplexity(
                    net, tok, source, proto, estimator=est,
                    estimator_options=options, batch_size=256,
                    model={"name": f"{family}-demo", "family": family, "checkpoint": str(art.checkpoints[family]),
                           "checkpoint_sha256": sha, "label": f"{LABELS[family]} (demo)"},
                    progress=show, on_block=on_block)
            P.write_json(res, ppl_dir / f"{family}-demo_{est}.json")
            if len(vals) != len(texts):
                raise RuntimeError(f"{family} {est}: {len(vals)} blocks scored for {len(texts)} documents")
            m = np.array([vals[i][0] for i in range(len(texts))])
            lens = np.array([vals[i][2] for i in range(len(texts))])
            len_term = np.zeros_like(m) if family == "arm" else -art.log_q_len[lens]
            values[(family, est)] = m + len_term
            row = paired_stats(m + len_term, true, n_bytes)
            row.update(family=family, model=f"{family}-demo", label=LABELS[family], estimator=est,
                       is_bound=bool(res["is_bound"]), kind=res["bound_kind"],
                       length_term=float(len_term.mean()),
                       mc_se=float(math.sqrt(sum(v[1] for v in vals.values())) / len(texts)),
                       nll_per_token=res["results"]["nll"], ppl_per_token=res["results"]["ppl"],
                       seconds=res["results"]["seconds"], samples=res["results"]["samples_per_block"])
            rows.append(row)
    compare_with_valid(rows, values)
    for r in rows:
        r["gap_relative"] = r["gap"] / H
        r["verdict"] = verdict(r, H)
    return rows
