"""The synthetic language: a random sparse automaton over pseudo-words, with exact likelihoods.

The process
-----------
A random sparse probabilistic automaton over a few hundred pseudo-words, generated deterministically from a seed:

* Words are pronounceable CV-syllable strings over a-z, **prefix-free** (no word is a prefix of another; see below).
  They are grouped into `n_classes` word classes ("parts of speech").
* `n_states` hidden states. State k emits words of one class only, from a sparse (Dirichlet) distribution over
  `emit_support` of the class's words; "end" states also emit the sentence end "." with probability `end_prob`.
* After a word, the next state is drawn from the sparse transition matrix (each state has `n_successors`
  successors); after ".", it is drawn from the start distribution, whose states never emit "." (so every sentence has
  at least one word). Transitions that depend on the emitted symbol make this a probabilistic finite automaton;
  the forward algorithm is the HMM one with one extra branch.
* A document is the symbol stream up to and including its `sentences_per_doc`-th ".".

Symbols are ints: 0 is ".", 1..W are the words (`Language.words[s]`).

Text and likelihoods
--------------------
`render` writes words separated by one space, "." glued to the preceding word, e.g. ``"ka tovi. mesu lo."``.
It is injective on valid symbol sequences (words are non-empty strings over a-z, "." always follows a word), and
`parse` inverts it, so the probability of a document's text **equals** the probability of its symbol sequence:
NLL(text) = NLL(words), in nats, computed exactly by the forward algorithm (`Language.log_prob`, float64).
Bits per byte = NLL / (ln 2 · UTF-8 bytes of the text).

Two properties make model likelihoods comparable with these numbers:

* Documents are prefix-free as texts: a document has exactly `sentences_per_doc` periods and ends with the last one,
  so no document's text is a proper prefix of another's. Hence the events "a text stream starts with document d"
  are disjoint, and an autoregressive model's prefix probability q(tokens of d) (no end-of-text token needed) sums
  to at most 1 over documents: E[-log q] >= H(document) for any model (Gibbs' inequality).
* Words are prefix-free, so "the text continues with the string ' w1 w2'" is the same event as "the next words are
  w1, w2": the probability of a multiple-choice continuation as text (what lm-eval scores) is the exact conditional
  `Language.cond_log_prob(context, continuation)` computed here.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

END = 0  # symbol id of the sentence end "."


# ----------------------------------------------------------------------------------------------------------------
# Specification


@dataclass(frozen=True)
class LanguageSpec:
    """Everything that determines the language (with `seed`)."""

    seed: int = 0
    n_words: int = 96  # few enough that the demo's BPE (V = 512) makes almost every word one token
    n_classes: int = 6
    n_states: int = 20
    emit_support: int = 10  # words each state can emit
    emit_concentration: float = 0.6  # Dirichlet α of a state's word distribution (smaller = peakier)
    n_successors: int = 4  # sparse transitions
    n_start: int = 6  # states a sentence can start in
    end_fraction: float = 0.5  # fraction of non-start states that may end a sentence
    end_prob: float = 0.4  # P(".") in an end state
    sentences_per_doc: int = 2

    def key(self) -> dict:
        return asdict(self)


QUICK_SPEC = LanguageSpec(n_words=96, n_classes=6, n_states=16, emit_support=8, n_start=4, sentences_per_doc=2)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "nrsl"


def make_words(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct, prefix-free pseudo-words of 1-3 CV syllables with an optional coda consonant."""
    words: list[str] = []
    attempts = 0
    while len(words) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise RuntimeError(f"could not draw {n} prefix-free words; lower n_words")
        n_syl = int(rng.choice([1, 2, 2, 3, 3]))
        w = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                    for _ in range(n_syl))
        if rng.random() < 0.35:
            w += _CODAS[rng.integers(len(_CODAS))]
        if any(w.startswith(v) or v.startswith(w) for v in words):
            continue
        words.append(w)
    return words


def is_prefix_free(words: list[str]) -> bool:
    s = sorted(words)
    return all(not b.startswith(a) for a, b in zip(s, s[1:]))


# ----------------------------------------------------------------------------------------------------------------
# The language


