"""Monte Carlo rows: the unit of work shared by every estimator, and the forward pass that packs them.

An estimator turns one request into `Rows` (network inputs drawn from the request's own generator), the network
returns logits only where `logits_at` is True, and the estimator turns those logits into K per-sample values.
Because sampling happens per request, packing rows of many requests into one pass never changes the numbers.

    rows = [est.rows(x, target, generator, K) for ...]                     # sampling (estimators.sampler)
    logits = forward_rows(net, rows)              ->  est.cost(rows[r], logits[r])             # all logits held
    for r, terms in forward_terms(net, est, rows):    est.cost_from_terms(rows[r], terms)      # memory stays flat

`cost` = `cost_from_terms` ∘ `logit_terms`: the logits are reduced to the per-position values the cost needs
(-log p of the target; Prime: the true digits' marginals), which `forward_terms` does chunk by chunk as passes finish.
`forward_rows_batch_invariant` forms passes whose make-up cannot change a request's numbers (docs/scale-out.md).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from prime_eval.errors import UserError


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



def forward_passes(net, rows_list: Sequence[Rows], rows_per_pass: int = 64,
                   bucket: int | None = None) -> Iterator[list[tuple[int, int, torch.Tensor]]]:
    """Run the network on the rows of many requests, `rows_per_pass` rows per forward pass, one pass at a time.

    Yields, per pass, [(request r, row i, logits (n_ri, V))] for its rows, the logits at the row's `logits_at`
    positions, row-major, on the network's device, in fp32 (fp64 for exact audit networks). Rows that need no logits
    are skipped; longest rows go first (fewer padded positions per pass), and the rows of one request come in order.
    Rows of different lengths are right-padded and masked with `attention_mask`, so each row's logits do not depend
    on which rows share its pass (mathematically; in the last bits padding changes them). `bucket` (tokens): every
    row is padded to the next multiple of `bucket` and the mask is always passed, so a row's computation has the
    same shape whichever rows share its pass.
    """
    ell = getattr(net, "ell", 1) if getattr(net, "family", None) == "prime" else 1
    pad_id = getattr(net, "mask_id", None)
    pad_id = 0 if pad_id is None else pad_id
    work = [(r, i) for r, rows in enumerate(rows_list) for i in range(rows.num_rows)
            if bool(rows.logits_at[i].any())]
    work.sort(key=lambda ri: -rows_list[ri[0]].inputs.shape[1])  # stable: a request's rows stay in order
    device = next(iter(net.parameters()), torch.empty(0)).device
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
        with torch.no_grad():
            logits = net(idx.to(device), attention_mask=mask_arg, logits_at=la.to(device))  # (N, V)
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()  # costs stay on the device, in fp32 (fp64 for exact audit networks)
        out = [(r, i, piece) for (r, i), piece in zip(chunk, torch.split(logits, la.sum(1).tolist()))]
        del logits  # the pass's logits live only as long as the consumer holds its pieces
        yield out
        del out


def forward_rows(net, rows_list: Sequence[Rows], rows_per_pass: int = 64,
                 bucket: int | None = None) -> list[torch.Tensor]:
    """For each Rows, its logits at its `logits_at` positions, (N_r, V), row-major, on the network's device (costs
    are computed there; only per-sample values come back to the CPU). Passes as in `forward_passes`.

    Holds the logits of every request at once: to keep memory flat, reduce them as they come (`forward_terms`)."""
    out: list[list[tuple[int, torch.Tensor]]] = [[] for _ in rows_list]
    for pass_ in forward_passes(net, rows_list, rows_per_pass, bucket):
        for r, i, piece in pass_:
            out[r].append((i, piece))
    device = next(iter(net.parameters()), torch.empty(0)).device
    result = []
    for pieces in out:
        pieces.sort(key=lambda p: p[0])
        V = getattr(net, "vocab_size", None)
        result.append(torch.cat([p for _, p in pieces]) if pieces else torch.zeros(0, V or 1, device=device))
    return result


PACKING = ("bucket", "length", "request")


def batch_invariant_groups(net, rows_list: Sequence[Rows], pack: str = "bucket",
                           bucket: int = 32) -> list[tuple[list[int], int | None]]:
    """The requests that may share forward passes, as (request indices, padding bucket) groups, longest first.

    pack="bucket" (default): every row is padded to the next multiple of `bucket` tokens (a length that depends on
      the row alone) and a pass holds rows of one padded length, always with the attention mask: a row's
      computation has the same shape whatever shares its pass, and passes stay full (lengths vary a lot).
    pack="length": each pass holds rows of one input length only. Padding a row to a longer pass changes
      its logits in the last bits (CPU SDPA blocks the key axis by length; measured ~3e-8 on lit_gpt), so with
      mixed-length passes a request's numbers would depend on which other requests share its pass, i.e. on the
      number of processes and on which requests a resumed run still has to compute. Rows of equal length need no
      padding and no attention mask, and on CPU the number of rows in a pass does not change a row's logits
      (tests/test_distributed.py checks both).
    pack="request": each request's rows in passes of their own (padded to the bucket as well), so every pass's
      shape depends on the request alone — for GPUs, where a matmul's kernel (and its summation order) may depend on
      the number of rows. Costs throughput only when a request has fewer rows than `rows_per_pass`.
    """
    if pack not in PACKING:
        raise UserError(f"pack={pack!r}: choose one of {', '.join(PACKING)}")
    if pack == "request":  # padded to the bucket too: the same bits as pack="bucket" on CPU
        return [([i], bucket) for i in range(len(rows_list))]
    ell = getattr(net, "ell", 1) if getattr(net, "family", None) == "prime" else 1
    width = bucket if pack == "bucket" else None
    groups: dict[int, list[int]] = {}
    for i, rows in enumerate(rows_list):
        groups.setdefault(bucket_length(int(rows.inputs.shape[1]) // ell, width), []).append(i)
    return [(groups[length], width) for length in sorted(groups, reverse=True)]


def forward_rows_batch_invariant(net, rows_list: Sequence[Rows], rows_per_pass: int = 64, *,
                                 pack: str = "bucket", bucket: int = 32) -> list[torch.Tensor]:
    """`forward_rows`, with passes whose make-up cannot change a request's numbers (`batch_invariant_groups`)."""
    out: list = [None] * len(rows_list)
    for idx, width in batch_invariant_groups(net, rows_list, pack, bucket):
        for i, logits in zip(idx, forward_rows(net, [rows_list[i] for i in idx], rows_per_pass, bucket=width)):
            out[i] = logits
    return out


