"""`prime-eval score`: lm-eval zero-shot scores for ARM, MDM and MDM-Prime models (and any lm-eval model).

    prime-eval score --model prime --model_args checkpoint=ckpt.pt,num_samples=128 \\
        --tasks commonsense --data-dir ../shared/data --output_path runs/ --log_samples

It registers the adapters (`model_adapters`: lm-eval names `arm`, `mdm`, `prime`) and the task folder (`tasks/`),
runs `lm_eval.simple_evaluate`, and writes exactly what `lm_eval --output_path ... --log_samples` writes:
`<output_path>/<model dir>/results_<date>.json` and `samples_<task>_<date>.jsonl` (lm-eval's EvaluationTracker).
`--data-dir DIR` runs every task from `DIR/<task>/<split>.jsonl` (docs/tasks.md).

Scale-out (docs/scale-out.md): under `torchrun --nproc_per_node N -m prime_eval.cli score ...` every rank scores
its share of the documents (lm-eval's sharding), rank 0 gathers and writes; `--cache-dir DIR` makes the run
resumable (our adapters' SQLite cache). Output files appear atomically: lm-eval writes them into a hidden staging
folder, then each is moved into place (the results JSON last). The output folder is checked (writable, free space)
before any task or model is loaded.

Hooks an adapter may implement (all optional; lm-eval's own models have none of them):

* `is_stochastic: bool` (class attribute or property). True means log-likelihoods are Monte Carlo estimates:
  `--use_cache` is then refused, because lm-eval's response cache keys only on the request text, not on the
  model, estimator, number of samples or seed. If absent, `mdm` and `prime` count as stochastic.
* `finalize_run(output_dir: pathlib.Path, date_id: str) -> list[pathlib.Path]` (see `RunFinalizer`): called once
  after lm-eval has written `output_dir/results_<date_id>.json` (and the samples files), so the adapter can write
  its per-request statistics next to them as `output_dir/stats_<task>_<date_id>.jsonl`. Returns the files written.
* `get_model_info() -> dict` (lm-eval's own hook): merged into the results JSON's `config` after the run.
* `gather_run_state() -> None`: collective, called on every rank after the evaluation (before `finalize_run` and
  `get_model_info` on rank 0), so a data-parallel adapter can bring its per-rank state to rank 0.
* `cache_dir` (a constructor argument): set from `--cache-dir` for the models in `CACHE_MODELS`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prime_eval.errors import UserError

ADAPTERS = ("arm", "mdm", "prime")  # lm-eval names registered by model_adapters/<name>.py
CACHE_MODELS = ADAPTERS  # models that take a `cache_dir` argument (prime_eval.cache)
_STOCHASTIC_BY_DEFAULT = {"mdm", "prime"}
_DEFAULT_SEEDS = (0, 1234, 1234, 1234)  # lm-eval's python, numpy, torch, fewshot seeds


@runtime_checkable
class RunFinalizer(Protocol):
    """An LM that writes its own files next to lm-eval's after a `prime-eval score` run."""

    def finalize_run(self, output_dir: Path, date_id: str) -> list[Path]:
        """Write per-run files into `output_dir` (it holds `results_<date_id>.json`); return their paths.

        Called once per run, on rank 0, only when `--output_path` is given and the evaluation succeeded.
        """
        ...


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score",
        help="lm-eval zero-shot scores (commonsense suite etc.), offline with --data-dir",
        description="Run lm-evaluation-harness tasks on an ARM, MDM or MDM-Prime model (adapters `arm`, `mdm`, "
        "`prime`) or any lm-eval model (e.g. `hf`). Writes lm-eval's results JSON and samples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
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
    p.add_argument("--samples", "-E", type=json.loads, default=None, metavar="JSON",
                   help='document indices per task, e.g. \'{"piqa": [0, 5]}\' (not with --limit)')
    p.add_argument("--num_fewshot", "-f", type=int, default=None, help="few-shot examples (default: the task's, 0)")
    p.add_argument("--batch_size", "-b", default=None,
                   help="passed to the model constructor (lm-eval semantics: int, 'auto', 'auto:N')")
    p.add_argument("--max_batch_size", type=int, default=None, help="cap for --batch_size auto")
    p.add_argument("--device", default=None,
                   help="passed to the model constructor (cpu, cuda, cuda:0, ...); default: cpu when CUDA is absent")
    p.add_argument("--output_path", "-o", default=None, metavar="PATH",
                   help="folder (or .json file) for results; results go to PATH/<model>/results_<date>.json")
    p.add_argument("--log_samples", "-s", action="store_true",
                   help="also write samples_<task>_<date>.jsonl (every request and response); needs --output_path")
    p.add_argument("--seed", type=_parse_seed, default=list(_DEFAULT_SEEDS), metavar="N|P,N,T,F",
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


def load_adapters() -> dict[str, str | None]:
    """Import `model_adapters.{arm,mdm,prime}` so their `@register_model` runs; lm-eval's built-ins (`hf`, ...) are
    registered first. Returns name -> None when imported, or the reason it is unavailable (module not written yet).
    Errors inside an adapter module other than its own absence propagate.
    """
    import lm_eval.models  # noqa: F401  (registers hf, dummy, ... as lazy placeholders)

    status: dict[str, str | None] = {}
    for name in ADAPTERS:
        module = f"model_adapters.{name}"
        try:
            importlib.import_module(module)
            status[name] = None
        except ModuleNotFoundError as e:
            if e.name not in (module, "model_adapters"):
                raise
            status[name] = f"{module} is not installed"
    return status


def get_model_class(name: str, adapter_status: dict[str, str | None] | None = None) -> type:
    """The registered lm-eval model class for `name`, or a UserError listing the known names."""
    from lm_eval.api.registry import get_model, model_registry

    adapter_status = load_adapters() if adapter_status is None else adapter_status
    if name not in model_registry:
        why = adapter_status.get(name)
        extra = f" ({why})" if why else ""
        raise UserError(f"unknown model {name!r}{extra}. Known models: {', '.join(sorted(model_registry.keys()))}")
    try:
        return get_model(name)
    except ImportError as e:
        raise UserError(f"model {name!r} could not be imported: {e}") from e


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


def model_name(model: str, model_args: str) -> str:
    """The model name lm-eval's tracker records and names the output folder after: the value of the first of
    peft/delta/pretrained/model/path/engine in `model_args` (lm-eval's rule), else our adapters' `checkpoint`,
    else `model` (lm-eval itself would fall back to a random id)."""
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.utils import simple_parse_args_string

    name = GeneralConfigTracker._get_model_name(model_args)
    if name is None:
        name = str(simple_parse_args_string(model_args).get("checkpoint", model))
    return name


def model_dir_name(model: str, model_args: str) -> str:
    """The folder under `--output_path` that holds the run's files: `model_name`, sanitized as lm-eval does."""
    from lm_eval.utils import sanitize_model_name

    return sanitize_model_name(model_name(model, model_args))


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console
    from rich.markup import escape

    from prime_eval import distributed as D
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
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
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

    # 1. tasks first: a typo or a missing data file fails before any model is loaded
    where = f"offline from {args.data_dir}" if args.data_dir else "from the Hugging Face hub"
    with err.status(f"indexing tasks ({where})"):
        task_manager = T.build_task_manager(args.data_dir, names, include_path=args.include_path)
        T.resolve_tasks(names, task_manager)

    # 2. model
    status = load_adapters()
    cls = get_model_class(args.model, status)
    if args.use_cache and is_stochastic(args.model, cls):
        raise _refuse_cache(args.model)
    device = args.device if args.device is not None else _default_device()
    with err.status(f"loading model {args.model} ({model_args or 'default arguments'})"):
        lm = cls.create_from_arg_string(
            model_args, {"batch_size": args.batch_size, "max_batch_size": args.max_batch_size, "device": device})
    if args.use_cache and is_stochastic(args.model, lm):
        raise _refuse_cache(args.model)

    # 3. evaluate, exactly as lm-eval's CLI does
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=args.output_path)  # redirected to a staging folder when saving
    err.print(f"[bold]scoring[/] {escape(args.model)} on {escape(', '.join(names))} ({escape(where)}"
              + (f", limit {limit}" if limit is not None else "") + ")")
    results = lm_eval.simple_evaluate(
        model=lm, model_args=model_args, tasks=names, task_manager=task_manager,
        num_fewshot=args.num_fewshot, batch_size=args.batch_size, max_batch_size=args.max_batch_size,
        device=device, use_cache=args.use_cache, limit=limit, samples=args.samples,
        bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples, evaluation_tracker=tracker,
        gen_kwargs=args.gen_kwargs, predict_only=args.predict_only, write_out=args.write_out,
        verbosity=args.verbosity, random_seed=args.seed[0], numpy_random_seed=args.seed[1],
        torch_random_seed=args.seed[2], fewshot_random_seed=args.seed[3],
    )
    gather = getattr(lm, "gather_run_state", None)
    if callable(gather):
        gather()  # collective: every rank, before rank 0 writes
    if results is None:  # not rank 0
        return 0
    if hasattr(lm, "get_model_info"):  # again, now with the whole run's counters (gather_run_state)
        results["config"].update(lm.get_model_info())
    # We passed an instance (to keep a handle for the hooks); record the name the user gave, as lm-eval would.
    results["config"]["model"] = args.model
    gct = tracker.general_config_tracker
    gct.model_source = args.model
    gct.model_name = model_name(args.model, model_args)
    gct.model_name_sanitized = model_dir_name(args.model, model_args)

    written: list[Path] = []
    samples = results.pop("samples", None)  # present with --log_samples (and --predict_only)
    if args.output_path:
        written = _save(tracker, results, samples, lm, Path(args.output_path), gct.model_name_sanitized)

    Console().print(results_table(results))
    for path in written:
        err.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    return 0


