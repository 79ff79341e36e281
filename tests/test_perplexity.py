"""Bound perplexity (prime_eval.perplexity, `prime-eval ppl`) on WikiText-2 with tiny networks of the three families.

Each test compares with a reference: independent teacher forcing (ARM), the exact any-order likelihood and the exact
expectation of the estimator by enumeration (audit), the ℓ=1 ≡ MDM identity, a one-shot computation of the
statistics, or the same run at other batch sizes.
"""
from __future__ import annotations

import json
import math
import tracemalloc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prime_eval import audit
from prime_eval import perplexity as P
from prime_eval.commands.ppl_display import summary_table
from prime_eval.errors import UserError
from prime_eval.networks.toy import TinyDenoiser
from prime_eval.subtokenizer import SubTokenizer, base_from_ell


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster and steadier on a busy 2-core machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def wiki(shared_data):
    return shared_data / "wikitext2"


@pytest.fixture(scope="module")
def tok(wiki):
    """A 300-token byte-level BPE trained on WikiText-2 validation text in well under a second (EOS = BOS = id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (wiki / "valid.txt").read_text(encoding="utf-8")[:200_000]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def gpt2(shared_data):
    from prime_eval.checkpoints import load_tokenizer

    return load_tokenizer(shared_data / "tokenizers" / "gpt2", vocab_size=50257)


def nets(V: int, ell: int = 2, seed: int = 0, max_length: int = 64):
    return {"arm": TinyDenoiser("arm", V, seed=seed, max_length=max_length),
            "mdm": TinyDenoiser("mdm", V, seed=seed, max_length=max_length),
            "prime": TinyDenoiser("prime", V, ell=ell, base=base_from_ell(V, ell), seed=seed, max_length=max_length)}


def docs_of(wiki, n=None):
    rows = [json.loads(line)["page"] for line in (wiki / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows[:n] if n else rows


# -- data and blocks ----------------------------------------------------------------------------------------------
def test_wrap_blocks_follow_mdlm_and_count_every_byte(wiki, gpt2):
    """GPT-2 + EOS per doc, concatenated, cut into L-2 and framed [BOS] .. [EOS]; bytes and remainder add up."""
    docs = docs_of(wiki, 6)
    stream = P.BlockStream(docs, gpt2, L=1024, wrap=True, bos_id=50256, eos_id=50256)
    blocks = list(stream)
    flat = []
    for d in docs:
        flat += gpt2(d, add_special_tokens=False)["input_ids"] + [50256]
    assert all(b.ids.numel() == 1024 and b.ids[0] == 50256 and b.ids[-1] == 50256 for b in blocks)
    inner = torch.cat([b.ids[1:-1] for b in blocks]).tolist()
    assert inner == flat[:len(inner)] and len(flat) - len(inner) == stream.dropped_tokens < 1022
    assert [b.index for b in blocks] == list(range(len(blocks)))
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert sum(b.bytes for b in blocks) + stream.dropped_bytes == stream.total_bytes == total
    # a block's bytes are the text its tokens decode to (wikitext is ASCII: exact per block)
    assert blocks[1].bytes == len(gpt2.decode(blocks[1].ids[1:-1].tolist()).replace("<|endoftext|>", "").encode())


def test_no_wrap_one_block_per_document(wiki, tok):
    docs = ["a short one", "", docs_of(wiki, 1)[0]]
    stream = P.BlockStream(docs, tok, L=32, wrap=False, bos_id=0, eos_id=0)
    blocks = list(stream)
    assert len(blocks) == 3 and blocks[1].ids.tolist() == [0, 0] and blocks[2].ids.numel() == 32
    assert blocks[0].ids.tolist() == [0] + tok("a short one", add_special_tokens=False)["input_ids"] + [0]
    n_long = len(tok(docs[2], add_special_tokens=False)["input_ids"])
    assert stream.truncated_docs == 1 and stream.dropped_tokens == n_long - 30


def test_text_sources(tmp_path, wiki):
    txt = tmp_path / "a.txt"
    txt.write_text("first para\nline two\n \n\n second para\n\nthird\n", encoding="utf-8")
    assert list(P.text_files([txt])) == ["first para\nline two", " second para", "third"]
    assert list(P.text_files([txt], txt_docs="file")) == [txt.read_text()]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"id": 1, "body": "x y"}\n\n{"id": 2, "body": "z"}\n', encoding="utf-8")
    assert list(P.text_files([jl])) == ["x y", "z"]  # the only string field
    assert list(P.text_files([txt, jl], text_field="body"))[-2:] == ["x y", "z"]
    with pytest.raises(UserError, match="no field 'text'"):
        list(P.text_files([jl], text_field="text"))
    with pytest.raises(UserError, match="not found"):
        P.text_files([tmp_path / "missing.txt"])
    # the Hugging Face path, offline: a builder with data_files and a sliced split (as train[-100000:] for OWT)
    src = P.hf_dataset("json", data_files=str(wiki / "test.jsonl"), split="train[-3:]", text_field="page")
    assert list(src) == docs_of(wiki)[-3:]


def test_binary_files_are_refused_as_binary(tmp_path, capsys):
    """A binary file is named as binary before any model is loaded (it used to get a decoding error suggesting
    --encoding latin-1, which would score the bytes as text); UTF-16 text with --encoding utf-16 is still text."""
    from prime_eval import cli

    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    ctl = tmp_path / "controls.dat"
    ctl.write_bytes(bytes([1, 2, 3, 4, 5, 6, 14, 15, 16, 65, 66]) * 300)  # no NUL, mostly control bytes
    for path, why in ((png, "a NUL byte at offset 8"), (ctl, "82% control bytes")):
        with pytest.raises(UserError, match=f"{path.name} is a binary file, not text \\({why}"):
            P.text_files([path])
        with pytest.raises(UserError, match="binary"):
            P.text_files([path], encoding="latin-1")
    rc = cli.main(["ppl", "--model", "mdm", "--model_args", "checkpoint=missing.pth", "--files", str(png)])
    assert rc == 2 and "image.png is a binary file" in capsys.readouterr().err  # before the (missing) model
    utf16 = tmp_path / "wide.txt"
    utf16.write_text("one paragraph\n\nand another\n", encoding="utf-16")
    assert list(P.text_files([utf16], encoding="utf-16")) == ["one paragraph", "and another"]


# -- the estimators through the protocol ---------------------------------------------------------------------------
def test_arm_equals_teacher_forcing(wiki, tok):
    """ARM NLL = -Σ log p(x_i | x_<i) over the L-1 positions after BOS, from full-sequence logits."""
    net = nets(len(tok))["arm"]
    L, docs = 40, docs_of(wiki, 2)
    res = P.evaluate_perplexity(net, tok, docs, P.Protocol(L=L, max_tokens=3000), batch_size=7)
    flat = []
    for d in docs:
        flat += tok(d, add_special_tokens=False)["input_ids"] + [0]
    nb = res["results"]["blocks"]
    x = torch.tensor([[0] + flat[i * (L - 2):(i + 1) * (L - 2)] + [0] for i in range(nb)])
    with torch.no_grad():
        logp = F.log_softmax(net(x[:, :-1]).double(), -1)  # (B, L-1, V)
    nll = -logp.gather(2, x[:, 1:, None]).sum()
    r = res["results"]
    assert r["tokens"] == nb * (L - 1) and r["nll_stderr"] == 0.0 and res["bound_kind"] == "exact"
    assert r["nll"] == pytest.approx(float(nll) / (nb * (L - 1)), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(float(nll) / math.log(2) / r["bytes"], rel=1e-6)


def _short_blocks(wiki, tok, L=6, n=3):
    return [b.ids for b in list(P.BlockStream(docs_of(wiki, 1), tok, L=L, wrap=True, bos_id=0, eos_id=0))[:n]]


@pytest.mark.parametrize("family,options", [("mdm", {}), ("mdm", {"T": 8}), ("prime", {}),
                                            ("prime", {"carry_over": True})])
def test_bound_is_above_exact_likelihood(wiki, tok, family, options):
    """On 6-token blocks: exact E[NELBO] >= exact -log p (audit DP), and the MC mean matches E[NELBO] within 4 SE."""
    net = nets(len(tok))[family]
    T = options.pop("T", None)
    seen = []
    proto = P.Protocol(L=6, num_samples=300, T=T, eps=0.0, max_tokens=18)  # ε = 0: the bound itself (no floor)
    res = P.evaluate_perplexity(net, tok, docs_of(wiki, 1), proto,
                                estimator_options=options, batch_size=512,
                                on_block=lambda b, v, n: seen.append((b.ids, v)))
    assert res["is_bound"] and res["bound_kind"] == "upper_bound" and res["results"]["blocks"] == 3
    est = P.build_estimator(net, "mc", eps=0.0, T=T, **options)
    total_exp = total_mc = var = 0.0
    for ids, values in seen:
        target = torch.ones(6, dtype=torch.bool)
        table = audit.masked_nll_table(net, est, ids, target)
        exact = audit.exact_nll(net, est, ids, target, table=table)
        expectation = audit.exact_expectation(net, est, ids, target, table=table)
        assert expectation >= exact - 1e-9
        total_exp += expectation
        total_mc += float(values.mean())
        var += float(values.var()) / values.numel()
    assert abs(total_mc - total_exp) < 4 * math.sqrt(var)
    assert res["results"]["nll"] == pytest.approx(total_mc / 18, rel=1e-9)
    assert res["results"]["nll_stderr"] == pytest.approx(math.sqrt(var) / 18, rel=1e-9)


def test_prime_with_ell_1_equals_mdm(wiki, tok):
    V = len(tok)
    mdm = TinyDenoiser("mdm", V, seed=3, max_length=64)
    prime = TinyDenoiser("prime", V, ell=1, base=V, seed=3, max_length=64)
    kw = dict(protocol=P.Protocol(L=24, num_samples=2, max_tokens=600, seed=5), batch_size=16)
    a = P.evaluate_perplexity(mdm, tok, docs_of(wiki, 2), **kw)["results"]
    b = P.evaluate_perplexity(prime, tok, docs_of(wiki, 2), **kw)["results"]
    assert a["blocks"] == b["blocks"] == 25
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-9) and b["nll_stderr"] == pytest.approx(a["nll_stderr"], 1e-6)


def test_legacy_joint_falls_below_the_valid_bound(wiki, tok):
    """The published V1 form (carry-over, joint token CE on tokens with a masked digit) is not a bound. Model: the
    exact conditional of i.i.d. WikiText unigrams, binary sub-tokens (b=2, ℓ=9), so -log p(x) = -Σ log π(x_i).
    The audit shows E[legacy] < exact NLL <= E[valid] on single tokens; the pipeline labels legacy_joint and its
    paired per-block values fall below the valid bound's."""
    from prime_eval.networks.toy import OracleDenoiser

    V = len(tok)
    ids = tok((wiki / "valid.txt").read_text(encoding="utf-8")[:300_000], add_special_tokens=False)["input_ids"]
    probs = torch.bincount(torch.tensor(ids), minlength=V).double() + 1.0
    probs /= probs.sum()
    st = SubTokenizer(V, base=2)
    net = OracleDenoiser(probs, st)
    opts = {"carry_over": True, "subtokenizer": st}
    valid = P.build_estimator(net, "mc", eps=0.0, **opts)
    legacy = P.build_estimator(net, "legacy_joint", eps=0.0, legacy_scope="masked", **opts)
    x = _short_blocks(wiki, tok, L=6, n=1)[0]
    exact = e_valid = e_legacy = 0.0
    for pos in range(1, 5):  # the four text tokens of the block, one at a time (2^9 mask sets each)
        target = torch.arange(6) == pos
        table = audit.masked_nll_table(net, valid, x, target)
        exact += audit.exact_nll(net, valid, x, target, table=table)
        e_valid += audit.exact_expectation(net, valid, x, target, table=table)
        e_legacy += audit.exact_expectation(net, legacy, x, target)
    assert exact == pytest.approx(-float(probs[x[1:5]].log().sum()), rel=1e-9)
    assert e_legacy < exact - 0.5 and e_valid >= exact - 1e-9
    proto = P.Protocol(L=32, num_samples=4, max_tokens=3200)
    per = {}
    for name, extra in (("mc", {}), ("legacy_joint", {"legacy_scope": "masked"})):
        vals = []
        per[name] = (P.evaluate_perplexity(net, tok, docs_of(wiki, 2), proto, estimator=name,
                                           estimator_options={**opts, **extra}, batch_size=256,
                                           on_block=lambda b, v, n, vals=vals: vals.append(float(v.mean()))), vals)
    (rv, vv), (rl, vl) = per["mc"], per["legacy_joint"]
    assert rv["bound_kind"] == "upper_bound" and rl["is_bound"] is False and rl["bound_kind"] == "not_a_likelihood"
    assert "NOT a bound" in _render(rl) and "≤" in _render(rv)
    diff = torch.tensor(vv) - torch.tensor(vl)  # paired: same t and masks (same seed)
    assert float(diff.mean()) > 3 * float(diff.std() / math.sqrt(diff.numel()))
    assert rl["results"]["nll"] < rv["results"]["nll"]


