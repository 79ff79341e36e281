"""One lm-eval run, as `prime-eval score` and the demo make it: everything that can be checked is checked before
any weights are read, then `lm_eval.simple_evaluate`, the gather across ranks in document order, the model's hooks,
and an atomic publish of the results, samples and statistics.

    plan = prepare_tasks(["piqa"], build_task_manager(data_dir, ["piqa"]), limit=50)  # tasks built, data read
    spec = model_spec("hf", "pretrained=gpt2", device="cpu")                          # class and arguments checked
    out = run(spec.build(), plan, model="hf", model_args="pretrained=gpt2", output_path="runs/", log_samples=True)
    out.results, out.results_file, out.written                                        # rank 0; None on the others

`run` takes any lm-eval `LM` instance; `model_spec` finds a model by its registered name. This module never
imports the adapters: the command layer registers them (`import model_adapters`) before naming them here.

Files (exactly lm-eval's `--output_path ... --log_samples` layout): `<output_path>/<model dir>/results_<date>.json`
and `samples_<task>_<date>.jsonl`, plus whatever the model's `finalize_run` writes next to them. lm-eval writes
non-atomically, so its files go to a hidden staging folder and are moved into place one by one, the results JSON
last (`prime_eval.io.publish_tree`).

Scale-out: under torchrun every rank scores documents r, r+W, r+2W, ... (lm-eval's sharding) and rank 0 gathers the
per-document metrics. `run` puts them back in document order before lm-eval aggregates them, so the aggregate
metrics and their standard errors (closed form or bootstrap) are computed from the same list, in the same order,
as in a single process: bit-identical for any number of processes when the per-document values are.

Hooks a model may implement (all optional; lm-eval's own models have none of them):

* `check_model_args(args: dict) -> None` (classmethod): validate the parsed model arguments before the model is
  built, i.e. before any weights are read; raise `UserError`.
* `is_stochastic: bool`: log-likelihoods are Monte Carlo estimates (the command refuses lm-eval's `--use_cache`).
* `finalize_run(output_dir: Path, date_id: str) -> list[Path]` (see `RunFinalizer`).
* `get_model_info() -> dict` (lm-eval's own hook): merged into the results JSON's `config` after the run.
* `gather_run_state() -> None`: collective, called on every rank after the evaluation (before `finalize_run` and
  `get_model_info` on rank 0), so a data-parallel model can bring its per-rank state to rank 0.
"""
from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from prime_eval.errors import UserError

if TYPE_CHECKING:  # lm_eval is imported lazily: it is slow to import
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

DEFAULT_SEEDS = (0, 1234, 1234, 1234)  # lm-eval's python, numpy, torch, fewshot seeds


@runtime_checkable
class RunFinalizer(Protocol):
    """An LM that writes its own files next to lm-eval's after a run."""

    def finalize_run(self, output_dir: Path, date_id: str) -> list[Path]:
        """Write per-run files into `output_dir` (it holds `results_<date_id>.json`); return their paths.

        Called once per run, on rank 0, only when the run has an output path and the evaluation succeeded.
        """
        ...


# -- arguments ------------------------------------------------------------------------------------------------------
def check_limit(limit: float | None) -> int | float | None:
    """`--limit` as lm-eval takes it: a whole number of documents (>= 1) or a fraction in (0, 1)."""
    if limit is None:
        return None
    if not math.isfinite(limit) or limit <= 0:
        raise UserError(f"--limit {limit:g}: give a number of documents per task (>= 1) or a fraction in (0, 1); "
                        "leave it out to score every document")
    if limit >= 1:
        if limit != int(limit):
            raise UserError(f"--limit {limit:g}: a count of documents must be a whole number (or a fraction < 1)")
        return int(limit)
    return limit


def check_samples(samples: Any) -> dict[str, list[int]] | None:
    """`--samples`: a JSON object task -> list of document indices (>= 0, no repeats); returned with sorted lists.

    lm-eval scores the chosen documents in document order but labels them in the order given, so the lists are
    sorted here (which documents are scored does not change)."""
    if samples is None:
        return None
    if not isinstance(samples, dict) or not samples:
        raise UserError('--samples: give a JSON object of document indices per task, e.g. \'{"piqa": [0, 5]}\'')
    out = {}
    for task, idx in samples.items():
        if not isinstance(idx, list) or not idx or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in idx):
            raise UserError(f"--samples: {task!r} needs a non-empty list of integer document indices, got "
                            f"{idx!r}")
        neg = [i for i in idx if i < 0]
        if neg:
            raise UserError(f"--samples: {task!r} lists negative indices {neg[:5]}; documents are numbered from 0")
        dup = sorted(i for i, n in Counter(idx).items() if n > 1)
        if dup:
            raise UserError(f"--samples: {task!r} lists indices {dup[:5]} more than once; give each document once")
        out[task] = sorted(idx)
    return out


