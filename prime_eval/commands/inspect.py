"""`prime-eval inspect CHECKPOINT`: what the loader detects in a checkpoint, from tensor shapes and metadata only."""
from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Describe a checkpoint without loading its weights: the architecture and family the loader detects (ARM, MDM,
MDM-Prime), the config name or dimensions, parameter count, vocabulary size, mask id, sub-token length ℓ and base b,
whether a token permutation file is needed, and whether EMA weights are present. Shapes decide what they can; the
options supply the rest (for instance n_head of a lit_gpt model that matches no Diff_LLaMA config). Every config
field the checkpoint does not determine is listed: "inferred" (from the shapes, a config.json or a release layout,
with the evidence) and "ASSUMED" (a default nothing in the checkpoint confirms, with how to override it).

Supported: lit_gpt `.pth` / `.safetensors` (SMDM, MDM-Prime-v2 SlimPajama), MDLM / MDM-Prime v1 Lightning `.ckpt`,
Hugging Face model directories and hub ids, Megatron C4 runs (ARM, MDM, MDM-Prime-v2: `torch_dist` iteration
directories or their parent, legacy `mp_rank_XX/model_optim_rng.pt`; see docs/checkpoints.md)."""

EPILOG = """\
examples:
  prime-eval inspect mdm-prime-v2-3300flops-weight-only.pth
  prime-eval inspect mdm-1028M-3300e18-rsl-0.01-bs-1024.safetensors --json
  prime-eval inspect text/owt/results_prime_l2_co_owt/checkpoint.ckpt
  prime-eval inspect tiny.safetensors --config 'n_head=4' --family prime --ell 7
  prime-eval inspect smollm-lit.safetensors --config 'n_head=9;rope_base=100000'   # a Llama converted to lit_gpt
  prime-eval inspect model.safetensors --tokenizer ../shared/data/tokenizers/llama2   # also checks the vocabulary
  prime-eval inspect checkpoints/prime_param_1107M_iter_87500                         # Megatron: size tag, layout, π
"""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="describe a checkpoint: family, config, params, vocabulary, ℓ, b",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .pth / .pt / .safetensors / Lightning .ckpt file, a Hugging Face model directory or hub "
                        "id, a Megatron checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the detection as one JSON object instead of a table")
    p.add_argument("--family", choices=["arm", "mdm", "prime"],
                   help="expected family; an error if the shapes say otherwise")
    p.add_argument("--format", help="architecture (lit_gpt, mdlm, megatron, hf) or container (torch, safetensors, "
                                    "lightning, torch_dist, megatron-torch); default: detected")
    p.add_argument("--config", help="config name (Diff_LLaMA_1028M, 1028, small) or field overrides 'k=v;k=v' "
                                    "(e.g. 'n_head=4;vocab_size=100'; lit_gpt also n_query_groups, rope_base, "
                                    "rope_bf16, norm_eps, block_size, tie_embeddings)")
    p.add_argument("--ell", type=int, help="sub-tokens per token ℓ, where the shapes are ambiguous")
    p.add_argument("--base", type=int, help="sub-token base b, where the shapes are ambiguous")
    p.add_argument("--carry-over", dest="carry_over", choices=["true", "false"],
                   help="MDM-Prime v1 carry-over (default: from the checkpoint's config)")
    p.add_argument("--tokenizer", help="also load this tokenizer (directory, tokenizer.model file or hub id) and "
                                       "check its size against the checkpoint's vocabulary")
    p.add_argument("--sha256", action="store_true", help="also compute the checkpoint's content hash (reads it all)")
    return p


def main(args) -> int:
    from prime_eval.checkpoints import checkpoint_sha256, inspect_checkpoint, load_tokenizer

    info = inspect_checkpoint(args.checkpoint, family=args.family, format=args.format, config=args.config,
                              ell=args.ell, base=args.base,
                              carry_over=None if args.carry_over is None else args.carry_over == "true")
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer, vocab_size=info["vocab_size"], exact=info["arch"] != "hf")
        info["tokenizer_checked"] = {"tokenizer": args.tokenizer, "size": len(tok), "ok": True}
    if args.sha256:
        info["sha256"] = checkpoint_sha256(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    _print_table(info)
    return 0


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _print_table(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"checkpoint: {info['path']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("family", info["family"]), ("architecture", f"{info['arch']}.{info['network']}"),
        ("format", info["format"]), ("config", info["config"] or "(unnamed)"), ("dimensions", info["dims"]),
        ("parameters", info["params"]), ("non-embedding params", info.get("non_embedding_params")),
        ("vocabulary V", info["vocab_size"]), ("mask id", info["mask_id"]), ("ℓ (ell)", info["ell"]),
        ("b (base)", info["base"]), ("ℓ/b candidates", info.get("ell_candidates")),
        ("needs permutation", info["needs_permutation"]), ("permutation file", info.get("permutation")),
        ("carry-over", info.get("carry_over")), ("EMA present", info["has_ema"]), ("weights used", info["weights"]),
        ("dtype", info["dtype"]), ("max length (tokens)", info["max_length"]), ("tokenizer", info["tokenizer"]),
        ("key prefix stripped", info["key_prefix"]),
        # Megatron C4 family
        ("layout", info.get("layout")), ("iteration", info.get("iteration")),
        ("permutation source", info.get("permutation_source")),
        ("output rows dropped", info.get("extra_output_rows") or None),
    ]
    if "tokenizer_checked" in info:
        rows.append(("tokenizer check", f"{info['tokenizer_checked']['size']} tokens: ok"))
    if "sha256" in info:
        rows.append(("sha256", info["sha256"]))
    for k, v in rows:
        if v is not None or k in ("mask id", "b (base)"):
            table.add_row(k, _fmt(v))
    console = Console()
    console.print(table)
    dims = info.get("dims") or {}
    for field, why in (info.get("inferred") or {}).items():
        console.print(f"[green]inferred:[/green] {field} = {_fmt(dims.get(field))}  ({why})", highlight=False)
    for field, why in (info.get("assumed") or {}).items():
        console.print(f"[bold yellow]ASSUMED:[/bold yellow] {field} = {_fmt(dims.get(field, info.get(field)))}  "
                      f"({why})", highlight=False)
    for note in info["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
