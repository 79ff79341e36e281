"""Monte Carlo rows: the unit of work shared by every estimator, and the forward passes that pack them.

An estimator turns one request into `Rows` (network inputs drawn from the request's own generator), the network's
trunk returns hidden states only where `logits_at` is True, its head turns them into logits, and the estimator turns
those into K per-sample values. Because sampling happens per request, packing rows of many requests into one pass
never changes the draws.

    rows = [est.rows(x, target, generator, K) for ...]                     # sampling (estimators.sampler)
    logits = forward_rows(net, rows)              ->  est.cost(rows[r], logits[r])             # all logits held
    for r, terms in forward_terms(net, est, rows):    est.cost_from_terms(rows[r], terms)      # memory stays flat

`cost` = `cost_from_terms` ∘ `logit_terms`: the logits are reduced to the per-position values the cost needs
(-log p of the target; Prime: the true digits' marginals), which `forward_terms` does as each head call returns
(`ppl`, and the `mdm` / `prime` adapters: a request's logits are never all held, whatever its samples). The reduction
is row by row (Prime's marginal matmul in blocks of fixed shape, `matmul_fixed_rows`), so reducing a request's logits
in chunks of any size gives the bits of `cost` on all of them.

Fixed shapes. A CPU BLAS (and a GPU library) picks its kernel, and with it a row's rounding, by the shapes of the
matrices, though within one shape a row's result depends on that row alone (not on its slot or the other rows). So
`forward_rows_batch_invariant` and `forward_terms` run passes whose shapes cannot depend on what else is scored: rows
of one padded length (`batch_invariant_groups`), exactly `rows_per_pass` rows per pass (dummy rows, without logits,
fill the last one), and the output head on exactly `HEAD_ROWS` hidden states per call (the last call padded with
zero states). A request's values then depend on the request, its seed and the fixed sizes (`rows_per_pass`, the
bucket, `HEAD_ROWS`), never on the other requests, their order, the number of processes or what a resumed run still
had to compute (tests/test_batch_invariance.py, at d = 1792 and V = 32,000).

HEAD_ROWS = 256 (`benchmarks/head_rows.py`): on this CPU (MKL, AVX-512, torch 2.13) an (N, d) @ (d, V) product gives
a row the same bits for N = 256, 512 and 1024 at (d, V) = (64, 50257), (576, 4096), (576, 49152), (768, 50257) and
(1792, 32000), other bits for N < 256 at d = 1792 (N < 16 at the others), and within one shape the same bits
whatever its slot and the other rows' values. At these widths the values thus do not even depend on HEAD_ROWS within
256 … 1024; one call holds 256·V floats (51 MB at V = 50,257).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from prime_eval.errors import UserError
from prime_eval.networks.contract import position_inputs


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



HEAD_ROWS = 256  # C: hidden states per call of the output head (module docstring, "Fixed shapes")


@dataclass
class Pass:
    """One forward pass: the hidden states of its rows at their `logits_at` positions, row-major, and whose they are.

    owners: [(request r, logit rows n)] in order (a request's rows are consecutive in a pass).
    hidden: (N, d) on the network's device; inputs: (N, ℓ) the input ids of those positions (for a head that reads
    them, e.g. carry-over), or None.
    """

    owners: list[tuple[int, int]]
    hidden: torch.Tensor
    inputs: torch.Tensor | None
    fixed: bool = True

    def logits(self, net) -> Iterator[list[tuple[int, torch.Tensor]]]:
        """The pass's logits, one head call at a time (`head_logits`): per call, [(request r, logits (n, V))] of the
        rows it covers, in order. A piece is a view of that call's logits: copy what must outlive the next call."""
        bounds, at = [], 0
        for r, n in self.owners:
            bounds.append((r, at, at + n))
            at += n
        k = 0
        for a, logits in head_logits(net, self.hidden, self.inputs, fixed=self.fixed):
            b, pieces = a + logits.shape[0], []
            while k < len(bounds) and bounds[k][1] < b:
                r, lo, hi = bounds[k]
                pieces.append((r, logits[max(lo, a) - a:min(hi, b) - a]))
                if hi > b:
                    break
                k += 1
            yield pieces


