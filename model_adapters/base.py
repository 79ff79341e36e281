"""Shared base of the lm-eval adapters `arm`, `mdm` and `prime` (docs/adapters.md).

A `TemplateLM` (lm-eval's string handling: trailing context whitespace moves to the continuation, an empty context
becomes `prefix_token_id`) whose `_loglikelihood_tokens` scores requests with a family estimator
(`prime_eval.estimators`). The adapter is glue only: its settings are one validated object (`prime_eval.settings`),
the model comes from the one loader (`prime_eval.loading`), the requests are scored by `model_adapters.scoring`
(chunks, adaptive rounds by `prime_eval.adaptive`, the resumable cache) and forward passes hold rows whose numbers do
not depend on what shares the pass (`forward_rows_batch_invariant`).

  * every request gets its own `torch.Generator`, seeded from sha256(seed, context, continuation) (crn: of the
    document), so a result does not depend on batch size, request order or process count;
  * the log-likelihood returned is the SUM over continuation tokens: exact for ARMs, minus the estimator's mean NLL
    (a lower bound when `is_bound`) for diffusion models;
  * over-length inputs are left-truncated to the model's window and counted (stats, model info, warning);
  * per-request statistics are kept and written by `finalize_run` as `stats_<task>_<date>.jsonl`
    (schema: docs/ARCHITECTURE.md), the estimator configuration goes to the results JSON via `get_model_info`;
  * data-parallel under torchrun / accelerate launch (docs/scale-out.md): the process group is joined in the
    constructor, lm-eval gives each rank its share of the documents and gathers the metrics; `gather_run_state`
    (called by `prime-eval score` on every rank) brings the per-request statistics to rank 0;
  * `cache_dir=DIR` keeps every final result and every adaptive round in a resumable SQLite cache
    (`prime_eval.cache`): a killed run restarted with the same arguments loses at most one chunk.
Subclasses set `family` and implement `_family_options` (and `_greedy`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from prime_eval import distributed as D
from prime_eval.adaptive import AdaptiveRule
from prime_eval.errors import UserError
from prime_eval.estimators import ESTIMATORS, forward_rows_batch_invariant, forward_terms, get_estimator
from prime_eval.loading import load_model
from prime_eval.settings import Settings, merge_lm_eval_args
from model_adapters import generate_until as G
from model_adapters.scoring import RESULT_FIELDS, RequestScorer, ScoreCounters, request_seed

log = logging.getLogger("prime_eval.adapters")
__all__ = ["PrimeEvalLM", "request_seed"]


def _key(value) -> tuple:
    """Sort key for task names, doc ids and choice indices (None, numbers and strings)."""
    if value is None:
        return (2, 0, "")
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


class PrimeEvalLM(TemplateLM):
    family = "arm"

    def __init__(self, checkpoint=None, *, model=None, tokenizer=None, **model_args):
        """model_args: the settings of `prime_eval.settings.Settings` (`prime-eval score --help`), as strings or
        Python values. From Python, `model` is an already-built network and `tokenizer` may be a tokenizer object."""
        super().__init__()
        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, Path)) else None
        s = self.settings = Settings.parse(
            {"checkpoint": checkpoint, "tokenizer": None if tok is not None else tokenizer, **model_args},
            family=self.family, command="score", estimators=ESTIMATORS[self.family])
        dist = D.init_distributed(s.device)  # torchrun / accelerate launch: join the group; one process: no-op
        self._rank, self._world_size = dist.rank, dist.world_size
        self.bundle = load_model(self.family, s, network=model, tokenizer=tok, device=D.local_device(dist, s.device))
        self.net, self.tokenizer, self.info, self._device = (self.bundle.network, self.bundle.tokenizer,
                                                             self.bundle.info, self.bundle.device)
        self.add_bos = self._resolve_bos(s.add_bos)
        self._max_length = int(s.max_length or getattr(self.net, "max_length", None) or 2048)
        self.seed, self.num_samples, self.name = s.seed, s.samples, self.bundle.name
        self.rows_per_pass = s.resolved_rows_per_pass()
        self.est = get_estimator(self.family, s.estimator, **self._family_options(),
                                 **s.estimator_options("score"), **({"net": self.net} if s.estimator == "iw" else {}))
        # adaptive sampling: default on for Monte Carlo estimators whose estimate is a mean of per-sample values
        mc_mean = not getattr(self.est, "deterministic", False) and not hasattr(self.est, "aggregate")
        self.adaptive = s.is_adaptive(mc_mean)
        self.stats: list[dict] = []
        self.truncated_requests = self.truncated_tokens = 0
        self._meta = None
        self.counters = ScoreCounters()
        self.cache = self._open_cache() if s.cache_dir else None

    @classmethod
    def check_model_args(cls, args: dict) -> None:
        """`prime_eval.lm_eval_run`'s hook: every setting checked before any weight is read (UserError)."""
        Settings.parse({k: v for k, v in args.items() if k != "model"}, family=cls.family, command="score",
                       estimators=ESTIMATORS[cls.family])

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's constructor from 'k=v,k=v'; a setting given both there and by lm-eval's CLI (--device,
        --batch_size) must agree (lm-eval itself fails with `got multiple values for keyword argument`)."""
        return cls(**merge_lm_eval_args(simple_parse_args_string(arg_string), additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        return cls(**merge_lm_eval_args(dict(arg_dict), additional_config))

    def _request_seed(self, task, doc_id, context: str, continuation: str) -> int:
        """The request's generator seed. crn=true (default for MC estimators): every choice of a document shares the
        document's seed, so the choices see the same t_k / masked counts and the same draws at shared positions
        (common random numbers: the variance of the difference between choices shrinks; issue 9). The document is
        (task, doc_id) when lm-eval says so, else the context. crn=false: (seed, context, continuation)."""
        if not self.settings.crn:
            return request_seed(self.seed, context, continuation)
        if task is not None and doc_id is not None:
            return request_seed(self.seed, "doc", str(task), str(doc_id))
        return request_seed(self.seed, "context", context)

    # -- family hooks -----------------------------------------------------------------------------------------
    def _family_options(self) -> dict:
        """What the family's estimator needs from the model (mask id, sub-tokenizer, carry-over)."""
        return {}

    def _greedy(self, items: list[dict]) -> None:
        """Set item["is_greedy"] and item["greedy_rows"] by greedy unmasking (diffusion families)."""
        raise NotImplementedError

    # -- data parallel (lm-eval's evaluator calls these when world_size > 1) -------------------------------------
    def all_gather(self, tensor):
        return D.all_gather_tensor(tensor)

    def gather_object(self, obj, dst=0):
        return D.gather_object(obj, dst=dst)

    def barrier(self) -> None:
        D.barrier()

    # -- result cache -------------------------------------------------------------------------------------------
    def _open_cache(self):
        """The run's cache: its identity is everything a request's result depends on besides the request: the model
        (the loader's identity: weights, permutation, tokenizer, dtype, ...), the estimator and the settings."""
        from prime_eval.cache import ResultCache, estimator_identity, run_identity

        s = self.settings
        ident = run_identity(
            checkpoint_sha256=self.bundle.content_sha256(), estimator=estimator_identity(self.est),
            num_samples=1 if getattr(self.est, "deterministic", False) else s.samples, seed=s.seed,
            kind="lm-eval", family=self.family, model=self.bundle.identity, greedy=str(s.greedy),
            adaptive=[s.round_samples, s.confidence, s.target_se, s.futility_after] if self.adaptive else None,
            pack=s.pack, device_type=self._device.type)
        return ResultCache(s.cache_dir, ident, rank=self._rank)

    # -- tokenizer ----------------------------------------------------------------------------------------------
    def _resolve_bos(self, add_bos: bool | None) -> bool:
        """auto: what the tokenizer does by default (Llama/SentencePiece: BOS; GPT-2: none), as lm-eval's `hf`."""
        bos = self.tokenizer.bos_token_id
        if add_bos is None:
            return bos is not None and self.tokenizer.encode("a")[:1] == [bos]
        if add_bos and bos is None:
            raise UserError("add_bos=true but the tokenizer has no BOS token")
        return add_bos

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

    def _score(self, items: list[dict], disable_tqdm: bool = False, kind: str = "loglikelihood") -> None:
        """Fill RESULT_FIELDS of every item (`model_adapters.scoring`). Identical items (same tokens, continuation
        length and seed, e.g. lm-eval's padding requests on a rank with fewer documents) are scored once."""
        unique: dict[tuple, dict] = {}
        copies: list[tuple[dict, dict]] = []
        for it in items:
            k = (tuple(it["x"].tolist()), it["n"], it["seed"])
            if k in unique:
                copies.append((it, unique[k]))
            else:
                unique[k] = it
        s = self.settings
        scorer = RequestScorer(
            self.net, self.est, forward=self._forward, num_samples=s.samples, chunk_rows=s.resolved_chunk_rows(),
            max_logits=max(1, int(float(s.max_logits_mb) * 2**20 / (12 * self.net.vocab_size))),  # fp32 + fp64 copy
            rule=AdaptiveRule(cap=s.samples, round_samples=s.round_samples, confidence=s.confidence,
                              target_se=s.target_se, futility_after=s.futility_after) if self.adaptive else None,
            greedy=None if self.family == "arm" else self._greedy, terms=None if self.family == "arm" else self._terms,
            greedy_mode=s.greedy, cache=self.cache,
            desc=f"{self.family} {kind}", counters=self.counters)
        scorer.score(list(unique.values()), progress=not disable_tqdm and self.rank == 0)
        for it, src in copies:
            it.update({f: src[f] for f in RESULT_FIELDS})

    def _forward(self, rows_list: list) -> list:
        """Logits of many requests' rows, in passes whose make-up cannot change a request's numbers."""
        return forward_rows_batch_invariant(self.net, rows_list, self.rows_per_pass, pack=self.settings.pack)

    def _terms(self, rows_list: list):
        """The estimator's per-position terms of many requests' rows, in the passes of `_forward`, the logits reduced
        as they come (`forward_terms`): (index, terms) per Rows."""
        return forward_terms(self.net, self.est, rows_list, self.rows_per_pass, pack=self.settings.pack)

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
            # greedy=auto skips multiple-choice documents: their is_greedy is false because it was not computed
            "is_greedy_computed": bool(it["greedy_computed"]),
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
        self._score(items, disable_tqdm, kind="loglikelihood_rolling")
        out = []
        for j, req in enumerate(requests):
            mine = [it for it, o in zip(items, owner) if o == j]
            self._record({**mine[0], "task": req.task_name, "doc_id": req.doc_id, "choice": req.idx,
                          "ll": sum(it["ll"] for it in mine), "stderr": math.sqrt(sum(it["stderr"] ** 2 for it in mine)),
                          "rows": sum(it["rows"] for it in mine), "greedy_rows": sum(it["greedy_rows"] for it in mine),
                          "is_greedy": all(it["is_greedy"] for it in mine), "n": sum(it["n"] for it in mine),
                          "greedy_computed": all(it["greedy_computed"] for it in mine)})
            out.append(self.stats[-1]["loglikelihood"])
        return out

    # -- generate_until (model_adapters.generate_until: lm-eval hf's contract; prime_eval.generation: samplers) ----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """lm-eval's generate_until: one answer string per request, from the family's sampler (`_generate`)."""
        items = G.build_items(self, requests, self._answer_tokens)
        bar = tqdm(total=sum(self._passes_at_most(it) for it in items), unit="row", disable=disable_tqdm
                   or self.rank != 0 or not items, desc=f"{self.family} generate_until (forward rows; total: at most)")
        gens = self._generate(items, bar.update)
        bar.total = bar.n  # the rows actually run
        bar.close()
        out = []
        for it, g in zip(items, gens):
            out.append(G.answer_text(self, it, g))
            self._record_generation(it, g)
        trunc = [it for it in items if it.truncated]
        if trunc:
            self.truncated_requests += len(trunc)
            self.truncated_tokens += sum(it.truncated for it in trunc)
            log.warning("%d of %d generate_until prompts exceed their room in the %d-token window and were "
                        "left-truncated (%d tokens dropped)", len(trunc), len(items), self._max_length,
                        sum(it.truncated for it in trunc))
        return out

    def _answer_tokens(self, max_gen_toks: int) -> int:
        """Tokens an answer takes in the window: ARM at most max_gen_toks; diffusion its fixed length."""
        g = self.settings.gen_length
        return max_gen_toks if self.family == "arm" or g is None else min(g, max_gen_toks)

    def _passes_at_most(self, item) -> int:
        """The most forward rows a request can take (the progress bar's total): ARM one per token; diffusion one per
        step (two with CFG)."""
        n = self._answer_tokens(item.request.max_new_tokens)
        if self.family == "arm":
            return max(1, n)
        return (self.settings.steps or n) * (2 if self.family == "mdm" and self.settings.cfg else 1)

    def _generate(self, items: list, on_pass) -> list:
        """The family's sampler on the items' `GenRequest`s (`prime_eval.generation`): one Generation each."""
        raise NotImplementedError

    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an answer: the tokenizer's EOS and, for a Hugging Face model, its generation config's
        eos_token_id(s) (what transformers' `generate` stops on, as lm-eval `hf`)."""
        ids = [] if self.eot_token_id is None else [int(self.eot_token_id)]
        hf = getattr(self.net, "model", None)
        eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
        for e in ([eos] if isinstance(eos, int) else list(eos or [])):
            if int(e) not in ids and int(e) < self.net.vocab_size:
                ids.append(int(e))
        return tuple(ids)

    def _record_generation(self, it, g) -> None:
        self.stats.append({
            "task": it.task, "doc_id": it.doc_id, "choice": it.repeat, "request_index": len(self.stats),
            "kind": "generate_until", "prompt_tokens": len(it.request.prompt), "generated_tokens": len(g.tokens),
            "forward_passes": g.forward_passes, "stop": g.stop, "temperature": it.request.temperature,
            "max_gen_toks": it.request.max_new_tokens, "truncated_tokens": it.truncated, "seed": it.request.seed,
            **g.extra})

    def generation_info(self) -> dict:
        """The sampler's settings for the results config (`get_model_info`)."""
        return {"sampler": self.family, "max_gen_toks": self.settings.max_gen_toks,
                **self.settings.generation_options(self.family)}

    # -- run outputs --------------------------------------------------------------------------------------------
    def gather_run_state(self) -> None:
        """Collective (every rank calls it once after the evaluation): rank 0's `stats` become the per-request
        statistics of the whole run — duplicates (lm-eval's padding requests) dropped, ordered by task name,
        document and choice, `request_index` renumbered — so the stats files are the same for any
        number of processes; truncation and cache counters are summed over ranks."""
        mine = {"stats": self.stats, "counts": self.counters.as_dict()}
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
        self.counters = ScoreCounters(**{k: sum(p["counts"][k] for p in parts) for k in parts[0]["counts"]})

    def get_model_info(self) -> dict:
        s, b = self.settings, self.bundle
        cache = None if self.cache is None else {"dir": str(self.cache.directory), "run": self.cache.run,
                                                 **self.counters.as_dict()}
        info = {
            **self.est.config(), "family": self.family, "is_bound": bool(self.est.is_bound),
            "num_samples": 1 if getattr(self.est, "deterministic", False) else s.samples, "seed": s.seed,
            "crn": s.crn,
            "adaptive": ({"round_samples": s.round_samples, "max_samples": s.samples, "confidence": s.confidence,
                          "target_se": s.target_se, "futility_after": s.futility_after} if self.adaptive else None),
            "model_name": self.name, "checkpoint": b.checkpoint, "checkpoint_sha256": b.identity["checkpoint_sha256"],
            "permutation_sha256": b.identity["permutation_sha256"], "weights": b.identity["weights"],
            "params": sum(p.numel() for p in self.net.parameters()), "max_length": self._max_length,
            "add_bos": self.add_bos, "rows_per_pass": self.rows_per_pass, "chunk_rows": s.resolved_chunk_rows(),
            "pack": s.pack, "greedy": True if self.family == "arm" else "auto" if s.greedy is None else s.greedy,
            "truncated_requests": self.truncated_requests, "truncated_tokens": self.truncated_tokens,
            "processes": self._world_size, "cache": cache, "generation": self.generation_info()}
        if self.family == "prime":
            info["permutation_file"] = b.permutation if b.permutation is None else str(b.permutation)
            info["permutation_source"] = b.identity["permutation_source"]  # checkpoint | the file | identity
        return {"prime_eval": info}

    def finalize_run(self, output_dir, date_id: str) -> list[Path]:
        """prime-eval score's post-run hook: write `stats_<task>_<date_id>.jsonl` (log-likelihood requests) and
        `generations_<task>_<date_id>.jsonl` (generate_until requests) next to lm-eval's samples."""
        by_file: dict[str, list[dict]] = {}
        for row in self.stats:
            kind = "generations" if row.get("kind") == "generate_until" else "stats"
            by_file.setdefault(f"{kind}_{row['task'] or 'unknown'}_{date_id}.jsonl", []).append(row)
        from prime_eval.io import write_jsonl

        return [write_jsonl(Path(output_dir) / name, rows) for name, rows in by_file.items()]  # atomic
