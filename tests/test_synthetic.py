"""The demo's ground truth: exact likelihoods against brute force, sampling, rendering, tasks, determinism."""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from prime_eval.synthetic import (END, QUICK_SPEC, Language, LanguageSpec, entropy_stats, generate, is_prefix_free,
                                  make_corpus, make_order_task, make_word_task, task_summary, task_yaml, write_heldout,
                                  write_tasks)

TINY = LanguageSpec(seed=3, n_words=8, n_classes=2, n_states=4, emit_support=4, n_successors=2, n_start=2,
                    end_fraction=0.5, end_prob=0.4, sentences_per_doc=1)


@pytest.fixture(scope="module")
def tiny() -> Language:
    return Language.from_spec(TINY)


@pytest.fixture(scope="module")
def quick_data():
    return generate(QUICK_SPEC, 400, 40, 40)


def test_language_is_well_formed(tiny):
    lang = Language.from_spec(LanguageSpec())
    for L in (tiny, lang):
        assert is_prefix_free(L.words[1:])
        assert np.allclose(L.emit.sum(1), 1) and np.allclose(L.trans.sum(1), 1) and math.isclose(L.start.sum(), 1)
        assert (L.emit[L.start > 0, END] == 0).all()  # sentences start with a word
        assert (L.emit[:, END] > 0).any()
    assert lang.n_symbols == 97 and lang.n_states == 20


def test_forward_matches_brute_force_on_short_sequences(tiny):
    """log P(symbols) by the forward algorithm = the sum over all K^n hidden paths, for every sequence of length
    <= 3 and for sampled document prefixes up to 6 symbols (zero-probability sequences included)."""
    S = tiny.n_symbols
    checked = zero = 0
    for n in (1, 2, 3):
        for seq in itertools.product(range(S), repeat=n):
            fw, bf = tiny.log_prob(seq), tiny.brute_force_log_prob(seq)
            if bf == -math.inf:
                assert fw == -math.inf
                zero += 1
            else:
                assert fw == pytest.approx(bf, rel=1e-12, abs=1e-12)
            checked += 1
    docs = tiny.sample_documents(40, np.random.default_rng(0))
    for d in docs:
        for k in range(1, min(len(d), 6) + 1):
            assert tiny.log_prob(d[:k]) == pytest.approx(tiny.brute_force_log_prob(d[:k]), rel=1e-12)
    assert checked == S + S**2 + S**3 and zero > 0


def test_prefix_probabilities_sum_to_one(tiny):
    """The process is a distribution over streams: Σ over all length-n sequences of P(prefix) = 1."""
    S = tiny.n_symbols
    for n in (1, 2, 3, 4):
        total = sum(math.exp(tiny.log_prob(s)) for s in itertools.product(range(S), repeat=n))
        assert total == pytest.approx(1.0, abs=1e-12)


def test_document_probabilities_sum_to_one(tiny):
    """Documents (one sentence here) are prefix-free events: Σ_docs P(doc) over all documents of up to n symbols
    plus P(no '.' among the first n symbols) = 1."""
    S, n_max = tiny.n_symbols, 5
    words = range(1, S)
    total = 0.0
    for n in range(1, n_max + 1):
        for body in itertools.product(words, repeat=n - 1):
            total += math.exp(tiny.log_prob((*body, END)))
    no_end = sum(math.exp(tiny.log_prob(s)) for s in itertools.product(words, repeat=n_max))
    assert total + no_end == pytest.approx(1.0, abs=1e-12)


def test_sampler_matches_exact_probabilities(tiny):
    rng = np.random.default_rng(1)
    n = 20000
    docs = tiny.sample_documents(n, rng)
    assert all(d[-1] == END and d.count(END) == tiny.sentences_per_doc for d in docs)
    counts = Counter(tuple(d) for d in docs)
    for doc, c in counts.most_common(8):
        p = math.exp(tiny.log_prob(doc))
        assert abs(c / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), (doc, c / n, p)


def test_conditionals_and_batch(tiny):
    docs = tiny.sample_documents(30, np.random.default_rng(2))
    for d in docs:
        if len(d) < 3:
            continue
        ctx, cont = d[:2], d[2:]
        assert tiny.cond_log_prob(ctx, cont) == pytest.approx(tiny.log_prob(d) - tiny.log_prob(ctx), abs=1e-10)
        nxt = tiny.next_symbol_probs(ctx)
        assert nxt.sum() == pytest.approx(1.0) and math.log(nxt[cont[0]]) == pytest.approx(
            tiny.cond_log_prob(ctx, cont[:1]), abs=1e-12)
    a, _ = tiny.forward([1])
    rows = np.array(list(itertools.product(range(tiny.n_symbols), repeat=3)))
    batch = tiny.batch_log_prob(rows, a)
    single = np.array([tiny.forward(r, a)[1] for r in rows])
    finite = np.isfinite(single)
    assert (np.isfinite(batch) == finite).all()
    assert np.allclose(batch[finite], single[finite], rtol=1e-12, atol=1e-12)


