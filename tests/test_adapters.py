"""lm-eval adapters `arm`, `mdm`, `prime`: parity with lm-eval's own `hf` model on real task data, every family end
to end through `lm_eval.simple_evaluate`, determinism (rows per pass, request order), truncation, errors, model info.
"""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from lm_eval.api.instance import Instance

from model_adapters import ARMLM, MDMLM, PrimeLM
from model_adapters.base import request_seed
from prime_eval.errors import UserError
from prime_eval.networks.toy import TinyDenoiser
from prime_eval.settings import DEFAULT_ESTIMATOR

PARITY_TASKS = ["piqa", "arc_easy", "hellaswag", "winogrande"]
SCHEMA = {"task", "doc_id", "choice", "request_index", "loglikelihood", "mc_stderr", "num_samples",
          "num_forward_rows", "is_greedy", "truncated_tokens", "continuation_tokens", "estimator", "is_bound", "seed"}


@pytest.fixture(scope="module")
def gpt2_tok(shared_data):
    from prime_eval.checkpoints import load_tokenizer

    return load_tokenizer(shared_data / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(gpt2_tok, tmp_path_factory):
    """A 2-layer random GPT-2 (save_pretrained) with the real GPT-2 tokenizer; larger init -> peaked distributions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=512, initializer_range=0.2)).save_pretrained(d)
    gpt2_tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def task_manager(shared_data, tmp_path_factory):
    from prime_eval.tasks import build_task_manager

    return build_task_manager(shared_data, PARITY_TASKS + ["lambada_openai"],
                              cache_dir=tmp_path_factory.mktemp("offline_tasks"))


def _evaluate(model, tasks, task_manager, limit, model_args=""):
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=task_manager,
                                   limit=limit, log_samples=True, bootstrap_iters=0, batch_size=8, device="cpu")


def _resps(results, task):
    return {(s["doc_id"], j): r[0] for s in results["samples"][task] for j, r in enumerate(s["resps"])}


def test_arm_parity_with_lm_eval_hf(tiny_gpt2_dir, task_manager):
    """Same per-request log-likelihoods (1e-4), is_greedy and acc as lm-eval's `hf` on real piqa/arc/hellaswag/wino."""
    ref = _evaluate("hf", PARITY_TASKS, task_manager, 10, f"pretrained={tiny_gpt2_dir},dtype=float32")
    lm = ARMLM(checkpoint=str(tiny_gpt2_dir), device="cpu", rows_per_pass=16)
    ours = _evaluate(lm, PARITY_TASKS, task_manager, 10)
    for task in PARITY_TASKS:
        a, b = _resps(ref, task), _resps(ours, task)
        assert a.keys() == b.keys() and len(a) >= 20
        for key in a:
            assert b[key][0] == pytest.approx(a[key][0], abs=1e-4), (task, key)
            assert bool(b[key][1]) == bool(a[key][1]), (task, key)
        assert ours["results"][task]["acc,none"] == ref["results"][task]["acc,none"]
    info = ours["config"]["prime_eval"]
    assert info["family"] == "arm" and info["is_bound"] and len(info["checkpoint_sha256"]) == 64


def test_arm_rolling_and_generation_match_hf(tiny_gpt2_dir):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tiny_gpt2_dir), max_length=16, batch_size=4, device="cpu", dtype="float32")
    ours = ARMLM(checkpoint=str(tiny_gpt2_dir), max_length=16, device="cpu")
    text = "The quick brown fox jumps over the lazy dog. " * 5
    reqs = [Instance("loglikelihood_rolling", {}, (t,), 0, ("wikitext", i, 1)) for i, t in enumerate([text, "Hi."])]
    assert ours.loglikelihood_rolling(reqs) == pytest.approx(hf.loglikelihood_rolling(reqs), abs=1e-4)
    assert ours.stats[0]["continuation_tokens"] == len(ours.tok_encode(text))
    gen = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), 0,
                    ("t", i, 1)) for i, c in enumerate(["Question: why?\nAnswer:", "Once upon a time"])]
    assert ours.generate_until(gen) == hf.generate_until(gen)


