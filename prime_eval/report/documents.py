"""Per-document data of one (run, task): correctness from lm-eval's samples log and, from our per-request statistics,
the probability q_i that a re-run scores the document correct (`mc_error`).

Which numbers carry Monte Carlo noise is read from the statistics rows, never guessed:

    deterministic             true: the log-likelihood has no MC noise (exact ARM, chain_rule): σ = 0 whatever
                              mc_stderr says. Older files without it: σ = mc_stderr (0 for deterministic values).
    is_greedy_deterministic   true: the `is_greedy` check (argmax decoding / greedy unmasking) draws no random
                              numbers. Older files without it: true (every adapter that exists decides is_greedy
                              deterministically).

Tasks scored by `is_greedy` (lm-eval's `loglikelihood` output type, e.g. LAMBADA: acc = is_greedy, one request per
document): q_i is the observed 0/1 outcome when is_greedy is deterministic, so the MC term is 0; otherwise its
probability is not recorded and the MC term is left out with a note (never a guess).

Multiple-choice tasks need the gold answer: the samples' `target` as an index, else the one choice equal to the target
text, else from the 0/1 outcomes (acc = 1: the argmax; acc = 0 with two choices: the other one). Where it stays
unknown (acc = 0 with three or more choices and a non-index target), the document's term is bounded from above by
the largest q_j(1−q_j) over the choices it can be (not an argmax that was scored wrong), and `unknown_gold` counts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from prime_eval.report.files import read_jsonl
from prime_eval.report.mc_error import prob_correct

NO_MATCHING_STATS = "MC error not included: no statistics file matches the samples log"
RANDOM_GREEDY = ("MC error not included: is_greedy was decided with random numbers (is_greedy_deterministic false) "
                 "and its probability is not recorded")


@dataclass
class DocData:
    correct: dict      # doc_id -> {metric: 0/1}
    hashes: dict       # doc_id -> doc_hash
    q: dict | None     # metric -> {doc_id: q_i}; None when the MC error cannot be computed (`note` says why)
    note: str | None = None
    unknown_gold: int = 0  # documents whose q_i is the upper-bound proxy (gold answer not in the samples log)


def _responses(row: dict) -> list[float]:
    return [float(x[0]) if isinstance(x, (list, tuple)) else float(x) for x in row["filtered_resps"]]


def _continuations(row: dict, k: int) -> list[str | None]:
    """The continuation text of each choice (lm-eval ≥ 0.4.3: arguments = {gen_args_j: {arg_0, arg_1}})."""
    args = row.get("arguments")
    out = []
    for j in range(k):
        if isinstance(args, dict):
            out.append((args.get(f"gen_args_{j}") or {}).get("arg_1"))
        elif isinstance(args, list) and j < len(args) and isinstance(args[j], (list, tuple)) and len(args[j]) > 1:
            out.append(args[j][1])
        else:
            out.append(None)
    return out


def _normalised(values: Sequence[float], conts: list, delimiter: str) -> list[float]:
    """values / character length of the choice (lm-eval's acc_norm; the target delimiter is not counted)."""
    lens = [float(len(c[len(delimiter):] if c.startswith(delimiter) else c)) or 1.0 if c is not None else 1.0
            for c in conts]
    return [x / n for x, n in zip(values, lens)]


def _gold(row: dict, lls: list[float], conts: list, delimiter: str) -> int | None:
    k = len(lls)
    target = row.get("target")
    try:
        g = int(str(target).strip())
        if 0 <= g < k:
            return g
    except ValueError:
        pass
    if isinstance(target, str):
        hits = [j for j, c in enumerate(conts) if c is not None and c.strip() == target.strip()]
        if len(hits) == 1:
            return hits[0]
    for metric, scores in (("acc", lls), ("acc_norm", _normalised(lls, conts, delimiter))):
        pred = int(np.argmax(scores))
        if row.get(metric) == 1:
            return pred
        if row.get(metric) == 0 and k == 2:
            return 1 - pred
    return None


def _match_stats(stat_files, resp: dict) -> dict | None:
    """(doc_id, choice) -> stats row of the newest file whose log-likelihoods equal the samples' responses."""
    for path in sorted(stat_files, reverse=True):
        table = {(s["doc_id"], s["choice"]): s for s in read_jsonl(path)}
        if all((d, j) in table and abs(float(table[(d, j)]["loglikelihood"]) - ll) <= 1e-4 + 1e-6 * abs(ll)
               for d, lls in resp.items() for j, ll in enumerate(lls)):
            return table
    return None


def doc_data(tr, metrics: Sequence[str]) -> DocData | None:
    """Per-document correctness from the samples log of `tr` (a loading.TaskResult) and, when a stats file of the same
    run matches it (its log-likelihoods equal the samples' responses), q_i per metric (module docstring)."""
    if tr.samples is None:
        return None
    rows = read_jsonl(tr.samples)
    correct = {r["doc_id"]: {m: float(r[m]) for m in metrics if m in r} for r in rows}
    hashes = {r["doc_id"]: r.get("doc_hash") for r in rows}
    if not tr.stats:
        return DocData(correct, hashes, None)
    resp = {r["doc_id"]: _responses(r) for r in rows}
    stats = _match_stats(tr.stats, resp)
    if stats is None:
        return DocData(correct, hashes, None, note=NO_MATCHING_STATS)
    binary = [m for m in metrics if all(correct[d].get(m, 0.0) in (0.0, 1.0) for d in correct)]
    greedy_task = tr.output_type == "loglikelihood" or (tr.output_type is None and all(len(v) == 1 for v in resp.values()))
    if greedy_task:  # acc = is_greedy, one request per document
        if any(s.get("is_greedy_deterministic") is False for s in stats.values()):
            return DocData(correct, hashes, None, note=RANDOM_GREEDY)
        return DocData(correct, hashes, {m: {d: c[m] for d, c in correct.items() if m in c} for m in binary})
    q: dict = {m: {} for m in binary}
    unknown = 0
    for r in rows:
        d, lls = r["doc_id"], resp[r["doc_id"]]
        conts = _continuations(r, len(lls))
        se = [0.0 if stats[(d, j)].get("deterministic") is True else float(stats[(d, j)]["mc_stderr"])
              for j in range(len(lls))]
        gold = _gold(r, lls, conts, tr.delimiter)
        unknown += gold is None
        wrong = {int(np.argmax(sc)) for m, sc in (("acc", lls), ("acc_norm", _normalised(lls, conts, tr.delimiter)))
                 if r.get(m) == 0}  # choices that cannot be gold: an argmax scored wrong
        for m in binary:
            sc, sd = (_normalised(lls, conts, tr.delimiter), _normalised(se, conts, tr.delimiter)) if m == "acc_norm" \
                else (lls, se)
            if gold is not None:
                q[m][d] = prob_correct(sc, sd, gold)
            else:  # the q_j of the possible golds whose q(1−q) is largest: an upper bound of the document's term
                cands = [prob_correct(sc, sd, j) for j in range(len(lls)) if j not in wrong] \
                    or [prob_correct(sc, sd, j) for j in range(len(lls))]
                q[m][d] = max(cands, key=lambda x: x * (1.0 - x))
    return DocData(correct, hashes, q, unknown_gold=unknown)