class Language:
    """The automaton: `start` (K,), `trans` (K, K), `emit` (K, W+1) with column 0 = "."; all float64 numpy.

    The process: z_1 ~ start; at step t emit s_t ~ emit[z_t]; z_{t+1} ~ trans[z_t] if s_t is a word,
    else z_{t+1} ~ start. A document stops after `sentences_per_doc` periods.
    """

    def __init__(self, words: list[str], word_class: np.ndarray, start: np.ndarray, trans: np.ndarray,
                 emit: np.ndarray, sentences_per_doc: int, spec: LanguageSpec | None = None):
        self.words = [".", *words]  # symbol s -> string; 0 is "."
        self.word_class = np.asarray(word_class)  # (W+1,), -1 for "."
        self.start = np.asarray(start, dtype=np.float64)
        self.trans = np.asarray(trans, dtype=np.float64)
        self.emit = np.asarray(emit, dtype=np.float64)
        self.sentences_per_doc = int(sentences_per_doc)
        self.spec = spec
        self.index = {w: i for i, w in enumerate(self.words)}
        K, S = self.emit.shape
        if self.start.shape != (K,) or self.trans.shape != (K, K) or S != len(self.words):
            raise ValueError("inconsistent shapes")
        for name, m in (("start", self.start[None]), ("trans", self.trans), ("emit", self.emit)):
            if not np.allclose(m.sum(-1), 1.0) or (m < 0).any():
                raise ValueError(f"{name} rows must be probability distributions")
        if (self.emit[self.start > 0, END] > 0).any():
            raise ValueError("start states must not emit '.' (every sentence needs a word)")
        if not is_prefix_free(words) or any(not w or not w.isalpha() or not w.islower() for w in words):
            raise ValueError("words must be distinct, non-empty, lowercase a-z and prefix-free")

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: LanguageSpec) -> "Language":
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0x5EED1A]))
        W, C, K = spec.n_words, spec.n_classes, spec.n_states
        if W < 4 * C:
            raise ValueError("need at least 4 words per class (the word task draws 3 same-class distractors)")
        words = make_words(W, rng)
        word_class = np.concatenate([[-1], np.arange(W) % C])  # symbol -> class (word 1 + i has class i mod C)
        class_words = [np.nonzero(word_class == c)[0] for c in range(C)]
        state_class = rng.permutation(np.arange(K) % C)
        emit = np.zeros((K, W + 1))
        for k in range(K):
            members = class_words[state_class[k]]
            support = rng.choice(members, size=min(spec.emit_support, len(members)), replace=False)
            emit[k, support] = rng.dirichlet(np.full(len(support), spec.emit_concentration))
        starts = rng.choice(K, size=spec.n_start, replace=False)
        start = np.zeros(K)
        start[starts] = rng.dirichlet(np.ones(spec.n_start))
        others = np.setdiff1d(np.arange(K), starts)
        n_end = max(1, int(round(spec.end_fraction * len(others))))
        ends = rng.choice(others, size=n_end, replace=False)
        emit[ends] *= 1.0 - spec.end_prob
        emit[ends, END] = spec.end_prob
        trans = np.zeros((K, K))
        for k in range(K):
            succ = rng.choice(K, size=spec.n_successors, replace=False)
            trans[k, succ] = rng.dirichlet(np.ones(spec.n_successors))
        # every state must reach an end state, or sentences could go on forever
        ends_set = set(ends.tolist())
        for k in range(K):
            if not _reaches(trans, k, ends_set):
                trans[k] *= 0.5
                trans[k, int(rng.choice(ends))] += 0.5
        return cls(words, word_class, start, trans, emit, spec.sentences_per_doc, spec)

    @property
    def n_symbols(self) -> int:
        return len(self.words)

    @property
    def n_states(self) -> int:
        return self.start.shape[0]

    def class_members(self, c: int) -> np.ndarray:
        return np.nonzero(self.word_class == c)[0]

    # -- text --------------------------------------------------------------------------------------------------
    def render(self, symbols) -> str:
        """Symbols -> text: words separated by one space, "." glued to the word before it."""
        pieces: list[str] = []
        prev_end = True
        for s in symbols:
            s = int(s)
            if s == END:
                if prev_end:
                    raise ValueError("'.' must follow a word")
                pieces[-1] += "."
                prev_end = True
            else:
                pieces.append(self.words[s])
                prev_end = False
        return " ".join(pieces)

    def parse(self, text: str) -> list[int]:
        """Inverse of `render` (raises ValueError on text it cannot have produced)."""
        out: list[int] = []
        if not text:
            return out
        for piece in text.split(" "):
            dot = piece.endswith(".")
            w = piece[:-1] if dot else piece
            if w not in self.index or w == ".":
                raise ValueError(f"unknown word {w!r}")
            out.append(self.index[w])
            if dot:
                out.append(END)
        return out

    # -- sampling ----------------------------------------------------------------------------------------------
    def sample_documents(self, n: int, rng: np.random.Generator, max_symbols: int = 4000) -> list[list[int]]:
        """n documents, sampled in parallel (vectorised inverse-CDF draws, deterministic given rng)."""
        cum_emit = np.cumsum(self.emit, axis=1)
        cum_trans = np.cumsum(self.trans, axis=1)
        cum_start = np.cumsum(self.start)
        K = self.n_states
        state = np.minimum(np.searchsorted(cum_start, rng.random(n), side="right"), K - 1)
        periods = np.zeros(n, dtype=np.int64)
        active = np.ones(n, dtype=bool)
        cols: list[np.ndarray] = []
        for _ in range(max_symbols):
            idx = np.nonzero(active)[0]
            if idx.size == 0:
                break
            col = np.full(n, -1, dtype=np.int64)
            u = rng.random(idx.size)
            sym = np.minimum((u[:, None] >= cum_emit[state[idx]]).sum(1), self.n_symbols - 1)
            col[idx] = sym
            cols.append(col)
            v = rng.random(idx.size)
            nxt_word = np.minimum((v[:, None] >= cum_trans[state[idx]]).sum(1), K - 1)
            nxt_start = np.minimum(np.searchsorted(cum_start, v, side="right"), K - 1)
            is_end = sym == END
            state[idx] = np.where(is_end, nxt_start, nxt_word)
            periods[idx] += is_end
            active[idx] = periods[idx] < self.sentences_per_doc
        else:
            raise RuntimeError("documents did not end; the language is degenerate")
        mat = np.stack(cols, axis=1)
        return [row[row >= 0].tolist() for row in mat]

    # -- exact likelihoods -------------------------------------------------------------------------------------
    def forward(self, symbols, alpha: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Scaled forward pass. Returns (distribution of the next hidden state given the symbols, log P(symbols)),
        starting from `alpha` (a state distribution; default the start distribution)."""
        a = self.start if alpha is None else np.asarray(alpha, dtype=np.float64)
        logp = 0.0
        for s in symbols:
            b = a * self.emit[:, int(s)]
            p = b.sum()
            if p <= 0.0:
                return a, -math.inf
            logp += math.log(p)
            a = self.start if int(s) == END else (b / p) @ self.trans
        return a, logp

    def batch_log_prob(self, conts: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
        """(P,) log P of each row of `conts` (P, n), all starting from state distribution `alpha` (vectorised
        `forward`)."""
        conts = np.asarray(conts, dtype=np.int64)
        P = conts.shape[0]
        a = np.tile(self.start if alpha is None else np.asarray(alpha, dtype=np.float64), (P, 1))
        logp = np.zeros(P)
        for j in range(conts.shape[1]):
            s = conts[:, j]
            b = a * self.emit[:, s].T  # (P, K)
            p = b.sum(1)
            with np.errstate(divide="ignore"):
                logp += np.log(p)
            nb = np.divide(b, p[:, None], out=np.zeros_like(b), where=p[:, None] > 0)
            a = np.where((s == END)[:, None], self.start[None, :], nb @ self.trans)
        return logp

    def log_prob(self, symbols) -> float:
        """Exact log P(the process starts with `symbols`) in nats (for a whole document: its probability)."""
        return self.forward(symbols)[1]

    def cond_log_prob(self, context, continuation) -> float:
        """Exact log p(continuation | context): the next symbols after the context."""
        a, lp = self.forward(context)
        if lp == -math.inf:
            raise ValueError("the context has probability 0")
        return self.forward(continuation, a)[1]

    def next_symbol_probs(self, context) -> np.ndarray:
        """(W+1,) exact distribution of the next symbol after `context`."""
        a, _ = self.forward(context)
        return a @ self.emit

    def brute_force_log_prob(self, symbols) -> float:
        """log P(symbols) by summing over every hidden-state path (K^n terms; for tests on short sequences)."""
        symbols = [int(s) for s in symbols]
        n, K = len(symbols), self.n_states
        total = 0.0
        for path in itertools.product(range(K), repeat=n):
            p = self.start[path[0]]
            for t, (z, s) in enumerate(zip(path, symbols)):
                p *= self.emit[z, s]
                if p == 0.0:
                    break
                if t + 1 < n:
                    p *= self.start[path[t + 1]] if s == END else self.trans[z, path[t + 1]]
            total += p
        return math.log(total) if total > 0 else -math.inf

    # -- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"words": self.words[1:], "word_class": self.word_class.tolist(), "start": self.start.tolist(),
                "trans": self.trans.tolist(), "emit": self.emit.tolist(),
                "sentences_per_doc": self.sentences_per_doc, "spec": self.spec.key() if self.spec else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Language":
        spec = LanguageSpec(**d["spec"]) if d.get("spec") else None
        return cls(d["words"], np.array(d["word_class"]), np.array(d["start"]), np.array(d["trans"]),
                   np.array(d["emit"]), d["sentences_per_doc"], spec)


def _reaches(trans: np.ndarray, k: int, targets: set) -> bool:
    seen, todo = {k}, [k]
    while todo:
        z = todo.pop()
        if z in targets:
            return True
        for nxt in np.nonzero(trans[z] > 0)[0].tolist():
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False
