"""Monte Carlo rows: the unit of work shared by every estimator, and the forward pass that packs them.

An estimator turns one request into `Rows` (network inputs drawn from the request's own generator), the network
returns logits only where `logits_at` is True, and the estimator turns those logits into K per-sample values.
Because sampling happens per request, packing rows of many requests into one pass never changes the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Rows:
    """Network inputs of one request.

    inputs:    (R, T) ids given to the network (T = L tokens, or L·ℓ sub-tokens for Prime).
    logits_at: (R, L) bool, token positions whose logits enter the loss.
    num_samples: K, the number of per-sample values `cost` returns.
    data:      estimator-specific tensors (targets, weights, masks, ...).
    """

    inputs: torch.Tensor
    logits_at: torch.Tensor
    num_samples: int
    data: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_logits(self) -> int:
        return int(self.logits_at.sum())


@dataclass
class Estimate:
    """Per-sample NLL values of one request (nats), with their Monte Carlo mean and standard error."""

    values: torch.Tensor  # (K,) float64
    num_forward_rows: int
    aggregate: object = None  # estimator-specific (values) -> (estimate, stderr); default: mean and its SE

    @property
    def mean(self) -> float:
        return mean_and_stderr(self.values, self.aggregate)[0]

    @property
    def stderr(self) -> float:
        return mean_and_stderr(self.values, self.aggregate)[1]


def mean_and_stderr(values: torch.Tensor, aggregate=None) -> tuple[float, float]:
    """The estimate from K per-sample values: their mean and its standard error (or the estimator's own rule,
    e.g. -log-mean-exp for `iw`). Use `getattr(est, "aggregate", None)`."""
    if aggregate is not None:
        return aggregate(values)
    k = values.numel()
    return float(values.mean()), (float(values.std(unbiased=True) / math.sqrt(k)) if k > 1 else 0.0)


def bucket_length(tokens: int, bucket: int | None) -> int:
    """Tokens a row is padded to: the next multiple of `bucket` (None: its own length)."""
    return tokens if not bucket else -(-tokens // bucket) * bucket


def forward_rows(net, rows_list: list[Rows], rows_per_pass: int = 64, bucket: int | None = None) -> list[torch.Tensor]:
    """Run the network on the rows of many requests, `rows_per_pass` rows per forward pass.

    Rows that need no logits are skipped. Rows of different lengths are right-padded and masked with
    `attention_mask`, so each row's logits do not depend on which rows share its pass (mathematically; in the last
    bits padding changes them). `bucket` (tokens): every row is padded to the next multiple of `bucket` and the mask
    is always passed, so a row's computation has the same shape whichever rows share its pass.
    Returns, for each Rows, the logits at its `logits_at` positions, (N_r, V), row-major, on the network's device
    (costs are computed there; only per-sample values come back to the CPU).
    """
    ell = getattr(net, "ell", 1) if getattr(net, "family", None) == "prime" else 1
    pad_id = getattr(net, "mask_id", None)
    pad_id = 0 if pad_id is None else pad_id
    work = [(r, i) for r, rows in enumerate(rows_list) for i in range(rows.num_rows)
            if bool(rows.logits_at[i].any())]
    # longest rows first: fewer padded positions per pass
    work.sort(key=lambda ri: -rows_list[ri[0]].inputs.shape[1])
    out: list[list[tuple[int, torch.Tensor]]] = [[] for _ in rows_list]
    device = next(iter(net.parameters()), torch.empty(0)).device
    with torch.no_grad():
        for s in range(0, len(work), max(1, rows_per_pass)):
            chunk = work[s:s + rows_per_pass]
            T = max(rows_list[r].inputs.shape[1] for r, _ in chunk)
            T = bucket_length(T // ell, bucket) * ell
            L = T // ell
            idx = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            att = torch.zeros(len(chunk), L, dtype=torch.bool)
            la = torch.zeros(len(chunk), L, dtype=torch.bool)
            for k, (r, i) in enumerate(chunk):
                row = rows_list[r].inputs[i]
                idx[k, :row.numel()] = row
                att[k, :row.numel() // ell] = True
                la[k, :rows_list[r].logits_at.shape[1]] = rows_list[r].logits_at[i]
            mask_arg = None if bool(att.all()) and not bucket else att.to(device)
            logits = net(idx.to(device), attention_mask=mask_arg, logits_at=la.to(device))
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()  # costs stay on the device, in fp32 (fp64 for exact audit networks)
            counts = la.sum(1).tolist()
            for (r, i), piece in zip(chunk, torch.split(logits, counts)):
                out[r].append((i, piece))
    result = []
    for r, pieces in enumerate(out):
        pieces.sort(key=lambda p: p[0])
        V = getattr(net, "vocab_size", None)
        result.append(torch.cat([p for _, p in pieces]) if pieces else torch.zeros(0, V or 1, device=device))
    return result


def stratified_uniform(generator: torch.Generator, k: int) -> torch.Tensor:
    """u_k = (u + k/K) mod 1 for k = 0..K-1 with one shared u ~ U(0,1) (SMDM / VDM low-discrepancy), float64."""
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    return (u + torch.arange(k, dtype=torch.float64) / k) % 1.0