def _render(result) -> str:
    from rich.console import Console

    c = Console(record=True, width=160)
    c.print(summary_table(result))
    return c.export_text()


@pytest.mark.parametrize("family,wrap", [("mdm", True), ("prime", False)])
def test_same_seed_same_numbers_at_any_batch_size(wiki, tok, family, wrap):
    net = nets(len(tok))[family]
    proto = P.Protocol(L=24, wrap=wrap, num_samples=2, max_tokens=1200, strata=4, seed=11)
    runs = [P.evaluate_perplexity(net, tok, docs_of(wiki, 3), proto, batch_size=bs)["results"] for bs in (1, 5, 64)]
    for r in runs[1:]:
        for k in ("nll", "nll_stderr", "nll_stderr_sampling", "bits_per_byte"):
            assert r[k] == pytest.approx(runs[0][k], rel=1e-6), k
        assert (r["tokens"], r["blocks"], r["bytes"]) == (runs[0]["tokens"], runs[0]["blocks"], runs[0]["bytes"])
        assert r["nll_ci95_bootstrap"] == pytest.approx(runs[0]["nll_ci95_bootstrap"], rel=1e-6)
    other = P.evaluate_perplexity(net, tok, docs_of(wiki, 3), P.Protocol(**{**proto.__dict__, "seed": 12}))
    assert other["results"]["nll"] != runs[0]["nll"]


