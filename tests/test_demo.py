"""`prime-eval demo --quick` end to end: ground truth, tokenizer, trained reference models in upstream formats, lm-eval
scores, bounds against the true entropy, audit, report; deterministic training from the harness's one sampler; the
import direction; intervals in range; the committed report is what the demo writes."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

NEEDED = ("prime_eval.networks.lit_gpt", "prime_eval.checkpoints", "model_adapters.base", "prime_eval.perplexity",
          "prime_eval.report", "prime_eval.audit")
ROOT = Path(__file__).resolve().parents[1]


def _missing() -> list[str]:
    out = []
    for m in NEEDED:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError:
            out.append(m)
    return out


pytestmark = pytest.mark.skipif(bool(_missing()), reason=f"demo dependencies not installed yet: {_missing()}")


def _quick_run(out, cache, **kw):
    from rich.console import Console

    from prime_eval.demo import run_demo

    return run_demo(out, cache_dir=cache, quick=True, seed=0, console=Console(stderr=True, width=160, quiet=True),
                    **kw)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    cache = tmp_path_factory.mktemp("demo_cache")
    return out, cache, _quick_run(out, cache)


@pytest.mark.slow
def test_quick_demo_end_to_end(demo_run):
    out, cache, s = demo_run
    for name in ("report.md", "report.html", "report.tex", "demo.json", "demo_accuracy.csv", "demo_entropy.csv",
                 "accuracy.csv", "perplexity.csv", "plots/demo_accuracy.png", "plots/demo_bounds.png",
                 "data/heldout.jsonl", "data/synth_word/test.jsonl", "data/tasks/synth_order.yaml",
                 "demo_generation.csv", "data/synth_complete/test.jsonl", "data/tasks/synth_complete.yaml"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    # the point first: bounds against H, then accuracy, then the audit with its oracle rows
    i, j, k = (md.index(t) for t in ("Bounds against the true entropy", "Accuracy against the Bayes-optimal answer",
                                      "Exact audit: oracle networks and the trained networks"))
    assert i < j < k
    assert "| oracle (exact conditionals" in md and "| trained (this demo)" in md
    assert json.loads((out / "demo.json").read_text())["kind"] == "prime-eval/demo"

    # lm-eval ran every model on both tasks, through the adapters (stats files written by finalize_run)
    for fam in ("arm", "mdm", "prime"):
        d = out / "runs" / "lm_eval" / f"{fam}-demo"
        assert list(d.glob("results_*.json")) and list(d.glob("samples_synth_word_*.jsonl"))
        assert list(d.glob("stats_synth_order_*.jsonl"))
    acc = {(r["model"], r["task"]): r for r in s["accuracy"]}
    assert len(acc) == 6
    for r in acc.values():
        assert 0.0 <= r["acc_ci95"][0] <= r["acc"] <= r["acc_ci95"][1] <= 1.0  # Wilson with MC: inside [0, 1]
        assert -1.0 <= r["gap_to_bayes_ci95"][0] <= r["gap_to_bayes"] <= r["gap_to_bayes_ci95"][1] <= 1.0  # Tango
        assert r["bayes_acc"] > r["chance"]

    # every estimator of every model on the same held-out documents, against the exact NLL
    rows = {(r["family"], r["estimator"]): r for r in s["bounds"]}
    assert set(rows) == {("arm", "exact"), ("mdm", "mc"), ("mdm", "exact_count"), ("mdm", "chain_rule"),
                         ("prime", "mc"), ("prime", "exact_count"), ("prime", "legacy_joint")}
    H = s["data"]["heldout"]
    for key, r in rows.items():
        assert r["docs"] == H["docs"]
        lo, hi = r["gap_ci95"]
        assert lo < r["gap"] < hi
        if key[1] == "legacy_joint":
            assert not r["is_bound"] and r["kind"] == "not_a_likelihood" and "NOT a bound" in r["verdict"]
            v = r["vs_valid"]
            side = "below" if v["gap"] < 0 else "above"
            assert f"{abs(v['gap']):.1f} nats/doc {side} the valid bound" in r["verdict"] or "BELOW H" in r["verdict"]
            continue
        # a likelihood or a valid bound is never below the entropy (tiny models: far above)
        assert hi > 0, (key, r["gap"], r["gap_se"])
        assert r["nats_per_doc"] == pytest.approx(H["nats_per_doc"] + r["gap"])
        assert (r["length_term"] > 0) == (key[0] != "arm")
    for f in (out / "runs" / "ppl").glob("*.json"):
        assert json.loads(f.read_text())["kind"] == "prime-eval/ppl"
    assert s["audit"]["valid_estimators_pass"]
    assert any(r["case"].startswith("trained MDM-Prime") for r in s["audit"]["rows"])


@pytest.mark.slow
def test_demo_models_are_upstream_files_and_cached(demo_run):
    from safetensors.torch import load_file

    from prime_eval.demo import default_settings, ensure_models
    from prime_eval.demo.models import cache_folder
    from prime_eval.subtokenizer import load_permutation
    from prime_eval.synthetic import generate

    out, cache, s = demo_run
    settings = default_settings(0, quick=True)
    folder = cache_folder(settings, cache)
    V, d = settings.vocab_size, settings.model.n_embd
    arm = load_file(str(folder / "arm.safetensors"))
    mdm = load_file(str(folder / "mdm.safetensors"))
    prime = torch.load(folder / "prime.pth", weights_only=True)
    assert set(prime) == {"model"}
    assert arm["transformer.wte.weight"].shape == (V, d) and arm["lm_head.weight"].shape == (V, d)
    assert mdm["transformer.wte.weight"].shape == (V + 1, d)
    ell = int(np.ceil(np.log2(V)))
    assert prime["model"]["transformer.wte.weight"].shape == (3 * ell, d)
    perm = load_permutation(folder / f"perm_{2 ** ell}.pt")
    assert not torch.equal(perm, torch.arange(2 ** ell))
    assert "transformer.h.0.mlp.swiglu.w1.weight" in arm and "transformer.h.0.attn.attn.weight" in mdm

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert len(tok) == V and tok.bos_token_id == tok.eos_token_id == 0
    text = json.loads((out / "data" / "heldout.jsonl").read_text().splitlines()[0])["text"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text

    data = generate(settings.language, settings.n_train, settings.n_heldout, settings.n_task_items)
    art = ensure_models(settings, data, cache)  # second time: from the cache, no training
    assert art.cached and art.checkpoints["prime"] == folder / "prime.pth"


@pytest.mark.slow
def test_two_runs_of_the_demo_give_the_same_report(demo_run, tmp_path):
    """The demo retrained from scratch (another cache) writes the same files with the same numbers, up to wall times
    and absolute paths (`prime_eval.demo.reproduce.compare`, also `prime-eval demo --compare DIR`)."""
    from prime_eval.demo.reproduce import compare

    out, cache, s = demo_run
    again = _quick_run(tmp_path / "out", tmp_path / "cache")
    assert not again["cached"]
    assert compare(out, tmp_path / "out") == []
    # the check sees a changed number
    f = tmp_path / "out" / "demo_entropy.csv"
    f.write_text(f.read_text().replace(",", ";", 3))
    assert compare(out, tmp_path / "out") == ["demo_entropy.csv: the texts differ"]


@pytest.mark.slow
def test_the_committed_report_is_what_the_demo_writes(demo_run):
    """reports/demo holds exactly the files a demo run writes (nothing stale, nothing hand-added), from the current
    default settings and training code (its training key is today's), and its report is the one its summary and
    runs render to."""
    from prime_eval.demo import default_settings
    from prime_eval.demo.reproduce import DATE

    committed = ROOT / "reports" / "demo"
    out = demo_run[0]
    names = lambda root: sorted(DATE.sub("<date>", str(p.relative_to(root))) for p in root.rglob("*")  # noqa: E731
                                if p.is_file())
    assert names(committed) == names(out)
    summary = json.loads((committed / "demo.json").read_text())
    settings = default_settings(0)
    assert summary["training_key"] == settings.training_key(), "reports/demo is stale: run `make demo` again"
    assert summary["settings"] == json.loads(json.dumps(settings.as_dict()))


def _train_two_steps(family, monkeypatch=None, **spec):
    from prime_eval.demo import TrainSpec, default_settings, train_network
    from prime_eval.subtokenizer import SubTokenizer, make_permutation

    s = default_settings(5, quick=True)
    s = dataclasses.replace(s, train={f: TrainSpec(steps=2, batch_size=8, **spec) for f in ("arm", "mdm", "prime")})
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, s.vocab_size, size=int(rng.integers(3, 12))).tolist() for _ in range(64)]
    st = SubTokenizer(s.vocab_size, base=2, perm=make_permutation(2 ** 9, s.vocab_size, seed=1))
    return train_network(family, s, docs, 0, 0, 32, st=st if family == "prime" else None)


def test_training_is_deterministic():
    from prime_eval.demo import TrainSpec, default_settings, train_network
    from prime_eval.subtokenizer import SubTokenizer, make_permutation

    s = default_settings(5, quick=True)
    s = dataclasses.replace(s, train={f: TrainSpec(steps=3, batch_size=8, joint_weight=0.5)
                                      for f in ("arm", "mdm", "prime")})
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, s.vocab_size, size=int(rng.integers(3, 12))).tolist() for _ in range(64)]
    st = SubTokenizer(s.vocab_size, base=2, perm=make_permutation(2 ** 9, s.vocab_size, seed=1))
    for fam in ("arm", "mdm", "prime"):
        a, _ = train_network(fam, s, docs, 0, 0, 32, st=st if fam == "prime" else None)
        b, _ = train_network(fam, s, docs, 0, 0, 32, st=st if fam == "prime" else None)
        for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(va, vb), (fam, k)


def test_training_does_not_depend_on_the_thread_count():
    """`prime-eval demo --threads 2` (or a machine whose torch defaults to 2 threads) trains the same weights as one
    thread: 1 vs 2 intra-op threads used to give different checkpoints, so `make demo` did not reproduce the
    committed report."""
    from prime_eval.demo import TrainSpec, default_settings, train_network
    from prime_eval.subtokenizer import SubTokenizer, make_permutation

    s = default_settings(5, quick=True)
    s = dataclasses.replace(s, train={f: TrainSpec(steps=3, batch_size=32, joint_weight=0.5)
                                      for f in ("arm", "mdm", "prime")})
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, s.vocab_size, size=int(rng.integers(20, 60))).tolist() for _ in range(64)]
    st = SubTokenizer(s.vocab_size, base=2, perm=make_permutation(2 ** 9, s.vocab_size, seed=1))
    before = torch.get_num_threads()
    try:
        for fam in ("arm", "mdm", "prime"):
            weights = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                net, _ = train_network(fam, s, docs, 0, 0, 64, st=st if fam == "prime" else None)
                weights.append(net.state_dict())
                assert torch.get_num_threads() == threads  # restored after training
            for k in weights[0]:
                assert torch.equal(weights[0][k], weights[1][k]), (fam, k)
    finally:
        torch.set_num_threads(before)


def test_training_masks_come_from_the_one_sampler(monkeypatch):
    """The MDM and Prime losses draw their masks with `estimators.sampler.batch_masks` from the run's own
    torch.Generator (no numpy, no global RNG): the global RNG state is untouched by training."""
    import prime_eval.demo.losses as losses
    from prime_eval.estimators import sampler

    calls = []

    def recording(generator, lengths, width, **kw):
        calls.append((type(generator), lengths.clone(), width))
        return sampler.batch_masks(generator, lengths, width, **kw)

    monkeypatch.setattr(losses, "batch_masks", recording)
    state = torch.get_rng_state()
    for fam, per_token in (("mdm", 1), ("prime", 9)):
        calls.clear()
        _train_two_steps(fam, joint_weight=0.5)
        assert len(calls) == 2 and all(g is torch.Generator for g, _, _ in calls)
        assert all(w % per_token == 0 and int(n.max()) <= w for _, n, w in calls)
    assert torch.equal(torch.get_rng_state(), state)


def test_prime_loss_mixes_the_marginal_and_the_joint_loss():
    """λ = 0: the valid marginal NELBO (each masked digit pays −log of its marginal); λ = 1: the published joint
    loss (every real token pays its V-way cross-entropy); in between, the mixture. Checked against a direct
    computation on a tiny batch with a fixed mask draw."""
    from prime_eval.demo.losses import prime_loss
    from prime_eval.estimators.sampler import batch_masks
    from prime_eval.subtokenizer import SubTokenizer

    V, ell = 6, 3
    st = SubTokenizer(V, base=2, perm=torch.tensor([3, 0, 7, 5, 1, 2, 4, 6]))
    logits_table = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(0))

    class Net:
        def __call__(self, yin, attention_mask, logits_at):
            return logits_table[logits_at]

    x = torch.tensor([[1, 4, 2], [5, 0, 0]])
    lengths = torch.tensor([3, 2])
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    masks, weights = batch_masks(g(), lengths * ell, 3 * ell)
    masks = masks.view(2, 3, ell)
    logp = torch.log_softmax(logits_table, -1)
    joint = marg = 0.0
    for b in range(2):
        for i in range(int(lengths[b])):
            joint += float(weights[b]) * -float(logp[b, i, x[b, i]])
            digits = st.digit_table[x[b, i]]
            for j in range(ell):
                if masks[b, i, j]:
                    q = float(logp[b, i].exp()[st.digit_table[:, j] == digits[j]].sum())
                    marg += float(weights[b]) * -np.log(q)
    n = 5
    for lam in (0.0, 0.3, 1.0):
        got = float(prime_loss(Net(), x, lengths, g(), st, lam))
        assert got == pytest.approx(((1 - lam) * marg + lam * joint) / n, rel=1e-5)


def _library_sources():
    """The demo's and the synthetic language's modules (packages now; single files before)."""
    out = [p for pattern in ("demo*.py", "demo/*.py", "synthetic*.py", "synthetic/*.py")
           for p in sorted((ROOT / "prime_eval").glob(pattern))]
    assert len(out) > 2
    return out


def test_the_demo_library_imports_neither_the_cli_nor_the_adapters():
    """prime_eval/demo and prime_eval/synthetic never import `prime_eval.commands` or `model_adapters`, not even by
    name through importlib (the old `_require("model_adapters.base", ...)`); `prime-eval demo` registers the adapters
    itself."""
    import subprocess
    import sys

    bad = ("model_adapters", "prime_eval.commands")
    for path in _library_sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value] if re.fullmatch(r"[\w.]+", node.value) else []
            assert not [n for n in names if n.startswith(bad)], (path.name, names)
    code = ("import sys, prime_eval.demo, prime_eval.synthetic; "
            "print(sorted(m for m in sys.modules if m.startswith(('model_adapters', 'prime_eval.commands'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_demo_writes_files_only_through_prime_eval_io():
    """No `write_text`, `write_bytes`, `open(..., "w")`, `json.dump` or `torch.save(path)` in the demo and synthetic
    packages: every file goes through `prime_eval.io` (atomic). (The tokenizer folder is written by transformers'
    `save_pretrained`, inside the cache folder that `train.json`, written last, marks complete.)"""
    for path in _library_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            assert name not in ("write_text", "write_bytes", "dump", "save_file"), (path.name, node.lineno)
            if name == "open":
                modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                assert not any("w" in m or "a" in m for m in modes), (path.name, node.lineno)


def _bounds_rows(gap_legacy: float, gap_valid: float, se: float = 0.5) -> list[dict]:
    from prime_eval.intervals import normal_interval

    rows = []
    for est, kind, gap in (("mc", "upper_bound", gap_valid), ("legacy_joint", "not_a_likelihood", gap_legacy)):
        rows.append({"family": "prime", "estimator": est, "kind": kind, "gap": gap, "gap_se": se,
                     "gap_ci95": list(normal_interval(gap, se))})
    return rows


def test_legacy_verdict_says_above_or_below_the_valid_bound_with_the_right_sign():
    """The verdict of a legacy_joint row used to read "-337.8 nats/doc below the valid bound" when legacy_joint was
    337.8 above it. It now says above/below by the sign of the paired difference, and how far below H when it is."""
    from prime_eval.demo.bounds import compare_with_valid, verdict

    H = 40.0
    docs = np.arange(10.0)
    for gap_legacy, gap_valid, want in ((350.0, 12.2, "337.8 nats/doc above the valid bound"),
                                        (5.0, 20.0, "15.0 nats/doc below the valid bound"),
                                        (-8.0, 3.0, "BELOW H by 8.0 nats/doc (20% of H)")):
        rows = _bounds_rows(gap_legacy, gap_valid)
        values = {("prime", "mc"): docs + gap_valid, ("prime", "legacy_joint"): docs + gap_legacy}
        compare_with_valid(rows, values)
        assert rows[1]["vs_valid"]["gap"] == pytest.approx(gap_legacy - gap_valid)
        assert want in verdict(rows[1], H), verdict(rows[1], H)
    assert verdict(_bounds_rows(0, 1.0)[0], H) == "≥ H (valid bound)"
    # against the MDM's valid bound: the published scorer's ranking and the true one, said in the report
    from prime_eval.demo.tables import ranking_sentence

    rows = _bounds_rows(-8.0, 9.7) + [{"family": "mdm", "estimator": "mc", "kind": "upper_bound"}]
    compare_with_valid(rows, {("prime", "mc"): docs + 9.7, ("prime", "legacy_joint"): docs - 8.0 + docs % 2,
                              ("mdm", "mc"): docs + 6.7})
    assert rows[0]["vs_mdm"]["gap"] == pytest.approx(3.0) and rows[1]["vs_mdm"]["gap"] == pytest.approx(-14.2)
    assert "vs_mdm" not in rows[2]
    said = ranking_sentence(rows[1], rows[0])
    assert "published scorer puts MDM-Prime-v2 at -14.2 nats/doc" in said and "valid bound at +3.0 nats/doc" in said
    assert said.endswith("the published scorer reverses the ranking.")
    assert "BELOW H" in verdict(_bounds_rows(0, -5.0)[0], H)  # a valid bound below H: a bug, said loudly


def test_demo_accuracy_intervals_stay_inside_0_100():
    """Accuracy cells are Wilson-with-MC intervals [low, high] inside [0, 100] (never "± x" across 0 or 100), and the
    model − Bayes cells Tango intervals inside [−100, 100], even at accuracies of 0 and 100%."""
    from prime_eval.demo.tables import accuracy_table
    from prime_eval.intervals import paired_difference_interval, wilson_interval

    n = 20
    data = {"tasks": {"t": {"bayes_acc": 1.0, "docs": n, "chance": 0.25, "bayes_acc_se": 0.0}}}
    acc = []
    for fam, p in (("arm", 0.0), ("mdm", 1.0), ("prime", 0.05)):
        lo, hi = wilson_interval(p, n, extra_var=0.002)
        glo, ghi = paired_difference_interval(0, round((1 - p) * n), n, 0.002)
        acc.append({"model": f"{fam}-demo", "task": "t", "acc": p, "acc_ci95": [lo, hi], "gap_to_bayes": p - 1.0,
                    "gap_to_bayes_ci95": [glo, ghi]})
    summary = {"data": data, "accuracy": acc, "settings": {"score_samples": 4},
               "models": {f: {"params": 1e5} for f in ("arm", "mdm", "prime")}}
    table = accuracy_table(summary)
    for row in table.rows:
        for cell in row[2:]:
            if getattr(cell, "unc", ""):
                assert "±" not in cell.unc
                lo, hi = (float(x) for x in cell.unc.strip("[]").split(","))
                assert (-100.0 <= lo <= hi <= 100.0) and (lo >= 0 or "model − Bayes" in table.header[row.index(cell)])


@pytest.mark.slow
def test_the_ppl_progress_goes_through_the_callback(demo_run):
    """Each perplexity run of the demo reports its progress through `evaluate_perplexity(progress=callback)` (the
    demo used to pass a Console, which now only warns and shows nothing)."""
    from prime_eval.demo import bound_vs_entropy, default_settings, ensure_models
    from prime_eval.synthetic import generate

    out, cache, _ = demo_run
    settings = default_settings(0, quick=True)
    data = generate(settings.language, settings.n_train, settings.n_heldout, settings.n_task_items)
    art = ensure_models(settings, data, cache)
    seen: dict[str, list] = {}

    class Bar:
        def __init__(self, label):
            self.label = label

        def __enter__(self):
            return lambda p: seen.setdefault(self.label, []).append(p.docs)

        def __exit__(self, *exc):
            return None

    bound_vs_entropy(art, settings, data, out / "ppl-again", progress_bar=Bar)
    assert len(seen) == 7 and "MDM-Prime-v2 · legacy_joint" in seen
    assert all(v[-1] == settings.n_heldout for v in seen.values())


@pytest.mark.slow
def test_the_demo_reports_generation_against_the_true_language(demo_run):
    """Every family completes the synthetic sentences through lm-eval's generate_until (greedy and temperature 1);
    the report's generation table sits between the accuracy table and the audit; every answer of the samples files
    is scored (none dropped) and its true log-likelihood recomputed from the text matches demo.json; the sampler
    settings are recorded."""
    import math

    from prime_eval.demo.generation import generation_settings
    from prime_eval.synthetic import Language
    from prime_eval.synthetic.generative import generated_log_prob

    out, _, s = demo_run
    md = (out / "report.md").read_text()
    i, j, k = (md.index(t) for t in ("Accuracy against the Bayes-optimal answer", "Generation against the true "
                                     "language", "Exact audit: oracle networks"))
    assert i < j < k
    g = s["generation"]
    gs = generation_settings(quick=True)
    assert g["settings"]["max_gen_toks"] == gs.max_gen_toks and g["truth"]["docs"] == gs.n_items
    assert (out / "data" / "tasks" / "synth_complete_t1.yaml").is_file()
    from prime_eval.demo import default_settings

    lang = Language.from_spec(default_settings(0, quick=True).language)
    items = {json.loads(x)["id"]: json.loads(x) for x in
             (out / "data" / "synth_complete" / "test.jsonl").read_text().splitlines()}
    rows = {r["family"]: r for r in g["rows"]}
    assert sorted(rows) == ["arm", "mdm", "prime"]
    for fam, r in rows.items():
        for mode, task in (("greedy", "synth_complete"), ("sampled", "synth_complete_t1")):
            res = r[mode]
            assert res["answers"] == gs.n_items * (1 if mode == "greedy" else gs.repeats)
            assert 0 <= res["invalid"] <= res["answers"] and res["passes_per_token"] > 0
            for key in ("em_bayes", "em_realised", "invalid_frac"):
                lo, hi = res[f"{key}_ci95"]
                assert 0.0 <= lo <= res[key] <= hi <= 1.0
            [samples] = (out / "generation" / f"{fam}-demo-{mode}").glob(f"samples_{task}_*.jsonl")
            nll, invalid = [], 0
            for line in samples.read_text().splitlines():
                x = json.loads(line)
                lp = generated_log_prob(lang, items[x["doc"]["id"]]["context"], x["resps"][0][0])
                invalid += lp == -math.inf
                nll += [] if lp == -math.inf else [-lp]
            assert invalid == res["invalid"]
            if nll:
                assert res["nll_valid"] == pytest.approx(sum(nll) / len(nll), rel=1e-9)
            cfg = json.loads(next((out / "generation" / f"{fam}-demo-{mode}").glob("results_*.json")).read_text())
            gen = cfg["config"]["prime_eval"]["generation"]
            for key, value in gs.model_args(fam, mode).items():
                assert gen[key] == value, (fam, mode, key)
    rows_csv = (out / "demo_generation.csv").read_text().splitlines()
    assert len(rows_csv) == 1 + 6


def test_cli_registers_demo():
    from prime_eval.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--out", "x", "--seed", "3", "--compare", "reports/demo"])
    assert args.quick and args.out == "x" and args.seed == 3 and args.cache_dir is None
    assert args.compare == "reports/demo"


_TRAIN_AND_HASH = """
import hashlib, json, sys
from prime_eval.demo import numerics
if sys.argv[1] == "pin":
    numerics.pin()
import numpy as np, torch
from prime_eval.demo import TrainSpec, default_settings, train_network
import dataclasses
s = default_settings(5, quick=True)
s = dataclasses.replace(s, train={"arm": TrainSpec(steps=4, batch_size=8)})
rng = np.random.default_rng(0)
docs = [rng.integers(1, s.vocab_size, size=int(rng.integers(3, 12))).tolist() for _ in range(64)]
net, _ = train_network("arm", s, docs, 0, 0, 32)
h = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.state_dict().values())).hexdigest()
print(json.dumps({"state": numerics.state(), "sha": h}))
"""


def _train_in_subprocess(pin: bool, **env) -> dict:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    out = subprocess.run([sys.executable, "-c", _TRAIN_AND_HASH, "pin" if pin else "native"], cwd=ROOT,
                         env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pinned_kernels_give_the_same_weights_on_an_avx2_only_cpu():
    """`numerics.pin()` (what `prime-eval demo` does first) trains to the same bits whether MKL may use AVX-512 or
    only AVX2 (`MKL_ENABLE_INSTRUCTIONS=AVX2`: an AVX2-only CPU as MKL sees it); unpinned, it does not on a CPU with
    AVX-512, which is why the demo pins."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the pinned kernels are x86-64 ones")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU has no AVX2 (torch capability {torch.backends.cpu.get_cpu_capability()})")
    wide = _train_in_subprocess(pin=True)
    narrow = _train_in_subprocess(pin=True, MKL_ENABLE_INSTRUCTIONS="AVX2")
    assert wide["state"] == {"torch_cpu_capability": "AVX2", "MKL_CBWR": "AVX2", "pinned": True}
    assert wide["sha"] == narrow["sha"]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        native = _train_in_subprocess(pin=False)
        assert native["state"]["pinned"] is False and native["state"]["torch_cpu_capability"] == "AVX512"
        assert native["sha"] != wide["sha"], "unpinned AVX-512 kernels gave the pinned bits: the test shows nothing"


def test_compare_says_when_two_runs_used_other_float_kernels(tmp_path, capsys):
    from prime_eval.demo.reproduce import report

    pinned = {"torch_cpu_capability": "AVX2", "MKL_CBWR": "AVX2", "pinned": True}
    native = {"torch_cpu_capability": "AVX512", "MKL_CBWR": None, "pinned": False}
    for name, numerics in (("a", pinned), ("b", native), ("c", pinned)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "demo.json").write_text(json.dumps({"numerics": numerics}))
    assert report(["demo.json/numerics: differs"], tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "different float kernels (torch AVX2, MKL_CBWR=AVX2 vs torch AVX512, MKL_CBWR=None)" in out
    report(["x: the texts differ"], tmp_path / "a", tmp_path / "c")
    assert "float kernels" not in capsys.readouterr().out
