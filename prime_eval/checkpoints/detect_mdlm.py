"""Detecting an MDLM / MDM-Prime v1 DiT checkpoint's network (OpenWebText; Lightning `.ckpt` or a hub folder).

From the shapes: d (norm1), blocks, the σ-map (absent → the causal AR baseline), the embedding width (d → DIT, d/ℓ →
PerceiverDIT with ℓ = d / width and b = rows − 1), the output classes (V + 1 with a mask class, V for Prime), the
head size from `rotary_emb.inv_freq`. From the hydra config (`hyper_parameters.config`): n_heads, cond_dim, length,
and Prime's `carry_over`.
"""
from __future__ import annotations

from prime_eval.checkpoints.containers import Source
from prime_eval.checkpoints.spec import Spec, family_option, layers, merge_config
from prime_eval.checkpoints.unpickle import get
from prime_eval.errors import UserError
from prime_eval.networks import mdlm_dit


def detect_mdlm(src: Source, family, config, ell, base, carry_over) -> Spec:
    s, hp = src.shapes, src.hparams or {}
    notes: list[str] = []
    assumed: dict[str, str] = {}
    d = s["blocks.0.norm1.weight"][0]
    n_blocks = layers(s, r"blocks\.(\d+)\.")
    rows, width = s["vocab_embed.embedding"]
    v_out = s["output_layer.linear.weight"][0]
    adaln = "sigma_map.mlp.0.weight" in s
    hs = 2 * s["rotary_emb.inv_freq"][0] if "rotary_emb.inv_freq" in s else None
    model_hp = get(hp, "model", default={}) or {}
    n_heads = model_hp.get("n_heads") or hp.get("n_heads") or (d // hs if hs else None)
    if n_heads is None:
        n_heads = d // 64
        notes.append(f"n_heads not in the file; assumed head size 64 (n_heads={n_heads})")
        assumed["n_heads"] = "head size 64 (no rotary_emb.inv_freq, no hydra config); pass n_heads=…"
    cond = s["sigma_map.mlp.2.weight"][0] if adaln else (model_hp.get("cond_dim") or hp.get("cond_dim") or 128)
    length = model_hp.get("length") or hp.get("model_length") or 1024
    mlp_ratio = s["blocks.0.mlp.0.weight"][0] // d if "blocks.0.mlp.0.weight" in s else 4
    name = mdlm_dit.find_config(d, n_blocks)
    if not adaln:
        shape_family, V = "arm", v_out - 1
    elif width == d:
        shape_family, V = "mdm", v_out - 1
    else:
        shape_family, V = "prime", v_out
    fam = family or shape_family
    if family and family != shape_family:
        raise UserError(f"{family_option(family)} does not fit this MDLM-style file: it looks like {shape_family!r} "
                        f"(σ-map present: {adaln}, vocab_embed {rows}×{width}, d={d}, output {v_out}).")
    cfg = mdlm_dit.DiTConfig(name=name or "", hidden_size=d, n_blocks=n_blocks, n_heads=int(n_heads), cond_dim=cond,
                             length=int(length), mlp_ratio=mlp_ratio, vocab_size=V)
    if isinstance(config, str):
        try:
            named = mdlm_dit.DiTConfig.from_name(config, vocab_size=V)
        except KeyError as e:
            raise UserError(str(e.args[0])) from e
        cfg, name = named, named.name
    else:
        cfg = merge_config(mdlm_dit.DiTConfig, cfg, config)
    network = {"arm": "AR", "mdm": "DIT", "prime": "PerceiverDIT"}[fam]
    spec = Spec("mdlm", network, fam, cfg, name, vocab_size=cfg.vocab_size, notes=notes, assumed=assumed)
    if fam == "prime":
        if d % width:
            raise UserError(f"vocab_embed width {width} does not divide hidden size {d}")
        spec.ell, spec.base = d // width, rows - 1
        if (ell and ell != spec.ell) or (base and base != spec.base):
            raise UserError(f"ell={ell}, base={base} contradict the file: vocab_embed ({rows}, {width}) with d={d} "
                            f"means ℓ={spec.ell}, b={spec.base}")
        if spec.base ** spec.ell < cfg.vocab_size:
            raise UserError(f"b={spec.base}, ℓ={spec.ell}: {spec.base ** spec.ell} codes < vocabulary {cfg.vocab_size}")
        co_hp = get(hp, "prime", "carry_over")
        if carry_over is not None:
            spec.carry_over = bool(carry_over)
            if co_hp is not None and bool(co_hp) != spec.carry_over:
                notes.append(f"carry_over={spec.carry_over} overrides the checkpoint's config ({co_hp})")
        elif co_hp is not None:
            spec.carry_over = bool(co_hp)
        else:
            notes.append("carry_over not recorded in the file; using False (pass carry_over=True for *_co_* runs)")
            assumed["carry_over"] = "not recorded in the file; pass carry_over=true for *_co_* runs"
        hp_ell = get(hp, "prime", "target_length")
        if hp_ell is not None and int(hp_ell) != spec.ell:
            notes.append(f"config target_length={hp_ell} differs from the shapes (ℓ={spec.ell}); shapes win")
    if get(hp, "time_conditioning") or get(hp, "model", "time_conditioning"):
        notes.append("trained with time_conditioning; the network evaluates σ = 0 unless forward(sigma=...) is given")
    return spec