def test_stop_rules_do_not_depend_on_batch_size(wiki, tok):
    net = nets(len(tok))["mdm"]
    proto = P.Protocol(L=16, target_se=0.02, min_blocks=8)
    a, b = (P.evaluate_perplexity(net, tok, docs_of(wiki, 2), proto, batch_size=bs)["results"] for bs in (1, 32))
    assert a["stopped"] == b["stopped"] == "target_se" and a["blocks"] == b["blocks"] >= 8
    assert a["nll_stderr_sampling"] <= 0.02 * a["nll"]
    c = P.evaluate_perplexity(net, tok, docs_of(wiki, 2), P.Protocol(L=16, max_tokens=100), batch_size=3)["results"]
    assert c["stopped"] == "max_tokens" and c["tokens"] == 112  # the block that reaches the cap is the last one


# -- statistics ---------------------------------------------------------------------------------------------------
def test_accumulation_batchwise_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    B, K = 50, 3
    values = 100 + 10 * torch.randn(B, K, generator=g, dtype=torch.float64)
    tokens = torch.randint(20, 30, (B,), generator=g).tolist()
    nbytes = [3 * n for n in tokens]
    one = P.perplexity(values, tokens, nbytes)
    parts = [P.PerplexityStats(), P.PerplexityStats(), P.PerplexityStats()]
    for i in range(B):
        parts[0 if i < 7 else 1 if i < 30 else 2].update(values[i], tokens[i], nbytes[i])
    merged = parts[0].merge(parts[1]).merge(parts[2]).compute()
    for k in ("nll", "nll_stderr", "nll_stderr_sampling", "nll_stderr_mc_within", "bits_per_byte", "tokens"):
        assert merged[k] == pytest.approx(one[k], rel=1e-12), k
    # reference formulas (numpy)
    v, n = values.mean(1).numpy(), np.array(tokens, float)
    R = v.sum() / n.sum()
    assert one["nll"] == pytest.approx(R)
    assert one["ppl"] == pytest.approx(math.exp(R))
    assert one["nll_stderr_sampling"] == pytest.approx(np.sqrt(((v - R * n) ** 2).sum() * B / (B - 1)) / n.sum())
    assert one["nll_stderr"] == pytest.approx(np.sqrt((values.var(1).numpy() / K).sum()) / n.sum())
    assert one["bits_per_byte"] == pytest.approx(v.sum() / math.log(2) / sum(nbytes))
    assert one["ppl_ci95"] == pytest.approx([math.exp(R - P.Z95 * one["nll_stderr"]),
                                             math.exp(R + P.Z95 * one["nll_stderr"])])
    k1 = P.perplexity(values[:, :1], tokens)  # K = 1: the between-block SE is the headline
    assert k1["nll_stderr"] == k1["nll_stderr_sampling"] and k1["bits_per_byte"] is None


