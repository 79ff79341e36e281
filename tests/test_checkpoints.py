"""Checkpoint loading: tiny random networks saved in each upstream file format load back with identical logits;
detection from shapes; EMA; strict-load errors; tokenizers; content hash; the `inspect` subcommand."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from prime_eval.checkpoints import checkpoint_sha256, inspect_checkpoint, load_network, load_tokenizer
from prime_eval.errors import UserError
from prime_eval.networks.lit_gpt import GPT, LLAMA_BLOCK_KEYS, Config, TransEncoder
from prime_eval.networks.mdlm_dit import AR, DIT, DiTConfig, PerceiverDIT

TINY = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=96, vocab_size=100)
TINY_OPT = {"n_head": 4, "vocab_size": 100}


def _rand(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def _same_network(a, b, x):
    """The load itself is checked exactly (every tensor bit for bit); the forward passes of the two copies only to
    fp32 tolerance (assert_close's fp32 default, rtol 1.3e-6 / atol 1e-5): the same code on differently allocated
    tensors may take other kernel paths and differ in the last bits (8.9e-8 observed on an AMD EPYC)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1.3e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------ family A: lit_gpt


@pytest.mark.parametrize("kind", ["arm", "mdm", "prime"])
def test_lit_gpt_roundtrip(tmp_path, kind):
    cfg = Config(**TINY)
    net = _rand({"arm": lambda: GPT(cfg), "mdm": lambda: TransEncoder(cfg),
                 "prime": lambda: TransEncoder(cfg, ell=7, base=2)}[kind]())
    if kind == "prime":  # released Prime-v2: torch pickle {"model": sd} (+ extra entries), Fabric prefix tolerated
        path = tmp_path / "prime.pth"
        torch.save({"model": {"_forward_module." + k: v for k, v in net.state_dict().items()}, "iter_num": 3}, path)
    else:  # SMDM baselines: flat safetensors
        path = tmp_path / f"{kind}.safetensors"
        save_file(net.state_dict(), str(path))
    loaded, info = load_network(path, config=TINY_OPT)
    assert type(loaded) is type(net) and info["family"] == kind == loaded.family
    assert info["format"] == ("torch" if kind == "prime" else "safetensors")
    assert info["params"] == sum(p.numel() for p in net.parameters())
    assert (info["ell"], info["base"], info["needs_permutation"]) == ((7, 2, True) if kind == "prime" else (1, None, False))
    assert info["mask_id"] == {"arm": None, "mdm": 128, "prime": 2}[kind]
    x = torch.randint(0, 3 if kind == "prime" else 100, (2, 21 if kind == "prime" else 9))
    _same_network(net, loaded, x)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_named_config_and_release_shapes_detected(tmp_path):
    """A Diff_LLaMA_6M Prime file with the released 45-row table: n_head from the name, ℓ/b ambiguity reported."""
    net = TransEncoder(Config.from_name("6M"), ell=15, base=2).eval()
    path = tmp_path / "prime6m.pth"
    torch.save({"model": net.state_dict()}, path)
    info = inspect_checkpoint(path)
    assert info["config"] == "Diff_LLaMA_6M" and info["dims"]["n_head"] == 4
    assert info["non_embedding_params"] == 6_294_784 and info["vocab_size"] == 32000
    assert (info["ell"], info["base"], info["mask_id"]) == (15, 2, 2)
    assert info["ell_candidates"] == [[15, 2], [9, 4], [5, 8]] and "not unique" in info["notes"][0]
    assert info["permutation"] == "perm_32768.pt" and "Llama-2" in info["tokenizer"]
    assert inspect_checkpoint(path, ell=9)["base"] == 4


# ------------------------------------------------------------------------------------------------ family B: MDLM


def _save_lightning(tmp_path, name, net, hp_prime, ema_shift=0.5, ema_drop=0):
    """A Lightning-style checkpoint: backbone.-prefixed state_dict, EMA shadow list, hydra config objects."""
    mod = types.ModuleType("omegaconf_fake")

    class DictConfig:  # pickled by reference to a module that will be gone at load time
        def __init__(self, content):
            self._content = content

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf_fake", "DictConfig"
    mod.DictConfig = DictConfig
    sys.modules["omegaconf_fake"] = mod
    try:
        hp = {"config": DictConfig({"prime": DictConfig(hp_prime), "model": DictConfig({"n_heads": 4}),
                                    "backbone": "dit"}),
              "tokenizer": DictConfig({"opaque": object.__new__(DictConfig)})}
        ckpt = {"state_dict": {"backbone." + k: v for k, v in net.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 10,
                        "shadow_params": [p.detach() + ema_shift for p in net.parameters()][:-ema_drop or None]},
                "hyper_parameters": hp, "optimizer_states": [], "epoch": 3, "global_step": 10,
                "pytorch-lightning_version": "2.0.0"}
        path = tmp_path / f"{name}.ckpt"
        torch.save(ckpt, path)
    finally:
        del sys.modules["omegaconf_fake"]
    return path


def _dit_cfg():
    return DiTConfig(hidden_size=64, n_blocks=2, n_heads=4, cond_dim=16, length=64, vocab_size=50)


@pytest.mark.parametrize("kind", ["mdm", "arm", "prime", "prime-co"])
def test_lightning_ckpt_roundtrip_with_ema(tmp_path, kind):
    cfg = _dit_cfg()
    net = _rand({"mdm": lambda: DIT(cfg), "arm": lambda: AR(cfg), "prime": lambda: PerceiverDIT(cfg, ell=2),
                 "prime-co": lambda: PerceiverDIT(cfg, ell=2, carry_over=True)}[kind]())
    path = _save_lightning(tmp_path, kind, net, {"target_length": 2 if "prime" in kind else 1,
                                                  "carry_over": kind == "prime-co", "base": 50257})
    info = inspect_checkpoint(path)
    assert info["format"] == "lightning" and info["has_ema"] and info["family"] == kind.split("-")[0]
    assert info["carry_over"] == (None if "prime" not in kind else kind == "prime-co")
    raw, info_raw = load_network(path, use_ema=False)
    ema, info_ema = load_network(path)
    assert (info_raw["weights"], info_ema["weights"]) == ("raw", "ema")
    hi = 9 if "prime" in kind else 51
    x = torch.randint(0, hi, (2, 16))
    _same_network(net, raw, x)
    with torch.no_grad():
        for p in net.parameters():
            p += 0.5
    _same_network(net, ema, x)
    assert ema.carry_over == (kind == "prime-co")
    if "prime" in kind:  # an explicit option overrides the stored carry-over setting
        flipped, info_f = load_network(path, carry_over=kind != "prime-co")
        assert flipped.carry_over == (kind != "prime-co") and "overrides" in info_f["notes"][0]


def test_lightning_ema_mismatch_is_a_user_error(tmp_path):
    net = _rand(DIT(_dit_cfg()))
    path = _save_lightning(tmp_path, "bad", net, {"target_length": 1, "carry_over": False}, ema_drop=1)
    with pytest.raises(UserError, match="EMA has .* shadow params"):
        load_network(path)
    load_network(path, use_ema=False)


def test_hf_directory_with_dit_keys_loads_as_dit(tmp_path):
    """kuleshov-group/mdlm-owt layout: config.json + model.safetensors with backbone.-prefixed DiT keys."""
    net = _rand(DIT(_dit_cfg()))
    d = tmp_path / "mdlm-owt"
    d.mkdir()
    save_file({"backbone." + k: v for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "mdlm", "hidden_dim": 64, "n_blocks": 2, "n_heads": 4,
                                               "cond_dim": 16, "model_length": 64, "vocab_size": 51}))
    loaded, info = load_network(d)
    assert info["arch"] == "mdlm" and info["family"] == "mdm" and info["key_prefix"] == "backbone."
    assert info["max_length"] == 64
    _same_network(net, loaded, torch.randint(0, 51, (2, 8)))


