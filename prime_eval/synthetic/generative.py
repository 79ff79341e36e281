"""The generative task `synth_complete` (lm-eval `generate_until`): complete the sentence, with its exact
Bayes-optimal answer and the exact log-likelihood of any generated text under the language.

The task
--------
Context: a prefix of a held-out document that ends with a word, inside a sentence. Answer: the rest of that
sentence, i.e. the words up to its "." (possibly none). Written as text, the model's raw generation must start with
the answer's words, each preceded by one space, followed by "."; anything after the first "." is ignored
(`parse_answer`). Generated text that does not have this form, that uses a word the language does not have, that
never reaches a "." within the answer budget, or that has probability 0 after the context is **invalid**: its true
log-likelihood is −inf, and it is counted, never dropped.

Contexts are chosen without looking at the continuation: per document one cut position t is drawn uniformly from
[min_context, max_context], independently of the document, and kept iff the prefix d[:t] ends with a word and has
not finished the document (both functions of the prefix alone; a rejected document is not retried). So given the
context, the realised rest of the sentence is a draw from the language's exact conditional p(· | context).

Exact quantities (nats, float64)
--------------------------------
* `answer_log_prob(lang, alpha, words)`: log p(words, "." | context) by the forward algorithm from the hidden-state
  distribution `alpha` after the context (`Language.forward`).
* `map_answer(lang, alpha)`: the **Bayes-optimal answer** under exact match, argmax_a p(a, "." | context), found by
  best-first search over answer prefixes: a prefix's probability bounds that of every answer extending it, so the
  first complete answer popped from a max-heap ordered by probability is the maximum (ties: the smaller symbol
  tuple). Its probability is the Bayes-optimal exact-match rate of that context, so the mean over contexts of
  exp(map_logp) is the expected exact match of the best possible answerer (`bayes_expected`).
* The realised answers' mean −log p is an unbiased estimate of the conditional entropy H(answer | context): the
  reference of a temperature-1 sample's mean true NLL (a generative perplexity computed exactly; a mode-seeking model
  can fall below it, a poor one lies above it).
"""
from __future__ import annotations

import heapq
import math
import re
from pathlib import Path

import numpy as np

from prime_eval.intervals import mean_se
from prime_eval.synthetic.language import END, Language

TASK = "synth_complete"
TASK_SAMPLED = "synth_complete_t1"
INVALID = "[invalid]"
# The answer as lm-eval's regex filter extracts it (the same rule as `parse_answer`, minus the vocabulary check):
# the raw generation must start with (" " word)* "."; group 1 is the words, stripped by the filter.
ANSWER_REGEX = r"^((?: [a-z]+)*)\."
_ANSWER = re.compile(ANSWER_REGEX)


def parse_answer(lang: Language, raw: str) -> list[int] | None:
    """Symbols of the answer's words in a raw generation (text after the context), or None when it is invalid (not
    of the form (" " word)* "." up to its first ".", or a word the language does not have)."""
    m = _ANSWER.match(raw or "")
    if m is None:
        return None
    words = m.group(1).split(" ")[1:]
    if any(w not in lang.index for w in words):
        return None
    return [lang.index[w] for w in words]


def answer_log_prob(lang: Language, alpha: np.ndarray, words) -> float:
    """log p(words, "." | context) (nats; −inf when impossible), from `alpha`, the distribution of the hidden state
    emitting the next symbol (`Language.forward(context)[0]`)."""
    return lang.forward([*map(int, words), END], alpha)[1]


def generated_log_prob(lang: Language, context: str, raw: str) -> float:
    """The exact log-likelihood of a raw generation after `context` (both text): −inf when invalid."""
    words = parse_answer(lang, raw)
    if words is None:
        return -math.inf
    alpha, lp = lang.forward(lang.parse(context))
    if lp == -math.inf:
        raise ValueError("the context has probability 0")
    return answer_log_prob(lang, alpha, words)


def map_answer(lang: Language, alpha: np.ndarray, max_expansions: int = 200_000) -> tuple[tuple[int, ...], float]:
    """(argmax_a p(a, "." | context), its log-probability) by exact best-first search (module docstring)."""
    heap: list = [(-0.0, (), False, np.asarray(alpha, dtype=np.float64))]
    expansions = 0
    while heap:
        neg, words, done, a = heapq.heappop(heap)
        if done:
            return words, -neg
        expansions += 1
        if expansions > max_expansions:
            raise RuntimeError(f"MAP search exceeded {max_expansions} expansions")
        lp = -neg
        q = a @ lang.emit  # (S,) next-symbol probabilities
        if q[END] > 0:
            heapq.heappush(heap, (-(lp + math.log(q[END])), words, True, a))
        for w in np.nonzero(q[1:] > 0)[0] + 1:
            b = a * lang.emit[:, w] / q[w]
            heapq.heappush(heap, (-(lp + math.log(q[w])), (*words, int(w)), False, b @ lang.trans))
    raise RuntimeError("no complete answer has positive probability")


