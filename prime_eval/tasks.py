"""Task suite: which lm-eval tasks we run, the groups in `tasks/`, and the offline (`--data-dir`) switch.

The tasks are lm-eval's own built-in tasks, never forks: same prompts, splits and metrics. `tasks/` holds only group
YAMLs (`commonsense`, `prime_v2_suite`, `prime_v2_anli`) that list built-in task names.

Offline mode reads every task from `DIR/<task>/<split>.jsonl`, in the hub's field layout. For each task it writes a
two-part YAML into a cache folder: `include:` the built-in YAML by absolute path (found at run time from
`lm_eval.tasks.__file__`), then override only the data source:

    include: <site-packages>/lm_eval/tasks/piqa/piqa.yaml
    task: piqa
    dataset_path: json
    dataset_name: null
    dataset_kwargs: {data_files: {validation: DIR/piqa/validation.jsonl}}
    training_split: null          # or `train` when DIR/piqa/train.jsonl exists (few-shot source)
    validation_split: validation
    test_split: null

and returns `TaskManager(include_path=[that folder, tasks/], include_defaults=False)`: the built-in index is not
built (saves ~8 s) and nothing can reach the hub. Task names stay the built-in ones, so results files read the same
online and offline.

Public API:
    TASKS, TASKS_DIR, TAGS, load_groups(), expand(names), split_task_list(value), task_file(data_dir, task),
    check_offline(names, data_dir), check_jsonl(path), offline_config(spec, data_dir),
    task_yaml(config, comment), write_task_yaml(path, config, comment),
    write_offline_tasks(data_dir, tasks=None, cache_dir=None), build_task_manager(data_dir=None, tasks=None, ...),
    resolve_tasks(names, task_manager, data_dir=None)
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from prime_eval.errors import UserError
from prime_eval.io import atomic_write_text

if TYPE_CHECKING:  # lm_eval is imported lazily: it is slow to import
    from lm_eval.tasks import TaskManager

# Group YAMLs of this project (data, read by both lm-eval and `load_groups`).
TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval built-in task as we run it.

    name: lm-eval task name; builtin: its YAML, relative to `lm_eval/tasks/`; split: the split lm-eval evaluates
    (its `test_split`, else `validation_split`), which is also the file name expected under `--data-dir`;
    hub: dataset id and config on the Hugging Face hub (for docs and messages); metrics: what the YAML reports;
    data: the folder under `--data-dir` (default: the task's name; a built-in variant of a task, such as the
    generative `boolq-seq2seq`, reads its task's files).
    """

    name: str
    builtin: str
    split: str
    hub: str
    metrics: tuple[str, ...]
    data: str | None = None

    @property
    def folder(self) -> str:
        return self.data or self.name


