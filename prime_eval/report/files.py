"""Finding and reading the report's input files: run folders, JSON/JSONL, and the model metadata file (--meta)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterable

from prime_eval.errors import UserError

DATED = re.compile(r"^(samples|stats)_(.+)_([^_]+)\.jsonl$")  # lm-eval's samples_<task>_<date>.jsonl, our stats_


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """All *.json / *.jsonl files given directly or found (recursively) under the given folders, sorted."""
    files = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files += [q for q in p.rglob("*") if q.is_file() and q.suffix in (".json", ".jsonl")
                      and not any(part.startswith(".prime-eval-staging-") for part in q.relative_to(p).parts)]
            # (staging folders hold files of a run still writing, or killed while writing: prime_eval.io)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist: pass lm-eval output folders, results JSONs or ppl JSONs")
    return sorted(set(f.resolve() for f in files))


def common_root(files: list[Path]) -> Path:
    """The deepest folder containing every file (paths in notes are shown relative to it)."""
    if not files:
        return Path(".")
    parents = [f.parent for f in files]
    root = Path(*Path(parents[0]).parts)
    while not all(root == p or root in p.parents for p in parents):
        root = root.parent
    return root


def rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def first_row(path: Path) -> dict:
    """The first JSON line of a file ({} when unreadable)."""
    try:
        with open(path) as fh:
            return json.loads(fh.readline() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def load_meta(path: str | Path | None) -> dict:
    """Model metadata from YAML (mapping name -> {family, params, flops, label}, or a list of such with `name`)
    or CSV (columns name, family, params, flops, label; extra columns ignored). Returns name -> dict."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"metadata file {p} not found: pass a YAML or CSV with one entry per model (name, family, params)")
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        import yaml

        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"metadata file {p} is not valid YAML: {e}") from None
        if isinstance(data, dict) and "models" in data and isinstance(data["models"], (list, dict)):
            data = data["models"]
        rows = [{"name": k, **(v or {})} for k, v in data.items()] if isinstance(data, dict) else list(data)
    meta = {}
    for row in rows:
        if not isinstance(row, dict) or not row.get("name"):
            raise UserError(f"metadata file {p}: every entry needs a 'name' (got {row!r})")
        entry = {}
        for key in ("family", "label"):
            if row.get(key) not in (None, ""):
                entry[key] = str(row[key]).strip()
        for key in ("params", "flops"):
            if row.get(key) not in (None, ""):
                try:
                    entry[key] = float(row[key])
                except (TypeError, ValueError):
                    raise UserError(f"metadata file {p}: {key} of {row['name']} is not a number: {row[key]!r}") from None
        if "family" in entry:
            entry["family"] = entry["family"].lower()
        meta[str(row["name"]).strip()] = entry
    return meta
