"""`prime-eval` command line: parses arguments and dispatches to one module per subcommand.

Each subcommand lives in `prime_eval/commands/<name>.py` and exposes
`register(subparsers) -> argparse.ArgumentParser` and `main(args) -> int`.
User errors raise `prime_eval.errors.UserError`; they are printed without a traceback unless `--debug` is given.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module) in the order `--help` lists them.
COMMANDS = [
    ("audit", "prime_eval.commands.audit"),
    ("inspect", "prime_eval.commands.inspect"),
    ("score", "prime_eval.commands.score"),
    ("ppl", "prime_eval.commands.ppl"),
    ("report", "prime_eval.commands.report"),
    ("demo", "prime_eval.commands.demo"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prime-eval",
        description="Zero-shot evaluation of diffusion language models (ARM, MDM, MDM-Prime): "
        "lm-eval scores, bound perplexity, exact audits of the estimators, and comparison reports.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, module in COMMANDS:
        mod = importlib.import_module(module)  # a missing module is a bug: it fails here, loudly
        p = mod.register(sub)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    from prime_eval.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"prime-eval {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