def make_completion_task(lang: Language, docs: list[list[int]], seed: int, limit: int, min_context: int = 2,
                         max_context: int = 10) -> list[dict]:
    """Up to `limit` items {"id", "context", "answer" (the realised rest of the sentence), "answer_logp",
    "bayes" (the MAP answer), "bayes_logp", "bayes_correct"} from `docs`, one cut per document (module docstring)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A5C, 3]))
    out: list[dict] = []
    for d in docs:
        if len(out) >= limit:
            break
        t = int(rng.integers(min_context, max_context + 1))
        ctx = d[:t]
        if len(ctx) < t or ctx[-1] == END or ctx.count(END) >= lang.sentences_per_doc:
            continue
        end = d.index(END, t)
        words = d[t:end]
        alpha, _ = lang.forward(ctx)
        bayes, bayes_lp = map_answer(lang, alpha)
        answer = " ".join(lang.words[w] for w in words)
        out.append({"id": len(out), "context": lang.render(ctx), "answer": answer,
                    "answer_logp": answer_log_prob(lang, alpha, words), "answer_words": len(words),
                    "bayes": " ".join(lang.words[w] for w in bayes), "bayes_logp": float(bayes_lp),
                    "bayes_correct": bool(tuple(words) == bayes)})
    return out


def completion_summary(items: list[dict]) -> dict:
    """The truth's numbers: the Bayes answer's exact match with the realised answers (realised and expected,
    mean exp(bayes_logp)), and the realised answers' mean NLL (an unbiased estimate of H(answer | context))."""
    n = len(items)
    c = np.array([it["bayes_correct"] for it in items], dtype=np.float64)
    e = np.exp(np.array([it["bayes_logp"] for it in items]))
    nll = -np.array([it["answer_logp"] for it in items])
    words = np.array([it["answer_words"] for it in items], dtype=np.float64)
    se = lambda x: mean_se(x, degenerate=float("nan"))  # noqa: E731
    return {"docs": n, "bayes_em": float(c.mean()), "bayes_expected": float(e.mean()), "bayes_expected_se": se(e),
            "answer_nll": float(nll.mean()), "answer_nll_se": se(nll), "answer_words": float(words.mean()),
            "bayes_nll": float(-np.mean([it["bayes_logp"] for it in items]))}


def completion_task_config(task: str, data_file: Path, max_gen_toks: int, temperature: float = 0.0,
                           repeats: int = 1) -> dict:
    """The lm-eval `generate_until` config: the context as the prompt, no stop string but EOS (the answer is read up
    to its first "." by the regex filter, so a generation that never reaches one is `[invalid]`, not cut short into
    a valid-looking answer), exact_match against the realised answer."""
    kwargs = {"until": ["\n"], "max_gen_toks": int(max_gen_toks), "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = float(temperature)
    return {
        "task": task, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "context", "doc_to_target": "answer", "target_delimiter": "",
        "generation_kwargs": kwargs, "repeats": int(repeats),
        "filter_list": [{"name": "answer", "filter": [
            {"function": "regex", "regex_pattern": ANSWER_REGEX, "group_select": 0, "fallback": INVALID},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_completion_tasks(items: list[dict], data_dir: str | Path, yaml_dir: str | Path, max_gen_toks: int,
                           repeats: int = 1) -> Path:
    """`data_dir/synth_complete/test.jsonl`, and `yaml_dir/synth_complete.yaml` (greedy) and
    `synth_complete_t1.yaml` (temperature 1, `repeats` answers per context) over it; returns the JSONL path."""
    from prime_eval.io import atomic_write_text, write_jsonl
    from prime_eval.tasks import task_yaml

    f = write_jsonl(Path(data_dir) / TASK / "test.jsonl", items)
    for task, temp, rep, what in ((TASK, 0.0, 1, "greedy"), (TASK_SAMPLED, 1.0, repeats, "temperature 1")):
        atomic_write_text(Path(yaml_dir) / f"{task}.yaml",
                          task_yaml(completion_task_config(task, f, max_gen_toks, temp, rep),
                                    f"generated by prime_eval.demo: complete the sentence ({what})"))
    return f
