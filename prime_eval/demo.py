"""`prime-eval demo`: the whole product on a language whose entropy is known, on CPU, offline, in minutes.

Steps (each one reuses the harness's own code path):

1. **Ground truth** (`prime_eval.synthetic`): a random sparse automaton over a few hundred pseudo-words, from the
   seed: a training corpus, held-out documents with their exact NLL (forward algorithm), and two multiple-choice
   tasks with Bayes-optimal answers, written as `DATA/<task>/test.jsonl` plus lm-eval task YAMLs.
2. **Tokenizer**: a byte-level BPE trained on the training corpus with `tokenizers` (V = 512 tokens, a multiple of 64
   so V = lit_gpt's padded vocabulary), saved as a transformers tokenizer folder (BOS = EOS = `<|endoftext|>`).
3. **Reference models**, lit_gpt architecture (`prime_eval.networks.lit_gpt`), trained on CPU:
   * ARM `GPT`, next-token cross-entropy on `[BOS] doc [EOS]`; saved as a flat safetensors state dict.
   * MDM `TransEncoder` (ℓ = 1), the standard masked-diffusion NELBO in its exact-count form (LLaDA): l ~ U{1..n}
     of the n positions masked uniformly, cross-entropy of the masked positions weighted n/l. It has the same
     expectation as t ~ U(0, 1) with weight 1/t and a far smaller variance, which matters at batch 64. Safetensors.
   * MDM-Prime-v2 `TransEncoder(ℓ = ⌈log2 V⌉, b = 2)`, binary encoding with index shuffling (a seeded permutation,
     `perm_<2^ℓ>.pt`), trained with the **published** v2 objective: every token's V-way cross-entropy given the partly
     masked sub-tokens, weight 1/t (here its exact-count form, N/l for l ~ U{1..N} masked sub-tokens of N = n·ℓ).
     This is how the released model was trained; the evaluation then shows that the same network's valid
     marginal bound (`mc`) stays above the entropy while its training objective (`legacy_joint`) does not.
     (Training on the valid marginal loss instead would never show the network a fully visible token, so
     `legacy_joint`, which charges those tokens too, would be meaningless on it.) Saved as torch
     `{"model": state_dict}` (`.pth`).
   The MDM starts from the trained ARM's blocks, embeddings and output head (AR-to-diffusion adaptation, as
   DiffuLLaMA and Dream do at scale) and Prime from the trained MDM's blocks and head (its sub-token table is
   new): from scratch, a bidirectional model this small stays near the unigram loss for hundreds of steps. They see full blocks `[BOS] doc [EOS]` (what `prime-eval ppl` scores with wrap=False) and, with
   probability `prefix_prob`, document prefixes `[BOS] doc[:k]` (what lm-eval's multiple-choice requests look like).
   Everything is cached under `CACHE/demo/<key>/`, the key hashing the seed and every setting that changes a weight.
4. **Scores** through lm-eval with the `arm` / `mdm` / `prime` adapters (the `prime-eval score` code path), and
   **bound perplexity** of the held-out documents (`prime_eval.perplexity`, one block per document) with every
   estimator, compared with the exact NLL of the same documents in nats per document and bits per byte.
5. **Audit**: the exact audit's default cases, plus exact enumeration on the trained MDM and Prime networks.
6. **Report** (`prime_eval.report`) into `--out`, with the demo's own tables and plots first.

Likelihood of a document, and the length term
---------------------------------------------
The ARM's `[BOS] doc [EOS]` score is the log-probability of a proper distribution over documents. A diffusion model
scores a block of *known* length L: its NELBO bounds −log q(x | L). To compare with the true entropy of documents
(whose token length varies), MDM and Prime rows add −log q̂(L), where q̂ is the add-one-smoothed distribution of block
lengths in the training corpus: q(x) = q̂(L)·q(x | L) is a proper distribution over token sequences, so the sum is an
upper bound on −log q(doc), and E[−log q(doc)] ≥ H(doc) (Gibbs). The term is shown in its own column; without it a
perfect diffusion model would appear to beat the entropy by H(L) nats. Text ↔ tokens is injective (the tokenizer is
lossless) and text ↔ words too (`prime_eval.synthetic`), so H(doc) is the same in all three representations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from prime_eval.errors import UserError
from prime_eval.synthetic import QUICK_SPEC, LanguageSpec, SyntheticData, generate, write_heldout, write_tasks

TRAIN_VERSION = 2  # bump when training code changes what a cached model would be
SPECIAL = "<|endoftext|>"
FAMILIES = ("arm", "mdm", "prime")
LABELS = {"arm": "ARM", "mdm": "MDM", "prime": "MDM-Prime-v2"}
FILES = {"arm": "arm.safetensors", "mdm": "mdm.safetensors", "prime": "prime.pth"}


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class ModelSpec:
    n_layer: int = 3
    n_embd: int = 96
    n_head: int = 4
    intermediate_size: int = 256


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    eps: float = 1e-3  # MDM / Prime: t ~ U(eps, 1)
    prefix_prob: float = 0.3  # MDM / Prime: fraction of training rows that are document prefixes (no EOS)
    init_from: str | None = None  # start from this already trained family's trunk ("arm", "mdm"), or random


@dataclass(frozen=True)
class DemoSettings:
    seed: int = 0
    quick: bool = False
    language: LanguageSpec = LanguageSpec()
    n_train: int = 20_000
    n_heldout: int = 300
    n_task_items: int = 300
    vocab_size: int = 512
    model: ModelSpec = ModelSpec()
    train: dict = field(default_factory=lambda: {"arm": TrainSpec(steps=600, batch_size=32),
                                                 "mdm": TrainSpec(steps=800, batch_size=32, init_from="arm"),
                                                 "prime": TrainSpec(steps=2400, batch_size=32, warmup=80,
                                                                    init_from="mdm")})
    score_samples: int = 8  # MC samples per lm-eval request (MDM / Prime)
    ppl_samples: int = 8  # MC samples per held-out document
    audit_targets: int = 4  # target tokens audited exactly on the trained networks

    def training_key(self) -> str:
        """Hash of everything that changes the tokenizer or a weight (not the evaluation settings)."""
        d = {"v": TRAIN_VERSION, "seed": self.seed, "language": asdict(self.language), "n_train": self.n_train,
             "vocab_size": self.vocab_size, "model": asdict(self.model),
             "train": {k: asdict(v) for k, v in sorted(self.train.items())}}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["train"] = {k: asdict(v) for k, v in self.train.items()}
        return d


def default_settings(seed: int = 0, quick: bool = False) -> DemoSettings:
    if not quick:
        return DemoSettings(seed=seed, language=dataclasses.replace(LanguageSpec(), seed=seed))
    return DemoSettings(
        seed=seed, quick=True, language=dataclasses.replace(QUICK_SPEC, seed=seed), n_train=3000, n_heldout=48,
        n_task_items=48, vocab_size=320, model=ModelSpec(n_layer=2, n_embd=64, n_head=2, intermediate_size=160),
        train={"arm": TrainSpec(steps=60, batch_size=32), "mdm": TrainSpec(steps=40, batch_size=32, init_from="arm"),
               "prime": TrainSpec(steps=40, batch_size=32, init_from="mdm")},
        score_samples=4, ppl_samples=4, audit_targets=1)


def default_cache_dir() -> Path:
    root = Path(os.environ.get("PRIME_EVAL_CACHE", Path.home() / ".cache" / "prime-eval"))
    return root / "demo"


# ----------------------------------------------------------------------------------------------------------------
# Step 2: tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE of exactly `vocab_size` tokens (id 0 = `<|endoftext|>`, used as BOS and EOS), saved as a
    transformers tokenizer folder; returns the loaded `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, not {vocab_size}: the corpus is too "
                           "small for this vocabulary")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL,
                                 model_max_length=2048)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    if len(loaded) != vocab_size:
        raise RuntimeError(f"saved tokenizer has {len(loaded)} tokens, expected {vocab_size}")
    return loaded


def encode_texts(tokenizer, texts: list[str], batch: int = 4096) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        out += [list(x) for x in tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]]
    return out


def length_model(token_docs: list[list[int]], max_len: int) -> np.ndarray:
    """log q̂(L) for block lengths L = tokens + 2 in [0, max_len]: add-one smoothing over 3..max_len."""
    counts = np.zeros(max_len + 1)
    for d in token_docs:
        if len(d) + 2 <= max_len:
            counts[len(d) + 2] += 1
    counts[3:] += 1.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


# ----------------------------------------------------------------------------------------------------------------
# Step 3: training


def _lit_config(settings: DemoSettings, max_len: int):
    from prime_eval.networks.lit_gpt import Config

    m = settings.model
    return Config(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, intermediate_size=m.intermediate_size,
                  vocab_size=settings.vocab_size, padding_multiple=64, block_size=max(max_len, 64))


def build_network(family: str, settings: DemoSettings, max_len: int):
    """A fresh lit_gpt network with GPT-style initialisation (N(0, 0.02); residual projections / √(2·n_layer))."""
    import torch

    from prime_eval.networks.lit_gpt import GPT, TransEncoder
    from prime_eval.subtokenizer import ell_from_base

    cfg = _lit_config(settings, max_len)
    if family == "arm":
        net = GPT(cfg)
    elif family == "mdm":
        net = TransEncoder(cfg)
    else:
        net = TransEncoder(cfg, ell=ell_from_base(settings.vocab_size, 2), base=2)
    std = 0.02
    for name, p in net.named_parameters():
        if p.dim() == 2:
            s = std / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "w3.weight")) else std
            torch.nn.init.normal_(p, 0.0, s)
    return net


def _stratified_times(rng: np.random.Generator, n: int, eps: float) -> np.ndarray:
    u = (rng.permutation(n) + rng.random(n)) / n
    return eps + (1.0 - eps) * u


def _length_grouped_batches(rng: np.random.Generator, lengths: np.ndarray, batch_size: int,
                            group: int = 16) -> list[np.ndarray]:
    """One epoch of batches: shuffle, cut into groups of `group` batches, sort each group by length, split, shuffle
    the batches (little padding, still random)."""
    order = rng.permutation(len(lengths))
    out = []
    n = batch_size * group
    for s in range(0, len(order) - batch_size + 1, n):
        chunk = order[s:s + n]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(out)
    return out


def make_batch(family: str, docs: list[list[int]], idx: np.ndarray, rng: np.random.Generator, spec: TrainSpec,
               bos: int, eos: int, max_len: int):
    """Rows `[BOS] doc [EOS]` (or, for MDM/Prime with probability prefix_prob, `[BOS] doc[:k]`), right-padded.
    Returns (ids (B, L) int64, lengths (B,))."""
    rows = []
    for i in idx:
        d = docs[int(i)][: max_len - 2]
        if family != "arm" and len(d) > 1 and rng.random() < spec.prefix_prob:
            k = int(rng.integers(1, len(d)))
            rows.append([bos, *d[:k]])
        else:
            rows.append([bos, *d, eos])
    L = max(len(r) for r in rows)
    ids = np.zeros((len(rows), L), dtype=np.int64)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = r
    return ids, np.array([len(r) for r in rows])


def loss_fn(family: str, net, ids, lengths, rng: np.random.Generator, spec: TrainSpec, st=None):
    """The training objective of each family (a scalar torch tensor, nats per real token)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(ids)
    B, L = x.shape
    pos = torch.arange(L)[None, :]
    real = pos < torch.from_numpy(lengths)[:, None]  # (B, L)
    if family == "arm":
        valid = real[:, 1:]
        logits = net(x[:, :-1], logits_at=valid)  # (N, V)
        return F.cross_entropy(logits, x[:, 1:][valid])
    n_real = real.sum()
    lens = torch.from_numpy(lengths)
    if family == "mdm":
        # exact-count form of the NELBO (LLaDA): l ~ U{1..n} masked positions, weight n/l (same expectation as
        # t ~ U(0,1) with weight 1/t, far lower variance)
        m = _exact_count_mask(rng, lengths, L)  # (B, L)
        l = m.sum(1).clamp_min(1).float()
        xin = torch.where(m, torch.full_like(x, net.mask_id), x)
        logits = net(xin, attention_mask=real, logits_at=m)  # (N, V)
        ce = F.cross_entropy(logits, x[m], reduction="none")
        w = (lens.float() / l)[:, None].expand(B, L)[m]
        return (ce * w).sum() / n_real
    # Prime, published joint objective (v2): every token's V-way cross-entropy given the partly masked sub-tokens,
    # weight N/l for l ~ U{1..N} masked sub-tokens out of N = n·ℓ (the exact-count form of weight 1/t)
    ell, b = st.ell, st.base
    y = st.encode(x).view(B, L, ell)  # (B, L, ℓ) digits
    ms = _exact_count_mask(rng, lengths * ell, L * ell).view(B, L, ell)
    l = ms.view(B, -1).sum(1).clamp_min(1).float()
    yin = torch.where(ms, torch.full_like(y, b), y).view(B, L * ell)
    logits = net(yin, attention_mask=real, logits_at=real)  # (N, V)
    ce = F.cross_entropy(logits, x[real], reduction="none")
    w = (lens.float() * ell / l)[:, None].expand(B, L)[real]
    return (ce * w).sum() / n_real


