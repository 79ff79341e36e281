"""Corpora of the synthetic language and the true entropy: documents, their texts and exact NLLs (nats).

    make_corpus(lang, n, seed, stream)   n documents from an independent random stream (train / held-out / tasks)
    entropy_stats(nll, bytes)            mean NLL per document with its SE; bits per byte by the ratio estimate
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prime_eval.intervals import mean_se
from prime_eval.io import write_jsonl
from prime_eval.synthetic.language import Language

LN2 = math.log(2.0)


def entropy_stats(nll: np.ndarray, n_bytes: np.ndarray, n_symbols: np.ndarray | None = None) -> dict:
    """Mean NLL per document with its standard error, and the ratio estimates per byte (bits) and per symbol.

    nats_per_doc = mean(nll), SE = sd(nll, ddof=1)/√n.
    bits_per_byte = Σ nll / (ln 2 · Σ bytes); SE by the delta method for a ratio of means:
    SE = √(Σ (nll_i − r·bytes_i)² / (n(n−1))) / mean(bytes), with r = Σ nll / Σ bytes (then / ln 2).
    """
    nll = np.asarray(nll, dtype=np.float64)
    b = np.asarray(n_bytes, dtype=np.float64)
    n = nll.size
    out = {"docs": int(n), "nats_per_doc": float(nll.mean()),
           "nats_per_doc_se": mean_se(nll, degenerate=float("nan"))}
    r = nll.sum() / b.sum()
    se_r = math.sqrt(((nll - r * b) ** 2).sum() / (n * (n - 1))) / b.mean() if n > 1 else float("nan")
    out["bits_per_byte"] = float(r / LN2)
    out["bits_per_byte_se"] = float(se_r / LN2)
    out["bytes"] = int(b.sum())
    if n_symbols is not None:
        s = np.asarray(n_symbols, dtype=np.float64)
        out["nats_per_symbol"] = float(nll.sum() / s.sum())
        out["symbols"] = int(s.sum())
    return out


@dataclass
class Corpus:
    """Documents (symbol lists) with their texts and, for held-out sets, exact NLLs (nats)."""

    docs: list[list[int]]
    texts: list[str]
    nll: np.ndarray | None = None

    @property
    def n_bytes(self) -> np.ndarray:
        return np.array([len(t.encode("utf-8")) for t in self.texts])

    def stats(self) -> dict:
        if self.nll is None:
            raise ValueError("no exact NLLs for this corpus")
        return entropy_stats(self.nll, self.n_bytes, np.array([len(d) for d in self.docs]))


def make_corpus(lang: Language, n_docs: int, seed: int, stream: int, with_nll: bool = False) -> Corpus:
    """n_docs documents from an independent random stream (`stream` separates train / held-out / tasks)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0DE, stream]))
    docs = lang.sample_documents(n_docs, rng)
    texts = [lang.render(d) for d in docs]
    nll = np.array([-lang.log_prob(d) for d in docs]) if with_nll else None
    return Corpus(docs, texts, nll)


def write_heldout(corpus: Corpus, path: str | Path) -> Path:
    """JSONL of held-out documents: {"id", "text", "nll" (exact, nats), "bytes", "symbols"}, written atomically."""
    rows = [{"id": i, "text": t, "nll": float(nl), "bytes": len(t.encode("utf-8")), "symbols": len(d)}
            for i, (t, nl, d) in enumerate(zip(corpus.texts, corpus.nll, corpus.docs))]
    return write_jsonl(path, rows)
