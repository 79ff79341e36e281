"""lm-eval's `generate_until` contract, as its `hf` model implements it, for every family's sampler.

Per request `(context, gen_kwargs)`:

  * gen_kwargs are normalised by lm-eval's own `normalize_gen_kwargs` (max_gen_toks and its aliases, default the
    model argument `max_gen_toks` = 256; do_sample=false forces temperature 0; temperature > 0 without do_sample
    samples); `until` gets the EOS text added (`handle_stop_sequences`). Besides those, only `top_k` and `top_p` are
    understood; any other key is an error (transformers' `generate` would take it; we would silently ignore it);
  * the context is encoded as for log-likelihoods (BOS per `add_bos`) and left-truncated to its last
    max_length - max_gen_toks tokens (diffusion: max_length - the answer's length), the dropped tokens counted;
    an empty context becomes `prefix_token_id`;
  * the answer's tokens are cut at the first stop token (EOS, and a Hugging Face model's own `eos_token_id`s),
    decoded without special tokens and cut at the first stop string (`postprocess_generated_text`).

Seeds: sha256(seed, "generate", task, doc_id, context, gen_kwargs, k) for the k-th identical request (lm-eval's
`repeats`), so an answer depends on the run seed and the request alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from model_adapters.scoring import request_seed
from prime_eval.errors import UserError
from prime_eval.generation import GenRequest, Generation

KNOWN = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


@dataclass
class GenItem:
    """One generate_until request as the samplers see it, and what is recorded of it."""

    request: GenRequest
    until: list[str]
    task: object = None
    doc_id: object = None
    repeat: int = 0
    truncated: int = 0
    stats: dict = field(default_factory=dict)


def parse_gen_kwargs(gen_kwargs: dict | None, default_max: int) -> tuple[dict, list[str]]:
    """(sampling options {max_gen_toks, temperature, top_k, top_p}, until without the EOS text) (module docstring)."""
    if gen_kwargs is not None and not isinstance(gen_kwargs, dict):
        raise UserError(f"generate_until: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
    raw = dict(gen_kwargs or {})
    if "max_length" in raw:
        raise UserError("generate_until: gen_kwargs max_length (prompt + answer) is not supported; give "
                        "max_gen_toks (the answer's tokens) instead")
    kw = dict(normalize_gen_kwargs(raw, default_max))
    until = kw.pop("until", None) or []
    max_gen = int(kw.pop("max_gen_toks"))
    do_sample, temperature = bool(kw.pop("do_sample", False)), float(kw.pop("temperature", 0.0) or 0.0)
    top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
    if kw:
        raise UserError(f"generate_until: gen_kwargs {sorted(kw)} are not supported (known: {', '.join(KNOWN)})")
    if max_gen < 0:
        raise UserError(f"generate_until: max_gen_toks={max_gen} must be >= 0")
    if do_sample and temperature <= 0:
        raise UserError("generate_until: do_sample=true needs temperature > 0 (transformers refuses temperature 0 "
                        "with sampling); use do_sample=false for greedy decoding")
    if not do_sample:
        temperature = 0.0
    if top_k is not None and int(top_k) < 1:
        raise UserError(f"generate_until: top_k={top_k} must be >= 1")
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise UserError(f"generate_until: top_p={top_p} must lie in (0, 1]")
    until = [until] if isinstance(until, str) else list(until)
    return {"max_gen_toks": max_gen, "temperature": temperature, "top_k": None if top_k is None else int(top_k),
            "top_p": None if top_p is None else float(top_p)}, until


def build_items(lm, requests, answer_tokens=None) -> list[GenItem]:
    """GenItems of lm-eval `Instance`s for adapter `lm` (tok_encode, max_length, prefix_token_id, seed).

    answer_tokens(max_gen_toks) -> the tokens the answer takes in the window (diffusion: its fixed length)."""
    eos_text = lm.tokenizer.decode([lm.eot_token_id], skip_special_tokens=False) if lm.eot_token_id is not None \
        else None
    stop_ids = lm.stop_token_ids()
    seen: dict[str, int] = {}
    items = []
    for req in requests:
        context, gen_kwargs = req.args
        opts, until = parse_gen_kwargs(gen_kwargs, lm.settings.max_gen_toks)
        until = handle_stop_sequences(until, eos=eos_text)
        reserve = answer_tokens(opts["max_gen_toks"]) if answer_tokens else opts["max_gen_toks"]
        room = lm.max_length - reserve
        if room <= 0:
            raise UserError(f"generate_until: max_gen_toks={opts['max_gen_toks']} leaves no room for the prompt in "
                            f"max_length={lm.max_length}; lower max_gen_toks or raise max_length")
        ids = lm.tok_encode(context)
        kept = ids[-room:] or [lm.prefix_token_id]
        task, doc_id = getattr(req, "task_name", None), getattr(req, "doc_id", None)
        key = json.dumps([str(task), str(doc_id), context, _jsonable(gen_kwargs)], sort_keys=True, default=str)
        k = seen[key] = seen.get(key, -1) + 1
        seed = request_seed(lm.seed, "generate", str(task), str(doc_id), context,
                            json.dumps(_jsonable(gen_kwargs), sort_keys=True, default=str), str(k))
        items.append(GenItem(GenRequest(tuple(kept), opts["max_gen_toks"], seed, opts["temperature"], opts["top_k"],
                                        opts["top_p"], stop_ids), until, task, doc_id, k,
                             max(0, len(ids) - len(kept))))
    return items


def answer_text(lm, item: GenItem, gen: Generation) -> str:
    """The answer string: tokens cut at the first stop token, decoded without special tokens, cut at the first stop
    string (lm-eval `hf`)."""
    toks = list(gen.tokens)
    cut = next((i for i, t in enumerate(toks) if t in item.request.stop_ids), None)
    if cut is not None:
        toks = toks[:cut]
    text = lm.tokenizer.decode(toks, skip_special_tokens=True)
    return postprocess_generated_text(text, item.until, None)


def stop_string_seen(lm, until: list[str], tokens: list[int]) -> bool:
    """Whether a stop string appears in the decoded answer so far (then the answer is complete: it is cut there)."""
    text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
    return any(u and u in text for u in until)


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))
