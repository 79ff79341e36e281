"""The demo's generation step: each model completes sentences of the synthetic language through lm-eval's
`generate_until` (the `prime-eval score` code path, `scoring.score_model`), scored against the truth
(`prime_eval.synthetic.generative`):

    greedy run (temperature 0)   exact match with the Bayes-optimal answer (the MAP completion, exact search) and
                                 with the realised continuation, each with Wilson's 95% interval
    sampled run (temperature 1)  the mean **true** NLL of the generated answers under the language (nats/answer, ± SE
                                 over answers) and its paired difference to the realised continuations' NLL, an
                                 unbiased estimate of the conditional entropy H(answer | context): a generative
                                 perplexity computed exactly, not by a judge model

Both runs count invalid outputs (no "." within the budget, an unknown word, probability 0 after the context): their
true log-likelihood is −inf, so the NLL means are over the valid answers and the invalid ones are a column of their
own. Forward passes per generated token come from the adapters' `generations_<task>_*.jsonl` statistics.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prime_eval.demo.settings import FAMILIES, LABELS
from prime_eval.intervals import mean_se, normal_interval, wilson_interval
from prime_eval.report.files import read_jsonl
from prime_eval.synthetic import Language, make_corpus
from prime_eval.synthetic.generative import (TASK, TASK_SAMPLED, answer_log_prob, completion_summary,
                                             make_completion_task, parse_answer, write_completion_tasks)

MODES = {"greedy": TASK, "sampled": TASK_SAMPLED}
STREAM = 4  # the documents of the generative task: a fourth independent stream (train 1, held-out 2, MC tasks 3)


@dataclass(frozen=True)
class GenerationSettings:
    """The generative task and the samplers (recorded in demo.json; no weight depends on them)."""

    n_items: int = 48
    max_gen_toks: int = 24  # answer budget in tokens; diffusion: the answer's fixed length (gen_length)
    steps: int = 24  # diffusion steps per answer (one token per step)
    block_length: int = 8  # semi-autoregressive blocks (LLaDA), sampled left to right
    greedy_remasking: str = "low_confidence"  # MDM, temperature 0 (LLaDA's default)
    sampled_remasking: str = "random"  # MDM, temperature 1: one token per step in uniformly random order, an exact
    # draw from the network's any-order process (low_confidence is not a draw from any model distribution)
    repeats: int = 1  # answers per context in the sampled run

    def model_args(self, family: str, mode: str) -> dict:
        """The sampler's model arguments (`prime-eval score --model_args`) of a run."""
        if family == "arm":
            return {}
        out = {"gen_length": self.max_gen_toks, "steps": self.steps, "block_length": self.block_length}
        if family == "mdm":
            out["remasking"] = self.greedy_remasking if mode == "greedy" else self.sampled_remasking
        return out

    def describe(self, family: str) -> str:
        """The sampler settings in words, for the table."""
        if family == "arm":
            return f"left to right, KV cache, ≤{self.max_gen_toks} tokens"
        g, s = self.model_args(family, "greedy"), self.model_args(family, "sampled")
        text = f"{g['gen_length']} tokens, {g['steps']} steps, blocks of {g['block_length']}"
        if family == "mdm":
            text += f"; {g['remasking']} / {s['remasking']}"
        return text


def generation_settings(quick: bool = False) -> GenerationSettings:
    return GenerationSettings(n_items=24) if quick else GenerationSettings()


def make_task(lang: Language, seed: int, gs: GenerationSettings, data_dir: Path) -> list[dict]:
    """The sentence-completion items (from documents of their own stream) and their files: DATA/synth_complete/
    test.jsonl, DATA/tasks/synth_complete.yaml (greedy) and synth_complete_t1.yaml (temperature 1)."""
    docs = make_corpus(lang, 8 * gs.n_items, seed, stream=STREAM).docs
    items = make_completion_task(lang, docs, seed, gs.n_items)
    if len(items) < gs.n_items:
        raise RuntimeError(f"only {len(items)} of {gs.n_items} sentence completions could be drawn")
    write_completion_tasks(items, data_dir, data_dir / "tasks", gs.max_gen_toks, gs.repeats)
    return items


def truth_summary(items: list[dict], tokenizer, gs: GenerationSettings) -> dict:
    """`completion_summary` plus the realised (and Bayes) answers that do not fit the budget in tokens (the invalid
    rate of a perfect sampler, and of the Bayes answerer)."""
    s = completion_summary(items)

    def tokens(answer: str) -> int:
        return len(tokenizer(f" {answer}." if answer else ".", add_special_tokens=False)["input_ids"])

    n_tok = [tokens(it["answer"]) for it in items]
    s["over_budget"] = float(np.mean([n > gs.max_gen_toks for n in n_tok]))
    s["bayes_over_budget"] = float(np.mean([tokens(it["bayes"]) > gs.max_gen_toks for it in items]))
    s["answer_nll_per_symbol"] = float(-sum(it["answer_logp"] for it in items)
                                       / sum(it["answer_words"] + 1 for it in items))
    s["answer_tokens"] = float(np.mean(n_tok))
    return s