# ------------------------------------------------------------------------------------------------ family: HF causal


def test_hf_causal_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "llama")
    info = inspect_checkpoint(tmp_path / "llama")
    assert (info["arch"], info["family"], info["format"]) == ("hf", "arm", "hf-dir")
    assert info["dims"]["model_type"] == "llama" and info["params"] == sum(p.numel() for p in hf.parameters())
    net, info = load_network(tmp_path / "llama")
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(net(x), hf(x).logits)
    with pytest.raises(UserError, match="are ARMs"):
        load_network(tmp_path / "llama", family="mdm")


# ------------------------------------------------------------------------------------------------ converted by a user


def _tiny_smollm(seed=0):
    """A Llama with SmolLM-135M's peculiarities: grouped-query attention 9/3, tied embeddings, RoPE base 1e5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hc = LlamaConfig(vocab_size=100, hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
                     num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    hc._attn_implementation = "eager"
    hf = LlamaForCausalLM(hc).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights of a trained model's scale (logits ~ ±5), not the tiny init
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return hf


def _llama_to_lit_gpt(hf) -> dict:
    """transformers Llama -> lit_gpt keys, as a user converts it: fused q/k/v per query group, no lm_head (tied)."""
    c = hf.config
    H, g, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    hs, q = d // H, H // g
    sd = hf.state_dict()
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"]}
    for i in range(c.num_hidden_layers):
        o, p = f"model.layers.{i}.", f"transformer.h.{i}."
        wq = sd[o + "self_attn.q_proj.weight"].view(g, q, hs, d)
        wk = sd[o + "self_attn.k_proj.weight"].view(g, 1, hs, d)
        wv = sd[o + "self_attn.v_proj.weight"].view(g, 1, hs, d)
        out[p + "attn.attn.weight"] = torch.cat([wq, wk, wv], dim=1).reshape((H + 2 * g) * hs, d)
        out.update({p + lit: sd[o + hf_name] for lit, hf_name in LLAMA_BLOCK_KEYS.items()})
    return {k: v.contiguous().clone() for k, v in out.items()}


def test_converted_llama_gqa_tied_reproduces_transformers(tmp_path):
    """Issue 14: only n_head and the RoPE base are the user's to say; g, tying and the fp32 RoPE table are inferred."""
    hf = _tiny_smollm()
    path = tmp_path / "smol.safetensors"
    save_file(_llama_to_lit_gpt(hf), str(path))
    info = inspect_checkpoint(path, config="n_head=9;rope_base=100000")
    dims = info["dims"]
    assert (dims["n_head"], dims["n_query_groups"], dims["tie_embeddings"], dims["rope_bf16"]) == (9, 3, True, False)
    assert "attn.attn.weight rows" in info["inferred"]["n_query_groups"]
    assert "grouped-query attention" in info["assumed"]["rope_bf16"] and "tied" in info["assumed"]["rope_bf16"]
    assert info["params"] == sum(p.numel() for p in hf.parameters())  # the tied head is counted once
    net, info = load_network(path, config="n_head=9;rope_base=100000")
    x = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(x).logits
        # two implementations of the same fp32 arithmetic: fp32 tolerance
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
        # the RoPE table matters: the lit_gpt releases' bf16 table moves these logits far beyond that tolerance
        bf16, _ = load_network(path, config="n_head=9;rope_base=100000;rope_bf16=true")
        assert (bf16(x) - ref).abs().max() > 1e-3


