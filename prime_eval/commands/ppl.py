"""`prime-eval ppl`: exact (ARM) or bound (MDM, MDM-Prime) perplexity on OpenWebText or any text.

    prime-eval ppl --model mdm --model_args checkpoint=mdlm.ckpt,tokenizer=gpt2/ --dataset openwebtext -o owt.json
    prime-eval ppl --model prime --model_args checkpoint=prime.pth,tokenizer=llama2/tokenizer.model,\\
        permutation=perm_32768.pt --files wiki.test.txt --L 2048 --samples 4 --max-tokens 200000 -o wiki.json

The protocol (MDLM's, method.md §2) and the JSON are documented in docs/perplexity.md and
`prime_eval.perplexity`; this module only parses (the settings: `prime_eval.settings`, the same names as in
`prime-eval score`), loads the model (`prime_eval.loading`), opens the result cache and calls `evaluate_perplexity`
with the progress bar of `prime_eval/ppl_progress.py` and the summary table of `commands/ppl_display.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from prime_eval.errors import UserError

# model_args: the settings of `ppl` (prime_eval.settings: one vocabulary with `score`; `--samples` is `samples=`)
FLAG_ALIASES = {"samples": ("-K",), "rows_per_pass": ("--batch-size", "-b"), "cache_dir": ("--cache_dir",)}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from prime_eval.settings import describe_default, help_text, ppl_flags

    p = subparsers.add_parser(
        "ppl",
        help="exact / bound perplexity on OpenWebText or any text (MDLM protocol)",
        description="Perplexity per token of the model's tokenizer: exact for ARM, an upper bound (the NELBO) for "
        "MDM and MDM-Prime (legacy_joint is labelled as not a bound). Default data: MDLM's OpenWebText validation "
        "set (the last 100,000 documents of the train split), blocks of L = 1024 framed [BOS] ... [EOS]. "
        "Writes the numbers and the full protocol to a JSON file (docs/perplexity.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="model_args (k=v,k=v; a setting marked [--flag] can be given as that flag instead):\n"
        + help_text("ppl") + "\n\nexamples:\n"
        "  prime-eval ppl --model arm --model_args checkpoint=gpt2,tokenizer=gpt2 --max-tokens 1000000 -o a.json\n"
        "  prime-eval ppl --model mdm --model_args checkpoint=mdlm.ckpt,tokenizer=DIR --files test.txt --L 128\n",
    )
    p.add_argument("--model", "-M", required=True, choices=["arm", "mdm", "prime"], help="model family")
    p.add_argument("--model_args", "--model-args", "-a", nargs="+", default=[], metavar="K=V",
                   help="settings 'k=v,k2=v2' (see below): the same names as in `prime-eval score`")
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
    pr.add_argument("--strata", type=int, default=16,
                    help="blocks per stratification group of the times (MDLM: 16); 1 = per block only")
    pr.add_argument("--max-tokens", type=int, default=None, help="stop once this many positions are scored")
    pr.add_argument("--target-se", type=float, default=None,
                    help="stop once the relative SE of the NLL (between blocks) is at most this, e.g. 0.001")
    pr.add_argument("--min-blocks", type=int, default=32, help="--target-se never stops before this many blocks")
    pr.add_argument("--bootstrap", type=int, default=1000, help="Poisson bootstrap replicates over blocks (0: off)")
    for f in ppl_flags():  # settings that are flags too: one name, one parser (prime_eval.settings)
        pr.add_argument(f.metadata["flag"], *FLAG_ALIASES.get(f.name, ()), dest=f.name, default=None,
                        metavar=f.name.upper(), help=f"{f.metadata['help']} (= {f.name}= in --model_args; default "
                        f"{describe_default(f, 'ppl')}" + (", else $PRIME_EVAL_CACHE_DIR)" if f.name == "cache_dir"
                                                           else ")"))
    p.add_argument("--output", "-o", default=None, metavar="FILE.json", help="write the perplexity JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def ppl_settings(args: argparse.Namespace):
    """The run's `Settings` from --model_args and the setting flags (--samples, --seed, ...), validated before any
    loading; a setting given both ways must agree."""
    from lm_eval.utils import simple_parse_args_string

    from prime_eval.perplexity import ALLOWED
    from prime_eval.settings import Settings, ppl_flags

    text = ",".join(a.strip(",") for a in args.model_args if a.strip(","))
    try:
        values = simple_parse_args_string(text) if text else {}
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model_args {text!r}: expected k=v,k2=v2 ({e})") from e
    for f in ppl_flags():
        flag = getattr(args, f.name, None)
        if flag is None:
            continue
        if values.get(f.name) is not None and str(values[f.name]) != str(flag):
            raise UserError(f"{f.name} is given twice, as {f.metadata['flag']} {flag} and in --model_args "
                            f"({f.name}={values[f.name]}); give it in one place")
        values[f.name] = flag
    values.setdefault("cache_dir", os.environ.get("PRIME_EVAL_CACHE_DIR") or None)
    return Settings.parse(values, family=args.model, command="ppl", estimators=ALLOWED[args.model])


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
    from prime_eval.commands.ppl_display import summary_table
    from prime_eval.ppl_progress import PplProgressBar
    from prime_eval.io import check_output_dir
    from prime_eval.loading import load_model

    err = Console(stderr=True, quiet=D.dist_info().rank != 0)  # rank 0 speaks for a data-parallel run
    out = Console(quiet=D.dist_info().rank != 0)
    settings = ppl_settings(args)  # every setting checked before anything is read or loaded
    diffusion = {"eps": settings.eps, "T": settings.T} if args.model != "arm" else {}  # ARM: no time, the defaults
    protocol = P.Protocol(L=args.L, wrap=not args.no_wrap, num_samples=settings.samples, seed=settings.seed,
                          strata=args.strata, max_tokens=args.max_tokens, target_se=args.target_se,
                          min_blocks=args.min_blocks, bootstrap=args.bootstrap, **diffusion)
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name such as {args.output}/ppl.json")
    if args.output:  # before any long work: a full disk or read-only folder fails now, not after the run
        check_output_dir(Path(args.output).parent, what="--output")
    if settings.cache_dir:
        check_output_dir(settings.cache_dir, what="--cache-dir")
    source = build_source(args)  # a bad path fails before the model is loaded
    dist = D.init_distributed(settings.device)
    err.print(f"[bold]loading[/] {settings.checkpoint} ..."
              + (f" on {dist.world_size} processes" if dist.enabled else ""))
    bundle = load_model(args.model, settings, device=D.local_device(dist, settings.device))
    est_opts = settings.estimator_options("ppl")
    if bundle.subtokenizer is not None:
        est_opts.update(subtokenizer=bundle.subtokenizer, carry_over=bundle.carry_over)
    open_cache = None
    if settings.cache_dir:
        from prime_eval.cache import ResultCache

        def open_cache(identity):  # the run's identity comes from the library: everything a block's values depend on
            return ResultCache(settings.cache_dir, identity, rank=dist.rank)
    bar = PplProgressBar(err) if not args.no_progress and dist.is_main else None
    with bar if bar is not None else contextlib.nullcontext():
        result = P.evaluate_perplexity(bundle.network, bundle.tokenizer, source, protocol,
                                       estimator=settings.estimator, estimator_options=est_opts,
                                       batch_size=settings.rows_per_pass, model=bundle.describe(), progress=bar,
                                       open_cache=open_cache)
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