def test_rendering_is_injective_and_parse_inverts_it(tiny):
    """Every sentence of up to 4 words renders to a distinct text, parse inverts render, and text NLL = word NLL."""
    texts = {}
    for n in range(1, 5):
        for body in itertools.product(range(1, tiny.n_symbols), repeat=n):
            seq = (*body, END)
            text = tiny.render(seq)
            assert text not in texts, (seq, texts.get(text))
            texts[text] = seq
            assert tiny.parse(text) == list(seq)
    with pytest.raises(ValueError):
        tiny.render([END])
    with pytest.raises(ValueError):
        tiny.parse("notaword.")
    docs = tiny.sample_documents(20, np.random.default_rng(3))
    for d in docs:
        t = tiny.render(d)
        assert tiny.log_prob(tiny.parse(t)) == tiny.log_prob(d)
        if len(d) > 2 and d[1] != END:
            assert tiny.render(d[:1]) + " " + tiny.render(d[1:]) == t  # context / continuation split


def test_generation_is_deterministic(quick_data):
    again = generate(QUICK_SPEC, 400, 40, 40)
    assert again.train.texts == quick_data.train.texts
    assert np.array_equal(again.heldout.nll, quick_data.heldout.nll)
    assert json.dumps(again.tasks) == json.dumps(quick_data.tasks)
    other = generate(LanguageSpec(**{**QUICK_SPEC.key(), "seed": 1}), 400, 40, 40)
    assert other.train.texts != quick_data.train.texts
    assert other.language.words != quick_data.language.words


def test_heldout_nll_and_entropy(quick_data):
    lang, h = quick_data.language, quick_data.heldout
    for d, t, nll in zip(h.docs, h.texts, h.nll):
        assert nll == pytest.approx(-lang.log_prob(lang.parse(t)))
    s = h.stats()
    assert s["nats_per_doc"] == pytest.approx(h.nll.mean())
    assert s["bits_per_byte"] == pytest.approx(h.nll.sum() / math.log(2) / h.n_bytes.sum())
    assert 0 < s["nats_per_doc_se"] < s["nats_per_doc"]
    # the ratio SE formula on a case computed by hand
    e = entropy_stats(np.array([1.0, 3.0]), np.array([1, 1]))
    assert e["nats_per_doc"] == 2.0 and e["nats_per_doc_se"] == pytest.approx(1.0)
    assert e["bits_per_byte"] == pytest.approx(2 / math.log(2))
    assert e["bits_per_byte_se"] == pytest.approx(1.0 / math.log(2))


def test_tasks_have_exact_bayes_answers(quick_data):
    lang = quick_data.language
    for task, items in quick_data.tasks.items():
        assert len(items) == 40
        for it in items:
            ctx = lang.parse(it["context"])
            cands = [lang.parse(c) for c in it["choices"]]
            assert len(set(it["choices"])) == 4
            assert lang.render(ctx + cands[it["gold"]]) == it["context"] + " " + it["choices"][it["gold"]]
            lp = [lang.cond_log_prob(ctx, c) for c in cands]
            assert np.allclose(lp, it["true_logp"], atol=1e-9) and all(np.isfinite(lp))
            assert it["bayes"] == int(np.argmax(lp))
            post = np.exp(np.array(lp) - max(lp))
            assert np.allclose(post / post.sum(), it["posterior"])
            assert it["bayes_correct"] == (it["bayes"] == it["gold"])
            if task == "synth_word":  # same class, one word each
                assert all(len(c) == 1 for c in cands)
                assert len({int(lang.word_class[c[0]]) for c in cands}) == 1
            else:  # orderings of one multiset of symbols
                assert len({tuple(sorted(c)) for c in cands}) == 1
        s = task_summary(items)
        assert s["chance"] < s["bayes_acc"] <= 1 and 0.25 < s["bayes_expected"] < 1


def test_distractor_pools_are_symmetric():
    """The pool of distractors depends only on what the candidates share, so swapping which candidate is 'true'
    leaves the candidate set possible: every candidate of a question has positive probability after the context."""
    lang = Language.from_spec(LanguageSpec(**{**TINY.key(), "sentences_per_doc": 3}))
    docs = lang.sample_documents(300, np.random.default_rng(4))
    items = make_word_task(lang, docs, seed=0, n_choices=3) + make_order_task(lang, docs, seed=0, n_choices=3,
                                                                              order_len=3)
    assert items
    for it in items:
        assert all(np.isfinite(it["true_logp"]))


def test_task_files_and_yaml(tmp_path, quick_data):
    files = write_tasks(quick_data.tasks, tmp_path / "data", tmp_path / "yaml")
    for task, f in files.items():
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert len(rows) == 40 and rows[0]["id"] == 0 and {"context", "choices", "gold"} <= set(rows[0])
        y = (tmp_path / "yaml" / f"{task}.yaml").read_text()
        assert f"task: {task}" in y and "output_type: multiple_choice" in y and str(f.resolve()) in y
    assert "doc_to_choice: choices" in task_yaml("synth_word", tmp_path / "x.jsonl")
    p = write_heldout(quick_data.heldout, tmp_path / "heldout.jsonl")
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    assert [r["text"] for r in rows] == quick_data.heldout.texts
    assert np.allclose([r["nll"] for r in rows], quick_data.heldout.nll)


def test_corpus_streams_are_independent(tiny):
    a = make_corpus(tiny, 50, seed=0, stream=1)
    b = make_corpus(tiny, 50, seed=0, stream=2)
    assert a.texts != b.texts
    assert make_corpus(tiny, 50, seed=0, stream=1).texts == a.texts
