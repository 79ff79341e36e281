"""Is a demo report what the demo produces? Compare two demo output folders up to wall times and absolute paths.

    prime-eval demo --out /tmp/demo-check --compare reports/demo   # a fresh run (defaults) against the committed one
    python -m prime_eval.demo.reproduce reports/demo OTHER         # two existing output folders

Compared: the set of files (dates in lm-eval's file names masked), demo.json and the perplexity JSONs with their
volatile fields removed (wall times, absolute paths, whether the models came from the cache), and every other text
file (report, CSVs, data, task YAMLs, lm-eval samples and statistics) byte for byte after masking absolute paths
and the dates in lm-eval's file names.
lm-eval's results JSONs hold dates, timings and the environment; the numbers in them reach the report and its CSVs,
which are compared. Plots (PNG) are compared by their bytes too (matplotlib writes no timestamp).
Exit status 1 and one line per difference when the folders differ.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

VOLATILE_KEYS = {"timings", "seconds", "tokenizer_seconds", "train_seconds", "tokens_per_second", "cached", "versions"}
DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d+")
SKIP = re.compile(r"(runs/lm_eval|generation)/.*/results_[^/]*\.json$")


def comparable(obj, keys=VOLATILE_KEYS):
    """`obj` (parsed JSON) without the volatile keys, at any depth; absolute paths replaced by "<path>", lm-eval's file
    dates by "<date>"."""
    if isinstance(obj, dict):
        return {k: comparable(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [comparable(v, keys) for v in obj]
    if isinstance(obj, str):
        return "<path>" if obj.startswith("/") else DATE.sub("<date>", obj)
    return obj


def _files(root: Path) -> dict[str, Path]:
    return {DATE.sub("<date>", str(p.relative_to(root))): p for p in sorted(root.rglob("*")) if p.is_file()}


def _mask(text: str, root: Path) -> str:
    """The text with the folder's absolute path and lm-eval's file dates masked."""
    return DATE.sub("<date>", text.replace(str(root.resolve()), "<out>"))


def _diff_json(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += _diff_json(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff_json(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {json.dumps(a)[:80]} != {json.dumps(b)[:80]}"]


def compare(a: str | Path, b: str | Path) -> list[str]:
    """One line per difference between two demo output folders (empty when they are the same run up to wall
    times and paths)."""
    a, b = Path(a), Path(b)
    fa, fb = _files(a), _files(b)
    out = [f"{name}: only in {a if name in fa else b}" for name in sorted(set(fa) ^ set(fb))]
    for name in sorted(set(fa) & set(fb)):
        if SKIP.search(name):
            continue
        pa, pb = fa[name], fb[name]
        if name == "demo.json" or name.startswith("runs/ppl/"):
            diffs = _diff_json(comparable(json.loads(pa.read_text())), comparable(json.loads(pb.read_text())))
            out += [f"{name}{d}" for d in diffs[:10]]
        elif pa.suffix == ".png":
            if pa.read_bytes() != pb.read_bytes():
                out.append(f"{name}: the images differ")
        elif _mask(pa.read_text(), a) != _mask(pb.read_text(), b):
            out.append(f"{name}: the texts differ")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="a demo output folder, e.g. reports/demo")
    ap.add_argument("b", help="another one")
    args = ap.parse_args(argv)
    return report(compare(args.a, args.b), args.a, args.b)


def kernels_note(a: str | Path, b: str | Path) -> str | None:
    """Why two demo folders may differ everywhere although both runs are right: they computed with different float
    kernels (`numerics.mismatch_note`); None when the kernels agree or a folder has no demo.json."""
    from prime_eval.demo.numerics import mismatch_note

    runs = [Path(x) / "demo.json" for x in (a, b)]
    if not all(p.is_file() for p in runs):
        return None
    theirs, ours = (json.loads(p.read_text()).get("numerics") for p in runs)
    return mismatch_note(ours, theirs)


def report(diffs: list[str], a, b) -> int:
    """Print the differences (and, when the two runs used different float kernels, that this is why); 1 when
    there are any."""
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s) between {a} and {b} (up to wall times and absolute paths)")
    note = kernels_note(a, b) if diffs else None
    if note:
        print(f"note: {note}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
