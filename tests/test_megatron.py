"""Megatron C4 family (ARM `GPTModel`, MDM / MDM-Prime-v2 `MaskedDiffModel`): tiny networks written in every file
layout Megatron produces (torch_dist with per-layer or layer-stacked keys, legacy `mp_rank_XX/model_optim_rng.pt`,
tensor-parallel shards, local-spec names), loaded back strictly; logits checked against transformers' Qwen3
(the same per-head q/k RMSNorm before RoPE); the sub-token concatenation rule; the permutation saved with the weights;
`inspect`, `score` and `ppl` end to end.

The fixture writers below follow the key names and shapes of checkpoint-formats.md §4.4–4.5 and Megatron's
`apply_swiglu_sharded_factory` / tensor-parallel layouts; they share no code with `prime_eval.checkpoints.megatron_files`.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

from prime_eval.checkpoints import inspect_checkpoint, load_network
from prime_eval.errors import UserError
from prime_eval.networks import megatron as M
from prime_eval.subtokenizer import base_from_ell, make_permutation, resolve_permutation, save_permutation

V = 100  # small vocabulary for the unit tests; the end-to-end fixtures use GPT-2's 50257
DIMS = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48)


# ------------------------------------------------------------------------------------------------ fixtures

def make_net(kind: str, *, vocab: int = V, seed: int = 0, ell: int = 4, buffers: str = "shuffle", **dims):
    """A random network of one family as the released scripts configure it (tiny dims)."""
    dims = {**DIMS, **dims}
    if kind == "arm":  # tied to the padded embedding (Megatron pads to a multiple of 128)
        cfg = M.MegatronConfig(**dims, vocab_size=vocab, embedding_rows=-(-vocab // 128) * 128,
                               untie_embeddings_and_output_weights=False)
        net = M.GPTModel(cfg)
    elif kind in ("mdm", "mdm-tied"):  # ℓ = 1, --padded-output 1; the tied variant is the 2359M / 3426M MDM scripts
        tied = kind == "mdm-tied"
        cfg = M.MegatronConfig(**dims, vocab_size=vocab, embedding_rows=vocab + 1, output_rows=vocab + 1,
                               untie_embeddings_and_output_weights=not tied, base=vocab,
                               subtokenizer_buffers={"mask": (1,), "lookup_table": (vocab, 1)} if buffers else {})
        net = M.MaskedDiffModel(cfg)
    else:  # prime: cat-share (or cat), --padded-input 1 --padded-output 1
        b = base_from_ell(vocab, ell)
        etype = "cat" if kind == "prime-cat" else "cat-share"
        bufs = {"mask": (ell,), "lookup_table": (b ** ell, ell)}
        if buffers == "shuffle":
            bufs.update(perm=(b ** ell,), inv_perm=(b ** ell,))
        cfg = M.MegatronConfig(**dims, vocab_size=vocab, target_length=ell, base=b, embedding_type=etype,
                               embedding_rows=(b + 1) * ell if etype == "cat" else b + 2, output_rows=vocab + 1,
                               subtokenizer_buffers=bufs if buffers else {})
        net = M.MaskedDiffModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 else 0.1 * noise)  # norm gains near 1
        st = getattr(net, "subtokenizer", None)
        if st is not None:
            b, ell_ = net.mask_id, net.ell
            powers = b ** torch.arange(ell_ - 1, -1, -1)
            st.mask.copy_(powers)
            st.lookup_table.copy_((torch.arange(st.lookup_table.shape[0])[:, None] // powers) % b)
            if "perm" in st._buffers:
                perm = make_permutation(b ** ell_, vocab, seed=seed + 7, style="megatron")
                st.perm.copy_(perm)
                st.inv_perm.copy_(torch.argsort(perm))
    return net.eval()


def args_of(net, **extra) -> argparse.Namespace:
    """The `args` Megatron pickles into common.pt / model_optim_rng.pt (the fields a loader may read)."""
    c = net.config
    a = dict(num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
             num_query_groups=c.num_query_groups, group_query_attention=True, ffn_hidden_size=c.ffn_hidden_size,
             seq_length=128, max_position_embeddings=128, normalization="RMSNorm", swiglu=True, qk_layernorm=True,
             position_embedding_type="rope", add_bias_linear=False, rotary_base=10000, rotary_percent=1.0,
             untie_embeddings_and_output_weights=c.untie_embeddings_and_output_weights, tensor_model_parallel_size=1,
             params_dtype=torch.bfloat16, ckpt_format="torch_dist", iteration=100)
    if isinstance(net, M.GPTModel):  # the ARM scripts pass no --vocab-size (GPT-2's 50257 is implied)
        a.update(vocab_size=None if c.vocab_size == 50257 else c.vocab_size, padded_vocab_size=c.embedding_rows)
    else:
        a.update(vocab_size=c.vocab_size, target_length=c.target_length, embedding_type=c.embedding_type,
                 padded_output=c.output_rows - c.vocab_size if c.output_rows else 0,
                 subtokenizer_type="baseb_shuffle" if net.saved_perm is not None else "baseb", random_ratio=1.0)
    a.update(extra)
    return argparse.Namespace(**a)


def _layer_keys(sd):
    """{(block, i, rest): key} for per-layer keys."""
    out = {}
    for k in sd:
        parts = k.split(".")
        if len(parts) > 3 and parts[1] == "layers":
            out[(parts[0], int(parts[2]), ".".join(parts[3:]))] = k
    return out


def dist_state_dict(sd: dict, *, stacked: bool, local: bool = False) -> dict:
    """Megatron's torch_dist keys: per-layer (singleton_local_shards: fc1 saved as `weight_w` / `weight_v`) or
    layer-stacked (leading [num_layers] axis, fc1 = [gate; up]); plus TE extra state, optimizer and RNG entries."""
    out = {k: v for k, v in sd.items() if ".layers." not in k}
    layers = _layer_keys(sd)
    rests = sorted({(blk, rest) for blk, _, rest in layers})
    n = 1 + max(i for _, i, _ in layers)
    for blk, rest in rests:
        name = rest
        if local:
            name = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}.get(rest, rest)
        if stacked:
            out[f"{blk}.layers.{name}"] = torch.stack([sd[layers[(blk, i, rest)]] for i in range(n)])
        else:
            for i in range(n):
                if (blk, i, rest) not in layers:  # a key only some layers have (the strict-load test)
                    continue
                t = sd[layers[(blk, i, rest)]]
                if rest == "mlp.linear_fc1.weight":
                    out[f"{blk}.layers.{i}.{name}_w"], out[f"{blk}.layers.{i}.{name}_v"] = \
                        [c.clone() for c in t.chunk(2)]
                else:
                    out[f"{blk}.layers.{i}.{name}"] = t
    blk = rests[0][0]
    out[f"{blk}.layers.self_attention.linear_qkv._extra_state/shard_0.0_1.1"] = io.BytesIO(b"te-fp8-meta")
    out["rng_state/shard_0.0_1.1"] = io.BytesIO(b"rng")
    out["optimizer.state.exp_avg.embedding.word_embeddings.weight"] = torch.zeros_like(
        sd["embedding.word_embeddings.weight"])
    return out


def write_dist(root: Path, net, *, stacked: bool = False, local: bool = False, args=True, sd=None,
               iteration: int = 100) -> Path:
    """`root/latest_checkpointed_iteration.txt` + `root/iter_0000100/` (`*.distcp`, `.metadata`, `common.pt`,
    `metadata.json`)."""
    it = root / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    state = dist_state_dict(sd if sd is not None else net.state_dict(), stacked=stacked, local=local)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(it)), no_dist=True)
    if args:
        torch.save({"args": args_of(net), "iteration": iteration, "checkpoint_version": 3.0}, it / "common.pt")
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                  "common_backend": "torch", "common_backend_version": 1}))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def tp_shards(sd: dict, tp: int) -> list[dict]:
    """Per-rank state dicts of a tensor-parallel run: column-parallel weights (qkv by query groups, fc1 as
    [gate_r; up_r], the vocabulary rows) split along dim 0, row-parallel ones (proj, fc2) along dim 1."""
    ranks = [dict() for _ in range(tp)]
    for k, t in sd.items():
        if k.endswith("linear_fc1.weight"):
            gate, up = t.chunk(2)
            chunks = [torch.cat((g, u)) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
        elif k.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
            chunks = t.chunk(tp, dim=0)
        elif k.endswith(("linear_proj.weight", "linear_fc2.weight")):
            chunks = t.chunk(tp, dim=1)
        else:
            chunks = [t] * tp
        for r in range(tp):
            ranks[r][k] = chunks[r].clone()
    return ranks


def write_legacy(root: Path, net, *, tp: int = 1, local: bool = False, iteration: int = 100) -> Path:
    """`--ckpt-format torch`: `root/iter_0000100/mp_rank_{r:02d}/model_optim_rng.pt` with the state dict under
    `model` (TE `_extra_state` entries included), args, iteration, optimizer and RNG state."""
    sd = net.state_dict()
    if local:
        sd = {k.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
               .replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"): v for k, v in sd.items()}
    for r, shard in enumerate(tp_shards(sd, tp)):
        d = root / f"iter_{iteration:07d}" / f"mp_rank_{r:02d}"
        d.mkdir(parents=True)
        shard = {**shard, "decoder.layers.0.self_attention.linear_qkv._extra_state": io.BytesIO(b"te")}
        torch.save({"args": args_of(net, tensor_model_parallel_size=tp, ckpt_format="torch"), "iteration": iteration,
                    "model": shard, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}},
                    "rng_state": [{"random_rng_state": (3, (1, 2), None)}]}, d / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def tokens_for(net, n: int = 7, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if net.ell > 1:
        return torch.randint(0, net.base + 1, (batch, n * net.ell), generator=g)  # digits and the mask digit b
    return torch.randint(0, net.vocab_size + (net.family == "mdm"), (batch, n), generator=g)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------ layouts load


LAYOUTS = ["dist-per-layer", "dist-stacked", "dist-local-names", "legacy", "legacy-local-names", "legacy-tp2"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["arm", "mdm", "prime"])
def test_every_layout_loads_strictly(tmp_path, kind, layout):
    net = make_net(kind)
    if layout.startswith("dist"):
        write_dist(tmp_path, net, stacked=layout == "dist-stacked", local=layout == "dist-local-names")
    else:
        write_legacy(tmp_path, net, tp=2 if layout == "legacy-tp2" else 1, local="local" in layout)
    loaded, info = load_network(tmp_path, family=kind)
    assert type(loaded) is type(net) and loaded.family == info["family"] == kind
    assert info["arch"] == "megatron" and info["format"] == ("torch_dist" if "dist" in layout else "megatron-torch")
    assert_same_weights(net, loaded)
    x = tokens_for(net)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)  # identical weights, identical code path
    assert info["vocab_size"] == V and info["iteration"] == 100
    assert ("layer-stacked" in info["layout"]) == (layout == "dist-stacked")
    assert ("local-spec" in info["layout"]) == ("local" in layout)
    assert ("2 tensor-parallel shards merged" in info["layout"]) == (layout == "legacy-tp2")
    assert info["ignored_keys"] > 0  # optimizer, RNG, TE extra state
    assert info["params"] == sum(p.numel() for p in net.parameters())


def test_paths_that_name_a_megatron_checkpoint(tmp_path):
    net = make_net("mdm")
    write_legacy(tmp_path / "legacy", net)
    it = tmp_path / "legacy" / "iter_0000100"
    for p in (tmp_path / "legacy", it, it / "mp_rank_00", it / "mp_rank_00" / "model_optim_rng.pt"):
        assert inspect_checkpoint(p)["format"] == "megatron-torch", p
    write_dist(tmp_path / "dist", net)
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").write_text("200")
    with pytest.raises(UserError, match="names iteration '200'.*iter_0000200.*iter_0000100"):
        inspect_checkpoint(tmp_path / "dist")
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").unlink()
    assert inspect_checkpoint(tmp_path / "dist")["format"] == "torch_dist"  # the only iteration
    write_dist(tmp_path / "dist2", net, iteration=5)
    (tmp_path / "dist2" / "latest_checkpointed_iteration.txt").unlink()
    (tmp_path / "dist2" / "iter_0000005").rename(tmp_path / "dist" / "iter_0000005")
    with pytest.raises(UserError, match="2 Megatron iterations"):
        inspect_checkpoint(tmp_path / "dist")
    pp = tmp_path / "legacy" / "iter_0000100"
    (pp / "mp_rank_00").rename(pp / "mp_rank_00_000")
    (pp / "mp_rank_00_001").mkdir()
    torch.save({"model": {}}, pp / "mp_rank_00_001" / "model_optim_rng.pt")
    with pytest.raises(UserError, match="pipeline-parallel"):
        inspect_checkpoint(tmp_path / "legacy")


def test_converted_state_dict_files(tmp_path):
    """A flat Megatron state dict in a torch file (as `dcp_to_torch_save` writes, non-tensor entries included) or in
    safetensors (tensors only) loads the same way."""
    from safetensors.torch import save_file

    net = make_net("prime")
    flat = dist_state_dict(net.state_dict(), stacked=False)
    torch.save(flat, tmp_path / "converted.pt")
    with pytest.raises(UserError, match="the output has 101 rows, fewer than the V = 50257 tokens"):
        load_network(tmp_path / "converted.pt")  # no args in the file: GPT-2's V is assumed
    loaded, info = load_network(tmp_path / "converted.pt", config={"vocab_size": V})
    assert info["format"] == "torch" and info["family"] == "prime"
    assert_same_weights(net, loaded)
    save_file({k: v.contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)},
              str(tmp_path / "converted.safetensors"))
    loaded, info = load_network(tmp_path / "converted.safetensors", config="vocab_size=100")
    assert info["format"] == "safetensors"
    assert_same_weights(net, loaded)


def test_strict_load_lists_key_differences(tmp_path):
    net = make_net("arm")
    sd = dict(net.state_dict())
    del sd["decoder.layers.1.self_attention.k_layernorm.weight"]
    sd["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(64)
    sd["decoder.layers.0.self_attention.linear_proj.weight"] = torch.zeros(32, 31)
    sd["pooler.dense.weight"] = torch.zeros(2, 2)  # any tensor outside optimizer / RNG state is a model weight
    write_dist(tmp_path, net, sd=sd)
    with pytest.raises(UserError) as e:
        load_network(tmp_path)
    msg = str(e.value)
    assert "missing keys (1): decoder.layers.1.self_attention.k_layernorm.weight" in msg
    assert "unexpected keys (2): decoder.layers.0.self_attention.linear_qkv.bias, pooler.dense.weight" in msg
    assert "decoder.layers.0.self_attention.linear_proj.weight expected (32, 32) got (32, 31)" in msg
    with pytest.raises(UserError, match="--family mdm does not fit this Megatron checkpoint.*'arm'"):
        load_network(tmp_path, family="mdm")


def test_fc1_halves_must_come_in_pairs(tmp_path):
    net = make_net("mdm")
    state = dist_state_dict(net.state_dict(), stacked=False)
    del state["encoder.layers.1.mlp.linear_fc1.weight_v"]
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "iter_0000001")), no_dist=True)
    with pytest.raises(UserError, match="linear_fc1.weight_w has no `_v` partner"):
        inspect_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ reference: Qwen3


def qwen3_from(net):
    """transformers' Qwen3 (q/k RMSNorm per head before RoPE, SwiGLU, RMSNorm) with the network's weights, converted
    from the Megatron keys: group-interleaved linear_qkv rows -> q_proj / k_proj / v_proj, fc1 -> gate / up."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c, sd = net.config, net.state_dict()
    d, H, g, hs = c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels
    blk = "decoder" if isinstance(net, M.GPTModel) else "encoder"
    tied = not c.untie_embeddings_and_output_weights
    rows = sd["embedding.word_embeddings.weight"].shape[0] if tied or c.target_length == 1 else c.output_rows
    cfg = Qwen3Config(vocab_size=rows, hidden_size=d, intermediate_size=c.ffn_hidden_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=H, num_key_value_heads=g, head_dim=hs,
                      rms_norm_eps=c.norm_epsilon, rope_theta=float(c.rotary_base), max_position_embeddings=128,
                      tie_word_embeddings=tied, attention_bias=False)
    cfg._attn_implementation = "eager"
    hf = Qwen3ForCausalLM(cfg).eval()
    new = {"model.norm.weight": sd[f"{blk}.final_layernorm.weight"]}
    if c.target_length == 1:
        new["model.embed_tokens.weight"] = sd["embedding.word_embeddings.weight"]
    new["lm_head.weight"] = sd["embedding.word_embeddings.weight"] if tied else sd["output_layer.weight"]
    for i in range(c.num_layers):
        p, q = f"{blk}.layers.{i}.", f"model.layers.{i}."
        w = sd[p + "self_attention.linear_qkv.weight"].view(g, H // g + 2, hs, d)
        new[q + "self_attn.q_proj.weight"] = w[:, : H // g].reshape(H * hs, d)
        new[q + "self_attn.k_proj.weight"] = w[:, H // g].reshape(g * hs, d)
        new[q + "self_attn.v_proj.weight"] = w[:, H // g + 1].reshape(g * hs, d)
        new[q + "self_attn.o_proj.weight"] = sd[p + "self_attention.linear_proj.weight"]
        new[q + "self_attn.q_norm.weight"] = sd[p + "self_attention.q_layernorm.weight"]
        new[q + "self_attn.k_norm.weight"] = sd[p + "self_attention.k_layernorm.weight"]
        new[q + "input_layernorm.weight"] = sd[p + "self_attention.linear_qkv.layer_norm_weight"]
        new[q + "post_attention_layernorm.weight"] = sd[p + "mlp.linear_fc1.layer_norm_weight"]
        new[q + "mlp.gate_proj.weight"], new[q + "mlp.up_proj.weight"] = sd[p + "mlp.linear_fc1.weight"].chunk(2)
        new[q + "mlp.down_proj.weight"] = sd[p + "mlp.linear_fc2.weight"]
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and set(missing) <= {"model.embed_tokens.weight"}, (missing, unexpected)
    return hf


def qwen3_bidirectional(hf, embeds: torch.Tensor) -> torch.Tensor:
    """Qwen3's layers without the causal mask (eager attention adds no mask when none is given)."""
    pos = torch.arange(embeds.shape[1])[None]
    cos_sin = hf.model.rotary_emb(embeds, pos)
    x = embeds
    for layer in hf.model.layers:
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        x = out[0] if isinstance(out, tuple) else out
    return hf.lm_head(hf.model.norm(x))


def test_arm_equals_qwen3(tmp_path):
    net = make_net("arm")
    write_dist(tmp_path, net)
    loaded, info = load_network(tmp_path)
    assert info["extra_output_rows"] == 128 - V and info["tied_output"]
    x = tokens_for(net, n=11)
    with torch.no_grad():
        ref = qwen3_from(net)(x).logits
        ours = loaded(x)
    assert ref.shape[-1] == 128 and ours.shape[-1] == V  # padded vocabulary rows dropped
    torch.testing.assert_close(ours, ref[..., :V], atol=1e-5, rtol=1e-5)
    # causal: logits at p do not depend on tokens after p
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(loaded(y)[:, :6], ours[:, :6], atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["mdm", "mdm-tied"])
def test_mdm_equals_qwen3_layers_without_causal_mask(tmp_path, kind):
    net = make_net(kind)
    write_dist(tmp_path, net, stacked=True)
    loaded, info = load_network(tmp_path)
    assert (info["family"], info["mask_id"], info["tied_output"]) == ("mdm", V, kind == "mdm-tied")
    x = tokens_for(net, n=9)
    x[0, 3] = V  # [MASK]
    hf = qwen3_from(net)
    with torch.no_grad():
        ref = qwen3_bidirectional(hf, hf.model.embed_tokens(x))
        ours = loaded(x)
    assert ref.shape[-1] == V + 1 and ours.shape[-1] == V  # the never-a-target class is not in the softmax
    torch.testing.assert_close(ours, ref[..., :V], atol=1e-5, rtol=1e-5)
    y = x.clone()
    y[:, -1] = V
    with torch.no_grad():
        assert not torch.allclose(loaded(y)[:, 0], ours[:, 0])  # bidirectional: the last token changes position 0


@pytest.mark.parametrize("kind", ["prime", "prime-cat"])
def test_prime_concatenates_sub_token_vectors(tmp_path, kind):
    """cat-share: token vector = [E[y_0] | E[y_1] | … | E[y_{ℓ-1}]] of one shared table; cat: E[y_j + j(b+1)]."""
    net = make_net(kind, ell=4)
    write_legacy(tmp_path, net)
    loaded, info = load_network(tmp_path)
    b, ell = loaded.base, loaded.ell
    assert (info["ell"], info["base"], info["mask_id"]) == (4, b, b) == (4, base_from_ell(V, 4), b)
    E = net.state_dict()["embedding.word_embeddings.weight"]
    off = (lambda j: j * (b + 1)) if kind == "prime-cat" else (lambda j: 0)
    all_mask = torch.full((1, 3 * ell), b)
    with torch.no_grad():
        got = loaded.embed(all_mask)  # (1, 3, d)
    want = torch.cat([E[b + off(j)] for j in range(ell)])  # the mask rows, digit 0 first
    assert torch.equal(got, want.expand(1, 3, -1))
    x = tokens_for(net, n=5)
    manual = torch.stack([torch.stack([torch.cat([E[int(x[r, t * ell + j]) + off(j)] for j in range(ell)])
                                       for t in range(5)]) for r in range(2)])  # (2, 5, d)
    hf = qwen3_from(net)
    with torch.no_grad():
        ref = qwen3_bidirectional(hf, manual)
        ours = loaded(x)
    torch.testing.assert_close(ours, ref[..., :V], atol=1e-5, rtol=1e-5)


def test_size_tags_and_dimensions():
    assert M.size_tag(6, 448, 7, 1792) == "14M" and M.size_tag(22, 2048, 16, 8192) == "1107M"
    assert all(M.size_tag(*dims) == tag for tag, dims in M.SIZE_TAGS.items()) and len(M.SIZE_TAGS) == 19
    assert M.size_tag(2, 32, 4, 48) is None
    cfg = M.MegatronConfig(**DIMS)
    net = M.GPTModel(cfg)
    blocks = sum(p.numel() for n, p in net.named_parameters() if n.startswith("decoder."))
    assert cfg.non_embedding_params() == blocks


# ------------------------------------------------------------------------------------------------ permutation


def test_permutation_saved_with_the_weights(tmp_path):
    net = make_net("prime")
    write_dist(tmp_path / "ck", net)
    loaded, info = load_network(tmp_path / "ck")
    n = loaded.base ** loaded.ell
    assert info["permutation_source"].startswith("checkpoint") and not info["needs_permutation"]
    saved = loaded.saved_perm
    assert torch.equal(saved, net.saved_perm)
    assert resolve_permutation(None, n, saved=saved)[1] == "checkpoint"
    save_permutation(saved, tmp_path / "same.pt")
    perm, source = resolve_permutation(tmp_path / "same.pt", n, saved=saved)
    assert torch.equal(perm, saved) and source.startswith("checkpoint (equal to")
    save_permutation(make_permutation(n, V, seed=99, style="megatron"), tmp_path / "other.pt")
    with pytest.raises(UserError, match="differs from the permutation saved in the checkpoint"):
        resolve_permutation(tmp_path / "other.pt", n, saved=saved)
    with pytest.raises(UserError, match="differs"):
        resolve_permutation("identity", n, saved=saved)


def test_permutation_file_alone_when_the_checkpoint_has_none(tmp_path):
    net = make_net("prime", buffers=None)
    write_dist(tmp_path, net, args=False)
    loaded, info = load_network(tmp_path, config={"vocab_size": V})
    n = loaded.base ** loaded.ell
    assert info["needs_permutation"] and info["permutation"] == f"perm_1.0_{n}.pt" and loaded.saved_perm is None
    assert "not in the checkpoint" in info["permutation_source"]
    with pytest.raises(UserError, match=f"does not carry the permutation.*perm_1.0_{n}.pt"):
        resolve_permutation(None, n, required=True, hint=info["permutation"])
    save_permutation(make_permutation(n, V, seed=3, style="megatron"), tmp_path / "p.pt")
    perm, source = resolve_permutation(tmp_path / "p.pt", n, required=True)
    assert source == str(tmp_path / "p.pt") and perm.numel() == n


def test_inconsistent_sub_tokenizer_buffers_are_refused(tmp_path):
    net = make_net("prime")
    sd = dict(net.state_dict())
    sd["subtokenizer.lookup_table"] = sd["subtokenizer.lookup_table"].flip(1).contiguous()
    write_dist(tmp_path / "a", net, sd=sd)
    with pytest.raises(UserError, match="lookup_table .* is not the base-4 digit table"):
        load_network(tmp_path / "a")
    sd = dict(net.state_dict())
    sd["subtokenizer.inv_perm"] = sd["subtokenizer.perm"].clone()
    write_dist(tmp_path / "b", net, sd=sd)
    with pytest.raises(UserError, match="inv_perm .* not the inverse"):
        load_network(tmp_path / "b")


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_describes_the_checkpoint(tmp_path, capsys, monkeypatch):
    from prime_eval.cli import main

    monkeypatch.setitem(M.SIZE_TAGS, "tiny", (2, 32, 4, 48))
    write_dist(tmp_path, make_net("prime"))
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["arch"], info["network"], info["config"]) == \
        ("prime", "megatron", "MaskedDiffModel", "tiny")
    assert (info["ell"], info["base"], info["mask_id"], info["vocab_size"]) == (4, 4, 4, V)
    assert info["permutation_source"] == "checkpoint (subtokenizer.perm)" and info["iteration"] == 100
    assert info["layout"] == "torch_dist iter_0000100 (per-layer keys, Transformer-Engine names)"
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for needle in ("prime", "megatron.MaskedDiffModel", "tiny", "layout", "per-layer keys", "permutation source",
                   "checkpoint (subtokenizer.perm)"):
        assert needle in out, needle
    assert main(["inspect", str(tmp_path), "--config", "1107M"]) == 2
    assert "config '1107M' is (layers, hidden, heads, FFN) = (22, 2048, 16, 8192)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def c4_fixtures(tmp_path_factory):
    """One tiny checkpoint per family with GPT-2's vocabulary (ℓ = 16, b = 2 for Prime), each in another layout."""
    root = tmp_path_factory.mktemp("c4")
    dims = dict(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64)
    write_dist(root / "arm", make_net("arm", vocab=50257, **dims))
    write_dist(root / "mdm", make_net("mdm", vocab=50257, **dims), stacked=True)
    write_legacy(root / "prime", make_net("prime", vocab=50257, ell=16, **dims))
    return root


@pytest.mark.parametrize("family", ["arm", "mdm", "prime"])
def test_score_and_ppl_end_to_end(c4_fixtures, shared_data, tmp_path, family, monkeypatch):
    from prime_eval.cli import main

    monkeypatch.setenv("PRIME_EVAL_CACHE", str(tmp_path / "cache"))
    info = inspect_checkpoint(c4_fixtures / family)
    if family == "prime":
        assert (info["ell"], info["base"]) == (16, 2)
    margs = f"checkpoint={c4_fixtures / family},tokenizer={shared_data / 'tokenizers' / 'gpt2'}"
    extra = ",samples=4,adaptive=false" if family != "arm" else ""
    out = tmp_path / "runs"
    assert main(["score", "--model", family, "--model_args", margs + extra, "--tasks", "piqa", "--data-dir",
                 str(shared_data), "--limit", "4", "--output_path", str(out), "--bootstrap_iters", "0"]) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = results["results"]["piqa"]["acc,none"]
    assert 0 <= acc <= 1
    if family == "prime":
        assert results["config"]["prime_eval"]["permutation_source"] == "checkpoint"
    ppl_json = tmp_path / "ppl.json"
    assert main(["ppl", "--model", family, "--model_args", margs + ",device=cpu", "--files",
                 str(shared_data / "wikitext2" / "test.txt"), "--L", "32", "--max-tokens", "200", "--no-progress",
                 "--output", str(ppl_json)] + ([] if family == "arm" else ["--samples", "2"])) == 0
    res = json.loads(ppl_json.read_text())
    assert res["model"]["arch"] == "megatron" and res["results"]["tokens"] > 0 and res["results"]["ppl"] > 1
    assert res["model"]["permutation_source"] == ("checkpoint" if family == "prime" else None)


# ------------------------------------------------------------------------------------------------ memory


def test_dist_checkpoint_is_read_without_a_second_copy(tmp_path):
    """Peak RSS growth while loading a ~36 MB fp32 torch_dist checkpoint (per-layer keys) stays below 1.3x its size:
    each stored tensor is read straight into the tensor the network adopts (DCP deserialises one stored tensor at a
    time before copying it into place, so the only transient is about twice the largest stored tensor, 1 MB here)."""
    net = make_net("mdm", num_layers=8, hidden_size=256, num_attention_heads=4, num_query_groups=4,
                   ffn_hidden_size=1024)
    write_dist(tmp_path, net)
    size = sum(f.stat().st_size for f in (tmp_path / "iter_0000100").glob("*.distcp"))
    del net
    code = (  # peak RSS (VmHWM, reset first) over the resident set before loading
        "import re, torch, torch.distributed.checkpoint, prime_eval.checkpoints as c, prime_eval.checkpoints.megatron_files\n"
        "kb = lambda k: int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "from prime_eval.networks.megatron import MegatronConfig, MaskedDiffModel\n"
        "with torch.device('meta'): MaskedDiffModel(MegatronConfig())  # one-time cost of meta kernels (~70 MB)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        f"net, info = c.load_network({str(tmp_path)!r})\n"
        "print(kb('VmHWM') - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip()) * 1024
    assert size / 2 < grew, (grew, size)  # the weights are resident (the measure works)
    assert grew < 1.3 * size, (grew, size)


def test_identity_is_the_iteration_that_is_loaded(tmp_path):
    """A run folder is identified by the iteration its tracker names (what `load_network` reads), not by every saved
    iteration: saving a later iteration and moving the tracker changes the identity; an unread iteration does not."""
    from prime_eval.checkpoints import checkpoint_sha256

    run = tmp_path / "run"
    net = make_net("mdm")
    write_dist(run, net, iteration=100)
    first = checkpoint_sha256(run)
    assert first == checkpoint_sha256(run / "iter_0000100")
    write_dist(run, make_net("mdm", seed=1), iteration=200)  # tracker now names iteration 200
    assert checkpoint_sha256(run) == checkpoint_sha256(run / "iter_0000200") != first
    (run / "latest_checkpointed_iteration.txt").write_text("100")
    assert checkpoint_sha256(run) == first  # iteration 200 on disk but not read: not part of the identity
