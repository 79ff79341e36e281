"""Multiple-choice tasks with exact Bayes-optimal answers (lm-eval format: `context`, `choices`, `gold`).

* `synth_word`: context = a document prefix; choices = the word that followed plus 3 other words of the **same class**,
  drawn uniformly without replacement among the class's words that have positive probability after the context.
* `synth_order`: choices = the next `order_len` symbols as generated plus 3 other orderings of the same symbols,
  drawn uniformly among the distinct orderings that have positive probability after the context.

In both, the way the distractors are drawn is symmetric: the pool they come from depends only on the context and on
what every candidate shares (the class; the multiset of symbols), so given the candidate set, every member was equally
likely to have produced it. So the posterior that candidate j is the one the process generated is exactly
p(c_j | context) / Σ_i p(c_i | context), and the **Bayes-optimal answer** is the argmax of the exact conditional
likelihood (`bayes`), with expected accuracy E[max_j posterior_j] (`bayes_expected`). This is also what a perfect
language model scored by lm-eval's `acc` (argmax of the summed continuation log-likelihood) does.
Continuations never contain a document's last symbol, so where the document ends plays no role.

Files: `write_tasks` writes `DATA/<task>/test.jsonl` and a task YAML per task (`prime_eval.tasks.task_yaml`, the
project's one YAML emitter).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from prime_eval.intervals import mean_se
from prime_eval.synthetic.language import END, Language


def _posterior(logps: list[float]) -> np.ndarray:
    lp = np.asarray(logps, dtype=np.float64)
    m = lp.max()
    w = np.exp(lp - m)
    return w / w.sum()


def _finish(lang: Language, doc_id: int, ctx: list[int], cands: list[tuple[int, ...]], gold: int, task: str) -> dict:
    a, _ = lang.forward(ctx)
    logps = [lang.forward(c, a)[1] for c in cands]
    post = _posterior(logps)
    ctx_text = lang.render(ctx)
    choices = [lang.render(c) for c in cands]
    full = lang.render(list(ctx) + list(cands[gold]))
    assert full == ctx_text + " " + choices[gold], "rendering must split at the context boundary"
    return {"id": doc_id, "task": task, "context": ctx_text, "choices": choices, "gold": gold,
            "true_logp": [float(x) for x in logps], "bayes": int(np.argmax(logps)),
            "posterior": [float(x) for x in post], "bayes_correct": bool(int(np.argmax(logps)) == gold)}


def make_word_task(lang: Language, docs: list[list[int]], seed: int, n_choices: int = 4,
                   min_context: int = 3, limit: int | None = None) -> list[dict]:
    """Next word among `n_choices` words of the same class: the true one plus distractors drawn uniformly among the
    other words of its class that have positive probability after the context."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A5C, 1]))
    out: list[dict] = []
    for d in docs:
        if limit is not None and len(out) >= limit:
            break
        # cut positions t: the symbol at t is a word and is not the document's last symbol
        cut = [t for t in range(min_context, len(d) - 1) if d[t] != END]
        rng.shuffle(cut)
        for t in cut:
            w = d[t]
            probs = lang.next_symbol_probs(d[:t])
            members = [int(m) for m in lang.class_members(int(lang.word_class[w])) if m != w and probs[m] > 0]
            if len(members) < n_choices - 1:
                continue
            others = rng.choice(members, size=n_choices - 1, replace=False).tolist()
            gold = int(rng.integers(n_choices))
            words = others[:gold] + [w] + others[gold:]
            out.append(_finish(lang, len(out), d[:t], [(x,) for x in words], gold, "synth_word"))
            break
    return out


def make_order_task(lang: Language, docs: list[list[int]], seed: int, n_choices: int = 4, order_len: int = 5,
                    min_context: int = 2, limit: int | None = None) -> list[dict]:
    """The original order of the next `order_len` symbols among `n_choices` orderings: distractors are drawn
    uniformly among the other orderings that have positive probability after the context."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A5C, 2]))
    index = np.array(list(itertools.permutations(range(order_len))))  # (order_len!, order_len)
    out: list[dict] = []
    for d in docs:
        if limit is not None and len(out) >= limit:
            break
        cut = [t for t in range(min_context, len(d) - order_len) if d[t] != END]
        rng.shuffle(cut)
        for t in cut:
            seg = tuple(d[t:t + order_len])
            cand = np.unique(np.asarray(seg)[index], axis=0)  # distinct orderings, sorted
            ok = (cand[:, 0] != END) & ~((cand[:, 1:] == END) & (cand[:, :-1] == END)).any(1)
            ok &= ~(cand == np.asarray(seg)).all(1)
            cand = cand[ok]
            if len(cand) < n_choices - 1:
                continue
            a, _ = lang.forward(d[:t])
            lp = lang.batch_log_prob(cand, a)
            perms = [tuple(int(x) for x in row) for row in cand[lp > -math.inf]]
            if len(perms) < n_choices - 1:
                continue
            pick = rng.choice(len(perms), size=n_choices - 1, replace=False)
            others = [perms[i] for i in pick]
            gold = int(rng.integers(n_choices))
            cands = others[:gold] + [seg] + others[gold:]
            out.append(_finish(lang, len(out), d[:t], cands, gold, "synth_order"))
            break
    return out


def task_summary(docs: list[dict]) -> dict:
    """Bayes-optimal accuracy: realised on these documents (argmax p == gold) and expected (mean max posterior)."""
    c = np.array([d["bayes_correct"] for d in docs], dtype=np.float64)
    m = np.array([max(d["posterior"]) for d in docs])
    n = len(docs)
    return {"docs": n, "choices": len(docs[0]["choices"]) if docs else 0,
            "bayes_acc": float(c.mean()), "bayes_acc_se": mean_se(c, degenerate=0.0),
            "bayes_expected": float(m.mean()), "bayes_expected_se": mean_se(m, degenerate=0.0),
            "chance": 1.0 / len(docs[0]["choices"]) if docs else 0.0}


TASK_DESCRIPTIONS = {
    "synth_word": "next word among 4 words of its class",
    "synth_order": "original order of the next 5 symbols among 4 orderings",
}


def task_config(task: str, data_file: Path) -> dict:
    """The lm-eval task config (multiple_choice, acc and acc_norm) reading `data_file` (JSONL, split `test`)."""
    return {
        "task": task, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }


def task_yaml(task: str, data_file: Path) -> str:
    """The task's YAML text (`prime_eval.tasks.task_yaml`, the project's one YAML emitter)."""
    from prime_eval.tasks import task_yaml as emit

    return emit(task_config(task, data_file), f"generated by prime_eval.demo: {TASK_DESCRIPTIONS.get(task, task)}")


def write_tasks(tasks: dict[str, list[dict]], data_dir: str | Path, yaml_dir: str | Path) -> dict[str, Path]:
    """`data_dir/<task>/test.jsonl` for each task and `yaml_dir/<task>.yaml`, written atomically; returns
    task -> JSONL path."""
    from prime_eval.io import atomic_write_text, write_jsonl

    data_dir, yaml_dir = Path(data_dir), Path(yaml_dir)
    out = {}
    for task, docs in tasks.items():
        f = write_jsonl(data_dir / task / "test.jsonl", docs)
        atomic_write_text(yaml_dir / f"{task}.yaml", task_yaml(task, f))
        out[task] = f
    return out
