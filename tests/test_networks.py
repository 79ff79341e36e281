"""Networks against independent references: lit_gpt vs transformers' Llama, the network contract (logits_at, right
padding, causality) for every architecture, upstream FLOPs parameter counts, and the Prime embedding rules."""
from __future__ import annotations

import pytest
import torch

from prime_eval.networks import lit_gpt
from prime_eval.networks.hf_causal import HFCausalLM
from prime_eval.networks.lit_gpt import GPT, Config, TransEncoder
from prime_eval.networks.mdlm_dit import AR, DIT, DiTConfig, PerceiverDIT


def _randomise(net, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))
    return net.eval()


TINY = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=96, vocab_size=100, block_size=64)


# ------------------------------------------------------------------------------------------------ Llama parity


def _to_llama(net: lit_gpt._LitBase, *, causal: bool):
    """Convert a lit_gpt state dict to transformers' LlamaForCausalLM (an implementation nobody here wrote)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = net.config
    H, g, hs, d = cfg.n_head, cfg.n_query_groups, cfg.head_size, cfg.n_embd
    hc = LlamaConfig(vocab_size=cfg.padded_vocab_size, hidden_size=d, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.n_layer, num_attention_heads=H, num_key_value_heads=g,
                     rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.block_size,
                     tie_word_embeddings=cfg.tie_embeddings,
                     rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)})
    hc._attn_implementation = "eager"
    hf = LlamaForCausalLM(hc).eval()
    sd, q = net.state_dict(), H // g
    new = {"model.norm.weight": sd["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        new["lm_head.weight"] = sd["lm_head.weight"]
    new["model.embed_tokens.weight"] = (sd["transformer.wte.weight"] if causal
                                        else hf.model.embed_tokens.weight.detach())  # encoder embeds itself
    for i in range(cfg.n_layer):
        p, o = f"transformer.h.{i}.", f"model.layers.{i}."
        W = sd[p + "attn.attn.weight"].view(g, q + 2, hs, d)  # per group: q heads, k, v
        new[o + "self_attn.q_proj.weight"] = W[:, :q].reshape(H * hs, d)
        new[o + "self_attn.k_proj.weight"] = W[:, q].reshape(g * hs, d)
        new[o + "self_attn.v_proj.weight"] = W[:, q + 1].reshape(g * hs, d)
        new.update({o + hf_name: sd[p + lit] for lit, hf_name in lit_gpt.LLAMA_BLOCK_KEYS.items()})
    hf.load_state_dict(new, strict=not cfg.tie_embeddings)  # tied: lm_head.weight is embed_tokens.weight
    return hf


@pytest.mark.parametrize("n_query_groups", [4, 2])
def test_gpt_equals_llama_for_causal_lm(n_query_groups):
    net = _randomise(GPT(Config(**TINY, n_query_groups=n_query_groups, rope_bf16=False)))
    hf = _to_llama(net, causal=True)
    x = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = net(x), hf(x).logits[..., :100]
    assert ours.shape == (2, 24, 100)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_tied_gpt_equals_tied_llama_and_counts_the_head_once():
    cfg = Config(**TINY, n_query_groups=2, rope_bf16=False, rope_base=100000, tie_embeddings=True)
    net = _randomise(GPT(cfg))
    assert "lm_head.weight" not in net.state_dict()
    hf = _to_llama(net, causal=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in hf.parameters())
    x = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), hf(x).logits[..., :100], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ARM"):
        TransEncoder(cfg)


@pytest.mark.parametrize("rows,n_embd,n_head,g", [(3 * 64, 64, 4, 4), (128, 64, 4, 2), (96, 64, 4, 1),
                                                  (15 * 8, 72, 9, 3), (192, 64, 5, None), (130, 64, 4, None),
                                                  (64, 64, 4, None), (168, 72, 6, None)])
def test_query_groups_from_qkv_rows(rows, n_embd, n_head, g):
    """g = (rows/hs − H)/2 with hs = d/H; None where no g ≥ 1 dividing H fits (64 rows, 4 heads: g = 0; 168 rows,
    6 heads of 12: g = 4 does not divide 6; 5 heads do not divide d = 64)."""
    assert lit_gpt.query_groups_from_qkv_rows(rows, n_embd, n_head) == g


@pytest.mark.parametrize("ell", [1, 7])
def test_trans_encoder_equals_llama_layers_without_causal_mask(ell):
    net = _randomise(TransEncoder(Config(**TINY, n_query_groups=2, rope_bf16=False), ell=ell))
    hf = _to_llama(net, causal=False)
    for layer in hf.model.layers:
        layer.self_attn.is_causal = False  # eager attention with no mask: bidirectional
    L = 12
    hi = 2 if ell > 1 else 101
    x = torch.randint(0, hi + 1, (2, L * ell), generator=torch.Generator().manual_seed(2))  # includes the mask id
    with torch.no_grad():
        h = net.embed(x)  # (B, L, d): our embedding is the thing not in Llama
        pos = torch.arange(L)[None]
        cos_sin = hf.model.rotary_emb(h, pos)
        for layer in hf.model.layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        ref = hf.lm_head(hf.model.norm(h))[..., :100]
        ours = net(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # and the encoder really is bidirectional: changing the last token moves the first position's logits
    x2 = x.clone()
    x2[:, -ell:] = (x2[:, -ell:] + 1) % hi
    with torch.no_grad():
        assert (net(x2)[:, 0] - ours[:, 0]).abs().max() > 1e-4


def test_rope_bf16_table_is_a_small_perturbation():
    a = _randomise(GPT(Config(**TINY, rope_bf16=False)))
    b = GPT(Config(**TINY, rope_bf16=True)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = a(x)
        d = (ref - b(x)).abs().max() / ref.abs().max()  # relative to the logit scale
    assert 0 < d < 2e-2


# ------------------------------------------------------------------------------------------------ upstream facts


@pytest.mark.parametrize("name", list(lit_gpt.DIFF_LLAMA_CONFIGS))
def test_named_config_param_counts_match_upstream_flops_table(name):
    expected = lit_gpt.DIFF_LLAMA_CONFIGS[name][-1]
    cfg = Config.from_name(name)
    assert cfg.padded_vocab_size == 32000 and cfg.non_embedding_params() == expected
    with torch.device("meta"):
        net = GPT(cfg)
    emb = net.transformer.wte.weight.numel() + net.lm_head.weight.numel()
    assert sum(p.numel() for p in net.parameters()) - emb == expected


def test_released_prime_and_mdm_shapes():
    cfg = Config.from_name("1028")
    with torch.device("meta"):
        prime, mdm = TransEncoder(cfg, ell=15, base=2), TransEncoder(cfg)
    assert tuple(prime.transformer.wte.weight.shape) == (45, 1792) and prime.mask_id == 2
    assert tuple(mdm.transformer.wte.weight.shape) == (32001, 1792) and mdm.mask_id == 32000
    assert tuple(prime.transformer.h[0].attn.attn.weight.shape) == (5376, 1792)
    with torch.device("meta"):
        assert TransEncoder(cfg, ell=15).base == 2  # b = ⌈32000^(1/15)⌉


def test_mdlm_small_matches_mdlm_owt_size_and_ema_order():
    with torch.device("meta"):
        net = DIT(DiTConfig.from_name("small"))
    n = sum(p.numel() for p in net.parameters())
    assert abs(4 * n - 679e6) < 2e6  # kuleshov-group/mdlm-owt model.safetensors is 679 MB of fp32
    names = [k for k, _ in net.named_parameters()]
    assert names[:5] == ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias",
                         "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    assert names[5:15] == [f"blocks.0.{k}" for k in ("norm1.weight", "attn_qkv.weight", "attn_out.weight",
                                                       "norm2.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                                       "mlp.2.bias", "adaLN_modulation.weight",
                                                       "adaLN_modulation.bias")]
    assert names[-5:] == ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
                          "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]
    with torch.device("meta"):
        p = PerceiverDIT(DiTConfig.from_name("small"), ell=2)
    assert p.base == 225 and tuple(p.vocab_embed.embedding.shape) == (226, 384)


def test_prime_embedding_offset_rule():
    net = _randomise(TransEncoder(Config(**TINY), ell=7, base=2))
    x = torch.full((1, 3 * 7), 2)  # every digit masked
    wte = net.transformer.wte.weight
    expected = sum(wte[2 + 3 * j] for j in range(7))
    torch.testing.assert_close(net.embed(x)[0], expected.expand(3, -1))


# ------------------------------------------------------------------------------------------------ the contract


def _dit_cfg():
    return DiTConfig(hidden_size=64, n_blocks=2, n_heads=4, cond_dim=16, length=64, vocab_size=50)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, tie_word_embeddings=False)
    return HFCausalLM(LlamaForCausalLM(hc).eval(), vocab_size=60)


NETS = {
    "lit_gpt-arm": (lambda: GPT(Config(**TINY)), 100, 1),
    "lit_gpt-mdm": (lambda: TransEncoder(Config(**TINY)), 129, 1),
    "lit_gpt-prime": (lambda: TransEncoder(Config(**TINY), ell=7, base=2), 3, 7),
    "dit-mdm": (lambda: DIT(_dit_cfg()), 51, 1),
    "dit-arm": (lambda: AR(_dit_cfg()), 51, 1),
    "dit-prime": (lambda: PerceiverDIT(_dit_cfg(), ell=2), 9, 2),
    "dit-prime-carry": (lambda: PerceiverDIT(_dit_cfg(), ell=2, carry_over=True), 9, 2),
    "hf-llama": (lambda: _tiny_llama(), 64, 1),
}


@pytest.mark.parametrize("name", list(NETS))
def test_contract_logits_at_and_right_padding(name):
    make, hi, ell = NETS[name]
    net = make()
    if not name.startswith("hf"):
        _randomise(net, std=0.1)
    assert {"family", "vocab_size", "mask_id", "ell", "base", "max_length"} <= set(dir(net))
    g = torch.Generator().manual_seed(3)
    L, pad = 10, 4
    x = torch.randint(0, hi, (2, L * ell), generator=g)
    with torch.no_grad():
        full = net(x)
        assert full.shape == (2, L, net.vocab_size) and full.dtype == torch.float32
        at = torch.rand(2, L, generator=g) < 0.4
        torch.testing.assert_close(net(x, logits_at=at), full[at])
        # right padding with junk + attention_mask: identical logits at the real positions
        xp = torch.cat([x, torch.randint(0, hi, (2, pad * ell), generator=g)], dim=1)
        am = torch.zeros(2, L + pad, dtype=torch.bool)
        am[:, :L] = True
        padded = net(xp, attention_mask=am)
        torch.testing.assert_close(padded[:, :L], full, atol=1e-5, rtol=1e-5)
        at_p = torch.zeros(2, L + pad, dtype=torch.bool)
        at_p[:, :L] = at
        torch.testing.assert_close(net(xp, attention_mask=am, logits_at=at_p), full[at], atol=1e-5, rtol=1e-5)
        # causality: ARMs ignore the future, the others do not
        x2 = x.clone()
        x2[:, -ell:] = (x2[:, -ell:] + 1) % hi
        moved = (net(x2)[:, 0] - full[:, 0]).abs().max()
    assert (moved == 0) if net.family == "arm" else (moved > 1e-5)


def _megatron(cls, **kw):
    from prime_eval.networks.megatron import MegatronConfig

    return cls(MegatronConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=100,
                              seq_length=64, **kw))


def _oracle():
    from prime_eval.networks.toy import OracleDenoiser
    from prime_eval.subtokenizer import SubTokenizer

    return OracleDenoiser(torch.softmax(torch.randn(20, generator=torch.Generator().manual_seed(1)), 0),
                          SubTokenizer(20, ell=3, base=3))


def _halves_nets() -> dict:
    from prime_eval.networks.megatron import GPTModel, MaskedDiffModel
    from prime_eval.networks.toy import TinyDenoiser

    return {**NETS,
            "megatron-arm": (lambda: _megatron(GPTModel), 100, 1),
            "megatron-prime": (lambda: _megatron(MaskedDiffModel, target_length=2, base=10), 11, 2),
            "toy-prime": (lambda: TinyDenoiser("prime", 20, ell=3, base=3), 4, 3),
            "oracle-prime": (_oracle, 4, 3)}


@pytest.mark.parametrize("name", list(_halves_nets()))
def test_contract_forward_is_the_head_of_the_hidden_states(name):
    """forward = head ∘ hidden (docs/ARCHITECTURE.md): `hidden` at `at` is hidden's rows there; the head is
    position-wise (a row's logits do not depend on the rows beside it, up to the float rounding of another shape);
    a cached pass's hidden states are what `forward_cached` puts through the head, with or without keeping the cache."""
    from prime_eval.networks.contract import position_inputs
    from prime_eval.networks.kv_cache import supports_kv_cache

    make, hi, ell = _halves_nets()[name]
    net = make()
    if not name.startswith(("hf", "toy", "oracle")):
        _randomise(net, std=0.1)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, hi, (3, 9 * ell), generator=g)
    at = torch.rand(3, 9, generator=g) < 0.5
    with torch.no_grad():
        h = net.hidden(x, at=at)  # (N, d)
        assert torch.equal(h, net.hidden(x)[at])
        inputs = position_inputs(x, ell, at)  # (N, ℓ)
        logits = net(x, logits_at=at)
        assert torch.equal(logits, net.head(h, inputs)) and logits.shape == (int(at.sum()), net.vocab_size)
        one_by_one = torch.cat([net.head(h[i:i + 1], inputs[i:i + 1]) for i in range(h.shape[0])])
        torch.testing.assert_close(one_by_one, logits, rtol=1e-5, atol=1e-5)
        if supports_kv_cache(net):
            lg, cache = net.forward_cached(x, logits_at=at)
            hc, kept = net.hidden_cached(x, at=at)
            hn, none = net.hidden_cached(x, at=at, keep_cache=False)
            assert torch.equal(lg, net.head(hc)) and torch.equal(hn, hc) and none is None
            assert len(kept.keys) == len(cache.keys) and all(torch.equal(a, b) for a, b in zip(kept.keys, cache.keys))