_SPECS = [
    TaskSpec("arc_easy", "arc/arc_easy.yaml", "test", "allenai/ai2_arc (ARC-Easy)", ("acc", "acc_norm")),
    TaskSpec("arc_challenge", "arc/arc_challenge.yaml", "test", "allenai/ai2_arc (ARC-Challenge)", ("acc", "acc_norm")),
    TaskSpec("boolq", "super_glue/boolq/default.yaml", "validation", "aps/super_glue (boolq)", ("acc",)),
    TaskSpec("hellaswag", "hellaswag/hellaswag.yaml", "validation", "Rowan/hellaswag", ("acc", "acc_norm")),
    TaskSpec("openbookqa", "openbookqa/openbookqa.yaml", "test", "allenai/openbookqa (main)", ("acc", "acc_norm")),
    TaskSpec("piqa", "piqa/piqa.yaml", "validation", "baber/piqa", ("acc", "acc_norm")),
    TaskSpec("social_iqa", "siqa/siqa.yaml", "validation", "lighteval/siqa", ("acc",)),
    TaskSpec("winogrande", "winogrande/default.yaml", "validation", "allenai/winogrande (winogrande_xl)", ("acc",)),
    TaskSpec("race", "race/race.yaml", "test", "EleutherAI/race (high)", ("acc",)),
    TaskSpec("lambada_openai", "lambada/lambada_openai.yaml", "test", "EleutherAI/lambada_openai (default)",
             ("perplexity", "acc")),
    TaskSpec("sciq", "sciq/sciq.yaml", "test", "allenai/sciq", ("acc", "acc_norm")),
    TaskSpec("mc_taco", "mc_taco/default.yaml", "test", "CogComp/mc_taco", ("acc", "f1")),
    TaskSpec("anli_r1", "anli/anli_r1.yaml", "test_r1", "facebook/anli", ("acc",)),
    TaskSpec("anli_r2", "anli/anli_r2.yaml", "test_r2", "facebook/anli", ("acc",)),
    TaskSpec("anli_r3", "anli/anli_r3.yaml", "test_r3", "facebook/anli", ("acc",)),
    TaskSpec("truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml", "validation", "truthfulqa/truthful_qa (multiple_choice)",
             ("acc",)),
    # generative (generate_until) built-ins over the same files
    TaskSpec("boolq-seq2seq", "super_glue/boolq/seq2seq.yaml", "validation", "aps/super_glue (boolq)",
             ("exact_match",), data="boolq"),
]
TASKS: dict[str, TaskSpec] = {s.name: s for s in _SPECS}

# lm-eval tags that name several of our tasks (the built-in YAMLs declare them; offline YAMLs inherit them).
TAGS: dict[str, list[str]] = {"anli": ["anli_r1", "anli_r2", "anli_r3"], "ai2_arc": ["arc_easy", "arc_challenge"]}

_SPLIT_KEYS = ("training_split", "validation_split", "test_split")


def lm_eval_tasks_dir() -> Path:
    """The installed `lm_eval/tasks/` folder (holds the built-in YAMLs we `include:`)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def load_groups(tasks_dir: Path = TASKS_DIR) -> dict[str, list[str]]:
    """Group name -> member names (tasks or groups), read from the group YAMLs in `tasks_dir`."""
    groups: dict[str, list[str]] = {}
    for path in sorted(tasks_dir.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and "group" in cfg:
            groups[cfg["group"]] = [m if isinstance(m, str) else m["group"] for m in cfg["task"]]
    return groups


def split_task_list(value: str | Iterable[str]) -> list[str]:
    """`"a,b c"` or `["a,b", "c"]` -> `["a", "b", "c"]` (the CLI accepts both, as lm-eval does)."""
    items = [value] if isinstance(value, str) else list(value)
    return [t for item in items for t in item.replace(",", " ").split() if t]


def expand(names: Iterable[str], groups: dict[str, list[str]] | None = None) -> list[str]:
    """Leaf task names of `names` (groups and tags expanded recursively, order kept, duplicates dropped).

    Names that are neither one of our groups nor a known tag are returned as they are.
    """
    groups = load_groups() if groups is None else groups
    out: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in stack:
            raise UserError(f"group cycle: {' -> '.join(stack + (name,))}")
        members = groups.get(name) or TAGS.get(name)
        if members is None:
            if name not in out:
                out.append(name)
            return
        for m in members:
            visit(m, stack + (name,))

    for n in names:
        visit(n, ())
    return out


def task_file(data_dir: str | Path, task: str, split: str | None = None) -> Path:
    """Where `--data-dir` mode expects `task`'s `split` (default: the evaluated split): `DIR/<task>/<split>.jsonl`."""
    spec = TASKS.get(task)
    folder = spec.folder if spec is not None else task
    return Path(data_dir).expanduser().resolve() / folder / f"{split or TASKS[task].split}.jsonl"


def _unknown(name: str, known: Iterable[str], where: str) -> UserError:
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown task or group {name!r}{where}.{hint} Known: {', '.join(known)}")