def test_converted_llama_folder_with_its_config_json_needs_no_options(tmp_path):
    hf = _tiny_smollm(seed=1)
    d = tmp_path / "smol"
    d.mkdir()
    hf.config.to_json_file(str(d / "config.json"))
    save_file(_llama_to_lit_gpt(hf), str(d / "model.safetensors"))
    net, info = load_network(d)
    assert (info["arch"], info["network"]) == ("lit_gpt", "GPT")
    assert {info["inferred"][k] for k in ("n_head", "rope_base", "norm_eps", "block_size")} == {"config.json"}
    assert info["dims"]["rope_base"] == 100000 and info["max_length"] == 64
    x = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_gqa_head_groups_inferred_and_misfits_explained(tmp_path):
    net = _rand(GPT(Config(**TINY, n_query_groups=2)))  # d=64, 4 heads of 16, qkv rows (4 + 2·2)·16 = 128
    path = tmp_path / "gqa.safetensors"
    save_file(net.state_dict(), str(path))
    info = inspect_checkpoint(path, config=TINY_OPT)
    assert info["dims"]["n_query_groups"] == 2 and "n_query_groups" in info["inferred"]
    assert info["dims"]["rope_bf16"] is False and "grouped-query" in info["assumed"]["rope_bf16"]
    loaded, _ = load_network(path, config={**TINY_OPT, "rope_bf16": True})
    _same_network(net, loaded, torch.randint(0, 100, (2, 9)))
    with pytest.raises(UserError, match=r"(?s)mis-shaped.*hint: .*n_head=4 the file's 128 rows mean n_query_groups=2"):
        load_network(path, config={**TINY_OPT, "n_query_groups": 4})
    with pytest.raises(UserError, match=r"n_head=5 does not fit .*attn.attn.weight \(128, 64\)"):
        inspect_checkpoint(path, config={"n_head": 5, "vocab_size": 100})


