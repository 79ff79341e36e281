"""Every bad input gets a clear error naming the problem and the fix, and nothing is lost.

Most cases run the CLI in this process (`prime_eval.cli.main`): a `UserError` is printed as one line on stderr with
exit code 2 (anything else would escape as an exception and fail the test). One case runs the CLI as a subprocess
to check that no traceback reaches the user unless `--debug` is given.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from prime_eval.cli import main as cli_main
from prime_eval.errors import UserError

CFG = "config=n_head=2;block_size=128;vocab_size=50257"


@pytest.fixture(autouse=True)
def _task_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIME_EVAL_CACHE", str(tmp_path / "task_cache"))


@pytest.fixture(scope="module")
def files(shared_data, tmp_path_factory):
    """Tiny lit_gpt checkpoints (MDM; Prime ℓ=4, b=15) and bad variants of them."""
    from prime_eval.networks.lit_gpt import Config, TransEncoder

    d = tmp_path_factory.mktemp("bad_input")
    cfg = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=50257, block_size=128)
    torch.manual_seed(0)
    torch.save({"model": TransEncoder(cfg).state_dict()}, d / "mdm.pth")
    torch.save({"model": TransEncoder(cfg, ell=4, base=15).state_dict()}, d / "prime.pth")
    raw = (d / "mdm.pth").read_bytes()
    (d / "truncated.pth").write_bytes(raw[: len(raw) // 2])  # e.g. an interrupted download
    (d / "corrupt.pth").write_bytes(bytes(range(256)) * 64)
    torch.save(torch.arange(100), d / "perm_short.pt")
    torch.save(torch.zeros(15**4, dtype=torch.long), d / "perm_dup.pt")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n\nna\xefve\n".encode("latin-1"))
    return {"dir": d, "data": shared_data, "gpt2": shared_data / "tokenizers" / "gpt2",
            "llama": shared_data / "tokenizers" / "llama2" / "tokenizer.model"}


def run(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli_main(argv)
    return rc, capsys.readouterr().err


def score(files, model: str, margs: str, *extra, tasks="piqa", data=None) -> list[str]:
    return ["score", "--model", model, "--model_args", margs, "--tasks", tasks, "--data-dir",
            str(data or files["data"]), "--limit", "2", "--bootstrap_iters", "0", *extra]


def mdm_args(files, ckpt="mdm.pth", **kw) -> str:
    extra = "".join(f",{k}={v}" for k, v in kw.items())
    return f"checkpoint={files['dir'] / ckpt},tokenizer={files['gpt2']},{CFG}{extra}"


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and "error:" in err, err
    for n in needles:
        assert n in err, (n, err)


# -- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ckpt, needles", [
    ("missing.pth", ["checkpoint not found"]),
    ("truncated.pth", ["cannot read", "as a torch checkpoint", "corrupted"]),
    ("corrupt.pth", ["cannot read", "as a torch checkpoint"]),
])
def test_unreadable_checkpoint(files, capsys, ckpt, needles):
    assert_user_error(*run(score(files, "mdm", mdm_args(files, ckpt)), capsys), str(files["dir"] / ckpt), *needles)


@pytest.mark.parametrize("model", ["arm", "prime"])
def test_checkpoint_of_another_family(files, capsys, model):
    assert_user_error(*run(score(files, model, mdm_args(files)), capsys), f"`--model {model}` on score",
                      "does not fit", "it looks like family 'mdm'")


@pytest.mark.parametrize("perm, needle", [("perm_short.pt", "length 100 but b^ℓ = 50625 codes are needed"),
                                          ("perm_dup.pt", "not a permutation")])
def test_bad_permutation_file(files, capsys, perm, needle):
    margs = mdm_args(files, "prime.pth", permutation=files["dir"] / perm)
    assert_user_error(*run(score(files, "prime", margs), capsys), needle, str(files["dir"] / perm))


def test_tokenizer_vocabulary_does_not_match(files, capsys):
    margs = f"checkpoint={files['dir'] / 'mdm.pth'},tokenizer={files['llama']},{CFG}"
    assert_user_error(*run(score(files, "mdm", margs), capsys), "has 32000 tokens",
                      "the checkpoint's vocabulary is 50257", "Pass the matching tokenizer")
    ppl = ["ppl", "--model", "mdm", "--model_args", margs, "--files", str(files["dir"] / "latin1.txt")]
    assert_user_error(*run(ppl, capsys), "has 32000 tokens")


def test_folder_with_config_and_no_weights(files, tmp_path, capsys):
    """A transformers folder whose weights were never downloaded: say so (not "Hugging Face LMs are ARMs")."""
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    margs = f"checkpoint={folder},tokenizer={files['gpt2']}"
    assert_user_error(*run(score(files, "mdm", margs), capsys), str(folder), "no weight files")


# -- settings (one vocabulary, checked before any weight is read) ---------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_sample_count_before_the_weights(files, capsys, value):
    """samples=0 used to be `KeyError: '_rounds'` after the model had loaded: now the setting is named first (the
    checkpoint does not even exist, so reaching the loader would say "not found")."""
    margs = mdm_args(files, "missing.pth", samples=value)
    assert_user_error(*run(score(files, "mdm", margs), capsys), f"samples={value}", "must be >= 1")
    ppl = ["ppl", "--model", "mdm", "--model_args", margs, "--files", str(files["dir"] / "latin1.txt")]
    assert_user_error(*run(ppl, capsys), f"samples={value}", "must be >= 1")


def test_unknown_setting_lists_the_known_ones(files, capsys):
    assert_user_error(*run(score(files, "mdm", mdm_args(files, "missing.pth", smaples=4)), capsys),
                      "smaples", "samples")


def test_ppl_takes_the_score_vocabulary(files, capsys):
    """`samples=` in --model_args means what `--samples` means (it used to be rejected as unknown by ppl)."""
    wiki = str(files["data"] / "wikitext2" / "test.txt")
    base = ["ppl", "--model", "mdm", "--files", wiki, "--L", "16", "--max-tokens", "32", "--no-progress"]
    rc, err = run(base + ["--model_args", mdm_args(files, samples=2)], capsys)
    assert rc == 0, err
    assert_user_error(*run(base + ["--model_args", mdm_args(files, samples=2), "--samples", "3"], capsys),
                      "samples is given twice")


def test_binary_file_is_called_binary(files, tmp_path, capsys):
    """A binary file used to get the advice `--encoding latin-1`, which would score garbage."""
    blob = tmp_path / "model.bin"
    blob.write_bytes(bytes(range(256)) * 8)
    ppl = ["ppl", "--model", "mdm", "--model_args", mdm_args(files), "--files", str(blob)]
    rc, err = run(ppl, capsys)
    assert_user_error(rc, err, str(blob), "binary")
    assert "latin-1" not in err


# -- requests -------------------------------------------------------------------------------------------------------
def test_empty_continuation_and_overlong_continuation(files):
    from lm_eval.api.instance import Instance

    from model_adapters import MDMLM

    lm = MDMLM(checkpoint=str(files["dir"] / "mdm.pth"), config=CFG.split("=", 1)[1], tokenizer=str(files["gpt2"]),
               samples=2, max_length=16, device="cpu")
    req = Instance("loglikelihood", {}, ("Question: why?\nAnswer:", ""), 1, ("piqa", 3, 1))
    with pytest.raises(UserError, match=r"empty continuation \(task piqa, doc 3, choice 1\).*no tokens to score"):
        lm.loglikelihood([req])
    long = Instance("loglikelihood", {}, ("Q:", " a" * 40), 0, ("piqa", 4, 0))
    with pytest.raises(UserError, match=r"continuation of 40 tokens \(task piqa, doc 4, choice 0\) exceeds "
                                        "max_length=16"):
        lm.loglikelihood([long])


def test_overlong_input_is_truncated_and_counted(files, tmp_path, capsys, caplog):
    out = tmp_path / "runs"
    rc, err = run(score(files, "mdm", mdm_args(files, samples=2, max_length=16), "-o", str(out), tasks="arc_easy"),
                  capsys)
    assert rc == 0, err
    assert "exceed the 16-token window and were left-truncated" in caplog.text
    (res,) = out.glob("*/results_*.json")
    info = json.loads(res.read_text())["config"]["prime_eval"]
    (stats,) = out.glob("*/stats_arc_easy_*.jsonl")
    rows = [json.loads(line) for line in stats.read_text().splitlines()]
    assert info["truncated_requests"] == sum(r["truncated_tokens"] > 0 for r in rows) > 0
    assert info["truncated_tokens"] == sum(r["truncated_tokens"] for r in rows) > 0


# -- data -----------------------------------------------------------------------------------------------------------
def test_text_file_not_utf8(files, capsys):
    ppl = ["ppl", "--model", "mdm", "--model_args", mdm_args(files), "--files", str(files["dir"] / "latin1.txt"),
           "--L", "8"]
    assert_user_error(*run(ppl, capsys), "latin1.txt is not utf-8 text at byte 3 (line 1: byte 0xe9)",
                      "--encoding")
    from prime_eval.perplexity import text_files

    assert list(text_files([files["dir"] / "latin1.txt"], encoding="latin-1")) == ["café crème brûlée", "naïve"]


def test_unknown_task_and_missing_split(files, tmp_path, capsys):
    assert_user_error(*run(score(files, "mdm", mdm_args(files), tasks="piqa,nosuchtask"), capsys),
                      "unknown task or group 'nosuchtask'", "Known: ")
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    shutil.copy(files["data"] / "piqa" / "validation.jsonl", data / "piqa" / "train.jsonl")
    assert_user_error(*run(score(files, "mdm", mdm_args(files), data=data), capsys),
                      "--data-dir lacks the evaluated split of piqa", str(data / "piqa" / "validation.jsonl"))


# -- checked before the model is loaded -----------------------------------------------------------------------------
# Each case names a checkpoint that does not exist: had the model been loaded first, the error would be
# "checkpoint not found" instead of the one asked for.
@pytest.mark.parametrize("limit, needle", [("0", "--limit 0: give a number of documents per task"),
                                           ("-3", "--limit -3: give a number of documents per task"),
                                           ("2.5", "--limit 2.5: a count of documents must be a whole number")])
def test_bad_limit(files, capsys, limit, needle):
    argv = score(files, "mdm", mdm_args(files, "missing.pth"))
    argv[argv.index("--limit") + 1] = limit
    assert_user_error(*run(argv, capsys), needle)


@pytest.mark.parametrize("samples, needles", [
    ('{"piqa": [999999]}', ["'piqa' has 1838 documents (indices 0 to 1837)", "999999"]),
    ('{"piqa": [-1]}', ["negative indices [-1]"]),
    ('{"piqa": [3, 3]}', ["indices [3] more than once"]),
    ('{"pqia": [1]}', ["names 'pqia', which this run does not score", "its tasks are piqa"]),
    ('{"piqa": 3}', ["needs a non-empty list of integer document indices"]),
])
def test_bad_samples(files, capsys, samples, needles):
    argv = [a for a in score(files, "mdm", mdm_args(files, "missing.pth")) if a not in ("--limit", "2")]
    assert_user_error(*run([*argv, "--samples", samples], capsys), "--samples", *needles)


def test_samples_that_are_not_json(files, capsys):
    argv = [a for a in score(files, "mdm", mdm_args(files, "missing.pth")) if a not in ("--limit", "2")]
    with pytest.raises(SystemExit) as e:  # argparse: usage and one error line
        cli_main([*argv, "--samples", '{"piqa": [1'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "is not JSON" in err and '{"piqa": [0, 5]}' in err


@pytest.mark.parametrize("line, needle", [
    ('{"goal": "x", "sol1": \n', "line 3: not valid JSON (Expecting value, column 23)"),
    ('["a list"]\n', "line 3: a JSON list, not an object"),
    (b"\xff\xfe{}\n", "line 3: not UTF-8"),
])
def test_malformed_data_file_names_file_and_line(files, tmp_path, capsys, line, needle):
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    good = (files["data"] / "piqa" / "validation.jsonl").read_bytes().splitlines(keepends=True)
    bad = line if isinstance(line, bytes) else line.encode()
    (data / "piqa" / "validation.jsonl").write_bytes(b"".join(good[:2]) + bad + b"".join(good[2:5]))
    assert_user_error(*run(score(files, "mdm", mdm_args(files, "missing.pth"), data=data), capsys),
                      f"{data / 'piqa' / 'validation.jsonl'}, {needle}")
    (data / "piqa" / "validation.jsonl").write_text("\n")
    assert_user_error(*run(score(files, "mdm", mdm_args(files, "missing.pth"), data=data), capsys),
                      "validation.jsonl holds no documents")


def test_device_given_twice(files, tmp_path, capsys):
    """`device` in --model_args alone is used (lm-eval's rule); given both ways and different, it is an error."""
    argv = score(files, "mdm", mdm_args(files, "missing.pth", device="cpu"), "--device", "meta")
    assert_user_error(*run(argv, capsys), "device is given twice, as --device meta and in model_args (device=cpu)",
                      "give it in one place")
    out = tmp_path / "runs"
    rc, err = run(score(files, "mdm", mdm_args(files, samples=2, device="cpu"), "-o", str(out)), capsys)
    assert rc == 0, err
    (res,) = out.glob("*/results_*.json")
    assert json.loads(res.read_text())["config"]["device"] == "cpu"


def test_lm_eval_model_that_cannot_be_built(files, capsys):
    """The docs/tasks.md smoke test offline: lm-eval's `hf` cannot reach the hub. One line, like our adapters."""
    argv = score(files, "hf", "pretrained=gpt2")
    assert_user_error(*run(argv, capsys), "model 'hf' could not be built from --model_args 'pretrained=gpt2'",
                      "OSError", "pass a local folder (e.g. pretrained=DIR)")


def test_report_of_incompatible_or_broken_results(tmp_path, capsys):
    old = tmp_path / "old" / "results_2023.json"  # lm-eval 0.3: metric keys without the ",none" filter suffix
    old.parent.mkdir()
    old.write_text(json.dumps({"results": {"piqa": {"acc": 0.5, "acc_stderr": 0.01}}, "config": {"model": "hf"},
                               "versions": {"piqa": 0}}))
    rc, err = run(["report", str(old.parent), "--out", str(tmp_path / "rep"), "--no-plots"], capsys)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert rc == 0 and "incompatible lm-eval version" in md and "re-run with lm-eval 0.4" in md
    # a run killed while publishing leaves a hidden staging folder (prime_eval.io): the report ignores it
    staged = old.parent / ".prime-eval-staging-x1" / "m" / "results_y.json"
    staged.parent.mkdir(parents=True)
    staged.write_text('{"results": {"piq')
    rc, err = run(["report", str(old.parent), "--out", str(tmp_path / "rep1"), "--no-plots"], capsys)
    assert rc == 0 and "skipped" not in (tmp_path / "rep1" / "report.md").read_text()
    half = tmp_path / "half" / "results_x.json"
    half.parent.mkdir()
    half.write_text('{"results": {"piqa": {"acc,none": 0.5')  # a half-written file
    assert_user_error(*run(["report", str(half.parent), "--out", str(tmp_path / "rep2")], capsys),
                      "no lm-eval results", "skipped results_x.json: not readable JSON")


# -- outputs --------------------------------------------------------------------------------------------------------
def test_full_disk_fails_before_any_work(files, tmp_path, capsys, monkeypatch):
    """The checkpoint does not even exist: the disk check must come first (before tasks and model)."""
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 2**20, 2**20))
    argv = score(files, "mdm", mdm_args(files, "missing.pth"), "-o", str(tmp_path / "runs"))
    assert_user_error(*run(argv, capsys), "only 1.0 MiB free", "free some space or choose another folder")
    ppl = ["ppl", "--model", "mdm", "--model_args", mdm_args(files, "missing.pth"), "--files",
           str(files["dir"] / "latin1.txt"), "-o", str(tmp_path / "p" / "ppl.json")]
    assert_user_error(*run(ppl, capsys), "only 1.0 MiB free")
    argv = score(files, "mdm", mdm_args(files, "missing.pth"), "--cache-dir", str(tmp_path / "cache"))
    assert_user_error(*run(argv, capsys), "only 1.0 MiB free", "--cache-dir")


