"""The layout is what docs/ARCHITECTURE.md says: every module listed (and every listed module there), and imports
pointing one way: the library never imports the command line or the adapters. (That the report never imports torch
is checked at run time in tests/test_report.py.)"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for base in ("prime_eval", "model_adapters")
                  for p in (ROOT / base).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_architecture_lists_every_module_and_only_existing_ones():
    text = DOC.read_text(encoding="utf-8")
    listed = set(re.findall(r"`((?:prime_eval|model_adapters)/[\w/]+\.py)`", text))
    modules = set(_modules())
    assert not modules - listed, f"modules missing from docs/ARCHITECTURE.md: {sorted(modules - listed)}"
    assert not listed - modules, f"docs/ARCHITECTURE.md lists modules that do not exist: {sorted(listed - modules)}"


def test_the_library_imports_neither_the_command_line_nor_the_adapters():
    bad = []
    for rel in _modules():
        if not rel.startswith("prime_eval/") or rel.startswith("prime_eval/commands/") or rel == "prime_eval/cli.py":
            continue
        for name in _imports(ROOT / rel):
            if name == "model_adapters" or name.startswith(("model_adapters.", "prime_eval.commands")):
                bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)

