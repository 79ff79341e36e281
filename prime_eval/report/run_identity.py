"""What makes two results one run: the identity of a row, its estimator label, and labels that tell rows apart.

A row of the report is one run. Two results files belong to the same row only when all of these are equal:

    model name        config.prime_eval.model_name, else lm-eval's `pretrained=` (last path part), else the folder
    model type        config.model (lm-eval's model name: hf, arm, mdm, prime, ...; a path or hub id there, which
                      lm-eval's Python API writes for a Hugging Face model instance, counts as `hf`)
    checkpoint        config.prime_eval.checkpoint_sha256 (content hash), else the checkpoint / pretrained argument
    settings          the whole config.prime_eval (estimator, num_samples, adaptive settings, crn, seed, eps, cfg,
                      bound_kind, ...), lm-eval's model_args and run settings (num_fewshot, limit, chat template),
                      without the bookkeeping below (which does not change a number: paths already covered by the
                      hash, device, batch sizes, counters)

and, in addition, their numbers agree on every task both report (`disagreements`): re-runs of the identical
configuration are merged only then; otherwise both are shown, told apart by their date, with a note.

Rows that share a display name get visible labels (`distinguish`): "[hf]" / "[arm]" when the model types differ,
"(exact_count, K≤128)" / "(mc, K=4)" when the estimators differ, "(ckpt 0e46fae2)" when the checkpoints differ, else
the differing settings ("seed=1"), else the date of the run.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# config.prime_eval fields that never change a number (or are identified otherwise: the checkpoint by its hash)
BOOKKEEPING = {"model_name", "checkpoint", "checkpoint_sha256", "params", "flops", "family", "truncated_requests",
               "truncated_tokens", "processes", "cache", "rows_per_pass", "pack"}
# lm-eval model_args that never change a number (the checkpoint / pretrained path is the checkpoint identity)
MODEL_ARGS_BOOKKEEPING = {"name", "device", "batch_size", "max_batch_size", "rows_per_pass", "pack", "max_logits_mb",
                          "cache_dir", "parallelize", "device_map", "checkpoint", "pretrained"}
# lm-eval's own run settings that change the numbers
LM_EVAL_SETTINGS = ("num_fewshot", "limit", "fewshot_seed", "gen_kwargs", "fewshot_as_multiturn", "apply_chat_template",
                    "system_instruction")
# lm-eval model types whose log-likelihoods are exact autoregressive ones
LM_EVAL_ARM_TYPES = {"hf", "hf-auto", "hf-causal", "huggingface", "gpt2", "vllm", "sglang", "mamba_ssm",
                     "hf-multimodal", "openai-completions", "local-completions", "neuronx", "ipex", "openvino",
                     "optimum-causal"}
AGREE_REL, AGREE_ABS = 1e-9, 1e-12  # "the same numbers": equal up to the last bits (stderrs summed in another order)


def parse_model_args(args) -> dict:
    """lm-eval's model_args (`k=v,k=v` or a dict) as a dict of strings."""
    if isinstance(args, dict):
        return {str(k): str(v) for k, v in args.items()}
    out = {}
    for part in str(args or "").split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def model_name(results: dict, path: Path) -> str:
    """Display name of a results JSON: prime_eval.model_name, else pretrained=, else lm-eval's model_name, else the
    model type when it is a path, else the folder name."""
    cfg = results.get("config") or {}
    pe = cfg.get("prime_eval") or {}
    if pe.get("model_name"):
        return str(pe["model_name"])
    pretrained = parse_model_args(cfg.get("model_args")).get("pretrained")
    if pretrained:
        return pretrained.rstrip("/").split("/")[-1]
    if results.get("model_name"):
        return str(results["model_name"]).rstrip("/").split("/")[-1]
    model = cfg.get("model")
    if isinstance(model, str) and "/" in model:
        return model.rstrip("/").split("/")[-1]
    return path.parent.name


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class RunIdentity:
    """Everything that makes a results file's numbers what they are (module docstring)."""
    name: str
    model_type: str | None
    checkpoint: str | None
    settings: dict = field(default_factory=dict)  # flat: "adaptive.max_samples" -> 128

    @property
    def key(self) -> str:
        return json.dumps([self.name, self.model_type, self.checkpoint, self.settings], sort_keys=True, default=str)

    @classmethod
    def of_results(cls, results: dict, path: Path) -> "RunIdentity":
        cfg = results.get("config") or {}
        pe = cfg.get("prime_eval") or {}
        args = parse_model_args(cfg.get("model_args"))
        checkpoint = pe.get("checkpoint_sha256") or args.get("checkpoint") or args.get("pretrained") \
            or pe.get("checkpoint")
        settings = {f"prime_eval.{k}": v for k, v in flat({k: v for k, v in pe.items() if k not in BOOKKEEPING}).items()}
        settings.update({f"model_args.{k}": v for k, v in args.items() if k not in MODEL_ARGS_BOOKKEEPING})
        settings.update({f"lm_eval.{k}": cfg[k] for k in LM_EVAL_SETTINGS if cfg.get(k) is not None})
        model_type = cfg.get("model") if isinstance(cfg.get("model"), str) else None
        if model_type and "/" in model_type:  # lm-eval's Python API records an HFLM instance by its path / hub id
            checkpoint, model_type = checkpoint or model_type, "hf"
        return cls(model_name(results, path), model_type, None if checkpoint is None else str(checkpoint), settings)


