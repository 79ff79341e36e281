"""Every number the README and docs quote matches what its command prints today (docs/numbers.py)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def numbers(shared_data):
    import os

    os.environ["PRIME_EVAL_DATA"] = str(shared_data)
    spec = importlib.util.spec_from_file_location("docs_numbers", ROOT / "docs" / "numbers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["docs_numbers"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quoted_numbers_are_current(numbers):
    problems = numbers.check()
    assert not problems, "\n".join(problems)


def test_a_stale_quote_is_caught_and_rewritten(numbers, tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("PPL <!-- numbers:x -->41<!-- /numbers --> here\n", encoding="utf-8")
    q = numbers.Quote("x", ("README.md",), "echo 42", lambda: "42")
    monkeypatch.setattr(numbers, "QUOTES", {"x": q})
    (problem,) = numbers.check(root=tmp_path)
    assert "stale" in problem and "'41'" in problem and "'42'" in problem
    assert numbers.write(root=tmp_path) == ["README.md"]
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "PPL <!-- numbers:x -->42<!-- /numbers --> here\n"
    assert numbers.check(root=tmp_path) == []
    # a measured quote is regenerated only on request and never compared
    monkeypatch.setattr(numbers, "QUOTES", {"x": numbers.Quote("x", ("README.md",), "time", lambda: "9 s", measured=True)})
    assert numbers.check(root=tmp_path) == [] and numbers.write(root=tmp_path) == []
    assert numbers.write(root=tmp_path, measured=True) == ["README.md"]


def test_a_quote_made_on_another_cpu_is_current_and_a_changed_number_is_not(numbers):
    """The ppl example's interval printed 21590.6915 on one CPU and 21590.6916 on another (other float kernels): the
    same quote. One changed digit further left, or changed text, is a stale quote."""
    a = "ppl_ci95: [21590.6915, 42198.5382], tokens 4,096"
    assert numbers.same(a, "ppl_ci95: [21590.6916, 42198.5383], tokens 4,096")
    assert not numbers.same(a, "ppl_ci95: [21590.7915, 42198.5382], tokens 4,096")
    assert not numbers.same(a, "ppl_ci95: [21590.6915, 42198.5382], tokens 4,097")
    assert not numbers.same(a, "ppl_ci95: [21590.6915, 42198.5382], blocks 4,096")
    assert not numbers.same("+9.6 (+25%)", "+9.7 (+25%)")


def test_edits_made_while_a_measurement_runs_are_kept(numbers, tmp_path, monkeypatch):
    """`--write --measured` runs benchmarks for minutes; it used to read the file, measure, then write back what it had
    read, so a paragraph edited meanwhile was silently reverted."""
    doc = tmp_path / "README.md"
    doc.write_text("old prose <!-- numbers:x -->1<!-- /numbers -->\n", encoding="utf-8")

    def measure() -> str:
        doc.write_text(doc.read_text(encoding="utf-8").replace("old prose", "new prose"), encoding="utf-8")
        return "2"

    monkeypatch.setattr(numbers, "QUOTES", {"x": numbers.Quote("x", ("README.md",), "time", measure, measured=True)})
    assert numbers.write(root=tmp_path, measured=True) == ["README.md"]
    assert doc.read_text(encoding="utf-8") == "new prose <!-- numbers:x -->2<!-- /numbers -->\n"