def test_release_layout_keeps_bf16_rope_and_unnamed_files_say_what_they_assume(tmp_path):
    named = tmp_path / "mdm6m.safetensors"
    save_file(TransEncoder(Config.from_name("6M")).state_dict(), str(named))
    info = inspect_checkpoint(named)
    assert info["dims"]["rope_bf16"] is True and "Diff_LLaMA_6M" in info["inferred"]["rope_bf16"]
    assert not info["assumed"]
    info = inspect_checkpoint(_save_tiny(tmp_path), config=TINY_OPT)  # MHA, untied, no name: lit_gpt lineage
    assert info["dims"]["rope_bf16"] is True and "rope_bf16=false" in info["assumed"]["rope_bf16"]
    assert {"rope_base", "norm_eps", "block_size"} <= set(info["assumed"])


def test_family_and_folder_messages_name_the_real_cause(tmp_path):
    path = tmp_path / "mdm6m.safetensors"
    save_file(TransEncoder(Config.from_name("6M")).state_dict(), str(path))
    with pytest.raises(UserError, match=r"family 'arm' \(`--model arm` on score/ppl, `--family arm` on inspect\)"):
        load_network(path, family="arm")
    d = tmp_path / "config-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for fam in (None, "mdm"):
        with pytest.raises(UserError, match="has a config.json but no weight files"):
            inspect_checkpoint(d, family=fam)


# ------------------------------------------------------------------------------------------------ errors


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    net = _rand(GPT(Config(**TINY)))
    sd = net.state_dict()
    del sd["transformer.h.1.norm_2.weight"]
    sd["transformer.h.1.extra.weight"] = torch.zeros(3)
    sd["transformer.h.0.mlp.swiglu.w3.weight"] = torch.zeros(64, 95)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UserError) as e:
        load_network(path, config=TINY_OPT)
    msg = str(e.value)
    assert "missing keys (1): transformer.h.1.norm_2.weight" in msg
    assert "unexpected keys (1): transformer.h.1.extra.weight" in msg
    assert "transformer.h.0.mlp.swiglu.w3.weight expected (64, 96) got (64, 95)" in msg


def test_wrong_options_suggest_what_the_file_is(tmp_path):
    net = TransEncoder(Config.from_name("6M"))
    path = tmp_path / "mdm6m.safetensors"
    save_file(net.state_dict(), str(path))
    assert inspect_checkpoint(path)["config"] == "Diff_LLaMA_6M"
    with pytest.raises(UserError, match="looks like family 'mdm'"):
        load_network(path, family="arm")
    with pytest.raises(UserError, match=r"(?s)mis-shaped.*looks like: lit_gpt TransEncoder \(family mdm, Diff_LLaMA_6M"):
        load_network(path, config="Diff_LLaMA_19M")


