"""Shared fixtures. Real data lives outside the repo; PRIME_EVAL_DATA points at it (set by `make test` / `.ci/run`)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _offline_env(tmp_path_factory):
    """No hub access in tests; datasets caches Arrow files in a temporary HF_HOME."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark splits and tokenizers (../shared/data). Skips off CI when absent; fails in CI."""
    value = os.environ.get("PRIME_EVAL_DATA", str(ROOT.parent / "shared" / "data"))
    path = Path(value)
    if not (path / "SOURCES.md").exists():
        msg = (f"real test data not found at {path}: set PRIME_EVAL_DATA to the folder holding "
               "SOURCES.md, piqa/, tokenizers/gpt2/ ... (`make test` points it at ../shared/data)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path