@pytest.fixture(scope="module")
def lit_checkpoints(tmp_path_factory):
    """Tiny lit_gpt TransEncoder checkpoints (MDM ℓ=1; Prime ℓ=4, b=15) over the GPT-2 vocabulary."""
    from prime_eval.networks.lit_gpt import Config, TransEncoder
    from prime_eval.subtokenizer import save_permutation

    d = tmp_path_factory.mktemp("lit")
    cfg = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=50257, block_size=128)
    torch.manual_seed(0)
    for fam, ell, base in (("mdm", 1, None), ("prime", 4, 15)):
        torch.save({"model": TransEncoder(cfg, ell=ell, base=base).state_dict()}, d / f"{fam}.pth")
    g = torch.Generator().manual_seed(0)
    save_permutation(torch.cat([torch.randperm(50257, generator=g), torch.arange(50257, 15**4)]), d / "perm.pt")
    return d


@pytest.mark.parametrize("family", ["mdm", "prime"])
def test_diffusion_end_to_end(family, lit_checkpoints, shared_data, task_manager, tmp_path):
    """Registry path (`model_args` string, as the CLI), piqa + lambada (is_greedy), stats file next to the samples."""
    import lm_eval

    args = (f"checkpoint={lit_checkpoints / f'{family}.pth'},config=n_head=2;block_size=128;vocab_size=50257,"
            f"tokenizer={shared_data / 'tokenizers' / 'gpt2'},samples=4,seed=7,rows_per_pass=32")
    if family == "prime":
        with pytest.raises(UserError, match="permutation=FILE"):
            PrimeLM.create_from_arg_string(args, {"device": "cpu"})
        args += f",permutation={lit_checkpoints / 'perm.pt'}"
    lm = {"mdm": MDMLM, "prime": PrimeLM}[family].create_from_arg_string(args, {"device": "cpu", "batch_size": 8})
    res = lm_eval.simple_evaluate(model=lm, tasks=["piqa", "lambada_openai"], task_manager=task_manager, limit=3,
                                  log_samples=True, bootstrap_iters=0)
    assert 0 <= res["results"]["piqa"]["acc,none"] <= 1 and "perplexity,none" in res["results"]["lambada_openai"]
    info = res["config"]["prime_eval"]
    assert info["family"] == family and info["estimator"] == DEFAULT_ESTIMATOR["score"][family]
    assert info["num_samples"] == 4 and info["is_bound"]
    paths = lm.finalize_run(tmp_path, "2026-01-01T00-00-00")
    rows = {p.name: [json.loads(x) for x in p.read_text().splitlines()] for p in paths}
    piqa = rows["stats_piqa_2026-01-01T00-00-00.jsonl"]
    assert len(piqa) == 6 and SCHEMA <= piqa[0].keys()
    assert all(r["num_samples"] == 4 and r["mc_stderr"] > 0 and r["num_forward_rows"] <= 4 for r in piqa)
    assert {(r["doc_id"], r["choice"]) for r in piqa} == {(d, c) for d in range(3) for c in range(2)}
    lamb = rows["stats_lambada_openai_2026-01-01T00-00-00.jsonl"]
    assert all(r["greedy_forward_rows"] >= 1 for r in lamb)
    by_doc = {s["doc_id"]: s for s in res["samples"]["piqa"]}
    assert all(r["loglikelihood"] == by_doc[r["doc_id"]]["resps"][r["choice"]][0][0] for r in piqa)


