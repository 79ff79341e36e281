"""Float kernels that give the same bits on every x86-64 CPU with AVX2, so that the demo reproduces off the machine
that made the committed report.

Training amplifies last-bit differences into different weights (hundreds of optimizer steps), and the float
kernels differ between CPUs: measured, the demo's ARM trained to different weights under torch's AVX2 and AVX-512
kernels, and the whole demo then differed in 112 values from a report made on another CPU. Two documented switches
pin the kernels:

    MKL_CBWR=AVX2              MKL's conditional numerical reproducibility: its AVX2 code branch on any CPU that has
                               one (the matrix products)
    ATEN_CPU_CAPABILITY=avx2   torch's own vectorised kernels (softmax, norms, exp/log, reductions) at AVX2

Both are read once, at the first computation of the process: `pin()` must run before torch computes anything
(`prime-eval demo` calls it first). Measured here: the same ARM weights with MKL limited to AVX2
(`MKL_ENABLE_INSTRUCTIONS=AVX2`, an AVX2-only CPU as MKL sees it) as with AVX-512 available, and training
within a few percent of the unpinned speed. A value the user set is kept.
"""
from __future__ import annotations

import os
import platform

PINNED = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def pin() -> None:
    """Set the pinned kernels for this process (x86-64 only; a variable the user set is left alone)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        for k, v in PINNED.items():
            os.environ.setdefault(k, v)


def state() -> dict:
    """The kernels this process computes with: torch's CPU capability as torch reports it, MKL's branch as set in
    the environment, and `pinned` (both as `PINNED`). Call after the first computation: torch reads its variable
    then."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    mkl = os.environ.get("MKL_CBWR")
    return {"torch_cpu_capability": cap, "MKL_CBWR": mkl,
            "pinned": cap.lower() == PINNED["ATEN_CPU_CAPABILITY"] and mkl == PINNED["MKL_CBWR"]}


def tag() -> str:
    """The kernels in a folder name: `avx2-mkl_avx2` when pinned, e.g. `avx512-mkl_auto` when not."""
    s = state()
    return f"{s['torch_cpu_capability'].lower()}-mkl_{(s['MKL_CBWR'] or 'auto').lower()}"


def mismatch_note(ours: dict | None, theirs: dict | None) -> str | None:
    """Why two demo runs may differ although both are correct: they computed with different float kernels (None
    when the kernels agree)."""
    if ours == theirs:
        return None

    def show(s):
        return "not recorded" if not s else f"torch {s['torch_cpu_capability']}, MKL_CBWR={s['MKL_CBWR']}"

    return (f"the two runs used different float kernels ({show(theirs)} vs {show(ours)}): training turns their "
            "last-bit differences into other weights, so every number may differ. Only runs made with the same "
            "kernels reproduce each other; `prime-eval demo` pins them (MKL_CBWR=AVX2, ATEN_CPU_CAPABILITY=avx2) "
            "before torch starts.")