def test_hf_model_whose_logits_are_not_its_head_is_refused():
    """`HFCausalLM.head` is the output embeddings plus the post-processing it knows (soft-capping, logit scales);
    a model that changes its logits some other way is refused once, at its first pass, instead of scored wrong."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    hc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     max_position_embeddings=64)
    torch.manual_seed(0)
    net = HFCausalLM(Scaled(hc).eval())
    with pytest.raises(ValueError, match="not its output layer applied to its last hidden states"):
        net(torch.tensor([[1, 2, 3]]))
    capped = LlamaConfig(**{**hc.to_dict(), "final_logit_softcapping": 2.0})

    class Capped(LlamaForCausalLM):  # what Gemma 2 does after its output layer
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = torch.tanh(out.logits / 2.0) * 2.0
            return out

    net = HFCausalLM(Capped(capped).eval())
    with torch.no_grad():
        torch.testing.assert_close(net(torch.tensor([[1, 2, 3]])), net.model(torch.tensor([[1, 2, 3]])).logits)


def test_perceiver_carry_over_masks_inconsistent_classes():
    net = _randomise(PerceiverDIT(_dit_cfg(), ell=2, carry_over=True), std=0.1)  # V = 50, b = 8
    plain = PerceiverDIT(_dit_cfg(), ell=2).eval()
    plain.load_state_dict(net.state_dict())
    x = torch.tensor([[8, 8, 3, 8, 6, 1]])  # token 0 fully masked, token 1 first digit 3, token 2 observed 6·8+1
    with torch.no_grad():
        a, b = net(x)[0], plain(x)[0]
    torch.testing.assert_close(a[0], b[0])  # nothing observed: unchanged
    ok1 = (a[1] > -1e30).nonzero().squeeze(1)
    assert ok1.tolist() == list(range(24, 32))  # classes 3·8 + (0..7)
    assert (a[2] > -1e30).nonzero().squeeze(1).tolist() == [49]
