"""Tests of the report builder: interval arithmetic against hand-computed values, golden Markdown/CSV/LaTeX on real
lm-eval runs of tiny models (tests/fixtures/report/runs, made by make_fixtures.py), the parsed HTML, and the HTML
rendered by headless Chromium.

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
from html.parser import HTMLParser
from pathlib import Path

import pytest

from prime_eval import report as rp

FIX = Path(__file__).resolve().parent / "fixtures" / "report"
RUNS = FIX / "runs"
GOLDEN = FIX / "golden"
META = FIX / "meta.yaml"


def phi(x: float) -> float:
    """Reference Φ from the standard library (independent of rp.normal_cdf)."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------------------------
# Interval arithmetic: hand-computed cases
# ---------------------------------------------------------------------------------------------------------------

def test_normal_cdf_and_ci95():
    assert float(rp.normal_cdf(0.0)) == pytest.approx(0.5, abs=1e-12)
    assert float(rp.normal_cdf(1.959963984540054)) == pytest.approx(0.975, abs=2e-7)
    assert float(rp.normal_cdf(-1.0)) == pytest.approx(0.1586552539, abs=2e-7)
    lo, hi = rp.ci95(0.5, 0.1)
    assert (lo, hi) == pytest.approx((0.3040036015, 0.6959963985), abs=1e-9)


def test_binomial_se_matches_lm_eval_stderr():
    # 5 of 20 correct: sd(ddof=1)/sqrt(n) = sqrt(0.25*0.75/19) = 0.0993399
    assert rp.binomial_se(0.25, 20) == pytest.approx(math.sqrt(0.1875 / 19), rel=1e-12)
    res = json.loads(next((RUNS / "arm-tiny-a").glob("results_*.json")).read_text())["results"]["arc_easy"]
    assert rp.binomial_se(res["acc,none"], 20) == pytest.approx(res["acc_stderr,none"], rel=1e-12)


def test_combine_and_average_se():
    assert rp.combine_se(3.0, 4.0) == 5.0
    assert rp.combine_se(0.1) == pytest.approx(0.1)
    assert rp.average_se([0.1, 0.1, 0.1, 0.1]) == pytest.approx(0.05)   # sqrt(4*0.01)/4
    assert rp.average_se([0.3, 0.4]) == pytest.approx(0.25)              # 0.5/2


def test_prob_correct_two_choices_closed_form():
    # Δ = 1, sqrt(0.6² + 0.8²) = 1  ->  Φ(1) = 0.841345
    assert rp.prob_correct([-10.0, -11.0], [0.6, 0.8], 0) == pytest.approx(phi(1.0), abs=2e-7)
    assert rp.prob_correct([-10.0, -11.0], [0.6, 0.8], 1) == pytest.approx(phi(-1.0), abs=2e-7)
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
    # d = [1, 0, 1, 0]: mean 0.5, var(ddof=1) = 1/3, SE = sqrt(1/3 / 4) = 0.288675
    diff, se, lo, hi = rp.paired_difference([1, 1, 1, 0], [0, 1, 0, 0])
    assert diff == 0.5 and se == pytest.approx(math.sqrt(1 / 12))
    assert (lo, hi) == pytest.approx((0.5 - 1.959964 * se, 0.5 + 1.959964 * se), abs=1e-6)
    assert not rp.excludes_zero(lo, hi)
    # with MC variances 0.01 and 0.02: SE = sqrt(1/12 + 0.03) = 0.336650
    assert rp.paired_difference([1, 1, 1, 0], [0, 1, 0, 0], 0.01, 0.02)[1] == pytest.approx(0.3366501646)
    d, se, lo, hi = rp.paired_difference([1] * 30, [1] * 10 + [0] * 20)
    assert d == pytest.approx(2 / 3) and rp.excludes_zero(lo, hi)
    with pytest.raises(ValueError):
        rp.paired_difference([1], [0])


def test_ppl_interval():
    p, lo, hi = rp.ppl_interval(2.0, 0.1)
    assert p == pytest.approx(math.exp(2.0))
    assert (lo, hi) == pytest.approx((math.exp(2.0 - 0.1959964), math.exp(2.0 + 0.1959964)), rel=1e-6)


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


def test_accuracy_matches_lm_eval_outputs(built):
    """Each reported value and dataset SE equals lm-eval's, and equals the mean of the samples log's correctness."""
    rows = [r for r in _csv(built / "accuracy.csv") if r["status"] == "ok"]
    assert len(rows) >= 15
    for r in rows:
        folder = RUNS / {"prime-tiny (cfg=1.5)": "prime-tiny-cfg"}.get(r["model"], r["model"])
        res = json.loads(next(folder.glob("results_*.json")).read_text())["results"][r["task"]]
        assert float(r["value"]) == pytest.approx(res[f"{r['metric']},none"], abs=1e-6)
        assert float(r["se_data"]) == pytest.approx(res[f"{r['metric']}_stderr,none"], abs=1e-6)
        samples = [json.loads(x) for x in next(folder.glob(f"samples_{r['task']}_*.jsonl")).read_text().splitlines()]
        assert float(r["value"]) == pytest.approx(sum(s[r["metric"]] for s in samples) / len(samples), abs=1e-6)
        has_stats = any(folder.glob(f"stats_{r['task']}_*.jsonl"))
        assert (r["se_mc"] != "") == has_stats


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
        assert float(rows[("prime-tiny", task)]["se_mc"]) == pytest.approx(math.sqrt(var) / n, abs=2e-6)