# -- tasks ----------------------------------------------------------------------------------------------------------
@dataclass
class TaskPlan:
    """Built lm-eval tasks (datasets read) and the checked `limit` / `samples`, ready for `run`."""

    names: list[str]  # as requested (tasks, groups, tags)
    objects: list  # lm-eval Task / Group objects, in the order named
    leaves: list[str]  # the leaf tasks that are scored
    task_manager: TaskManager
    limit: int | float | None = None
    samples: dict[str, list[int]] | None = None


def prepare_tasks(names: Sequence[str], task_manager: TaskManager, *, limit: float | None = None,
                  samples: dict | None = None) -> TaskPlan:
    """Build every task of `names` (its dataset read) and check `limit` and `samples` against it, before any model
    exists: a task whose data cannot be read, or a document index beyond a task's end, fails here."""
    if limit is not None and samples is not None:
        raise UserError("--limit and --samples cannot be combined")
    limit, samples = check_limit(limit), check_samples(samples)
    objects, leaves = [], []
    for name in names:
        try:
            loaded = task_manager.load(name)
        except UserError:
            raise
        except Exception as e:  # datasets / pyarrow / a task's own code
            raise UserError(f"task {name!r} could not be loaded ({_one_line(e)}); check its name, its data files "
                            "(--data-dir DIR/<task>/<split>.jsonl, docs/tasks.md) and its YAML") from e
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)  # neither: a tag, i.e. a list of tasks
        objects += [top] if top is not None else list(loaded["tasks"].values())
        leaves += [t for t in loaded["tasks"] if t not in leaves]
        if samples:
            for t, task in loaded["tasks"].items():
                if t in samples:
                    _check_indices(t, samples[t], len(task.eval_docs))
    if samples:
        unknown = sorted(set(samples) - set(leaves))
        if unknown:
            raise UserError(f"--samples names {', '.join(map(repr, unknown))}, which this run does not score; its "
                            f"tasks are {', '.join(leaves)}")
    return TaskPlan(list(names), objects, leaves, task_manager, limit, samples)


def _check_indices(task: str, indices: list[int], n_docs: int) -> None:
    beyond = [i for i in indices if i >= n_docs]
    if beyond:
        raise UserError(f"--samples: {task!r} has {n_docs} documents (indices 0 to {n_docs - 1}), but the list "
                        f"holds {', '.join(map(str, beyond[:5]))}{' ...' if len(beyond) > 5 else ''}")


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].rstrip('.')}" if lines else type(e).__name__


# -- model ----------------------------------------------------------------------------------------------------------
def model_class(name: str) -> type:
    """The lm-eval model class registered as `name`, or a UserError listing the registered names."""
    import lm_eval.models  # noqa: F401  (registers hf, dummy, ... as lazy placeholders)
    from lm_eval.api.registry import get_model, model_registry

    if name not in model_registry:
        raise UserError(f"unknown model {name!r}. Known models: {', '.join(sorted(model_registry.keys()))}")
    try:
        return get_model(name)
    except ImportError as e:
        raise UserError(f"model {name!r} could not be imported: {e}") from e


@dataclass(frozen=True)
class ModelSpec:
    """A model checked without being built: its class and the keyword arguments its constructor will get."""

    name: str
    cls: type
    model_args: str
    kwargs: dict = field(default_factory=dict)

    def build(self) -> LM:
        """The model; any error of its constructor becomes one line that names the model and its arguments."""
        try:
            return self.cls(**self.kwargs)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"model {self.name!r} could not be built from --model_args {self.model_args!r}: "
                            f"{_one_line(e)}. {_fix_hint(e)}") from e


def _fix_hint(e: Exception) -> str:
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if isinstance(e, OSError) and offline:
        return ("Offline (HF_HUB_OFFLINE=1) only files on this machine can be read: pass a local folder "
                "(e.g. pretrained=DIR), or download the model first")
    if isinstance(e, OSError):
        return "Check the path or hub id, and the network if the model comes from the hub"
    return "Check the model arguments"


