"""Checkpoint loading: tiny random networks saved in each upstream file format load back with identical logits;
detection from shapes; EMA; strict-load errors; tokenizers; content hash; the `inspect` subcommand."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from prime_eval.checkpoints import checkpoint_sha256, inspect_checkpoint, load_network, load_tokenizer
from prime_eval.errors import UserError
from prime_eval.networks.lit_gpt import GPT, Config, TransEncoder
from prime_eval.networks.mdlm_dit import AR, DIT, DiTConfig, PerceiverDIT

TINY = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=96, vocab_size=100)
TINY_OPT = {"n_head": 4, "vocab_size": 100}


def _rand(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def _same_logits(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


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
    _same_logits(net, loaded, x)
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
    _same_logits(net, raw, x)
    with torch.no_grad():
        for p in net.parameters():
            p += 0.5
    _same_logits(net, ema, x)
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
    _same_logits(net, loaded, torch.randint(0, 51, (2, 8)))


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


def test_unknown_and_megatron_layouts(tmp_path):
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


def test_checkpoint_sha256(tmp_path):
    path = _save_tiny(tmp_path)
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint_sha256(tmp_path) == checkpoint_sha256(tmp_path) and checkpoint_sha256("org/model") is None


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
