"""A synthetic language with exact likelihoods: the demo's ground truth (`prime-eval demo`).

    language.py         the process (a random sparse automaton over prefix-free pseudo-words), its text form and
                        exact likelihoods by the forward algorithm (`Language`, `LanguageSpec`)
    corpora.py          documents from independent random streams, their exact NLLs and the true entropy
                        (`make_corpus`, `Corpus`, `entropy_stats`, `write_heldout`)
    multiple_choice.py  the lm-eval tasks with exact Bayes-optimal answers and their files (`make_word_task`,
                        `make_order_task`, `task_summary`, `task_yaml`, `write_tasks`)
    ground_truth.py     everything the demo needs in one call (`generate` -> `SyntheticData`)
"""
from __future__ import annotations

from prime_eval.synthetic.corpora import LN2, Corpus, entropy_stats, make_corpus, write_heldout  # noqa: F401
from prime_eval.synthetic.ground_truth import SyntheticData, generate  # noqa: F401
from prime_eval.synthetic.language import (END, QUICK_SPEC, Language, LanguageSpec, is_prefix_free,  # noqa: F401
                                           make_words)
from prime_eval.synthetic.multiple_choice import (TASK_DESCRIPTIONS, make_order_task, make_word_task,  # noqa: F401
                                                  task_config, task_summary, task_yaml, write_tasks)