def model_spec(name: str, model_args: str = "", *, batch_size: Any = None, max_batch_size: Any = None,
               device: str | None = None, default_device: str | None = None) -> ModelSpec:
    """Resolve model `name` and its arguments without building it.

    `model_args` ("k=v,k2=v2", lm-eval's parser) and the command's own settings (`batch_size`, `max_batch_size`,
    `device`; None: not given) both reach the constructor, as with lm-eval's `create_from_arg_string`. A setting
    given both ways must agree (else UserError); `default_device` applies when neither gives a device. The
    class's `check_model_args` hook, if any, then sees the merged arguments.
    """
    from lm_eval.utils import simple_parse_args_string

    from prime_eval.settings import merge_lm_eval_args

    cls = model_class(name)
    kwargs = merge_lm_eval_args(simple_parse_args_string(model_args) if model_args else {},
                                {"batch_size": batch_size, "max_batch_size": max_batch_size, "device": device})
    if "device" not in kwargs and default_device is not None:
        kwargs["device"] = default_device
    check = getattr(cls, "check_model_args", None)
    if callable(check):
        check(dict(kwargs))
    return ModelSpec(name, cls, model_args, kwargs)


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
    """The folder under the output path that holds the run's files: `model_name`, sanitized as lm-eval does."""
    from lm_eval.utils import sanitize_model_name

    return sanitize_model_name(model_name(model, model_args))


# -- the run --------------------------------------------------------------------------------------------------------
@dataclass
class RunOutput:
    """What a run produced on rank 0: lm-eval's results (without the samples), the files written (results JSON
    first) and the results JSON's path (None without an output path)."""

    results: dict
    written: list[Path]
    results_file: Path | None


@contextmanager
def _quiet_git_hash():
    """lm-eval records `git describe` of the working directory as `git_hash`; outside a git repository git prints
    "fatal: not a git repository" to the terminal. The same value, with git's stderr discarded."""
    import subprocess

    import lm_eval.evaluator as ev
    from lm_eval.loggers.utils import get_commit_from_path

    def git_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())  # lm-eval's own fallback

    original = ev.get_git_commit_hash
    ev.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        ev.get_git_commit_hash = original


