"""Scoring the requests of a run: chunks of bounded forward rows, adaptive rounds, one cache commit per chunk.

Jobs. A *job* is a request scored with the run's fixed number of samples, or a multiple-choice document scored in
adaptive rounds (`prime_eval.adaptive`). A job's next *step* (its request, or every choice of the document for its
next round) becomes Monte Carlo rows drawn from the request's own generator: seed, or sha256(seed, "round", r) for
round r. Nothing a request gets depends on which other requests share its chunk or its forward pass.

Chunks. Steps are packed into chunks of at most `chunk_rows` forward rows (and `max_logits` logit rows; a step larger
than that is a chunk of its own); documents already started come first, so documents finish early. The diffusion
families reduce the logits as each head call returns (`terms`, `estimators.rows.forward_terms`), so neither a chunk's
nor one request's logits are ever held at once (a Prime request of 1,024 samples at V = 32,000 has ~3 GB of them);
ARM holds a chunk's logits (one row per request, and `is_greedy` reads them). After each chunk:
the costs, `is_greedy` where it is wanted, the stopping decision of every document whose round is complete, and ONE
cache transaction holding the final result of every request that became final (fixed: scored; adaptive: stopped)
and the values of the rounds of documents still running. A kill loses at most the chunk being scored. A rerun
reads the final results and the stored rounds, replays the stopping decisions on the stored values (a pure
function, so it stops where the killed run would have) and computes only what was not stored: the same numbers.

Progress. One bar per call, counting forward rows (dummy rows of fixed-shape passes excluded), advanced as every
forward pass goes through the network's blocks (forward hooks; `_counting_rows`). Its total is the rows done plus a
running estimate of the rows left: a request's rows per sample once its first step is built (before that, the mean
over built steps); for an adaptive document, a Kaplan–Meier estimate of its final number of samples from the stopping
decisions made so far, per round (`_expected_samples`, hazards smoothed by Laplace's rule); for `is_greedy`, n passes
per request (its maximum).
"""
from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from prime_eval.adaptive import SETTLED, AdaptiveRule, decide
from prime_eval.estimators import mean_and_stderr
from prime_eval.networks.kv_cache import Parts

RESULT_FIELDS = ("ll", "stderr", "num_samples", "rows", "is_greedy", "greedy_rows", "greedy_computed", "extra")
CACHE_KIND = "request"


