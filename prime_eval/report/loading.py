"""Loading: run files → rows (one row = one run, `run_identity`) and perplexity results (one ppl JSON = one row).

Reads lm-eval results JSONs (ours or anyone's), notes which samples logs (`samples_<task>_<date>.jsonl`) and
per-request statistics (`stats_<task>_<date>.jsonl`) lie next to them, and reads perplexity JSONs
(`"kind": "prime-eval/ppl"`). Runs that left statistics or samples but no results covering a task are "failed".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from prime_eval import bound_kind as BK
from prime_eval.errors import UserError
from prime_eval.report import kinds
from prime_eval.report.conventions import FAILED, INCOMPATIBLE
from prime_eval.report.files import DATED, common_root, discover, first_row, rel
from prime_eval.report.run_identity import (RunIdentity, disagreements, distinguish, estimator_label, flat,
                                            same_number)


@dataclass
class TaskResult:
    """One (run, task) cell before formatting. Values are fractions in [0, 1]."""
    task: str
    metrics: dict = field(default_factory=dict)      # metric -> (value, stderr | None)
    n: int | None = None
    status: str = "ok"                               # ok | failed | incompatible
    reason: str | None = None
    source: str = ""
    samples: Path | None = None
    stats: list[Path] = field(default_factory=list)  # candidate stats files of this task in the run folder
    delimiter: str = " "
    date: float = 0.0
    output_type: str | None = None                   # lm-eval's: multiple_choice, loglikelihood (is_greedy acc), ...


class _Row:
    """What a run's row and a ppl row share: a label (`base` + the distinguishing `suffix`), a table section."""

    @property
    def display(self) -> str:
        return self.base + self.suffix

    @property
    def section(self) -> str:
        return kinds.section(self.kind)


@dataclass
class ModelRun(_Row):
    """One row: one run (`run_identity`), merged only with re-runs of the identical configuration and numbers."""
    name: str
    family: str = "other"
    params: float | None = None
    flops: float | None = None
    label: str | None = None                         # from --meta
    model_type: str | None = None                    # lm-eval's config.model
    checkpoint: str | None = None                    # content hash (or path / hub id)
    settings: dict = field(default_factory=dict)
    kind: str = BK.EXACT                             # prime_eval.bound_kind
    estimator: str | None = None
    num_samples: int | None = None
    estimator_label: str = ""                        # "mc, K=4", "exact_count, K≤128", "exact"
    setting: str = ""                                # not-a-likelihood setting, e.g. "cfg=1.5"
    tasks: dict = field(default_factory=dict)        # task -> TaskResult
    dirs: set = field(default_factory=set)
    sources: list = field(default_factory=list)      # results files merged into this row
    stamp: str = ""                                  # date of the (first) run: the last resort to tell rows apart
    suffix: str = ""                                 # distinguishing label (run_identity.distinguish)
    notes: list = field(default_factory=list)        # row footnotes (re-runs that disagree)
    key: str = ""

    @property
    def base(self) -> str:
        base = self.label or self.name
        return f"{base} ({self.setting})" if self.setting else base


@dataclass
class PplResult(_Row):
    """One perplexity JSON (or several with the identical configuration and numbers)."""
    name: str
    family: str
    params: float | None
    flops: float | None
    dataset: str
    estimator: str
    kind: str
    nll: float
    nll_se: float
    tokens: int | None
    source: str
    label: str | None = None
    num_samples: int | None = None
    estimator_label: str = ""
    se_method: str = ""                              # what nll_stderr covers (the ppl JSON's nll_stderr_method)
    checkpoint: str | None = None
    settings: dict = field(default_factory=dict)
    model_type: str = "ppl"
    stamp: str = ""
    suffix: str = ""
    notes: list = field(default_factory=list)
    key: str = ""

    @property
    def base(self) -> str:
        return self.label or self.name


@dataclass
class Collection:
    runs: list[ModelRun]
    ppl: list[PplResult]
    notes: list[str]
    root: Path