def _requests(n=9):
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat table quickly slowly red blue".split()
    out = []
    for i in range(n):
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        cont = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        out.append(Instance("loglikelihood", {}, (ctx, cont), i % 3, ("toy", i // 3, 1)))
    return out


@pytest.mark.parametrize("family,estimator", [("mdm", "mc"), ("mdm", "chain_rule"), ("prime", "mc"),
                                              ("prime", "legacy_joint")])
def test_determinism_rows_per_pass_and_order(family, estimator, gpt2_tok):
    net = TinyDenoiser(family, len(gpt2_tok), ell=4 if family == "prime" else 1, base=15, seed=1)
    cls = {"mdm": MDMLM, "prime": PrimeLM}[family]
    reqs = _requests()
    lm1 = cls(model=net, tokenizer=gpt2_tok, estimator=estimator, samples=8, rows_per_pass=1)
    a, a_stats = lm1.loglikelihood(reqs), lm1.stats
    lm = cls(model=net, tokenizer=gpt2_tok, estimator=estimator, samples=8, rows_per_pass=64, max_logits_mb=1)
    perm = list(range(len(reqs)))
    random.Random(1).shuffle(perm)
    b = lm.loglikelihood([reqs[i] for i in perm])
    # same draws; only fp32 rounding of differently composed batches differs (~1e-8 relative)
    for j, i in enumerate(perm):
        assert b[j][0] == pytest.approx(a[i][0], rel=1e-6) and b[j][1] == a[i][1]
    key = ("seed", "num_forward_rows", "greedy_forward_rows", "num_samples")
    first = {(s["doc_id"], s["choice"]): [s[k] for k in key] for s in a_stats}
    assert first == {(s["doc_id"], s["choice"]): [s[k] for k in key] for s in lm.stats}
    # a different run seed gives different Monte Carlo draws (chain_rule is deterministic)
    c = cls(model=net, tokenizer=gpt2_tok, estimator=estimator, samples=8, seed=99).loglikelihood(reqs[:2])
    assert (c[0][0] == pytest.approx(a[0][0])) == (estimator == "chain_rule")


def test_request_seed_is_stable():
    assert request_seed(1234, "ctx", " cont") == request_seed(1234, "ctx", " cont")
    assert request_seed(1234, "ctx", " cont") == 5248321076716263121  # sha256, not Python's salted hash
    assert len({request_seed(s, c, " x") for s in (0, 1) for c in ("a", "b")}) == 4


def test_truncation_is_counted(gpt2_tok, caplog):
    net = TinyDenoiser("mdm", len(gpt2_tok), seed=2)
    lm = MDMLM(model=net, tokenizer=gpt2_tok, max_length=8, samples=4, crn=False)
    long_ctx = "one two three four five six seven eight nine ten"
    with caplog.at_level(logging.WARNING, logger="prime_eval.adapters"):
        (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (long_ctx, " end"), 0, ("t", 0, 1))])
    n_ctx = len(lm.tok_encode(long_ctx))
    assert lm.stats[-1]["truncated_tokens"] == n_ctx + 1 - 8 and "left-truncated" in caplog.text
    assert lm.get_model_info()["prime_eval"]["truncated_requests"] == 1
    # same number as scoring the kept window directly
    kept = lm.tok_encode(long_ctx)[-7:]
    [(ll2, _)] = lm._loglikelihood_tokens([((long_ctx, " end"), kept, lm.tok_encode(" end"))])
    assert ll2 == pytest.approx(ll, abs=1e-9)
    arm = ARMLM(model=TinyDenoiser("arm", len(gpt2_tok)), tokenizer=gpt2_tok, max_length=4)
    arm.loglikelihood([Instance("loglikelihood", {}, (long_ctx, " end"), 0, ("t", 0, 1))])
    assert arm.stats[-1]["truncated_tokens"] == n_ctx + 1 - 5  # ARM keeps max_length + 1 tokens


def test_errors(gpt2_tok):
    net = TinyDenoiser("mdm", len(gpt2_tok))
    lm = MDMLM(model=net, tokenizer=gpt2_tok, samples=2)
    with pytest.raises(UserError, match="empty continuation"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("Some context", ""), 0, ("t", 3, 0))])
    with pytest.raises(UserError, match="max_gen_toks=256 leaves no room for the prompt in max_length=64"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"until": ["\n"]}), 0, ("t", 0, 1))])
    with pytest.raises(UserError, match="unknown model argument"):
        MDMLM(model=net, tokenizer=gpt2_tok, temperature=0.5)
    with pytest.raises(UserError, match="only with\\s+estimator=legacy_joint"):
        PrimeLM(model=TinyDenoiser("prime", len(gpt2_tok), ell=4, base=15), tokenizer=gpt2_tok, cfg=0.5)
    with pytest.raises(UserError, match="family"):
        ARMLM(model=net, tokenizer=gpt2_tok)


