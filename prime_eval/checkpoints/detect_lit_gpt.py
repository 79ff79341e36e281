"""Detecting a lit_gpt checkpoint's network (SMDM / MDM-Prime-v2 releases, and Llama models converted to this layout).

Evidence, strongest first: the user's `config` option; a `config.json` in the checkpoint folder (transformers names
such as `num_attention_heads`, `num_key_value_heads`, `rope_theta`, `rms_norm_eps`, or the lit_gpt field names); a
`Diff_LLaMA_*M` release layout recognised from (n_layer, d, I) with plain multi-head attention and an untied head;
the shapes. What the shapes say:

    n_embd, n_layer, intermediate_size      ln_f / wte width, `transformer.h.{i}` indices, w1 rows
    n_query_groups g                        attn.attn rows = (H + 2g)·hs with hs = d/H  →  g = (rows/hs − H)/2
    tie_embeddings                          no `lm_head.weight` (an ARM whose output layer is `wte`)
    family                                  wte rows: ARM = lm_head rows, MDM = one more, Prime = (b+1)·ℓ

n_head is not in the shapes (3d rows fit any H), and neither are the RoPE base, the norm eps and the context length:
they come from the evidence above or are *assumed* (defaults listed in `Spec.assumed`). `rope_bf16` (the lit_gpt
training code's bf16 RoPE table, 0.1 in the logits) defaults to true for the lit_gpt lineage and to false when the
file shows a feature no lit_gpt release has (tied embeddings, grouped-query attention, a RoPE base other than 10000,
a transformers config.json): those are models converted from transformers, whose RoPE table is fp32.
"""
from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass

from prime_eval.checkpoints.containers import Source
from prime_eval.checkpoints.spec import Spec, check_fields, family_option, layers
from prime_eval.errors import UserError
from prime_eval.networks import lit_gpt
from prime_eval.subtokenizer import base_from_ell

RELEASE_ROPE_BASE = 10000
# transformers config.json name -> lit_gpt Config field
HF_CONFIG_FIELDS = {"num_attention_heads": "n_head", "num_key_value_heads": "n_query_groups",
                    "rms_norm_eps": "norm_eps", "max_position_embeddings": "block_size"}
# lit_gpt field names a config.json may carry directly
LIT_CONFIG_FIELDS = ("n_head", "n_query_groups", "rope_base", "norm_eps", "block_size", "rotary_percentage",
                     "condense_ratio", "rope_bf16")


def prime_candidates(rows: int, vocab: int) -> list[tuple[int, int]]:
    """(ℓ, b) with b = ⌈V^(1/ℓ)⌉ and (b+1)·ℓ = rows (the lit_gpt Prime table size)."""
    out = []
    for ell in range(2, 65):
        b = base_from_ell(vocab, ell)
        if (b + 1) * ell == rows:
            out.append((ell, b))
    return sorted(out, key=lambda t: t[1])  # smallest base (the binary release) first


def config_json_fields(hp: dict) -> dict:
    """lit_gpt Config fields stated by a config.json beside lit_gpt-keyed weights (transformers or lit_gpt names)."""
    out = {f: hp[k] for k, f in HF_CONFIG_FIELDS.items() if hp.get(k) is not None}
    out.update({k: hp[k] for k in LIT_CONFIG_FIELDS if hp.get(k) is not None})
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    theta = hp.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None)
    if theta is not None:
        out["rope_base"] = int(theta) if float(theta).is_integer() else float(theta)
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in (None, "default"):
        raise UserError(f"config.json asks for RoPE scaling {kind!r}; the lit_gpt network has plain RoPE only")
    if hp.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json has hidden_act={hp['hidden_act']!r}; the lit_gpt network's MLP is SwiGLU (silu)")
    hd, H = hp.get("head_dim"), out.get("n_head")
    if hd and H and hp.get("hidden_size") and hd * H != hp["hidden_size"]:
        raise UserError(f"config.json has head_dim={hd} with {H} heads and hidden_size={hp['hidden_size']}; the "
                        "lit_gpt network needs head_dim = hidden_size / n_head")
    return out