def run(lm: LM, plan: TaskPlan, *, model: str, model_args: str = "", output_path: str | Path | None = None,
        display_name: str | None = None, log_samples: bool = False, num_fewshot: int | None = None,
        batch_size: Any = None, max_batch_size: Any = None, device: str | None = None, use_cache: str | None = None,
        bootstrap_iters: int = 100000, gen_kwargs: str | None = None, predict_only: bool = False,
        write_out: bool = False, verbosity: str | None = None,
        seeds: Sequence[int | None] = DEFAULT_SEEDS) -> RunOutput | None:
    """Evaluate `lm` on `plan` with `lm_eval.simple_evaluate` and publish the files; None on ranks other than 0.

    `model` is the name recorded as the results' `config.model`; `model_args`, `batch_size`, `device` ... are
    recorded as lm-eval records them. `display_name` is the model name recorded by lm-eval's tracker, and
    (sanitized) the output folder's name (default: `model_name(model, model_args)`). `seeds`: lm-eval's python,
    numpy, torch and fewshot seeds.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    tracker = EvaluationTracker(output_path=None if output_path is None else str(output_path))
    with _gather_in_document_order(lm), _quiet_git_hash():
        results = lm_eval.simple_evaluate(
            model=lm, model_args=model_args, tasks=plan.objects, task_manager=plan.task_manager,
            num_fewshot=num_fewshot, batch_size=batch_size, max_batch_size=max_batch_size, device=device,
            use_cache=use_cache, limit=plan.limit, samples=plan.samples, bootstrap_iters=bootstrap_iters,
            log_samples=log_samples, evaluation_tracker=tracker, gen_kwargs=gen_kwargs, predict_only=predict_only,
            write_out=write_out, verbosity=verbosity, random_seed=seeds[0], numpy_random_seed=seeds[1],
            torch_random_seed=seeds[2], fewshot_random_seed=seeds[3])
    gather = getattr(lm, "gather_run_state", None)
    if callable(gather):
        gather()  # collective: every rank, before rank 0 writes
    if results is None:  # not rank 0
        return None
    if hasattr(lm, "get_model_info"):  # again, now with the whole run's counters (gather_run_state)
        results["config"].update(lm.get_model_info())
    # We passed an instance (to keep a handle for the hooks); record the name the user gave, as lm-eval would.
    results["config"]["model"] = model
    gct = tracker.general_config_tracker
    gct.model_source = model
    gct.model_name = display_name or model_name(model, model_args)
    gct.model_name_sanitized = sanitize_model_name(gct.model_name)
    samples = results.pop("samples", None)  # present with log_samples (and predict_only)
    if output_path is None:
        return RunOutput(results, [], None)
    written = _publish(tracker, results, samples, lm, Path(output_path), gct.model_name_sanitized)
    return RunOutput(results, written, written[0])


def _publish(tracker, results: dict, samples: dict | None, lm, output_path: Path, model_dir: str) -> list[Path]:
    """lm-eval's files written into a staging folder, then moved into place atomically, the results JSON last; then
    the model's `finalize_run` on the final folder (its files are written atomically by the model). Returns the
    final paths, the results JSON first."""
    from prime_eval.io import publish_tree, staging_dir

    root = output_path.parent if output_path.suffix == ".json" else output_path
    staging = staging_dir(root)
    try:
        tracker.output_path = str(staging / output_path.name if output_path.suffix == ".json" else staging)
        tracker.save_results_aggregated(results=results, samples=samples)
        out_dir = _output_dir(Path(tracker.output_path), model_dir)
        results_file = _results_file(Path(tracker.output_path), out_dir, tracker.date_id)
        if not results_file.is_file():
            raise UserError(f"lm-eval could not write {results_file} (see the warning above); check the output path")
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


def _output_dir(output_path: Path, model_dir: str) -> Path:
    """Where lm-eval's tracker puts results and samples (its rule: a .json path means 'this file's folder')."""
    return output_path.parent if output_path.suffix == ".json" else output_path / model_dir


def _results_file(output_path: Path, out_dir: Path, date_id: str) -> Path:
    if output_path.suffix == ".json":
        return output_path.with_name(f"{output_path.stem}_{date_id}.json")
    return out_dir / f"results_{date_id}.json"


# -- gather in document order ---------------------------------------------------------------------------------------
def interleave(per_rank: Sequence[Sequence]) -> list:
    """Lists of ranks that took items r, r+W, r+2W, ... -> the items in their original order 0, 1, 2, ...

    Lists whose lengths cannot come from that sharding (a later rank holding more, or more than one item fewer)
    are concatenated rank after rank instead, as lm-eval does."""
    lens = [len(p) for p in per_rank]
    if any(b > a for a, b in zip(lens, lens[1:])) or (lens and lens[0] - lens[-1] > 1):
        return [x for p in per_rank for x in p]
    return [p[i] for i in range(max(lens, default=0)) for p in per_rank if i < len(p)]


def _interleave_samples(per_rank: Sequence[Sequence[dict]]) -> list[dict]:
    """Logged samples hold one entry per document per filter, filter after filter: interleave each filter's run."""
    filters = list(dict.fromkeys(s.get("filter") for p in per_rank for s in p))
    return [s for f in filters for s in interleave([[s for s in p if s.get("filter") == f] for p in per_rank])]


def in_document_order(parts: Sequence[Any]) -> Any:
    """One object from the per-rank objects lm-eval's evaluator gathers — `{task: [sample, ...]}` (logged samples)
    or `{task: {(metric, filter): [value, ...]}}` (per-document metrics) — with every list in document order."""
    tasks = list(dict.fromkeys(t for p in parts for t in p))
    merged: dict = {}
    for t in tasks:
        values = [p.get(t) for p in parts]
        if all(isinstance(v, dict) for v in values if v is not None):
            keys = list(dict.fromkeys(k for v in values if v for k in v))
            merged[t] = {k: interleave([(v or {}).get(k, []) for v in values]) for k in keys}
        else:
            merged[t] = _interleave_samples([v or [] for v in values])
    return merged


@contextmanager
def _gather_in_document_order(lm) -> Iterable[None]:
    """While lm-eval evaluates `lm` on several ranks, its `gather_object` returns one object with every per-rank
    list merged in document order (`in_document_order`), so rank 0 aggregates the same list as a single process.
    lm-eval chains the gathered objects rank after rank; with one merged object that chain is the merged lists."""
    if getattr(lm, "world_size", 1) <= 1:
        yield
        return
    own = "gather_object" in vars(lm)
    plain = lm.gather_object

    def gather_object(obj, dst=0):
        parts = plain(obj, dst=dst)
        if parts is None or not all(isinstance(p, dict) for p in parts):
            return parts
        return [in_document_order(parts)]

    lm.gather_object = gather_object
    try:
        yield
    finally:
        if own:
            lm.gather_object = plain
        else:
            del lm.gather_object