def _exact_count_mask(rng: np.random.Generator, n: np.ndarray, width: int):
    """(B, width) bool: row r masks l_r ~ U{1..n_r} of its first n_r positions, uniformly at random."""
    import torch

    B = len(n)
    keys = rng.random((B, width))
    keys[np.arange(width)[None, :] >= n[:, None]] = 2.0  # padding never masked
    ranks = keys.argsort(1).argsort(1)
    l = np.floor(rng.random(B) * n).astype(np.int64) + 1
    return torch.from_numpy(ranks < l[:, None])


def warm_start(net, arm_state: dict) -> None:
    """Start from a trained network (AR-to-diffusion adaptation, as DiffuLLaMA / Dream): copy its blocks, final norm
    and output head; an MDM started from an ARM also takes its token embeddings (the [MASK] row starts at their
    mean); Prime keeps its fresh sub-token table."""
    import torch

    own = net.state_dict()
    with torch.no_grad():
        for k, v in arm_state.items():
            if k == "transformer.wte.weight":
                if own[k].shape[0] == v.shape[0] + 1:  # MDM
                    own[k][: v.shape[0]] = v
                    own[k][v.shape[0]:] = v.mean(0)
            elif k in own and own[k].shape == v.shape:
                own[k].copy_(v)
    net.load_state_dict(own)


