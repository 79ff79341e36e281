"""The format-independent table model every renderer draws: cells, tables, footnotes, number formats."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prime_eval.report.conventions import family_key


@dataclass
class Cell:
    main: str = ""            # point value as text; "" = missing
    unc: str = ""             # "[5.7, 51.0]" (95% interval) or "± 0.061"
    prefix: str = ""          # "≤" for upper bounds
    marker: str = ""          # "†" when a paired interval excludes 0
    bold: bool = False
    note: str = ""            # footnote letter
    value: float | None = None
    detail: str = ""          # small print after the interval, e.g. "n=20" in a column of mixed n


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


@dataclass
class Report:
    title: str
    tables: list[Table]
    notes: list[str]
    plots: dict = field(default_factory=dict)   # name -> (caption, png bytes)


class Notes:
    """Footnote letters of one table: the same text gets the same letter."""

    def __init__(self):
        self.texts: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        for k, v in self.texts.items():
            if v == text:
                return k
        k = "abcdefghijklmnopqrstuvwxyz"[len(self.texts)] if len(self.texts) < 26 else str(len(self.texts) + 1)
        self.texts[k] = text
        return k


@dataclass
class Label:
    """A row label with footnote letters (renderers set the letters as superscripts; Markdown: "mdm[a,b]")."""
    text: str
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.text}[{','.join(self.notes)}]" if self.notes else self.text


def with_notes(label: str, letters: list[str]) -> Label:
    """`label` with the footnote letters (each once, in order)."""
    return Label(label, list(dict.fromkeys(x for x in letters if x)))


def fmt_params(x: float | None) -> str:
    if not x:
        return ""
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.0f}"


def fmt_ppl(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def fmt_interval(lo: float, hi: float, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """"[5.7, 51.0]": the ends of a 95% interval, in percent by default."""
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"[{f.format(scale * lo)}, {f.format(scale * hi)}]"


def fmt_csv(x) -> str:
    """Stable number format for CSV."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.6f}"


def sorted_runs(runs: list) -> list:
    """Rows in the order of the tables: family, size, label."""
    return sorted(runs, key=lambda r: (family_key(r.family), r.params or 0.0, r.display))


def bold_best(rows: list, start: int, higher: bool) -> None:
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
