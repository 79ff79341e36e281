"""Report builder: comparison tables of model families with honest 95% intervals, from results files only.

Reads lm-eval results JSONs (ours or anyone's), lm-eval samples logs (`samples_<task>_<date>.jsonl`), our per-request
statistics (`stats_<task>_<date>.jsonl`) and perplexity JSONs (`"kind": "prime-eval/ppl"`), as laid out in
docs/ARCHITECTURE.md, and renders Markdown, CSV, LaTeX (booktabs), a self-contained HTML page with PNG plots, and rich
tables on the console. It never imports torch or a model: reports can be rebuilt anywhere from the files.

Tables
------
- Zero-shot accuracy: rows = models grouped by family (ARM, MDM, MDM-Prime, other), columns = tasks and their average,
  cells = accuracy in percent ± the half-width of a 95% interval. Results computed with `legacy_joint`, classifier-free
  guidance or a temperature (run config `is_bound: false`, `cfg` not 0, `temperature` not 1) go to a separate table:
  they are not likelihoods and are never mixed with likelihood-based rows.
- Paired comparisons: accuracy differences of two models on the same documents, with a paired interval; † marks a
  95% interval that excludes 0.
- Perplexity: per dataset, NLL (nats/token) and PPL with 95% intervals, "≤" when the value is an upper bound on the
  true NLL (diffusion ELBOs). Non-bounds (legacy_joint) again get their own table.
- The best value per column and table is bold (highest accuracy, lowest NLL/PPL). Missing cells read "—" with a
  lettered footnote: task not run, run failed (statistics or samples on disk but no results), incompatible lm-eval
  version (results JSON without lm-eval >= 0.4 keys), metric missing.

acc or acc_norm (per task; `--metric TASK=METRIC` overrides; the CSV always holds the chosen metric per task)
------------------------------------------------------------------------------------------------------------
lm-eval's `acc` takes the argmax of the summed continuation log-likelihood; `acc_norm` divides it by the character
length of the choice first. Length normalisation matters where the choices are free-form sentences of very different
lengths, since a longer continuation collects more negative log-probability whatever its meaning:

    hellaswag       acc_norm   endings are full sentences of varying length (GPT-3 paper, Open LLM Leaderboard, Mamba)
    arc_challenge   acc_norm   adversarially filtered; long distractors (Open LLM Leaderboard, Mamba, Pythia tables)
    openbookqa      acc_norm   free-form answers of varying length (LLaMA/TinyLlama-style tables)
    piqa            acc_norm   two long solutions; the LLaMA/TinyLlama/SMDM line of tables reports acc_norm
    arc_easy        acc        short answers; Mamba, Pythia and most diffusion-LM tables report plain acc
    boolq, winogrande, social_iqa, race, lambada_openai    acc    (lm-eval defines only acc for these; winogrande
                    scores a shared continuation, so normalising by length would change nothing)

Tasks not listed use `acc` when present, else the first metric lm-eval reports. Note that adapters returning a
per-token mean (as some diffusion repos do) make `acc` already length-normalised; ours return sums, as lm-eval expects.

Intervals (all 95%, z = 1.959964; the math lives in small pure functions below, each with its formula)
-------------------------------------------------------------------------------------------------------
- Dataset error: lm-eval's `<metric>_stderr` = sd(c, ddof=1)/√n over per-document correctness c ∈ {0, 1}; when lm-eval
  wrote "N/A" we use the identical closed form √(p(1−p)/(n−1)).
- Monte Carlo error (only with per-request statistics and a samples log): each log-likelihood ŝ_ij is an MC mean with
  standard error σ_ij. Normal approximation, plug-in: a re-run would give s_ij ~ N(ŝ_ij, σ_ij²) independently, so the
  document is scored correct with probability q_i = P(argmax_j s_ij = gold) (closed form Φ(Δ/√(σ_g²+σ_o²)) for two
  choices, a deterministic 1-D integral otherwise, see `prob_correct`). Documents are independent, so the MC variance
  of the accuracy is Var_MC = Σ_i q_i(1−q_i) / n². No random numbers: the result is reproducible without a seed.
- Combined: SE = √(SE_data² + Var_MC). This is conservative: with independent per-document MC noise, the Bernoulli
  dataset SE already contains part of the MC variance (at most a factor √2 too wide); we prefer an interval that
  does not hide seed-to-seed variation, and the CSV reports both parts separately.
- Average over T tasks: SE_avg = √(Σ_t SE_t²)/T (tasks are independent samples).
- Paired difference of models A and B on the n shared documents (same doc_id and doc_hash): d_i = c_A,i − c_B,i,
  SE = √(sd(d, ddof=1)²/n + Var_MC,A + Var_MC,B); the MC noise of the two models is independent.
- Perplexity: the NLL interval is nll ± z·SE from the ppl JSON; PPL = exp(NLL), so its interval is exp of the NLL
  interval (monotone transform; asymmetric around PPL).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from prime_eval.errors import UserError

Z95 = 1.959963984540054  # Φ⁻¹(0.975)

PREFERRED_METRIC = {
    "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm", "piqa": "acc_norm",
    "arc_easy": "acc", "boolq": "acc", "winogrande": "acc", "social_iqa": "acc", "race": "acc",
    "lambada_openai": "acc",
}
TASK_ORDER = ["lambada_openai", "arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "social_iqa",
              "winogrande", "race"]
TASK_LABEL = {"lambada_openai": "LAMBADA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "boolq": "BoolQ",
              "hellaswag": "HellaSwag", "openbookqa": "OBQA", "piqa": "PIQA", "social_iqa": "SIQA",
              "winogrande": "WinoGrande", "race": "RACE"}
FAMILY_ORDER = ["arm", "mdm", "prime", "other"]
FAMILY_LABEL = {"arm": "ARM", "mdm": "MDM", "prime": "MDM-Prime", "other": "Other"}
EXACT_ESTIMATORS = {"ar", "arm", "exact", "teacher_forcing"}  # NLL is exact, not only a bound: no "≤"
FORMATS = ("md", "csv", "tex", "html")

# Footnote texts (one place, so the renderers and tests agree).
NOT_RUN = "task not run for this model"
FAILED = "run failed: {what} on disk but no results JSON reports this task"
INCOMPATIBLE = ("incompatible lm-eval version in {src}: metric keys lack the ',none' filter suffix that lm-eval 0.4+ "
                "writes; re-run with lm-eval 0.4 or later")
NO_METRIC = "{metric} missing from the results of this task"
NO_AVG = "average needs every task of the table"


# ----------------------------------------------------------------------------------------------------------------
# Interval arithmetic (pure functions)
# ----------------------------------------------------------------------------------------------------------------

def normal_cdf(x):
    """Φ(x) = ½(1 + erf(x/√2)), vectorised; erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), numpy only."""
    x = np.asarray(x, dtype=np.float64)
    y = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * y)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-y * y)
    return 0.5 * (1.0 + np.sign(x) * erf)


def ci95(value: float, se: float) -> tuple[float, float]:
    """Normal 95% interval: value ± z·se with z = Φ⁻¹(0.975) = 1.959964."""
    return value - Z95 * se, value + Z95 * se


def binomial_se(p: float, n: int) -> float:
    """SE of a mean of n zeros and ones with mean p, as lm-eval computes it: sd(ddof=1)/√n = √(p(1−p)/(n−1))."""
    if n < 2:
        return float("nan")
    return math.sqrt(max(p * (1.0 - p), 0.0) / (n - 1))


def combine_se(*ses: float) -> float:
    """Independent error sources add in variance: SE = √(Σ SE_k²)."""
    return math.sqrt(sum(s * s for s in ses))


def average_se(ses: Sequence[float]) -> float:
    """SE of the mean of T independent estimates: √(Σ_t SE_t²)/T."""
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


_U_NODES = 2048  # midpoint rule in u = Φ(z): error ≤ 1/_U_NODES even for step-shaped integrands


def _probit_nodes(m: int = _U_NODES) -> np.ndarray:
    from statistics import NormalDist

    inv = NormalDist().inv_cdf
    return np.array([inv((k + 0.5) / m) for k in range(m)])


_Z_NODES = None


def prob_correct(scores: Sequence[float], ses: Sequence[float], gold: int) -> float:
    """q = P(argmax_j S_j = gold) for independent S_j ~ N(scores_j, ses_j²).

    Two choices: q = Φ((s_g − s_o)/√(σ_g² + σ_o²)).
    More: q = E_z[Π_{j≠g} Φ((s_g + σ_g z − s_j)/σ_j)], z ~ N(0, 1), integrated by the midpoint rule in u = Φ(z)
    (z_k = Φ⁻¹((k+½)/M), M = 2048), with Φ(·/0) read as the step 1[· > 0].
    All σ = 0: q = 1 if gold is the (first) argmax, as lm-eval breaks ties, else 0.
    """
    global _Z_NODES
    s = np.asarray(scores, dtype=np.float64)
    sd = np.asarray(ses, dtype=np.float64)
    others = np.arange(len(s)) != gold
    if not np.any(sd > 0):
        return 1.0 if int(np.argmax(s)) == gold else 0.0
    if len(s) == 2:
        o = int(np.flatnonzero(others)[0])
        return float(normal_cdf((s[gold] - s[o]) / math.hypot(sd[gold], sd[o])))
    if _Z_NODES is None:
        _Z_NODES = _probit_nodes()
    xg = s[gold] + sd[gold] * _Z_NODES  # (M,)
    prod = np.ones_like(xg)
    for j in np.flatnonzero(others):
        diff = xg - s[j]
        prod *= normal_cdf(diff / sd[j]) if sd[j] > 0 else (diff > 0).astype(np.float64)
    return float(prod.mean())


def mc_variance(q: Sequence[float]) -> float:
    """MC variance of an accuracy over n documents scored correct with probabilities q_i: Σ q_i(1−q_i) / n²."""
    q = np.asarray(q, dtype=np.float64)
    return float(np.sum(q * (1.0 - q)) / len(q) ** 2) if len(q) else 0.0


def paired_difference(correct_a: Sequence[float], correct_b: Sequence[float], mc_var_a: float = 0.0,
                      mc_var_b: float = 0.0) -> tuple[float, float, float, float]:
    """Paired accuracy difference on the same n documents: (d̄, SE, lo, hi).

    d_i = a_i − b_i, d̄ = mean(d), SE = √(sd(d, ddof=1)²/n + Var_MC,A + Var_MC,B), [lo, hi] = d̄ ± z·SE.
    """
    d = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    n = len(d)
    if n < 2:
        raise ValueError("a paired difference needs at least 2 shared documents")
    mean = float(d.mean())
    se = math.sqrt(float(d.var(ddof=1)) / n + mc_var_a + mc_var_b)
    lo, hi = ci95(mean, se)
    return mean, se, lo, hi


def excludes_zero(lo: float, hi: float) -> bool:
    """True when the interval [lo, hi] lies strictly on one side of 0."""
    return lo > 0 or hi < 0


def ppl_interval(nll: float, nll_se: float) -> tuple[float, float, float]:
    """PPL = exp(NLL) and its 95% interval exp(NLL ± z·SE) (exp is monotone, so coverage carries over)."""
    lo, hi = ci95(nll, nll_se)
    return math.exp(nll), math.exp(lo), math.exp(hi)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TaskResult:
    """One (model setting, task) cell before formatting. Values are fractions in [0, 1]."""
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


@dataclass
class ModelRun:
    """One row: a model under one scoring setting (likelihood-based or not), merged over its results files."""
    name: str
    family: str = "other"
    params: float | None = None
    flops: float | None = None
    label: str | None = None
    estimator: str | None = None
    num_samples: int | None = None
    likelihood: bool = True
    setting: str = ""                                # e.g. "cfg=1.5" for the separate section
    tasks: dict = field(default_factory=dict)        # task -> TaskResult
    dirs: set = field(default_factory=set)

    @property
    def display(self) -> str:
        base = self.label or self.name
        return f"{base} ({self.setting})" if self.setting else base


@dataclass
class PplResult:
    name: str
    family: str
    params: float | None
    flops: float | None
    dataset: str
    estimator: str
    is_bound: bool
    exact: bool
    nll: float
    nll_se: float
    tokens: int | None
    source: str
    label: str | None = None


@dataclass
class Collection:
    runs: list[ModelRun]
    ppl: list[PplResult]
    notes: list[str]
    root: Path


def load_meta(path: str | Path | None) -> dict:
    """Model metadata from YAML (mapping name -> {family, params, flops, label}, or a list of such with `name`)
    or CSV (columns name, family, params, flops, label; extra columns ignored). Returns name -> dict."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"metadata file {p} not found: pass a YAML or CSV with one entry per model (name, family, params)")
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        import yaml

        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"metadata file {p} is not valid YAML: {e}") from None
        if isinstance(data, dict) and "models" in data and isinstance(data["models"], (list, dict)):
            data = data["models"]
        rows = [{"name": k, **(v or {})} for k, v in data.items()] if isinstance(data, dict) else list(data)
    meta = {}
    for row in rows:
        if not isinstance(row, dict) or not row.get("name"):
            raise UserError(f"metadata file {p}: every entry needs a 'name' (got {row!r})")
        entry = {}
        for key in ("family", "label"):
            if row.get(key) not in (None, ""):
                entry[key] = str(row[key]).strip()
        for key in ("params", "flops"):
            if row.get(key) not in (None, ""):
                try:
                    entry[key] = float(row[key])
                except (TypeError, ValueError):
                    raise UserError(f"metadata file {p}: {key} of {row['name']} is not a number: {row[key]!r}") from None
        if "family" in entry:
            entry["family"] = entry["family"].lower()
        meta[str(row["name"]).strip()] = entry
    return meta


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """All *.json / *.jsonl files given directly or found (recursively) under the given folders, sorted."""
    files = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files += [q for q in p.rglob("*") if q.is_file() and q.suffix in (".json", ".jsonl")
                      and not any(part.startswith(".prime-eval-staging-") for part in q.relative_to(p).parts)]
            # (staging folders hold files of a run still writing, or killed while writing: prime_eval.io)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist: pass lm-eval output folders, results JSONs or ppl JSONs")
    return sorted(set(f.resolve() for f in files))