def read_run(results_file: Path, task: str) -> tuple[dict[int, list[str]], list[dict]]:
    """(doc id -> raw generations, the adapter's generation statistics) of one lm-eval run."""
    folder = Path(results_file).parent
    raw: dict[int, list[str]] = {}
    for f in sorted(folder.glob(f"samples_{task}_*.jsonl")):
        for s in read_jsonl(f):
            raw[int(s["doc"]["id"])] = [r for rs in s["resps"] for r in (rs if isinstance(rs, list) else [rs])]
    stats = [row for f in sorted(folder.glob(f"generations_{task}_*.jsonl")) for row in read_jsonl(f)]
    return raw, stats


def score_answers(lang: Language, items: list[dict], raw: dict[int, list[str]]) -> dict:
    """Every generated answer against the truth: exact match with the Bayes answer and the realised one, its true
    log-likelihood (−inf when invalid), and the paired difference of the valid answers' NLL to the realised
    answer's NLL on the same context."""
    bayes_hit, real_hit, nll, paired, symbols, invalid = [], [], [], [], [], 0
    for it in items:
        alpha, _ = lang.forward(lang.parse(it["context"]))
        answers = raw.get(int(it["id"]))
        if not answers:
            raise RuntimeError(f"no generation for item {it['id']}")
        for text in answers:
            words = parse_answer(lang, text)
            lp = -math.inf if words is None else answer_log_prob(lang, alpha, words)
            ans = None if words is None else " ".join(lang.words[w] for w in words)
            bayes_hit.append(ans == it["bayes"])
            real_hit.append(ans == it["answer"])
            if lp == -math.inf:
                invalid += 1
                continue
            nll.append(-lp)
            symbols.append(len(words) + 1)  # the words and the "."
            paired.append(-lp + it["answer_logp"])
    n = len(bayes_hit)
    nll_a, paired_a = np.array(nll), np.array(paired)
    out = {"answers": n, "invalid": invalid, "invalid_frac": invalid / n,
           "invalid_frac_ci95": list(wilson_interval(invalid / n, n))}
    for key, hits in (("em_bayes", bayes_hit), ("em_realised", real_hit)):
        p = float(np.mean(hits))
        out[key], out[f"{key}_ci95"] = p, list(wilson_interval(p, n))
    out["nll_valid"] = float(nll_a.mean()) if nll else None
    out["nll_valid_se"] = mean_se(nll_a) if nll else None
    out["nll_all"] = None if invalid else out["nll_valid"]  # +inf (not a number) when any answer is invalid
    out["nll_per_symbol_valid"] = float(nll_a.sum() / sum(symbols)) if nll else None
    gap = float(paired_a.mean()) if paired else None
    gap_se = mean_se(paired_a) if paired else None
    out["nll_gap"], out["nll_gap_se"] = gap, gap_se
    out["nll_gap_ci95"] = list(normal_interval(gap, gap_se)) if gap_se is not None else None
    return out


def pass_stats(stats: list[dict]) -> dict:
    """Forward passes per generated token (the sampler's output span: ARM up to its stop, diffusion gen_length)."""
    passes = sum(int(r["forward_passes"]) for r in stats)
    toks = sum(int(r["generated_tokens"]) for r in stats)
    return {"forward_passes": passes, "generated_tokens": toks, "passes_per_token": passes / toks if toks else None,
            "passes_per_answer": passes / len(stats) if stats else None}


def run_generation(art, settings, gs: GenerationSettings, lang: Language, items: list[dict], tasks_dir: Path,
                   runs_dir: Path, out_root: Path, console=None) -> dict:
    """Both runs of every family through lm-eval; returns demo.json's "generation" (settings, truth, one row per
    family)."""
    from prime_eval.demo.scoring import score_model

    rows, files = [], {}
    for fam in FAMILIES:
        row = {"model": f"{fam}-demo", "family": fam, "label": LABELS[fam], "sampler": gs.describe(fam)}
        for mode, task in MODES.items():
            if console is not None:
                console.print(f"{LABELS[fam]}: {task} ({mode}) ...")
            path = score_model(fam, art, settings, tasks_dir, runs_dir, [task],
                               extra=gs.model_args(fam, mode), display_name=f"{fam}-demo-{mode}")
            files[f"{fam}-{mode}"] = str(Path(path).resolve().relative_to(Path(out_root).resolve()))
            raw, stats = read_run(path, task)
            row[mode] = {**score_answers(lang, items, raw), **pass_stats(stats),
                         "model_args": gs.model_args(fam, mode)}
        rows.append(row)
    return {"settings": asdict(gs), "results_files": files, "rows": rows}