def test_sections_and_footnotes(built):
    md = (built / "report.md").read_text()
    like, rest = md.split("## Zero-shot accuracy: NOT likelihood-based", 1)
    other = rest.split("## Paired comparisons", 1)[0]
    assert "cfg=1.5" not in like and "| prime-tiny (cfg=1.5) |" in other
    ppl_bound, ppl_other = md.split("## Perplexity on wikitext2/test: NOT upper bounds", 1)
    assert "legacy_joint" not in ppl_bound.split("## Perplexity on wikitext2/test", 1)[1]
    assert "| legacy_joint |" in ppl_other and "≤" not in ppl_other.split("## Plots")[0]
    assert "≤ 10.930" in ppl_bound and "| ar | 10.720" in ppl_bound        # bounds marked, exact ARM not
    assert "incompatible lm-eval version in pythia-old/results.json" in like
    assert "run failed: stats file mdm-tiny/stats_winogrande_" in like
    assert "average needs every task" in like
    assert "pythia" not in md.split("## Paired comparisons", 1)[1].split("## Perplexity", 1)[0]
    assert "**40.0** ±" in like                                               # best per column in bold
    tex = (built / "report.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\leq$ 10.930" in tex and r"---\textsuperscript{a}" in tex


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


def test_html_parsed(built):
    text = (built / "report.html").read_text()
    doc = _Doc()
    doc.feed(text)
    assert len(doc.tags["table"]) == 5
    imgs = doc.tags["img"]
    assert len(imgs) == 2
    for img in imgs:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "script" not in doc.tags and "link" not in doc.tags
    assert "http://" not in text and "https://" not in text  # self-contained
    assert "<b>40.0</b>" in text and "<sup>a</sup>" in text


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
    assert "PIQA (acc)" in md and "| arm-tiny-a | prime-tiny |" in md and "| arm-tiny-a | arm-tiny-b |" not in md
    assert "<img" not in (out / "report.html").read_text()
    assert main(["report", str(RUNS), "--out", str(out), "--baseline", "nobody", "--quiet", "--no-plots"]) == 2


def test_paired_marker_on_synthetic_samples(tmp_path):
    """Two runs on 30 shared documents, A right on all, B on 10: the paired interval excludes 0 and gets †."""
    for name, correct in (("good", [1] * 30), ("bad", [1] * 10 + [0] * 20)):
        d = tmp_path / name
        d.mkdir()
        acc = sum(correct) / 30
        res = {"results": {"boolq": {"alias": "boolq", "acc,none": acc, "acc_stderr,none": rp.binomial_se(acc, 30)}},
               "configs": {"boolq": {"target_delimiter": " "}}, "n-samples": {"boolq": {"effective": 30}},
               "config": {"model": "hf", "model_args": f"pretrained=org/{name}"}}
        (d / "results_2026-01-01T00-00-00.0.json").write_text(json.dumps(res))
        rows = [{"doc_id": i, "doc_hash": f"h{i}", "target": "1", "filtered_resps": [[-2.0, False], [-1.0, False]],
                 "arguments": {}, "acc": float(c)} for i, c in enumerate(correct)]
        (d / "samples_boolq_2026-01-01T00-00-00.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = rp.build(rp.load([tmp_path], {}))
    md = rp.render_markdown(rep)
    assert "| bad | good | -66.7 ± " in md and md.split("| bad | good |")[1].splitlines()[0].endswith("† |")


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
    assert check["tables"] == 5 and check["imgs"] == 2 and check["decoded"] == 2, check
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


def test_mc_note_without_samples_log(tmp_path):
    """Statistics without a samples log: the MC part cannot be computed, and the row says so in a footnote."""
    run = tmp_path / "prime-tiny"
    run.mkdir()
    for f in (RUNS / "prime-tiny").iterdir():
        if not f.name.startswith("samples_"):
            shutil.copy(f, run / f.name)
    rep = rp.build(rp.load([tmp_path], {}))
    acc = rep.tables[0]
    assert acc.rows[0][1] == "prime-tiny[a]" and "no lm-eval samples log" in acc.notes["a"]
    assert all(r["se_mc"] is None for r in acc.records)
    assert len(rep.tables) == 1  # a single row: no paired table
