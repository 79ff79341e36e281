"""Shared pieces of the benchmarks: trained reference models at two scales and real multiple-choice requests.

Models (`bench_models`), loaded through the harness's one loader (`prime_eval.loading`):
- `demo`: the tiny ARM / MDM / Prime-v2 networks `prime-eval demo` trains (0.4 M parameters, a 512-token BPE of
  the synthetic language; cached under $PRIME_EVAL_CACHE/demo, default ~/.cache/prime-eval/demo).
- `llama`: a released shape, `Diff_LLaMA_6M` by default (`--config` takes any `Diff_LLaMA_*M`), with the Llama-2
  tokenizer (V = 32,000; Prime ℓ = 15, b = 2, ids shuffled as the SlimPajama release), trained briefly on
  WikiText-2 (validation + test text, 64-token rows) with the demo's training code: MDM from scratch, Prime from the
  MDM's trunk and head. Far from a released model's quality, but with its vocabulary, sub-token count and
  request lengths. Cached under $PRIME_EVAL_BENCH_CACHE (default /tmp/prime-eval-bench), keyed by every setting.
Requests: real documents from $PRIME_EVAL_DATA (piqa, arc_easy, ...), encoded as the adapters do (BOS + context,
trailing context whitespace moved to the continuation), one request per choice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRIME_EVAL_DATA", ROOT.parent / "shared" / "data"))
BENCH_CACHE = Path(os.environ.get("PRIME_EVAL_BENCH_CACHE", "/tmp/prime-eval-bench"))
SCALES = ("demo", "llama")


@dataclass
class BenchModel:
    """A trained benchmark network with what the adapters need to load it again (`model_args`)."""

    net: object
    tokenizer: object
    subtokenizer: object  # Prime's SubTokenizer, None for MDM
    model_args: dict  # checkpoint, tokenizer, config, permutation: the adapters' model_args
    label: str


def load_uptime() -> str:
    """The machine's load averages (1, 5, 15 min) to print beside every measured figure."""
    try:
        return "load " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load n/a"