def request_seed(seed: int, *parts: str) -> int:
    """Stable 63-bit seed of (run seed, request strings): sha256, not Python's salted `hash`."""
    digest = hashlib.sha256(json.dumps([int(seed), *parts], ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class _Job:
    items: list[dict]  # one request (fixed) or the choices of one document (adaptive), in choice order
    adaptive: bool
    total: int = 0  # samples drawn so far per choice (adaptive)
    rounds: int = 0
    staged: list | None = None  # the next step's [(item, Rows, round)], built but not scored yet
    final: bool = False

    @property
    def length(self) -> int:
        return max(it["x"].numel() for it in self.items)


@dataclass
class ScoreCounters:
    """What a run computed and what it reused (the results JSON's `cache` record)."""

    hits: int = 0  # requests whose final result came from the cache
    computed: int = 0  # requests scored here (from stored rounds on, where a document had some)
    rounds_reused: int = 0  # stored adaptive rounds (per request) read back
    rows_computed: int = 0  # forward rows run here: estimator rows + is_greedy passes
    rows_reused: int = 0  # forward rows the stored results saved
    chunks: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RequestScorer:
    """Scores request items (dicts with x, n, seed, chars, task, doc_id, choice, single_request) in place.

    forward(rows_list) -> logits per Rows (the batch-invariant packed forward); terms(rows_list) -> (index, the
    estimator's per-position terms) per Rows (`forward_terms`: logits reduced as each head call returns, so memory
    never holds a chunk's, nor one request's, logits; when given, used instead of `forward`); greedy(items) sets
    is_greedy and greedy_rows of diffusion requests (None: ARM, from the logits, so ARM needs `forward`);
    greedy_mode True / False / None (auto: only requests that are their document's only one); rule: the adaptive
    stopping rule (None: fixed samples).
    """

    net: object
    est: object
    forward: Callable
    num_samples: int
    chunk_rows: int
    max_logits: int
    rule: AdaptiveRule | None = None
    greedy: Callable | None = None
    terms: Callable | None = None
    greedy_mode: bool | None = None
    cache: object = None
    desc: str = "loglikelihood"
    counters: ScoreCounters = field(default_factory=ScoreCounters)
    _rows_per_sample: list = field(default_factory=list, init=False, repr=False)  # [Σ rows/k, built steps]
    _greedy_left: int = field(default=0, init=False, repr=False)  # is_greedy passes still to come (at most)
    _reached: list = field(default_factory=list, init=False, repr=False)  # documents decided after round j
    _stopped: list = field(default_factory=list, init=False, repr=False)  # ... and stopped there

    # -- the run -------------------------------------------------------------------------------------------------
    def score(self, items: list[dict], progress: bool = True) -> None:
        """Fill RESULT_FIELDS of every item."""
        jobs = self._jobs(items)
        levels = len(self.rule.schedule()) if self.rule else 0
        self._reached, self._stopped = [0] * levels, [0] * levels
        todo = self._from_cache(jobs) if self.cache is not None else jobs
        self.counters.computed += sum(len(j.items) for j in todo)
        todo.sort(key=lambda j: -j.length)  # longest first: passes of similar lengths
        bar = tqdm(total=None, desc=f"{self.desc} (forward rows; total estimated)", unit="row",
                   disable=not progress or not todo)
        with _counting_rows(self.net, bar):
            self._run(todo, bar)
        bar.total = bar.n
        bar.close()

    def _jobs(self, items: list[dict]) -> list[_Job]:
        if self.rule is None:
            return [_Job([it], False) for it in items]
        groups: dict = {}
        for it in items:
            key = (it.get("task"), it.get("doc_id"))
            groups.setdefault(key if None not in key else ("solo", id(it)), []).append(it)
        # documents with one request (loglikelihood tasks) and requests without a document: fixed samples
        return [_Job(sorted(g, key=_choice_order), True) if len(g) >= 2 else _Job(g, False) for g in groups.values()]

    def _run(self, jobs: list[_Job], bar) -> None:
        queue, active = deque(jobs), []
        waiting = {"fixed": 0, "choices": 0}  # not started: fixed requests, choices of adaptive documents
        for job in jobs:
            waiting["choices" if job.adaptive else "fixed"] += len(job.items)
        self._greedy_left = sum(it["n"] for j in jobs for it in j.items
                                if self._wants_greedy(it) and "greedy_computed" not in it)
        done, total = 0, sum(len(j.items) for j in jobs)
        while queue or active:
            chunk: list[tuple[_Job, list]] = []
            budget = [0, 0]  # rows, logits
            for job in list(active):
                if not self._take(job, chunk, budget):
                    break
            else:
                while queue and self._take(queue[0], chunk, budget):
                    job = queue.popleft()
                    waiting["choices" if job.adaptive else "fixed"] -= len(job.items)
                    active.append(job)
            self._update_total(bar, waiting, active,
                               sum(_rows(r) for job, step in chunk if not job.adaptive for _, r, _ in step))
            self._score_chunk(chunk)
            done += sum(len(j.items) for j in active if j.final)
            active = [j for j in active if not j.final]
            self._update_total(bar, waiting, active)
            bar.set_postfix_str(f"requests {done}/{total}", refresh=False)

    def _take(self, job: _Job, chunk: list, budget: list) -> bool:
        """Add the job's next step to the chunk if it fits (an empty chunk takes any step)."""
        if job.staged is None:
            job.staged = self._build(job)
        rows = sum(_rows(r) for _, r, _ in job.staged)
        logits = sum(r.num_logits for _, r, _ in job.staged)
        if chunk and (budget[0] + rows > self.chunk_rows or budget[1] + logits > self.max_logits):
            return False
        chunk.append((job, job.staged))
        job.staged = None
        budget[0] += rows
        budget[1] += logits
        return True

    def _build(self, job: _Job) -> list:
        """The rows of the job's next step: (item, Rows, round or None)."""
        k = self.rule.next_round(job.total) if job.adaptive else self.num_samples
        step = []
        for it in job.items:
            target = torch.zeros(it["x"].numel(), dtype=torch.bool)
            target[-it["n"]:] = True
            it["target"] = target
            seed = request_seed(it["seed"], "round", str(job.rounds)) if job.adaptive else it["seed"]
            r = self.est.rows(it["x"], target, torch.Generator().manual_seed(seed), k)
            self._rows_per_sample = [self._rows_per_sample[0] + _rows(r) / k, self._rows_per_sample[1] + 1] \
                if self._rows_per_sample else [_rows(r) / k, 1]
            step.append((it, r, job.rounds if job.adaptive else None))
        return step

    def _score_chunk(self, chunk: list) -> None:
        units = [u for _, step in chunk for u in step]
        rows_list = [r for _, r, _ in units]
        if self.terms is not None:  # reduced as they come: the same values as `cost` on all the logits, bit for bit
            values_list = [None] * len(units)
            for i, terms in self.terms(rows_list):
                values_list[i] = self.est.cost_from_terms(rows_list[i], terms)
            logits_list = [None] * len(units)
        else:
            logits_list = self.forward(rows_list)
            values_list = [self.est.cost(r, logits) for r, logits in zip(rows_list, logits_list)]
        for (it, r, rnd), logits, values in zip(units, logits_list, values_list):
            rows = _rows(r)
            self.counters.rows_computed += rows
            if rnd is None:  # fixed samples: final now
                mean, stderr = mean_and_stderr(values, getattr(self.est, "aggregate", None))  # iw: -log-mean-exp
                it.update(ll=-mean, stderr=stderr, num_samples=values.numel(), rows=rows,
                          extra=({"log_weights": (-values).tolist(), "ess": self.est.ess(values)}
                                 if hasattr(self.est, "ess") else {}))
                if self.greedy is None:  # ARM: argmax of the same logits, no extra pass
                    it.update(is_greedy=self.est.is_greedy(r, logits), greedy_rows=0, greedy_computed=True)
            else:
                it.setdefault("_rounds", []).append(values.cpu())
                it["rows"] = it.get("rows", 0) + rows
        first = [it for it, _, rnd in units if rnd in (None, 0) and "greedy_computed" not in it]
        self._greedy(first)
        stored = []
        for job, step in chunk:
            if job.adaptive:
                k = self.rule.next_round(job.total)
                job.total += k
                job.rounds += 1
                stop = self._decide(job)
                if stop is None:
                    stored += [(self._round_key(it, job.rounds - 1, k), _round_value(it, r)) for it, r, _ in step]
                    continue
                self._finish(job, stop)
            job.final = True
            stored += [(self._final_key(job, it), {f: it[f] for f in RESULT_FIELDS}) for it in job.items]
        if self.cache is not None:  # one transaction per chunk: a kill loses at most this chunk
            self.cache.put_many(CACHE_KIND, stored)
        self.counters.chunks += 1

    def _greedy(self, items: list[dict]) -> None:
        """is_greedy of the requests that want it (greedy_mode), else recorded as not computed."""
        if self.greedy is None:
            return
        wanted = [it for it in items if self.greedy_mode is True
                  or (self.greedy_mode is None and it.get("single_request", True))]
        for it in items:
            it.update(is_greedy=False, greedy_rows=0, greedy_computed=False)
        if wanted:
            self.greedy(wanted)
            for it in wanted:
                it["greedy_computed"] = True
                self.counters.rows_computed += it["greedy_rows"]
                self._greedy_left -= it["n"]

    def _decide(self, job: _Job) -> str | None:
        """The stopping rule after the job's latest round (counted for the progress estimate)."""
        stop = decide(self.rule, [torch.cat(it["_rounds"]) for it in job.items], [it["chars"] for it in job.items])
        self._reached[job.rounds - 1] += 1
        self._stopped[job.rounds - 1] += stop is not None
        return stop

    def _finish(self, job: _Job, stop: str) -> None:
        for it in job.items:
            values = torch.cat(it.pop("_rounds"))
            mean, stderr = mean_and_stderr(values)
            it.update(ll=-mean, stderr=stderr, num_samples=values.numel(),
                      extra={"settled": stop == SETTLED, "stop": stop, "rounds": job.rounds})

    # -- the cache -------------------------------------------------------------------------------------------------
    @staticmethod
    def _request(it: dict) -> dict:
        return {"x": it["x"].tolist(), "n": it["n"], "seed": it["seed"]}

    def _final_key(self, job: _Job, it: dict) -> dict:
        """A fixed request's key is the request; an adaptive one's adds its document (the stopping rule reads every
        choice)."""
        key = self._request(it)
        if job.adaptive:
            sib = [[s["x"].tolist(), s["n"], s["seed"], s["chars"]] for s in job.items]
            key["doc"] = hashlib.sha256(json.dumps(sib).encode()).hexdigest()
        return key

    def _round_key(self, it: dict, rnd: int, k: int) -> dict:
        return {**self._request(it), "round": rnd, "k": k}

    def _from_cache(self, jobs: list[_Job]) -> list[_Job]:
        """Apply stored final results and replay stored rounds; return the jobs left to compute."""
        keys = [(j, it) for j in jobs for it in j.items]
        finals = self.cache.get_many(CACHE_KIND, [self._final_key(j, it) for j, it in keys])
        hit = {id(it): v for (_, it), v in zip(keys, finals) if v is not None}
        todo, replayed_final = [], []
        for job in jobs:
            if all(id(it) in hit for it in job.items):
                for it in job.items:
                    it.update({f: hit[id(it)][f] for f in RESULT_FIELDS})
                    self.counters.rows_reused += it["rows"] + it["greedy_rows"]
                self.counters.hits += len(job.items)
                job.final = True
                continue
            if job.adaptive:
                self._replay(job)
                if job.final:
                    replayed_final += [(self._final_key(job, it), {f: it[f] for f in RESULT_FIELDS})
                                       for it in job.items]
                    self.counters.computed += len(job.items)
                    continue
            todo.append(job)
        if replayed_final:  # killed between its last round and its final record (cannot happen with one commit)
            self.cache.put_many(CACHE_KIND, replayed_final)
        return todo

    def _replay(self, job: _Job) -> None:
        """Stored rounds of a document, in order, with the stopping decision after each (as the run made it)."""
        sizes = self.rule.schedule()
        stored = self.cache.get_many(CACHE_KIND, [self._round_key(it, r, k) for r, k in enumerate(sizes)
                                                  for it in job.items])
        n = len(job.items)
        for r, k in enumerate(sizes):
            got = stored[r * n:(r + 1) * n]
            if any(v is None for v in got):
                return
            for it, v in zip(job.items, got):
                it.setdefault("_rounds", []).append(torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])))
                it["rows"] = it.get("rows", 0) + v["rows"]
                if r == 0:
                    it.update(is_greedy=v["is_greedy"], greedy_rows=v["greedy_rows"],
                              greedy_computed=v["greedy_computed"])
                self.counters.rows_reused += v["rows"] + (v["greedy_rows"] if r == 0 else 0)
            self.counters.rounds_reused += n
            job.total += k
            job.rounds += 1
            stop = self._decide(job)
            if stop is not None:
                self._finish(job, stop)
                job.final = True
                return

    # -- progress ------------------------------------------------------------------------------------------------
    def _update_total(self, bar, waiting: dict, active: list[_Job], in_flight: int = 0) -> None:
        """bar.total = rows done + the running estimate of the rows left (module docstring), `in_flight` (the rows of
        the fixed-sample requests of the chunk about to be scored) included; O(active jobs)."""
        if bar.disable or not self._rows_per_sample:
            return
        rps = self._rows_per_sample[0] / self._rows_per_sample[1]
        left = in_flight + self._greedy_left + rps * (waiting["fixed"] * self.num_samples
                                          + (waiting["choices"] * self._expected_samples(0) if self.rule else 0))
        for job in active:
            if job.final:
                continue
            staged = 0 if job.staged is None else job.staged[0][1].num_samples
            if job.staged is not None:
                left += sum(_rows(r) for _, r, _ in job.staged)
            if job.adaptive:
                per = sum(it["rows"] / job.total if job.total else rps for it in job.items)
                left += max(self._expected_samples(job.rounds) - job.total - staged, 0) * per
        bar.total = int(bar.n + left)
        bar.refresh()

    def _expected_samples(self, level: int) -> float:
        """E[final samples | the document reached round `level`]: a discrete-time survival (Kaplan–Meier) estimate
        from the decisions so far, with the hazard after round j smoothed by Laplace's rule of succession,
        h_j = (stopped_j + 1) / (decided_j + 2) (½ before any document got there; the cap stops everything)."""
        sizes = self.rule.schedule()
        total, survive, expect = sum(sizes[:level]), 1.0, 0.0
        for j in range(level, len(sizes)):
            total += sizes[j]
            h = 1.0 if j == len(sizes) - 1 else (self._stopped[j] + 1) / (self._reached[j] + 2)
            expect += survive * h * total
            survive *= 1.0 - h
        return expect

    def _wants_greedy(self, it: dict) -> bool:
        return self.greedy is not None and (self.greedy_mode is True or
                                            (self.greedy_mode is None and it.get("single_request", True)))


