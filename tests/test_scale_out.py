"""End to end through the CLI: `prime-eval score` and `prime-eval ppl` give bit-identical per-request results with
1 and 2 processes (torchrun, gloo on CPU), and a run killed with SIGKILL resumes from its cache, recomputing only
what was not stored."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from prime_eval.cache import count_entries
from prime_eval.cli import main as cli_main

pytestmark = pytest.mark.slow
LIMIT, TASKS = "4", "piqa,arc_easy"  # 8 + 16 loglikelihood requests
N_REQUESTS = 24


@pytest.fixture(scope="module")
def env(shared_data, tmp_path_factory):
    """A tiny lit_gpt MDM over the GPT-2 vocabulary, its model args, and a subprocess environment."""
    from prime_eval.networks.lit_gpt import Config, TransEncoder

    d = tmp_path_factory.mktemp("scale_out")
    torch.manual_seed(0)
    cfg = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=50257, block_size=128)
    torch.save({"model": TransEncoder(cfg).state_dict()}, d / "mdm.pth")
    margs = (f"checkpoint={d / 'mdm.pth'},config=n_head=2;block_size=128;vocab_size=50257,"
             f"tokenizer={shared_data / 'tokenizers' / 'gpt2'}")
    penv = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PRIME_EVAL_CACHE": str(d / "task_cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        penv.pop(k, None)
    return {"dir": d, "margs": margs, "env": penv, "data": str(shared_data)}


def score_args(env, out, *extra, margs_extra=""):
    return ["score", "--model", "mdm", "--model_args", env["margs"] + ",samples=4,max_length=100" + margs_extra,
            "--tasks", TASKS, "--data-dir", env["data"], "--limit", LIMIT, "--output_path", str(out),
            "--log_samples", "--bootstrap_iters", "0", *extra]


def ppl_args(env, out, *extra):
    return ["ppl", "--model", "mdm", "--model_args", env["margs"], "--files",
            str(Path(env["data"]) / "wikitext2" / "test.txt"), "--L", "64", "--max-tokens", "1600", "--samples", "2",
            "--strata", "4", "--batch-size", "2", "--bootstrap", "50", "--no-progress", "-o", str(out), *extra]


def score_outputs(out: Path) -> dict:
    """Per-request results of a score run: the stats rows, each sample's first response, the metrics."""
    stats = {}
    for f in glob.glob(str(out / "*" / "stats_*.jsonl")):
        task = Path(f).name.split("_20")[0].removeprefix("stats_")
        stats[task] = [json.loads(line) for line in open(f)]
    resps = {}
    for f in glob.glob(str(out / "*" / "samples_*.jsonl")):
        for line in open(f):
            s = json.loads(line)
            # lm-eval appends its DP padding clones to one instance's resps: compare each request's first response
            resps[(Path(f).name, s["doc_id"])] = [r[0] for r in s["resps"]]
    (res,) = glob.glob(str(out / "*" / "results_*.json"))
    res = json.loads(Path(res).read_text())
    resps = {(k[0].split("_20")[0], k[1]): v for k, v in resps.items()}
    return {"stats": stats, "resps": resps, "results": res["results"], "info": res["config"]["prime_eval"]}


def ppl_result(path: Path) -> dict:
    r = json.loads(Path(path).read_text())["results"]
    for k in ("seconds", "tokens_per_second", "processes", "cached_blocks"):
        r.pop(k)
    return r


@pytest.fixture(scope="module")
def reference(env):
    """Uninterrupted one-process runs (in this process): the numbers every other run must reproduce."""
    d = env["dir"]
    assert cli_main(score_args(env, d / "ref_score")) == 0
    assert cli_main(ppl_args(env, d / "ref_ppl.json")) == 0
    return {"score": score_outputs(d / "ref_score"), "ppl": ppl_result(d / "ref_ppl.json")}


def test_two_processes_bit_identical(env, reference):
    d = env["dir"]
    script = d / "two.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from prime_eval.cli import main
        assert main({score_args(env, d / 'dp_score')!r}) == 0
        assert main({ppl_args(env, d / 'dp_ppl.json')!r}) == 0
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", str(script)], env=env["env"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dp = score_outputs(d / "dp_score")
    ref = reference["score"]
    assert dp["info"]["processes"] == 2 and ref["info"]["processes"] == 1
    assert dp["stats"] == ref["stats"]  # every per-request number, bit for bit, same order
    assert dp["resps"] == ref["resps"] and dp["results"] == ref["results"]
    assert sum(len(v) for v in ref["stats"].values()) == N_REQUESTS
    assert ppl_result(d / "dp_ppl.json") == reference["ppl"]
    assert json.loads((d / "dp_ppl.json").read_text())["results"]["processes"] == 2
    assert proc.stdout.count("lm-eval results") == 1  # rank 0 alone prints


def _kill_when_cached(cmd: list[str], env, cache: Path, at_least: int) -> int:
    """Start `cmd`, SIGKILL it once `at_least` results are stored; return the count stored at the kill."""
    proc = subprocess.Popen(cmd, env=env["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while count_entries(cache) < at_least and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n = count_entries(cache)
    assert n >= at_least
    return n


def test_score_killed_and_resumed(env, reference, capsys):
    d = env["dir"]
    cache, out = d / "score_cache", d / "resumed_score"
    # small chunks (8 forward rows: one document's round) so that the SIGKILL lands mid-run; adaptive sampling is on
    # (the default): each document's result is stored when it stops (tests/test_cache.py kills runs with the
    # default chunk size at several points)
    cmd = [sys.executable, "-m", "prime_eval.cli", *score_args(env, out, "--cache-dir", str(cache),
                                                                margs_extra=",chunk_rows=8")]
    stored = _kill_when_cached(cmd, env, cache, 5)
    assert not list(out.glob("*/results_*.json"))  # nothing half-written: no results yet
    capsys.readouterr()
    assert cli_main(score_args(env, out, "--cache-dir", str(cache), margs_extra=",chunk_rows=8")) == 0
    # the reader is told the run resumed, and how much of it was reused
    assert f"{stored} of {N_REQUESTS} requests were already stored (resumed)" in capsys.readouterr().err
    got = score_outputs(out)
    assert got["info"]["cache"]["hits"] == stored  # every stored request was reused ...
    assert got["info"]["cache"]["computed"] == N_REQUESTS - stored  # ... and only the others were computed
    c = got["info"]["cache"]
    rows = sum(r["num_forward_rows"] + r["greedy_forward_rows"] for t in got["stats"].values() for r in t)
    assert c["rows_computed"] + c["rows_reused"] == rows and c["rows_reused"] > 0
    assert got["info"]["adaptive"] is not None
    ref = reference["score"]
    assert got["stats"] == ref["stats"] and got["resps"] == ref["resps"] and got["results"] == ref["results"]
    assert not list(out.glob(".prime-eval-staging-*"))


def test_ppl_killed_and_resumed(env, reference):
    d = env["dir"]
    cache, out = d / "ppl_cache", d / "resumed_ppl.json"
    cmd = [sys.executable, "-m", "prime_eval.cli", *ppl_args(env, out, "--cache-dir", str(cache))]
    stored = _kill_when_cached(cmd, env, cache, 6)
    assert not out.exists()
    assert cli_main(ppl_args(env, out, "--cache-dir", str(cache))) == 0
    full = json.loads(out.read_text())["results"]
    assert full["cached_blocks"] == stored and count_entries(cache) == full["blocks"]
    assert ppl_result(out) == reference["ppl"]