def test_stratified_times_are_uniform_per_block_and_cover_the_strata():
    u = torch.stack([P.block_uniforms(0, i, 2, 4, P.block_generator(0, 2, i)) for i in range(8)])  # (8, 2)
    for grp in (u[:4], u[4:]):
        assert sorted((grp.flatten() * 8).floor().long().tolist()) == list(range(8))  # one sample per stratum
    many = torch.stack([P.block_uniforms(0, i, 1, 16, P.block_generator(0, 2, i)) for i in range(0, 16 * 400, 16)])
    assert abs(float(many.mean()) - 0.5) < 0.05  # position 0 of each group is not stuck in the first stratum


@pytest.mark.parametrize("family,name,options", [("mdm", "mc", {}), ("mdm", "exact_count", {}), ("mdm", "mc", {"T": 8}),
                                                  ("prime", "mc", {}), ("prime", "exact_count", {}),
                                                  ("prime", "legacy_joint", {"chunk": "0.0_0.5/1_3"})])
def test_ppl_and_score_draw_identical_masks_from_identical_uniforms(wiki, tok, family, name, options):
    """ppl's block rows are the estimator's own rows given the block's stratified u: the same masks as `score` (and
    the sampler) give for the same uniforms. Before, ppl re-implemented the masks and drew exact_count's ranks as a
    float32 rand(K, n) where the estimators use a position-major float64 rand(n, K).T."""
    from prime_eval.estimators.sampler import MaskSampler, position_uniforms

    net = nets(len(tok))[family]
    T = options.pop("T", None)
    proto = P.Protocol(L=12, num_samples=3, strata=4, seed=9, T=T)
    est = P.build_estimator(net, name, eps=proto.eps, T=T, **options)
    block = list(P.BlockStream(docs_of(wiki, 1), tok, L=12, wrap=True, bos_id=0, eos_id=0))[6]
    (ppl,) = P.block_rows(est, block, proto, 3)
    g = P.block_generator(9, 2, block.index)
    u = P.block_uniforms(9, block.index, 3, 4, g)  # the block's uniforms; g is now where ppl's mask draws start
    score = est.rows(block.ids, torch.ones(12, dtype=torch.bool), g, 3, u=u)  # the score path, same uniforms
    ell = getattr(est, "st", None).ell if family == "prime" else 1
    g = P.block_generator(9, 2, block.index)
    P.block_uniforms(9, block.index, 3, 4, g)
    ref = MaskSampler.for_estimator(family, name, eps=est.eps, T=T, chunks=tuple(getattr(est, "chunks", [(0.0, 1)])))
    ref = ref.from_uniforms(u, position_uniforms(g, 3, 12 * ell), 12 * ell)
    for rows in (ppl, score):
        assert torch.equal(rows.inputs == est.mask_id, ref.masks)
        assert torch.equal(rows.data["weights"], ref.weights)


