"""The progress bar of a perplexity run: a callback for `evaluate_perplexity(progress=...)`, used by `prime-eval ppl`
and by the demo (one bar, one place; the library never imports the command layer).

    with PplProgressBar(console, label="MDM · mc") as bar:
        result = evaluate_perplexity(..., progress=bar)
"""
from __future__ import annotations

import math

from prime_eval.intervals import ppl_interval


class PplProgressBar:
    """A rich progress bar with the running estimate: documents read (or tokens, with --max-tokens) over the total,
    NLL ± its between-block SE, PPL, blocks and tokens. Call it with each `prime_eval.perplexity.Progress`;
    `label` names the run at the left (default "ppl")."""

    def __init__(self, console=None, label: str = "ppl"):
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(SpinnerColumn(), TextColumn(f"[bold]{escape(label)}[/]"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[est]}"), console=console or Console(stderr=True),
                            transient=False)
        self.task = None

    def __enter__(self) -> PplProgressBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, p) -> None:
        by_tokens = bool(p.max_tokens)
        if self.task is None:
            self.task = self.bar.add_task("ppl", total=p.max_tokens if by_tokens else p.total_docs,
                                          unit="tokens" if by_tokens else "docs", est="")
        if p.blocks == 0:
            return
        se = p.stderr_sampling
        est = (f"NLL {p.nll:.4f}" + (f" ± {se:.4f}" if math.isfinite(se) else "")
               + f"  PPL {ppl_interval(p.nll, 0.0)[0]:.3f}  blocks {p.blocks}  tokens {p.tokens:,}")
        self.bar.update(self.task, completed=p.tokens if by_tokens else p.docs, est=est)
