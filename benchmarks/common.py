"""Shared pieces of the benchmarks: the demo's trained reference models and real multiple-choice requests.

Models: the tiny ARM / MDM / Prime-v2 networks `prime-eval demo` trains (cached under ~/.cache/prime-eval/demo,
keyed by seed and settings), loaded through the harness's own loaders. Requests: real documents from
$PRIME_EVAL_DATA (piqa, arc_easy, ...), encoded as the adapters do (BOS + context, trailing context whitespace moved to
the continuation), one request per choice.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRIME_EVAL_DATA", ROOT.parent / "shared" / "data"))


def demo_models(quick: bool = False, seed: int = 0, with_artifacts: bool = False):
    """{family: (net, tokenizer, subtokenizer|None)} of the demo's trained models (trains them once if needed);
    with_artifacts: also the demo's ModelArtifacts (checkpoint, tokenizer and permutation paths)."""
    from rich.console import Console

    from prime_eval import demo
    from prime_eval.synthetic import generate

    settings = demo.default_settings(seed=seed, quick=quick)
    data = generate(settings.language, settings.n_train, settings.n_heldout, settings.n_task_items)
    art = demo.ensure_models(settings, data, demo.default_cache_dir(), console=Console(stderr=True))
    models = {f: demo.load_demo_network(f, art, settings)[:3] for f in ("arm", "mdm", "prime")}
    return (models, art) if with_artifacts else models


def _doc_to_requests(task: str, doc: dict) -> tuple[str, list[str], int]:
    """(context, continuations, gold) with lm-eval's prompts for the tasks used here."""
    if task == "piqa":
        return f"Question: {doc['goal']}\nAnswer:", [" " + doc["sol1"], " " + doc["sol2"]], int(doc["label"])
    if task in ("arc_easy", "arc_challenge"):
        labels = doc["choices"]["label"]
        return (f"Question: {doc['question']}\nAnswer:", [" " + t for t in doc["choices"]["text"]],
                labels.index(doc["answerKey"]))
    raise ValueError(f"unsupported task {task}")


def real_requests(task: str, n_docs: int, tokenizer, max_len: int, split: str | None = None):
    """[(doc_index, [(ids (L,), n_continuation), ...], gold)] for the first n_docs usable documents."""
    import torch

    path = DATA / task / (split or {"piqa": "validation.jsonl"}.get(task, "test.jsonl"))
    if not path.is_file():
        sys.exit(f"benchmark data not found: {path} (set PRIME_EVAL_DATA)")
    out = []
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for i, line in enumerate(path.open()):
        ctx, conts, gold = _doc_to_requests(task, json.loads(line))
        reqs = []
        for cont in conts:
            c_ids = [bos] + tokenizer.encode(ctx, add_special_tokens=False)
            whole = [bos] + tokenizer.encode(ctx + cont, add_special_tokens=False)
            n = len(whole) - len(c_ids)
            if whole[:len(c_ids)] != c_ids:  # merged across the boundary: encode separately
                whole = c_ids + tokenizer.encode(cont, add_special_tokens=False)
                n = len(whole) - len(c_ids)
            reqs.append((torch.tensor(whole[-max_len:]), n))
        if all(0 < n < 40 for _, n in reqs) and all(len(ids) <= max_len for ids, _ in reqs):
            out.append((i, reqs, gold))
        if len(out) >= n_docs:
            break
    return out