def test_slices_of_a_block_are_cut_from_its_one_draw(wiki, tok):
    """K = 40 samples are scored in slices of 16, 16 and 8 (each cached on its own): the same values as the block's
    rows taken whole, sample by sample (log-softmax is per row: the same value up to round-off)."""
    from prime_eval.estimators import forward_rows

    net = nets(len(tok))["prime"]
    proto = P.Protocol(L=10, num_samples=40, strata=2, seed=4, max_tokens=30)
    seen = {}
    P.evaluate_perplexity(net, tok, docs_of(wiki, 1), proto, batch_size=7,
                          on_block=lambda b, v, n: seen.update({b.index: (b, v)}))
    est = P.build_estimator(net, "mc", eps=proto.eps)
    for block, values in seen.values():
        (whole,) = P.block_rows(est, block, proto, 40)
        (logits,) = forward_rows(net, [whole], 512)
        torch.testing.assert_close(values, est.cost(whole, logits), rtol=1e-6, atol=1e-6)
        parts = P.block_rows(est, block, proto, 40, [(0, 16), (16, 32), (32, 40)])
        assert torch.equal(torch.cat([r.inputs for r in parts]), whole.inputs)


@pytest.mark.parametrize("name", ["levels", "iw"])
def test_ppl_refuses_estimators_it_does_not_know(wiki, tok, name):
    """An estimator object whose masks the protocol does not know is refused (it used to get mc-style masks)."""
    from prime_eval.estimators import get_estimator

    net = nets(len(tok))["mdm"]
    est = get_estimator("mdm", name, mask_id=net.mask_id)
    with pytest.raises(UserError, match=f"estimator '{name}' is not available for perplexity"):
        P.evaluate_perplexity(net, tok, docs_of(wiki, 1), P.Protocol(L=8, max_tokens=40), estimator=est)


