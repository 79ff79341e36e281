"""Megatron C4 family: which network a Megatron checkpoint's tensors belong to (checkpoint-formats.md §4).

    det = detect(read(path, load=torch_load))   # network, family, MegatronConfig (size tag, ℓ, b, …), notes, info

From the canonical shapes (`prime_eval.checkpoints.megatron_files`), Megatron's `args` when the files carry them, and options:
`decoder.` layers → ARM `GPTModel`; `encoder.` → `MaskedDiffModel`, MDM when the embedding is as wide as d, Prime
with ℓ = d / width otherwise. Head size from the q/k-layernorm width, query groups from the `linear_qkv` rows, FFN from
`linear_fc1`, b = ⌈V^(1/ℓ)⌉ (checked against a saved lookup table), embedding type from the row count, V from
`args.vocab_size`, the MDM's lookup table, `config`, or GPT-2's 50257. Row counts always come from the tensors.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from prime_eval.errors import UserError
from prime_eval.checkpoints.megatron_files import PER_LAYER_KEY, MegatronCheckpoint
from prime_eval.networks.megatron import GPT2_VOCAB, SIZE_TAGS, MegatronConfig, size_tag
from prime_eval.subtokenizer import base_from_ell


@dataclass
class Detection:
    network: str  # "GPTModel" | "MaskedDiffModel"
    family: str
    config: MegatronConfig
    notes: list[str]
    info: dict  # fields for `inspect` (layout, permutation source, …)


def _fail(mc: MegatronCheckpoint, msg: str):
    raise UserError(f"{mc.path} (Megatron checkpoint): {msg}")


def detect(mc: MegatronCheckpoint, *, family: str | None = None, config=None, ell: int | None = None,
           base: int | None = None) -> Detection:
    """What network these tensors belong to (checkpoint-formats.md §4). `config`: a size tag ("1107M") or a dict of
    `MegatronConfig` fields overriding what was detected (e.g. {"vocab_size": 100})."""
    s, args, notes = mc.shapes, mc.args, []
    overrides = dict(config) if isinstance(config, Mapping) else {}
    known = {f.name for f in fields(MegatronConfig)}
    if set(overrides) - known:
        raise UserError(f"unknown config field(s) {sorted(set(overrides) - known)} for a Megatron checkpoint; "
                        f"known: {sorted(known)}")
    blocks = sorted({k.split(".")[0] for k in s if PER_LAYER_KEY.match(k)})
    if len(blocks) != 1:
        _fail(mc, f"expected the layers of one transformer block (decoder: ARM, encoder: MDM / Prime), found "
                  f"{blocks or 'none'}")
    block = blocks[0]
    lay = f"{block}.layers.0."
    for k in ("embedding.word_embeddings.weight", lay + "self_attention.linear_qkv.weight",
              lay + "mlp.linear_fc1.weight"):
        if k not in s:
            _fail(mc, f"no {k}: not a Megatron GPTModel / MaskedDiffModel state dict (keys: "
                      f"{', '.join(list(s)[:6])}, …)")
    if lay + "self_attention.q_layernorm.weight" not in s and not overrides.get("kv_channels"):
        _fail(mc, "no q_layernorm / k_layernorm weights: only the C4 runs' configuration (--qk-layernorm, RMSNorm, "
                  "SwiGLU, RoPE, no biases) is implemented")
    for arg, want in (("normalization", "RMSNorm"), ("swiglu", True), ("position_embedding_type", "rope"),
                      ("add_bias_linear", False), ("qk_layernorm", True)):
        if args.get(arg) not in (None, want):
            _fail(mc, f"trained with {arg}={args[arg]!r}; only the C4 runs' configuration ({arg}={want!r}) is "
                      "implemented")
    n_layers = len({int(m[2]) for k in s if (m := PER_LAYER_KEY.match(k))})
    qkv_rows, d = s[lay + "self_attention.linear_qkv.weight"]
    ffn = s[lay + "mlp.linear_fc1.weight"][0] // 2
    hs = overrides.get("kv_channels") or s.get(lay + "self_attention.q_layernorm.weight", (None,))[0]
    heads = overrides.get("num_attention_heads") or args.get("num_attention_heads") or d // hs
    groups = (qkv_rows // hs - heads) // 2
    if qkv_rows != (heads + 2 * groups) * hs or groups < 1 or heads % groups:
        _fail(mc, f"linear_qkv has {qkv_rows} rows, which is not (H + 2g)·hs for H={heads}, hs={hs}; pass "
                  "config num_attention_heads=H")
    rows, width = s["embedding.word_embeddings.weight"]
    tied = "output_layer.weight" not in s
    out_rows = rows if tied else s["output_layer.weight"][0]
    table = s.get("subtokenizer.lookup_table")
    vocab_from = "config" if overrides.get("vocab_size") else "args" if isinstance(args.get("vocab_size"), int) \
        else "lookup_table" if block == "encoder" and width == d and table else "GPT-2"
    V = overrides.get("vocab_size") or args.get("vocab_size") or (table[0] if vocab_from == "lookup_table"
                                                                    else GPT2_VOCAB)
    shape_family = "arm" if block == "decoder" else "mdm" if width == d else "prime"
    if family and family != shape_family:
        raise UserError(f"--family {family} does not fit this Megatron checkpoint: it looks like family "
                        f"{shape_family!r} ({block} layers, embedding {rows}×{width}, hidden size {d})")
    if out_rows < V:
        _fail(mc, f"the output has {out_rows} rows, fewer than the V = {V} tokens ({vocab_from}); pass config "
                  "vocab_size=N")
    cfg = MegatronConfig(
        num_layers=n_layers, hidden_size=d, num_attention_heads=heads, num_query_groups=groups, ffn_hidden_size=ffn,
        kv_channels=hs if hs != d // heads else None, vocab_size=V, embedding_rows=rows,
        output_rows=None if tied else out_rows, untie_embeddings_and_output_weights=not tied,
        seq_length=args.get("seq_length") or args.get("max_position_embeddings") or 2048,
        rotary_base=(args.get("rotary_base") or 10000) if block == "decoder" else 10000,
        rotary_percent=args.get("rotary_percent") or 1.0, norm_epsilon=args.get("norm_epsilon") or 1e-5)
    if block == "encoder" and args.get("rotary_base") not in (None, 10000):
        notes.append(f"args.rotary_base={args['rotary_base']} ignored: MaskedDiffModel builds RoPE with base 10000")
    info = {"layout": mc.layout(), "iteration": mc.iteration, "tensor_parallel": mc.tensor_parallel,
            "tied_output": tied, "extra_output_rows": out_rows - V, "permutation_source": None,
            "needs_permutation": False, "permutation": None}
    if block == "decoder":
        network = "GPTModel"
        if rows < V:
            _fail(mc, f"the embedding has {rows} rows, fewer than V = {V}")
        if vocab_from == "GPT-2":
            notes.append(f"V = {V} (GPT-2 BPE, every C4 run) assumed; the output's {out_rows - V} padded rows "
                         "are dropped")
    else:
        network = "MaskedDiffModel"
        cfg = _masked_diff(mc, cfg, shape_family, ell, base, args, info, notes)
    if overrides:
        cfg = replace(cfg, **overrides)
    tag = size_tag(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size)
    if isinstance(config, str):
        if config not in SIZE_TAGS:
            raise UserError(f"unknown Megatron size tag {config!r}; known: {', '.join(SIZE_TAGS)}")
        if config != tag:
            _fail(mc, f"config {config!r} is (layers, hidden, heads, FFN) = {SIZE_TAGS[config]}, the file has "
                      f"{(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size)}")
    cfg = replace(cfg, name=tag or "")
    dims = ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
            "embedding_rows", "output_rows", "seq_length"]
    if network == "MaskedDiffModel":
        dims += ["target_length", "base", "embedding_type"]
    info.update(non_embedding_params=cfg.non_embedding_params(), max_length=cfg.seq_length,
                mask_id=cfg.base if network == "MaskedDiffModel" else None,
                dims={k: getattr(cfg, k) for k in dims if k != "output_rows" or not tied})
    return Detection(network, shape_family, cfg, notes, info)


def _masked_diff(mc, cfg: MegatronConfig, fam: str, ell, base, args: dict, info: dict, notes: list) -> MegatronConfig:
    """ℓ, b, embedding type and sub-tokenizer of a MaskedDiffModel (checkpoint-formats.md §4.2)."""
    s, V, d = mc.shapes, cfg.vocab_size, cfg.hidden_size
    rows, width = s["embedding.word_embeddings.weight"]
    buffers = {k.split(".", 1)[1]: v for k, v in s.items() if k.startswith("subtokenizer.")}
    table = buffers.get("lookup_table")
    if fam == "mdm":
        if (ell and ell != 1) or (table and len(table) == 2 and table[1] > 1) or (args.get("target_length") or 1) > 1:
            _fail(mc, "embedding width = hidden size with ℓ > 1 is the `sum` embedding type, which no released run "
                      "uses and which is not implemented")
        if rows < V + 1:
            _fail(mc, f"an MDM embedding needs V + 1 = {V + 1} rows (the last is [MASK]), the file has {rows}")
        return replace(cfg, target_length=1, base=V, subtokenizer_buffers=buffers)
    if d % width:
        _fail(mc, f"embedding width {width} does not divide the hidden size {d}")
    L = d // width
    if ell and ell != L:
        raise UserError(f"ell={ell} contradicts the file: embedding width {width} with hidden size {d} means ℓ={L}")
    if table and len(table) == 2 and table[1] != L:
        _fail(mc, f"subtokenizer.lookup_table {table} has {table[1]} digits, the embedding says ℓ={L}")
    b = base or (round(table[0] ** (1 / L)) if table else base_from_ell(V, L))
    if (base and table and base ** L != table[0]) or b ** L < V:
        raise UserError(f"base={b} with ℓ={L} gives {b ** L} codes, " + (f"the saved lookup table has {table[0]}"
                        if table else f"fewer than V = {V}"))
    emb_type = args.get("embedding_type")
    if emb_type is None:
        emb_type = "cat" if rows == (b + 1) * L else "cat-share"
    if emb_type not in ("cat", "cat-share"):
        _fail(mc, f"embedding_type={emb_type!r} is not implemented (the released runs use cat-share)")
    need = (b + 1) * L if emb_type == "cat" else b + 1
    if rows < need or (emb_type == "cat" and rows != need):
        _fail(mc, f"a {emb_type} embedding for b={b}, ℓ={L} needs {need} rows, the file has {rows}")
    if args.get("target_length") not in (None, L):
        _fail(mc, f"args.target_length={args['target_length']} but the embedding width says ℓ={L}")
    ratio = float(args.get("random_ratio") if args.get("random_ratio") is not None else 1.0)
    perm_file = f"perm_{ratio}_{b ** L}.pt"
    if buffers.get("perm") and buffers["perm"][0] > 0:
        info.update(permutation_source="checkpoint (subtokenizer.perm)", permutation=perm_file)
    elif args.get("subtokenizer_type") == "baseb" or (table and "perm" not in buffers):
        info.update(permutation_source="identity (subtokenizer baseb, no shuffling)")
    else:
        info.update(permutation_source=f"not in the checkpoint: pass permutation={perm_file}",
                    needs_permutation=True, permutation=perm_file)
    return replace(cfg, target_length=L, base=b, embedding_type=emb_type, subtokenizer_buffers=buffers)


def detect_megatron_spec(src, family, config, ell, base):
    """The `Spec` of a Megatron checkpoint (`checkpoints.detect` dispatches here); a flat state dict read from another
    container (safetensors, a converted torch file) has its keys mapped to the canonical names first."""
    from prime_eval.checkpoints import megatron_files
    from prime_eval.checkpoints.spec import Spec

    if src.megatron is None:
        mc = megatron_files.from_flat(src.path, src.format, src.shapes, src.dtypes, src.tensors)
        src.shapes, src.dtypes, src.tensors, src.megatron = dict(mc.shapes), dict(mc.dtypes), mc.tensors, mc
        src.ignored += mc.ignored
    det = detect(src.megatron, family=family, config=config, ell=ell, base=base)
    cfg = det.config
    return Spec("megatron", det.network, det.family, cfg, cfg.name or None, ell=cfg.target_length,
                base=cfg.base if cfg.target_length > 1 else None, vocab_size=cfg.vocab_size, notes=det.notes,
                extra={"info": det.info})
