"""One training loop for the three families (lit_gpt networks, `prime_eval.networks.lit_gpt`), on CPU.

    net, log = train_network("mdm", settings, token_docs, bos, eos, max_len, init=arm_state)

Rows are `[BOS] doc [EOS]` (what `prime-eval ppl` scores with wrap=False) and, for MDM/Prime with probability
`prefix_prob`, document prefixes `[BOS] doc[:k]` (what lm-eval's multiple-choice requests look like), batched by
length. AdamW, linear warm-up, cosine decay to 10%, gradient clipping at 1. The objectives: `prime_eval.demo.losses`.

Determinism: every random number of a run (initialisation, batch order, prefixes, masks) comes from one
`torch.Generator` seeded by (seed, family); no global RNG. Training runs on one intra-op thread whatever the
caller's setting (`_training_threads`), so the weights depend only on the seed (and the machine's float kernels).
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from prime_eval.demo.losses import loss_fn
from prime_eval.demo.settings import FAMILIES, LABELS, DemoSettings, TrainSpec


def run_generator(seed: int, family: str) -> torch.Generator:
    """The one generator of a training run: seeded by the demo seed and the family."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + FAMILIES.index(family))


def lit_config(settings: DemoSettings, max_len: int):
    """The lit_gpt `Config` of the demo's networks (V padded to a multiple of 64, as lit_gpt does)."""
    from prime_eval.networks.lit_gpt import Config

    m = settings.model
    return Config(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, intermediate_size=m.intermediate_size,
                  vocab_size=settings.vocab_size, padding_multiple=64, block_size=max(max_len, 64))


def build_network(family: str, settings: DemoSettings, max_len: int, generator: torch.Generator):
    """A fresh lit_gpt network with GPT-style initialisation from `generator`: every matrix N(0, 0.02), residual
    projections N(0, 0.02/√(2·n_layer)); norms at 1. The global RNG is left as it was."""
    from prime_eval.networks.lit_gpt import GPT, TransEncoder
    from prime_eval.subtokenizer import ell_from_base

    cfg = lit_config(settings, max_len)
    with torch.random.fork_rng(devices=[]):  # torch's default initialisation draws from the global RNG: restore it
        if family == "arm":
            net = GPT(cfg)
        elif family == "mdm":
            net = TransEncoder(cfg)
        else:
            net = TransEncoder(cfg, ell=ell_from_base(settings.vocab_size, 2), base=2)
    std = 0.02
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "w3.weight")) else std
                p.normal_(0.0, s, generator=generator)
    return net


def warm_start(net, state: dict) -> None:
    """Start from a trained network (AR-to-diffusion adaptation, as DiffuLLaMA / Dream): copy its blocks, final norm
    and output head; an MDM started from an ARM also takes its token embeddings (the [MASK] row starts at their
    mean); Prime keeps its fresh sub-token table."""
    own = net.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if k == "transformer.wte.weight":
                if own[k].shape[0] == v.shape[0] + 1:  # MDM from an ARM
                    own[k][: v.shape[0]] = v
                    own[k][v.shape[0]:] = v.mean(0)
            elif k in own and own[k].shape == v.shape:
                own[k].copy_(v)
    net.load_state_dict(own)


def epoch_batches(generator: torch.Generator, lengths: torch.Tensor, batch_size: int,
                  group: int = 16) -> list[torch.Tensor]:
    """One epoch of batches of document indices: shuffle, cut into groups of `group` batches, sort each group by
    length, split, shuffle the batches (little padding, still random)."""
    order = torch.randperm(len(lengths), generator=generator)
    out = []
    n = batch_size * group
    for s in range(0, len(order) - batch_size + 1, n):
        chunk = order[s:s + n]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def make_batch(family: str, docs: list[list[int]], idx: torch.Tensor, generator: torch.Generator, spec: TrainSpec,
               bos: int, eos: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `[BOS] doc [EOS]` (or, for MDM/Prime with probability prefix_prob, `[BOS] doc[:k]`, k ~ U{1..len−1}),
    right-padded with 0. Returns (ids (B, L) int64, lengths (B,) int64)."""
    rows = []
    u = torch.rand(len(idx), 2, generator=generator, dtype=torch.float64)  # (B, 2): prefix or not, its length
    for r, i in enumerate(idx.tolist()):
        d = docs[i][: max_len - 2]
        if family != "arm" and len(d) > 1 and float(u[r, 0]) < spec.prefix_prob:
            k = 1 + int(float(u[r, 1]) * (len(d) - 1))
            rows.append([bos, *d[:k]])
        else:
            rows.append([bos, *d, eos])
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
    return ids, lengths


def lr_at(spec: TrainSpec, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from lr to lr/10."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_network(family: str, settings: DemoSettings, docs: list[list[int]], bos: int, eos: int, max_len: int,
                  *, st=None, progress=None, init: dict | None = None) -> tuple[object, dict]:
    """Train one network for `settings.train[family].steps` steps (deterministic given the seed, on any number of
    threads); `init`: a trained state dict to start from (`warm_start`); `progress`: a rich Progress or None."""
    with _training_threads():
        return _train(family, settings, docs, bos, eos, max_len, st=st, progress=progress, init=init)


@contextlib.contextmanager
def _training_threads():
    """Training runs on one intra-op thread, whatever `--threads` says: a reduction split over 2 threads adds in
    another order, and hundreds of optimizer steps amplify the last-bit differences into different weights
    (measured: 1 vs 2 threads gave different checkpoints)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(family: str, settings: DemoSettings, docs: list[list[int]], bos: int, eos: int, max_len: int,
           *, st=None, progress=None, init: dict | None = None) -> tuple[object, dict]:
    spec: TrainSpec = settings.train[family]
    g = run_generator(settings.seed, family)
    net = build_network(family, settings, max_len, g)
    if init is not None:
        warm_start(net, init)
    net.train()
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))
    lengths_all = torch.tensor([len(d) for d in docs])
    batches: list[torch.Tensor] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    task = progress.add_task(f"train {LABELS[family]}", total=spec.steps, loss="") if progress else None
    for step in range(spec.steps):
        if not batches:
            batches = epoch_batches(g, lengths_all, spec.batch_size)
        x, lengths = make_batch(family, docs, batches.pop(), g, spec, bos, eos, max_len)
        for group in opt.param_groups:
            group["lr"] = lr_at(spec, step)
        loss = loss_fn(family, net, x, lengths, g, st=st, joint_weight=spec.joint_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            recent = sum(losses[-20:]) / len(losses[-20:])
            progress.update(task, advance=1, loss=f"loss {recent:.3f} nats/token")
    net.eval().requires_grad_(False)

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    log = {"family": family, "steps": spec.steps, "seconds": time.perf_counter() - t0,
           "params": sum(p.numel() for p in net.parameters()),
           "loss_first": mean(losses[:20]), "loss_last": mean(losses[-50:]),
           "loss_curve": [mean(losses[i:i + 20]) for i in range(0, len(losses), 20)]}
    return net, log
