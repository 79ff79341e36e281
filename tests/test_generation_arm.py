"""ARM generation: lm-eval `hf`'s generate_until answers, for a Hugging Face model and for the same weights in lit_gpt
form, on a generative task over local data (boolq-seq2seq); stop strings, max_gen_toks, left truncation, EOS;
key/value-cache decoding equal to full passes; sampling that depends on the seed and never on the batch."""
from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from model_adapters import ARMLM
from prime_eval.errors import UserError
from prime_eval.generation import GenRequest, generate
from prime_eval.networks.kv_cache import supports_kv_cache
from test_networks import _randomise as _peaked  # weights of a trained model's scale: no near-ties

TASK = "boolq-seq2seq"


@pytest.fixture(scope="module")
def llama_dirs(shared_data, tmp_path_factory):
    """A tiny Llama (grouped-query attention 4/2, tied embeddings, RoPE base 1e5) with the Llama-2 tokenizer, saved
    by transformers, and the same weights converted to the lit_gpt layout (with the model's config.json)."""
    from safetensors.torch import save_file
    from test_checkpoints import _llama_to_lit_gpt
    from transformers import LlamaConfig, LlamaForCausalLM

    from prime_eval.checkpoints import load_tokenizer

    root = tmp_path_factory.mktemp("llama")
    hc = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    hf = _peaked(LlamaForCausalLM(hc), std=0.15)
    hf_dir, lit_dir = root / "hf", root / "lit"
    hf.save_pretrained(hf_dir)
    load_tokenizer(shared_data / "tokenizers" / "llama2").save_pretrained(hf_dir)
    lit_dir.mkdir()
    hc.to_json_file(str(lit_dir / "config.json"))
    save_file(_llama_to_lit_gpt(hf), str(lit_dir / "model.safetensors"))
    return hf_dir, lit_dir


@pytest.fixture(scope="module")
def gpt2_dir(shared_data, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from prime_eval.checkpoints import load_tokenizer

    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    _peaked(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=512)), std=0.3).save_pretrained(d)
    load_tokenizer(shared_data / "tokenizers" / "gpt2").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def task_manager(shared_data, tmp_path_factory):
    from prime_eval.tasks import build_task_manager

    return build_task_manager(shared_data, [TASK], cache_dir=tmp_path_factory.mktemp("offline_tasks"))


def _hf(path):
    return ("hf", f"pretrained={path},dtype=float32")


def _evaluate(model, task_manager, gen_kwargs="max_gen_toks=12", limit=8):
    """{doc_id: answer} of an lm-eval run of TASK (model: an LM, or ("hf", model_args))."""
    import lm_eval

    name, args = model if isinstance(model, tuple) else (model, None)
    res = lm_eval.simple_evaluate(model=name, model_args=args, tasks=[TASK], task_manager=task_manager, limit=limit,
                                  log_samples=True, bootstrap_iters=0, gen_kwargs=gen_kwargs, batch_size=4,
                                  device="cpu")
    return {s["doc_id"]: s["resps"][0][0] for s in res["samples"][TASK]}, res


def test_greedy_answers_equal_lm_eval_hf_for_hf_and_lit_gpt_weights(llama_dirs, task_manager):
    """The issue's parity check: identical generated strings on boolq-seq2seq (long passages, stop at a newline)."""
    hf_dir, lit_dir = llama_dirs
    ref, _ = _evaluate(_hf(hf_dir), task_manager)
    assert len(ref) == 8 and len(set(ref.values())) > 1 and all(ref.values())
    for lm in (ARMLM(checkpoint=str(hf_dir), device="cpu", rows_per_pass=3),
               ARMLM(checkpoint=str(lit_dir), tokenizer=str(hf_dir), device="cpu")):
        assert supports_kv_cache(lm.net)
        ours, res = _evaluate(lm, task_manager)
        assert ours == ref, type(lm.net).__name__
        gen = res["config"]["prime_eval"]["generation"]
        assert gen["sampler"] == "arm" and gen["kv_cache"] is True and gen["max_gen_toks"] == 256
        rows = [r for r in lm.stats if r.get("kind") == "generate_until"]
        assert len(rows) == 8 and all(r["generated_tokens"] <= 12 and r["stop"] in ("length", "stop", "eos")
                                      for r in rows)
        assert all(r["forward_passes"] == r["generated_tokens"] + (r["stop"] == "eos") - (r["stop"] == "length")
                   + 1 for r in rows)