def detect_lit_gpt(src: Source, family, config, ell, base) -> Spec:
    s = src.shapes
    d = s["transformer.ln_f.weight"][0] if "transformer.ln_f.weight" in s else s["transformer.wte.weight"][1]
    n_layer = layers(s, r"transformer\.h\.(\d+)\.")
    inter = s.get("transformer.h.0.mlp.swiglu.w1.weight", (None,))[0]
    qkv_rows = s.get("transformer.h.0.attn.attn.weight", (None,))[0]
    rows = s["transformer.wte.weight"][0]
    tied = "lm_head.weight" not in s
    v_pad = rows if tied else s["lm_head.weight"][0]
    inferred: dict[str, str] = {}
    assumed: dict[str, str] = {}
    cfg_fields: dict = {"n_layer": n_layer, "n_embd": d, "intermediate_size": inter or 4 * d}
    if isinstance(config, (str, int)):  # a name: its dims (a wrong name shows up as mis-shaped keys)
        try:
            named = lit_gpt.Config.from_name(str(config))
        except KeyError as e:
            raise UserError(str(e.args[0]) + " (or pass a dict of Config fields)") from e
        name, user = named.name, {}
        cfg_fields.update(n_layer=named.n_layer, n_embd=named.n_embd, n_head=named.n_head,
                          n_query_groups=named.n_query_groups, intermediate_size=named.intermediate_size)
        inferred["n_head"] = inferred["n_query_groups"] = f"the {name} config you named"
    else:
        user = asdict(config) if is_dataclass(config) else dict(config or {})
        check_fields(lit_gpt.Config, user)
        user.pop("name", None)
        release = not tied and qkv_rows == 3 * d  # every release: plain MHA and an untied lm_head
        name = lit_gpt.find_config(n_layer, d, inter) if inter and release else None
        if name:
            cfg_fields["n_head"] = lit_gpt.Config.from_name(name).n_head
            inferred["n_head"] = f"the {name} release layout (n_layer, n_embd, intermediate_size)"
    if src.format == "hf-dir" and src.hparams:
        from_json = config_json_fields(src.hparams)
        cfg_fields.update(from_json)
        inferred.update({k: "config.json" for k in from_json})
    cfg_fields.update(user)
    for k in user:  # said by the user: neither inferred nor assumed
        inferred.pop(k, None)

    H = cfg_fields.get("n_head")
    if H is None:
        raise UserError(
            f"lit_gpt checkpoint with n_layer={n_layer}, n_embd={d}, intermediate_size={inter}"
            f"{', tied embeddings' if tied else ''} matches no Diff_LLaMA config, and n_head cannot be read from "
            "shapes; pass config={'n_head': H} (CLI: --config n_head=H; model_args: config=n_head=H) or a config "
            "name. n_query_groups then follows from the attn.attn.weight rows.")
    if "n_query_groups" not in cfg_fields and qkv_rows:
        d = cfg_fields["n_embd"]
        g = lit_gpt.query_groups_from_qkv_rows(qkv_rows, d, int(H))
        if g is None:
            raise UserError(
                f"n_head={H} does not fit transformer.h.0.attn.attn.weight ({qkv_rows}, {d}): its rows are "
                f"(n_head + 2·n_query_groups)·head_size with head_size = n_embd/n_head"
                f"{f' = {d // int(H)}' if H and d % int(H) == 0 else ' (not an integer)'}, and no n_query_groups "
                "dividing n_head fits. Check n_head (and n_embd), or pass n_query_groups.")
        cfg_fields["n_query_groups"] = g
        inferred["n_query_groups"] = (f"attn.attn.weight rows {qkv_rows} = (n_head {H} + 2·{g})·head_size "
                                      f"{d // int(H)}")
    cfg_fields["tie_embeddings"] = cfg_fields.get("tie_embeddings", tied)
    if tied and "tie_embeddings" not in user:
        inferred["tie_embeddings"] = "no lm_head.weight in the file: the output layer is wte"
    # The vocabulary is lm_head's (or the tied wte's) row count unless the options say otherwise.
    cfg_fields.setdefault("vocab_size", v_pad)
    cfg_fields.setdefault("padded_vocab_size", v_pad)
    _rope_and_context(cfg_fields, name, tied, src, inferred, assumed)
    try:
        cfg = lit_gpt.Config(**{"name": name or "", **cfg_fields})
    except ValueError as e:
        raise UserError(f"lit_gpt config does not hold together: {e}") from e
    V = cfg.vocab_size
    # Family from the embedding rows: ARM V_pad, MDM V_pad + 1, Prime (b+1)·ℓ.
    shape_family = "arm" if rows == cfg.padded_vocab_size else "mdm" if rows == cfg.padded_vocab_size + 1 else "prime"
    fam = family or shape_family
    if family and family != shape_family:
        raise UserError(f"{family_option(family)} does not fit this lit_gpt file: transformer.wte.weight has {rows} "
                        f"rows and lm_head {cfg.padded_vocab_size} (ARM: equal, MDM: one more, Prime: (b+1)·ℓ); it "
                        f"looks like family {shape_family!r}.")
    if cfg.tie_embeddings and fam != "arm":
        raise UserError(f"{src.path} has no lm_head.weight (tied embeddings): only a lit_gpt ARM can tie its output "
                        "layer to wte; an MDM / Prime file must hold lm_head.weight.")
    spec = Spec("lit_gpt", "GPT" if fam == "arm" else "TransEncoder", fam, cfg, name, vocab_size=V,
                inferred=inferred, assumed=assumed)
    if fam == "prime":
        _prime_ell_base(spec, rows, V, ell, base)
    return spec