_DATED = re.compile(r"^(samples|stats)_(.+)_([^_]+)\.jsonl$")


def _common_root(files: list[Path]) -> Path:
    if not files:
        return Path(".")
    parents = [f.parent for f in files]
    root = Path(*Path(parents[0]).parts)
    while not all(root == p or root in p.parents for p in parents):
        root = root.parent
    return root


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _model_name(res: dict, path: Path) -> str:
    cfg = res.get("config") or {}
    pe = cfg.get("prime_eval") or {}
    if pe.get("model_name"):
        return str(pe["model_name"])
    args = cfg.get("model_args")
    if isinstance(args, str):
        m = re.search(r"(?:^|,)\s*pretrained=([^,]+)", args)
        if m:
            return m.group(1).rstrip("/").split("/")[-1]
    elif isinstance(args, dict) and args.get("pretrained"):
        return str(args["pretrained"]).rstrip("/").split("/")[-1]
    if res.get("model_name"):
        return str(res["model_name"]).rstrip("/").split("/")[-1]
    model = cfg.get("model")
    if isinstance(model, str) and "/" in model:
        return model.rstrip("/").split("/")[-1]
    return path.parent.name


def _setting(pe: dict) -> tuple[bool, str]:
    """(likelihood-based?, label of the setting). Non-likelihood: is_bound false, legacy_joint, CFG or temperature."""
    parts = []
    est = pe.get("estimator")
    if est == "legacy_joint":
        parts.append("legacy_joint")
    cfg = pe.get("cfg")
    if cfg not in (None, 0, 0.0, False):
        parts.append(f"cfg={cfg:g}" if isinstance(cfg, (int, float)) else f"cfg={cfg}")
    temp = pe.get("temperature")
    if temp not in (None, 1, 1.0):
        parts.append(f"T={temp:g}" if isinstance(temp, (int, float)) else f"T={temp}")
    if pe.get("is_bound") is False and not parts:
        parts.append(f"{est or 'estimator'}, not a bound")
    return not parts, ", ".join(parts)