def bench_models(scale: str = "demo", *, config: str = "Diff_LLaMA_6M", steps: int = 200,
                 quick: bool = False) -> dict[str, BenchModel]:
    """{"mdm": BenchModel, "prime": BenchModel} at `scale` (module docstring); trains them once if needed."""
    if scale == "demo":
        models, art = demo_models(quick=quick, with_artifacts=True)
        from prime_eval.demo.settings import default_settings

        settings = default_settings(quick=quick)
        out = {}
        for fam in ("mdm", "prime"):
            net, tok, st = models[fam]
            args = {"checkpoint": str(art.checkpoints[fam]), "tokenizer": str(art.tokenizer_dir),
                    "config": f"n_head={settings.model.n_head}"}
            if fam == "prime":
                args["permutation"] = str(art.permutation)
            params = sum(p.numel() for p in net.parameters()) / 1e6
            out[fam] = BenchModel(net, tok, st, args, f"demo {fam} ({params:.2f} M params, V={net.vocab_size})")
        return out
    if scale == "llama":
        return llama_models(config, steps)
    raise SystemExit(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")


def llama_models(config: str = "Diff_LLaMA_6M", steps: int = 200, seed: int = 0) -> dict[str, BenchModel]:
    """MDM and Prime-v2 of a `Diff_LLaMA_*M` shape with the Llama-2 tokenizer, trained `steps` steps each on
    WikiText-2 (module docstring), cached under BENCH_CACHE/<key>/."""
    from prime_eval.checkpoints import load_tokenizer
    from prime_eval.demo import settings as demo_settings
    from prime_eval.demo.models import save_network
    from prime_eval.demo.training import train_network
    from prime_eval.loading import load_model
    from prime_eval.networks.lit_gpt import DIFF_LLAMA_CONFIGS
    from prime_eval.settings import Settings
    from prime_eval.subtokenizer import SubTokenizer, ell_from_base, make_permutation, save_permutation

    n_layer, n_embd, n_head, inter, _ = DIFF_LLAMA_CONFIGS[config]
    V, row = 32000, 64
    settings = demo_settings.DemoSettings(
        seed=seed, vocab_size=V, model=demo_settings.ModelSpec(n_layer, n_embd, n_head, inter),
        train={"mdm": demo_settings.TrainSpec(steps=steps, batch_size=16, lr=2e-3, warmup=30),
               "prime": demo_settings.TrainSpec(steps=steps, batch_size=16, lr=2e-3, warmup=30, init_from="mdm")})
    key = hashlib.sha256(json.dumps({"v": 1, "config": config, "row": row, "train": settings.as_dict()["train"],
                                     "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
    folder = BENCH_CACHE / f"{config}-{key}"
    tok_path = DATA / "tokenizers" / "llama2" / "tokenizer.model"
    tokenizer = load_tokenizer(str(tok_path))
    ell = ell_from_base(V, 2)
    perm_path = folder / f"perm_{2 ** ell}.pt"
    ckpts = {f: folder / demo_settings.FILES[f] for f in ("mdm", "prime")}
    if not (folder / "train.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join((DATA / "wikitext2" / f).read_text() for f in ("valid.txt", "test.txt"))
        ids = tokenizer.encode(text, add_special_tokens=False)
        docs = [ids[i:i + row - 2] for i in range(0, len(ids) - row, row - 2)]
        perm = make_permutation(2 ** ell, V, seed=seed, style="lit_gpt")
        save_permutation(perm, perm_path)
        st = SubTokenizer(V, ell=ell, base=2, perm=perm)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        logs, trained = {}, {}
        for fam in ("mdm", "prime"):
            t0 = time.perf_counter()
            src = settings.train[fam].init_from
            net, log = train_network(fam, settings, docs, bos, eos, row, st=st if fam == "prime" else None,
                                          init=trained.get(src))
            trained[fam] = {k: v.clone() for k, v in net.state_dict().items()}
            save_network(fam, net, folder)
            logs[fam] = {k: log[k] for k in ("steps", "seconds", "params", "loss_first", "loss_last")}
            print(f"trained {config} {fam}: {steps} steps in {time.perf_counter() - t0:.0f} s, loss "
                  f"{log['loss_first']:.2f} -> {log['loss_last']:.2f} nats/token", file=sys.stderr)
        (folder / "train.json").write_text(json.dumps({"config": config, "tokens": len(ids), "rows": len(docs),
                                                       "models": logs}, indent=2))
    meta = json.loads((folder / "train.json").read_text())
    out = {}
    for fam in ("mdm", "prime"):
        args = {"checkpoint": str(ckpts[fam]), "tokenizer": str(tok_path), "config": config}
        if fam == "prime":
            args["permutation"] = str(perm_path)
        b = load_model(fam, Settings.parse({**args, "device": "cpu"}, family=fam, command="ppl"))
        m = meta["models"][fam]
        out[fam] = BenchModel(b.network, b.tokenizer, b.subtokenizer, args,
                              f"{config} {fam} ({m['params'] / 1e6:.1f} M params, Llama-2 V=32000, "
                              f"{m['steps']} steps on WikiText-2, loss {m['loss_last']:.2f})")
    return out


def demo_models(quick: bool = False, seed: int = 0, with_artifacts: bool = False):
    """{family: (net, tokenizer, subtokenizer|None)} of the demo's trained models (trains them once if needed);
    with_artifacts: also the demo's ModelArtifacts (checkpoint, tokenizer and permutation paths)."""
    from rich.console import Console

    from prime_eval.demo.models import ensure_models, load_demo_network
    from prime_eval.demo.numerics import state
    from prime_eval.demo.settings import default_cache_dir, default_settings
    from prime_eval.synthetic.ground_truth import generate

    if not state()["pinned"]:
        print("note: float kernels not pinned (call prime_eval.demo.numerics.pin() before torch computes): these "
              "are not the models `prime-eval demo` trains", file=sys.stderr)
    settings = default_settings(seed=seed, quick=quick)
    data = generate(settings.language, settings.n_train, settings.n_heldout, settings.n_task_items)
    art = ensure_models(settings, data, default_cache_dir(), console=Console(stderr=True))
    models = {f: load_demo_network(f, art, settings)[:3] for f in ("arm", "mdm", "prime")}
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
