"""Bound perplexity of ARM, MDM and MDM-Prime models on OpenWebText or any text (MDLM's protocol, method.md §2).

    source = openwebtext()                                     # HF `Skylion007/openwebtext`, train[-100000:]
    result = evaluate_perplexity(net, tokenizer, source, Protocol(L=1024, num_samples=1, eps=1e-3, seed=0))
    result["results"]["ppl"], result["results"]["ppl_ci95"]

One module per step of the data flow:

    sources.py    documents: a Hugging Face dataset, local .txt/.jsonl files (binary files refused), any strings
    blocks.py     documents -> tokens (+ bytes per token) -> blocks [BOS] ... [EOS] of L tokens (wrap or per document)
    protocol.py   `Protocol` (every choice that changes a number), allowed estimators, stop rules, input checks
    sampling.py   per-block generators, block-stratified times, bootstrap weights
    scoring.py    blocks -> K values each: cache lookup, rows, forward passes with the logits reduced chunk by chunk,
                  each slice of up to 16 samples stored the moment it is final
    stats.py      `PerplexityStats`: update / merge / compute of NLL, PPL, bits per byte and their standard errors
    run.py        `evaluate_perplexity`: the loop over steps (UI and cache come in as callbacks)
    result.py     the JSON and its atomic writing

Scores per block x (nats): ARM -Σ_{i=1}^{L-1} log p(x^i | x^{<i}) (exact, the BOS is context); MDM/Prime the NELBO of
all L positions (BOS and EOS included, as MDLM), the mean of K Monte Carlo samples. Per token of the original
tokenizer (never per sub-token): NLL = Σ_blocks score / Σ_blocks scored positions, PPL = exp(NLL).
"""
from __future__ import annotations

from prime_eval.intervals import Z95
from prime_eval.perplexity.blocks import Block, BlockStream, tokenize_documents
from prime_eval.perplexity.protocol import ALLOWED, Protocol, build_estimator
from prime_eval.perplexity.result import package_versions, write_json
from prime_eval.perplexity.run import Progress, evaluate_perplexity
from prime_eval.perplexity.sampling import block_generator, block_rows, block_uniforms
from prime_eval.perplexity.scoring import cache_identity
from prime_eval.perplexity.sources import (OWT_PATH, OWT_TRAIN_DOCS, OWT_VALID_DOCS, TextSource, as_source,
                                           hf_dataset, openwebtext, text_files)
from prime_eval.perplexity.stats import PerplexityStats, perplexity

__all__ = ["Protocol", "TextSource", "text_files", "hf_dataset", "openwebtext", "as_source", "BlockStream", "Block",
           "tokenize_documents", "PerplexityStats", "perplexity", "block_generator", "block_uniforms", "block_rows",
           "build_estimator", "evaluate_perplexity", "Progress", "cache_identity", "write_json", "package_versions",
           "ALLOWED", "OWT_PATH", "OWT_TRAIN_DOCS", "OWT_VALID_DOCS", "Z95"]