def _num(x) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def load(paths: Iterable[str | Path], meta: dict | None = None) -> Collection:
    """Discover and parse all run files under `paths` into rows (ModelRun) and perplexity results."""
    meta = meta or {}
    files = discover(paths)
    if not files:
        raise UserError("no .json/.jsonl files found in the given paths: pass lm-eval --output_path folders")
    root = _common_root(files)
    notes: list[str] = []
    runs: dict[tuple[str, str], ModelRun] = {}
    ppl: list[PplResult] = []
    dated: dict[Path, list[tuple[str, str, str, Path]]] = {}  # dir -> (kind, task, date, path)
    covered: dict[Path, set[str]] = {}                          # dir -> tasks with results
    dir_runs: dict[Path, list[ModelRun]] = {}

    for f in files:
        if f.suffix == ".jsonl":
            m = _DATED.match(f.name)
            if m:
                dated.setdefault(f.parent, []).append((m.group(1), m.group(2), m.group(3), f))
    for f in files:
        if f.suffix != ".json":
            continue
        try:
            obj = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"skipped {_rel(f, root)}: not readable JSON ({type(e).__name__})")
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("kind") == "prime-eval/ppl":
            r = _load_ppl(obj, f, root, meta, notes)
            if r:
                ppl.append(r)
            continue
        if "results" not in obj:
            continue  # some other JSON (a config, a tokenizer file ...)
        if not isinstance(obj["results"], dict) or not all(isinstance(v, dict) for v in obj["results"].values()):
            notes.append(f"skipped {_rel(f, root)}: 'results' is not a mapping of task -> metrics "
                         "(not an lm-eval results file?)")
            continue
        name = _model_name(obj, f)
        pe = (obj.get("config") or {}).get("prime_eval") or {}
        likelihood, setting = _setting(pe)
        key = (name, setting)
        run = runs.get(key)
        if run is None:
            run = runs[key] = ModelRun(name=name, likelihood=likelihood, setting=setting)
            m = meta.get(name) or meta.get(f.parent.name) or {}
            run.family = m.get("family") or str(pe.get("family") or "other").lower()
            run.params = m.get("params") or _num(pe.get("params")) or _num((obj.get("config") or {}).get("model_num_parameters"))
            run.flops = m.get("flops") or _num(pe.get("flops"))
            run.label = m.get("label")
            run.estimator = pe.get("estimator")
            run.num_samples = pe.get("num_samples")
        run.dirs.add(f.parent)
        dir_runs.setdefault(f.parent, []).append(run)
        for tr in _parse_results(obj, f, root, dated.get(f.parent, [])):
            covered.setdefault(f.parent, set()).add(tr.task)
            old = run.tasks.get(tr.task)
            if old is not None and old.status == "ok" and (tr.status != "ok" or old.date > tr.date):
                continue
            run.tasks[tr.task] = tr

    # Runs that left statistics or samples but no results JSON covering the task: failed.
    for d, entries in dated.items():
        owners = dir_runs.get(d) or []
        for kind, task, date, path in entries:
            if task in covered.get(d, set()):
                continue
            run = owners[0] if owners else None
            if kind == "stats" and owners:
                is_bound = _first_stats_row(path).get("is_bound")
                match = [r for r in owners if r.likelihood == (is_bound is not False)]
                run = match[0] if match else owners[0]
            if run is None:
                name = d.name
                run = runs.setdefault((name, ""), ModelRun(name=name))
                m = meta.get(name) or {}
                run.family, run.params, run.flops = m.get("family", "other"), m.get("params"), m.get("flops")
                run.label = m.get("label")
                run.dirs.add(d)
            what = f"{kind} file {_rel(path, root)}"
            old = run.tasks.get(task)
            if old is None:
                run.tasks[task] = TaskResult(task=task, status="failed", source=_rel(path, root),
                                             reason=FAILED.format(what=what))
            elif old.status == "failed" and old.reason and " on disk but no results" in old.reason:
                listed = old.reason[len("run failed: "):].split(" on disk")[0]  # several leftover files
                old.reason = FAILED.format(what=f"{listed}, {what}")
    return Collection(runs=list(runs.values()), ppl=ppl, notes=notes, root=root)