def train_network(family: str, settings: DemoSettings, docs: list[list[int]], bos: int, eos: int, max_len: int,
                  *, st=None, progress=None, init: dict | None = None) -> tuple[object, dict]:
    """Train one network for `settings.train[family].steps` steps (deterministic given the seed); `init`: an ARM
    state dict to start from (`warm_start`)."""
    with _training_threads():
        return _train_network(family, settings, docs, bos, eos, max_len, st=st, progress=progress, init=init)


@contextlib.contextmanager
def _training_threads():
    """Training runs on one intra-op thread, whatever `--threads` says: a reduction split over 2 threads adds in
    another order, and 600+ optimizer steps amplify the last-bit differences into different weights (measured:
    1 vs 2 threads give different checkpoints). With one thread the weights depend only on the seed (and the
    machine's float kernels)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_network(family: str, settings: DemoSettings, docs: list[list[int]], bos: int, eos: int, max_len: int,
                   *, st=None, progress=None, init: dict | None = None) -> tuple[object, dict]:
    import torch

    spec: TrainSpec = settings.train[family]
    fam_id = FAMILIES.index(family)
    torch.manual_seed(settings.seed * 1000 + fam_id)
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 0x7247, fam_id]))
    net = build_network(family, settings, max_len)
    if init is not None:
        warm_start(net, init)
    net.train()
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    lengths_all = np.array([len(d) for d in docs])
    batches: list[np.ndarray] = []
    losses = []
    t0 = time.perf_counter()
    task = progress.add_task(f"train {LABELS[family]}", total=spec.steps, loss="") if progress else None
    for step in range(spec.steps):
        if not batches:
            batches = _length_grouped_batches(rng, lengths_all, spec.batch_size)
        idx = batches.pop()
        ids, lengths = make_batch(family, docs, idx, rng, spec, bos, eos, max_len)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = loss_fn(family, net, ids, lengths, rng, spec, st)
        if loss is None:
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            recent = float(np.mean(losses[-20:]))
            progress.update(task, advance=1, loss=f"loss {recent:.3f} nats/token")
    net.eval().requires_grad_(False)
    seconds = time.perf_counter() - t0
    log = {"family": family, "steps": spec.steps, "seconds": seconds,
           "params": sum(p.numel() for p in net.parameters()),
           "loss_first": float(np.mean(losses[:20])) if losses else None,
           "loss_last": float(np.mean(losses[-50:])) if losses else None,
           "loss_curve": [float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)]}
    return net, log


def save_network(family: str, net, folder: Path) -> Path:
    """Upstream formats: ARM/MDM a flat safetensors state dict, Prime-v2 a torch pickle {"model": state_dict}."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILES[family]
    sd = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    if family == "prime":
        torch.save({"model": sd}, tmp)
    else:
        save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


@dataclass
class ModelArtifacts:
    folder: Path
    tokenizer_dir: Path
    checkpoints: dict  # family -> Path
    permutation: Path
    max_len: int
    train_log: dict
    cached: bool
    log_q_len: np.ndarray

    def model_args(self, family: str, settings: DemoSettings, **extra) -> str:
        args = {"checkpoint": str(self.checkpoints[family]), "tokenizer": str(self.tokenizer_dir),
                "config": f"n_head={settings.model.n_head}", "add_bos": "true", "name": f"{family}-demo"}
        if family == "prime":
            args["permutation"] = str(self.permutation)
        args.update({k: str(v) for k, v in extra.items()})
        return ",".join(f"{k}={v}" for k, v in args.items())


