"""`prime_eval.loading`: one loader (network, tokenizer, sub-tokenizer, carry-over, dtype, identity) for `score`,
`ppl` and the demo; what can fail without the weights fails before they are read (issues 14, 15)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prime_eval.errors import UserError
from prime_eval.loading import load_model
from prime_eval.settings import Settings

CFG = "n_head=2;block_size=128;vocab_size=50257"


@pytest.fixture(scope="module")
def ckpts(shared_data, tmp_path_factory):
    """A tiny lit_gpt Prime checkpoint (ℓ=4, b=15) over the GPT-2 vocabulary and two permutation files."""
    from prime_eval.networks.lit_gpt import Config, TransEncoder
    from prime_eval.subtokenizer import save_permutation

    d = tmp_path_factory.mktemp("loading")
    cfg = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=50257, block_size=128)
    torch.manual_seed(0)
    torch.save({"model": TransEncoder(cfg, ell=4, base=15).state_dict()}, d / "prime.pth")
    for i in (0, 1):
        g = torch.Generator().manual_seed(i)
        save_permutation(torch.cat([torch.randperm(50257, generator=g), torch.arange(50257, 15**4)]), d / f"p{i}.pt")
    return {"dir": d, "tok": str(shared_data / "tokenizers" / "gpt2")}


def _values(ckpts, **kw):
    return {"checkpoint": str(ckpts["dir"] / "prime.pth"), "tokenizer": ckpts["tok"], "config": CFG,
            "permutation": str(ckpts["dir"] / "p0.pt"), "device": "cpu", **kw}


def test_score_and_ppl_get_the_same_bundle(ckpts):
    a = load_model("prime", Settings.parse(_values(ckpts), family="prime", command="score"))
    b = load_model("prime", Settings.parse(_values(ckpts), family="prime", command="ppl"))
    assert a.identity == b.identity and a.describe() == b.describe()
    assert len(a.identity["permutation_sha256"]) == 64 and len(a.identity["checkpoint_sha256"]) == 64
    assert torch.equal(a.subtokenizer.perm, b.subtokenizer.perm) and a.carry_over is b.carry_over is False
    assert (a.subtokenizer.ell, a.subtokenizer.base) == (4, 15) and a.dtype == torch.float32
    other = load_model("prime", Settings.parse(_values(ckpts, permutation=str(ckpts["dir"] / "p1.pt")),
                                               family="prime", command="ppl"))
    assert other.identity["permutation_sha256"] != a.identity["permutation_sha256"]  # keys the caches apart
    assert other.identity["checkpoint_sha256"] == a.identity["checkpoint_sha256"]
    bf16 = load_model("prime", Settings.parse(_values(ckpts, dtype="bf16"), family="prime", command="score"))
    assert bf16.identity["dtype"] == "torch.bfloat16" and bf16.identity != a.identity


def test_score_records_the_permutation_hash(ckpts):
    """`permutation_sha256` used to be written by `ppl` only."""
    from model_adapters import PrimeLM

    lm = PrimeLM(**_values(ckpts))
    info = lm.get_model_info()["prime_eval"]
    assert info["permutation_sha256"] == lm.bundle.identity["permutation_sha256"] and info["permutation_file"]


def test_tokenizer_and_permutation_fail_before_the_weights(ckpts, monkeypatch):
    import prime_eval.checkpoints as C

    def no_weights(*a, **k):
        raise AssertionError("the weights were read before the cheap checks")

    monkeypatch.setattr(C, "load_network", no_weights)
    with pytest.raises(UserError, match="tokenizer"):
        load_model("prime", Settings.parse(_values(ckpts, tokenizer=str(ckpts["dir"] / "missing_tok")),
                                           family="prime"))
    bad = ckpts["dir"] / "bad_perm.pt"
    torch.save(torch.zeros(10, dtype=torch.long), bad)
    with pytest.raises(UserError, match="not a permutation"):
        load_model("prime", Settings.parse(_values(ckpts, permutation=str(bad)), family="prime"))
    with pytest.raises(UserError, match="permutation file not found"):
        Settings.parse(_values(ckpts, permutation=str(ckpts["dir"] / "nope.pt")), family="prime")


def test_carry_over_falls_back_to_the_network(shared_data):
    """One rule for every caller: the setting, else the checkpoint's config, else the network's own flag (the
    adapter used to ignore the network's flag, `ppl` did not)."""
    from prime_eval.checkpoints import load_tokenizer
    from prime_eval.networks.toy import TinyDenoiser

    tok = load_tokenizer(shared_data / "tokenizers" / "gpt2")
    net = TinyDenoiser("prime", len(tok), ell=4, base=15)
    net.carry_over = True
    for command in ("score", "ppl"):
        s = Settings.parse({"permutation": "identity", "device": "cpu"}, family="prime", command=command)
        assert load_model("prime", s, network=net, tokenizer=tok).carry_over is True
        s = Settings.parse({"carry_over": "false", "device": "cpu"}, family="prime", command=command)
        assert load_model("prime", s, network=net, tokenizer=tok).carry_over is False


def test_demo_loads_through_the_one_loader(monkeypatch):
    import prime_eval.demo as demo
    import prime_eval.loading as loading

    seen = {}

    def fake(family, settings, **kw):
        seen.update(family=family, settings=settings)
        return SimpleNamespace(network="net", tokenizer="tok", subtokenizer="st", info={"i": 1})

    monkeypatch.setattr(loading, "load_model", fake)
    art = SimpleNamespace(checkpoints={"prime": "/m/prime.pth"}, tokenizer_dir="/m/tok", permutation="/m/p.pt")
    monkeypatch.setattr("prime_eval.settings.Path.is_file", lambda self: True)
    out = demo.load_demo_network("prime", art, SimpleNamespace(model=SimpleNamespace(n_head=4)))
    assert out == ("net", "tok", "st", {"i": 1})
    s = seen["settings"]
    assert (s.checkpoint, s.tokenizer, s.permutation, s.config, s.device) == (
        "/m/prime.pth", "/m/tok", "/m/p.pt", "n_head=4", "cpu")


def test_ppl_cli_one_vocabulary(ckpts, shared_data, tmp_path):
    """`prime-eval ppl`: samples=/seed= in --model_args give the very numbers of --samples/--seed (ppl used to reject
    samples= as unknown); an ARM run takes no ε and records none, as before."""
    import json

    from prime_eval.cli import main

    common = ["ppl", "--files", str(shared_data / "wikitext2" / "test.txt"), "--L", "32", "--max-tokens", "300",
              "--bootstrap", "0", "--no-progress"]
    margs = (f"checkpoint={ckpts['dir'] / 'prime.pth'},tokenizer={ckpts['tok']},config={CFG},"
             f"permutation={ckpts['dir'] / 'p0.pt'},device=cpu")
    assert main([*common, "--model", "prime", "--model_args", margs, "--samples", "2", "--seed", "3",
                 "-o", str(tmp_path / "flags.json")]) == 0
    assert main([*common, "--model", "prime", "--model_args", margs + ",samples=2,seed=3",
                 "-o", str(tmp_path / "margs.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("flags.json", "margs.json"))
    drop = ("seconds", "tokens_per_second")
    assert {k: v for k, v in a["results"].items() if k not in drop} == \
        {k: v for k, v in b["results"].items() if k not in drop}
    assert a["results"]["samples_per_block"] == 2 and a["model"]["permutation_sha256"]
    from prime_eval.networks.lit_gpt import GPT, Config

    cfg = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=50257, block_size=128)
    torch.save({"model": GPT(cfg).state_dict()}, tmp_path / "arm.pth")
    arm = f"checkpoint={tmp_path / 'arm.pth'},tokenizer={ckpts['tok']},config={CFG},device=cpu"
    assert main([*common, "--model", "arm", "--model_args", arm, "-o", str(tmp_path / "arm.json")]) == 0
    assert json.loads((tmp_path / "arm.json").read_text())["protocol"]["eps"] is None  # as before: no time


def test_release_folder_with_its_permutation_file(ckpts, tmp_path):
    """A folder holding the weights and the release's `perm_<b^ℓ>.pt`: the permutation file is not taken for a second
    weight file, and a missing permutation= names the file beside the checkpoint (never used unasked)."""
    import shutil

    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(ckpts["dir"] / "prime.pth", folder / "prime.pth")
    shutil.copy(ckpts["dir"] / "p0.pt", folder / f"perm_{15 ** 4}.pt")
    values = _values(ckpts, checkpoint=str(folder))
    del values["permutation"]
    with pytest.raises(UserError, match=rf"perm_{15 ** 4}\.pt is next to the checkpoint"):
        load_model("prime", Settings.parse(values, family="prime"))
    b = load_model("prime", Settings.parse({**values, "permutation": str(folder / f"perm_{15 ** 4}.pt")},
                                           family="prime"))
    assert b.identity["permutation"] == "shuffled"