# -- streaming ----------------------------------------------------------------------------------------------------
def test_streaming_reads_only_what_it_scores(wiki, tok):
    pulled = []

    def docs():
        for d in docs_of(wiki) * 50:
            pulled.append(len(d))
            yield d

    at_first = []
    res = P.evaluate_perplexity(nets(len(tok))["arm"], tok, docs(), P.Protocol(L=32, max_tokens=2000),
                                on_block=lambda b, v, n: at_first.append(len(pulled)) if not at_first else None,
                                doc_batch=4)
    assert at_first[0] <= 4 and len(pulled) <= 8 and res["results"]["stopped"] == "max_tokens"


class _PassWatch:
    """A network that records, at each forward pass (`hidden`) and each head call, how many earlier head calls' logits
    are still alive (weakrefs to each output: a view keeps its base tensor alive)."""

    def __init__(self, net):
        self.net, self.outputs, self.alive_at_call = net, [], []

    def __getattr__(self, name):
        return getattr(self.__dict__["net"], name)

    def _alive(self) -> int:
        return sum(r() is not None for r in self.outputs)

    def hidden(self, *args, **kwargs):
        self.alive_at_call.append(self._alive())
        return self.net.hidden(*args, **kwargs)

    def head(self, *args, **kwargs):
        self.alive_at_call.append(self._alive())
        out = self.net.head(*args, **kwargs)
        self.outputs.append(weakref.ref(out))
        return out