def test_stop_strings_eos_and_truncation_equal_hf(gpt2_dir):
    """Stop strings met mid-answer, EOS as a stop, prompts longer than max_length - max_gen_toks (left-truncated and
    counted), lm-eval's batching of different gen_kwargs: every answer equals `hf`'s."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(gpt2_dir), max_length=40, batch_size=3, device="cpu", dtype="float32")
    ours = ARMLM(checkpoint=str(gpt2_dir), max_length=40, device="cpu", rows_per_pass=2)
    prompts = ["Question: why is the sky blue?\nAnswer:", "Once upon a time", "a " * 60 + "end", "The",
               "Paris is the capital of"]
    free = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 10}), 0, ("t", i, 1))
            for i, p in enumerate(prompts)]
    texts = hf.generate_until(free)
    assert ours.generate_until(free) == texts
    # stop strings cut from the answers themselves: they occur mid-answer
    stops = [t[3:6] if len(t) > 6 else "\n" for t in texts]
    cut = [Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 10}), 0, ("t", i, 1))
           for i, (p, s) in enumerate(zip(prompts, stops))]
    got = ours.generate_until(cut)
    assert got == hf.generate_until(cut) and any(len(g) < len(t) for g, t in zip(got, texts))
    gen_rows = [r for r in ours.stats if r.get("kind") == "generate_until"]
    assert any(r["stop"] == "stop" for r in gen_rows[-5:]) and gen_rows[2]["truncated_tokens"] > 0
    assert ours.truncated_requests >= 2
    with pytest.raises(UserError, match="no room for the prompt"):
        ours.generate_until([Instance("generate_until", {}, ("x", {"max_gen_toks": 40}), 0, ("t", 0, 1))])


def test_gen_kwargs_errors(gpt2_dir):
    lm = ARMLM(checkpoint=str(gpt2_dir), device="cpu")
    for kwargs, needle in (({"until": ["\n"], "num_beams": 4}, "num_beams"),
                           ({"do_sample": True, "temperature": 0.0}, "temperature > 0"),
                           ({"top_p": 1.5, "do_sample": True, "temperature": 1.0}, "top_p"),
                           ({"max_length": 30}, "max_gen_toks")):
        with pytest.raises(UserError, match=needle):
            lm.generate_until([Instance("generate_until", {}, ("a", kwargs), 0, ("t", 0, 1))])


@pytest.fixture(scope="module")
def lit_gpt_net():
    from prime_eval.networks.lit_gpt import GPT, Config

    torch.manual_seed(0)
    return _peaked(GPT(Config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=48, vocab_size=60,
                              block_size=128, rope_bf16=False)), std=0.3)


def test_cached_decoding_equals_full_passes(lit_gpt_net):
    """Greedy decoding over the key/value cache (prompts left-padded to their bucket) gives the tokens of full
    forward passes, and its logits agree to fp32 precision."""
    net = lit_gpt_net
    reqs = [GenRequest(tuple(range(3, 3 + n)), 15, seed=0, stop_ids=()) for n in (1, 5, 33, 40)]
    got = generate("arm", net, reqs, rows_per_pass=8)
    for r, g in zip(reqs, got):
        seq = list(r.prompt)
        for t in g.tokens:
            with torch.no_grad():
                logits = net(torch.tensor([seq]))[0, -1]
            assert int(logits.argmax()) == t
            seq.append(t)
        assert len(g.tokens) == 15 and g.stop == "length" and g.forward_passes == 15


def test_sampling_depends_on_the_seed_not_on_the_batch(lit_gpt_net):
    """temperature 1 (the most sensitive case): each request alone, all together, shuffled, or with another pack
    gives the same tokens (pack=request: the same bits whatever the batch); another seed gives other tokens;
    top_k=1 is greedy."""
    net = lit_gpt_net
    reqs = [GenRequest(tuple(range(2, 2 + n)), 12, seed=s, temperature=1.0) for s, n in
            enumerate((3, 9, 9, 31, 35, 4))]
    alone = [generate("arm", net, [r], pack="request")[0] for r in reqs]
    per_request = generate("arm", net, reqs, pack="request")
    assert [g.tokens for g in per_request] == [g.tokens for g in alone]
    together = generate("arm", net, reqs, rows_per_pass=64)  # padded batches: the same tokens (no near tie here)
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    order = [3, 0, 5, 1, 4, 2]
    shuffled = generate("arm", net, [reqs[i] for i in order], rows_per_pass=2, pack="length")
    assert [shuffled[order.index(i)].tokens for i in range(len(reqs))] == [g.tokens for g in together]
    reseeded = generate("arm", net, [GenRequest(r.prompt, 12, seed=r.seed + 100, temperature=1.0) for r in reqs])
    assert [g.tokens for g in reseeded] != [g.tokens for g in together]
    greedy = generate("arm", net, [GenRequest(r.prompt, 12, seed=r.seed) for r in reqs])
    top1 = generate("arm", net, [GenRequest(r.prompt, 12, seed=r.seed, temperature=1.0, top_k=1) for r in reqs])
    assert [g.tokens for g in top1] == [g.tokens for g in greedy]


def _causal_networks():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from prime_eval.networks.hf_causal import HFCausalLM
    from prime_eval.networks.lit_gpt import GPT, Config
    from prime_eval.networks.mdlm_dit import AR, DiTConfig
    from prime_eval.networks.megatron import GPTModel, MegatronConfig

    torch.manual_seed(0)
    return {
        "lit_gpt": GPT(Config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=48, vocab_size=60,
                              block_size=64, rope_bf16=True)),
        "mdlm_ar": AR(DiTConfig(hidden_size=32, n_blocks=2, n_heads=2, vocab_size=60, length=64)),
        "megatron": GPTModel(MegatronConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                            ffn_hidden_size=64, vocab_size=60, seq_length=64)),
        "hf_gpt2": HFCausalLM(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60,
                                                         n_positions=64, bos_token_id=0, eos_token_id=0))),
        "hf_llama": HFCausalLM(LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, max_position_embeddings=64,
                                                            bos_token_id=0, eos_token_id=0)))}


@pytest.mark.parametrize("name", ["lit_gpt", "mdlm_ar", "megatron", "hf_gpt2", "hf_llama"])
def test_kv_cache_and_packed_passes_equal_full_passes(name):
    """Every causal network: a left-padded prefill, token-by-token extension over the cache (rows selected from it)
    and the packed passes of scoring (`Parts`) give the logits of plain full passes (fp32 tolerance)."""
    from prime_eval.networks.kv_cache import Parts, supports_packed_passes

    net = _peaked(_causal_networks()[name], std=0.2)
    assert supports_kv_cache(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 60, (3, 20), generator=g)
    with torch.no_grad():
        full = net(x)  # (3, 20, V)
    idx = torch.cat([torch.zeros(3, 4, dtype=torch.long), x[:, :12]], 1)  # rows 1, 2 left-padded by 4
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[1:, :4] = False
    idx[0] = x[0, :16]
    logits, cache = net.forward_cached(idx, None, valid=valid)
    torch.testing.assert_close(logits[0], full[0, :16], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1:, 4:], full[1:, :12], rtol=1e-4, atol=1e-4)
    cache = cache.select(torch.tensor([2, 1]))  # rows reordered and one dropped
    for t in range(12, 20):
        step, cache = net.forward_cached(x[[2, 1], t:t + 1], cache)
        torch.testing.assert_close(step[:, 0], full[[2, 1], t], rtol=1e-4, atol=1e-4)
    # scoring's layout: context x[0, :8] once, continuations x[0, 8:14] and x[1, 8:11] (as if after that context),
    # then the fill of a pass of 24 slots; each part attends to its prefix and causally to itself
    assert supports_packed_passes(net)
    idx = torch.cat([x[0, :14], x[1, 8:11], torch.zeros(7, dtype=torch.long)])[None]
    pos = torch.cat([torch.arange(14), torch.arange(8, 11), torch.zeros(7, dtype=torch.long)])[None]
    valid = torch.arange(24)[None] < 17
    parts = Parts(((0, 8, 0, 0), (8, 6, 0, 8), (14, 3, 0, 8)))
    with torch.no_grad():
        packed, kept = net.forward_cached(idx, None, valid=valid, explicit=(pos, parts))
        assert kept is None  # a packed pass keeps no cache, and asking for one is an error, on every network
        with pytest.raises(ValueError, match="keep_cache=False"):
            net.hidden_cached(idx, None, valid=valid, explicit=(pos, parts), keep_cache=True)
        alone = net(torch.cat([x[:1, :8], x[1:2, 8:11]], 1))
    torch.testing.assert_close(packed[0, :14], full[0, :14], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[0, 14:17], alone[0, 8:11], rtol=1e-4, atol=1e-4)
