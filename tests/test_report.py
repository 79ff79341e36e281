"""Tests of the report builder: the per-document Monte Carlo model against hand-computed values, golden
Markdown/CSV/LaTeX on real lm-eval runs of tiny models (tests/fixtures/report/runs, made by make_fixtures.py), one row
per run, intervals inside their range, what each number is, the parsed HTML, and the HTML rendered by headless
Chromium. (The interval formulas themselves: tests/test_intervals.py.)

Regenerate the golden files after an intended change with PRIME_EVAL_UPDATE_GOLDEN=1 (then review the diff).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from prime_eval import intervals
from prime_eval import report as rp

FIX = Path(__file__).resolve().parent / "fixtures" / "report"
RUNS = FIX / "runs"
GOLDEN = FIX / "golden"
META = FIX / "meta.yaml"


def phi(x: float) -> float:
    """Reference Φ from the standard library."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------------------------
# The Monte Carlo model of a document's correctness: hand-computed cases
# ---------------------------------------------------------------------------------------------------------------

def test_prob_correct_two_choices_closed_form():
    # Δ = 1, sqrt(0.6² + 0.8²) = 1  ->  Φ(1) = 0.841345
    assert rp.prob_correct([-10.0, -11.0], [0.6, 0.8], 0) == pytest.approx(phi(1.0), abs=1e-12)
    assert rp.prob_correct([-10.0, -11.0], [0.6, 0.8], 1) == pytest.approx(phi(-1.0), abs=1e-12)
    assert rp.prob_correct([-1.0, -2.0], [0.0, 0.0], 0) == 1.0            # exact scores: no MC noise
    assert rp.prob_correct([-1.0, -2.0], [0.0, 0.0], 1) == 0.0


def test_prob_correct_many_choices():
    # gold exact, others noisy and independent: q = Φ(1)·Φ(2) = 0.822204
    assert rp.prob_correct([0.0, -1.0, -2.0], [0.0, 1.0, 1.0], 0) == pytest.approx(phi(1) * phi(2), abs=1e-4)
    # gold noisy, others exact (step integrand): q = P(0 + Z > 1) = 1 − Φ(1) = 0.158655
    assert rp.prob_correct([0.0, 1.0, -5.0], [1.0, 0.0, 0.0], 0) == pytest.approx(1 - phi(1), abs=1e-3)
    # symmetric case: four equal means and SEs -> 1/4 each
    q = [rp.prob_correct([0.0] * 4, [1.0] * 4, g) for g in range(4)]
    assert q == pytest.approx([0.25] * 4, abs=1e-3)
    assert sum(q) == pytest.approx(1.0, abs=1e-3)


def test_mc_variance():
    assert rp.mc_variance([1.0, 0.0, 0.5, 0.5]) == pytest.approx(0.5 / 16)  # Σ q(1−q) / n²
    assert rp.mc_variance([1.0, 0.0, 1.0]) == 0.0


def test_paired_difference():
    # d = [1, 0, 1, 0]: mean 0.5, var(ddof=1) = 1/3, SE = sqrt(1/3 / 4); interval: Tango's with b = 2, c = 0, n = 4
    diff, se, lo, hi = rp.paired_difference([1, 1, 1, 0], [0, 1, 0, 0])
    assert diff == 0.5 and se == pytest.approx(math.sqrt(1 / 12))
    assert (lo, hi) == intervals.paired_difference_interval(2, 0, 4)
    assert -1.0 <= lo < 0.5 < hi <= 1.0 and not rp.excludes_zero(lo, hi)
    # with MC variances 0.01 and 0.02: SE = sqrt(1/12 + 0.03); the interval widens
    d2, se2, lo2, hi2 = rp.paired_difference([1, 1, 1, 0], [0, 1, 0, 0], 0.01, 0.02)
    assert se2 == pytest.approx(0.3366501646) and lo2 < lo and hi2 > hi
    d, se, lo, hi = rp.paired_difference([1] * 30, [1] * 10 + [0] * 20)
    assert d == pytest.approx(2 / 3) and rp.excludes_zero(lo, hi) and hi <= 1.0
    with pytest.raises(ValueError):
        rp.paired_difference([1], [0])


def test_metric_choice():
    both = {"acc", "acc_norm"}
    assert [rp.choose_metric(t, both) for t in ("hellaswag", "arc_challenge", "openbookqa", "piqa")] == ["acc_norm"] * 4
    assert [rp.choose_metric(t, both) for t in ("arc_easy", "winogrande", "boolq")] == ["acc"] * 3
    assert rp.choose_metric("piqa", {"acc"}) == "acc"
    assert rp.choose_metric("my_task", {"f1", "exact_match"}) == "exact_match"
    assert rp.choose_metric("piqa", both, {"piqa": "acc"}) == "acc"


# ---------------------------------------------------------------------------------------------------------------
# The fixtures' report: golden files, cross-checks against the raw lm-eval outputs
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from prime_eval.cli import main

    out = tmp_path_factory.mktemp("report")
    rc = main(["report", str(RUNS), "--out", str(out), "--meta", str(META), "--quiet"])
    assert rc == 0
    return out


