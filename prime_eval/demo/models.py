"""The demo's tokenizer and three trained networks, cached under `CACHE/<training key>/` in the upstream formats, and
loaded back through the harness's one loader (`prime_eval.loading`).

A cache folder is complete when its `train.json` exists (written last); the checkpoints are written atomically.
"""
from __future__ import annotations

import io as _bytes_io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prime_eval.demo.settings import FAMILIES, FILES, DemoSettings
from prime_eval.demo.tokenizer import SPECIAL, encode_texts, length_model, train_tokenizer
from prime_eval.demo.training import train_network
from prime_eval.io import atomic_write_bytes, write_json
from prime_eval.synthetic import SyntheticData


def save_network(family: str, net, folder: Path) -> Path:
    """Upstream formats, written atomically: ARM/MDM a flat safetensors state dict, Prime-v2 a torch pickle
    {"model": state_dict}."""
    import torch
    from safetensors.torch import save

    sd = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    if family == "prime":
        buf = _bytes_io.BytesIO()
        torch.save({"model": sd}, buf)
        data = buf.getvalue()
    else:
        data = save(sd)
    return atomic_write_bytes(Path(folder) / FILES[family], data)


@dataclass
class ModelArtifacts:
    folder: Path
    tokenizer_dir: Path
    checkpoints: dict  # family -> Path
    permutation: Path
    max_len: int
    train_log: dict
    cached: bool
    log_q_len: np.ndarray  # log q̂(L) of block lengths (`tokenizer.length_model`)

    def model_args(self, family: str, settings: DemoSettings, **extra) -> str:
        """`--model_args` of `prime-eval score` for this model."""
        args = {"checkpoint": str(self.checkpoints[family]), "tokenizer": str(self.tokenizer_dir),
                "config": f"n_head={settings.model.n_head}", "add_bos": "true", "name": f"{family}-demo"}
        if family == "prime":
            args["permutation"] = str(self.permutation)
        args.update({k: str(v) for k, v in extra.items()})
        return ",".join(f"{k}={v}" for k, v in args.items())


def cache_folder(settings: DemoSettings, cache_dir: Path) -> Path:
    """`CACHE/<training key>-<float kernels>/`: models trained with other kernels (another CPU's, or unpinned) are
    other models (`numerics`)."""
    from prime_eval.demo.numerics import tag

    return Path(cache_dir) / f"{settings.training_key()}-{tag()}"


def ensure_models(settings: DemoSettings, data: SyntheticData, cache_dir: Path, console=None,
                  retrain: bool = False) -> ModelArtifacts:
    """Tokenizer and the three networks, from the cache when present (`cache_folder`)."""
    from prime_eval.subtokenizer import SubTokenizer, ell_from_base, make_permutation, save_permutation

    folder = cache_folder(settings, cache_dir)
    done = folder / "train.json"
    tok_dir = folder / "tokenizer"
    ell = ell_from_base(settings.vocab_size, 2)  # binary encoding (MDM-Prime-v2)
    perm_path = folder / f"perm_{2 ** ell}.pt"
    ckpts = {f: folder / FILES[f] for f in FAMILIES}
    if done.is_file() and not retrain and all(p.is_file() for p in ckpts.values()) and perm_path.is_file():
        import json

        from transformers import AutoTokenizer

        meta = json.loads(done.read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        token_docs = encode_texts(tokenizer, data.train.texts)
        return ModelArtifacts(folder, tok_dir, ckpts, perm_path, meta["max_len"], meta, True,
                              length_model(token_docs, meta["max_len"]))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # BPE training on one thread: the same merges every run
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(data.train.texts, settings.vocab_size, tok_dir)
    tok_seconds = time.perf_counter() - t0
    token_docs = encode_texts(tokenizer, data.train.texts)
    longest = max(len(d) for d in token_docs) + 2
    heldout_longest = max(len(d) for d in encode_texts(tokenizer, data.heldout.texts)) + 2
    max_len = int(2 ** math.ceil(math.log2(max(longest, heldout_longest, 16))))
    bos = eos = tokenizer.convert_tokens_to_ids(SPECIAL)
    perm = make_permutation(2 ** ell, settings.vocab_size, seed=settings.seed, style="lit_gpt")
    save_permutation(perm, perm_path)
    st = SubTokenizer(settings.vocab_size, ell=ell, base=2, perm=perm)
    logs = {}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[loss]}"), console=console, transient=False) as progress:
        trained: dict[str, dict] = {}
        for family in FAMILIES:  # in order: ARM, then MDM (may start from the ARM), then Prime (from either)
            src = settings.train[family].init_from
            if src is not None and src not in trained:
                raise ValueError(f"{family} cannot start from {src!r}: train it first")
            net, log = train_network(family, settings, token_docs, bos, eos, max_len,
                                     st=st if family == "prime" else None, progress=progress,
                                     init=trained[src] if src else None)
            log["init"] = src or "random"
            trained[family] = {k: v.clone() for k, v in net.state_dict().items()}
            save_network(family, net, folder)
            logs[family] = log
    meta = {"key": settings.training_key(), "settings": settings.as_dict(), "max_len": max_len,
            "tokenizer_seconds": tok_seconds, "models": logs, "bos_id": bos, "eos_id": eos,
            "train_tokens": int(sum(len(d) + 2 for d in token_docs)),
            "seconds": time.perf_counter() - t0}
    write_json(done, meta)
    return ModelArtifacts(folder, tok_dir, ckpts, perm_path, max_len, meta, False, length_model(token_docs, max_len))


def load_demo_network(family: str, art: ModelArtifacts, settings: DemoSettings):
    """(network, tokenizer, sub-tokenizer or None, info) through the harness's one loader (`prime_eval.loading`)."""
    from prime_eval.loading import load_model
    from prime_eval.settings import Settings

    values = {"checkpoint": str(art.checkpoints[family]), "tokenizer": str(art.tokenizer_dir),
              "config": f"n_head={settings.model.n_head}", "device": "cpu",
              "permutation": str(art.permutation) if family == "prime" else None}
    b = load_model(family, Settings.parse(values, family=family, command="ppl"))
    return b.network, b.tokenizer, b.subtokenizer, b.info