def test_unwritable_output_fails_before_any_work(files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = score(files, "mdm", mdm_args(files, "missing.pth"), "-o", str(blocker / "runs"))
    assert_user_error(*run(argv, capsys), "cannot create the --output_path folder", "choose a writable location")
    ppl = ["ppl", "--model", "mdm", "--model_args", mdm_args(files, "missing.pth"), "--files",
           str(files["dir"] / "latin1.txt"), "-o", str(blocker / "ppl.json")]
    assert_user_error(*run(ppl, capsys), "a_file exists and is not a folder")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert_user_error(*run(score(files, "mdm", mdm_args(files, "missing.pth"), "-o", str(ro)), capsys),
                          "is not writable")


# -- traceback only with --debug ------------------------------------------------------------------------------------
def test_no_traceback_unless_debug(files):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, "-m", "prime_eval.cli"]
    tail = ["ppl", "--model", "mdm", "--model_args", mdm_args(files, "missing.pth"), "--files",
            str(files["dir"] / "latin1.txt")]
    plain = subprocess.run(argv + tail, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == f"prime-eval ppl: error: checkpoint not found: " \
                                                    f"{files['dir'] / 'missing.pth'}"
    debug = subprocess.run(argv + ["--debug"] + tail, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "UserError: checkpoint not found" in debug.stderr