def test_non_likelihood_settings_flagged(gpt2_tok):
    pnet = TinyDenoiser("prime", len(gpt2_tok), ell=4, base=15)
    legacy = PrimeLM(model=pnet, tokenizer=gpt2_tok, estimator="legacy_joint", cfg=0.5, temperature=0.5,
                     chunk="0.0_0.5/1_4").get_model_info()["prime_eval"]
    assert legacy["is_bound"] is False and legacy["cfg"] == 0.5 and legacy["temperature"] == 0.5
    cfg = MDMLM(model=TinyDenoiser("mdm", len(gpt2_tok)), tokenizer=gpt2_tok, cfg=1.0).get_model_info()["prime_eval"]
    assert cfg["is_bound"] is False and cfg["cfg"] == 1.0
    valid = PrimeLM(model=pnet, tokenizer=gpt2_tok).get_model_info()["prime_eval"]
    assert valid["is_bound"] is True and valid["estimator"] == DEFAULT_ESTIMATOR["score"]["prime"] and valid["num_samples"] == 128


def test_bos_policy(gpt2_tok):
    net = TinyDenoiser("mdm", len(gpt2_tok))
    auto = MDMLM(model=net, tokenizer=gpt2_tok)
    assert auto.add_bos is False and auto.tok_encode("Hello world") == [15496, 995]  # GPT-2 adds no BOS (as `hf`)
    forced = MDMLM(model=net, tokenizer=gpt2_tok, add_bos="true")
    assert forced.tok_encode("Hello world") == [50256, 15496, 995]
    ctx, cont = forced._encode_pair("Hello ", "world")
    assert ctx == [50256, 15496] and cont == [995]  # trailing space moved to the continuation


def test_common_random_numbers_share_the_document_seed(gpt2_tok):
    net = TinyDenoiser("mdm", len(gpt2_tok), seed=2)
    reqs = [Instance("loglikelihood", {}, ("Question: a\nAnswer:", c), i, ("piqa", 5, 1)) for i, c in
            enumerate([" yes", " no way"])]
    crn = MDMLM(model=net, tokenizer=gpt2_tok, samples=4)
    crn.loglikelihood(reqs)
    assert crn.stats[0]["seed"] == crn.stats[1]["seed"] and crn.get_model_info()["prime_eval"]["crn"]
    ind = MDMLM(model=net, tokenizer=gpt2_tok, samples=4, crn=False)
    ind.loglikelihood(reqs)
    assert ind.stats[0]["seed"] != ind.stats[1]["seed"]


def test_adaptive_sampling_stops_settled_and_futile_documents(gpt2_tok):
    net = TinyDenoiser("mdm", len(gpt2_tok), seed=2)
    ctx = "Question: a\nAnswer:"
    reqs = [Instance("loglikelihood", {}, (ctx, c), i, ("t", 0, 1))  # very different lengths: settles at once
            for i, c in enumerate([" yes", " no no no no no no no no no no no no"])]
    reqs += [Instance("loglikelihood", {}, (ctx + " b", c), i, ("t", 1, 1)) for i, c in enumerate([" yes", " no"])]
    # exact_count: on a random network every masked token costs about the same, so its value barely depends on the
    # masked count and document 0 settles in the first round (sqrt_count's weights 1/q(l) would vary with the count)
    lm = MDMLM(model=net, tokenizer=gpt2_tok, samples=256, round_samples=16, estimator="exact_count")
    lm.loglikelihood(reqs)
    by_doc = {(r["doc_id"], r["choice"]): r for r in lm.stats}
    assert by_doc[(0, 0)]["stop"] == "settled" and by_doc[(0, 0)]["num_samples"] == 16
    doc1 = by_doc[(1, 0)]  # a near tie on a random network: settled, futile (z·sqrt(cap/total) < 1) or the cap
    assert doc1["stop"] in ("settled", "futile", "cap") and doc1["num_samples"] in (16, 32, 64, 128, 256)
    assert doc1["stop"] != "futile" or doc1["num_samples"] >= 64
    fixed = MDMLM(model=net, tokenizer=gpt2_tok, samples=32, adaptive=False)
    fixed.loglikelihood(reqs)
    assert all(r["num_samples"] == 32 and "stop" not in r for r in fixed.stats)
    with pytest.raises(UserError, match="confidence"):
        MDMLM(model=net, tokenizer=gpt2_tok, confidence=1.5)


class _BarRecorder:
    """Stands in for tqdm: records every bar, its updates and the totals it was given."""

    bars: list = []

    def __init__(self, total=None, desc="", disable=False, **kw):
        self.total, self.desc, self.disable, self.n, self.updates, self.totals = total, desc, disable, 0, [], []
        _BarRecorder.bars.append(self)

    def update(self, k):
        self.n += k
        self.updates.append(k)

    def refresh(self):
        self.totals.append(self.total)

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass


