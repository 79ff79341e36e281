"""Settings of a run: one validated object whose field list is the vocabulary of `--model_args` (docs/adapters.md).

    s = Settings.parse({"checkpoint": "mdm.pth", "samples": "64"}, family="mdm", command="score")
    s.samples, s.estimator, s.adaptive        # 64, "sqrt_count", None (auto)

Every field is declared once below with its type, default and one-line help; that declaration is also the
unknown-argument error text, the `--help` text of `prime-eval score` / `ppl` (`help_text`) and the flags of
`prime-eval ppl` (`ppl_flags`). A concept has one name in every command: `samples=` is the number of Monte Carlo
samples in the model_args of `score` and of `ppl`, and `--samples` is the same setting as a `ppl` flag.
Defaults that differ by command (`samples`: 128 for score, 1 for ppl) say so in the field.

`parse` validates every value, and the combinations of values, before anything is loaded: a bad setting is a
one-line `UserError` naming the setting and the fix. Pure Python (no torch), so `--help` stays fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prime_eval.errors import UserError
from prime_eval.estimators.rows import PACKING  # forward_rows_batch_invariant's packings

FAMILIES = ("arm", "mdm", "prime")
DIFFUSION = ("mdm", "prime")
COMMANDS = ("score", "ppl")
# Default estimators (docs/adapters.md, "The diffusion defaults, measured"). `prime-eval score`, with common random
# numbers: per family the estimator that reproduces at least as many reference decisions as a fixed 1,024-sample run
# at the demo and the Diff_LLaMA_6M scale with a tenth of its passes (benchmarks/adaptive.py): sqrt_count for both
# (exact_count falls short for the Prime on the demo). `ppl` keeps MDLM's `mc`.
DEFAULT_ESTIMATOR = {"score": {"arm": "exact", "mdm": "sqrt_count", "prime": "sqrt_count"},
                     "ppl": {"arm": "exact", "mdm": "mc", "prime": "mc"}}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # accepted name -> torch dtype name (the one dtype table)
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
IW_OPTIONS = ("orders", "proposal", "tau")
LEGACY_OPTIONS = ("temperature", "chunk", "legacy_scope")
# lm-eval passes these to every model's constructor (`--batch_size`, `--max_batch_size`, `--device`)
LM_EVAL_ARGS = ("batch_size", "max_batch_size", "device")
ALIASES = {"num_samples": "samples"}


def parse_bool(value: Any, name: str) -> bool:
    """The one boolean parser: true/1/yes/on, false/0/no/off (any case), or a bool."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UserError(f"{name}={value!r}: expected true or false")


def adaptive_applies(estimator: str) -> bool:
    """Adaptive sampling needs an estimate that is a mean of per-sample values: not a deterministic one (exact,
    chain_rule) and not `iw` (-log-mean-exp). Checked against the estimators' own properties in the tests."""
    return estimator not in ("exact", "chain_rule", "iw")


def setting(default: Any, help: str, *, families: tuple = FAMILIES, commands: tuple = ("score",),
            choices: tuple | None = None, by_command: dict | None = None, check=None, flag: str | None = None):
    """A field of `Settings`: its default, one-line help, where it applies and how it is checked.

    by_command: defaults that differ by command ({"score": 128, "ppl": 1}); check(value) -> error text or None;
    flag: the `prime-eval ppl` option that sets it too ("--samples").
    """
    return field(default=default, metadata={"help": help, "families": families, "commands": commands,
                                            "choices": choices, "by_command": by_command or {}, "check": check,
                                            "flag": flag})


