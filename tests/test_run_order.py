"""A data-parallel `prime-eval score` aggregates its per-document metrics in document order: the results JSON of 2
processes equals that of 1 process bit for bit, standard errors included (closed-form `acc_stderr` and the
bootstrap of `perplexity`), and the samples file lists the documents in the same order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prime_eval.lm_eval_run import in_document_order, interleave

ROOT = Path(__file__).resolve().parents[1]

# A deterministic lm-eval model that runs data-parallel under torchrun: the log-likelihood is a hash of the
# request, so every rank gives every request the same value and only the order of aggregation can differ.
SCRIPT = textwrap.dedent('''
    import sys, zlib
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from prime_eval import distributed as D
    from prime_eval.cli import main

    @register_model("prime_eval_test_dp")
    class HashLM(LM):
        def __init__(self, device="cpu", **kwargs):
            super().__init__()
            info = D.init_distributed("cpu")
            self._rank, self._world_size, self._device = info.rank, info.world_size, "cpu"

        def loglikelihood(self, requests, disable_tqdm=False):
            return [(-(zlib.crc32(f"{c}\\x00{x}".encode()) % 10007) / 997.0, zlib.crc32(x.encode()) % 3 == 0)
                    for c, x in (r.args for r in requests)]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def all_gather(self, tensor):
            return D.all_gather_tensor(tensor)

        def gather_object(self, obj, dst=0):
            return D.gather_object(obj, dst=dst)

        def barrier(self):
            D.barrier()

    sys.exit(main(sys.argv[1:]))
''')


def test_interleave_restores_document_order():
    docs = list(range(11))
    for world in (1, 2, 3, 4, 11, 13):
        shards = [docs[r::world] for r in range(world)]
        assert interleave(shards) == docs
    # lengths no strided sharding can give: concatenated rank after rank, as lm-eval does
    assert interleave([[0], [1, 2, 3]]) == [0, 1, 2, 3]


def test_in_document_order_merges_metrics_and_samples():
    def sample(doc, filt):
        return {"doc_id": doc, "filter": filt}

    docs, world = list(range(5)), 2
    ranks = [[d for d in docs[r::world]] for r in range(world)]
    metrics = [{"piqa": {("acc", "none"): [f"v{d}" for d in mine]}} for mine in ranks]
    assert in_document_order(metrics) == {"piqa": {("acc", "none"): [f"v{d}" for d in docs]}}
    # logged samples: one entry per document per filter, filter after filter, on every rank
    samples = [{"piqa": [sample(d, f) for f in ("a", "b") for d in mine]} for mine in ranks]
    assert in_document_order(samples) == {"piqa": [sample(d, f) for f in ("a", "b") for d in docs]}
    # a rank without documents for a task sends no keys for it
    assert in_document_order([{"t": {("acc", "none"): [1]}}, {"t": {}}]) == {"t": {("acc", "none"): [1]}}


@pytest.mark.slow
def test_two_processes_give_the_same_results_json_as_one(shared_data, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PRIME_EVAL_CACHE": str(tmp_path / "task_cache"), "PYTHONPATH": str(ROOT), "DISABLE_MULTIPROC": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)

    def score(out: Path, launcher: list[str]) -> tuple[dict, list]:
        argv = ["score", "--model", "prime_eval_test_dp", "--tasks", "piqa,arc_easy,lambada_openai", "--data-dir",
                str(shared_data), "--limit", "61", "--bootstrap_iters", "200", "--output_path", str(out),
                "--log_samples"]
        proc = subprocess.run([*launcher, str(script), *argv], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (res,) = out.glob("*/results_*.json")
        order = [(f.name.split("_20")[0], json.loads(line)["doc_id"]) for f in sorted(out.glob("*/samples_*"))
                 for line in f.read_text().splitlines()]
        return json.loads(res.read_text())["results"], order

    one, one_order = score(tmp_path / "one", [sys.executable])
    two, two_order = score(tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", "2"])
    assert one["piqa"]["acc_stderr,none"] > 0 and one["lambada_openai"]["perplexity_stderr,none"] > 0
    assert two == one  # every metric and every standard error, bit for bit
    assert two_order == one_order and len(one_order) == 3 * 61
