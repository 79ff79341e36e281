"""The run loop of `prime-eval ppl`: read blocks, score them a step at a time, accumulate in block order, stop.

    result = evaluate_perplexity(net, tokenizer, text_files(["test.txt"]), Protocol(L=1024, num_samples=1))

A step is the blocks of one forward pass of `batch_size` rows (at least one block; times the number of processes).
Each step's blocks are scored (`scoring.score_blocks`: from the cache where stored, the rest computed and stored as
each is final), gathered from every rank, and added to the statistics in block order with the stop rules checked
after every block — so neither the batch size nor the number of processes changes a number. The user interface
(progress bar, summary table) and the result cache are the caller's: `progress` and `open_cache` are callbacks.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prime_eval import distributed as D
from prime_eval.errors import UserError
from prime_eval.perplexity.blocks import Block, BlockStream
from prime_eval.perplexity.protocol import (Protocol, resolve_estimator, rows_per_block, scored_positions,
                                            special_ids)
from prime_eval.perplexity.result import model_record, perplexity_json, protocol_record
from prime_eval.perplexity.sampling import bootstrap_weights
from prime_eval.perplexity.scoring import cache_identity, score_blocks
from prime_eval.perplexity.sources import as_source, open_source
from prime_eval.perplexity.stats import PerplexityStats


@dataclass(frozen=True)
class Progress:
    """What a progress display needs after each step (`evaluate_perplexity(progress=...)`)."""

    docs: int  # documents read so far
    total_docs: int | None  # when the source knows it
    tokens: int  # positions scored so far
    max_tokens: int | None
    blocks: int
    nll: float
    stderr_sampling: float  # nan before two blocks


@dataclass
class _Run:
    """The state of one run: what has been read, scored and accumulated."""

    net: object
    est: object
    p: Protocol
    K: int
    batch_size: int
    stream: BlockStream
    stats: PerplexityStats
    cache: object = None
    on_block: Callable | None = None
    dist: D.DistInfo = field(default_factory=D.active_info)
    forward_rows: int = 0
    scored_data_tokens: int = 0
    cache_hits: int = 0
    stopped: str | None = None

    def steps(self) -> Iterator[list[Block]]:
        """The blocks of each step, until the data end or a stop rule fires."""
        per_step = max(1, self.batch_size // rows_per_block(self.est, self.K, self.p.L)) * self.dist.world_size
        blocks = iter(self.stream)
        while self.stopped is None:
            batch: list[Block] = []
            planned = self.stats.tokens
            for b in blocks:
                batch.append(b)
                planned += scored_positions(self.est, b)
                if len(batch) >= per_step or (self.p.max_tokens and planned >= self.p.max_tokens):
                    break
            if not batch:
                return
            yield batch

    def score(self, batch: list[Block]) -> dict:
        """Every block's (values, rows) of the step: this rank scores blocks with index ≡ rank (mod world size)."""
        mine = [b for b in batch if b.index % self.dist.world_size == self.dist.rank]
        scored, hits = score_blocks(self.net, self.est, mine, self.p, self.K, self.batch_size, self.cache)
        if self.dist.enabled:  # every rank gets every block's values, to accumulate in block order
            scored = {i: v for part in D.all_gather_object(scored) for i, v in part.items()}
            hits = sum(D.all_gather_object(hits))
        self.cache_hits += hits
        return scored

    def accumulate(self, batch: list[Block], scored: dict) -> None:
        """Add the step's blocks in block order; the stop rules are checked after every block."""
        for b in batch:
            values, n_rows = scored[b.index]
            self.forward_rows += n_rows
            n = scored_positions(self.est, b)
            self.stats.update(values, n, b.bytes, bootstrap_weights(self.p.seed, b.index, self.p.bootstrap))
            self.scored_data_tokens += b.ids.numel() - 2
            if self.on_block is not None:
                self.on_block(b, values, n)
            self.stopped = self.p.stop_reason(self.stats)
            if self.stopped:
                return

    def progress(self, total_docs: int | None) -> Progress:
        s = self.stats
        return Progress(self.stream.num_docs, total_docs, s.tokens, self.p.max_tokens, s.blocks, s.nll,
                        s.stderr_sampling())

    def results(self, deterministic: bool, seconds: float) -> dict:
        s, stream = self.stats, self.stream
        if s.blocks == 0:
            raise UserError(f"no block to score: the source gave {stream.num_docs} documents and "
                            f"{stream.data_tokens} tokens, fewer than one block of L-2 = {self.p.L - 2}; use a "
                            "smaller --L or more text")
        res = s.compute(deterministic=deterministic)
        res.update({
            # read but not scored: the remainder (wrap) or the truncated tails (no wrap); after an early stop also
            # the read-ahead of the last doc batch
            "dropped_tokens": stream.data_tokens - self.scored_data_tokens,
            "dropped_bytes": stream.total_bytes - s.bytes,
            "truncated_docs": stream.truncated_docs if not self.p.wrap else None,
            "documents": stream.num_docs, "data_tokens_read": stream.data_tokens,
            "samples_per_block": self.K, "forward_rows": self.forward_rows,
            "processes": self.dist.world_size, "cached_blocks": self.cache_hits if self.cache is not None else None,
            "stopped": self.stopped or "end_of_data", "seconds": seconds,
            "tokens_per_second": res["tokens"] / seconds if seconds > 0 else None,
        })
        return res