@pytest.mark.parametrize("family", ["mdm", "prime"])
def test_logits_of_a_pass_are_freed_before_the_next(wiki, tok, family):
    """Memory does not grow with the blocks of a step: the logits of each head call are reduced and released before
    the next head call or pass runs (they used to be held for every row of the step, plus a copy per block). K = 4
    rows per block and 2 rows per pass: every block spans two passes, and with --no-wrap blocks of several lengths
    share a step."""
    net = _PassWatch(nets(len(tok))[family])
    lines = [ln for ln in (wiki / "test.txt").read_text(encoding="utf-8").splitlines() if ln.strip()][:12]
    proto = P.Protocol(L=24, wrap=False, num_samples=4, seed=3)
    ref = P.evaluate_perplexity(net.net, tok, lines, proto, batch_size=64)["results"]
    res = P.evaluate_perplexity(net, tok, lines, proto, batch_size=2)["results"]
    assert len(net.alive_at_call) >= 20 and max(net.alive_at_call) == 0
    assert res["nll"] == pytest.approx(ref["nll"], rel=1e-6) and res["blocks"] == ref["blocks"]


def _peak_block_stream(text: str, tok) -> int:
    def docs():
        for para in text.split("\n \n"):
            yield para

    tracemalloc.start()
    n = sum(1 for _ in P.BlockStream(docs(), tok, L=256, wrap=True, bos_id=0, eos_id=0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n > 0
    return peak


def test_memory_does_not_grow_with_the_corpus(wiki, tok):
    """Peak traced allocations of tokenize + block: 150 kB vs 600 kB of text (benchmarks/ppl_memory.py: RSS, 20 MB)."""
    text = (wiki / "test.txt").read_text(encoding="utf-8")
    small = _peak_block_stream(text[:150_000], tok)
    big = _peak_block_stream(text[:600_000], tok)
    assert big < 1.5 * small + 200_000, (small, big)


# -- a killed run resumes -------------------------------------------------------------------------------------------
_DRIVER = """
import json, os, signal, sys
from prime_eval.networks.lit_gpt import TransEncoder
calls, rows = [0], [0]
hidden = TransEncoder.hidden  # a forward pass of the scorer runs the trunk (`hidden`), then the head
def counted(self, idx, **kw):
    calls[0] += 1
    if calls[0] == int(os.environ.get("KILL_AT_PASS", "0")):  # a real SIGKILL, as the forward pass starts
        json.dump({"passes_done": calls[0] - 1, "rows_done": rows[0]}, open(os.environ["PASSES_FILE"], "w"))
        os.kill(os.getpid(), signal.SIGKILL)
    rows[0] += idx.shape[0]
    return hidden(self, idx, **kw)
TransEncoder.hidden = counted
from prime_eval.cli import main
rc = main(sys.argv[1:])
json.dump({"passes_done": calls[0], "rows_done": rows[0]}, open(os.environ["PASSES_FILE"], "w"))
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def killable(tmp_path_factory, tok, wiki):
    """A tiny lit_gpt MDM checkpoint, its tokenizer, and a runner of `prime-eval ppl` in a subprocess that SIGKILLs
    itself as its N-th forward pass starts (KILL_AT_PASS) and reports the passes it completed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prime_eval.networks.lit_gpt import Config, TransEncoder

    d = tmp_path_factory.mktemp("killable")
    torch.manual_seed(0)
    cfg = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=len(tok), padding_multiple=4,
                 block_size=64)
    torch.save({"model": TransEncoder(cfg).state_dict()}, d / "mdm.pth")
    tok.save_pretrained(d / "tok")
    (d / "driver.py").write_text(_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PASSES_FILE": str(d / "passes.json")}

    def run(out, cache, *extra, kill_at=0):
        args = ["ppl", "--model", "mdm", "--model_args",
                f"checkpoint={d / 'mdm.pth'},tokenizer={d / 'tok'},config=n_head=2,device=cpu",
                "--files", str(wiki / "test.txt"), "--L", "64", "--no-progress", "-o", str(out), *extra]
        if cache is not None:
            args += ["--cache-dir", str(cache)]
        proc = subprocess.run([sys.executable, str(d / "driver.py"), *args], capture_output=True, text=True,
                              env={**env, "KILL_AT_PASS": str(kill_at)}, timeout=600)
        if kill_at:
            assert proc.returncode == -9, proc.stderr[-2000:]
        else:
            assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((d / "passes.json").read_text())

    return d, run


def _numbers(path) -> dict:
    r = json.loads(path.read_text())["results"]
    return {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_second", "cached_blocks")}


@pytest.mark.slow
@pytest.mark.parametrize("extra,kills", [(("--max-tokens", "4000"), (2, 2)),  # the default settings
                                         (("--max-tokens", "640", "--samples", "64", "--eps", "0.3"), (7, 3))])
def test_killed_run_resumes_and_recomputes_only_what_was_lost(killable, extra, kills):
    """SIGKILL as a forward pass starts, twice, then a rerun to the end: every block (or 16-sample slice of a block)
    whose passes had finished was stored, so the reruns run only the passes not done before (lost work: the pass in
    progress, whatever K and the batch size), and the final numbers equal an uninterrupted run's. With K = 64 a block
    spans four passes of the default 16 rows: it used to be stored only when all four were done."""
    from prime_eval.cache import count_entries

    d, run = killable
    tag = "k" + str(len(extra))
    whole = run(d / f"{tag}_ref.json", None, *extra)
    cache, out = d / f"{tag}_cache", d / f"{tag}_out.json"
    done = 0
    for kill_at in kills:
        before = count_entries(cache) if cache.exists() else 0
        killed = run(out, cache, *extra, kill_at=kill_at)
        assert not out.exists() and count_entries(cache) > before
        done += killed["passes_done"]
    stored = count_entries(cache)
    rest = run(out, cache, *extra)
    assert rest["passes_done"] == whole["passes_done"] - done  # only what was not stored is computed
    if "--samples" not in extra:  # one slice per block: every stored block is reused
        assert json.loads(out.read_text())["results"]["cached_blocks"] == stored
    assert _numbers(out) == _numbers(d / f"{tag}_ref.json")


# -- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_end_to_end_with_a_lit_gpt_checkpoint(tmp_path, wiki, tok, capsys):
    from prime_eval import cli
    from prime_eval.networks.lit_gpt import GPT, Config, TransEncoder

    V = len(tok)
    cfg = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=V, padding_multiple=4,
                 block_size=64)
    tok.save_pretrained(tmp_path / "tok")
    for fam, net in (("arm", GPT(cfg)), ("mdm", TransEncoder(cfg))):
        torch.save({"model": net.state_dict()}, tmp_path / f"{fam}.pth")
        out = tmp_path / f"{fam}.json"
        rc = cli.main(["ppl", "--model", fam, "--model_args",
                       f"checkpoint={tmp_path / f'{fam}.pth'},tokenizer={tmp_path / 'tok'},config=n_head=2,device=cpu",
                       "--files", str(wiki / "test.txt"), "--L", "32", "--max-tokens", "400", "--no-progress",
                       "--output", str(out)] + (["--samples", "2"] if fam == "mdm" else []))
        assert rc == 0
        res = json.loads(out.read_text())
        assert res["kind"] == "prime-eval/ppl" and res["version"] == 1 and res["model"]["family"] == fam
        assert len(res["model"]["checkpoint_sha256"]) == 64 and res["versions"]["torch"]
        for k in ("dataset", "split", "text_field", "tokenizer", "L", "wrap", "estimator", "estimator_options",
                  "num_samples", "eps", "T", "seed", "max_tokens", "target_se"):
            assert k in res["protocol"], k
        for k in ("nll", "nll_stderr", "nll_ci95", "ppl", "ppl_ci95", "bits_per_byte", "tokens", "blocks", "bytes",
                  "dropped_tokens"):
            assert k in res["results"], k
        assert res["is_bound"] is True and res["protocol"]["L"] == 32
    assert "perplexity" in capsys.readouterr().out
    assert cli.main(["ppl", "--model", "mdm", "--model_args", "checkpoint=x.pth,bogus=1", "--files", "a.txt"]) == 2