def test_one_progress_bar_in_forward_rows_moving_every_pass(gpt2_tok, monkeypatch):
    """Adaptive rounds used to restart the bar with a smaller total each round (160 -> 150 -> 144 -> 70), and a
    chunk showed 0% until it was done. Now: one bar per call, advanced by every forward pass, in forward rows, whose
    total (a running estimate) never falls below the rows done and ends at the rows actually run."""
    import model_adapters.scoring as S

    _BarRecorder.bars = []
    monkeypatch.setattr(S, "tqdm", _BarRecorder)
    net = TinyDenoiser("mdm", len(gpt2_tok), seed=2)
    passes = _record_passes(net)
    lm = MDMLM(model=net, tokenizer=gpt2_tok, samples=64, round_samples=8, rows_per_pass=16)
    reqs = _requests(12) + [Instance("loglikelihood", {}, ("The cat sat on the", " mat"), 0, ("lamb", 0, 1))]
    lm.loglikelihood(reqs)
    (bar,) = [b for b in _BarRecorder.bars if not b.disable]
    assert "forward rows" in bar.desc and "estimated" in bar.desc
    assert bar.updates == passes and len(passes) >= 5  # every pass (estimator and is_greedy) moves the bar
    assert bar.n == sum(r["num_forward_rows"] + r["greedy_forward_rows"] for r in lm.stats) == bar.total
    assert max(r.get("rounds", 1) for r in lm.stats) >= 2  # several adaptive rounds, still one bar
    assert all(t is not None for t in bar.totals)
    # a network with a stack of blocks moves the bar block by block (several times per pass)
    from prime_eval.networks.lit_gpt import Config, TransEncoder

    torch.manual_seed(0)
    deep = TransEncoder(Config(n_layer=3, n_embd=32, n_head=2, intermediate_size=64, vocab_size=50257, block_size=128))
    deep_passes = _record_passes(deep)
    _BarRecorder.bars = []
    MDMLM(model=deep, tokenizer=gpt2_tok, samples=8, rows_per_pass=16, greedy="false").loglikelihood(reqs[:4])
    (bar,) = [b for b in _BarRecorder.bars if not b.disable]
    # 3 blocks + the head: a pass of r rows moves the bar to r·k // 4, k = 1..4
    assert max(deep_passes) >= 4 and len(bar.updates) == sum(len({r * k // 4 for k in range(1, 5)} - {0})
                                                             for r in deep_passes)
    assert bar.n == sum(deep_passes) == bar.total


def test_arm_progress_total_counts_the_chunk_being_scored(gpt2_tok, monkeypatch):
    """ARM requests take one forward row each, so the bar's total is exact from the start. It used to leave out the
    chunk being scored (a total of 89 for 320 requests, then a bar running past 100%), and packed passes counted one
    row each whatever they served: now the total never falls below the rows done and each pass moves the bar by the
    requests it serves (`Parts.rows`)."""
    import model_adapters.scoring as S
    from prime_eval.networks.lit_gpt import GPT, Config

    _BarRecorder.bars = []
    monkeypatch.setattr(S, "tqdm", _BarRecorder)
    torch.manual_seed(0)
    net = GPT(Config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=48, vocab_size=50257,
                     block_size=256, rope_bf16=False))
    reqs = _requests(12)
    ARMLM(model=net, tokenizer=gpt2_tok, rows_per_pass=2, chunk_rows=5).loglikelihood(reqs)
    (bar,) = [b for b in _BarRecorder.bars if not b.disable]
    assert bar.totals and all(t == len(reqs) for t in bar.totals)
    assert bar.n == len(reqs) and len(bar.updates) >= 3  # three chunks at least


def _record_passes(net) -> list[int]:
    """The rows of every forward pass of `net` (its trunk, `hidden`) that need logits: dummy rows that fill a pass of
    fixed shape are not forward rows of any request."""
    rows, hidden = [], net.hidden

    def recorded(idx, **kw):
        rows.append(int(idx.shape[0]) if kw.get("at") is None else int(kw["at"].any(1).sum()))
        return hidden(idx, **kw)

    net.hidden = recorded
    return rows


@pytest.mark.parametrize("family", ["mdm", "prime"])
def test_a_request_s_logits_are_reduced_as_they_come(gpt2_tok, family, monkeypatch):
    """The diffusion adapters reduce each head call's logits before the next, so a request of many samples never
    holds all its logits (a Prime request of 1,024 samples at V = 32,000 held ~3 GB of them and needed ~10 GB in all,
    which kept the Diff_LLaMA_6M Prime adaptive benchmark off a 24 GiB machine); and the values do not depend on how a
    request's logits are split into reductions or its requests into chunks: the same bits as `cost` on all of them."""
    import weakref

    import prime_eval.estimators.rows as R

    net = TinyDenoiser(family, len(gpt2_tok), **({"ell": 4, "base": 15} if family == "prime" else {}), seed=2)
    reqs = _requests(4)
    alive, outputs, head = [], [], net.head

    def watched(h, inputs=None):
        alive.append(sum(r() is not None for r in outputs))
        out = head(h, inputs)
        outputs.append(weakref.ref(out))
        return out

    net.head = watched
    monkeypatch.setattr(R, "HEAD_ROWS", 16)  # many head calls from few rows
    make = dict(model=net, tokenizer=gpt2_tok, samples=32, adaptive="false", greedy="false", rows_per_pass=16)
    make_lm = MDMLM if family == "mdm" else PrimeLM
    held = make_lm(**make)
    held._terms = None  # the scorer's other path: every logit of a chunk held, then `cost`
    whole = held.loglikelihood(reqs)
    assert max(alive) > 2  # what the watch sees when logits are held
    alive.clear()
    default = make_lm(**make).loglikelihood(reqs)
    assert len(alive) > 2 * len(reqs) and max(alive) <= 1  # only the previous head call's logits, being reduced
    monkeypatch.setattr(R, "logits_chunk_rows", lambda vocab_size: 7)  # reductions of 7 logit rows
    split = make_lm(**make, max_logits_mb=0.001).loglikelihood(reqs)  # a chunk per request
    assert default == whole and split == whole


def test_stats_say_whether_is_greedy_was_computed(gpt2_tok):
    """greedy=auto skips multiple-choice documents: their is_greedy is false because it was not computed."""
    net = TinyDenoiser("mdm", len(gpt2_tok), seed=2)
    mc = [Instance("loglikelihood", {}, ("Question: a\nAnswer:", c), i, ("piqa", 0, 1))
          for i, c in enumerate([" yes", " no"])]
    single = [Instance("loglikelihood", {}, ("The cat sat on the", " mat"), 0, ("lambada", 0, 1))]
    auto = MDMLM(model=net, tokenizer=gpt2_tok, samples=4)
    auto.loglikelihood(mc + single)
    computed = {r["task"]: r["is_greedy_computed"] for r in auto.stats}
    assert computed == {"piqa": False, "lambada": True}
    assert all(r["greedy_forward_rows"] == 0 for r in auto.stats if r["task"] == "piqa")
    always = MDMLM(model=net, tokenizer=gpt2_tok, samples=4, greedy="true")
    always.loglikelihood(mc + single)
    assert all(r["is_greedy_computed"] and r["greedy_forward_rows"] >= 1 for r in always.stats)
    never = MDMLM(model=net, tokenizer=gpt2_tok, samples=4, greedy="false")
    never.loglikelihood(single)
    assert never.stats[0]["is_greedy_computed"] is False and never.stats[0]["is_greedy"] is False
    arm = ARMLM(model=TinyDenoiser("arm", len(gpt2_tok)), tokenizer=gpt2_tok)
    arm.loglikelihood(mc)
    assert all(r["is_greedy_computed"] and r["is_greedy_deterministic"] for r in arm.stats)


def test_device_in_model_args_and_from_lm_eval(gpt2_tok, tiny_gpt2_dir):
    """`--model_args ...,device=cpu` with lm-eval's --device used to be `TypeError: got multiple values for keyword
    argument 'device'`. The same value is fine; two different values are a one-line error."""
    lm = ARMLM.create_from_arg_string(f"checkpoint={tiny_gpt2_dir},device=cpu", {"device": "cpu", "batch_size": 8})
    assert lm.device == torch.device("cpu") and lm.rows_per_pass == 8
    with pytest.raises(UserError, match="device is given twice"):
        ARMLM.create_from_arg_string(f"checkpoint={tiny_gpt2_dir},device=cpu", {"device": "cuda:3"})
    with pytest.raises(UserError, match="batch_size is given twice"):
        ARMLM.create_from_arg_obj({"checkpoint": str(tiny_gpt2_dir), "batch_size": 4}, {"batch_size": 8})


def test_bad_settings_fail_before_the_weights_are_read(monkeypatch, lit_checkpoints, shared_data):
    """samples=0 / samples=-3 used to fail with KeyError '_rounds' after the model had loaded."""
    import prime_eval.checkpoints as C

    monkeypatch.setattr(C, "load_network", lambda *a, **k: pytest.fail("weights read before the settings check"))
    base = f"checkpoint={lit_checkpoints / 'mdm.pth'},tokenizer={shared_data / 'tokenizers' / 'gpt2'}"
    for bad, needle in (("samples=0", "samples=0: must be >= 1"), ("samples=-3", "samples=-3: must be >= 1"),
                        ("confidence=2", "confidence=2"), ("greedy=sometimes", "greedy='sometimes'"),
                        ("bogus=1", "unknown model argument(s) ['bogus']")):
        with pytest.raises(UserError) as e:
            MDMLM.create_from_arg_string(f"{base},{bad}", {"device": "cpu"})
        assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["hf", "lit_gpt"])
