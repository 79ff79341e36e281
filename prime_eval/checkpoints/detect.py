"""Which network a checkpoint holds: the architecture from key names, then the architecture's detector.

    lit_gpt   transformer.wte + transformer.h.{i}.attn.attn     (`detect_lit_gpt`)
    mdlm      vocab_embed + blocks.{i}                          (`detect_mdlm`)
    megatron  embedding.word_embeddings / encoder.layers / ...  (`detect_megatron`)
    hf        a transformers directory or hub id whose keys are none of the above
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from prime_eval.checkpoints.containers import Source
from prime_eval.checkpoints.detect_lit_gpt import detect_lit_gpt
from prime_eval.checkpoints.detect_megatron import detect_megatron_spec
from prime_eval.checkpoints.detect_mdlm import detect_mdlm
from prime_eval.checkpoints.spec import FAMILIES, Spec, family_option
from prime_eval.errors import UserError

_LIT_ATTN = re.compile(r"transformer\.h\.\d+\.attn\.attn\.weight$")


def guess_arch(src: Source) -> str | None:
    s = src.shapes
    if "transformer.wte.weight" in s and any(_LIT_ATTN.match(k) for k in s):  # (GPT-2's blocks have attn.c_attn)
        return "lit_gpt"
    if "vocab_embed.embedding" in s and any(k.startswith("blocks.") for k in s):
        return "mdlm"
    if any(k.startswith(("embedding.word_embeddings", "encoder.layers.", "decoder.layers.")) for k in s):
        return "megatron"
    if src.format in ("hf-dir", "hf-hub"):
        return "hf"
    return None


def detect(src: Source, *, family=None, arch=None, config=None, ell=None, base=None, carry_over=None) -> Spec:
    if family is not None and family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    guessed = guess_arch(src)
    arch = arch or guessed
    if arch is None:
        sample = ", ".join(list(src.shapes)[:8])
        raise UserError(f"{src.path}: unrecognised checkpoint layout (keys: {sample}, ...). Supported: lit_gpt "
                        "(transformer.wte / transformer.h.N.attn.attn / lm_head), MDLM DiT (vocab_embed / blocks / "
                        "output_layer), Megatron-Core (embedding.word_embeddings / decoder.layers), and Hugging Face "
                        "model directories or hub ids.")
    if guessed and arch != guessed and not (arch == "hf" and guessed in (None, "hf")):
        raise UserError(f"format {arch!r} does not match the file, whose keys look like {guessed!r}")
    if arch == "lit_gpt":
        return detect_lit_gpt(src, family, config, ell, base)
    if arch == "mdlm":
        return detect_mdlm(src, family, config, ell, base, carry_over)
    if arch == "megatron":
        return detect_megatron_spec(src, family, config, ell, base)
    if family not in (None, "arm"):
        raise UserError(f"{src.path} is a Hugging Face causal LM (its weights carry neither lit_gpt nor MDLM DiT "
                        f"keys): transformers' AutoModelForCausalLM models are ARMs, so {family_option(family)} does not "
                        "fit; use arm.")
    hp = src.hparams or {}
    vs = config.get("vocab_size") if isinstance(config, Mapping) else None
    return Spec("hf", "HFCausalLM", "arm", None, hp.get("_name_or_path") or None, vocab_size=vs or hp.get("vocab_size"))
