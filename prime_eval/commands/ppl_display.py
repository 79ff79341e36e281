"""What `prime-eval ppl` prints at the end: the summary table (its progress bar is the library's
`prime_eval.ppl_progress.PplProgressBar`, shared with the demo).

    with PplProgressBar(console) as bar:
        result = evaluate_perplexity(..., progress=bar)
    console.print(summary_table(result))
"""
from __future__ import annotations

import math

from prime_eval import bound_kind as BK


def summary_table(result: dict):
    """A rich Table of a perplexity result (what `prime-eval ppl` prints at the end)."""
    from rich.table import Table

    r, pr, m = result["results"], result["protocol"], result["model"]
    le = "≤ " if result["bound_kind"] == "upper_bound" else ""
    title = f"perplexity · {m.get('name')} ({m.get('family')}, {pr['estimator']}"
    title += ", NOT a bound: not a likelihood)" if not BK.is_likelihood(result["bound_kind"]) else ")"
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("95% interval", justify="right")
    t.add_row("NLL (nats/token)", f"{le}{r['nll']:.4f} ± {r['nll_stderr']:.4f}",
              f"[{r['nll_ci95'][0]:.4f}, {r['nll_ci95'][1]:.4f}]")
    t.add_row("perplexity", f"{le}{r['ppl']:.3f}", f"[{r['ppl_ci95'][0]:.3f}, {r['ppl_ci95'][1]:.3f}]")
    if r.get("bits_per_byte") is not None:
        t.add_row("bits per byte", f"{le}{r['bits_per_byte']:.4f}",
                  f"[{r['bits_per_byte_ci95'][0]:.4f}, {r['bits_per_byte_ci95'][1]:.4f}]")
    if r.get("nll_ci95_bootstrap"):
        b = r["nll_ci95_bootstrap"]
        t.add_row("NLL bootstrap (blocks)", "", f"[{b[0]:.4f}, {b[1]:.4f}]")
    t.add_row("SE method", r["nll_stderr_method"], "")
    if r.get("nll_stderr_sampling") is not None and math.isfinite(r["nll_stderr_sampling"]):
        t.add_row("SE between blocks (data+MC)", f"{r['nll_stderr_sampling']:.4f}", "")
    t.add_row("tokens / blocks / bytes", f"{r['tokens']:,} / {r['blocks']:,} / {r['bytes']:,}", "")
    t.add_row("dropped tokens", "—" if r["dropped_tokens"] is None else f"{r['dropped_tokens']:,}", "")
    t.add_row("samples per block (K)", str(r["samples_per_block"]), "")
    t.add_row("protocol", f"L={pr['L']} wrap={pr['wrap']} eps={pr['eps']} T={pr['T']} seed={pr['seed']}", "")
    t.add_row("stopped", r["stopped"], "")
    t.add_row("time", f"{r['seconds']:.1f} s ({(r['tokens_per_second'] or 0):,.0f} tokens/s)", "")
    return t