def test_unknown_and_incomplete_layouts(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="unrecognised checkpoint layout"):
        inspect_checkpoint(tmp_path / "x.safetensors")
    torch.save({"model": {"embedding.word_embeddings.weight": torch.zeros(3, 8)}}, tmp_path / "m.pt")
    with pytest.raises(UserError, match="Megatron"):
        inspect_checkpoint(tmp_path / "m.pt")
    with pytest.raises(UserError, match="not found"):
        inspect_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="n_head cannot be read"):
        inspect_checkpoint(_save_tiny(tmp_path))


def _save_tiny(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(_rand(GPT(Config(**TINY))).state_dict(), str(path))
    return path


# ------------------------------------------------------------------------------------------------ identity, memory


EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def test_checkpoint_sha256(tmp_path):
    path = _save_tiny(tmp_path)
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()  # a file: `sha256sum FILE`
    assert checkpoint_sha256(tmp_path) == checkpoint_sha256(tmp_path) and checkpoint_sha256("org/model") is None


def _hf_folder(d, seed):
    """A model folder as the hub leaves it: config.json, weights, tokenizer files."""
    d.mkdir(parents=True)
    save_file(_rand(GPT(Config(**TINY)), seed).state_dict(), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"n_head": 4}))
    (d / "tokenizer.json").write_text("{}")
    return d


def test_identity_of_models_under_a_cache_folder(tmp_path):
    """Issue 13 §1: ~/.cache/... paths hashed to sha256(b"") and two models shared one identity."""
    a = _hf_folder(tmp_path / ".cache" / "models" / "a", seed=0)
    b = _hf_folder(tmp_path / ".cache" / "models" / "b", seed=1)
    ia, ib = checkpoint_sha256(a), checkpoint_sha256(b)
    assert len({ia, ib, EMPTY_SHA}) == 3
    assert checkpoint_sha256(a / "model.safetensors") != EMPTY_SHA
    # the identity is the content, not where it lies; the checkpoint's own housekeeping does not count ...
    shutil.copytree(a, tmp_path / "elsewhere")
    (a / ".cache" / "huggingface").mkdir(parents=True)
    (a / ".cache" / "huggingface" / "model.safetensors.lock").write_text("")
    (a / ".git").mkdir()
    (a / ".git" / "HEAD").write_text("ref: main")
    assert checkpoint_sha256(a) == checkpoint_sha256(tmp_path / "elsewhere") == ia
    # ... but every file that belongs to the model does
    (a / "tokenizer.json").write_text('{"added": 1}')
    assert checkpoint_sha256(a) != ia


def test_identity_of_a_hub_snapshot_with_symlinked_blobs(tmp_path, monkeypatch):
    """models--org--name/snapshots/<rev>/ files are symlinks into blobs/; a hub id resolves to its cached snapshot."""
    import huggingface_hub.constants

    hub = tmp_path / ".cache" / "huggingface" / "hub"
    plain = _hf_folder(tmp_path / "plain", seed=0)
    repo = hub / "models--org--tiny"
    snap = repo / "snapshots" / ("ab" * 20)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(plain.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    assert checkpoint_sha256(snap) == checkpoint_sha256(plain) != EMPTY_SHA
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert checkpoint_sha256("org/tiny") == checkpoint_sha256(plain)
    assert checkpoint_sha256("org/other") is None  # not cached: callers hash the loaded state dict


def test_identity_includes_tokenizer_and_permutation(tmp_path):
    ckpt = _save_tiny(tmp_path)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"v": 1}')
    perm = tmp_path / "perm.pt"
    torch.save(torch.arange(8), perm)
    base = checkpoint_sha256(ckpt, extra={"tokenizer": tok, "permutation": perm})
    assert base != checkpoint_sha256(ckpt) and base == checkpoint_sha256(ckpt, extra={"permutation": perm,
                                                                                      "tokenizer": tok})
    assert checkpoint_sha256(ckpt, extra={"tokenizer": None}) == checkpoint_sha256(ckpt)
    (tok / "tokenizer.json").write_text('{"v": 2}')
    changed_tok = checkpoint_sha256(ckpt, extra={"tokenizer": tok, "permutation": perm})
    torch.save(torch.arange(8).flip(0), perm)
    changed_perm = checkpoint_sha256(ckpt, extra={"tokenizer": tok, "permutation": perm})
    assert len({base, changed_tok, changed_perm}) == 3