def num(x) -> float | None:
    """A finite float, else None (bools, strings like "N/A", NaN)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _setting_tag(pe: dict, kind: str) -> str:
    """Label of a not-a-likelihood setting: legacy_joint, cfg=…, T=… (or "<estimator>, not a likelihood")."""
    if kind != BK.NOT_A_LIKELIHOOD:
        return ""
    parts = []
    if pe.get("estimator") == "legacy_joint":
        parts.append("legacy_joint")
    cfg = pe.get("cfg")
    if cfg not in (None, 0, 0.0, False):
        parts.append(f"cfg={cfg:g}" if isinstance(cfg, (int, float)) else f"cfg={cfg}")
    temp = pe.get("temperature")
    if temp not in (None, 1, 1.0):
        parts.append(f"T={temp:g}" if isinstance(temp, (int, float)) else f"T={temp}")
    return ", ".join(parts) or f"{pe.get('estimator') or 'estimator'}, not a likelihood"


def load(paths: Iterable[str | Path], meta: dict | None = None) -> Collection:
    """Discover and parse all run files under `paths` into rows (ModelRun) and perplexity results."""
    meta = meta or {}
    files = discover(paths)
    if not files:
        raise UserError("no .json/.jsonl files found in the given paths: pass lm-eval --output_path folders")
    root = common_root(files)
    notes: list[str] = []
    records: list[ModelRun] = []
    ppl: list[PplResult] = []
    dated: dict[Path, list[tuple[str, str, str, Path]]] = {}  # dir -> (kind, task, date, path)
    for f in files:
        m = DATED.match(f.name) if f.suffix == ".jsonl" else None
        if m:
            dated.setdefault(f.parent, []).append((m.group(1), m.group(2), m.group(3), f))
    for f in files:
        if f.suffix != ".json":
            continue
        try:
            obj = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"skipped {rel(f, root)}: not readable JSON ({type(e).__name__})")
            continue
        if not isinstance(obj, dict):
            continue
        try:
            if obj.get("kind") == "prime-eval/ppl":
                r = _load_ppl(obj, f, root, meta, notes)
                if r:
                    ppl.append(r)
            elif "results" in obj:
                if not isinstance(obj["results"], dict) or not all(isinstance(v, dict) for v in obj["results"].values()):
                    notes.append(f"skipped {rel(f, root)}: 'results' is not a mapping of task -> metrics "
                                 "(not an lm-eval results file?)")
                    continue
                records.append(_record(obj, f, root, meta, dated.get(f.parent, [])))
            # else: some other JSON (a config, a tokenizer file ...)
        except ValueError as e:  # an unknown bound_kind label (bound_kind.normalise)
            notes.append(f"skipped {rel(f, root)}: {e}")
    covered: dict[Path, set] = {}
    for rec in records:
        for d in rec.dirs:
            covered.setdefault(d, set()).update(rec.tasks)
    runs = _merge(records, notes)
    _attach_leftovers(runs, dated, covered, root, meta)
    distinguish(runs)
    ppl = _merge(ppl, notes)
    distinguish(ppl, scope=lambda r: r.dataset)
    return Collection(runs=runs, ppl=ppl, notes=notes, root=root)


def _record(obj: dict, f: Path, root: Path, meta: dict, dated: list) -> ModelRun:
    """One results JSON as a row of its own (merged later, `_merge`)."""
    cfg = obj.get("config") or {}
    pe = cfg.get("prime_eval") or {}
    ident = RunIdentity.of_results(obj, f)
    tasks = _parse_results(obj, f, root, dated)
    stats = next((p for tr in tasks for p in tr.stats), None)
    kind = kinds.of_run(pe, first_row(stats) if stats else None)
    m = meta.get(ident.name) or meta.get(f.parent.name) or {}
    date_id = f.stem[len("results_"):] if f.stem.startswith("results_") else f.name
    return ModelRun(
        name=ident.name, family=m.get("family") or str(pe.get("family") or "other").lower(),
        params=m.get("params") or num(pe.get("params")) or num(cfg.get("model_num_parameters")),
        flops=m.get("flops") or num(pe.get("flops")), label=m.get("label"), model_type=ident.model_type,
        checkpoint=ident.checkpoint, settings=ident.settings, kind=kind, estimator=pe.get("estimator"),
        num_samples=pe.get("num_samples"), estimator_label=estimator_label(pe, ident.model_type),
        setting=_setting_tag(pe, kind), tasks={tr.task: tr for tr in tasks}, dirs={f.parent},
        sources=[rel(f, root)], stamp=date_id, key=ident.key)


def _merge(records: list, notes: list) -> list:
    """Rows from records with the same identity key are merged when their numbers agree on every shared task (ppl:
    on nll, its SE and the token count); otherwise both stay, each with a footnote, and the report gets a note."""
    rows: list = []
    by_key: dict[str, list] = {}
    for rec in sorted(records, key=lambda r: (r.stamp, _sources(r))):
        same = by_key.setdefault(rec.key, [])
        diffs = {id(row): _differences(row, rec) for row in same}
        into = next((row for row in same if not diffs[id(row)]), None)
        if into is not None:
            notes.append(_merge_note(into, rec))
            _absorb(into, rec)
            continue
        for row in same:
            text = (f"{rec.base}: {_sources(row)} and {_sources(rec)} have the identical configuration but different "
                    f"numbers ({'; '.join(diffs[id(row)])}): both are shown, labelled by run; a nondeterministic "
                    "run, or changed code or data?")
            notes.append(text)
            row.notes.append(text)
            rec.notes.append(text)
        same.append(rec)
        rows.append(rec)
    return rows


def _merge_note(into, rec) -> str:
    """What merging `rec` into `into` means for the reader: a repeat (the same numbers on shared tasks), or a run of
    the same configuration on other tasks (lm-eval runs split by task), or both."""
    if isinstance(rec, PplResult):
        return f"{rec.base}: {_sources(rec)} repeats {_sources(into)} (identical configuration and numbers): shown as one row"
    shared, added = sorted(set(rec.tasks) & set(into.tasks)), sorted(set(rec.tasks) - set(into.tasks))
    parts = [f"repeats {_sources(into)} on {', '.join(shared)} (identical configuration and numbers)"] if shared else []
    parts += [f"adds {', '.join(added)} to {_sources(into)} (the same configuration)"] if added else []
    return f"{rec.base}: {_sources(rec)} {' and '.join(parts)}: shown as one row"


def _differences(row, rec) -> list[str]:
    if isinstance(rec, PplResult):
        if row.tokens == rec.tokens and same_number(row.nll, rec.nll) and same_number(row.nll_se, rec.nll_se):
            return []
        return [f"nll {row.nll} ± {row.nll_se} on {row.tokens} tokens vs {rec.nll} ± {rec.nll_se} on {rec.tokens}"]
    return disagreements(row.tasks, rec.tasks)


def _absorb(row, rec) -> None:
    """Merge `rec` into `row` (same configuration, same numbers)."""
    if isinstance(rec, PplResult):
        row.source = f"{row.source}; {rec.source}"
        return
    for task, tr in rec.tasks.items():
        old = row.tasks.get(task)
        if old is None or (old.status != "ok" and tr.status == "ok"):
            row.tasks[task] = tr
    row.dirs |= rec.dirs
    row.sources += rec.sources


def _sources(row) -> str:
    return row.source if isinstance(row, PplResult) else ", ".join(row.sources)


def _attach_leftovers(runs: list[ModelRun], dated: dict, covered: dict, root: Path, meta: dict) -> None:
    """Statistics or samples on disk for a task that no results file in their folder reports: a failed run.
    `covered`: folder -> tasks its results files report."""
    for d, entries in dated.items():
        owners = [r for r in runs if d in r.dirs]
        for kind, task, date, path in entries:
            if task in covered.get(d, set()):
                continue
            run = owners[0] if owners else None
            if kind == "stats" and owners:
                row = first_row(path)
                try:
                    k = kinds.of_stats_row(row, owners[0].family)
                except ValueError:
                    k = None
                match = [r for r in owners if r.kind == k and r.estimator == row.get("estimator")] \
                    or [r for r in owners if r.kind == k]
                run = match[0] if match else owners[0]
            if run is None:
                m = meta.get(d.name) or {}
                run = ModelRun(name=d.name, family=m.get("family", "other"), params=m.get("params"),
                               flops=m.get("flops"), label=m.get("label"), estimator_label="not recorded",
                               dirs={d}, stamp=d.name, key=f"leftover:{d}")
                runs.append(run)
                owners = [run]
            what = f"{kind} file {rel(path, root)}"
            old = run.tasks.get(task)
            if old is None:
                run.tasks[task] = TaskResult(task=task, status="failed", source=rel(path, root),
                                             reason=FAILED.format(what=what))
            elif old.status == "failed" and old.reason and " on disk but no results" in old.reason:
                listed = old.reason[len("run failed: "):].split(" on disk")[0]  # several leftover files
                old.reason = FAILED.format(what=f"{listed}, {what}")


def _parse_results(obj: dict, f: Path, root: Path, dated: list) -> list[TaskResult]:
    src = rel(f, root)
    results = obj.get("results") or {}
    groups = set((obj.get("groups") or {}).keys())
    groups |= {g for g, subs in (obj.get("group_subtasks") or {}).items() if subs}
    date_id = f.stem[len("results_"):] if f.stem.startswith("results_") else None
    out = []
    configs = obj.get("configs") or {}
    nsamp = obj.get("n-samples") or {}
    date = num(obj.get("date")) or 0.0
    for task, metrics in results.items():
        if task in groups or not isinstance(metrics, dict):
            continue
        tr = TaskResult(task=task, source=src, date=date)
        keys = [k for k in metrics if k not in ("alias", "name", "sample_len", " ")]
        if keys and not any("," in k for k in keys):
            tr.status, tr.reason = "incompatible", INCOMPATIBLE.format(src=src)
            out.append(tr)
            continue
        for k, v in metrics.items():
            if "," not in k or "_stderr" in k:
                continue
            metric, filt = k.split(",", 1)
            if filt != "none" and f"{metric},none" in metrics:
                continue
            tr.metrics[metric] = (num(v), num(metrics.get(f"{metric}_stderr,{filt}")))
        n = (nsamp.get(task) or {}).get("effective") if isinstance(nsamp.get(task), dict) else None
        tr.n = int(n) if n else (int(metrics["sample_len"]) if num(metrics.get("sample_len")) else None)
        task_cfg = configs.get(task) or {}
        tr.delimiter = task_cfg.get("target_delimiter", " ")
        tr.output_type = task_cfg.get("output_type")
        if not any(v is not None for v, _ in tr.metrics.values()):
            tr.status, tr.reason = "failed", f"run failed: no finite metric for this task in {src}"
        cands = [(kind, date_, p) for kind, t, date_, p in dated if t == task]
        samples = sorted((p for kind, d_, p in cands if kind == "samples"), key=lambda p: (date_id not in p.name, p.name))
        tr.samples = samples[0] if samples else None
        tr.stats = sorted(p for kind, _, p in cands if kind == "stats")
        out.append(tr)
    for task in configs:
        if task not in results and task not in groups:
            out.append(TaskResult(task=task, status="failed", source=src, date=date,
                                  reason=f"run failed: {src} configures this task but reports no result"))
    return out


# ppl JSON fields that never change a number (or are identified otherwise: the checkpoint by its hash)
_PPL_BOOKKEEPING = {"name", "checkpoint", "checkpoint_sha256", "params", "device", "family", "batch_size", "files"}


def _load_ppl(obj: dict, f: Path, root: Path, meta: dict, notes: list) -> PplResult | None:
    src = rel(f, root)
    model, proto, res = obj.get("model") or {}, obj.get("protocol") or {}, obj.get("results") or {}
    nll, se = num(res.get("nll")), num(res.get("nll_stderr"))
    if nll is None or se is None or not (obj.get("bound_kind") or isinstance(obj.get("is_bound"), bool)):
        notes.append(f"skipped {src}: a prime-eval/ppl file without results.nll, results.nll_stderr or bound_kind "
                     f"(written by an incompatible prime-eval version?)")
        return None
    name = str(model.get("name") or f.stem)
    m = meta.get(name, {})
    estimator = str(proto.get("estimator") or "?")
    family = m.get("family") or str(model.get("family") or "other").lower()
    dataset = str(proto.get("dataset") or "?") + (f"/{proto['split']}" if proto.get("split") else "")
    kind = kinds.of_ppl(obj)
    k = proto.get("num_samples")
    settings = {f"protocol.{key}": v for key, v in flat(proto).items() if key.split(".")[0] not in _PPL_BOOKKEEPING}
    settings.update({f"model.{key}": v for key, v in flat(model).items() if key.split(".")[0] not in _PPL_BOOKKEEPING})
    checkpoint = model.get("checkpoint_sha256") or model.get("checkpoint")
    key = json.dumps([name, checkpoint, dataset, kind, settings], sort_keys=True, default=str)
    deterministic = kind == BK.EXACT or k in (None, 1)
    return PplResult(name=name, family=family, params=m.get("params") or num(model.get("params")),
                     flops=m.get("flops"), dataset=dataset, estimator=estimator, kind=kind, nll=nll, nll_se=se,
                     tokens=res.get("tokens"), source=src, label=m.get("label"), num_samples=k,
                     estimator_label=estimator if deterministic else f"{estimator}, K={k}",
                     se_method=str(res.get("nll_stderr_method") or ""),
                     checkpoint=None if checkpoint is None else str(checkpoint), settings=settings, stamp=f.name,
                     key=key)