def estimator_label(pe: dict | None, model_type: str | None) -> str:
    """"exact", "mc, K=4", "exact_count, K≤128" (adaptive: at most K samples), "chain_rule"; for lm-eval's own
    models "exact (lm-eval hf)", or "not recorded (lm-eval X)" for a model type not known to be an exact ARM."""
    if not pe:
        kind = "exact" if model_type in LM_EVAL_ARM_TYPES else "not recorded"
        return f"{kind} (lm-eval {model_type})" if model_type else kind
    est = str(pe.get("estimator") or "?")
    k = pe.get("num_samples")
    adaptive = pe.get("adaptive")
    if isinstance(adaptive, dict):
        return f"{est}, K≤{adaptive.get('max_samples', k)}"
    if isinstance(k, int) and k > 1:
        return f"{est}, K={k}"
    return est


def disagreements(a: dict, b: dict) -> list[str]:
    """Tasks (with the differing numbers) where two runs' results differ; {} for no shared task. `a`, `b`: task ->
    TaskResult. Compared: n, and every metric value and standard error both report."""
    out = []
    for task in sorted(set(a) & set(b)):
        ta, tb = a[task], b[task]
        if ta.status != "ok" or tb.status != "ok":
            continue
        if ta.n != tb.n:
            out.append(f"{task} (n {ta.n} vs {tb.n})")
            continue
        for m in sorted(set(ta.metrics) & set(tb.metrics)):
            if any(not same_number(x, y) for x, y in zip(ta.metrics[m], tb.metrics[m])):
                out.append(f"{task} ({m} {ta.metrics[m][0]} vs {tb.metrics[m][0]})")
                break
    return out


def same_number(x, y) -> bool:
    """Equal up to the last bits (AGREE_REL, AGREE_ABS); None only equals None."""
    if x is None or y is None:
        return x is None and y is None
    return math.isclose(x, y, rel_tol=AGREE_REL, abs_tol=AGREE_ABS)


def _short(checkpoint: str | None) -> str:
    if checkpoint is None:
        return "none"
    if len(checkpoint) == 64 and all(ch in "0123456789abcdef" for ch in checkpoint):
        return checkpoint[:8]
    return checkpoint.rstrip("/").split("/")[-1]


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def distinguish(items: list, scope=lambda item: "") -> None:
    """Set `.suffix` on items sharing `.base` (within one `scope`, e.g. a dataset) so that no two show the same label
    (module docstring). Items need: base, model_type, checkpoint, estimator_label, settings (flat dict), stamp.

    Level by level, among the items whose labels are still equal, the first attribute that differs among them is
    added: the model type ("[hf]"), the checkpoint ("ckpt 0e46fae2"), the estimator ("mc, K=4"), up to three other
    settings that differ ("seed=1"), the run ("run 2026-01-01T10-00-00")."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault((scope(item), item.base), []).append(item)
    levels = [lambda x: x.model_type, lambda x: x.checkpoint, lambda x: x.estimator_label, lambda x: x.settings,
              lambda x: x.stamp]
    tags: dict[int, list] = {id(item): [] for item in items}
    for group in groups.values():
        for level, get in enumerate(levels):
            by: dict[str, list] = {}
            for item in group:
                by.setdefault(json.dumps(tags[id(item)]), []).append(item)
            for same in (g for g in by.values() if len(g) > 1):
                if len({json.dumps(get(x), sort_keys=True, default=str) for x in same}) > 1:
                    for item in same:
                        tags[id(item)].append((level, _tag(level, item, same)))
    for item in items:
        kind = [t for lv, t in tags[id(item)] if lv == 0]
        rest = [t for lv, t in tags[id(item)] if lv > 0]
        item.suffix = "".join(f" [{t}]" for t in kind) + (f" ({', '.join(rest)})" if rest else "")


def _tag(level: int, item, same: list) -> str:
    if level == 0:
        return str(item.model_type)
    if level == 1:
        return f"ckpt {_short(item.checkpoint)}"
    if level == 2:
        return item.estimator_label
    if level == 3:
        return _differing_settings(item, same)
    return f"run {item.stamp}"


def _differing_settings(item, same: list) -> str:
    """Up to three settings that differ, "name=value"; one setting recorded twice (a model argument and the
    generation config it went into: remasking and generation.remasking) is shown once."""
    keys = sorted({k for x in same for k in x.settings})
    differ = [k for k in keys if len({json.dumps(x.settings.get(k), default=str) for x in same}) > 1]
    shown, seen = [], set()
    for k in sorted(differ, key=lambda k: (k.count("."), k)):  # the shallower name of a setting recorded twice
        value, short = _value(item.settings.get(k)), k.rsplit(".", 1)[-1]
        if (short, value) not in seen:
            seen.add((short, value))
            shown.append(f"{k.split('.', 1)[-1]}={value}")
    return ", ".join(shown[:3])
