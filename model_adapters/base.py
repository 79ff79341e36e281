"""Shared base of the lm-eval adapters `arm`, `mdm` and `prime` (docs/adapters.md).

A `TemplateLM` (lm-eval's string handling: trailing context whitespace moves to the continuation, an empty context
becomes `prefix_token_id`) whose `_loglikelihood_tokens` scores requests with a family estimator
(`prime_eval.estimators`):

  * every request gets its own `torch.Generator`, seeded from sha256(seed, context, continuation), so a result does
    not depend on batch size, request order or process count;
  * the Monte Carlo rows of many requests share each forward pass (`forward_rows`); requests are processed in chunks
    whose logits fit in `max_logits_mb`;
  * the log-likelihood returned is the SUM over continuation tokens: exact for ARMs, minus the estimator's mean NLL
    (a lower bound when `is_bound`) for diffusion models;
  * over-length inputs are left-truncated to the model's window and counted (stats, model info, warning);
  * per-request statistics are kept and written by `finalize_run` as `stats_<task>_<date>.jsonl`
    (schema: docs/ARCHITECTURE.md), the estimator configuration goes to the results JSON via `get_model_info`;
  * data-parallel under torchrun / accelerate launch (docs/scale-out.md): the process group is joined in the
    constructor, lm-eval gives each rank its share of the documents and gathers the metrics; `gather_run_state`
    (called by `prime-eval score` on every rank) brings the per-request statistics to rank 0;
  * `cache_dir=DIR` keeps every per-request result in a resumable SQLite cache (`prime_eval.cache`): a killed run
    restarted with the same arguments recomputes only what was not stored. Forward passes hold rows of one length
    only (`forward_rows_batch_invariant`), so a result is the same bits whichever requests share its pass.
Subclasses set `family`, `OPTIONS` (their extra model args) and implement `_make_estimator` (and `_greedy`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from statistics import NormalDist
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from prime_eval import distributed as D
from prime_eval.errors import UserError
from prime_eval.estimators import PACKING, forward_rows_batch_invariant, mean_and_stderr

log = logging.getLogger("prime_eval.adapters")
# Default diffusion estimator of `prime-eval score` (benchmarks/variance.py: at equal forward passes, exact_count with
# common random numbers has the lowest variance of the choice differences; `ppl` keeps MDLM's `mc`).
DEFAULT_SCORE_ESTIMATOR = "exact_count"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def request_seed(seed: int, *parts: str) -> int:
    """Stable 63-bit seed of (run seed, request strings): sha256, not Python's salted `hash`."""
    digest = hashlib.sha256(json.dumps([int(seed), *parts], ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _key(value) -> tuple:
    """Sort key for task names, doc ids and choice indices (None, numbers and strings)."""
    if value is None:
        return (2, 0, "")
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise UserError(f"{name}={value!r}: expected true or false")


class PrimeEvalLM(TemplateLM):
    family = "arm"
    OPTIONS: tuple[str, ...] = ()  # family-specific model args, handed to `_make_estimator`
    DEFAULT_SAMPLES = 128

    def __init__(self, checkpoint=None, *, model=None, tokenizer=None, format=None, config=None, estimator=None,
                 samples=None, num_samples=None, seed=1234, rows_per_pass=None, max_length=None, device=None,
                 dtype="float32", add_bos="auto", greedy="auto", crn=True, adaptive=None, round_samples=16,
                 confidence=0.99, target_se=None, futility_after=64, max_logits_mb=2048, name=None, use_ema=True,
                 cache_dir=None, pack="bucket", batch_size=None, max_batch_size=None, **options):
        super().__init__()
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise UserError(f"unknown model argument(s) {unknown} for `{self.family}`; known: checkpoint, format, "
                            "config, tokenizer, estimator, samples, seed, rows_per_pass, max_length, device, dtype, "
                            "add_bos, greedy, crn, adaptive, round_samples, confidence, target_se, futility_after, "
                            "max_logits_mb, "
                            "name, use_ema, cache_dir, pack"
                            f"{''.join(', ' + o for o in self.OPTIONS)}")
        if dtype not in DTYPES:
            raise UserError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        dist = D.init_distributed(device)  # torchrun / accelerate launch: join the group; one process: no-op
        self._rank, self._world_size = dist.rank, dist.world_size
        self._device = D.local_device(dist, device)  # cuda:LOCAL_RANK per rank
        self.checkpoint, self.info = checkpoint, {}
        if model is not None:
            self.net = model.to(self._device).eval().requires_grad_(False)
        elif checkpoint is not None:
            from prime_eval.checkpoints import load_network

            self.net, self.info = load_network(checkpoint, family=self.family, format=format, config=config,
                                               use_ema=_bool(use_ema, "use_ema"), device=self._device,
                                               dtype=DTYPES[dtype], **self._load_options(options))
        else:
            raise UserError(f"`{self.family}` needs checkpoint=PATH|HUB_ID (or model=<network> from Python)")
        if getattr(self.net, "family", None) != self.family:
            raise UserError(f"model family {getattr(self.net, 'family', None)!r} given to the `{self.family}` adapter")
        self.tokenizer = self._load_tokenizer(tokenizer)
        self.add_bos = self._resolve_bos(add_bos)
        self._max_length = int(max_length or getattr(self.net, "max_length", 2048))
        self.seed = int(seed)
        self.num_samples = int(samples if samples is not None else num_samples or self.DEFAULT_SAMPLES)
        numeric_bs = str(batch_size).isdigit()
        self.rows_per_pass = int(rows_per_pass or (batch_size if numeric_bs else 64))
        # is_greedy of diffusion models costs up to n extra passes per request. auto: only for documents scored by a
        # single request (loglikelihood tasks such as lambada); multiple-choice documents (>= 2 requests) skip it.
        self.greedy = "auto" if str(greedy).lower() == "auto" else _bool(greedy, "greedy")
        self.crn = _bool(crn, "crn")
        self.round_samples, self.confidence = int(round_samples), float(confidence)
        self.futility_after = int(futility_after)
        self.target_se = None if target_se in (None, "") else float(target_se)
        if not 0.5 < self.confidence < 1:
            raise UserError(f"confidence={confidence}: choose a level in (0.5, 1), e.g. 0.99")
        if pack not in PACKING:
            raise UserError(f"pack={pack!r}: choose bucket (rows padded to a multiple of 32 tokens share a pass), "
                            "length (rows of one length share a pass) or request (each request's rows in passes of "
                            "their own: bit-identical results on GPUs too)")
        self.pack = pack
        self.max_logits = max(1, int(float(max_logits_mb) * 2**20 / (12 * self.net.vocab_size)))  # fp32 + fp64 copy
        self.est = self._make_estimator(estimator, options)
        # adaptive sampling (default on for Monte Carlo estimators whose estimate is a mean of per-sample values)
        mc_mean = not getattr(self.est, "deterministic", False) and not hasattr(self.est, "aggregate")
        self.adaptive = mc_mean if adaptive in (None, "auto") else _bool(adaptive, "adaptive")
        if self.adaptive and not mc_mean:
            raise UserError(f"adaptive=true needs a Monte Carlo mean estimator, not {self.est.name}")
        self.name = name or (Path(str(checkpoint)).name if checkpoint else type(self.net).__name__)
        self.stats: list[dict] = []
        self.truncated_requests = self.truncated_tokens = 0
        self._meta = None
        self._sha = None
        self.cache = self._open_cache(cache_dir) if cache_dir else None
        self.cache_hits = self.computed_requests = 0

    def _request_seed(self, task, doc_id, context: str, continuation: str) -> int:
        """The request's generator seed. crn=true (default for MC estimators): every choice of a document shares the
        document's seed, so the choices see the same t_k / masked counts and the same draws at shared positions
        (common random numbers: the variance of the difference between choices shrinks; issue 9). The document is
        (task, doc_id) when lm-eval says so, else the context. crn=false: (seed, context, continuation)."""
        if not self.crn:
            return request_seed(self.seed, context, continuation)
        if task is not None and doc_id is not None:
            return request_seed(self.seed, "doc", str(task), str(doc_id))
        return request_seed(self.seed, "context", context)

    # -- family hooks -----------------------------------------------------------------------------------------
    def _load_options(self, options: dict) -> dict:
        return {}

    def _make_estimator(self, name, options: dict):
        raise NotImplementedError

    def _iw_options(self, name, options: dict) -> dict:
        """`estimator=iw`: `orders=K` sets the number of orders (the samples), and the network is handed over for
        the Plackett–Luce proposal's confidence pass. Other estimators refuse the iw options."""
        opts = dict(options)
        iw = {k: opts.pop(k) for k in ("orders", "proposal", "tau") if k in opts}
        if name != "iw":
            if iw:
                raise UserError(f"{sorted(iw)} apply only to estimator=iw")
            return opts
        if "orders" in iw:
            self.num_samples = int(iw.pop("orders"))
        if "tau" in iw:
            iw["tau"] = float(iw["tau"])
        return {**opts, **iw, "net": self.net}

    def _greedy(self, items: list[dict]) -> None:
        """Set item["is_greedy"] (and "greedy_rows") for items scored in one chunk; ARM does it from the logits."""
        for it in items:
            it["is_greedy"], it["greedy_rows"] = False, 0

    # -- data parallel (lm-eval's evaluator calls these when world_size > 1) -------------------------------------
    def all_gather(self, tensor):
        return D.all_gather_tensor(tensor)

    def gather_object(self, obj, dst=0):
        return D.gather_object(obj, dst=dst)

    def barrier(self) -> None:
        D.barrier()

    # -- result cache -------------------------------------------------------------------------------------------
    def _checkpoint_sha256(self) -> str:
        if self._sha is None:
            from prime_eval.cache import state_dict_sha256
            from prime_eval.checkpoints import checkpoint_sha256

            self._sha = (checkpoint_sha256(self.checkpoint) if self.checkpoint is not None else None) \
                or state_dict_sha256(self.net)
        return self._sha

    def _open_cache(self, cache_dir):
        """The run's cache: its identity is everything a request's result depends on besides the request."""
        from prime_eval.cache import ResultCache, estimator_identity, run_identity

        param = next(iter(self.net.parameters()), None)
        ident = run_identity(
            checkpoint_sha256=self._checkpoint_sha256(), estimator=estimator_identity(self.est),
            num_samples=1 if getattr(self.est, "deterministic", False) else self.num_samples, seed=self.seed,
            kind="lm-eval", family=self.family, greedy=str(self.greedy),
            adaptive=[self.round_samples, self.confidence, self.target_se, self.futility_after] if self.adaptive
            else None,
            dtype=None if param is None else str(param.dtype), device_type=self._device.type)
        return ResultCache(cache_dir, ident, rank=self._rank)

    @staticmethod
    def _cache_request(it: dict) -> dict:
        return {"x": it["x"].tolist(), "n": it["n"], "seed": it["seed"]}

    # -- tokenizer ----------------------------------------------------------------------------------------------
    def _load_tokenizer(self, tokenizer):
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            return tokenizer  # an already-built tokenizer object (Python use)
        from prime_eval.checkpoints import load_tokenizer

        hf = self.info.get("arch") == "hf"
        spec = tokenizer or (self.checkpoint if hf else None)
        if spec is None:
            hint = self.info.get("tokenizer")
            raise UserError("pass tokenizer=DIR|FILE|HUB_ID" + (f" (this checkpoint uses the {hint} tokenizer)"
                                                                  if hint else ""))
        return load_tokenizer(spec, vocab_size=self.net.vocab_size, exact=not hf)

    def _resolve_bos(self, add_bos) -> bool:
        """auto: what the tokenizer does by default (Llama/SentencePiece: BOS; GPT-2: none), as lm-eval's `hf`."""
        bos = self.tokenizer.bos_token_id
        if str(add_bos).lower() == "auto":
            return bos is not None and self.tokenizer.encode("a")[:1] == [bos]
        flag = _bool(add_bos, "add_bos")
        if flag and bos is None:
            raise UserError("add_bos=true but the tokenizer has no BOS token")
        return flag

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    @property
    def is_stochastic(self) -> bool:
        return not getattr(self.est, "deterministic", False)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens) and self.add_bos
        if bos and not (self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token)):
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def tok_decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # -- loglikelihood ------------------------------------------------------------------------------------------
    @property
    def _window(self) -> int:
        """Tokens of one scored sequence: ARM inputs drop the last token, so max_length + 1."""
        return self._max_length + (1 if self.family == "arm" else 0)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._meta = [(r.task_name, r.doc_id, r.idx) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._meta = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        meta = self._meta if self._meta is not None and len(self._meta) == len(requests) else None
        items = []
        for i, ((context, continuation), ctx, cont) in enumerate(requests):
            task, doc_id, choice = meta[i] if meta else (None, None, None)
            where = f" (task {task}, doc {doc_id}, choice {choice})" if task else ""
            if not cont:
                raise UserError(f"empty continuation{where}: context {context[-60:]!r}, continuation "
                                f"{continuation!r} has no tokens to score")
            if len(cont) > self._window - (1 if self.family == "arm" else 0):
                raise UserError(f"continuation of {len(cont)} tokens{where} exceeds max_length={self._max_length}")
            ctx = list(ctx) or [self.prefix_token_id]
            seq = (ctx + list(cont))[-self._window:]
            items.append({"x": torch.tensor(seq), "n": len(cont), "truncated": len(ctx) + len(cont) - len(seq),
                          "seed": self._request_seed(task, doc_id, context, continuation),
                          "task": task, "doc_id": doc_id, "choice": choice, "chars": len(continuation)})
        if meta:  # documents with one request (loglikelihood tasks) vs several (multiple choice)
            per_doc: dict = {}
            for it in items:
                per_doc[(it["task"], it["doc_id"])] = per_doc.get((it["task"], it["doc_id"]), 0) + 1
            for it in items:
                it["single_request"] = per_doc[(it["task"], it["doc_id"])] == 1
        self._score(items, disable_tqdm)
        trunc = [it for it in items if it["truncated"]]
        if trunc:
            self.truncated_requests += len(trunc)
            self.truncated_tokens += sum(it["truncated"] for it in trunc)
            log.warning("%d of %d requests exceed the %d-token window and were left-truncated (%d tokens dropped)",
                        len(trunc), len(items), self._window, sum(it["truncated"] for it in trunc))
        for it in items:
            self._record(it)
        return [(it["ll"], it["is_greedy"]) for it in items]

    _RESULT_FIELDS = ("ll", "stderr", "num_samples", "rows", "is_greedy", "greedy_rows", "extra")

    def _score(self, items: list[dict], disable_tqdm: bool = False) -> None:
        """Fill ll, stderr, num_samples, rows, is_greedy of every item; longest first, in logit-bounded chunks.

        Identical items (same tokens, continuation length and seed, e.g. lm-eval's padding requests on a rank with
        fewer documents) are scored once; with a cache, stored items are not scored and each chunk is stored in one
        transaction after it is scored.
        """
        unique: dict[tuple, dict] = {}
        copies: list[tuple[dict, dict]] = []
        for it in items:
            k = (tuple(it["x"].tolist()), it["n"], it["seed"])
            if k in unique:
                copies.append((it, unique[k]))
            else:
                unique[k] = it
        todo = list(unique.values())
        if self.cache is not None:
            stored = self.cache.get_many("request", [self._cache_request(it) for it in todo])
            for it, hit in zip(todo, stored):
                if hit is not None:
                    it.update({f: hit[f] for f in self._RESULT_FIELDS})
            self.cache_hits += sum(hit is not None for hit in stored)
            todo = [it for it, hit in zip(todo, stored) if hit is None]
        self.computed_requests += len(todo)
        if self.adaptive:
            self._score_adaptive(todo, disable_tqdm)
        else:
            self._score_chunks(todo, disable_tqdm)
        for it, src in copies:
            it.update({f: src[f] for f in self._RESULT_FIELDS})

    def _score_adaptive(self, items: list[dict], disable_tqdm: bool = False) -> None:
        """Adaptive sampling per document (issue 9): rounds of `round_samples`, doubling the total each round, until
        the ranking of the document's choices is settled or `samples` (the cap) is reached.

        Settled: for the top choice a and every other choice b, the paired differences d_k = v_b,k - v_a,k of the
        per-sample NLL values (aligned by common random numbers: the choices share the document's seed and rounds)
        give mean(d)/SE(d) >= z_{confidence}, for the ranking by log-likelihood (acc) and by log-likelihood per
        character (acc_norm). Or every choice's SE <= target_se. Futility: after `futility_after` samples, a document
        whose z would stay below 1 even at the cap (z·sqrt(cap/total) < 1, a near tie) stops too.
        A two-sided normal test applied after each round
        (a sequential test; the doubling schedule limits the looks to log2(cap/round) + 1). Documents with one request
        (loglikelihood tasks) and requests without a document use the fixed `samples`.
        Recorded per request: samples used, rounds and whether the ranking settled."""
        groups: dict = {}
        for it in items:
            key = (it.get("task"), it.get("doc_id"))
            groups.setdefault(key if None not in key else ("solo", id(it)), []).append(it)
        fixed = [it for g in groups.values() if len(g) < 2 for it in g]
        if fixed:
            self._score_chunks(fixed, disable_tqdm)
        docs = [g for g in groups.values() if len(g) >= 2]
        if not docs:
            return
        z = NormalDist().inv_cdf(1 - (1 - self.confidence) / 2)
        active, total, rnd, k = docs, 0, 0, min(self.round_samples, self.num_samples)
        while active and k > 0:
            flat = [it for g in active for it in g]
            runs = [dict(it, seed=request_seed(it["seed"], "round", str(rnd))) for it in flat]
            self._score_chunks(runs, disable_tqdm, num_samples=k, store=False, greedy=rnd == 0)
            for it, run in zip(flat, runs):
                it.setdefault("_rounds", []).append(run["_values"])
                it["rows"] = (it["rows"] if rnd else 0) + run["rows"]
                if rnd == 0:
                    it.update({f: run[f] for f in ("is_greedy", "greedy_rows", "target")})
            total += k
            still = []
            for g in active:
                zg = self._ranking_z(g)
                settled = zg >= z
                # futility: even at the cap the difference would stay within ~1 SE (a near tie whose decision no
                # affordable number of samples settles); stop rather than spend the cap on it
                futile = not settled and total >= self.futility_after and zg * math.sqrt(self.num_samples / total) < 1
                for it in g:
                    it["settled"], it["stop"] = settled, "settled" if settled else "futile" if futile else "cap"
                if not settled and not futile and total < self.num_samples:
                    still.append(g)
            active, rnd = still, rnd + 1
            k = min(total, self.num_samples - total)  # double the total
        for g in docs:
            for it in g:
                rounds = len(it["_rounds"])
                values = torch.cat(it.pop("_rounds"))
                mean, stderr = mean_and_stderr(values)
                it.update(ll=-mean, stderr=stderr, num_samples=values.numel(), _values=values,
                          extra={"settled": bool(it["settled"]), "stop": it["stop"], "rounds": rounds})
        if self.cache is not None:
            self.cache.put_many("request", [(self._cache_request(it), {f: it[f] for f in self._RESULT_FIELDS})
                                            for g in docs for it in g])

    def _ranking_z(self, group: list[dict]) -> float:
        """The smallest paired z-statistic mean(d)/SE(d) between the top choice and any other, over the rankings by
        log-likelihood (acc) and per character (acc_norm); inf if every SE <= target_se."""
        values = [torch.cat(it["_rounds"]) for it in group]  # (K,) NLL per sample, aligned across choices
        if self.target_se is not None and all(
                float(v.std(unbiased=True)) / math.sqrt(v.numel()) <= self.target_se for v in values):
            return math.inf
        worst = math.inf
        for scale in (False, True):
            v = [vals / max(1, it["chars"]) if scale else vals for vals, it in zip(values, group)]
            best = min(range(len(v)), key=lambda c: float(v[c].mean()))  # lowest NLL = highest log-likelihood
            for c in range(len(v)):
                if c != best:
                    d = v[c] - v[best]
                    se = float(d.std(unbiased=True)) / math.sqrt(d.numel())
                    worst = min(worst, math.inf if se == 0.0 and float(d.mean()) > 0 else
                                float(d.mean()) / se if se > 0 else 0.0)
        return worst
        for scale in (None, "chars"):
            v = [vals / max(1, it["chars"]) if scale else vals for vals, it in zip(values, group)]
            best = min(range(len(v)), key=lambda c: float(v[c].mean()))  # lowest NLL = highest log-likelihood
            for c in range(len(v)):
                if c == best:
                    continue
                d = v[c] - v[best]
                se = float(d.std(unbiased=True)) / math.sqrt(d.numel())
                if se == 0.0 or float(d.mean()) / se < z:
                    if not (se == 0.0 and float(d.mean()) > 0):
                        return False
        return True

    def _score_chunks(self, items: list[dict], disable_tqdm: bool = False, *, num_samples: int | None = None,
                      store: bool = True, greedy: bool = True) -> None:
        """Score items with `num_samples` (default: the run's) samples each; raw per-sample values in it["_values"].
        store / greedy: write the cache / compute is_greedy (the adaptive rounds do both once, themselves)."""
        num_samples = num_samples or self.num_samples
        order = sorted(range(len(items)), key=lambda i: -items[i]["x"].numel())
        bar = tqdm(total=len(items), desc=f"{self.family} loglikelihood", disable=disable_tqdm or self.rank != 0)
        start = 0
        while start < len(order):
            chunk, rows, logits_total = [], [], 0
            while start < len(order) and (not chunk or logits_total < self.max_logits):
                it = items[order[start]]
                target = torch.zeros(it["x"].numel(), dtype=torch.bool)
                target[-it["n"]:] = True
                gen = torch.Generator().manual_seed(it["seed"])
                r = self.est.rows(it["x"], target, gen, num_samples)
                it["target"] = target
                chunk.append(it)
                rows.append(r)
                logits_total += r.num_logits
                start += 1
            for it, r, logits in zip(chunk, rows, forward_rows_batch_invariant(self.net, rows, self.rows_per_pass,
                                                                                pack=self.pack)):
                values = self.est.cost(r, logits)
                it["_values"] = values
                k = values.numel()
                mean, stderr = mean_and_stderr(values, getattr(self.est, "aggregate", None))  # iw: -log-mean-exp
                it["ll"], it["stderr"] = -mean, stderr
                it["extra"] = ({"log_weights": (-values).tolist(), "ess": self.est.ess(values)}
                               if hasattr(self.est, "ess") else {})
                it["num_samples"], it["rows"] = k, int(r.logits_at.any(1).sum())
                if self.family == "arm":
                    it["is_greedy"], it["greedy_rows"] = self.est.is_greedy(r, logits), 0
            if self.family != "arm" and greedy:
                PrimeEvalLM._greedy(self, chunk)  # not computed: is_greedy False, 0 rows
                wanted = [it for it in chunk if self.greedy is True
                          or (self.greedy == "auto" and it.get("single_request", True))]
                if wanted and self.greedy:
                    self._greedy(wanted)
            if self.cache is not None and store:  # committed per chunk: a kill loses at most the chunk being scored
                self.cache.put_many("request", [(self._cache_request(it), {f: it[f] for f in self._RESULT_FIELDS})
                                                for it in chunk])
            bar.update(len(chunk))
        bar.close()

    def _record(self, it: dict) -> None:
        self.stats.append({
            "task": it["task"], "doc_id": it["doc_id"], "choice": it["choice"], "request_index": len(self.stats),
            "loglikelihood": it["ll"], "mc_stderr": it["stderr"], "num_samples": it["num_samples"],
            "num_forward_rows": it["rows"], "greedy_forward_rows": it["greedy_rows"],
            "is_greedy": bool(it["is_greedy"]), "truncated_tokens": it["truncated"],
            "continuation_tokens": it["n"], "estimator": self.est.name, "bound_kind": self.est.bound_kind,
            "is_bound": bool(self.est.is_bound),
            # the report's Monte Carlo term: zero where the number is deterministic (exact ARM, chain_rule, and every
            # is_greedy check: argmax decoding / greedy unmasking draw no random numbers)
            "deterministic": bool(getattr(self.est, "deterministic", False)), "is_greedy_deterministic": True,
            "seed": it["seed"], **it.get("extra", {})})

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's disjoint windows (every token predicted once, prefix_token first), each scored by the estimator;
        the document's value is the sum over windows (MC stderrs add in quadrature)."""
        items, owner = [], []
        for j, req in enumerate(requests):
            (string,) = req.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self._window - 1, context_len=1))
            for w, (ctx, pred) in enumerate(windows):
                items.append({"x": torch.tensor(list(ctx) + list(pred)), "n": len(pred), "truncated": 0,
                              "seed": request_seed(self.seed, "rolling", string, str(w))})
                owner.append(j)
        self._score(items, disable_tqdm)
        out = []
        for j, req in enumerate(requests):
            mine = [it for it, o in zip(items, owner) if o == j]
            self._record({**mine[0], "task": req.task_name, "doc_id": req.doc_id, "choice": req.idx,
                          "ll": sum(it["ll"] for it in mine), "stderr": math.sqrt(sum(it["stderr"] ** 2 for it in mine)),
                          "rows": sum(it["rows"] for it in mine), "greedy_rows": sum(it["greedy_rows"] for it in mine),
                          "is_greedy": all(it["is_greedy"] for it in mine), "n": sum(it["n"] for it in mine)})
            out.append(self.stats[-1]["loglikelihood"])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise UserError(f"generate_until (generation tasks) is not supported yet for `{self.family}` models; "
                        "run loglikelihood / multiple-choice tasks")

    # -- run outputs --------------------------------------------------------------------------------------------
    def gather_run_state(self) -> None:
        """Collective (every rank calls it once after the evaluation): rank 0's `stats` become the per-request
        statistics of the whole run — duplicates (lm-eval's padding requests) dropped, ordered by task name,
        document and choice, `request_index` renumbered — so the stats files are the same for any
        number of processes; truncation and cache counters are summed over ranks."""
        mine = {"stats": self.stats, "counts": (self.cache_hits, self.computed_requests)}
        parts = D.gather_object(mine, dst=0)
        if parts is None:
            return
        rows: dict = {}
        for rank, part in enumerate(parts):
            for i, r in enumerate(part["stats"]):
                key = (r["task"], r["doc_id"], r["choice"]) if r["task"] is not None else (None, rank, i)
                rows.setdefault(key, r)
        ordered = sorted(rows.values(), key=lambda r: (_key(r["task"]), _key(r["doc_id"]), _key(r["choice"])))
        self.stats = [{**r, "request_index": i} for i, r in enumerate(ordered)]
        self.truncated_requests = sum(1 for r in self.stats if r["truncated_tokens"])
        self.truncated_tokens = sum(r["truncated_tokens"] for r in self.stats)
        self.cache_hits = sum(p["counts"][0] for p in parts)
        self.computed_requests = sum(p["counts"][1] for p in parts)

    def get_model_info(self) -> dict:
        if self._sha is None and self.checkpoint is not None:
            self._checkpoint_sha256()
        cache = None if self.cache is None else {"dir": str(self.cache.directory), "run": self.cache.run,
                                                 "hits": self.cache_hits, "computed": self.computed_requests}
        return {"prime_eval": {
            **self.est.config(), "family": self.family, "is_bound": bool(self.est.is_bound),
            "num_samples": 1 if getattr(self.est, "deterministic", False) else self.num_samples, "seed": self.seed,
            "crn": self.crn,
            "adaptive": ({"round_samples": self.round_samples, "max_samples": self.num_samples,
                          "confidence": self.confidence, "target_se": self.target_se,
                          "futility_after": self.futility_after} if self.adaptive else None),
            "model_name": self.name, "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "checkpoint_sha256": self._sha or None, "params": sum(p.numel() for p in self.net.parameters()),
            "max_length": self._max_length, "add_bos": self.add_bos, "rows_per_pass": self.rows_per_pass,
            "pack": self.pack,
            "greedy": True if self.family == "arm" else self.greedy, "truncated_requests": self.truncated_requests,
            "truncated_tokens": self.truncated_tokens, "processes": self._world_size, "cache": cache}}

    def finalize_run(self, output_dir, date_id: str) -> list[Path]:
        """prime-eval score's post-run hook: write `stats_<task>_<date_id>.jsonl` next to lm-eval's samples."""
        by_task: dict[str, list[dict]] = {}
        for row in self.stats:
            by_task.setdefault(row["task"] or "unknown", []).append(row)
        from prime_eval.io import write_jsonl

        return [write_jsonl(Path(output_dir) / f"stats_{task}_{date_id}.jsonl", rows)  # atomic
                for task, rows in by_task.items()]