def test_identity_needs_weight_bytes(tmp_path):
    d = tmp_path / "no-weights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(UserError, match=f"{d}.*no weight files"):
        checkpoint_sha256(d)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UserError, match="empty.pth is an empty file"):
        checkpoint_sha256(tmp_path / "empty.pth")


def test_load_streams_without_a_second_copy(tmp_path):
    """Peak RSS growth while loading a ~100 MB fp32 .pth stays below 1.3x its size (mmap + assign)."""
    net = TransEncoder(Config.from_name("6M"))  # 22.7 M params with the 32001-row table
    path = tmp_path / "m.pth"
    torch.save({"model": net.state_dict()}, path)
    size = path.stat().st_size
    del net
    code = (
        "import resource, torch, prime_eval.checkpoints as c\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"net, info = c.load_network({str(path)!r})\n"
        "with torch.no_grad(): net(torch.zeros(1, 8, dtype=torch.long))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip()) * 1024
    assert grew < 1.3 * size, (grew, size)


# ------------------------------------------------------------------------------------------------ tokenizers


def test_tokenizers_and_vocabulary_check(shared_data):
    tok_dir = shared_data / "tokenizers"
    llama = load_tokenizer(tok_dir / "llama2", vocab_size=32000)
    assert llama("Hello world", add_special_tokens=False).input_ids == [15043, 3186]
    assert len(load_tokenizer(tok_dir / "llama2" / "tokenizer.model")) == 32000
    gpt2 = load_tokenizer(tok_dir / "gpt2", vocab_size=50257)
    assert gpt2("Hello world").input_ids == [15496, 995]
    with pytest.raises(UserError, match="has 50257 tokens but the checkpoint's vocabulary is 32000.*Llama-2"):
        load_tokenizer(tok_dir / "gpt2", vocab_size=32000)
    load_tokenizer(tok_dir / "gpt2", vocab_size=50304, exact=False)  # padded HF output rows are fine


# ------------------------------------------------------------------------------------------------ CLI


def test_inspect_command(tmp_path, capsys):
    from prime_eval.cli import main

    path = _save_lightning(tmp_path, "co", _rand(PerceiverDIT(_dit_cfg(), ell=2)),
                           {"target_length": 2, "carry_over": True})
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["ell"], info["base"], info["carry_over"], info["has_ema"]) == ("prime", 2, 8, True, True)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PerceiverDIT" in out and "carry-over" in out
    assert main(["inspect", str(_save_tiny(tmp_path))]) == 2  # a UserError: printed, exit code 2
    assert "n_head" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "tiny.safetensors"), "--config", "n_head=4;vocab_size=100",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 100
    # a Llama converted by the user: what was inferred and what was assumed, field by field
    hf = _tiny_smollm()
    save_file(_llama_to_lit_gpt(hf), str(tmp_path / "smol.safetensors"))
    assert main(["inspect", str(tmp_path / "smol.safetensors"), "--config", "n_head=9"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "inferred: n_query_groups = 3 (attn.attn.weight rows" in out
    assert "inferred: tie_embeddings = yes (no lm_head.weight" in out
    assert "ASSUMED: rope_base = 10,000 (the lit_gpt default, not in the weights" in out
    assert "ASSUMED: rope_bf16 = no (tied embeddings, grouped-query attention: no lit_gpt release" in out
