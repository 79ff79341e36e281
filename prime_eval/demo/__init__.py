"""`prime-eval demo`: the whole product on a language whose entropy is known, on CPU, offline, in minutes.

Steps (each one reuses the harness's own code path):

1. **Ground truth** (`prime_eval.synthetic`): a random sparse automaton over a few hundred pseudo-words, from the
   seed: a training corpus, held-out documents with their exact NLL (forward algorithm), and two multiple-choice
   tasks with Bayes-optimal answers, written as `DATA/<task>/test.jsonl` plus lm-eval task YAMLs.
2. **Tokenizer** (`tokenizer.py`): a byte-level BPE trained on the training corpus with `tokenizers`, saved as a
   transformers tokenizer folder (BOS = EOS = `<|endoftext|>`).
3. **Reference models** (`training.py`, `losses.py`, `models.py`), lit_gpt architecture, trained on CPU by one loop:
   * ARM `GPT`, next-token cross-entropy on `[BOS] doc [EOS]`; saved as a flat safetensors state dict.
   * MDM `TransEncoder` (ℓ = 1), the masked-diffusion NELBO in its exact-count form; safetensors.
   * MDM-Prime-v2 `TransEncoder(ℓ = ⌈log2 V⌉, b = 2)`, binary encoding with index shuffling (a seeded permutation,
     `perm_<2^ℓ>.pt`), trained on a mixture of the valid marginal loss (what `mc` charges) and the published v2
     joint loss (what `legacy_joint` charges, fully visible tokens included); torch `{"model": state_dict}` (.pth).
   The MDM starts from the trained ARM (AR-to-diffusion adaptation, as DiffuLLaMA and Dream do at scale) and Prime
   from the trained MDM's blocks and head (its sub-token table is new). Everything is cached under
   `CACHE/demo/<key>/`, the key hashing the seed and every setting that changes a weight (`settings.py`).
4. **Scores** (`scoring.py`) through lm-eval with the `arm` / `mdm` / `prime` adapters (the `prime-eval score` code
   path), and **bound perplexity** (`bounds.py`) of the held-out documents with every estimator, compared with the
   exact NLL of the same documents in nats per document and bits per byte.
5. **Audit** (`trained_audit.py`): the exact audit's default cases, plus exact enumeration on the trained networks.
6. **Report** (`tables.py`, `plots.py`, `report.py`) into `--out`, with the demo's own tables and plots first.
`run.py` runs the six steps. The package never imports the command layer or the adapters: `prime-eval demo`
(`prime_eval.commands.demo`) registers the adapters before it calls `run_demo`.

Likelihood of a document, and the length term
---------------------------------------------
The ARM's `[BOS] doc [EOS]` score is the log-probability of a proper distribution over documents. A diffusion model
scores a block of *known* length L: its NELBO bounds −log q(x | L). To compare with the true entropy of documents
(whose token length varies), MDM and Prime rows add −log q̂(L), where q̂ is the add-one-smoothed distribution of block
lengths in the training corpus: q(x) = q̂(L)·q(x | L) is a proper distribution over token sequences, so the sum is an
upper bound on −log q(doc), and E[−log q(doc)] ≥ H(doc) (Gibbs). The term is shown in its own column; without it a
perfect diffusion model would appear to beat the entropy by H(L) nats. Text ↔ tokens is injective (the tokenizer is
lossless) and text ↔ words too (`prime_eval.synthetic`), so H(doc) is the same in all three representations.
"""
from __future__ import annotations

from prime_eval.demo.bounds import PPL_ESTIMATORS, bound_vs_entropy, paired_stats, verdict  # noqa: F401
from prime_eval.demo.models import ModelArtifacts, ensure_models, load_demo_network, save_network  # noqa: F401
from prime_eval.demo.run import run_demo  # noqa: F401
from prime_eval.demo.scoring import accuracy_rows, score_model  # noqa: F401
from prime_eval.demo.settings import (FAMILIES, LABELS, DemoSettings, ModelSpec, TrainSpec,  # noqa: F401
                                      default_cache_dir, default_settings)
from prime_eval.demo.tokenizer import encode_texts, length_model, train_tokenizer  # noqa: F401
from prime_eval.demo.training import build_network, train_network  # noqa: F401