def _rope_and_context(cfg_fields: dict, name: str | None, tied: bool, src: Source, inferred: dict,
                      assumed: dict) -> None:
    """Fill rope_base, rope_bf16, norm_eps and block_size: stated, from a release layout, or assumed (said so)."""
    defaults = {f.name: f.default for f in fields(lit_gpt.Config)}
    for k, how in (("rope_base", "pass rope_base=… (e.g. 100000) if the model was trained with another"),
                   ("norm_eps", "pass norm_eps=… (the RMSNorm epsilon, e.g. 1e-6)"),
                   ("block_size", "the longest input in tokens; pass block_size=…")):
        if k in cfg_fields:
            continue
        cfg_fields[k] = defaults[k]
        if name:
            inferred[k] = f"the {name} release layout"
        else:
            assumed[k] = f"the lit_gpt default, not in the weights; {how}"
    if "rope_bf16" in cfg_fields:
        return
    H, g = cfg_fields["n_head"], cfg_fields.get("n_query_groups") or cfg_fields["n_head"]
    converted = [why for cond, why in (
        (tied, "tied embeddings"), (g != H, "grouped-query attention"),
        (cfg_fields["rope_base"] != RELEASE_ROPE_BASE, f"RoPE base {cfg_fields['rope_base']}"),
        (src.format == "hf-dir" and "model_type" in (src.hparams or {}), "a transformers config.json")) if cond]
    cfg_fields["rope_bf16"] = not converted
    if converted:
        assumed["rope_bf16"] = (f"{', '.join(converted)}: no lit_gpt release has this, so the model is taken as "
                                "converted from transformers (fp32 RoPE table); pass rope_bf16=true if it was trained "
                                "with the lit_gpt/SMDM code")
    elif name:
        inferred["rope_bf16"] = f"the {name} release (lit_gpt rounds the RoPE cos/sin table to bf16)"
    else:
        assumed["rope_bf16"] = ("the lit_gpt/SMDM training code rounds the RoPE cos/sin table to bf16; a model "
                                "converted from transformers (e.g. a Hugging Face Llama) needs rope_bf16=false, "
                                "else its logits are off by ~0.1")


def _prime_ell_base(spec: Spec, rows: int, V: int, ell, base) -> None:
    if ell and base:
        if (base + 1) * ell != rows:
            raise UserError(f"ell={ell}, base={base} need a ({(base + 1) * ell}, d) sub-token table, the file has "
                            f"{rows} rows; candidates from the shapes: {prime_candidates(rows, V) or 'none'}")
        spec.ell, spec.base = ell, base
    elif ell or base:
        if ell and rows % ell == 0:
            spec.ell, spec.base = ell, rows // ell - 1
        elif base and rows % (base + 1) == 0:
            spec.ell, spec.base = rows // (base + 1), base
        else:
            raise UserError(f"ell={ell} base={base} do not divide the {rows}-row sub-token table")
    else:
        cands = prime_candidates(rows, V)
        if not cands:
            cfg = spec.config
            raise UserError(f"transformer.wte.weight has {rows} rows: not ARM ({cfg.padded_vocab_size}), MDM "
                            f"({cfg.padded_vocab_size + 1}) nor a Prime table (b+1)·ℓ with b = ⌈{V}^(1/ℓ)⌉; "
                            "pass ell and base.")
        spec.ell, spec.base = cands[0]
        spec.extra["ell_candidates"] = [list(c) for c in cands]
        if len(cands) > 1:
            spec.notes.append(f"(ℓ, b) not unique from shapes: {cands} all give {rows} rows; assumed ℓ={spec.ell}, "
                              f"b={spec.base} (the released model); pass ell/base to override")
    if spec.base ** spec.ell < V:
        raise UserError(f"base={spec.base}, ell={spec.ell}: {spec.base ** spec.ell} codes < vocabulary {V}")
    spec.extra["permutation"] = f"perm_{spec.base ** spec.ell}.pt"
