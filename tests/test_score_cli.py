"""`prime-eval score`: writes lm-eval's results JSON and samples (built-in `hf` model on a tiny random GPT-2),
calls the adapters' `finalize_run` hook, refuses `--use_cache` for stochastic models, fails clearly on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from prime_eval.cli import main as cli_main
from prime_eval.commands import score
from prime_eval.lm_eval_run import model_dir_name

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Offline task YAMLs go to a temporary cache, not ~/.cache/prime-eval."""
    monkeypatch.setenv("PRIME_EVAL_CACHE", str(tmp_path / "prime_eval_cache"))


def _register_test_models():
    """Two tiny LMs registered with lm-eval: one with the finalize hook, one that declares itself stochastic."""
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model

    if "prime_eval_test_hook" in model_registry:
        return

    class HookLM(LM):
        calls: list = []

        def __init__(self, checkpoint="none", **kwargs):
            super().__init__()
            self.kwargs = kwargs

        def loglikelihood(self, requests, disable_tqdm=False):
            self.seen = [(r.task_name, r.doc_id, r.idx) for r in requests]
            return [(-float(len(r.args[1])), False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def finalize_run(self, output_dir, date_id):
            HookLM.calls.append((output_dir, date_id, self.kwargs))
            path = output_dir / f"stats_sciq_{date_id}.jsonl"
            path.write_text("".join(json.dumps({"task": t, "doc_id": d, "choice": i}) + "\n" for t, d, i in self.seen))
            return [path]

    class StochasticLM(HookLM):
        is_stochastic = True

    register_model("prime_eval_test_hook")(HookLM)
    register_model("prime_eval_test_mc")(StochasticLM)


@pytest.fixture(scope="session")
def tiny_gpt2(shared_data, tmp_path_factory) -> Path:
    """A 1-layer random GPT-2 (save_pretrained) with the real GPT-2 tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    d = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=1024)).save_pretrained(d)
    # AutoTokenizer cannot tell the class from a bare vocab.json/merges.txt folder (transformers 5); GPT2Tokenizer can
    tok = GPT2Tokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    assert tok("Hello world").input_ids == [15496, 995]
    tok.save_pretrained(d)
    return d


def test_score_hf_offline_writes_results_and_samples(tiny_gpt2, shared_data, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = cli_main(["score", "--model", "hf", "--model_args", f"pretrained={tiny_gpt2}", "--tasks", "piqa",
                   "--data-dir", str(shared_data), "--limit", "5", "--output_path", str(out), "--log_samples",
                   "--bootstrap_iters", "0"])
    assert rc == 0
    [folder] = list(out.iterdir())
    assert folder.name == model_dir_name("hf", f"pretrained={tiny_gpt2}")
    [results_file] = list(folder.glob("results_*.json"))
    [samples_file] = list(folder.glob("samples_piqa_*.jsonl"))
    assert samples_file.name == results_file.name.replace("results_", "samples_piqa_").replace(".json", ".jsonl")
    res = json.loads(results_file.read_text())
    assert 0.0 <= res["results"]["piqa"]["acc,none"] <= 1.0
    assert res["config"]["model"] == "hf" and res["config"]["limit"] == 5
    assert res["n-samples"]["piqa"]["effective"] == 5
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["resps"]) == 2 for r in rows)
    shown = capsys.readouterr()
    assert "acc_norm" in shown.out and str(results_file) in shown.err


def test_finalize_hook_and_model_folder(tmp_path):
    _register_test_models()
    from lm_eval.api.registry import get_model

    hook_cls = get_model("prime_eval_test_hook")
    hook_cls.calls.clear()
    out = tmp_path / "runs"
    rc = cli_main(["score", "--model", "prime_eval_test_hook", "--model_args", "checkpoint=ckpts/a.pt",
                   "--tasks", "sciq", "--data-dir", str(FIXTURES), "--output_path", str(out), "--log_samples",
                   "--bootstrap_iters", "0", "--device", "cpu", "--batch_size", "4"])
    assert rc == 0
    [(output_dir, date_id, kwargs)] = hook_cls.calls
    assert output_dir == out / "ckpts__a.pt"  # named after checkpoint=, sanitized like lm-eval
    assert (output_dir / f"results_{date_id}.json").is_file()
    assert (output_dir / f"samples_sciq_{date_id}.jsonl").is_file()
    stats = (output_dir / f"stats_sciq_{date_id}.jsonl").read_text().splitlines()
    assert len(stats) == 4 * 4  # 4 docs x 4 choices
    assert kwargs == {"device": "cpu", "batch_size": "4"}


def test_use_cache_refused_for_stochastic_models(tmp_path, capsys):
    _register_test_models()
    rc = cli_main(["score", "--model", "prime_eval_test_mc", "--tasks", "sciq", "--data-dir", str(FIXTURES),
                   "--use_cache", str(tmp_path / "cache")])
    assert rc == 2
    assert "--use_cache is refused" in capsys.readouterr().err
    assert score.is_stochastic("prime", object()) and score.is_stochastic("mdm", object())
    assert not score.is_stochastic("arm", object()) and not score.is_stochastic("hf", object())


def test_clear_errors(tmp_path, capsys):
    def run(*argv):
        rc = cli_main(["score", *argv])
        return rc, capsys.readouterr().err

    rc, err = run("--model", "hf", "--tasks", "pqia", "--data-dir", str(FIXTURES))
    assert rc == 2 and "unknown task or group 'pqia'" in err and "Did you mean piqa" in err
    rc, err = run("--model", "hf", "--tasks", "piqa", "--data-dir", str(FIXTURES))
    assert rc == 2 and str(FIXTURES.resolve() / "piqa" / "validation.jsonl") in err
    rc, err = run("--model", "nope", "--tasks", "sciq", "--data-dir", str(FIXTURES))
    assert rc == 2 and "unknown model 'nope'" in err and "hf" in err
    rc, err = run("--model", "hf", "--tasks", "sciq", "--log_samples")
    assert rc == 2 and "--log_samples needs --output_path" in err


def test_missing_subcommand_module_is_an_error(monkeypatch):
    """A subcommand whose module is missing is a bug: the CLI fails loudly instead of dropping the subcommand."""
    from prime_eval import cli

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, ("nope", "prime_eval.commands.nope")])
    with pytest.raises(ModuleNotFoundError, match="prime_eval.commands.nope"):
        cli.build_parser()


def test_the_run_imports_neither_the_cli_nor_the_adapters():
    """`prime_eval.lm_eval_run` and the demo's scoring take a registered name or an LM: the command layer registers
    the adapters (import direction: adapter -> lm-eval run, never the reverse)."""
    import ast
    import inspect
    import subprocess
    import sys
    import textwrap

    from prime_eval import demo, lm_eval_run

    for src in (inspect.getsource(lm_eval_run), textwrap.dedent(inspect.getsource(demo.score_model))):
        imported = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(ast.parse(src))
                    if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
        assert not [m for m in imported if m and m.startswith(("model_adapters", "prime_eval.commands"))], imported
    code = ("import sys, prime_eval.lm_eval_run, prime_eval.demo; "
            "print(sorted(m for m in sys.modules if m.startswith(('model_adapters', 'prime_eval.commands'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_spec_checks_arguments_without_building(monkeypatch):
    from prime_eval import lm_eval_run as R
    from prime_eval.errors import UserError

    _register_test_models()
    spec = R.model_spec("prime_eval_test_hook", "checkpoint=a.pt,batch_size=4", batch_size="4", device=None,
                        default_device="cpu")
    assert spec.kwargs == {"checkpoint": "a.pt", "batch_size": "4", "device": "cpu"}
    with pytest.raises(UserError, match=r"batch_size is given twice, as --batch_size 8 and in model_args \(batch_size=4\)"):
        R.model_spec("prime_eval_test_hook", "batch_size=4", batch_size="8")
    # the settings hook sees the merged arguments before any weights are read
    cls = spec.cls

    def check(args):
        raise UserError(f"bad arguments {sorted(args)}")

    monkeypatch.setattr(cls, "check_model_args", staticmethod(check), raising=False)
    with pytest.raises(UserError, match=r"bad arguments \['checkpoint', 'device'\]"):
        R.model_spec("prime_eval_test_hook", "checkpoint=a.pt", device="cpu")


def test_no_git_noise_outside_a_repository(tmp_path, monkeypatch, capfd):
    """lm-eval's `git describe` of the working directory printed "fatal: not a git repository" to the terminal of a
    user scoring from an ordinary folder; the run records the same value (None there) without the noise."""
    import lm_eval.evaluator as ev

    from prime_eval.lm_eval_run import _quiet_git_hash

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with _quiet_git_hash():
        assert ev.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err
    ev.get_git_commit_hash()  # lm-eval's own, restored: the noise this test guards against
    assert "not a git repository" in capfd.readouterr().err