def _first_stats_row(path: Path) -> dict:
    try:
        with open(path) as fh:
            return json.loads(fh.readline() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _parse_results(obj: dict, f: Path, root: Path, dated: list) -> list[TaskResult]:
    src = _rel(f, root)
    results = obj.get("results") or {}
    groups = set((obj.get("groups") or {}).keys())
    groups |= {g for g, subs in (obj.get("group_subtasks") or {}).items() if subs}
    date_id = f.stem[len("results_"):] if f.stem.startswith("results_") else None
    out = []
    configs = obj.get("configs") or {}
    nsamp = obj.get("n-samples") or {}
    date = _num(obj.get("date")) or 0.0
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
            tr.metrics[metric] = (_num(v), _num(metrics.get(f"{metric}_stderr,{filt}")))
        n = (nsamp.get(task) or {}).get("effective") if isinstance(nsamp.get(task), dict) else None
        tr.n = int(n) if n else (int(metrics["sample_len"]) if _num(metrics.get("sample_len")) else None)
        tr.delimiter = (configs.get(task) or {}).get("target_delimiter", " ")
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


def _load_ppl(obj: dict, f: Path, root: Path, meta: dict, notes: list) -> PplResult | None:
    src = _rel(f, root)
    model, proto, res = obj.get("model") or {}, obj.get("protocol") or {}, obj.get("results") or {}
    nll, se = _num(res.get("nll")), _num(res.get("nll_stderr"))
    if nll is None or se is None or not isinstance(obj.get("is_bound"), bool):
        notes.append(f"skipped {src}: a prime-eval/ppl file without results.nll, results.nll_stderr or is_bound "
                     f"(written by an incompatible prime-eval version?)")
        return None
    name = str(model.get("name") or f.stem)
    m = meta.get(name, {})
    estimator = str(proto.get("estimator") or "?")
    family = m.get("family") or str(model.get("family") or "other").lower()
    dataset = str(proto.get("dataset") or "?") + (f"/{proto['split']}" if proto.get("split") else "")
    return PplResult(name=name, family=family, params=m.get("params") or _num(model.get("params")),
                     flops=m.get("flops"), dataset=dataset, estimator=estimator, is_bound=obj["is_bound"],
                     exact=estimator in EXACT_ESTIMATORS or family == "arm", nll=nll, nll_se=se,
                     tokens=res.get("tokens"), source=src, label=m.get("label"))


# ----------------------------------------------------------------------------------------------------------------
# Per-document data: correctness and Monte Carlo probabilities
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class DocData:
    correct: dict      # doc_id -> {metric: 0/1}
    hashes: dict       # doc_id -> doc_hash
    q: dict | None     # metric -> {doc_id: q_i}; None when no matching stats
    note: str | None = None


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _gold(row: dict, lls: list[float]) -> int | None:
    k = len(lls)
    try:
        g = int(str(row.get("target")).strip())
        if 0 <= g < k:
            return g
    except ValueError:
        pass
    acc = row.get("acc")
    pred = int(np.argmax(lls))
    if acc == 1:
        return pred
    if acc == 0 and k == 2:
        return 1 - pred
    return None


def doc_data(tr: TaskResult, metrics: Sequence[str]) -> DocData | None:
    """Per-document correctness from the samples log and, when a stats file of the same run exists (its
    log-likelihoods equal the samples' responses), q_i = P(correct under MC noise) per metric."""
    if tr.samples is None:
        return None
    rows = _read_jsonl(tr.samples)
    correct = {r["doc_id"]: {m: float(r[m]) for m in metrics if m in r} for r in rows}
    hashes = {r["doc_id"]: r.get("doc_hash") for r in rows}
    if not tr.stats:
        return DocData(correct, hashes, None)
    resp = {r["doc_id"]: [float(x[0]) if isinstance(x, list) else float(x) for x in r["filtered_resps"]] for r in rows}
    stats = None
    for path in sorted(tr.stats, reverse=True):
        table = {(s["doc_id"], s["choice"]): (float(s["loglikelihood"]), float(s["mc_stderr"])) for s in _read_jsonl(path)}
        ok = all(
            (d, j) in table and abs(table[(d, j)][0] - ll) <= 1e-4 + 1e-6 * abs(ll)
            for d, lls in resp.items() for j, ll in enumerate(lls))
        if ok:
            stats = table
            break
    if stats is None:
        return DocData(correct, hashes, None, note="MC error not included: no statistics file matches the samples log")
    q: dict = {m: {} for m in metrics}
    for r in rows:
        d, lls = r["doc_id"], resp[r["doc_id"]]
        gold = _gold(r, lls)
        se = [stats[(d, j)][1] for j in range(len(lls))]
        for m in metrics:
            if gold is None:
                q[m][d] = 0.5  # gold unknown: use the largest possible variance q(1−q) = 1/4
                continue
            if m == "acc_norm":
                lens = []
                for j in range(len(lls)):
                    cont = r["arguments"][f"gen_args_{j}"]["arg_1"]
                    lens.append(float(len(cont[len(tr.delimiter):] if cont.startswith(tr.delimiter) else cont)) or 1.0)
                sc, sd = [x / n for x, n in zip(lls, lens)], [x / n for x, n in zip(se, lens)]
            else:
                sc, sd = lls, se
            q[m][d] = prob_correct(sc, sd, gold)
    return DocData(correct, hashes, q)


# ----------------------------------------------------------------------------------------------------------------
# Table model
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    main: str = ""            # point value as text; "" = missing
    unc: str = ""             # "± 4.3" or "[1.0, 2.0]"
    prefix: str = ""          # "≤" for upper bounds
    marker: str = ""          # "†" when a paired interval excludes 0
    bold: bool = False
    note: str = ""            # footnote letter
    value: float | None = None


@dataclass
class Table:
    key: str
    title: str
    caption: str
    header: list[str]
    rows: list[list]          # each: label strings, then Cells
    groups: list[str]         # family label per row (for grouping rules); "" when not grouped
    notes: dict               # letter -> text
    n_labels: int = 2         # leading label columns
    records: list[dict] = field(default_factory=list)  # tidy rows for CSV


class _Notes:
    def __init__(self):
        self.texts: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        for k, v in self.texts.items():
            if v == text:
                return k
        k = "abcdefghijklmnopqrstuvwxyz"[len(self.texts)] if len(self.texts) < 26 else str(len(self.texts) + 1)
        self.texts[k] = text
        return k


def fmt_params(x: float | None) -> str:
    if not x:
        return ""
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.0f}"