def evaluate_perplexity(net, tokenizer, source, protocol: Protocol | None = None, *, estimator=None,
                        estimator_options: dict | None = None, batch_size: int = 16, model: dict | None = None,
                        progress: Callable[[Progress], None] | None = None, on_block: Callable | None = None,
                        doc_batch: int = 64, open_cache: Callable[[dict], object] | None = None) -> dict:
    """Score `source` with `net` under `protocol`; returns the perplexity JSON (docs/perplexity.md) as a dict.

    Args:
      net: a network of the contract (family arm/mdm/prime), e.g. from `checkpoints.load_network`.
      tokenizer: the model's tokenizer (HF, fast for exact bytes); must fit `net.vocab_size`.
      source: a `TextSource` (`openwebtext()`, `hf_dataset(...)`, `text_files(...)`), a path or strings.
      estimator: an estimator object, or a name (default: exact / mc / mc); `estimator_options` go to
        `build_estimator` (Prime: `subtokenizer`, `carry_over`, `legacy_scope`, ...).
      batch_size: network rows per forward pass (blocks per pass when K = 1); part of every pass's shape, so it can
        change the last bits, never what shares a block's passes.
      model: {"name", "checkpoint", "checkpoint_sha256", "params", ...} recorded in the JSON.
      progress: called with a `Progress` at the start and after every step (on rank 0 only), e.g. to draw a bar.
      on_block: called as on_block(block, values, tokens) after each scored block (values: (K,) nats).
      open_cache: resumable cache of per-block values: called once with the run's identity (`cache_identity`:
        checkpoint hash, estimator, K, seed, strata, L, ...), returns an object with get_many/put_many (e.g.
        `lambda ident: prime_eval.cache.ResultCache(dir, ident, rank=rank)`), entered as a context manager if it
        is one. A killed run restarted with the same arguments recomputes only the blocks it had not stored.

    Data-parallel (docs/scale-out.md): inside a torch.distributed process group (torchrun), every rank reads and
    tokenizes the whole stream, scores the blocks with index ≡ rank (mod world size) of each step, and the per-block
    values are all-gathered and accumulated in block order on every rank, with the stopping rules checked after each
    block as in one process. Numbers are then identical for any world size (only timings differ).
    """
    p = protocol or Protocol()
    src = as_source(source)
    est, K, deterministic = resolve_estimator(net, estimator, p, estimator_options)
    bos, eos = special_ids(net, tokenizer, p)
    open_source(src)
    run = _Run(net, est, p, K, batch_size,
               BlockStream(src, tokenizer, L=p.L, wrap=p.wrap, bos_id=bos, eos_id=eos, doc_batch=doc_batch),
               PerplexityStats(bootstrap=p.bootstrap), on_block=on_block)
    if progress is not None and progress is not False and not callable(progress):
        warnings.warn("evaluate_perplexity(progress=...) takes a callback (e.g. "
                      "prime_eval.ppl_progress.PplProgressBar); no progress is shown")
    show = progress if callable(progress) and run.dist.is_main else None
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if open_cache is not None:
            run.cache = open_cache(cache_identity(net, est, p, K, deterministic, bos, eos, model))
            if hasattr(run.cache, "__exit__"):
                stack.enter_context(run.cache)
        if show:
            show(run.progress(src.num_docs))
        for batch in run.steps():
            run.accumulate(batch, run.score(batch))
            if show:
                show(run.progress(src.num_docs))
    results = run.results(deterministic, time.perf_counter() - t0)
    return perplexity_json(model_record(net, est, model),
                           protocol_record(p, src.info, tokenizer, est, K, deterministic, bos, eos, batch_size),
                           results, est.bound_kind)