@pytest.mark.parametrize("name", ["report.md", "accuracy.csv", "paired.csv", "perplexity.csv", "report.tex"])
def test_golden(built, name):
    got = (built / name).read_text()
    golden = GOLDEN / name
    if os.environ.get("PRIME_EVAL_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    assert golden.exists(), f"{golden} missing: run with PRIME_EVAL_UPDATE_GOLDEN=1 once and review it"
    assert got == golden.read_text(), f"{name} differs from {golden} (PRIME_EVAL_UPDATE_GOLDEN=1 to accept)"


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _section(md: str, title: str) -> str:
    """The Markdown of one table (from its heading to the next)."""
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _rows(section: str) -> str:
    """The table rows of a section (no caption, no footnotes)."""
    return "\n".join(line for line in section.splitlines() if line.startswith("| "))


def test_accuracy_matches_lm_eval_outputs(built):
    """Each reported value and dataset SE equals lm-eval's in the very results file the row names, and equals the
    mean of that run's samples log."""
    rows = [r for r in _csv(built / "accuracy.csv") if r["status"] == "ok"]
    assert len(rows) >= 30
    for r in rows:
        src = RUNS / r["source"]
        res = json.loads(src.read_text())["results"][r["task"]]
        assert float(r["value"]) == pytest.approx(res[f"{r['metric']},none"], abs=1e-6)
        assert float(r["se_data"]) == pytest.approx(res[f"{r['metric']}_stderr,none"], abs=1e-6)
        samples = [json.loads(x) for x in next(src.parent.glob(f"samples_{r['task']}_*.jsonl")).read_text().splitlines()]
        assert float(r["value"]) == pytest.approx(sum(s[r["metric"]] for s in samples) / len(samples), abs=1e-6)


def test_one_row_per_run_hf_and_arm_on_the_same_folder(built):
    """Issue 13 §3: the same folder scored by lm-eval's hf and by our arm adapter are two rows, labelled by model
    type, each with its own numbers (the old report merged them into one row "arm-tiny-a")."""
    rows = [r for r in _csv(built / "accuracy.csv") if r["model"].startswith("arm-tiny-a")]
    assert {r["model"] for r in rows} == {"arm-tiny-a [hf]", "arm-tiny-a [arm]"}
    for r in (r for r in rows if r["status"] == "ok"):
        assert r["source"].startswith("arm-tiny-a-ours/" if r["model"].endswith("[arm]") else "arm-tiny-a/")
        assert f"[{r['model_type']}]" in r["model"]
    md = (built / "report.md").read_text()
    assert "| ARM | arm-tiny-a [arm] | 1.65M | exact |" in md
    assert "| ARM | arm-tiny-a [hf] | 1.65M | exact (lm-eval hf) |" in md


def test_one_row_per_estimator_setting(built):
    """Two estimator settings of one checkpoint (K = 128 and K = 4): two rows, each with the values, label and
    estimator of its own run (the old report showed one "prime-tiny" row mixing them)."""
    rows = [r for r in _csv(built / "accuracy.csv") if r["model"].startswith("prime-tiny (mc") and r["status"] == "ok"]
    by = {(r["model"], r["task"]): r for r in rows}
    for label, folder, k in (("prime-tiny (mc, K=128)", "prime-tiny", "128"),
                             ("prime-tiny (mc, K=4)", "prime-tiny-k4", "4")):
        res = json.loads(next((RUNS / folder).glob("results_*.json")).read_text())
        for task in ("arc_easy", "piqa"):
            r = by[(label, task)]
            assert r["source"].startswith(f"{folder}/") and r["estimator"] == f"mc, K={k}" and r["num_samples"] == k
            assert float(r["value"]) == pytest.approx(res["results"][task][f"{r['metric']},none"], abs=1e-12)
    assert by[("prime-tiny (mc, K=128)", "arc_easy")]["value"] != by[("prime-tiny (mc, K=4)", "arc_easy")]["value"]
    assert len({r["checkpoint"] for r in rows}) == 1  # the same checkpoint


def test_identical_rerun_with_equal_numbers_is_merged(built):
    """arm-tiny-b-rerun (same configuration, same numbers on arc_easy) joins the arm-tiny-b row; a note names both
    files, so that the reader knows the row stands for two runs."""
    col = rp.load([RUNS / "arm-tiny-b", RUNS / "arm-tiny-b-rerun"], {})
    assert len(col.runs) == 1 and len(col.runs[0].sources) == 2
    assert len(col.notes) == 1 and "arm-tiny-b-rerun/" in col.notes[0] and "shown as one row" in col.notes[0]
    assert "arm-tiny-b (" not in (built / "report.md").read_text()


def test_runs_split_by_task_are_one_row_and_the_note_says_so(tmp_path):
    """Two runs of one configuration on different tasks (lm-eval runs split by task) are one row with both tasks; the
    note used to call the second a repeat "(identical configuration and numbers)", which it is not."""
    res = json.loads(next((RUNS / "mdm-tiny").glob("results_*.json")).read_text())
    tasks = sorted(res["results"])
    assert len(tasks) >= 2
    for i, keep in enumerate(([tasks[0]], tasks[1:])):
        part = {k: ({t: v[t] for t in keep if t in v} if isinstance(v, dict) and set(v) & set(tasks) else v)
                for k, v in res.items()}
        part["date"] = res["date"] + 3600 * i
        (tmp_path / f"part{i}").mkdir()
        (tmp_path / f"part{i}" / f"results_2026-01-0{i + 1}T10-00-00.000001.json").write_text(json.dumps(part))
    col = rp.load([tmp_path], {})
    assert len(col.runs) == 1 and sorted(col.runs[0].tasks) == tasks
    (note,) = col.notes
    assert "part1/" in note and f"adds {', '.join(tasks[1:])} to" in note and "repeats" not in note


def test_generation_tasks_get_a_table_of_their_own(tmp_path):
    """A generate_until task (exact_match of generated answers) used to sit in "Zero-shot accuracy (likelihood-based)"
    under the run's log-likelihood estimator, with a footnote about its missing Monte Carlo error. It now has a table of
    its own, without an estimator column or an MC term, and no likelihood table or paired comparison lists it."""
    shutil.copytree(RUNS / "mdm-tiny", tmp_path / "mdm-tiny")
    f = next((tmp_path / "mdm-tiny").glob("results_*.json"))
    res = json.loads(f.read_text())
    tasks = sorted(res["results"])
    gen = tasks[0]
    res["configs"][gen]["output_type"] = "generate_until"
    f.write_text(json.dumps(res))
    rep = rp.build(rp.load([tmp_path], {}))
    by_key = {t.key: t for t in rep.tables}
    table = by_key["accuracy-generation"]
    assert "Estimator" not in table.header and {r["task"] for r in table.records} == {gen}
    assert all(r["se_mc"] == 0.0 and r["estimator"] == "" for r in table.records) and not table.notes
    for t in rep.tables:
        if t.key != "accuracy-generation":
            assert gen not in {r.get("task") for r in t.records}, t.key
    assert set(tasks[1:]) <= {r["task"] for r in by_key["accuracy"].records}


def _rerun(tmp_path: Path, change: float) -> Path:
    """mdm-tiny and a copy of its results with a later date; piqa's acc_norm moved by `change`."""
    d = tmp_path / "runs"
    shutil.copytree(RUNS / "mdm-tiny", d / "mdm-tiny")
    res = json.loads(next((RUNS / "mdm-tiny").glob("results_*.json")).read_text())
    res["results"]["piqa"]["acc_norm,none"] += change
    res["date"] += 3600
    (d / "again").mkdir()
    (d / "again" / "results_2026-01-03T10-00-00.000001.json").write_text(json.dumps(res))
    return d


def test_identical_rerun_with_different_numbers_is_shown_twice(tmp_path):
    """Issue 13 §3: re-runs of the identical configuration whose numbers differ are both shown, told apart by run,
    with a note (the old report kept one and dropped the other silently)."""
    col = rp.load([_rerun(tmp_path, 0.05)], {})
    assert len(col.runs) == 2
    assert sorted(r.display for r in col.runs) == ["mdm-tiny (run 2026-01-01T10-10-00.000001)",
                                                   "mdm-tiny (run 2026-01-03T10-00-00.000001)"]
    assert any("identical configuration but different numbers (piqa (acc_norm" in n for n in col.notes)
    rep = rp.build(col)
    acc = rep.tables[0]
    assert all(row[1].notes for row in acc.rows)  # each row carries the footnote
    assert any("identical configuration" in v for v in acc.notes.values())
    values = {str(row[1]): row[6].value for row in acc.rows}  # PIQA column
    assert sorted(values.values()) == pytest.approx([0.5, 0.55])
    # equal numbers: one row
    col = rp.load([_rerun(tmp_path / "b", 0.0)], {})
    assert len(col.runs) == 1 and col.runs[0].display == "mdm-tiny"
    assert [n for n in col.notes if "shown as one row" not in n] == []


def test_other_settings_label_rows_apart(tmp_path):
    """Same model, type, checkpoint and estimator but another setting (lm-eval's limit, the seed): two rows labelled
    by what differs."""
    d = tmp_path / "runs"
    shutil.copytree(RUNS / "prime-tiny-k4", d / "a")
    res = json.loads(next((RUNS / "prime-tiny-k4").glob("results_*.json")).read_text())
    res["config"]["prime_eval"]["seed"] = 7
    (d / "b").mkdir()
    (d / "b" / "results_2026-01-03T10-00-00.000001.json").write_text(json.dumps(res))
    assert sorted(r.display for r in rp.load([d], {}).runs) == ["prime-tiny (seed=7)", "prime-tiny (seed=None)"]
    res["config"]["prime_eval"].pop("seed")
    res["config"]["limit"] = 10
    (d / "b" / "results_2026-01-03T10-00-00.000001.json").write_text(json.dumps(res))
    assert sorted(r.display for r in rp.load([d], {}).runs) == ["prime-tiny (limit=10)", "prime-tiny (limit=20)"]
    # one setting recorded twice (a model argument and the generation config it went into) is named once
    res["config"]["limit"] = 20
    res["config"]["prime_eval"]["remasking"] = res["config"]["prime_eval"]["generation"] = None
    res["config"]["prime_eval"].update(remasking="random", generation={"remasking": "random"})
    (d / "b" / "results_2026-01-03T10-00-00.000001.json").write_text(json.dumps(res))
    assert sorted(r.display for r in rp.load([d], {}).runs) == ["prime-tiny (remasking=None)",
                                                                "prime-tiny (remasking=random)"]


def test_intervals_stay_in_range(built):
    """Issue 13 §4: no accuracy interval leaves [0, 100], no paired one [−100, 100] (the old normal intervals did:
    "20.0 ± 26.1", "0.0 ± 17.9"); every interval contains its point value."""
    rows = [r for r in _csv(built / "accuracy.csv") if r["status"] == "ok"]
    for r in rows:
        lo, v, hi = float(r["ci95_low"]), float(r["value"]), float(r["ci95_high"])
        assert 0.0 <= lo <= v <= hi <= 1.0 and r["interval"] in ("wilson", "wilson+mc")
    assert any(float(r["value"]) == 0.0 for r in rows)  # LAMBADA: the edge case
    for r in _csv(built / "paired.csv"):
        if r["reason"] == "":
            assert -1.0 <= float(r["ci95_low"]) <= float(r["diff"]) <= float(r["ci95_high"]) <= 1.0
    # the cell: 2 of 10 right, no MC error
    tr = rp.TaskResult(task="arc_easy", metrics={"acc": (0.2, intervals.binomial_se(0.2, 10))}, n=10)
    run = rp.ModelRun(name="arm", tasks={"arc_easy": tr})
    table = rp.build(rp.Collection(runs=[run], ppl=[], notes=[], root=Path("."))).tables[0]
    assert rp.render_markdown(rp.Report("t", [table], [])).count("| 20.0 [5.7, 51.0] |") == 1


def test_plot_error_bars_inside_range(built, monkeypatch):
    """The accuracy plot's error bars are the asymmetric interval, inside [0, 100]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    calls = []
    orig = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, x, y, yerr=None, **kw:
                        calls.append((list(y), yerr)) or orig(self, x, y, yerr=yerr, **kw))
    col = rp.load([RUNS], rp.load_meta(META))
    rep = rp.build(col)
    rp.make_plots(rep, col)
    models = {r["model"] for r in rep.tables[0].records if r["value"] is not None}  # the accuracy plot's calls first
    bars = [(y, lo, hi) for ys, (los, his) in calls[:len(models)] for y, lo, hi in zip(ys, los, his)]
    assert len(bars) > 20
    assert all(y - lo >= -1e-9 and y + hi <= 100 + 1e-9 and lo >= 0 and hi >= 0 for y, lo, hi in bars)


def test_exact_arm_lambada_has_no_mc_term(built):
    """Issue 13 §4: LAMBADA-style is_greedy tasks of an exact ARM get no invented Monte Carlo error (the old report
    set q = ½ per document whose gold it could not find: ~±9 points). Every is_greedy cell of the fixtures (ARM and
    diffusion, is_greedy decided deterministically) has se_mc = 0 and the plain Wilson interval."""
    cells = [r for r in _csv(built / "accuracy.csv") if r["task"] == "lambada_openai" and r["status"] == "ok"]
    assert {r["model"] for r in cells} >= {"arm-tiny-a [arm]", "prime-tiny (mc, K=128)"}
    for r in cells:
        assert float(r["se_mc"]) == 0.0
        plain = intervals.wilson_interval(float(r["value"]), int(r["n"]))
        assert (float(r["ci95_low"]), float(r["ci95_high"])) == pytest.approx(plain, abs=1e-6)  # CSV: 6 decimals


def _copy_run(src: Path, dst: Path, edit_stats=None) -> Path:
    shutil.copytree(src, dst)
    if edit_stats:
        for f in dst.glob("stats_*.jsonl"):
            rows = [edit_stats(json.loads(line)) for line in f.read_text().splitlines()]
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_is_greedy_fallback_and_random_greedy(tmp_path):
    """Older stats without deterministic / is_greedy_deterministic: is_greedy counts as deterministic (every adapter
    decides it by argmax); a stats file that says it was random leaves the MC term out, with a note (never q = ½)."""
    def strip(r):
        return {k: v for k, v in r.items() if k not in ("deterministic", "is_greedy_deterministic", "bound_kind")}

    old = _copy_run(RUNS / "arm-tiny-a-ours", tmp_path / "old" / "arm", strip)
    cell = [r for r in rp.build(rp.load([old], {})).tables[0].records if r["task"] == "lambada_openai"][0]
    assert cell["se_mc"] == 0.0
    rand = _copy_run(RUNS / "prime-tiny", tmp_path / "rand" / "prime", lambda r: {**r, "is_greedy_deterministic": False})
    table = rp.build(rp.load([rand], {})).tables[0]
    cell = [r for r in table.records if r["task"] == "lambada_openai"][0]
    assert cell["se_mc"] is None and any("is_greedy was decided with random numbers" in v for v in table.notes.values())


def test_deterministic_flag_zeroes_the_mc_term(tmp_path):
    """A stats row with deterministic: true has no MC noise whatever its mc_stderr says."""
    run = _copy_run(RUNS / "prime-tiny", tmp_path / "p", lambda r: {**r, "deterministic": True})
    recs = rp.build(rp.load([run], {})).tables[0].records
    assert all(r["se_mc"] == 0.0 for r in recs if r["status"] == "ok")


def test_gold_answer_from_target_text_or_bounded(tmp_path):
    """Three choices, MC noise: the gold is the choice equal to the target text; where nothing identifies it (acc = 0,
    a target that is neither an index nor a choice), the document's term is the largest q_j(1−q_j) over the
    choices that can be gold (never q = ½), and a footnote says so."""
    d = tmp_path / "run"
    d.mkdir()
    res = {"results": {"mytask": {"acc,none": 0.0, "acc_stderr,none": 0.0}},
           "configs": {"mytask": {"target_delimiter": " ", "output_type": "multiple_choice"}},
           "n-samples": {"mytask": {"effective": 2}},
           "config": {"model": "mdm", "prime_eval": {"estimator": "mc", "num_samples": 8, "bound_kind": "upper_bound",
                                                     "model_name": "m", "family": "mdm"}}}
    (d / "results_2026-01-01T00-00-00.0.json").write_text(json.dumps(res))
    lls, ses = [-1.0, -1.5, -3.0], [1.0, 0.5, 0.8]
    args = {f"gen_args_{j}": {"arg_0": "q", "arg_1": f" {c}"} for j, c in enumerate("abc")}
    samples = [{"doc_id": 0, "doc_hash": "h0", "target": "b", "filtered_resps": [[x, False] for x in lls],
                "arguments": args, "acc": 0.0},
               {"doc_id": 1, "doc_hash": "h1", "target": "zzz", "filtered_resps": [[x, False] for x in lls],
                "arguments": args, "acc": 0.0}]
    (d / "samples_mytask_2026-01-01T00-00-00.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    stats = [{"doc_id": i, "choice": j, "loglikelihood": lls[j], "mc_stderr": ses[j], "deterministic": False}
             for i in range(2) for j in range(3)]
    (d / "stats_mytask_2026-01-01T00-00-00.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stats))
    table = rp.build(rp.load([d], {})).tables[0]
    q_gold = rp.prob_correct(lls, ses, 1)  # doc 0: target " b" is choice 1
    q1, q2 = rp.prob_correct(lls, ses, 1), rp.prob_correct(lls, ses, 2)  # doc 1: gold 1 or 2 (0 was scored wrong)
    bound = max(q1 * (1 - q1), q2 * (1 - q2))
    assert table.records[0]["se_mc"] == pytest.approx(math.sqrt(q_gold * (1 - q_gold) + bound) / 2, rel=1e-12)
    assert any("bounded from above for 1 document(s)" in v for v in table.notes.values())


def test_n_and_estimator_in_the_table(built):
    """Issue 13 §4: the main table shows n per task and the estimator with its K per row."""
    md = _section((built / "report.md").read_text(), "Zero-shot accuracy (likelihood-based)")
    header = next(line for line in md.splitlines() if line.startswith("| Family"))
    assert "| Estimator |" in header and "ARC-e (acc, n=20)" in header and "PIQA (acc_norm, n=20)" in header
    assert "| prime-tiny (mc, K=4) | 3.35M | mc, K=4 |" in md and "| mdm-tiny (mc, K=32) | 1.65M | mc, K=32 |" in md


def _synthetic(tmp_path: Path, runs: dict) -> Path:
    """Plain lm-eval runs of boolq: name -> per-document correctness (samples logs with two choices)."""
    for name, correct in runs.items():
        d = tmp_path / name
        d.mkdir(parents=True)
        n = len(correct)
        acc = sum(correct) / n
        res = {"results": {"boolq": {"alias": "boolq", "acc,none": acc, "acc_stderr,none": intervals.binomial_se(acc, n)}},
               "configs": {"boolq": {"target_delimiter": " ", "output_type": "multiple_choice"}},
               "n-samples": {"boolq": {"effective": n}}, "config": {"model": "hf", "model_args": f"pretrained=org/{name}"}}
        (d / "results_2026-01-01T00-00-00.0.json").write_text(json.dumps(res))
        rows = [{"doc_id": i, "doc_hash": f"h{i}", "target": "1", "filtered_resps": [[-2.0, False], [-1.0, False]],
                 "arguments": {}, "acc": float(c)} for i, c in enumerate(correct)]
        (d / "samples_boolq_2026-01-01T00-00-00.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_mixed_n_marked(tmp_path):
    """Runs with different n in one column: n moves from the header into each cell, with a footnote."""
    rep = rp.build(rp.load([_synthetic(tmp_path, {"big": [1] * 20 + [0] * 10, "small": [1] * 5 + [0] * 15})], {}))
    md = rp.render_markdown(rep)
    assert "| BoolQ (acc) |" in md
    assert "| **66.7** [48.8, 80.8] (n=30)[a] |" in md and "| 25.0 [11.2, 46.9] (n=20)[a] |" in md
    assert "[a] runs in this column were scored on different numbers of documents" in md


def test_paired_marker_on_synthetic_samples(tmp_path):
    """Two runs on 30 shared documents, A right on all, B on 10: the paired interval excludes 0 and gets †."""
    rep = rp.build(rp.load([_synthetic(tmp_path, {"good": [1] * 30, "bad": [1] * 10 + [0] * 20})], {}))
    md = rp.render_markdown(rep)
    line = md.split("| bad | good |")[1].splitlines()[0]
    assert line.startswith(" -66.7 [") and line.endswith("† |")


def test_bound_kinds_go_to_their_tables(built):
    """Issue 13 §5: each kind of number in its own table, read from bound_kind (or the documented fallbacks for
    older files): chain_rule (score stats and the older ppl JSON with is_bound false) in the left-to-right tables,
    never "≤"; legacy_joint (old label not_a_bound) and cfg apart; "≤" only on upper bounds."""
    md = (built / "report.md").read_text()
    like = _section(md, "Zero-shot accuracy (likelihood-based)")
    l2r = _section(md, "Zero-shot accuracy: left-to-right process (chain_rule)")
    other = _section(md, "Zero-shot accuracy: NOT likelihood-based (legacy_joint / CFG / temperature)")
    assert "chain_rule" not in like and "| mdm-tiny (chain_rule) | 1.65M | chain_rule |" in l2r
    assert "cfg=1.5" not in like and "| prime-tiny (cfg=1.5) |" in other
    ppl = _section(md, "Perplexity on wikitext2/test")
    ppl_l2r = _section(md, "Perplexity on wikitext2/test: left-to-right process (chain_rule)")
    ppl_other = _section(md, "Perplexity on wikitext2/test: NOT likelihoods (legacy_joint and similar)")
    assert "chain_rule" not in ppl and "legacy_joint" not in ppl
    assert "| mdm-tiny (chain_rule) |" in ppl_l2r and "≤" not in _rows(ppl_l2r)
    assert "| legacy_joint, K=8 |" in ppl_other and "≤" not in _rows(ppl_other)
    assert "| ar | 241,000 | 10.720 [" in ppl and "| exact | 241,000 | **10.610** [" in ppl  # exact ARMs: no mark
    assert "≤ 10.930 [" in ppl and "≤ 10.810 [" in ppl and "≤ 10.840 [" in ppl
    recs = {r["source"]: r for r in _csv(built / "perplexity.csv")}
    assert recs["ppl/mdm-tiny-chain.json"]["bound_kind"] == "exact_left_to_right"
    assert recs["ppl/prime-tiny-legacy.json"]["bound_kind"] == "not_a_likelihood"


def test_bound_kind_label_wins_over_estimator_name(tmp_path):
    """The label decides, not the estimator's name: an estimator the report has never heard of, labelled exact, is
    not marked "≤" (the old report marked every name outside its list of exact estimators)."""
    obj = json.loads((RUNS / "ppl" / "arm-tiny-b.json").read_text())
    obj["protocol"]["estimator"], obj["model"]["family"] = "my_new_exact_estimator", "other"
    (tmp_path / "x.json").write_text(json.dumps(obj))
    table = rp.build(rp.load([tmp_path / "x.json"], {})).tables[0]
    assert table.rows[0][5].prefix == "" and table.records[0]["bound_kind"] == "exact"
    obj["bound_kind"] = "upper_bound"
    (tmp_path / "x.json").write_text(json.dumps(obj))
    assert rp.build(rp.load([tmp_path / "x.json"], {})).tables[0].rows[0][5].prefix == "≤"


def test_ppl_rows_one_per_file(tmp_path):
    """One ppl JSON = one row: two settings of one model are two labelled rows; an identical copy is merged; an
    identical configuration with another number is shown twice with a note."""
    src = RUNS / "ppl" / "prime-tiny.json"
    shutil.copy(src, tmp_path / "a.json")
    shutil.copy(src, tmp_path / "b.json")
    shutil.copy(RUNS / "ppl" / "prime-tiny-k2.json", tmp_path / "k2.json")
    col = rp.load([tmp_path], {})
    assert sorted(r.display for r in col.ppl) == ["prime-tiny (elbo, K=2)", "prime-tiny (elbo, K=8)"]
    assert col.notes == ["prime-tiny: b.json repeats a.json (identical configuration and numbers): shown as one row"]
    obj = json.loads(src.read_text())
    obj["results"]["nll"] += 0.01
    (tmp_path / "b.json").write_text(json.dumps(obj))
    col = rp.load([tmp_path], {})
    assert sorted(r.display for r in col.ppl) == ["prime-tiny (elbo, K=2)", "prime-tiny (elbo, K=8, run a.json)",
                                                  "prime-tiny (elbo, K=8, run b.json)"]
    assert any("identical configuration but different numbers" in n for n in col.notes)


def test_mc_error_recomputed_independently(built):
    """prime-tiny on piqa/winogrande (two choices): se_mc = sqrt(Σ q(1−q))/n with q = Φ(Δ/√(σ_g²+σ_o²))."""
    rows = {(r["model"], r["task"]): r for r in _csv(built / "accuracy.csv")}
    for task, metric in (("piqa", "acc_norm"), ("winogrande", "acc")):
        folder = RUNS / "prime-tiny"
        stats = {(s["doc_id"], s["choice"]): s for s in
                 map(json.loads, next(folder.glob(f"stats_{task}_*.jsonl")).read_text().splitlines())}
        var, n = 0.0, 0
        for line in next(folder.glob(f"samples_{task}_*.jsonl")).read_text().splitlines():
            s = json.loads(line)
            d = s["doc_id"]
            conts = [s["arguments"][f"gen_args_{j}"]["arg_1"][1:] for j in range(2)]
            scale = [len(c) if metric == "acc_norm" else 1.0 for c in conts]
            ll = [stats[(d, j)]["loglikelihood"] / scale[j] for j in range(2)]
            se = [stats[(d, j)]["mc_stderr"] / scale[j] for j in range(2)]
            if task == "winogrande":  # gold from the correctness of the argmax (targets are strings there)
                pred = 0 if ll[0] >= ll[1] else 1
                gold = pred if s["acc"] == 1 else 1 - pred
            else:
                gold = int(s["target"])
            q = phi((ll[gold] - ll[1 - gold]) / math.hypot(*se))
            var += q * (1 - q)
            n += 1
        assert float(rows[("prime-tiny (mc, K=128)", task)]["se_mc"]) == pytest.approx(math.sqrt(var) / n, abs=2e-6)


def test_footnotes(built):
    md = (built / "report.md").read_text()
    like = _section(md, "Zero-shot accuracy (likelihood-based)")
    assert "incompatible lm-eval version in pythia-old/results.json" in like
    assert "run failed: stats file mdm-tiny/stats_winogrande_" in like
    assert "average needs every task" in like
    assert "pythia" not in _section(md, "Paired comparisons (likelihood-based rows)")
    assert "**40.0** [" in like                                               # best per column in bold
    tex = (built / "report.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\leq$ 10.930" in tex and r"---\textsuperscript{a}" in tex
    assert r"arm-tiny-a [hf]" in tex  # a label's brackets are text, not footnotes


def test_table_model_not_run(built):
    col = rp.load([RUNS / "mdm-tiny", RUNS / "arm-tiny-a"], {})
    del col.runs[[r.name for r in col.runs].index("arm-tiny-a")].tasks["piqa"]
    rep = rp.build(col)
    acc = rep.tables[0]
    assert rp.NOT_RUN in acc.notes.values()


class _Doc(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, list[dict]] = {}

    def handle_starttag(self, tag, attrs):
        self.tags.setdefault(tag, []).append(dict(attrs))


N_TABLES = 7  # accuracy ×3 sections, paired, perplexity ×3 sections


def test_html_parsed(built):
    text = (built / "report.html").read_text()
    doc = _Doc()
    doc.feed(text)
    assert len(doc.tags["table"]) == N_TABLES
    imgs = doc.tags["img"]
    assert len(imgs) == 2
    for img in imgs:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "script" not in doc.tags and "link" not in doc.tags
    assert "http://" not in text and "https://" not in text  # self-contained
    assert "<b>40.0</b>" in text and "<sup>a</sup>" in text


def test_console_renders_every_table(capsys):
    from rich.console import Console

    col = rp.load([RUNS], rp.load_meta(META))
    rp.render_console(rp.build(col), Console(width=250, file=sys.stdout))
    out = capsys.readouterr().out
    assert "arm-tiny-a [hf]" in out and "arm-tiny-a [arm]" in out  # brackets survive rich markup
    assert "0.0 [0.0, 16.1]" in out and "prime-tiny (mc, K=4)" in out and "—[a]" in out


def test_cli_options(tmp_path, capsys):
    from prime_eval.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "--meta" in help_text and "--formats" in help_text and "legacy_joint" in help_text
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(RUNS), "--out", str(tmp_path), "--formats", "md,pdf"])
    # CSV metadata, a subset of formats, no plots, an override and a baseline
    meta = tmp_path / "meta.csv"
    meta.write_text("name,family,params,flops,label\narm-tiny-a,arm,,,\narm-tiny-b,arm,,,\n")
    out = tmp_path / "o2"
    assert main(["report", str(RUNS / "arm-tiny-a"), str(RUNS / "arm-tiny-b"), str(RUNS / "prime-tiny"),
                 "--out", str(out), "--meta", str(meta), "--formats", "md,html", "--no-plots", "--quiet",
                 "--metric", "piqa=acc", "--baseline", "prime-tiny"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    md = (out / "report.md").read_text()
    assert "PIQA (acc, n=20)" in md and "| arm-tiny-a | prime-tiny |" in md and "| arm-tiny-a | arm-tiny-b |" not in md
    assert "<img" not in (out / "report.html").read_text()
    assert main(["report", str(RUNS), "--out", str(out), "--baseline", "nobody", "--quiet", "--no-plots"]) == 2


def test_mc_note_without_samples_log(tmp_path):
    """Statistics without a samples log: the MC part cannot be computed, and the row says so in a footnote."""
    run = tmp_path / "prime-tiny"
    run.mkdir()
    for f in (RUNS / "prime-tiny").iterdir():
        if not f.name.startswith("samples_"):
            shutil.copy(f, run / f.name)
    rep = rp.build(rp.load([tmp_path], {}))
    acc = rep.tables[0]
    assert str(acc.rows[0][1]) == "prime-tiny[a]" and "no lm-eval samples log" in acc.notes["a"]
    assert all(r["se_mc"] is None for r in acc.records)
    assert len(rep.tables) == 1  # a single row: no paired table


def test_no_empty_paired_table_without_samples_logs(tmp_path):
    """Two likelihood runs without samples logs: no paired table with a header and no rows, but a note that says
    what it needs."""
    for name in ("prime-tiny", "mdm-tiny"):
        (tmp_path / name).mkdir()
        for f in (RUNS / name).iterdir():
            if not f.name.startswith("samples_"):
                shutil.copy(f, tmp_path / name / f.name)
    rep = rp.build(rp.load([tmp_path], {}))
    assert [t for t in rep.tables if "Paired" in t.title] == []
    assert any("no paired comparisons" in n and "--log_samples" in n for n in rep.notes)


def test_report_never_imports_torch(tmp_path):
    """Reports are rebuilt anywhere from the files: loading, building, plotting and writing import no torch."""
    code = ("import sys; from prime_eval import report as rp; c = rp.load([sys.argv[1]], rp.load_meta(sys.argv[2])); "
            "rp.write_report(rp.build(c), c, sys.argv[3]); assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code, str(RUNS), str(META), str(tmp_path / "o")], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(FIX.parents[2])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "report.html").exists()


# ---------------------------------------------------------------------------------------------------------------
# Headless Chromium: the page renders its tables and images with no console errors
# ---------------------------------------------------------------------------------------------------------------

CHECK_HEAD = """<script>window.__errs=[];window.addEventListener('error',function(e){
window.__errs.push(String(e.message||(e.target&&(e.target.src||e.target.href))||'error'));},true);</script>"""
CHECK_TAIL = """<script>window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);
document.body.setAttribute('data-check',JSON.stringify({tables:document.querySelectorAll('table').length,
imgs:im.length,decoded:im.filter(function(i){return i.complete&&i.naturalWidth>0;}).length,
width:im.map(function(i){return i.naturalWidth;}),errors:window.__errs}));});</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "headless Chromium not found: install Debian's `chromium` package (.ci/run does) to run this test"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def test_html_in_headless_chromium(built, tmp_path):
    exe = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    page = (built / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the report plus a probe script; the report itself has no scripts
    probe.write_text(page.replace("</head>", CHECK_HEAD + "</head>", 1).replace("</body>", CHECK_TAIL + "</body>", 1))
    dom = subprocess.run([exe, *flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    body = _Doc()
    body.feed(dom.stdout)
    assert body.tags.get("body"), f"chromium printed no DOM (rc={dom.returncode}): {dom.stderr[-2000:]}"
    check = json.loads(body.tags["body"][0].get("data-check", "null") or "null")
    assert check is not None, f"probe did not run: {dom.stderr[-2000:]}"
    assert check["tables"] == N_TABLES and check["imgs"] == 2 and check["decoded"] == 2, check
    assert all(w > 100 for w in check["width"]) and check["errors"] == [], check
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE(" in line or "Uncaught" in line]
    assert console == [], console

    shot = tmp_path / "report.png"
    r = subprocess.run([exe, *flags, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}",
                        (built / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot (rc={r.returncode}): {r.stderr[-2000:]}"
    console = [line for line in r.stderr.splitlines() if ":CONSOLE(" in line or "Uncaught" in line]
    assert console == [], console
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1200
    assert float(pixels[..., :3].std()) > 0.05  # not a blank page