LOGITS_CHUNK_BYTES = 64 * 2**20  # logits reduced at a time per request by `forward_terms` (fp32: 64 MiB)


def logits_chunk_rows(vocab_size: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Logit rows per reduction chunk: chunk_bytes / (4 bytes · V), at least 1 (V = 50,257: 1,335 rows per 256 MiB,
    333 per the default 64 MiB). Depends on V alone, so a request's chunks never depend on the batch size."""
    return max(1, chunk_bytes // (4 * max(1, int(vocab_size))))


def forward_terms(net, est, rows_list: Sequence[Rows], rows_per_pass: int = 64, *, pack: str = "bucket",
                  bucket: int = 32, chunk_rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """The per-position values the estimator's cost needs (`est.logit_terms`), request by request, without holding
    the logits of more than one pass: yields (request index, terms) as soon as a request's last logits are reduced;
    `est.cost_from_terms(rows, terms)` then gives its K values.

    Passes as in `forward_rows_batch_invariant`. Each request's logit rows (row-major over `logits_at`) are reduced
    in chunks of `chunk_rows` rows counted from its first (default `logits_chunk_rows(V)`), whatever passes they
    arrive in, so a request's terms depend on the request alone; a request with at most `chunk_rows` logit rows is
    reduced in one piece, exactly as `est.cost(rows, logits)` does. Estimators whose terms pair rows
    (`row_local` False: CFG) are reduced one whole request at a time. Memory: one pass's logits, plus under one chunk
    per request still in flight — never batch × L × V across the requests.
    """
    V = getattr(net, "vocab_size", None) or 1
    C = (chunk_rows or logits_chunk_rows(V)) if getattr(est, "row_local", False) else None
    device = next(iter(net.parameters()), torch.empty(0)).device
    need = [int(rows.logits_at.sum()) for rows in rows_list]  # logit rows of each request
    for r, n in enumerate(need):
        if n == 0:
            yield r, est.logit_terms(rows_list[r], torch.zeros(0, V, device=device), 0)
    for idx, width in batch_invariant_groups(net, rows_list, pack, bucket):
        flight: dict[int, _InFlight] = {}
        for pass_ in forward_passes(net, [rows_list[i] for i in idx], rows_per_pass, bucket=width):
            for local, _, piece in pass_:
                r = idx[local]
                f = flight.setdefault(r, _InFlight())
                f.add(piece)
                while C is not None and f.held >= C:
                    f.reduce(est, rows_list[r], C)
            for r in [r for r, f in flight.items() if f.start + f.held == need[r]]:  # complete requests
                f = flight.pop(r)
                if f.held:
                    f.reduce(est, rows_list[r], f.held)
                yield r, torch.cat(f.parts) if len(f.parts) > 1 else f.parts[0]
            for f in flight.values():
                f.detach()  # copies what is held: the pass's logits can be freed
            pass_ = piece = None  # released before the next forward pass


class _InFlight:
    """A request's logit rows received and not yet reduced, and the terms of those reduced (`forward_terms`)."""

    def __init__(self):
        self.pending: list[torch.Tensor] = []
        self.held = self.start = 0
        self.parts: list[torch.Tensor] = []

    def add(self, piece: torch.Tensor) -> None:
        self.pending.append(piece)
        self.held += piece.shape[0]

    def reduce(self, est, rows: Rows, n: int) -> None:
        """Reduce the next `n` logit rows (copying at most those n rows out of the pass)."""
        out, got = [], 0
        while got < n:
            p = self.pending[0]
            take = min(n - got, p.shape[0])
            out.append(p[:take])
            self.pending[0] = p[take:]
            if take == p.shape[0]:
                self.pending.pop(0)
            got += take
        self.parts.append(est.logit_terms(rows, torch.cat(out) if len(out) > 1 else out[0], self.start))
        self.start += n
        self.held -= n

    def detach(self) -> None:
        """Copy what is still held (under one chunk) out of the pass's logits tensor."""
        if self.pending:
            self.pending = [torch.cat(self.pending)]