def fmt_ppl(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def _f(x) -> str:
    """Stable number format for CSV."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.6f}"


def task_label(task: str) -> str:
    return TASK_LABEL.get(task, task)


def _family_key(f: str) -> tuple:
    return (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER) - 1, f)


def _sorted_runs(runs: list) -> list:
    return sorted(runs, key=lambda r: (_family_key(r.family), r.params or 0.0, r.display))


def order_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = set(tasks)
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


def choose_metric(task: str, available: set[str], override: dict | None = None) -> str | None:
    """The metric reported for a task: override, else the literature's choice (PREFERRED_METRIC) when lm-eval
    reported it, else acc, else the alphabetically first metric."""
    if override and task in override:
        return override[task]
    pref = PREFERRED_METRIC.get(task)
    if pref in available:
        return pref
    if "acc" in available:
        return "acc"
    return sorted(available)[0] if available else None


@dataclass
class AccCell:
    value: float | None = None
    se_data: float | None = None
    se_mc: float | None = None
    n: int | None = None
    status: str = "not run"
    reason: str | None = None

    @property
    def se(self) -> float | None:
        if self.value is None or self.se_data is None:
            return None
        return combine_se(self.se_data, self.se_mc or 0.0)


def accuracy_cells(runs: list[ModelRun], tasks: list[str], metric: dict, cache: dict) -> dict:
    """(run display, task) -> AccCell with dataset and MC standard errors."""
    out = {}
    for run in runs:
        for task in tasks:
            tr = run.tasks.get(task)
            if tr is None:
                out[(run.display, task)] = AccCell(reason=NOT_RUN)
                continue
            if tr.status != "ok":
                out[(run.display, task)] = AccCell(status=tr.status, reason=tr.reason)
                continue
            m = metric[task]
            value, se = tr.metrics.get(m, (None, None))
            if value is None:
                out[(run.display, task)] = AccCell(status="missing", reason=NO_METRIC.format(metric=m))
                continue
            if se is None and tr.n:
                se = binomial_se(value, tr.n)
            cell = AccCell(value=value, se_data=se, n=tr.n, status="ok")
            dd = cache.get((id(run), task))
            if dd is not None and dd.q is not None and dd.q.get(m):
                cell.se_mc = math.sqrt(mc_variance(list(dd.q[m].values())))
            out[(run.display, task)] = cell
    return out


def _acc_table(key, title, caption, runs, tasks, metric, cache) -> Table:
    notes = _Notes()
    cells = accuracy_cells(runs, tasks, metric, cache)
    header = ["Family", "Model", "Params"] + [f"{task_label(t)} ({metric[t]})" for t in tasks] + ["Avg"]
    rows, groups, records = [], [], []
    for run in runs:
        fam = FAMILY_LABEL.get(run.family, run.family)
        label = run.display
        row = [fam, label, fmt_params(run.params)]
        vals, ses = [], []
        mc_note = None
        for t in tasks:
            c = cells[(run.display, t)]
            if c.value is None:
                row.append(Cell(note=notes(c.reason)))
            else:
                row.append(Cell(main=f"{100 * c.value:.1f}", unc=f"± {100 * Z95 * c.se:.1f}" if c.se is not None else "",
                                value=c.value))
                vals.append(c.value)
                ses.append(c.se if c.se is not None else float("nan"))
            dd = cache.get((id(run), t))
            tr = run.tasks.get(t)
            if dd is not None and dd.note:
                mc_note = dd.note
            elif c.value is not None and dd is None and tr is not None and tr.stats:
                mc_note = ("MC error not included: per-request statistics found but no lm-eval samples log "
                           "(run lm-eval with --log_samples)")
            elif c.value is not None and tr is not None and not tr.stats and (run.num_samples or 0) > 1 \
                    and run.estimator not in EXACT_ESTIMATORS:
                mc_note = "MC error not included: no per-request statistics (stats_<task>_<date>.jsonl) found"
            lo, hi = ci95(c.value, c.se) if c.value is not None and c.se is not None else (None, None)
            records.append({"section": key, "family": run.family, "model": label, "params": run.params,
                            "task": t, "metric": metric[t], "n": c.n, "value": c.value, "se_data": c.se_data,
                            "se_mc": c.se_mc, "se_total": c.se, "ci95_low": lo, "ci95_high": hi,
                            "estimator": run.estimator, "num_samples": run.num_samples,
                            "status": c.status, "reason": c.reason or ""})
        if len(vals) == len(tasks) and tasks:
            avg, se = float(np.mean(vals)), average_se(ses)
            row.append(Cell(main=f"{100 * avg:.1f}", unc=f"± {100 * Z95 * se:.1f}" if math.isfinite(se) else "", value=avg))
        else:
            row.append(Cell(note=notes(NO_AVG)))
        if mc_note:
            row[1] = f"{label}[{notes(mc_note)}]"
        rows.append(row)
        groups.append(fam)
    _bold(rows, 3, higher=True)
    return Table(key, title, caption, header, rows, groups, notes.texts, n_labels=3, records=records)


def _bold(rows: list, start: int, higher: bool) -> None:
    """Bold the best point value per column (ties all bold)."""
    if not rows:
        return
    for j in range(start, len(rows[0])):
        vals = [r[j].value for r in rows if isinstance(r[j], Cell) and r[j].value is not None]
        if len(vals) < 2:
            continue
        best = max(vals) if higher else min(vals)
        for r in rows:
            if isinstance(r[j], Cell) and r[j].value is not None and abs(r[j].value - best) < 1e-12:
                r[j].bold = True


def _paired_table(runs, tasks, metric, cache, baseline) -> Table:
    notes = _Notes()
    header = ["Model A", "Model B"] + [f"{task_label(t)} ({metric[t]})" for t in tasks]
    rows, records = [], []
    runs = [r for r in runs if any(cache.get((id(r), t)) is not None for t in tasks)]  # needs samples logs
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    if baseline:
        pairs = [(b, a) if a.name == baseline or a.display == baseline else (a, b) for a, b in pairs
                 if baseline in (a.name, a.display, b.name, b.display)]
        pairs = [(a, b) if b.name == baseline or b.display == baseline else (b, a) for a, b in pairs]
    for a, b in pairs:
        row = [a.display, b.display]
        for t in tasks:
            m = metric[t]
            da, db = cache.get((id(a), t)), cache.get((id(b), t))
            rec = {"model_a": a.display, "model_b": b.display, "task": t, "metric": m}
            if da is None or db is None:
                who = [r.display for r, d in ((a, da), (b, db)) if d is None]
                reason = (f"no result for {', '.join(who)}" if any(t not in r.tasks or r.tasks[t].status != "ok"
                                                                     for r in (a, b))
                          else f"no lm-eval samples log for {', '.join(who)} (run lm-eval with --log_samples)")
                row.append(Cell(note=notes(reason)))
                records.append({**rec, "reason": reason})
                continue
            docs = sorted(d for d in da.correct if d in db.correct and m in da.correct[d] and m in db.correct[d]
                          and da.hashes.get(d) == db.hashes.get(d))
            if len(docs) < 2:
                reason = "fewer than 2 shared documents (different limits or data)"
                row.append(Cell(note=notes(reason)))
                records.append({**rec, "reason": reason})
                continue
            ca, cb = [da.correct[d][m] for d in docs], [db.correct[d][m] for d in docs]
            va = mc_variance([da.q[m][d] for d in docs]) if da.q and da.q.get(m) else 0.0
            vb = mc_variance([db.q[m][d] for d in docs]) if db.q and db.q.get(m) else 0.0
            diff, se, lo, hi = paired_difference(ca, cb, va, vb)
            sig = excludes_zero(lo, hi)
            row.append(Cell(main=f"{100 * diff:+.1f}", unc=f"± {100 * Z95 * se:.1f}", marker="†" if sig else "",
                            value=diff))
            records.append({**rec, "n": len(docs), "diff": diff, "se": se, "ci95_low": lo, "ci95_high": hi,
                            "mc_included": bool(va or vb), "excludes_zero": sig, "reason": ""})
        rows.append(row)
    caption = ("Accuracy of A minus accuracy of B in points on the documents both scored (same doc_id and doc_hash), "
               "± half-width of the paired 95% interval (Monte Carlo error of both models included when per-request "
               "statistics exist); † = the interval excludes 0.")
    return Table("paired", "Paired comparisons (likelihood-based rows)", caption, header, rows, [""] * len(rows),
                 notes.texts, n_labels=2, records=records)


def _ppl_tables(results: list[PplResult]) -> list[Table]:
    tables = []
    for bound in (True, False):
        sel = [r for r in results if r.is_bound == bound]
        for dataset in sorted({r.dataset for r in sel}):
            rs = sorted((r for r in sel if r.dataset == dataset),
                        key=lambda r: (_family_key(r.family), r.params or 0.0, r.label or r.name))
            rows, groups, records = [], [], []
            for r in rs:
                p, plo, phi = ppl_interval(r.nll, r.nll_se)
                lo, hi = ci95(r.nll, r.nll_se)
                prefix = "≤" if bound and not r.exact else ""
                fam = FAMILY_LABEL.get(r.family, r.family)
                rows.append([fam, r.label or r.name, fmt_params(r.params), r.estimator,
                             Cell(main=f"{r.nll:.3f}", unc=f"± {Z95 * r.nll_se:.3f}", prefix=prefix, value=r.nll),
                             Cell(main=fmt_ppl(p), unc=f"[{fmt_ppl(plo)}, {fmt_ppl(phi)}]", prefix=prefix, value=p)])
                groups.append(fam)
                records.append({"section": "bound" if bound else "not_bound", "dataset": dataset,
                                "family": r.family, "model": r.label or r.name, "params": r.params,
                                "estimator": r.estimator, "is_bound": r.is_bound, "upper_bound": bool(prefix),
                                "nll": r.nll, "nll_se": r.nll_se, "nll_ci95_low": lo, "nll_ci95_high": hi,
                                "ppl": p, "ppl_ci95_low": plo, "ppl_ci95_high": phi, "tokens": r.tokens,
                                "source": r.source})
            _bold(rows, 4, higher=False)
            header = ["Family", "Model", "Params", "Estimator", "NLL (nats/token)", "PPL"]
            if bound:
                title = f"Perplexity on {dataset}"
                caption = ("NLL ± half-width of the 95% interval; PPL = exp(NLL) with the exp of the NLL interval. "
                           "≤ marks upper bounds (diffusion ELBOs); exact autoregressive values carry no mark.")
            else:
                title = f"Perplexity on {dataset}: NOT upper bounds (legacy_joint and similar)"
                caption = ("These estimators do not bound the NLL; they are not comparable with the bounds above "
                           "and are kept apart on purpose.")
            tables.append(Table(f"ppl-{'bound' if bound else 'other'}-{dataset}", title, caption, header, rows,
                                groups, {}, n_labels=4, records=records))
    return tables


@dataclass
class Report:
    title: str
    tables: list[Table]
    notes: list[str]
    plots: dict = field(default_factory=dict)   # name -> (caption, png bytes)
    n_files: int = 0


def build(collection: Collection, *, metric_override: dict | None = None, baseline: str | None = None,
          title: str = "prime-eval report") -> Report:
    """Turn loaded runs into the report's tables (no I/O besides reading samples/stats logs)."""
    runs = collection.runs
    tasks = order_tasks(t for r in runs for t in r.tasks)
    available: dict[str, set] = {t: set() for t in tasks}
    for r in runs:
        for t, tr in r.tasks.items():
            available[t] |= {m for m, (v, _) in tr.metrics.items() if v is not None}
    metric = {t: choose_metric(t, available[t], metric_override) or "acc" for t in tasks}
    if metric_override:
        unknown = sorted(set(metric_override) - set(tasks))
        if unknown:
            raise UserError(f"--metric names tasks that no run reports: {', '.join(unknown)} (known: {', '.join(tasks)})")
    cache: dict = {}
    for r in runs:
        for t, tr in r.tasks.items():
            if tr.status == "ok" and t in metric:
                cache[(id(r), t)] = doc_data(tr, sorted({metric[t], "acc"}))
    like = _sorted_runs([r for r in runs if r.likelihood])
    other = _sorted_runs([r for r in runs if not r.likelihood])
    tables = []
    cap = ("Accuracy in percent ± half-width of the 95% interval. The interval combines lm-eval's dataset standard "
           "error with the Monte Carlo error of the likelihood estimates when per-request statistics exist "
           "(√(SE_data² + Var_MC)). Best per column in bold. acc/acc_norm per task as in the literature "
           "(see prime_eval/report.py).")
    if like:
        tables.append(_acc_table("accuracy", "Zero-shot accuracy (likelihood-based)", cap, like, tasks, metric, cache))
    if other:
        tables.append(_acc_table(
            "accuracy-other", "Zero-shot accuracy: NOT likelihood-based (legacy_joint / CFG / temperature)",
            "Scores from guided, tempered or non-bound estimators. They answer a different question than the "
            "likelihood table above and must not be compared with it. " + cap, other, tasks, metric, cache))
    if baseline and not any(baseline in (r.name, r.display) for r in like):
        raise UserError(f"--baseline {baseline!r} is not a likelihood-based model of this report "
                        f"(models: {', '.join(r.display for r in like)})")
    if len(like) >= 2:
        tables.append(_paired_table(like, tasks, metric, cache, baseline))
    tables += _ppl_tables(collection.ppl)
    if not tables:
        skipped = [n for n in collection.notes if n.startswith("skipped ")]
        raise UserError("no lm-eval results and no perplexity JSONs found in the given paths"
                        + ("".join(f"; {n}" for n in skipped) + " (a half-written file: rerun that evaluation)"
                           if skipped else ""))
    return Report(title=title, tables=tables, notes=list(collection.notes))


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend, PNG bytes)
# ----------------------------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def make_plots(report: Report, collection: Collection) -> dict:
    """Per-task accuracy with 95% intervals per model; perplexity versus parameters (and FLOPs) per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    acc = next((t for t in report.tables if t.key == "accuracy"), None)
    if acc is not None and acc.records:
        tasks = list(dict.fromkeys(r["task"] for r in acc.records))
        models = list(dict.fromkeys(r["model"] for r in acc.records if r["value"] is not None))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tasks) + 2), 3.8))
        width = 0.8 / max(len(models), 1)
        for i, model in enumerate(models):
            xs, ys, es = [], [], []
            for j, t in enumerate(tasks):
                rec = next(r for r in acc.records if r["model"] == model and r["task"] == t)
                if rec["value"] is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(100 * rec["value"])
                    es.append(100 * Z95 * rec["se_total"] if rec["se_total"] is not None else 0.0)
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=model)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([f"{task_label(t)}\n({next(r['metric'] for r in acc.records if r['task'] == t)})"
                            for t in tasks])
        ax.set_ylabel("accuracy (%), 95% interval")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        plots["accuracy"] = ("Per-task accuracy with 95% intervals (likelihood-based rows).", _png(fig))
    bound = [r for r in collection.ppl if r.is_bound]
    for dataset in sorted({r.dataset for r in bound}):
        rs = [r for r in bound if r.dataset == dataset]
        axes_x = [("params", "parameters")] if any(r.params for r in rs) else []
        if any(r.flops for r in rs):
            axes_x.append(("flops", "training FLOPs"))
        if not axes_x:
            continue
        fig, axs = plt.subplots(1, len(axes_x), figsize=(5.2 * len(axes_x), 3.8), squeeze=False)
        for ax, (attr, xlabel) in zip(axs[0], axes_x):
            for fam in sorted({r.family for r in rs}, key=_family_key):
                pts = sorted(((getattr(r, attr), r) for r in rs if r.family == fam and getattr(r, attr)),
                             key=lambda p: (p[0], p[1].name, p[1].estimator))
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                ys = [ppl_interval(r.nll, r.nll_se) for _, r in pts]
                ax.errorbar(xs, [y[0] for y in ys], yerr=[[y[0] - y[1] for y in ys], [y[2] - y[0] for y in ys]],
                            marker="o", capsize=3, label=FAMILY_LABEL.get(fam, fam))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("PPL (≤ for diffusion bounds)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        safe = re.sub(r"[^A-Za-z0-9]+", "_", dataset).strip("_")
        plots[f"ppl_{safe}"] = (f"Perplexity on {dataset} versus model size, one line per family (log axes).", _png(fig))
    return plots


# ----------------------------------------------------------------------------------------------------------------
# Renderers
# ----------------------------------------------------------------------------------------------------------------

def _cell_md(c) -> str:
    if not isinstance(c, Cell):
        return str(c).replace("|", "\\|")
    if not c.main:
        return f"—[{c.note}]" if c.note else "—"
    main = f"**{c.main}**" if c.bold else c.main
    text = " ".join(x for x in (c.prefix, main, c.unc) if x)
    return text + (f" {c.marker}" if c.marker else "")


def render_markdown(report: Report, plot_files: dict | None = None) -> str:
    out = [f"# {report.title}", "",
           "Generated by `prime-eval report` (prime_eval/report.py documents the metric choice and the interval "
           "formulas).", ""]
    for t in report.tables:
        out += [f"## {t.title}", "", t.caption, ""]
        out.append("| " + " | ".join(t.header) + " |")
        out.append("|" + "|".join(["---"] * t.n_labels + ["---:"] * (len(t.header) - t.n_labels)) + "|")
        for row in t.rows:
            out.append("| " + " | ".join(_cell_md(c) for c in row) + " |")
        if t.notes:
            out.append("")
            out += [f"[{k}] {v}  " for k, v in t.notes.items()]
            out[-1] = out[-1].rstrip()
        out.append("")
    if plot_files:
        out += ["## Plots", ""]
        for name, (caption, path) in plot_files.items():
            out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    if report.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(out)


_TEX_ESC = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "<": r"\textless{}", ">": r"\textgreater{}", "^": r"\textasciicircum{}", "≤": r"$\leq$", "±": r"$\pm$",
            "—": "---", "†": r"$^\dagger$", "√": r"$\surd$", "²": r"$^2$", "≥": r"$\geq$", "Φ": r"$\Phi$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESC.get(ch, ch) for ch in str(s))


def _cell_tex(c) -> str:
    if not isinstance(c, Cell):
        s = str(c)
        m = re.match(r"^(.*)\[([a-z0-9]+)\]$", s)
        return tex_escape(m.group(1)) + rf"\textsuperscript{{{m.group(2)}}}" if m else tex_escape(s)
    if not c.main:
        return "---" + (rf"\textsuperscript{{{c.note}}}" if c.note else "")
    main = rf"\textbf{{{tex_escape(c.main)}}}" if c.bold else tex_escape(c.main)
    pre = (tex_escape(c.prefix) + " ") if c.prefix else ""
    unc = rf" {{\scriptsize {tex_escape(c.unc)}}}" if c.unc else ""
    return pre + main + unc + (tex_escape(c.marker) if c.marker else "")


def render_latex(report: Report) -> str:
    r"""One booktabs `table` per report table; needs \usepackage{booktabs} only."""
    out = [f"% {report.title}: generated by `prime-eval report`; requires \\usepackage{{booktabs}}", ""]
    for t in report.tables:
        grouped = t.n_labels >= 3 and t.header[0] == "Family"
        cols = t.header[1:] if grouped else t.header
        rows = [r[1:] for r in t.rows] if grouped else t.rows
        nlab = t.n_labels - 1 if grouped else t.n_labels
        spec = "l" * nlab + "r" * (len(cols) - nlab)
        label = re.sub(r"[^a-z0-9]+", "-", t.key.lower()).strip("-")
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                rf"\caption{{{tex_escape(t.title)}. {tex_escape(t.caption)}}}", rf"\label{{tab:{label}}}",
                rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                " & ".join(tex_escape(h) for h in cols) + r" \\", r"\midrule"]
        prev = None
        for g, row in zip(t.groups, rows):
            if grouped and g != prev:
                if prev is not None:
                    out.append(r"\midrule")
                out.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{\textit{{{tex_escape(g)}}}}} \\")
                prev = g
            out.append(" & ".join(_cell_tex(c) for c in row) + r" \\")
        out.append(r"\bottomrule")
        out.append(r"\end{tabular}")
        if t.notes:
            out.append(r"\par\smallskip\footnotesize")
            out += [rf"\textsuperscript{{{k}}}{tex_escape(v)}\par" for k, v in t.notes.items()]
        out += [r"\end{table}", ""]
    return "\n".join(out)


def _cell_html(c) -> str:
    if not isinstance(c, Cell):
        s = str(c)
        m = re.match(r"^(.*)\[([a-z0-9]+)\]$", s)
        return html.escape(m.group(1)) + f"<sup>{m.group(2)}</sup>" if m else html.escape(s)
    if not c.main:
        return "—" + (f"<sup>{c.note}</sup>" if c.note else "")
    main = f"<b>{html.escape(c.main)}</b>" if c.bold else html.escape(c.main)
    pre = f"{html.escape(c.prefix)}&nbsp;" if c.prefix else ""
    unc = f' <span class="unc">{html.escape(c.unc)}</span>' if c.unc else ""
    mark = f' <span class="sig">{c.marker}</span>' if c.marker else ""
    return pre + main + unc + mark


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}table{border-collapse:collapse;margin:.5em 0 1em}th,td{padding:.25em .6em}
thead th{border-top:2px solid #222;border-bottom:1px solid #222}tbody tr:last-child td{border-bottom:2px solid #222}
td.num{text-align:right;white-space:nowrap}tr.family td{font-style:italic;background:#f4f4f4}.unc{color:#666;
font-size:.85em}.sig{color:#b00}.caption{color:#444;max-width:60em}.notes{font-size:.85em;color:#444}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}"""