def _at_least(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _positive(v):
    return None if v > 0 else "must be > 0"


BOTH = COMMANDS


@dataclass(frozen=True)
class Settings:
    """Every setting of a `score` or `ppl` run (docs/adapters.md has the table). Build it with `Settings.parse`."""

    # -- the model: prime_eval.loading ---------------------------------------------------------------------------
    checkpoint: str | None = setting(None, "weights: .pth/.pt/.safetensors/Lightning .ckpt, a transformers folder, "
                                     "a hub id or a Megatron checkpoint folder (required)", commands=BOTH)
    tokenizer: str | None = setting(None, "tokenizer folder, tokenizer.json, SentencePiece .model or hub id "
                                    "(default: the checkpoint, for Hugging Face models)", commands=BOTH)
    format: str | None = setting(None, "lit_gpt | mdlm | megatron | hf | torch | safetensors | lightning | "
                                 "torch_dist (default: detected)", commands=BOTH)
    config: str | None = setting(None, "network config name or k=v;k=v overrides, where the shapes do not tell",
                                 commands=BOTH)
    use_ema: bool = setting(True, "Lightning checkpoints: the EMA weights (as upstream evaluated) or the raw ones",
                            commands=BOTH)
    device: str | None = setting(None, "cpu, cuda, cuda:0 (default: cuda if available, else cpu; under torchrun "
                                 "cuda:LOCAL_RANK). Also lm-eval's --device: giving both with different values "
                                 "is an error", commands=BOTH)
    dtype: str = setting("float32", "float32, bfloat16 or float16 (also fp32, bf16, fp16)", commands=BOTH,
                         choices=tuple(DTYPES))
    name: str | None = setting(None, "model name in the results and the report (default: the checkpoint's name)",
                               commands=BOTH)
    permutation: str | None = setting(None, "index-shuffling permutation file (perm_<b^ℓ>.pt), or identity; "
                                      "required when the checkpoint was trained with one and does not carry it (a "
                                      "Megatron checkpoint's saved π is used; a given file must equal it)",
                                      families=("prime",),
                                      commands=BOTH)
    ell: int | None = setting(None, "ℓ sub-tokens per token, where the shapes are ambiguous", families=("prime",),
                              commands=BOTH, check=_at_least(1))
    base: int | None = setting(None, "b, the sub-token base, where the shapes are ambiguous", families=("prime",),
                               commands=BOTH, check=_at_least(2))
    carry_over: bool | None = setting(None, "MDM-Prime v1 carry-over: the softmax restricted to tokens consistent "
                                      "with visible sub-tokens (default: the checkpoint's, else false)",
                                      families=("prime",), commands=BOTH)
    # -- the estimator: prime_eval.estimators ------------------------------------------------------------------
    estimator: str | None = setting(None, "arm: exact; mdm: mc, exact_count, chain_rule, sqrt_count, levels and iw "
                                    "(score only); prime: mc, exact_count, legacy_joint (NOT a bound), sqrt_count, "
                                    "levels and iw (score only)", commands=BOTH)
    samples: int = setting(None, "Monte Carlo samples K per request (score: the cap when adaptive) or per block "
                           "(ppl); ignored by exact and chain_rule", commands=BOTH,
                           by_command={"score": 128, "ppl": 1}, check=_at_least(1), flag="--samples")
    seed: int = setting(None, "Monte Carlo seed: each request's (block's) generator is derived from it",
                        commands=BOTH, by_command={"score": 1234, "ppl": 0}, flag="--seed")
    eps: float | None = setting(None, "time floor ε: t = ε + (1-ε)u (ppl's default is MDLM's 1e-3)",
                                families=DIFFUSION, commands=BOTH, by_command={"ppl": 1e-3},
                                check=lambda v: None if 0.0 <= v < 1.0 else "must lie in [0, 1)", flag="--eps")
    T: int | None = setting(None, "T-step discrete-time bound (none or 0: continuous time)",
                            families=DIFFUSION, commands=BOTH, check=_at_least(0), flag="--T")
    cfg: float | None = setting(None, "classifier-free guidance scale (mdm: scoring and generation; prime with "
                                "legacy_joint): NOT a likelihood, flagged is_bound: false", families=DIFFUSION)
    temperature: float | None = setting(None, "legacy_joint only: the published v2 temperature", families=("prime",),
                                        commands=BOTH)
    chunk: str | None = setting(None, "legacy_joint only: published v2 time chunks 'points/sizes'",
                                families=("prime",), commands=BOTH)
    legacy_scope: str | None = setting(None, "legacy_joint only: all (v2) or masked (v1 carry-over)",
                                       families=("prime",), commands=BOTH, choices=("all", "masked"))
    orders: int | None = setting(None, "iw only: K orders (the samples of iw; default: samples)", families=DIFFUSION,
                                 check=_at_least(1))
    proposal: str | None = setting(None, "iw only: the order proposal, uniform or pl (Plackett–Luce on the "
                                   "model's confidences)", families=DIFFUSION, choices=("uniform", "pl"))
    tau: float | None = setting(None, "iw only: Plackett–Luce temperature (default 1)", families=DIFFUSION,
                                check=_positive)
    # -- how requests are sampled and stopped (score) -------------------------------------------------------
    crn: bool = setting(True, "common random numbers: the choices of a document share its seed sha256(seed, task, "
                        "doc_id), so they see the same t_k and draws; false: sha256(seed, context, continuation)")
    adaptive: bool | None = setting(None, "auto (true for Monte Carlo mean estimators), true or false: rounds of "
                                    "round_samples, doubling the total, until the ranking of a document's "
                                    "choices is settled at `confidence`, capped at samples (prime_eval.adaptive)")
    round_samples: int = setting(16, "adaptive: samples of the first round", check=_at_least(1))
    confidence: float = setting(0.99, "adaptive: level of the paired test that settles a ranking, in (0.5, 1)",
                                check=lambda v: None if 0.5 < v < 1 else "must lie in (0.5, 1), e.g. 0.99")
    target_se: float | None = setting(None, "adaptive: also stop once every choice's Monte Carlo SE is at most "
                                      "this (nats)", check=_positive)
    futility_after: int = setting(64, "adaptive: after this many samples a near tie (z below 1 even at the cap) "
                                  "stops", check=_at_least(0))
    greedy: bool | None = setting(None, "is_greedy by greedy unmasking: auto (only documents with one request, "
                                  "e.g. lambada), true (always), false (never)", families=DIFFUSION)
    # -- generation (generate_until tasks): prime_eval.generation ------------------------------------------------
    max_gen_toks: int = setting(256, "generate_until: tokens generated at most when the task does not say (lm-eval "
                                "hf's max_gen_toks); the prompt keeps max_length - max_gen_toks tokens",
                                check=_at_least(1))
    gen_length: int | None = setting(None, "answer length in tokens of the diffusion samplers (default: the "
                                     "request's max_gen_toks; never more)", families=DIFFUSION, check=_at_least(1))
    steps: int | None = setting(None, "diffusion sampling steps per answer (default: the answer's length in "
                                "tokens); a multiple of the number of blocks", families=DIFFUSION,
                                check=_at_least(1))
    block_length: int | None = setting(None, "semi-autoregressive blocks of this many tokens, sampled left to right, "
                                       "steps/blocks steps each (LLaDA; default: one block)", families=DIFFUSION,
                                       check=_at_least(1))
    remasking: str = setting("low_confidence", "tokens revealed per step: low_confidence (LLaDA: the most "
                             "confident), random (LLaDA: uniformly chosen), ancestral (MDLM: each masked token with "
                             "probability (α_s-α_t)/(1-α_t))", families=("mdm",),
                             choices=("low_confidence", "random", "ancestral"))
    chunk_point: float | None = setting(None, "Prime sampler: while t > chunk_point a token's masked sub-tokens are "
                                        "revealed together (the release's chunk_pt; 0 = whole tokens always; default "
                                        "none: each sub-token on its own)", families=("prime",),
                                        check=lambda v: None if 0.0 <= v <= 1.0 else "must lie in [0, 1]")
    # -- the machine: none of these changes a number -------------------------------------------------------
    rows_per_pass: int | None = setting(None, "network rows per forward pass (score's default: an integer "
                                        "--batch_size, else 64); part of every pass's shape: keep it to reproduce "
                                        "the last bits", commands=BOTH,
                                        by_command={"ppl": 16},
                                        check=_at_least(1), flag="--rows-per-pass")
    chunk_rows: int | None = setting(None, "forward rows per chunk of requests (default 8 × rows_per_pass); the "
                                     "results of a chunk are stored together, so a killed run loses at most "
                                     "one chunk", check=_at_least(1))
    max_logits_mb: float = setting(2048, "size cap of one chunk, as the MB of its logits (arm holds them; "
                                   "mdm and prime reduce them as they come)", check=_positive)
    pack: str = setting("bucket", "rows sharing a pass: bucket (padded to a multiple of 32 tokens; ARM: "
                        "documents packed side by side, each context once), length (one length), request (each "
                        "request in passes of its own: the same bits as bucket); a request's numbers never depend on "
                        "what shares its passes", choices=PACKING)
    max_length: int | None = setting(None, "token window (default: the network's); longer inputs are "
                                     "left-truncated and counted", check=_at_least(2))
    add_bos: bool | None = setting(None, "auto (what the tokenizer does by default), true or false")
    cache_dir: str | None = setting(None, "resumable SQLite cache of per-request (ppl: per-block) "
                                    "results (docs/scale-out.md); also --cache-dir", commands=BOTH, flag="--cache-dir")
    batch_size: str | None = setting(None, "lm-eval's --batch_size: an integer is the default rows_per_pass")
    max_batch_size: int | None = setting(None, "lm-eval's --max_batch_size (not used)")

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, values: dict, *, family: str, command: str = "score",
              estimators: tuple[str, ...] | None = None) -> "Settings":
        """Validated settings from `values` (strings as in `k=v` model_args, or Python values; None = not given).

        Unknown names, names of another family or command, bad values and bad combinations raise `UserError`.
        `estimators`: the estimator names this command accepts for `family` (checked when given).
        """
        if family not in FAMILIES:
            raise UserError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
        values = {k: v for k, v in values.items() if v is not None and v != ""}
        for alias, name in ALIASES.items():
            if alias in values:
                if name in values and values[name] != values[alias]:
                    raise UserError(f"{alias} is another name of {name}; give one of them")
                values[name] = values.pop(alias)
        known = cls.fields_for(family, command)
        unknown = sorted(set(values) - {f.name for f in known})
        if unknown:
            raise UserError(_unknown_text(unknown, family, command))
        parsed = {f.name: _parse(f, values[f.name]) if f.name in values else _default(f, command) for f in known}
        return cls(**_resolve(parsed, set(values), family, command, estimators))

    @classmethod
    def fields_for(cls, family: str, command: str) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls)
                if family in f.metadata["families"] and command in f.metadata["commands"]]

    # -- derived values -------------------------------------------------------------------------------------------
    def is_adaptive(self, estimator_is_mc_mean: bool) -> bool:
        """adaptive=auto: on for Monte Carlo mean estimators."""
        return estimator_is_mc_mean if self.adaptive is None else self.adaptive

    def resolved_rows_per_pass(self) -> int:
        if self.rows_per_pass is not None:
            return self.rows_per_pass
        return int(self.batch_size) if str(self.batch_size).isdigit() and int(self.batch_size) > 0 else 64

    def resolved_chunk_rows(self) -> int:
        return self.chunk_rows if self.chunk_rows is not None else 8 * self.resolved_rows_per_pass()

    def estimator_options(self, command: str = "score") -> dict:
        """Options for `prime_eval.estimators.get_estimator` that were set (the estimator's defaults otherwise)."""
        names = ("eps", "T", "cfg", "temperature", "chunk", "legacy_scope", "proposal", "tau")
        if command == "ppl":  # ε and T are part of ppl's protocol (prime_eval.perplexity.Protocol)
            names = ("temperature", "chunk", "legacy_scope")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def generation_options(self, family: str) -> dict:
        """The sampler settings of `prime_eval.generation` for `family` (None: the request decides)."""
        if family == "arm":
            return {}
        opts = {"gen_length": self.gen_length, "steps": self.steps, "block_length": self.block_length}
        if family == "mdm":
            opts.update(remasking=self.remasking, cfg=self.cfg or 0.0)
        else:
            opts.update(chunk_point=self.chunk_point)
        return opts

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _default(f: dataclasses.Field, command: str):
    return f.metadata["by_command"].get(command, f.default)


