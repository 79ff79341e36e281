"""`prime-eval score`: lm-eval zero-shot scores for ARM, MDM and MDM-Prime models (and any lm-eval model).

    prime-eval score --model prime --model_args checkpoint=ckpt.pt,samples=128 \\
        --tasks commonsense --data-dir ../shared/data --output_path runs/ --log_samples

It registers the adapters (`model_adapters`: lm-eval names `arm`, `mdm`, `prime`) and the task folder (`tasks/`),
runs `lm_eval.simple_evaluate`, and writes exactly what `lm_eval --output_path ... --log_samples` writes:
`<output_path>/<model dir>/results_<date>.json` and `samples_<task>_<date>.jsonl` (lm-eval's EvaluationTracker).
`--data-dir DIR` runs every task from `DIR/<task>/<split>.jsonl` (docs/tasks.md).

Scale-out (docs/scale-out.md): under `torchrun --nproc_per_node N -m prime_eval.cli score ...` every rank scores
its share of the documents (lm-eval's sharding), rank 0 gathers (in document order) and writes; `--cache-dir DIR`
makes the run resumable (our adapters' SQLite cache). Output files appear atomically.

Order of work: arguments and the output folder are checked first, then the model's class and arguments, then every
task is built (its data read, `--limit` / `--samples` checked against it), and only then is the model loaded: a bad
input fails in seconds, not after the weights are read. The run itself (`simple_evaluate`, gather, the adapters'
hooks, atomic publish) is `prime_eval.lm_eval_run.run`, which the demo uses too; the hooks an adapter may implement
are listed there. This module registers the adapters (`import model_adapters`) and refuses `--use_cache` for
stochastic models: lm-eval's response cache keys only on the request text, not on the model, estimator, number of
samples or seed. A model whose `is_stochastic` attribute is absent counts as stochastic when named `mdm` or `prime`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any

from prime_eval.errors import UserError
from prime_eval.lm_eval_run import DEFAULT_SEEDS

ADAPTERS = ("arm", "mdm", "prime")  # lm-eval names registered by model_adapters/<name>.py
CACHE_MODELS = ADAPTERS  # models that take a `cache_dir` argument (prime_eval.cache)
_STOCHASTIC_BY_DEFAULT = {"mdm", "prime"}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from prime_eval.settings import help_text

    p = subparsers.add_parser(
        "score",
        help="lm-eval zero-shot scores (commonsense suite etc.), offline with --data-dir",
        description="Run lm-evaluation-harness tasks on an ARM, MDM or MDM-Prime model (adapters `arm`, `mdm`, "
        "`prime`) or any lm-eval model (e.g. `hf`). Writes lm-eval's results JSON and samples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="model_args of arm, mdm, prime (prime_eval.settings; docs/adapters.md):\n" + help_text("score") + "\n\n"
        "examples:\n"
        "  prime-eval score --model arm --model_args checkpoint=gpt2.pt --tasks commonsense --data-dir ../shared/data\n"
        "  prime-eval score --model hf --model_args pretrained=gpt2 --tasks piqa,arc_easy --limit 50 -o runs/\n"
        "groups: commonsense (10 tasks), prime_v2_suite (MDM-Prime-v2's 8 benchmarks); see docs/tasks.md",
    )
    p.add_argument("--model", "-M", required=True, help="lm-eval model name: arm, mdm, prime, hf, ...")
    p.add_argument("--model_args", "-a", nargs="+", default=[], metavar="K=V",
                   help="model arguments 'k=v,k2=v2' (or several 'k=v' words)")
    p.add_argument("--tasks", "-t", nargs="+", required=True, metavar="TASK",
                   help="task or group names, comma or space separated (e.g. commonsense, piqa,arc_easy)")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None, metavar="DIR",
                   help="offline: read every task from DIR/<task>/<split>.jsonl (hub field layout) instead of the hub")
    p.add_argument("--include_path", default=None, metavar="DIR", help="extra folder of lm-eval task YAMLs")
    p.add_argument("--limit", "-L", type=float, default=None,
                   help="documents per task (an integer count, or a fraction < 1); for testing only")
    p.add_argument("--samples", "-E", type=_parse_samples, default=None, metavar="JSON",
                   help='document indices per task, e.g. \'{"piqa": [0, 5]}\' (not with --limit)')
    p.add_argument("--num_fewshot", "-f", type=int, default=None, help="few-shot examples (default: the task's, 0)")
    p.add_argument("--batch_size", "-b", default=None,
                   help="passed to the model constructor (lm-eval semantics: int, 'auto', 'auto:N')")
    p.add_argument("--max_batch_size", type=int, default=None, help="cap for --batch_size auto")
    p.add_argument("--device", default=None,
                   help="passed to the model constructor (cpu, cuda, cuda:0, ...); default: the model argument "
                   "device= if given (the two must agree when both are), else cpu when CUDA is absent")
    p.add_argument("--output_path", "-o", default=None, metavar="PATH",
                   help="folder (or .json file) for results; results go to PATH/<model>/results_<date>.json")
    p.add_argument("--log_samples", "-s", action="store_true",
                   help="also write samples_<task>_<date>.jsonl (every request and response); needs --output_path")
    p.add_argument("--seed", type=_parse_seed, default=list(DEFAULT_SEEDS), metavar="N|P,N,T,F",
                   help="lm-eval's python,numpy,torch,fewshot seeds: one int for all, or four (None to skip); "
                   "default 0,1234,1234,1234. The estimator's Monte Carlo seed is the model argument `seed`.")
    p.add_argument("--bootstrap_iters", type=int, default=100000,
                   help="bootstrap iterations for metric stderrs (0: none)")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                   metavar="DIR", help="resumable cache of per-request results (arm/mdm/prime; SQLite, keyed by "
                   "checkpoint hash, estimator settings, samples, seed and request): rerun the same command after a "
                   "crash or pre-emption and only missing requests are computed (default: $PRIME_EVAL_CACHE_DIR, "
                   "else off)")
    p.add_argument("--use_cache", "-c", default=None, metavar="PREFIX",
                   help="lm-eval's response cache (SQLite); refused for stochastic (MC) models (use --cache-dir)")
    p.add_argument("--gen_kwargs", default=None, help="generation arguments for generate_until tasks, 'k=v,...'")
    p.add_argument("--predict_only", "-x", action="store_true", help="write samples only, no metrics")
    p.add_argument("--write_out", "-w", action="store_true", help="print the prompts of the first documents")
    p.add_argument("--verbosity", "-v", default=None, help="lm-eval log level (DEBUG, INFO, WARNING, ...)")
    return p


def _parse_samples(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not JSON ({e.msg}); give document indices per task, e.g. "
                                         '\'{"piqa": [0, 5]}\'')


def _parse_seed(value: str) -> list[int | None]:
    items = [v.strip().lower() for v in value.split(",")]
    try:
        seeds = [None if v == "none" else int(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed {value!r}: expected an int or four ints/None, comma separated")
    if len(seeds) == 1:
        return seeds * 4
    if len(seeds) != 4:
        raise argparse.ArgumentTypeError(f"--seed {value!r}: give one int or four values (python,numpy,torch,fewshot)")
    return seeds


def load_adapters() -> None:
    """Register the adapters `arm`, `mdm` and `prime` with lm-eval (importing `model_adapters` does; lm-eval's
    built-ins such as `hf` are registered first)."""
    importlib.import_module("model_adapters")


def is_stochastic(model_name: str, obj: Any) -> bool:
    """Whether `obj` (an LM class or instance) returns Monte Carlo log-likelihoods (see the module docstring)."""
    flag = getattr(obj, "is_stochastic", None)
    if isinstance(flag, bool):
        return flag
    return model_name in _STOCHASTIC_BY_DEFAULT


def _refuse_cache(model_name: str) -> UserError:
    return UserError(
        f"--use_cache is refused for model {model_name!r}: its log-likelihoods are Monte Carlo estimates, and "
        "lm-eval's response cache keys only on the request text (not on the model, estimator, number of samples "
        "or seed), so a cached estimate would be silently reused by a later run with other settings. "
        "Use --cache-dir DIR instead (keyed on all of these; resumable), or drop --use_cache.")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console
    from rich.markup import escape

    from prime_eval import distributed as D
    from prime_eval import lm_eval_run as R
    from prime_eval import tasks as T
    from prime_eval.io import check_output_dir

    quiet = D.dist_info().rank != 0  # in a data-parallel run rank 0 speaks for all
    err = Console(stderr=True, quiet=quiet)
    names = T.split_task_list(args.tasks)
    model_args = ",".join(a.strip(",") for a in args.model_args if a.strip(","))
    if args.log_samples and not args.output_path:
        raise UserError("--log_samples needs --output_path (the folder the samples are written to)")
    if args.limit is not None and args.samples is not None:
        raise UserError("--limit and --samples cannot be combined")
    limit, samples = R.check_limit(args.limit), R.check_samples(args.samples)
    if not args.cache_dir and args.model in CACHE_MODELS and "cache_dir=" not in model_args:
        args.cache_dir = os.environ.get("PRIME_EVAL_CACHE_DIR") or None
    if args.cache_dir:
        if args.model not in CACHE_MODELS:
            raise UserError(f"--cache-dir works with the models {', '.join(CACHE_MODELS)}; for {args.model!r} use "
                            "lm-eval's --use_cache")
        if "cache_dir=" in model_args:
            raise UserError("give the cache folder once: --cache-dir or the model argument cache_dir")
        model_args = ",".join(filter(None, [model_args, f"cache_dir={args.cache_dir}"]))

    # 0. outputs: an unwritable or full disk fails now, not after hours of scoring
    if args.output_path:
        out_root = Path(args.output_path)
        check_output_dir(out_root.parent if out_root.suffix == ".json" else out_root, what="--output_path")
    if args.cache_dir:
        check_output_dir(args.cache_dir, what="--cache-dir")

    # 1. the model's class and arguments (no weights read)
    load_adapters()
    spec = R.model_spec(args.model, model_args, batch_size=args.batch_size, max_batch_size=args.max_batch_size,
                        device=args.device, default_device=_default_device())
    if args.use_cache and is_stochastic(args.model, spec.cls):
        raise _refuse_cache(args.model)

    # 2. tasks: names, data files, datasets, --limit / --samples against them; all before the model is loaded
    where = f"offline from {args.data_dir}" if args.data_dir else "from the Hugging Face hub"
    with err.status(f"loading tasks ({where})"):
        task_manager = T.build_task_manager(args.data_dir, names, include_path=args.include_path)
        T.resolve_tasks(names, task_manager)
        plan = R.prepare_tasks(names, task_manager, limit=limit, samples=samples)

    # 3. model
    with err.status(f"loading model {args.model} ({model_args or 'default arguments'})"):
        lm = spec.build()
    if args.use_cache and is_stochastic(args.model, lm):
        raise _refuse_cache(args.model)

    # 4. evaluate, exactly as lm-eval's CLI does, and publish the files
    err.print(f"[bold]scoring[/] {escape(args.model)} on {escape(', '.join(names))} ({escape(where)}"
              + (f", limit {limit}" if limit is not None else "") + ")")
    out = R.run(lm, plan, model=args.model, model_args=model_args, output_path=args.output_path,
                log_samples=args.log_samples, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                max_batch_size=args.max_batch_size, device=spec.kwargs.get("device"), use_cache=args.use_cache,
                bootstrap_iters=args.bootstrap_iters, gen_kwargs=args.gen_kwargs, predict_only=args.predict_only,
                write_out=args.write_out, verbosity=args.verbosity, seeds=args.seed)
    if out is None:  # not rank 0
        return 0
    Console().print(results_table(out.results))
    for line in run_notes(out.results):
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    for path in out.written:
        err.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    return 0


def run_notes(results: dict) -> list[str]:
    """What a reader of the table should know about how it was computed: requests served by the resumable cache,
    left-truncated requests (from `config.prime_eval` of lm-eval's results)."""
    pe = (results.get("config") or {}).get("prime_eval") or {}
    notes = []
    cache = pe.get("cache") or {}
    if cache.get("hits"):
        total = cache["hits"] + cache.get("computed", 0)
        notes.append(f"--cache-dir {cache.get('dir')}: {cache['hits']} of {total} requests were already stored (resumed), "
                     f"{cache.get('computed', 0)} computed")
    if pe.get("truncated_requests"):
        notes.append(f"{pe['truncated_requests']} requests were left-truncated to max_length "
                     f"({pe.get('truncated_tokens', 0)} tokens dropped; per request in stats_*.jsonl)")
    return notes


def _default_device() -> str | None:
    """None (the model decides) unless no CUDA device exists: then "cpu" (lm-eval's `hf` would try "cuda")."""
    import torch

    return None if torch.cuda.is_available() else "cpu"


def results_table(results: dict):
    """A rich table of every task and group metric with its stderr and document count."""
    from rich.table import Table

    table = Table(title="lm-eval results", title_justify="left")
    for col, kw in (("task", {}), ("metric", {}), ("value", {"justify": "right"}),
                    ("± stderr", {"justify": "right"}), ("n", {"justify": "right"})):
        table.add_column(col, **kw)
    n_samples = results.get("n-samples", {})
    for key, metrics in results.get("results", {}).items():
        label = metrics.get("alias", key)
        n = n_samples.get(key, {}).get("effective", "")
        first = True
        for mkey, value in metrics.items():
            if "," not in mkey or "_stderr," in mkey or not isinstance(value, (int, float)):
                continue
            metric, _, filt = mkey.partition(",")
            se = metrics.get(f"{metric}_stderr,{filt}")
            se_s = f"{se:.4f}" if isinstance(se, (int, float)) and math.isfinite(se) else ""
            name = metric if filt in ("none", "") else f"{metric} [{filt}]"
            table.add_row(label if first else "", name, f"{value:.4f}", se_s, str(n) if first else "")
            first = False
        if first:  # a group without aggregate metrics
            table.add_row(label, "", "", "", "")
    return table