def render_html(report: Report) -> str:
    """A self-contained page: inline CSS, tables, PNG plots as base64 data URIs, no scripts, no external links."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(report.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{html.escape(report.title)}</h1>",
           "<p>Generated by <code>prime-eval report</code>; <code>prime_eval/report.py</code> documents the metric "
           "choice and the interval formulas.</p>"]
    for t in report.tables:
        out += [f'<section id="{html.escape(t.key)}">', f"<h2>{html.escape(t.title)}</h2>",
                f'<p class="caption">{html.escape(t.caption)}</p>', "<table>", "<thead><tr>"]
        out += [f"<th>{html.escape(h)}</th>" for h in t.header] + ["</tr></thead>", "<tbody>"]
        for row in t.rows:
            tds = "".join(f'<td class="{"num" if isinstance(c, Cell) else "lab"}">{_cell_html(c)}</td>' for c in row)
            out.append(f"<tr>{tds}</tr>")
        out += ["</tbody>", "</table>"]
        if t.notes:
            out.append('<p class="notes">' + "<br>".join(f"<sup>{k}</sup> {html.escape(v)}" for k, v in t.notes.items())
                       + "</p>")
        out.append("</section>")
    if report.plots:
        out += ['<section id="plots">', "<h2>Plots</h2>"]
        for name, (caption, png) in report.plots.items():
            b64 = base64.b64encode(png).decode("ascii")
            out += [f'<figure id="plot-{html.escape(name)}"><img alt="{html.escape(caption)}" '
                    f'src="data:image/png;base64,{b64}"><figcaption>{html.escape(caption)}</figcaption></figure>']
        out.append("</section>")
    if report.notes:
        out += ['<section id="notes"><h2>Notes</h2><ul>'] + [f"<li>{html.escape(n)}</li>" for n in report.notes]
        out += ["</ul></section>"]
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


CSV_COLUMNS = {
    "accuracy": ["section", "family", "model", "params", "task", "metric", "n", "value", "se_data", "se_mc",
                 "se_total", "ci95_low", "ci95_high", "estimator", "num_samples", "status", "reason"],
    "paired": ["model_a", "model_b", "task", "metric", "n", "diff", "se", "ci95_low", "ci95_high", "mc_included",
               "excludes_zero", "reason"],
    "perplexity": ["section", "dataset", "family", "model", "params", "estimator", "is_bound", "upper_bound", "nll",
                   "nll_se", "nll_ci95_low", "nll_ci95_high", "ppl", "ppl_ci95_low", "ppl_ci95_high", "tokens",
                   "source"],
}


def render_csv(report: Report) -> dict[str, str]:
    """Tidy CSVs (one row per cell, fractions not percent): accuracy.csv, paired.csv, perplexity.csv."""
    groups = {"accuracy": [], "paired": [], "perplexity": []}
    for t in report.tables:
        kind = "accuracy" if t.key.startswith("accuracy") else "paired" if t.key == "paired" else "perplexity"
        groups[kind] += t.records
    out = {}
    for kind, recs in groups.items():
        if not recs:
            continue
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS[kind], lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in recs:
            w.writerow({k: (_f(v) if not isinstance(v, str) else v) for k, v in r.items()})
        out[f"{kind}.csv"] = buf.getvalue()
    return out


def render_console(report: Report, console=None) -> None:
    """Rich tables on the terminal (footnotes under each table)."""
    from rich.console import Console
    from rich.table import Table as RichTable

    if console is None:
        import sys

        console = Console() if sys.stdout.isatty() else Console(width=200)
    for t in report.tables:
        rt = RichTable(title=t.title, caption=None, show_lines=False, header_style="bold")
        for i, h in enumerate(t.header):
            rt.add_column(h, justify="left" if i < t.n_labels else "right")
        for row in t.rows:
            cells = []
            for c in row:
                if isinstance(c, Cell):
                    if not c.main:
                        cells.append(f"—[dim]{c.note}[/dim]" if c.note else "—")
                    else:
                        main = f"[bold green]{c.main}[/bold green]" if c.bold else c.main
                        cells.append(" ".join(x for x in (c.prefix, main, f"[dim]{c.unc}[/dim]" if c.unc else "",
                                                          c.marker) if x))
                else:
                    cells.append(str(c).replace("[", "\\["))
            rt.add_row(*cells)
        console.print(rt)
        for k, v in t.notes.items():
            console.print(f"  {k}: {v}", highlight=False, markup=False)
    for n in report.notes:
        console.print(f"note: {n}", highlight=False, markup=False)


def write_report(report: Report, collection: Collection, out_dir: str | Path, formats: Sequence[str] = FORMATS,
                 plots: bool = True) -> list[Path]:
    """Write the requested formats (and plots) to out_dir; return the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plot_files = {}
    if plots:
        report.plots = make_plots(report, collection)
        (out / "plots").mkdir(exist_ok=True)
        for name, (caption, png) in report.plots.items():
            p = out / "plots" / f"{name}.png"
            p.write_bytes(png)
            written.append(p)
            plot_files[name] = (caption, f"plots/{name}.png")
    if "md" in formats:
        written.append(out / "report.md")
        written[-1].write_text(render_markdown(report, plot_files))
    if "csv" in formats:
        for name, text in render_csv(report).items():
            written.append(out / name)
            written[-1].write_text(text)
    if "tex" in formats:
        written.append(out / "report.tex")
        written[-1].write_text(render_latex(report))
    if "html" in formats:
        written.append(out / "report.html")
        written[-1].write_text(render_html(report))
    return written