def _resolve(s: dict, given: set, family: str, command: str, estimators) -> dict:
    """The estimator's default, and the checks that involve several settings (all before any loading)."""
    est = s["estimator"] = s["estimator"] or DEFAULT_ESTIMATOR[command][family]
    if estimators is not None and est not in estimators:
        raise UserError(f"estimator={est} is not available for `{family}` in `prime-eval {command}`; choose one of "
                        f"{', '.join(estimators)}")
    iw = sorted(k for k in IW_OPTIONS if k in given)
    if iw and est != "iw":
        raise UserError(f"{iw} apply only to estimator=iw")
    legacy = sorted(k for k in LEGACY_OPTIONS if k in given) + (["cfg"] if family == "prime" and s.get("cfg") else [])
    if legacy and est != "legacy_joint":
        raise UserError(f"{', '.join(legacy)}: not likelihoods; accepted only with estimator=legacy_joint (to "
                        "reproduce the published Prime-v2 score)")
    if est == "iw" and s.get("orders") is not None:
        if "samples" in given and s["samples"] != s["orders"]:
            raise UserError(f"orders={s['orders']} and samples={s['samples']}: orders is iw's number of samples; "
                            "give one of them")
        s["samples"] = s["orders"]
    if s.get("adaptive") and not adaptive_applies(est):
        raise UserError(f"adaptive=true needs a Monte Carlo mean estimator, not {est}; drop adaptive or choose "
                        "mc or exact_count")
    if s.get("gen_length") and s.get("steps"):  # the blocks of a known answer length (else checked per request)
        block = min(s.get("block_length") or s["gen_length"], s["gen_length"])
        blocks = -(-s["gen_length"] // block)
        if s["steps"] % blocks:
            raise UserError(f"steps={s['steps']} is not a multiple of the {blocks} blocks of block_length={block} in "
                            f"gen_length={s['gen_length']}; choose steps as a multiple of {blocks}")
    if s.get("T") == 0:
        s["T"] = None  # 0 = continuous time (ppl's --T 0)
    perm = s.get("permutation")
    if perm is not None and perm != "identity" and not Path(perm).is_file():
        raise UserError(f"permutation file not found: {perm}; pass the release's perm_<b^ℓ>.pt, or "
                        "permutation=identity")
    return s


def _parse(f: dataclasses.Field, raw):
    """One value of field `f`, from a string or a Python value; then its choices and check."""
    kind = str(f.type).replace(" | None", "")
    try:
        if kind == "bool":
            if "None" in str(f.type) and str(raw).strip().lower() == "auto":  # tri-state: None = auto
                value = None
            else:
                try:
                    value = parse_bool(raw, f.name)
                except UserError:
                    raise ValueError from None
        elif kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(raw) if not isinstance(raw, str) else int(raw.strip())
        elif kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        else:  # a config may also be a dict or config instance from Python
            value = raw if f.name == "config" and (isinstance(raw, dict) or dataclasses.is_dataclass(raw)) \
                else str(raw)
    except (TypeError, ValueError):
        want = {"int": "an integer", "float": "a number", "bool": "true or false" + (" or auto" if "None" in
                                                                                     str(f.type) else "")}
        raise UserError(f"{f.name}={raw!r}: expected {want.get(kind, kind)} ({f.name}: {f.metadata['help']})") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise UserError(f"{f.name}={raw!r}: choose one of {', '.join(choices)}")
    if f.name == "dtype":
        value = DTYPES[value]
    check = f.metadata["check"]
    problem = check(value) if check and value is not None else None
    if problem:
        raise UserError(f"{f.name}={raw!r}: {problem} ({f.name}: {f.metadata['help']})")
    return value


def _unknown_text(unknown: list[str], family: str, command: str) -> str:
    """'unknown model argument(s) [...]', with where each known-elsewhere name applies, then the known names."""
    by_name = {f.name: f for f in dataclasses.fields(Settings)}
    notes = []
    for name in unknown:
        f = by_name.get(name)
        if f is None:
            continue
        if family not in f.metadata["families"]:
            notes.append(f"{name} applies to {', '.join(f.metadata['families'])} models, not {family}")
        else:
            notes.append(f"{name} is a setting of `prime-eval {'/'.join(f.metadata['commands'])}`, not of "
                         f"`{command}`")
    known = ", ".join(f.name for f in Settings.fields_for(family, command))
    return (f"unknown model argument(s) {unknown} for `{family}` in `{command}`"
            + (f" ({'; '.join(notes)})" if notes else "") + f"; known: {known} (prime-eval {command} --help)")


def merge_lm_eval_args(model_args: dict, additional: dict | None) -> dict:
    """lm-eval's `create_from_arg_string` merge (`cls(**args, **additional)`, None values dropped), where a setting
    given both in model_args and by lm-eval's CLI (--device, --batch_size) is allowed only with the same value:
    lm-eval itself fails there with `TypeError: got multiple values for keyword argument`."""
    merged = dict(model_args)
    for k, v in (additional or {}).items():
        if v is None:
            continue
        if k in merged and merged[k] is not None and str(merged[k]) != str(v):
            raise UserError(f"{k} is given twice, as --{k} {v} and in model_args ({k}={merged[k]}); give it in one "
                            "place")
        merged[k] = v
    return merged


def describe_default(f: dataclasses.Field, command: str) -> str:
    """A field's default as `--help` shows it."""
    if f.name == "estimator":
        d = DEFAULT_ESTIMATOR[command]
        return (d["mdm"] if d["mdm"] == d["prime"] else f"mdm {d['mdm']}, prime {d['prime']}") + " (arm: exact)"
    d = _default(f, command)
    if d is None:
        return "auto" if str(f.type) == "bool | None" else "-"
    return str(d).lower() if isinstance(d, bool) else str(d)


def help_text(command: str, family: str | None = None) -> str:
    """The settings of `command` for `--help` and the docs: one line per field (name, default, help, families)."""
    lines = []
    for f in dataclasses.fields(Settings):
        fams = f.metadata["families"]
        if command not in f.metadata["commands"] or (family and family not in fams):
            continue
        where = ("" if fams == FAMILIES else f" [{', '.join(fams)}]") + (
            f" [{f.metadata['flag']}]" if command == "ppl" and f.metadata["flag"] else "")
        lines.append(f"  {f.name:<15} {describe_default(f, command):<20} {f.metadata['help']}{where}")
    return "\n".join(lines)


def ppl_flags() -> list[dataclasses.Field]:
    """The settings that `prime-eval ppl` also takes as flags (`--samples` is `samples=`)."""
    return [f for f in dataclasses.fields(Settings) if f.metadata["flag"] and "ppl" in f.metadata["commands"]]


if __name__ == "__main__":  # python -m prime_eval.settings score|ppl: the block docs/adapters.md quotes
    import sys

    print(help_text(sys.argv[1] if len(sys.argv) > 1 else "score"))