def test_arm_runs_each_shared_context_once(kind, tiny_gpt2_dir, gpt2_tok):
    """Issue 17: the choices of a document share their context, which runs once in a packed pass (every continuation
    attends to it); the log-likelihoods equal full causal rows' to float precision. The passes have one shape and
    each part its own attention call, so a request's value is the same bits whatever is scored with it and in what
    order, and pack=request (each request in a pass of its own, its context run for it alone) gives the same bits."""
    import torch.nn.functional as F

    from prime_eval.networks.lit_gpt import GPT, Config

    if kind == "hf":
        lm = ARMLM(checkpoint=str(tiny_gpt2_dir), device="cpu", rows_per_pass=4)
    else:
        torch.manual_seed(0)
        net = GPT(Config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=48, vocab_size=50257,
                         block_size=256, rope_bf16=False))
        lm = ARMLM(model=net, tokenizer=gpt2_tok, rows_per_pass=4)
    reqs = []
    for d, ctx in enumerate(["Question: where do cats sleep?\nAnswer:", "The sky is", "A long context " * 9]):
        for j, cont in enumerate([" on the mat", " in a box of old shoes", " nowhere", " x"]):
            reqs.append(Instance("loglikelihood", {}, (ctx, cont), j, ("doc", d, 1)))
    seen = []  # (real tokens, token slots, packed?) of every pass
    hidden_cached = lm.net.hidden_cached
    lm.net.hidden_cached = lambda idx, cache=None, **k: (
        seen.append((int(k["valid"].sum()), idx.numel(), k.get("explicit") is not None)), hidden_cached(idx, cache, **k))[1]
    shared = lm.loglikelihood(reqs)
    del lm.net.hidden_cached
    pairs = [lm._encode_pair(*r.args) for r in reqs]
    assert all(packed and slots == 4 * 32 for _, slots, packed in seen)  # rows_per_pass · TOKENS_PER_ROW slots
    # each context once, then each continuation's inputs: one pass holds all three documents
    assert [n for n, _, _ in seen] == [sum(len(c) for c, _ in pairs[::4]) + sum(len(x) - 1 for _, x in pairs)]
    with torch.no_grad():
        for (ll, greedy), (c, x) in zip(shared, pairs):
            logp = F.log_softmax(lm.net(torch.tensor([c + x[:-1]]))[0, len(c) - 1:].double(), -1)  # a full row
            assert ll == pytest.approx(float(logp.gather(1, torch.tensor(x)[:, None]).sum()), abs=1e-5)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(x)).all())
    per_request = ARMLM(model=lm.net, tokenizer=lm.tokenizer, rows_per_pass=4, pack="request").loglikelihood(reqs)
    assert per_request == shared  # bit for bit
    order = (5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6)
    again = ARMLM(model=lm.net, tokenizer=lm.tokenizer, rows_per_pass=4).loglikelihood([reqs[i] for i in order[:7]])
    assert again == [shared[i] for i in order[:7]]