def check_offline(names: Iterable[str], data_dir: str | Path) -> list[str]:
    """Validate task/group names for `--data-dir` mode; return the leaf tasks. Raises UserError naming the fix."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder (expected DIR/<task>/<split>.jsonl, see docs/tasks.md)")
    groups = load_groups()
    leaves = expand(names, groups)
    for t in leaves:
        if t not in TASKS:
            raise _unknown(t, list(TASKS) + list(groups) + list(TAGS), " in offline mode (--data-dir)")
    missing = [t for t in leaves if not task_file(data_dir, t).is_file()]
    if missing:
        lines = [f"  {task_file(data_dir, t)}  ({TASKS[t].hub}, split {TASKS[t].split})" for t in missing]
        raise UserError("--data-dir lacks the evaluated split of " + ", ".join(missing) + "; expected:\n"
                        + "\n".join(lines) + "\n(JSONL, one hub row per line with the hub's field names; "
                        "see docs/tasks.md)")
    return leaves


def _builtin_splits(spec: TaskSpec) -> dict[str, str | None]:
    """The split keys of the built-in YAML (includes resolved, `!function` left unresolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(lm_eval_tasks_dir() / spec.builtin, resolve_func=False)
    return {k: cfg.get(k) for k in _SPLIT_KEYS}


def offline_config(spec: TaskSpec, data_dir: str | Path) -> dict:
    """The overriding YAML (as a dict) that runs built-in task `spec` from `DIR/<task>/*.jsonl`.

    The evaluated split must exist; the built-in's other splits (few-shot sources) are kept when their file
    exists and set to null otherwise.
    """
    data_files: dict[str, str] = {}
    # Tags: only those whose members we all have (`anli`, `ai2_arc`); a built-in tag such as `truthfulqa` would
    # otherwise name a different task set offline than online.
    tags = [tag for tag, members in TAGS.items() if spec.name in members]
    cfg: dict = {"include": str(lm_eval_tasks_dir() / spec.builtin), "task": spec.name, "tag": tags or None,
                 "dataset_path": "json", "dataset_name": None}
    for key, split in _builtin_splits(spec).items():
        path = task_file(data_dir, spec.name, split) if split else None
        if split == spec.split or (path is not None and path.is_file()):
            data_files[split] = str(path)
            cfg[key] = split
        else:
            cfg[key] = None
    if spec.split not in data_files:  # the table disagrees with lm-eval's YAML: a version drift
        raise RuntimeError(f"lm-eval's {spec.builtin} no longer evaluates split {spec.split!r}; update prime_eval.tasks")
    cfg["dataset_kwargs"] = {"data_files": data_files}
    return cfg


def _default_cache_dir(data_dir: Path) -> Path:
    root = Path(os.environ.get("PRIME_EVAL_CACHE", Path.home() / ".cache" / "prime-eval"))
    key = hashlib.sha1(f"{data_dir}\n{lm_eval_tasks_dir()}".encode()).hexdigest()[:12]
    return root / "offline_tasks" / key


def task_yaml(config: dict, comment: str | None = None) -> str:
    """The text of an lm-eval task YAML: `# comment` lines, then `config` in its key order (`yaml.safe_dump`, so
    any string, path or null round-trips). The one place this project writes task YAML."""
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    return head + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def write_task_yaml(path: str | Path, config: dict, comment: str | None = None) -> Path:
    """Write `task_yaml(config, comment)` to `path` atomically; a file that already holds that text is left as it
    is (concurrent runs may share the folder). Returns the path."""
    path, text = Path(path), task_yaml(config, comment)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


def check_jsonl(path: str | Path) -> None:
    """Every non-blank line of `path` is one JSON object, and there is at least one: else a UserError naming the
    file and the line (datasets would fail later with several chained pyarrow tracebacks)."""
    path, rows = Path(path), 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}, line {n}: not UTF-8 ({e.reason}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}); each line must be "
                                "one JSON object (fix or delete that line)") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {n}: a JSON {type(row).__name__}, not an object; each line must be "
                                "one JSON object with the hub's field names (docs/tasks.md)")
            rows += 1
    if rows == 0:
        raise UserError(f"{path} holds no documents; put one JSON object per line (docs/tasks.md)")


