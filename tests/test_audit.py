import json
import math
import os
import subprocess
import sys

import pytest

from prime_eval import audit


def test_default_cases_certify_valid_estimators_and_flag_legacy():
    seen = []
    rows = audit.default_cases(fast=True, progress=lambda f, what: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) >= 20  # one bar for all cases
    for r in rows:
        if r.is_bound_by_construction and r.estimator.split()[0] != "chain_rule":
            assert r.verdict.startswith("valid bound"), r
            assert r.gap >= -1e-7
    by = {(r.case, r.estimator): r for r in rows}
    sqrt = [c for c, e in by if e == "sqrt_count"]  # the importance-sampled count: the NELBO's exact expectation
    assert len(sqrt) >= 4 and all(by[(c, "sqrt_count")].expectation == pytest.approx(
        by[(c, "exact_count")].expectation, rel=1e-12) for c in sqrt)
    oracle_legacy = [r for r in rows if r.case.startswith("oracle") and r.estimator == "legacy_joint"]
    assert oracle_legacy and all(r.verdict == "VIOLATES BOUND" for r in oracle_legacy)
    first = {r.estimator: r.expectation for r in rows if r.case.startswith("oracle {00")}
    assert first["mc"] == pytest.approx(2 * math.log(2)) and first["legacy_joint"] == pytest.approx(math.log(2),
                                                                                                      abs=1e-5)


def test_set_weights_sum_to_harmonic_identity():
    # Σ_k C(n,k) w(k) = Σ_k 1/k  (the 1/t estimator's total weight per size)
    n = 6
    est = type("E", (), {"name": "mc", "eps": 0.0, "T": None})()
    assert sum(math.comb(n, k) * audit.set_weight(est, k, n) for k in range(1, n + 1)) == pytest.approx(
        sum(1 / k for k in range(1, n + 1)))
    sqrt = audit.MDMEstimator("sqrt_count", mask_id=6)  # the sampler's law: same weight per set as exact count
    assert [audit.set_weight(sqrt, k, n) for k in range(n + 1)] == pytest.approx(
        [audit.set_weight(est, k, n) for k in range(n + 1)], rel=1e-12)
    eps_est = type("E", (), {"name": "mc", "eps": 1e-3, "T": None})()
    assert audit.set_weight(eps_est, 2, 4) == pytest.approx(audit.set_weight(est, 2, 4), rel=5e-3)


def test_cli_json_custom_case():
    out = subprocess.run([sys.executable, "-m", "prime_eval.cli", "audit", "--json", "--samples", "500",
                          "--kind", "oracle", "--V", "8", "--base", "2", "--perm-seed", "3", "--source", "zipf:1.3"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    est = {r["estimator"]: r for r in data["rows"]}
    assert est["mc"]["verdict"] == "valid bound" and est["legacy_joint"]["verdict"] == "VIOLATES BOUND"
    assert data["valid_estimators_pass"] and data["mc_converges"]


def test_cli_rejects_bad_source():
    out = subprocess.run([sys.executable, "-m", "prime_eval.cli", "audit", "--fast", "--kind", "oracle", "--V", "4",
                          "--source", "0.5,0.5"], capture_output=True, text=True)
    assert out.returncode == 2 and "lists 2 probabilities but V = 4" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["--fast"]])
def test_cli_default_table_runs(args):
    out = subprocess.run([sys.executable, "-m", "prime_eval.cli", "audit", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "VIOLATES BOUND" in out.stdout and "every valid estimator is a bound" in out.stdout
    assert "iw uniform K=16" in out.stdout


def test_custom_cases_include_iw():
    out = subprocess.run([sys.executable, "-m", "prime_eval.cli", "audit", "--json", "--fast", "--kind", "mdm"],
                         capture_output=True, text=True, check=True)
    rows = {r["estimator"]: r for r in json.loads(out.stdout)["rows"]}
    for name in ("iw uniform K=1", "iw uniform K=16", "iw pl K=4", "iw posterior K=2"):
        assert rows[name]["verdict"].startswith("valid bound"), rows[name]
    assert rows["iw uniform K=1"]["expectation"] == pytest.approx(rows["mc"]["expectation"], abs=1e-9)  # IW_1 = ELBO
    # the oracle (exact conditionals): every reveal order gives p(x), so uniform IW_K is the entropy for every K
    rows = audit.oracle_case(8, base=2, perm_seed=3, source="zipf:1.3", estimators=("mc", "iw"))
    iw = [r for r in rows if r.estimator.startswith("iw")]
    assert len(iw) == 7 and all(r.verdict.startswith("valid bound") for r in iw)
    for r in iw:
        if "uniform" in r.estimator or "posterior" in r.estimator:
            assert r.expectation == pytest.approx(r.reference, abs=1e-9), r
        else:  # Plackett–Luce proposal: a looser bound that tightens with K
            assert r.gap > 0


def test_iw_left_out_only_when_its_orders_cannot_be_enumerated(capsys):
    from prime_eval.cli import main as cli_main

    rc = cli_main(["audit", "--fast", "--json", "--kind", "mdm", "--V", "4", "--context", "1", "--target-len", "9"])
    captured = capsys.readouterr()
    assert rc == 0 and "iw not audited: 9 diffused positions" in captured.err
    assert not [r for r in json.loads(captured.out)["rows"] if r["estimator"].startswith("iw")]
    rc = cli_main(["audit", "--fast", "--kind", "mdm", "--V", "4", "--target-len", "9", "--estimators", "mc,iw"])
    assert rc == 2 and "n = 9 diffused positions is too many (limit 8)" in capsys.readouterr().err


def test_progress_goes_to_stderr_and_json_stays_clean():
    env = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}  # rich draws its bar as on a terminal
    out = subprocess.run([sys.executable, "-m", "prime_eval.cli", "audit", "--json", "--samples", "200",
                          "--kind", "oracle", "--V", "8", "--base", "2"], capture_output=True, text=True, check=True,
                         env=env)
    assert json.loads(out.stdout)["valid_estimators_pass"]
    assert "audit: " in out.stderr and "%" in out.stderr
