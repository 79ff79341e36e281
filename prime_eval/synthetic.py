"""A synthetic language with exact likelihoods: the demo's ground truth (`prime-eval demo`).

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

Multiple-choice tasks (lm-eval format: `context`, `choices`, `gold`)
-------------------------------------------------------------------
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
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

END = 0  # symbol id of the sentence end "."
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------------
# Specification


@dataclass(frozen=True)
class LanguageSpec:
    """Everything that determines the language (with `seed`)."""

    seed: int = 0
    n_words: int = 240
    n_classes: int = 10
    n_states: int = 40
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


# ----------------------------------------------------------------------------------------------------------------
# Corpora and the true entropy


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
           "nats_per_doc_se": float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")}
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


# ----------------------------------------------------------------------------------------------------------------
# Multiple-choice tasks


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
            "bayes_acc": float(c.mean()), "bayes_acc_se": float(c.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "bayes_expected": float(m.mean()), "bayes_expected_se": float(m.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "chance": 1.0 / len(docs[0]["choices"]) if docs else 0.0}


# ----------------------------------------------------------------------------------------------------------------
# One call: everything the demo needs


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


def write_tasks(data: SyntheticData, data_dir: str | Path, yaml_dir: str | Path) -> dict[str, Path]:
    """`data_dir/<task>/test.jsonl` for each task and `yaml_dir/<task>.yaml`; returns task -> JSONL path."""
    from prime_eval.io import atomic_write_text

    data_dir, yaml_dir = Path(data_dir), Path(yaml_dir)
    yaml_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for task, docs in data.tasks.items():
        f = data_dir / task / "test.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        atomic_write_text(yaml_dir / f"{task}.yaml", task_yaml(task, f))
        out[task] = f
    return out


def write_heldout(data: SyntheticData, path: str | Path) -> Path:
    """JSONL of the held-out documents: {"id", "text", "nll" (exact, nats), "bytes", "symbols"}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h = data.heldout
    lines = [json.dumps({"id": i, "text": t, "nll": float(nl), "bytes": len(t.encode("utf-8")), "symbols": len(d)})
             for i, (t, nl, d) in enumerate(zip(h.texts, h.nll, h.docs))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