def _save(tracker, results: dict, samples: dict | None, lm, output_path: Path, model_dir: str) -> list[Path]:
    """lm-eval's files written into a staging folder, then moved into place atomically, the results JSON last; then
    the adapter's `finalize_run` on the final folder (its files are written atomically by the adapter). Returns the
    final paths."""
    from prime_eval.io import publish_tree, staging_dir

    root = output_path.parent if output_path.suffix == ".json" else output_path
    staging = staging_dir(root)
    try:
        tracker.output_path = str(staging / output_path.name if output_path.suffix == ".json" else staging)
        tracker.save_results_aggregated(results=results, samples=samples)
        out_dir = _output_dir(Path(tracker.output_path), model_dir)
        results_file = _results_file(Path(tracker.output_path), out_dir, tracker.date_id)
        if not results_file.is_file():
            raise UserError(f"lm-eval could not write {results_file} (see the warning above); check --output_path")
        if samples is not None:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        moved = publish_tree(staging, root, last=lambda p: p == results_file)
    finally:
        tracker.output_path = str(output_path)
        shutil.rmtree(staging, ignore_errors=True)
    written = [moved[-1], *moved[:-1]]  # the results JSON first
    if isinstance(lm, RunFinalizer):  # the hook sees the final folder, results JSON included
        final_dir = _output_dir(output_path, model_dir)
        written += [Path(p) for p in (lm.finalize_run(final_dir, tracker.date_id) or [])]
    return written


def _default_device() -> str | None:
    """None (the model decides) unless no CUDA device exists: then "cpu" (lm-eval's `hf` would try "cuda")."""
    import torch

    return None if torch.cuda.is_available() else "cpu"


def _output_dir(output_path: Path, model_dir: str) -> Path:
    """Where lm-eval's tracker puts results and samples (its rule: a .json path means 'this file's folder')."""
    return output_path.parent if output_path.suffix == ".json" else output_path / model_dir


def _results_file(output_path: Path, out_dir: Path, date_id: str) -> Path:
    if output_path.suffix == ".json":
        return output_path.with_name(f"{output_path.stem}_{date_id}.json")
    return out_dir / f"results_{date_id}.json"


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