def write_offline_tasks(data_dir: str | Path, tasks: Iterable[str] | None = None,
                        cache_dir: str | Path | None = None) -> Path:
    """Write one overriding YAML for every known task whose evaluated split is present under `data_dir` into
    `cache_dir` (default: a folder per data dir under `$PRIME_EVAL_CACHE`, else `~/.cache/prime-eval`); return it.

    `tasks`: names or groups that must be runnable; they are checked first (`check_offline`: a missing file fails
    with its expected path; `check_jsonl` on each of their files: a malformed line fails with its file and line).
    The folder's content depends only on `data_dir`, so concurrent runs on the same data dir can share it (files
    are replaced atomically).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if tasks is not None:
        for t in check_offline(tasks, data_dir):
            for f in offline_config(TASKS[t], data_dir)["dataset_kwargs"]["data_files"].values():
                check_jsonl(f)
    elif not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder (expected DIR/<task>/<split>.jsonl, see docs/tasks.md)")
    available = [t for t in TASKS if task_file(data_dir, t).is_file()]
    out = Path(cache_dir) if cache_dir is not None else _default_cache_dir(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in available:
        write_task_yaml(out / f"{t}.yaml", offline_config(TASKS[t], data_dir),
                        "generated by prime_eval.tasks.write_offline_tasks; do not edit")
    for stale in set(out.glob("*.yaml")) - {out / f"{t}.yaml" for t in available}:
        stale.unlink(missing_ok=True)  # a task whose file has since been removed from data_dir
    return out


def build_task_manager(data_dir: str | Path | None = None, tasks: Iterable[str] | None = None,
                       include_path: str | Path | Iterable[str | Path] | None = None,
                       cache_dir: str | Path | None = None) -> TaskManager:
    """The lm-eval TaskManager for our tasks and groups.

    Online (`data_dir=None`): lm-eval's built-ins plus `tasks/` (the groups); data come from the hub.
    Offline: only the generated YAMLs of `write_offline_tasks(data_dir, tasks)` plus `tasks/`; `tasks` (names or
    groups) are validated first, so a missing file fails here with its expected path.
    `include_path`: extra folders of user YAMLs (as lm-eval's `--include_path`).
    """
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, Path)) else list(include_path))
    if data_dir is None:
        return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], include_defaults=True)
    folder = write_offline_tasks(data_dir, tasks, cache_dir)
    return TaskManager(include_path=[str(folder), str(TASKS_DIR), *map(str, extra)], include_defaults=False)


def resolve_tasks(names: Iterable[str], task_manager: TaskManager, data_dir: str | Path | None = None) -> list[str]:
    """Check that every name is a task, group or tag `task_manager` knows and that no task is requested twice
    (lm-eval refuses that); return the names unchanged. Offline, `check_offline` reports missing files first.
    """
    names = list(names)
    if not names:
        raise UserError("no tasks given: pass --tasks, e.g. --tasks commonsense or --tasks piqa,arc_easy")
    if data_dir is not None:
        check_offline(names, data_dir)
    known = set(task_manager.all_tasks)
    for n in names:
        if n not in known:
            if data_dir is not None or len(known) < 200:
                raise _unknown(n, known, "")
            close = difflib.get_close_matches(n, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown task or group {n!r}.{hint} Ours: {', '.join(list(TASKS) + list(load_groups()))}"
                            "; `lm-eval ls tasks` lists all of lm-eval's")
    seen: dict[str, str] = {}
    for n in names:
        for leaf in expand([n]):
            if leaf in seen and seen[leaf] != n:
                raise UserError(f"task {leaf!r} is requested twice (by {seen[leaf]!r} and {n!r}); lm-eval runs a "
                                "task once per run: run these in separate commands")
            seen[leaf] = n
    return names