def head_logits(net, hidden: torch.Tensor, inputs: torch.Tensor | None = None, *,
                fixed: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """`net.head` over hidden states (N, d), `HEAD_ROWS` rows per call: yields (first row, logits (c, V)) in fp32 (fp64
    for exact audit networks). `fixed`: every call gets a fresh (HEAD_ROWS, d) tensor (the last one padded with zero
    states whose logits are dropped), so a row's logits never depend on the rows that share its call."""
    C, N = HEAD_ROWS, hidden.shape[0]
    for a in range(0, N, C):
        n = min(C, N - a)
        h, x = hidden[a:a + n], None if inputs is None else inputs[a:a + n]
        if fixed:
            h, x = padded_rows(h, C), None if x is None else padded_rows(x, C)
        with torch.no_grad():
            logits = net.head(h, x)
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()  # costs stay on the device, in fp32 (fp64 for exact audit networks)
        yield a, logits[:n]


def padded_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (n, ...), n ≤ rows, in a fresh tensor of exactly `rows` rows (zeros below): one shape, so the same kernel,
    alignment and summation order for every block (module docstring, "Fixed shapes")."""
    n = x.shape[0]
    return torch.cat([x, x.new_zeros(rows - n, *x.shape[1:])]) if n < rows else x.clone()


def matmul_fixed_rows(a: torch.Tensor, b: torch.Tensor, rows: int = HEAD_ROWS) -> torch.Tensor:
    """a (N, k) @ b (k, m) computed `rows` rows of a at a time (`padded_rows`): a row's result does not depend on N
    or on the other rows, so reducing a request's logits in chunks of any size gives the same bits (Prime's digit
    marginals, `PrimeEstimator.logit_terms`)."""
    N = a.shape[0]
    if N == 0:
        return a @ b
    out = [(padded_rows(a[s:s + rows], rows) @ b)[:min(rows, N - s)] for s in range(0, N, rows)]
    return out[0] if len(out) == 1 else torch.cat(out)


def network_device(net) -> torch.device:
    return next(iter(net.parameters()), torch.empty(0)).device


def forward_passes(net, rows_list: Sequence[Rows], rows_per_pass: int = 64, bucket: int | None = None, *,
                   fixed: bool = False) -> Iterator[Pass]:
    """Run the network's trunk on the rows of many requests, `rows_per_pass` rows per forward pass, one pass at a time:
    yields each pass's hidden states at its rows' `logits_at` positions (`Pass`; `Pass.logits` applies the head).

    Rows that need no logits are skipped; longest rows go first (fewer padded positions per pass), and the rows of
    one request come in order. Rows of different lengths are right-padded and masked with `attention_mask`, so each
    row's values do not depend on which rows share its pass (mathematically; in the last bits padding changes them).
    `bucket` (tokens): every row is padded to the next multiple of `bucket` and the mask is always passed.
    `fixed` (module docstring, "Fixed shapes"): every pass holds exactly `rows_per_pass` rows (dummy rows of padding,
    without logits, fill the last one) and every head call `HEAD_ROWS` rows; with rows of one padded length (the
    callers' groups), every shape then depends on that length and `rows_per_pass` alone.
    """
    ell = getattr(net, "ell", 1) if getattr(net, "family", None) == "prime" else 1
    pad_id = getattr(net, "mask_id", None)
    pad_id = 0 if pad_id is None else pad_id
    work = [(r, i) for r, rows in enumerate(rows_list) for i in range(rows.num_rows)
            if bool(rows.logits_at[i].any())]
    work.sort(key=lambda ri: -rows_list[ri[0]].inputs.shape[1])  # stable: a request's rows stay in order
    device = network_device(net)
    R = max(1, rows_per_pass)
    for s in range(0, len(work), R):
        chunk = work[s:s + R]
        T = max(rows_list[r].inputs.shape[1] for r, _ in chunk)
        T = bucket_length(T // ell, bucket) * ell
        L = T // ell
        B = R if fixed else len(chunk)
        idx = torch.full((B, T), pad_id, dtype=torch.long)
        att = torch.ones(B, L, dtype=torch.bool)  # dummy rows attend over their own padding
        la = torch.zeros(B, L, dtype=torch.bool)
        owners: list[tuple[int, int]] = []
        for k, (r, i) in enumerate(chunk):
            row = rows_list[r].inputs[i]
            idx[k, :row.numel()] = row
            att[k, row.numel() // ell:] = False
            la[k, :rows_list[r].logits_at.shape[1]] = rows_list[r].logits_at[i]
            n = int(rows_list[r].logits_at[i].sum())
            if owners and owners[-1][0] == r:
                owners[-1] = (r, owners[-1][1] + n)
            else:
                owners.append((r, n))
        mask_arg = None if bool(att.all()) and not bucket else att.to(device)
        idx, la = idx.to(device), la.to(device)
        with torch.no_grad():
            hidden = net.hidden(idx, attention_mask=mask_arg, at=la)  # (N, d)
        yield Pass(owners, hidden, position_inputs(idx, ell, la), fixed)


def forward_rows(net, rows_list: Sequence[Rows], rows_per_pass: int = 64,
                 bucket: int | None = None, *, fixed: bool = False) -> list[torch.Tensor]:
    """For each Rows, its logits at its `logits_at` positions, (N_r, V), row-major, on the network's device (costs
    are computed there; only per-sample values come back to the CPU). Passes as in `forward_passes`.

    Holds the logits of every request at once: to keep memory flat, reduce them as they come (`forward_terms`)."""
    out: list[list[torch.Tensor]] = [[] for _ in rows_list]
    for pass_ in forward_passes(net, rows_list, rows_per_pass, bucket, fixed=fixed):
        for pieces in pass_.logits(net):
            for r, piece in pieces:
                out[r].append(piece)
    V = getattr(net, "vocab_size", None) or 1
    device = network_device(net)
    return [torch.cat(p) if len(p) > 1 else p[0].clone() if p else torch.zeros(0, V, device=device) for p in out]


PACKING = ("bucket", "length", "request")


def batch_invariant_groups(net, rows_list: Sequence[Rows], pack: str = "bucket",
                           bucket: int = 32) -> list[tuple[list[int], int | None]]:
    """The requests that may share forward passes, as (request indices, padding bucket) groups, longest first.

    pack="bucket" (default): every row is padded to the next multiple of `bucket` tokens (a length that depends on
      the row alone) and a pass holds rows of one padded length, always with the attention mask.
    pack="length": each pass holds rows of one input length only, without padding or attention mask.
    pack="request": each request's rows in passes of their own (padded to the bucket as well): the same shapes, so
      the same bits, as pack="bucket"; kept to check that, and for kernels that would not be row-invariant.
    With `fixed` passes (`forward_passes`) every shape a row meets then depends on its own padded length,
    `rows_per_pass` and `HEAD_ROWS` alone (module docstring, "Fixed shapes").
    """
    if pack not in PACKING:
        raise UserError(f"pack={pack!r}: choose one of {', '.join(PACKING)}")
    if pack == "request":  # padded to the bucket too: the same bits as pack="bucket"
        return [([i], bucket) for i in range(len(rows_list))]
    ell = getattr(net, "ell", 1) if getattr(net, "family", None) == "prime" else 1
    width = bucket if pack == "bucket" else None
    groups: dict[int, list[int]] = {}
    for i, rows in enumerate(rows_list):
        groups.setdefault(bucket_length(int(rows.inputs.shape[1]) // ell, width), []).append(i)
    return [(groups[length], width) for length in sorted(groups, reverse=True)]


def forward_rows_batch_invariant(net, rows_list: Sequence[Rows], rows_per_pass: int = 64, *,
                                 pack: str = "bucket", bucket: int = 32, fixed: bool = True) -> list[torch.Tensor]:
    """`forward_rows`, in passes of fixed shapes whose make-up cannot change a request's numbers
    (`batch_invariant_groups`). `fixed=False` (generation) skips the dummy rows and head padding: passes of one
    padded length only, whose last bits can then depend on how many rows share them."""
    out: list = [None] * len(rows_list)
    for idx, width in batch_invariant_groups(net, rows_list, pack, bucket):
        for i, logits in zip(idx, forward_rows(net, [rows_list[i] for i in idx], rows_per_pass, bucket=width,
                                               fixed=fixed)):
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
    the logits of a pass: yields (request index, terms) as soon as a request's last logits are reduced;
    `est.cost_from_terms(rows, terms)` then gives its K values.

    Passes as in `forward_rows_batch_invariant` (fixed shapes). The head runs `HEAD_ROWS` hidden states at a time;
    each request's logit rows (row-major over `logits_at`) are reduced in chunks of `chunk_rows` rows counted from its
    first (default `logits_chunk_rows(V)`), whatever passes and head calls they arrive in, so a request's terms depend
    on the request alone; a request with at most `chunk_rows` logit rows is reduced in one piece, exactly as
    `est.cost(rows, logits)` does. Estimators whose terms pair rows (`row_local` False: CFG) are reduced one whole
    request at a time. Memory: one pass's hidden states (N × d) and one head call's logits (HEAD_ROWS × V), plus under
    one chunk per request still in flight — never batch × L × V.
    """
    V = getattr(net, "vocab_size", None) or 1
    C = (chunk_rows or logits_chunk_rows(V)) if getattr(est, "row_local", False) else None
    device = network_device(net)
    need = [int(rows.logits_at.sum()) for rows in rows_list]  # logit rows of each request
    for r, n in enumerate(need):
        if n == 0:
            yield r, est.logit_terms(rows_list[r], torch.zeros(0, V, device=device), 0)
    for idx, width in batch_invariant_groups(net, rows_list, pack, bucket):
        flight: dict[int, _InFlight] = {}
        for pass_ in forward_passes(net, [rows_list[i] for i in idx], rows_per_pass, bucket=width, fixed=True):
            for pieces in pass_.logits(net):
                for local, piece in pieces:
                    r = idx[local]
                    f = flight.setdefault(r, _InFlight())
                    f.add(piece)
                    while C is not None and f.held >= C:
                        f.reduce(est, rows_list[r], C)
                    if f.start + f.held == need[r]:  # complete
                        del flight[r]
                        if f.held:
                            f.reduce(est, rows_list[r], f.held)
                        yield r, torch.cat(f.parts) if len(f.parts) > 1 else f.parts[0]
                for f in flight.values():
                    f.detach()  # copies what is held: the head call's logits can be freed
                pieces = piece = None
            pass_ = None  # released before the next forward pass


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
        """Copy what is still held (under one chunk) out of the head call's logits tensor."""
        if self.pending:
            self.pending = [torch.cat(self.pending)]
