"""`prime_eval.settings`: one validated settings object for `score` and `ppl`; its field list is the error text, the
`--help` and the `ppl` flags; every setting is checked before anything is loaded (issues 14, 15)."""
from __future__ import annotations

import dataclasses

import pytest

from prime_eval.errors import UserError
from prime_eval.settings import (DEFAULT_ESTIMATOR, Settings, adaptive_applies, help_text, merge_lm_eval_args,
                                 parse_bool, ppl_flags)


def test_field_list_is_the_error_text_and_the_help():
    for family in ("arm", "mdm", "prime"):
        for command in ("score", "ppl"):
            names = [f.name for f in Settings.fields_for(family, command)]
            with pytest.raises(UserError) as e:
                Settings.parse({"bogus": 1}, family=family, command=command)
            msg = str(e.value)
            assert "unknown model argument(s) ['bogus']" in msg and f"known: {', '.join(names)} (" in msg
            text = help_text(command, family)
            assert [line.split()[0] for line in text.splitlines()] == names
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert all(f.metadata["help"] for f in fields.values())
    assert {f.name for f in ppl_flags()} == {"samples", "seed", "eps", "T", "rows_per_pass", "cache_dir"}


@pytest.mark.parametrize("command", ["score", "ppl"])
def test_one_vocabulary_across_commands(command):
    """samples=, seed=, eps=, T= mean the same in both commands (ppl used to reject samples= as unknown)."""
    s = Settings.parse({"checkpoint": "x.pth", "samples": "4", "seed": "7", "eps": "0.01", "T": "10"},
                       family="mdm", command=command)
    assert (s.samples, s.seed, s.eps, s.T) == (4, 7, 0.01, 10)
    defaults = Settings.parse({}, family="mdm", command=command)
    assert (defaults.samples, defaults.seed, defaults.estimator) == (
        (128, 1234, DEFAULT_ESTIMATOR["score"]["mdm"]) if command == "score" else (1, 0, "mc"))
    assert Settings.parse({}, family="prime", command=command).estimator == (
        DEFAULT_ESTIMATOR["score"]["prime"] if command == "score" else "mc")
    assert Settings.parse({"num_samples": 8}, family="mdm", command=command).samples == 8


@pytest.mark.parametrize("value", ["0", "-3", 0, -3, "two", 2.5])
def test_bad_samples_is_one_line_naming_the_setting(value):
    with pytest.raises(UserError, match=r"^samples=.*(must be >= 1|expected an integer)") as e:
        Settings.parse({"samples": value}, family="mdm")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("values, needle", [
    ({"confidence": 1.5}, "confidence=1.5: must lie in (0.5, 1)"),
    ({"round_samples": 0}, "round_samples=0: must be >= 1"),
    ({"dtype": "float64"}, "dtype='float64': choose one of float32"),
    ({"pack": "rows"}, "pack='rows': choose one of bucket, length, request"),
    ({"greedy": "maybe"}, "greedy='maybe': expected true or false or auto"),
    ({"eps": 1.0}, "eps=1.0: must lie in [0, 1)"),
    ({"orders": 4}, "['orders'] apply only to estimator=iw"),
    ({"estimator": "chain_rule", "adaptive": "true"}, "adaptive=true needs a Monte Carlo mean estimator"),
    ({"estimator": "iw", "orders": 4, "samples": 8}, "orders is iw's number of samples"),
    ({"permutation": "/nonexistent/perm.pt"}, "permutation file not found"),
    ({"temperature": 0.5}, "accepted only with estimator=legacy_joint"),
    ({"cfg": 0.5}, "accepted only with estimator=legacy_joint"),
])
def test_bad_values_and_combinations(values, needle):
    family = "prime" if {"permutation", "temperature", "cfg"} & set(values) else "mdm"
    with pytest.raises(UserError) as e:
        Settings.parse(values, family=family)
    assert needle in str(e.value)


