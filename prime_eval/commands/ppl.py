"""`prime-eval ppl`: exact (ARM) or bound (MDM, MDM-Prime) perplexity on OpenWebText or any text.

    prime-eval ppl --model mdm --model_args checkpoint=mdlm.ckpt,tokenizer=gpt2/ --dataset openwebtext -o owt.json
    prime-eval ppl --model prime --model_args checkpoint=prime.pth,tokenizer=llama2/tokenizer.model,\\
        permutation=perm_32768.pt --files wiki.test.txt --L 2048 --samples 4 --max-tokens 200000 -o wiki.json

The protocol (MDLM's, method.md §2) and the JSON are documented in docs/perplexity.md and
`prime_eval.perplexity`; this module only parses, loads the model, opens the result cache and calls
`evaluate_perplexity` with the progress bar of `commands/ppl_display.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from prime_eval.errors import UserError

MODEL_ARGS = {
    "checkpoint": "weights: .pth/.pt/.safetensors/Lightning .ckpt, a transformers folder, a hub id or a Megatron "
                  "checkpoint folder (required)",
    "tokenizer": "tokenizer folder, tokenizer.json or SentencePiece .model (default: the checkpoint for HF models)",
    "estimator": "arm: exact; mdm: mc (default), exact_count, chain_rule; prime: mc (default), exact_count, "
                 "legacy_joint (NOT a bound)",
    "permutation": "Prime: index-shuffling permutation file (perm_<b^ℓ>.pt) or identity; needed by lit_gpt Prime "
                   "releases; a Megatron checkpoint's saved subtokenizer.perm is used (a given file must equal it)",
    "ell": "Prime ℓ where the shapes are ambiguous", "base": "Prime b where the shapes are ambiguous",
    "carry_over": "Prime: restrict the softmax to tokens consistent with visible sub-tokens (default: checkpoint's)",
    "legacy_scope": "legacy_joint: all (v2) or masked (v1 carry-over)",
    "temperature": "legacy_joint only (published v2 evaluation)", "chunk": "legacy_joint only ('points/sizes')",
    "config": "network config name or k=v;k=v overrides",
    "format": "lit_gpt | mdlm | megatron | hf | torch | safetensors | torch_dist | ...",
    "use_ema": "Lightning checkpoints: EMA weights (default true)", "device": "cpu, cuda, cuda:0 (default: cuda if "
    "available)", "dtype": "float32 (default), bfloat16, float16", "name": "model name in the JSON and report",
}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ppl",
        help="exact / bound perplexity on OpenWebText or any text (MDLM protocol)",
        description="Perplexity per token of the model's tokenizer: exact for ARM, an upper bound (the NELBO) for "
        "MDM and MDM-Prime (legacy_joint is labelled as not a bound). Default data: MDLM's OpenWebText validation "
        "set (the last 100,000 documents of the train split), blocks of L = 1024 framed [BOS] ... [EOS]. "
        "Writes the numbers and the full protocol to a JSON file (docs/perplexity.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="model_args (k=v,k=v):\n" + "\n".join(f"  {k:<12} {v}" for k, v in MODEL_ARGS.items()) +
        "\n\nexamples:\n"
        "  prime-eval ppl --model arm --model_args checkpoint=gpt2,tokenizer=gpt2 --max-tokens 1000000 -o a.json\n"
        "  prime-eval ppl --model mdm --model_args checkpoint=mdlm.ckpt,tokenizer=DIR --files test.txt --L 128\n",
    )
    p.add_argument("--model", "-M", required=True, choices=["arm", "mdm", "prime"], help="model family")
    p.add_argument("--model_args", "--model-args", "-a", nargs="+", default=[], metavar="K=V",
                   help="model arguments 'k=v,k2=v2' (see below)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None,
                   help="'openwebtext' (default without --files), a local .txt/.jsonl file or dataset folder, "
                   "or a Hugging Face dataset id / builder (json, parquet, ...)")
    d.add_argument("--dataset-name", default=None, help="dataset configuration name")
    d.add_argument("--split", default=None, help="split, slicing allowed: train[-100000:] (openwebtext's default), "
                   "test, validation[:1000] (default: train)")
    d.add_argument("--text-field", default=None, help="field holding the text (default: text, or the only string "
                   "field of a .jsonl)")
    d.add_argument("--data-files", nargs="+", default=None, help="data_files for a builder dataset such as json")
    d.add_argument("--revision", default=None, help="hub revision (e.g. refs/convert/parquet)")
    d.add_argument("--streaming", action="store_true", help="stream the hub dataset instead of preparing it")
    d.add_argument("--files", nargs="+", default=None, metavar="FILE", help="local .txt / .jsonl files")
    d.add_argument("--txt-docs", choices=["paragraph", "file"], default="paragraph",
                   help=".txt files: one document per blank-line-separated paragraph (default) or per file")
    d.add_argument("--encoding", default="utf-8", help="text encoding of --files (default utf-8; e.g. latin-1)")
    pr = p.add_argument_group("protocol")
    pr.add_argument("--L", type=int, default=1024, help="block length in tokens incl. BOS and EOS (default 1024)")
    pr.add_argument("--no-wrap", action="store_true",
                    help="one block per document ([BOS] doc [EOS], cut at L) instead of concatenate-and-cut")
    pr.add_argument("--samples", "-K", type=int, default=1, help="Monte Carlo samples per block (default 1)")
    pr.add_argument("--eps", type=float, default=1e-3, help="time floor ε: t = ε + (1-ε)u (MDLM 1e-3)")
    pr.add_argument("--T", type=int, default=None, help="discrete-time T-step bound (default: continuous time)")
    pr.add_argument("--seed", type=int, default=0, help="Monte Carlo seed (default 0)")
    pr.add_argument("--strata", type=int, default=16,
                    help="blocks per stratification group of the times (MDLM: 16); 1 = per block only")
    pr.add_argument("--batch-size", "-b", type=int, default=16, help="network rows per forward pass (no effect "
                    "on the numbers)")
    pr.add_argument("--max-tokens", type=int, default=None, help="stop once this many positions are scored")
    pr.add_argument("--target-se", type=float, default=None,
                    help="stop once the relative SE of the NLL (between blocks) is at most this, e.g. 0.001")
    pr.add_argument("--min-blocks", type=int, default=32, help="--target-se never stops before this many blocks")
    pr.add_argument("--bootstrap", type=int, default=1000, help="Poisson bootstrap replicates over blocks (0: off)")
    p.add_argument("--output", "-o", default=None, metavar="FILE.json", help="write the perplexity JSON here")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=os.environ.get("PRIME_EVAL_CACHE_DIR"),
                   metavar="DIR", help="resumable cache of per-block results (SQLite): rerunning the same command "
                   "after a crash or pre-emption recomputes only what is missing (docs/scale-out.md; default: "
                   "$PRIME_EVAL_CACHE_DIR, else off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_model_args(items: list[str]) -> dict:
    """'k=v,k2=v2' words -> dict (lm-eval's simple_parse_args_string: ints, floats, booleans converted)."""
    from lm_eval.utils import simple_parse_args_string

    text = ",".join(a.strip(",") for a in items if a.strip(","))
    try:
        args = simple_parse_args_string(text) if text else {}
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model_args {text!r}: expected k=v,k2=v2 ({e})") from e
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise UserError(f"unknown model_args {', '.join(unknown)}; known: {', '.join(MODEL_ARGS)}")
    return args


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise UserError(f"expected true/false, got {v!r}")


def load_model(family: str, margs: dict) -> tuple:
    """(net, tokenizer, estimator_options, model_info) from model_args."""
    import torch

    from prime_eval.checkpoints import checkpoint_sha256, load_network, load_tokenizer

    if "checkpoint" not in margs:
        raise UserError("--model_args needs checkpoint=PATH (weights file, transformers folder or hub id)")
    ckpt = str(margs["checkpoint"])
    device = margs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    dtype = dtypes.get(str(margs.get("dtype", "float32")).lower())
    if dtype is None:
        raise UserError(f"dtype {margs['dtype']!r}: choose float32, bfloat16 or float16")
    carry = _bool(margs["carry_over"]) if "carry_over" in margs else None
    net, info = load_network(ckpt, family=family, format=margs.get("format"), config=margs.get("config"),
                             ell=margs.get("ell"), base=margs.get("base"), carry_over=carry,
                             use_ema=_bool(margs.get("use_ema", True)), device=device, dtype=dtype)
    tok_spec = margs.get("tokenizer") or (ckpt if info.get("arch") == "hf" else None)
    if tok_spec is None:
        hint = f" (this checkpoint uses the {info['tokenizer']} tokenizer)" if info.get("tokenizer") else ""
        raise UserError(f"--model_args needs tokenizer=PATH{hint}")
    tokenizer = load_tokenizer(tok_spec, vocab_size=net.vocab_size, exact=info.get("arch") != "hf")

    est_opts: dict = {}
    for k in ("legacy_scope", "temperature", "chunk"):
        if k in margs:
            est_opts[k] = margs[k]
    perm_sha = perm_source = None
    if family == "prime":
        from prime_eval.subtokenizer import SubTokenizer, resolve_permutation

        perm, perm_source = resolve_permutation(margs.get("permutation"), net.base ** net.ell,
                                      saved=getattr(net, "saved_perm", None),
                                      required=bool(info.get("needs_permutation")), hint=info.get("permutation"))
        if margs.get("permutation") not in (None, "identity"):
            perm_sha = checkpoint_sha256(margs["permutation"])
        est_opts["subtokenizer"] = SubTokenizer(net.vocab_size, ell=net.ell, base=net.base, perm=perm)
        est_opts["carry_over"] = bool(carry if carry is not None else (info.get("carry_over") or
                                                                       getattr(net, "carry_over", False)))
    elif set(est_opts) or margs.get("permutation"):
        raise UserError(f"{', '.join(sorted(set(est_opts) | ({'permutation'} & set(margs))))} apply to Prime only")
    model = {"name": str(margs.get("name") or Path(ckpt).name or ckpt), "family": family, "checkpoint": ckpt,
             "checkpoint_sha256": checkpoint_sha256(ckpt), "params": info.get("params"),
             "arch": info.get("arch"), "network": info.get("network"), "config": info.get("config"),
             "format": info.get("format"), "weights": info.get("weights"), "vocab_size": net.vocab_size,
             "ell": getattr(net, "ell", 1), "base": getattr(net, "base", None),
             "permutation": margs.get("permutation"), "permutation_sha256": perm_sha,
             "permutation_source": perm_source,
             "tokenizer": str(tok_spec), "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    return net, tokenizer, est_opts, model


def build_source(args: argparse.Namespace):
    from prime_eval import perplexity as P

    if args.files:
        if args.dataset:
            raise UserError("give --files or --dataset, not both")
        return P.text_files(args.files, text_field=args.text_field, txt_docs=args.txt_docs, encoding=args.encoding)
    ds = args.dataset or "openwebtext"
    local = Path(ds)
    if local.is_file():
        return P.text_files([local], text_field=args.text_field, txt_docs=args.txt_docs, encoding=args.encoding)
    if ds.lower() == "openwebtext" and not (args.split or args.dataset_name or args.data_files):
        return P.openwebtext(streaming=args.streaming, revision=args.revision)
    if ds.lower() == "openwebtext":
        ds = P.OWT_PATH
    return P.hf_dataset(ds, name=args.dataset_name, split=args.split or "train", text_field=args.text_field or "text",
                        streaming=args.streaming, data_files=args.data_files, revision=args.revision)


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    from prime_eval import distributed as D
    from prime_eval import perplexity as P
    from prime_eval.commands.ppl_display import PplProgressBar, summary_table
    from prime_eval.io import check_output_dir

    err = Console(stderr=True, quiet=D.dist_info().rank != 0)  # rank 0 speaks for a data-parallel run
    out = Console(quiet=D.dist_info().rank != 0)
    margs = parse_model_args(args.model_args)
    protocol = P.Protocol(L=args.L, wrap=not args.no_wrap, num_samples=args.samples, eps=args.eps, T=args.T,
                          seed=args.seed, strata=args.strata, max_tokens=args.max_tokens, target_se=args.target_se,
                          min_blocks=args.min_blocks, bootstrap=args.bootstrap)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name such as {args.output}/ppl.json")
    if args.output:  # before any long work: a full disk or read-only folder fails now, not after the run
        check_output_dir(Path(args.output).parent, what="--output")
    if args.cache_dir:
        check_output_dir(args.cache_dir, what="--cache-dir")
    source = build_source(args)  # a bad path fails before the model is loaded
    dist = D.init_distributed(margs.get("device"))
    if dist.enabled:
        margs["device"] = str(D.local_device(dist, margs.get("device")))
    err.print(f"[bold]loading[/] {margs.get('checkpoint')} ..."
              + (f" on {dist.world_size} processes" if dist.enabled else ""))
    net, tokenizer, est_opts, model = load_model(args.model, margs)
    estimator = margs.get("estimator")
    open_cache = None
    if args.cache_dir:
        from prime_eval.cache import ResultCache

        def open_cache(identity):  # the run's identity comes from the library: everything a block's values depend on
            return ResultCache(args.cache_dir, identity, rank=dist.rank)
    bar = PplProgressBar(err) if not args.no_progress and dist.is_main else None
    with bar if bar is not None else contextlib.nullcontext():
        result = P.evaluate_perplexity(net, tokenizer, source, protocol, estimator=estimator,
                                       estimator_options=est_opts, batch_size=args.batch_size, model=model,
                                       progress=bar, open_cache=open_cache)
    if not dist.is_main:
        return 0
    out.print(summary_table(result))
    if result["bound_kind"] == "not_a_likelihood":
        err.print("[bold yellow]warning:[/] this estimator is NOT an upper bound on the NLL (legacy_joint): the "
                  "perplexity can be below the model's true perplexity")
    if args.output:
        path = P.write_json(result, args.output)  # atomic: never a half-written JSON
        err.print(f"wrote {path}")
    return 0
