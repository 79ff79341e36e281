"""`prime-eval score --tasks boolq-seq2seq --data-dir ...` (a generative task over local data) for all three families:
answers, exact_match, the sampler's settings in the results config, per-request generation statistics."""
from __future__ import annotations

import json

import pytest
import torch

from prime_eval.cli import main as cli_main


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIME_EVAL_CACHE", str(tmp_path / "prime_eval_cache"))


@pytest.fixture(scope="module")
def checkpoints(shared_data, tmp_path_factory):
    """A tiny GPT-2 folder (ARM) and lit_gpt TransEncoder files (MDM; Prime ℓ=4, b=15 with a permutation), GPT-2
    vocabulary, 128-token window."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from prime_eval.checkpoints import load_tokenizer
    from prime_eval.networks.lit_gpt import Config, TransEncoder
    from prime_eval.subtokenizer import make_permutation, save_permutation

    d = tmp_path_factory.mktemp("gen_ckpts")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=256)).save_pretrained(d / "arm")
    load_tokenizer(shared_data / "tokenizers" / "gpt2").save_pretrained(d / "arm")
    cfg = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=50257, block_size=256)
    for fam, ell, base in (("mdm", 1, None), ("prime", 4, 15)):
        torch.save({"model": TransEncoder(cfg, ell=ell, base=base).state_dict()}, d / f"{fam}.pth")
    save_permutation(make_permutation(15 ** 4, 50257, seed=0), d / "perm.pt")
    return d


@pytest.mark.parametrize("family", ["arm", "mdm", "prime"])
def test_score_runs_a_generative_task(family, checkpoints, shared_data, tmp_path):
    lit = f"tokenizer={shared_data / 'tokenizers' / 'gpt2'},config=n_head=2;block_size=256;vocab_size=50257"
    args = {"arm": f"checkpoint={checkpoints / 'arm'}",
            "mdm": f"checkpoint={checkpoints / 'mdm.pth'},{lit},steps=4,block_length=2,remasking=ancestral,seed=5",
            "prime": f"checkpoint={checkpoints / 'prime.pth'},{lit},permutation={checkpoints / 'perm.pt'},steps=4,"
                     "chunk_point=0.5"}[family]
    out = tmp_path / "runs"
    rc = cli_main(["score", "--model", family, "--model_args", args, "--tasks", "boolq-seq2seq", "--data-dir",
                   str(shared_data), "--limit", "3", "--gen_kwargs", "max_gen_toks=4", "--output_path", str(out),
                   "--log_samples", "--device", "cpu"])
    assert rc == 0
    (results,) = out.rglob("results_*.json")
    res = json.loads(results.read_text())
    assert 0.0 <= res["results"]["boolq-seq2seq"]["exact_match,none"] <= 1.0
    gen = res["config"]["prime_eval"]["generation"]
    assert gen["sampler"] == family
    if family == "mdm":
        assert (gen["steps"], gen["block_length"], gen["remasking"], gen["cfg"]) == (4, 2, "ancestral", 0.0)
    if family == "prime":
        assert gen["chunk_point"] == 0.5 and gen["consistent_tokens_only"] is True
    (samples,) = out.rglob("samples_boolq-seq2seq_*.jsonl")
    answers = [json.loads(line)["resps"][0][0] for line in samples.read_text().splitlines()]
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert not list(out.rglob("stats_boolq-seq2seq_*.jsonl"))  # the report reads stats_ files as log-likelihoods
    (stats,) = out.rglob("generations_boolq-seq2seq_*.jsonl")
    rows = [json.loads(line) for line in stats.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [0, 1, 2] and all(r["kind"] == "generate_until" for r in rows)
    assert all(r["generated_tokens"] <= 4 and r["forward_passes"] >= 1 for r in rows)
    if family != "arm":  # a fixed-length answer: 4 tokens, at most `steps` passes
        assert all(r["generated_tokens"] == 4 and r["forward_passes"] <= 4 for r in rows)
    if family == "arm":  # the report builds from a run with a generative task
        assert cli_main(["report", str(out), "--out", str(tmp_path / "report"), "--no-plots", "--quiet"]) == 0