def test_settings_of_another_family_or_command_say_where_they_apply():
    with pytest.raises(UserError, match="permutation applies to prime models, not mdm"):
        Settings.parse({"permutation": "identity"}, family="mdm")
    with pytest.raises(UserError, match="greedy applies to mdm, prime models, not arm"):
        Settings.parse({"greedy": "true"}, family="arm")
    with pytest.raises(UserError, match=r"adaptive is a setting of `prime-eval score`, not of `ppl`"):
        Settings.parse({"adaptive": "true"}, family="mdm", command="ppl")
    with pytest.raises(UserError, match="estimator=iw is not available"):
        Settings.parse({"estimator": "iw"}, family="mdm", command="ppl", estimators=("mc", "exact_count"))


def test_one_boolean_parser_and_one_dtype_table():
    for word in ("true", "TRUE", "1", "yes", "on", True, 1):
        assert parse_bool(word, "x") is True
    for word in ("false", "0", "no", "Off", False, 0):
        assert parse_bool(word, "x") is False
    with pytest.raises(UserError, match="use_ema='maybe': expected true or false"):
        Settings.parse({"use_ema": "maybe"}, family="mdm")
    for command in ("score", "ppl"):  # the adapter used to reject on/off, ppl accepted them
        assert Settings.parse({"use_ema": "off", "carry_over": "on"}, family="prime", command=command).use_ema is False
        assert Settings.parse({"dtype": "bf16"}, family="arm", command=command).dtype == "bfloat16"
    assert Settings.parse({"greedy": "auto", "adaptive": "auto"}, family="mdm").greedy is None


def test_device_given_twice_follows_lm_eval():
    """lm-eval: cls(**model_args, **{--device, --batch_size}) with None values dropped, so both is a TypeError there;
    here the same value is accepted and different values are a one-line error."""
    assert merge_lm_eval_args({"device": "cpu"}, {"device": None, "batch_size": None}) == {"device": "cpu"}
    assert merge_lm_eval_args({}, {"device": "cuda:1"}) == {"device": "cuda:1"}
    same = merge_lm_eval_args({"device": "cpu", "batch_size": 8}, {"device": "cpu", "batch_size": "8"})
    assert same == {"device": "cpu", "batch_size": "8"}
    with pytest.raises(UserError, match=r"device is given twice, as --device cuda and in model_args \(device=cpu\)"):
        merge_lm_eval_args({"device": "cpu"}, {"device": "cuda"})


def test_adaptive_applies_to_the_mean_estimators():
    """adaptive_applies (checked before loading, from the name) agrees with the estimators' own properties."""
    from prime_eval.estimators import ESTIMATORS, get_estimator
    from prime_eval.networks.toy import TinyDenoiser
    from prime_eval.subtokenizer import SubTokenizer

    for family, names in ESTIMATORS.items():
        for name in names:
            opts = {"mdm": {"mask_id": 9}, "prime": {"subtokenizer": SubTokenizer(9, ell=2, base=3)}}.get(family, {})
            if name == "iw":
                opts["net"] = TinyDenoiser(family, 9, ell=2 if family == "prime" else 1, base=3)
            est = get_estimator(family, name, **opts)
            mc_mean = not getattr(est, "deterministic", False) and not hasattr(est, "aggregate")
            assert adaptive_applies(name) == mc_mean, (family, name)


def test_docs_quote_the_generated_settings_list():
    """docs/adapters.md shows the settings exactly as `prime-eval score --help` does (python -m prime_eval.settings)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "adapters.md").read_text()
    block = text.split("<!-- settings:score", 1)[1].split("```\n", 1)[1].split("\n```", 1)[0]
    assert block == help_text("score")


def test_ppl_help_lists_the_settings_and_their_flags():
    import argparse

    from prime_eval.commands import ppl

    parser = ppl.register(argparse.ArgumentParser().add_subparsers())
    text = parser.format_help()
    for f in Settings.fields_for("prime", "ppl"):
        assert f"  {f.name} " in text
    args = parser.parse_args(["--model", "mdm", "--samples", "3", "-b", "8", "--model_args", "checkpoint=x,seed=5"])
    s = ppl.ppl_settings(args)
    assert (s.samples, s.rows_per_pass, s.seed) == (3, 8, 5)
    args = parser.parse_args(["--model", "mdm", "--samples", "3", "--model_args", "checkpoint=x,samples=4"])
    with pytest.raises(UserError, match="samples is given twice, as --samples 3 and in --model_args"):
        ppl.ppl_settings(args)
