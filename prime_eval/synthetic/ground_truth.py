"""The demo's ground truth in one call: the language, a training corpus, held-out documents with exact NLLs, and the
multiple-choice tasks with their Bayes-optimal answers (`generate`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from prime_eval.synthetic.corpora import Corpus, make_corpus
from prime_eval.synthetic.language import Language, LanguageSpec
from prime_eval.synthetic.multiple_choice import make_order_task, make_word_task, task_summary


@dataclass
class SyntheticData:
    language: Language
    train: Corpus
    heldout: Corpus
    tasks: dict[str, list[dict]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"spec": self.language.spec.key() if self.language.spec else None,
                "n_words": self.language.n_symbols - 1, "n_states": self.language.n_states,
                "train_docs": len(self.train.docs), "train_bytes": int(self.train.n_bytes.sum()),
                "heldout": self.heldout.stats(),
                "tasks": {k: task_summary(v) for k, v in self.tasks.items()}}


def generate(spec: LanguageSpec, n_train: int, n_heldout: int, n_task_items: int) -> SyntheticData:
    """The language, a training corpus, a held-out corpus with exact NLLs, and the two multiple-choice tasks with
    `n_task_items` questions each (from a third independent stream of documents; one question per document)."""
    lang = Language.from_spec(spec)
    train = make_corpus(lang, n_train, spec.seed, stream=1)
    heldout = make_corpus(lang, n_heldout, spec.seed, stream=2, with_nll=True)
    task_docs = make_corpus(lang, 8 * n_task_items, spec.seed, stream=3).docs
    tasks = {"synth_word": make_word_task(lang, task_docs, spec.seed, limit=n_task_items),
             "synth_order": make_order_task(lang, task_docs, spec.seed, limit=n_task_items)}
    for name, items in tasks.items():
        if len(items) < n_task_items:
            raise RuntimeError(f"only {len(items)} of {n_task_items} {name} questions could be drawn; "
                               "the language is too sparse for this task")
    return SyntheticData(lang, train, heldout, tasks)