def _rows(r) -> int:
    """Forward rows of a Rows (rows without logits are skipped by forward_rows)."""
    return int(r.logits_at.any(1).sum())


def _choice_order(it: dict):
    c = it.get("choice")
    return (0, c, "") if isinstance(c, (int, float)) else (1, 0, str(c))


def _round_value(it: dict, r) -> dict:
    values = it["_rounds"][-1]
    out = {"values": values.tolist(), "dtype": str(values.dtype).replace("torch.", ""), "rows": _rows(r)}
    if len(it["_rounds"]) == 1:
        out.update(is_greedy=it.get("is_greedy", False), greedy_rows=it.get("greedy_rows", 0),
                   greedy_computed=it.get("greedy_computed", False))
    return out


@contextmanager
def _counting_rows(net, bar):
    """Advance `bar` by the rows of every forward pass of `net` while scoring, block by block where the network has
    a stack of blocks (its largest ModuleList): a pass of R rows through B blocks moves the bar B times by ~R/B, so
    the bar moves several times per pass even on a slow CPU. A pass is a call of the network's trunk (`hidden`,
    `hidden_cached`) or of `forward` / `forward_cached`; its rows are those with positions that need logits (`at`;
    dummy rows that fill a pass of fixed shape are not counted; a packed pass counts the requests it serves,
    `Parts.rows`), complete when the call returns."""
    if bar.disable or not isinstance(net, torch.nn.Module):
        yield
        return
    lists = [m for m in net.modules() if isinstance(m, torch.nn.ModuleList)]
    blocks = list(max(lists, key=len)) if lists else []
    state = {"rows": 0, "done": 0, "blocks": 0, "depth": 0}

    def advance(upto: int) -> None:
        if upto > state["done"]:
            bar.update(upto - state["done"])
            state["done"] = upto

    def block_done(_module, _args, _out) -> None:
        state["blocks"] = min(state["blocks"] + 1, len(blocks))
        advance(state["rows"] * state["blocks"] // (len(blocks) + 1))  # the head's share is left for the end

    def counted(method):
        def call(idx, *args, **kwargs):
            if state["depth"]:  # a pass inside a pass (forward calls hidden): counted once, by the outer call
                return method(idx, *args, **kwargs)
            at = kwargs.get("at", kwargs.get("logits_at"))
            advance(state["rows"])  # a pass that did not return (cannot happen) is complete
            explicit = kwargs.get("explicit")
            rows = int(idx.shape[0]) if at is None else int(at.any(1).sum())
            rows = explicit[1].rows if isinstance(explicit, tuple) and isinstance(explicit[1], Parts) else rows
            state.update(rows=rows, done=0, blocks=0, depth=1)
            try:
                return method(idx, *args, **kwargs)
            finally:
                advance(state["rows"])
                state.update(rows=0, done=0, depth=0)
        return call

    handles = [b.register_forward_hook(block_done) for b in blocks]
    names = [n for n in ("forward", "hidden", "forward_cached", "hidden_cached") if callable(getattr(net, n, None))]
    shadowed = {n: net.__dict__[n] for n in names if n in net.__dict__}  # instance attributes (restored below)
    for n in names:  # instance attributes: shadow the methods until deleted below (`net(...)` calls type's forward)
        setattr(net, n, counted(getattr(net, n)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for n in names:
            delattr(net, n)
            if n in shadowed:
                setattr(net, n, shadowed[n])