def ensure_models(settings: DemoSettings, data: SyntheticData, cache_dir: Path, console=None,
                  retrain: bool = False) -> ModelArtifacts:
    """Tokenizer and the three networks, from the cache when present (keyed by `settings.training_key()`)."""
    import torch

    from prime_eval.subtokenizer import SubTokenizer, ell_from_base, make_permutation, save_permutation

    folder = Path(cache_dir) / settings.training_key()
    done = folder / "train.json"
    tok_dir = folder / "tokenizer"
    st_ell = ell_from_base(settings.vocab_size, 2)
    perm_path = folder / f"perm_{2 ** st_ell}.pt"
    ckpts = {f: folder / FILES[f] for f in FAMILIES}
    if done.is_file() and not retrain and all(p.is_file() for p in ckpts.values()) and perm_path.is_file():
        meta = json.loads(done.read_text())
        from transformers import AutoTokenizer

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
    perm = make_permutation(2 ** st_ell, settings.vocab_size, seed=settings.seed, style="lit_gpt")
    save_permutation(perm, perm_path)
    st = SubTokenizer(settings.vocab_size, ell=st_ell, base=2, perm=perm)
    logs = {}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[loss]}"), console=console, transient=False) as progress:
        trained: dict[str, dict] = {}
        for family in FAMILIES:  # in order: ARM, then MDM (may start from the ARM), then Prime (from either)
            src = settings.train[family].init_from
            if src is not None and src not in trained:
                raise ValueError(f"{family} cannot start from {src!r}: train it first")
            init = trained[src] if src else None
            net, log = train_network(family, settings, token_docs, bos, eos, max_len,
                                     st=st if family == "prime" else None, progress=progress, init=init)
            log["init"] = src or "random"
            trained[family] = {k: v.clone() for k, v in net.state_dict().items()}
            save_network(family, net, folder)
            logs[family] = log
    meta = {"key": settings.training_key(), "settings": settings.as_dict(), "max_len": max_len,
            "tokenizer_seconds": tok_seconds, "models": logs, "bos_id": bos, "eos_id": eos,
            "train_tokens": int(sum(len(d) + 2 for d in token_docs)),
            "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(meta, indent=2))
    return ModelArtifacts(folder, tok_dir, ckpts, perm_path, max_len, meta, False, length_model(token_docs, max_len))


# ----------------------------------------------------------------------------------------------------------------
# Step 4a: lm-eval scores (the `prime-eval score` code path)


def score_model(family: str, art: ModelArtifacts, settings: DemoSettings, tasks_dir: Path, runs_dir: Path,
                task_names: list[str]) -> Path:
    """Score one model on the synthetic tasks with the run `prime-eval score` makes (`prime_eval.lm_eval_run`: the
    registered adapter, lm-eval's `simple_evaluate`, its files, the adapter's per-request statistics), with a task
    index that holds only the synthetic tasks (building lm-eval's full index would cost ~10 s per model). The
    adapters must be registered (`import model_adapters`; `prime-eval demo` does). Returns the results JSON path."""
    from lm_eval.tasks import TaskManager

    from prime_eval import lm_eval_run as R

    extra = {"seed": settings.seed, "rows_per_pass": 256}
    if family != "arm":
        extra.update(samples=settings.score_samples, greedy="false")
    model_args = art.model_args(family, settings, **extra)
    plan = R.prepare_tasks(task_names, TaskManager(include_path=[str(tasks_dir)], include_defaults=False))
    lm = R.model_spec(family, model_args, device="cpu").build()
    out = R.run(lm, plan, model=family, model_args=model_args, output_path=runs_dir, display_name=f"{family}-demo",
                log_samples=True, seeds=(settings.seed,) * 4, verbosity="ERROR")
    return out.results_file


def read_accuracy(results_file: Path) -> dict:
    """task -> {metric: (value, stderr)} from an lm-eval results JSON."""
    obj = json.loads(Path(results_file).read_text())
    out = {}
    for task, metrics in obj["results"].items():
        out[task] = {}
        for m in ("acc", "acc_norm"):
            v = metrics.get(f"{m},none")
            se = metrics.get(f"{m}_stderr,none")
            if isinstance(v, (int, float)):
                out[task][m] = (float(v), float(se) if isinstance(se, (int, float)) else None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Step 4b: bound perplexity per held-out document, against the exact NLL

PPL_ESTIMATORS = {"arm": ("exact",), "mdm": ("mc", "exact_count", "chain_rule"),
                  "prime": ("mc", "exact_count", "legacy_joint")}


def load_demo_network(family: str, art: ModelArtifacts, settings: DemoSettings):
    """(network, tokenizer, sub-tokenizer or None, info) through the harness's one loader (`prime_eval.loading`)."""
    from prime_eval.loading import load_model
    from prime_eval.settings import Settings

    values = {"checkpoint": str(art.checkpoints[family]), "tokenizer": str(art.tokenizer_dir),
              "config": f"n_head={settings.model.n_head}", "device": "cpu",
              "permutation": str(art.permutation) if family == "prime" else None}
    b = load_model(family, Settings.parse(values, family=family, command="ppl"))
    return b.network, b.tokenizer, b.subtokenizer, b.info


def paired_stats(model_nll: np.ndarray, true_nll: np.ndarray, n_bytes: np.ndarray) -> dict:
    """Per-document model values against the exact NLL on the same documents (nats/doc, bits/byte, SEs)."""
    from prime_eval.synthetic import entropy_stats

    s = entropy_stats(model_nll, n_bytes)
    diff = model_nll - true_nll
    n = diff.size
    s["gap"] = float(diff.mean())
    s["gap_se"] = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    s["gap_bits_per_byte"] = float(diff.sum() / math.log(2) / n_bytes.sum())
    s["gap_bits_per_byte_se"] = s["gap_se"] * n / math.log(2) / float(n_bytes.sum())
    return s


def verdict(row: dict) -> str:
    """How a row relates to the true entropy H: a likelihood (or a valid bound on one) can be below H only by
    chance on a finite sample; 2 SE below is flagged."""
    below = row["gap"] < -2 * row["gap_se"]
    likelihood = row["kind"] in ("exact", "exact_left_to_right")
    if not row["is_bound"] and not likelihood:
        return "BELOW H: a perplexity the data cannot have" if below else "not a bound (happens to be above H)"
    if below:
        return "BELOW H (should not happen: check the estimator)"
    return "≥ H, as a likelihood must be" if likelihood else "≥ H (valid bound)"


def bound_vs_entropy(art: ModelArtifacts, settings: DemoSettings, data: SyntheticData, ppl_dir: Path,
                     console=None) -> list[dict]:
    """Every estimator of every model on the held-out documents (one block per document, `prime-eval ppl`'s
    protocol with wrap=False); writes the perplexity JSONs and returns one row per (model, estimator)."""
    import warnings

    from prime_eval import perplexity as P
    from prime_eval.checkpoints import checkpoint_sha256

    texts = data.heldout.texts
    true = np.asarray(data.heldout.nll, dtype=np.float64)
    n_bytes = data.heldout.n_bytes
    source = P.TextSource(lambda: iter(texts), {"dataset": "synthetic-heldout", "split": f"seed{settings.seed}",
                                                "text_field": "text"}, num_docs=len(texts))
    rows = []
    for family in FAMILIES:
        net, tok, st, info = load_demo_network(family, art, settings)
        sha = checkpoint_sha256(art.checkpoints[family])
        for est in PPL_ESTIMATORS[family]:
            vals: dict[int, tuple[float, float, int]] = {}

            def on_block(block, values, n, vals=vals):
                v = values.double()
                k = v.numel()
                vals[block.index] = (float(v.mean()), float(v.var(unbiased=True) / k) if k > 1 else 0.0,
                                     int(block.ids.numel()))

            proto = P.Protocol(L=art.max_len, wrap=False, num_samples=settings.ppl_samples, seed=settings.seed,
                               bootstrap=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = P.evaluate_perplexity(
                    net, tok, source, proto, estimator=est,
                    estimator_options={"subtokenizer": st} if st is not None else None, batch_size=256,
                    model={"name": f"{family}-demo", "family": family, "checkpoint": str(art.checkpoints[family]),
                           "checkpoint_sha256": sha, "label": f"{LABELS[family]} (demo)"},
                    progress=console if console is not None else False, on_block=on_block)
            P.write_json(res, ppl_dir / f"{family}-demo_{est}.json")
            if len(vals) != len(texts):
                raise RuntimeError(f"{family} {est}: {len(vals)} blocks scored for {len(texts)} documents")
            m = np.array([vals[i][0] for i in range(len(texts))])
            lens = np.array([vals[i][2] for i in range(len(texts))])
            len_term = np.zeros_like(m) if family == "arm" else -art.log_q_len[lens]
            row = paired_stats(m + len_term, true, n_bytes)
            row.update(family=family, model=f"{family}-demo", label=LABELS[family], estimator=est,
                       is_bound=bool(res["is_bound"]), kind=res["bound_kind"],
                       length_term=float(len_term.mean()), mc_se=float(math.sqrt(sum(v[1] for v in vals.values()))
                                                                       / len(texts)),
                       nll_per_token=res["results"]["nll"], ppl_per_token=res["results"]["ppl"],
                       seconds=res["results"]["seconds"], samples=res["results"]["samples_per_block"])
            row["verdict"] = verdict(row)
            rows.append(row)
    for r in rows:  # a non-bound next to the valid bound of the same network
        valid = next((v for v in rows if v["family"] == r["family"] and v["estimator"] == "mc"), None)
        if r["kind"] == "not_a_likelihood" and valid is not None:
            r["below_valid_bound"] = valid["nats_per_doc"] - r["nats_per_doc"]
            if r["gap"] >= -2 * r["gap_se"]:
                r["verdict"] = (f"NOT a bound: {r['below_valid_bound']:.1f} nats/doc below the valid bound of the same "
                                "network (above H here only because the model is far from the truth)")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Step 5: audit


def audit_trained(art: ModelArtifacts, settings: DemoSettings, data: SyntheticData) -> list[dict]:
    """Exact enumeration on the trained networks: each estimator's exact expectation against the exact NLL of the
    network's own any-order generative process, on short held-out targets (MDM: 4 tokens, Prime: 1 token = ℓ
    sub-tokens, 2^ℓ mask sets)."""
    import torch

    from prime_eval import audit
    from prime_eval.estimators import MDMEstimator, PrimeEstimator

    out = []
    for family in ("mdm", "prime"):
        net, tok, st, _ = load_demo_network(family, art, settings)
        n_target = 4 if family == "mdm" else 1
        ctx_len = 4
        docs = encode_texts(tok, data.heldout.texts[: 4 * settings.audit_targets])
        picked = [d for d in docs if len(d) >= ctx_len + n_target][: settings.audit_targets]
        bos = tok.bos_token_id
        for i, d in enumerate(picked):
            x = torch.tensor([bos, *d[: ctx_len + n_target - 1]], dtype=torch.long)
            target = torch.arange(x.numel()) >= x.numel() - n_target
            if family == "mdm":
                ests = [MDMEstimator(n, mask_id=net.mask_id) for n in ("mc", "exact_count", "chain_rule")]
            else:
                ests = [PrimeEstimator(n, subtokenizer=st) for n in ("mc", "exact_count", "legacy_joint")]
            table = audit.masked_nll_table(net, ests[0], x, target)
            ref = audit.exact_nll(net, ests[0], x, target, table=table)
            for est in ests:
                e = audit.exact_expectation(net, est, x, target,
                                            table=table if est.name in ("mc", "exact_count") else None)
                gap = e - ref
                if est.name == "chain_rule":
                    v = "exact NLL (left-to-right process)"
                elif gap >= -1e-7 * max(1.0, abs(ref)):
                    v = "valid bound" if est.is_bound else "above here (not a bound in general)"
                else:
                    v = "VIOLATES BOUND"
                out.append({"case": f"trained {LABELS[family]}, held-out doc {i}, {n_target} target token"
                                    + ("s" if n_target > 1 else ""),
                            "estimator": est.name, "expectation": e, "reference": ref, "gap": gap,
                            "is_bound_by_construction": bool(est.is_bound), "verdict": v})
    return out


def run_audit(art: ModelArtifacts, settings: DemoSettings, data: SyntheticData) -> dict:
    from prime_eval import audit

    t0 = time.perf_counter()
    generic = [r.as_dict() for r in audit.default_cases(fast=True)] if not settings.quick else \
        [r.as_dict() for r in audit.oracle_case(16, base=2, source="zipf:1.1", perm_seed=0, L=1)]
    trained = audit_trained(art, settings, data)
    rows = generic + trained
    failed = [r for r in rows if r["is_bound_by_construction"] and r["verdict"] == "VIOLATES BOUND"]
    return {"rows": rows, "seconds": time.perf_counter() - t0, "valid_estimators_pass": not failed,
            "legacy_violations": sum(1 for r in rows if r["estimator"].startswith("legacy_joint")
                                     and r["verdict"] == "VIOLATES BOUND")}


# ----------------------------------------------------------------------------------------------------------------
# Step 6: report


def accuracy_rows(collection, data: SyntheticData) -> list[dict]:
    """Per (model, task): lm-eval acc with its 95% interval (dataset + Monte Carlo error), and the paired difference
    to the Bayes-optimal answers on the same questions."""
    from prime_eval import report as rp
    from prime_eval.synthetic import task_summary

    out = []
    for run in collection.runs:
        for task, tr in sorted(run.tasks.items()):
            if task not in data.tasks or tr.status != "ok":
                continue
            dd = rp.doc_data(tr, ["acc"])
            items = data.tasks[task]
            acc, acc_se = tr.metrics.get("acc", (None, None))
            if acc_se is None and acc is not None and tr.n:
                acc_se = rp.binomial_se(acc, tr.n)
            row = {"model": run.name, "family": run.family, "task": task, "acc": acc, "acc_se_data": acc_se,
                   "acc_norm": tr.metrics.get("acc_norm", (None, None))[0], "n": tr.n}
            if dd is not None and len(dd.correct) == len(items):
                c = np.array([dd.correct[i]["acc"] for i in range(len(items))])
                bayes = np.array([float(it["bayes_correct"]) for it in items])
                mc = rp.mc_variance([dd.q["acc"][i] for i in range(len(items))]) if dd.q else 0.0
                d, se, lo, hi = rp.paired_difference(c, bayes, mc, 0.0)
                row.update(acc_se=math.sqrt((acc_se or 0.0) ** 2 + mc), mc_included=dd.q is not None,
                           gap_to_bayes=d, gap_to_bayes_se=se)
            else:
                row.update(acc_se=acc_se, mc_included=False, gap_to_bayes=None, gap_to_bayes_se=None)
            s = task_summary(items)
            row.update(bayes_acc=s["bayes_acc"], bayes_acc_se=s["bayes_acc_se"], chance=s["chance"])
            out.append(row)
    return out


def _demo_tables(summary: dict) -> list:
    from prime_eval import report as rp

    Z = rp.Z95
    tables = []
    # -- accuracy vs Bayes
    tasks = list(summary["data"]["tasks"])
    acc = summary["accuracy"]
    header = ["Model", "Scored with"] + [f"{t} acc (%)" for t in tasks] + [f"{t}: model − Bayes" for t in tasks]
    rows = []
    bayes_row = ["Bayes-optimal (true process)", "exact p(cont | ctx)"]
    bayes_row += [rp.Cell(main=f"{100 * summary['data']['tasks'][t]['bayes_acc']:.1f}",
                          unc=f"± {100 * Z * summary['data']['tasks'][t]['bayes_acc_se']:.1f}",
                          value=summary["data"]["tasks"][t]["bayes_acc"]) for t in tasks]
    bayes_row += [rp.Cell(main="0", value=0.0) for _ in tasks]
    rows.append(bayes_row)
    for fam in FAMILIES:
        name = f"{fam}-demo"
        from prime_eval.settings import DEFAULT_SCORE_ESTIMATOR  # what `prime-eval score` used (its default)

        est = "exact" if fam == "arm" else f"{DEFAULT_SCORE_ESTIMATOR} (K={summary['settings']['score_samples']})"
        row = [f"{LABELS[fam]} ({summary['models'][fam]['params'] / 1e6:.2f}M)", est]
        gaps = []
        for t in tasks:
            r = next((a for a in acc if a["model"] == name and a["task"] == t), None)
            if r is None or r["acc"] is None:
                row.append(rp.Cell(note=""))
                gaps.append(rp.Cell(note=""))
                continue
            row.append(rp.Cell(main=f"{100 * r['acc']:.1f}", unc=f"± {100 * Z * (r['acc_se'] or 0):.1f}",
                               value=r["acc"]))
            if r.get("gap_to_bayes") is not None:
                lo, hi = rp.ci95(r["gap_to_bayes"], r["gap_to_bayes_se"])
                gaps.append(rp.Cell(main=f"{100 * r['gap_to_bayes']:+.1f}",
                                    unc=f"± {100 * Z * r['gap_to_bayes_se']:.1f}",
                                    marker="†" if rp.excludes_zero(lo, hi) else "", value=r["gap_to_bayes"]))
            else:
                gaps.append(rp.Cell(note=""))
        rows.append(row + gaps)
    rows.append(["chance", "uniform guess"] + [rp.Cell(main=f"{100 * summary['data']['tasks'][t]['chance']:.1f}")
                                              for t in tasks] + [rp.Cell() for _ in tasks])
    cap = ("lm-eval acc (argmax of the summed continuation log-likelihood) on the synthetic multiple-choice tasks, "
           "± half-width of the 95% interval (dataset + Monte Carlo error). The Bayes-optimal answer is the argmax "
           "of the exact conditional likelihood under the true process; it is the best any scorer can do in "
           "expectation. 'model − Bayes' is the paired difference on the same questions († = interval excludes 0).")
    tables.append(rp.Table("demo-accuracy", "Accuracy against the Bayes-optimal answer", cap, header, rows,
                           [""] * len(rows), {}, n_labels=2))
    # -- bounds vs entropy
    H = summary["data"]["heldout"]
    header = ["Model", "Estimator", "What it is", "nats / document", "− H (paired)", "bits / byte",
              "length term", "verdict"]
    rows = [["True entropy H", "exact NLL (forward algorithm)", "truth",
             rp.Cell(main=f"{H['nats_per_doc']:.2f}", unc=f"± {Z * H['nats_per_doc_se']:.2f}"),
             rp.Cell(main="0"), rp.Cell(main=f"{H['bits_per_byte']:.4f}", unc=f"± {Z * H['bits_per_byte_se']:.4f}"),
             rp.Cell(main="—"), "the floor"]]
    what = {"exact": "exact likelihood", "upper_bound": "upper bound (NELBO)",
            "exact_left_to_right": "exact NLL of its left-to-right process", "not_a_likelihood": "published, NOT a bound"}
    for r in summary["bounds"]:
        prefix = "≤" if r["kind"] == "upper_bound" else ""
        rows.append([f"{r['label']}", r["estimator"], what.get(r["kind"], r["kind"]),
                     rp.Cell(main=f"{r['nats_per_doc']:.2f}", unc=f"± {Z * r['nats_per_doc_se']:.2f}", prefix=prefix),
                     rp.Cell(main=f"{r['gap']:+.2f}", unc=f"± {Z * r['gap_se']:.2f}", value=r["gap"],
                             marker="" if r["gap"] >= -2 * r["gap_se"] else "‼"),
                     rp.Cell(main=f"{r['bits_per_byte']:.4f}", unc=f"± {Z * r['bits_per_byte_se']:.4f}"),
                     rp.Cell(main=f"{r['length_term']:.2f}" if r["family"] != "arm" else "—"),
                     r["verdict"]])
    cap = (f"{H['docs']} held-out documents, each scored as one block [BOS] doc [EOS] (prime-eval ppl, wrap=False); "
           "nats per document ± 95% interval over documents; '− H' is the paired difference to the exact NLL of the "
           "same documents (‼ = more than 2 SE below the entropy). A likelihood or a valid upper bound can never be "
           "below H in expectation; the published legacy_joint can. Diffusion rows include the length term "
           "−log q̂(L) (a block of known length L is scored; q̂ = training length distribution), see "
           "prime_eval/demo.py. Bits per byte: Σ NLL / (ln 2 · Σ UTF-8 bytes).")
    tables.append(rp.Table("demo-entropy", "Bounds against the true entropy (held-out documents)", cap, header, rows,
                           [""] * len(rows), {}, n_labels=3))
    # -- audit on trained networks
    header = ["Case", "Estimator", "E[estimate] (exact)", "exact NLL of the model", "gap", "verdict"]
    rows = []
    for r in summary["audit"]["rows"]:
        if not r["case"].startswith("trained"):
            continue
        rows.append([r["case"], r["estimator"], rp.Cell(main=f"{r['expectation']:.4f}"),
                     rp.Cell(main=f"{r['reference']:.4f}"), rp.Cell(main=f"{r['gap']:+.4f}", value=r["gap"]),
                     r["verdict"]])
    a = summary["audit"]
    cap = ("Exact enumeration on the trained networks (every mask set; the reference is the exact NLL of the "
           "network's own any-order generative process, by dynamic programming over reveal orders). "
           f"The generic audit (`prime-eval audit --fast`, {len(a['rows']) - len(rows)} rows) is in demo.json; "
           f"legacy_joint rows below the reference across both: {a['legacy_violations']}; every valid estimator a "
           f"bound: {'yes' if a['valid_estimators_pass'] else 'NO'}.")
    tables.append(rp.Table("demo-audit", "Exact audit on the trained networks", cap, header, rows, [""] * len(rows),
                           {}, n_labels=2))
    return tables


def _demo_plots(summary: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prime_eval import report as rp

    Z = rp.Z95
    plots = {}
    tasks = list(summary["data"]["tasks"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.8 / len(FAMILIES)
    colors = {"arm": "#4c72b0", "mdm": "#dd8452", "prime": "#55a868"}
    for i, fam in enumerate(FAMILIES):
        xs, ys, es = [], [], []
        for j, t in enumerate(tasks):
            r = next((a for a in summary["accuracy"] if a["model"] == f"{fam}-demo" and a["task"] == t), None)
            if r and r["acc"] is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(100 * r["acc"])
                es.append(100 * Z * (r["acc_se"] or 0))
        ax.bar(xs, ys, width * 0.9, yerr=es, capsize=3, color=colors[fam], label=LABELS[fam])
    for j, t in enumerate(tasks):
        s = summary["data"]["tasks"][t]
        ax.hlines(100 * s["bayes_acc"], j - 0.45, j + 0.45, colors="k", linewidth=2,
                  label="Bayes-optimal" if j == 0 else None)
        ax.axhspan(0, 0, alpha=0)
        ax.hlines(100 * s["chance"], j - 0.45, j + 0.45, colors="gray", linestyles="dotted",
                  label="chance" if j == 0 else None)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    plots["demo_accuracy"] = ("Accuracy of each reference model on the synthetic tasks; black bar: Bayes-optimal "
                              "accuracy (exact posterior), dotted: chance.", rp._png(fig))
    rows = summary["bounds"]
    fig, ax = plt.subplots(figsize=(7.0, 0.42 * len(rows) + 1.6))
    ax.axvline(0, color="k", linewidth=1.2, label="true entropy: exact NLL of the same documents")
    for k, r in enumerate(rows):
        y = len(rows) - 1 - k
        bad = r["kind"] == "not_a_likelihood"
        ax.errorbar(r["gap"], y, xerr=Z * r["gap_se"], fmt="o", capsize=3,
                    color="#c44e52" if bad else colors[r["family"]])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['label']} · {r['estimator']}" for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("estimate − exact NLL (nats per document, paired 95% interval)")
    ax.set_title("Left of the line = below the true entropy: impossible for a likelihood", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    plots["demo_bounds"] = ("Each estimator minus the exact NLL of the same held-out documents. Valid bounds and "
                            "exact likelihoods lie right of 0; the published legacy_joint (red) can fall left of it.",
                            rp._png(fig))
    return plots


def build_report(summary: dict, runs_dir: Path, out: Path, collection=None) -> list[Path]:
    """The standard `prime-eval report` of the runs, with the demo's tables and plots first, in every format."""
    from prime_eval import report as rp

    if collection is None:
        collection = rp.load([runs_dir], _meta(summary))
    rep = rp.build(collection, title="prime-eval demo: reference models on a language with known entropy")
    rep.tables = _demo_tables(summary) + rep.tables
    rep.notes = [f"Demo settings: seed {summary['settings']['seed']}, "
                 f"{'quick' if summary['settings']['quick'] else 'full'} mode; everything in demo.json."] + rep.notes
    # The perplexity-versus-size plot needs several sizes per family; the demo has one (and several estimators per
    # model), so only the standard accuracy plot is drawn from the collection.
    plots = {**_demo_plots(summary), **rp.make_plots(rep, dataclasses.replace(collection, ppl=[]))}
    rep.plots = plots
    out.mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    written, plot_files = [], {}
    for name, (caption, png) in plots.items():
        p = out / "plots" / f"{name}.png"
        p.write_bytes(png)
        written.append(p)
        plot_files[name] = (caption, f"plots/{name}.png")
    (out / "report.md").write_text(rp.render_markdown(rep, plot_files))
    (out / "report.tex").write_text(rp.render_latex(rep))
    (out / "report.html").write_text(rp.render_html(rep))
    written += [out / "report.md", out / "report.tex", out / "report.html"]
    for name, text in rp.render_csv(rep).items():
        (out / name).write_text(text)
        written.append(out / name)
    written += _demo_csvs(summary, out)
    return written, rep


def _demo_csvs(summary: dict, out: Path) -> list[Path]:
    import csv

    paths = []
    for name, rows, cols in (
            ("demo_accuracy.csv", summary["accuracy"],
             ["model", "family", "task", "n", "acc", "acc_se", "acc_se_data", "mc_included", "acc_norm",
              "bayes_acc", "bayes_acc_se", "gap_to_bayes", "gap_to_bayes_se", "chance"]),
            ("demo_entropy.csv", summary["bounds"],
             ["model", "family", "estimator", "kind", "is_bound", "docs", "nats_per_doc", "nats_per_doc_se",
              "gap", "gap_se", "bits_per_byte", "bits_per_byte_se", "gap_bits_per_byte", "length_term", "mc_se",
              "nll_per_token", "ppl_per_token", "samples", "verdict"])):
        p = out / name
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        paths.append(p)
    return paths


def _meta(summary: dict) -> dict:
    return {f"{f}-demo": {"family": f, "params": summary["models"][f]["params"], "label": f"{LABELS[f]} (demo)"}
            for f in FAMILIES}


# ----------------------------------------------------------------------------------------------------------------
# The whole demo


def _require(module: str, step: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise UserError(f"demo step '{step}' needs {module}, which is not installed in this checkout yet") from e
        raise


def _clean_outputs(out: Path) -> None:
    """Remove what a previous demo run wrote into `out` (only our own files and folders)."""
    import shutil

    for sub in ("runs", "data", "plots"):
        if (out / sub).is_dir() and (out / "demo.json").is_file():
            shutil.rmtree(out / sub)
    for name in ("report.md", "report.tex", "report.html", "accuracy.csv", "paired.csv", "perplexity.csv",
                 "demo_accuracy.csv", "demo_entropy.csv"):
        if (out / "demo.json").is_file():
            (out / name).unlink(missing_ok=True)


def run_demo(out: str | Path = "reports/demo", *, cache_dir: str | Path | None = None, seed: int = 0,
             quick: bool = False, retrain: bool = False, threads: int | None = None, console=None) -> dict:
    """Run steps 1-6; returns the summary written to `out/demo.json`."""
    import torch
    from rich.console import Console

    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=160)
    # One thread by default: on a 2-core machine shared with anything else, torch's second OpenMP thread spins at
    # barriers and makes small models several times slower (measured); --threads 2 helps only on an idle machine.
    torch.set_num_threads(int(threads) if threads else 1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    settings = default_settings(seed, quick)
    timings: dict[str, float] = {}
    _clean_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, runs_dir = out / "data", out / "runs"

    def step(n: int, text: str) -> float:
        console.rule(f"[bold]{n}/6[/] {text}", align="left")
        return time.perf_counter()

    # 1. ground truth
    t = step(1, "ground truth: a random automaton language, its corpora, exact NLLs and tasks")
    with console.status("sampling documents, exact likelihoods by the forward algorithm ..."):
        data = generate(settings.language, settings.n_train, settings.n_heldout, settings.n_task_items)
        task_files = write_tasks(data, data_dir, data_dir / "tasks")
        write_heldout(data, data_dir / "heldout.jsonl")
    ds = data.summary()
    h = ds["heldout"]
    console.print(f"{ds['n_words']} words, {ds['n_states']} hidden states; {ds['train_docs']:,} training documents "
                  f"({ds['train_bytes'] / 1e6:.1f} MB); true entropy on {h['docs']} held-out documents: "
                  f"{h['nats_per_doc']:.2f} ± {h['nats_per_doc_se']:.2f} nats/doc, {h['bits_per_byte']:.4f} bits/byte")
    for task, s in ds["tasks"].items():
        console.print(f"  {task}: {s['docs']} questions, Bayes-optimal accuracy {100 * s['bayes_acc']:.1f}% "
                      f"(expected {100 * s['bayes_expected']:.1f}%), chance {100 * s['chance']:.0f}%")
    timings["ground_truth"] = time.perf_counter() - t

    # 2-3. tokenizer and models
    t = step(2, "tokenizer and reference models (ARM, MDM, MDM-Prime-v2)")
    _require("prime_eval.networks.lit_gpt", "train")
    art = ensure_models(settings, data, cache, console, retrain=retrain)
    models = {f: {"params": art.train_log["models"][f]["params"], "checkpoint": str(art.checkpoints[f]),
                  "train_seconds": art.train_log["models"][f]["seconds"],
                  "loss_last": art.train_log["models"][f]["loss_last"]} for f in FAMILIES}
    console.print(("loaded from cache " if art.cached else "trained and cached in ") + str(art.folder)
                  + f" ({art.train_log['seconds']:.0f} s of training when built)")
    timings["models"] = time.perf_counter() - t

    # 4a. lm-eval scores
    t = step(3, "zero-shot scores through lm-eval (adapters arm, mdm, prime)")
    _require("model_adapters.base", "score")
    lm_dir = runs_dir / "lm_eval"
    results = {}
    for fam in FAMILIES:
        console.print(f"scoring {LABELS[fam]} ...")
        results[fam] = str(score_model(fam, art, settings, data_dir / "tasks", lm_dir, list(task_files)))
    timings["score"] = time.perf_counter() - t

    # 4b. bound perplexity vs entropy
    t = step(4, "bound perplexity of every estimator against the exact NLL")
    _require("prime_eval.perplexity", "perplexity")
    bounds = bound_vs_entropy(art, settings, data, runs_dir / "ppl", console)
    timings["perplexity"] = time.perf_counter() - t

    # 5. audit
    t = step(5, "exact audit (generic cases and the trained networks)")
    with console.status("enumerating mask sets and reveal orders ..."):
        audit_res = run_audit(art, settings, data)
    timings["audit"] = time.perf_counter() - t

    # 6. report
    t = step(6, "report")
    _require("prime_eval.report", "report")
    from prime_eval import report as rp

    summary = {"kind": "prime-eval/demo", "version": 1, "settings": settings.as_dict(),
               "training_key": settings.training_key(), "cache": str(art.folder), "cached": art.cached,
               "data": ds, "models": models, "train_log": {k: v for k, v in art.train_log.items() if k != "settings"},
               "results_files": results, "bounds": bounds, "audit": audit_res, "timings": timings}
    collection = rp.load([runs_dir], _meta(summary))
    summary["accuracy"] = accuracy_rows(collection, data)
    written, rep = build_report(summary, runs_dir, out, collection)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")

    demo_only = rp.Report(title=rep.title, tables=rep.tables[:2], notes=[])
    rp.render_console(demo_only, console)
    console.print(f"[bold]{len(written) + 1} files[/] in {out}/ after {timings['total']:.0f} s "
                  f"({'models from cache' if art.cached else 'models trained'}).")
    console.print(f"[bold green]Report:[/] {(out / 'report.html').resolve()}  (also report.md, report.tex, CSVs, "
                  "plots/, demo.json)")
    return summary
