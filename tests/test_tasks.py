"""Task suite: the table agrees with lm-eval's built-ins, offline YAMLs only swap the data source, every task and
group runs end to end offline through `lm_eval.simple_evaluate`, and bad names or missing files fail clearly."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import yaml

from prime_eval import tasks as T
from prime_eval.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
FIXTURE_TASKS = ["sciq", "race", "mc_taco", "anli_r1", "anli_r2", "anli_r3", "truthfulqa_mc1"]
COMMONSENSE = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "social_iqa", "winogrande",
               "race", "lambada_openai"]
PRIME_V2 = ["social_iqa", "mc_taco", "boolq", "sciq", "arc_easy", "anli_r1", "anli_r2", "anli_r3", "truthfulqa_mc1",
            "openbookqa"]


def _make_lm():
    from lm_eval.api.model import LM

    class HashLM(LM):
        """Deterministic stand-in: log p(continuation | context) from a CRC of both strings; never greedy."""

        def loglikelihood(self, requests, disable_tqdm=False):
            return [(-(zlib.crc32(f"{c}\x00{x}".encode()) % 1000) / 100.0, False) for c, x in
                    (r.args for r in requests)]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return [-float(len(r.args[0])) for r in requests]

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return HashLM()


def _evaluate(tasks, data_dir, cache_dir, limit=None, log_samples=False):
    import lm_eval

    tm = T.build_task_manager(data_dir, tasks, cache_dir=cache_dir)
    T.resolve_tasks(tasks, tm)
    return lm_eval.simple_evaluate(model=_make_lm(), tasks=tasks, task_manager=tm, limit=limit,
                                   bootstrap_iters=0, log_samples=log_samples)


@pytest.fixture(scope="session")
def full_data_dir(shared_data, tmp_path_factory) -> Path:
    """Real data for the tasks ../shared/data has, our fixture rows for the rest (symlinked, hub layout)."""
    d = tmp_path_factory.mktemp("data")
    for t in T.TASKS:
        src = shared_data / t if (shared_data / t).is_dir() else FIXTURES / t
        (d / t).symlink_to(src, target_is_directory=True)
    return d


def test_table_matches_lm_eval_builtins():
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, spec in T.TASKS.items():
        cfg = load_yaml(T.lm_eval_tasks_dir() / spec.builtin, resolve_func=False)
        assert cfg["task"] == name
        assert spec.split == (cfg.get("test_split") or cfg.get("validation_split")), name
        metrics = tuple(m["metric"] for m in cfg["metric_list"])
        assert set(spec.metrics) == set(metrics), name


def test_groups():
    groups = T.load_groups()
    assert groups["commonsense"] == COMMONSENSE
    assert T.expand(["prime_v2_suite"]) == PRIME_V2
    assert T.expand(["anli", "piqa", "anli_r1"]) == ["anli_r1", "anli_r2", "anli_r3", "piqa"]
    assert set(T.expand(["commonsense", "prime_v2_suite"])) <= set(T.TASKS)
    assert T.split_task_list(["piqa,arc_easy", "boolq"]) == ["piqa", "arc_easy", "boolq"]


def test_offline_yaml_only_swaps_the_data_source(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text("{}\n")
    (tmp_path / "piqa" / "train.jsonl").write_text("{}\n")  # a few-shot source is kept when present
    folder = T.write_offline_tasks(tmp_path, ["piqa"], cache_dir=tmp_path / "gen")
    cfg = yaml.safe_load((folder / "piqa.yaml").read_text())
    assert cfg["include"] == str(T.lm_eval_tasks_dir() / "piqa" / "piqa.yaml")
    assert set(cfg) == {"include", "task", "tag", "dataset_path", "dataset_name", "dataset_kwargs",
                        "training_split", "validation_split", "test_split"}
    assert (cfg["training_split"], cfg["validation_split"], cfg["test_split"]) == ("train", "validation", None)
    assert cfg["dataset_kwargs"]["data_files"] == {
        "train": str(tmp_path.resolve() / "piqa" / "train.jsonl"),
        "validation": str(tmp_path.resolve() / "piqa" / "validation.jsonl")}
    assert [p.name for p in folder.glob("*.yaml")] == ["piqa.yaml"]  # only tasks whose data exist


def test_fixture_tasks_run_offline_with_builtin_prompts(tmp_path):
    res = _evaluate(["sciq", "race", "mc_taco", "anli", "truthfulqa_mc1"], FIXTURES, tmp_path / "gen",
                    log_samples=True)
    assert set(res["results"]) == set(FIXTURE_TASKS)
    for t in FIXTURE_TASKS:
        assert 0.0 <= res["results"][t]["acc,none"] <= 1.0
    assert "f1,none" in res["results"]["mc_taco"]
    # the prompts are lm-eval's own (doc_to_text of the built-in YAML / its preprocess helpers)
    sciq = res["samples"]["sciq"][0]
    assert sciq["arguments"][0][0] == ("Plants use light energy to turn carbon dioxide and water into sugar.\n"
                                       "Question: What gas do plants take in from the air to make sugar?\nAnswer:")
    assert sciq["target"] == 3
    race = res["samples"]["race"][0]
    assert race["arguments"][0][0].startswith("Article: Tom lives in a small town")
    assert "Where does Tom live?" in race["arguments"][0][0] and race["target"] == 2
    anli = res["samples"]["anli_r1"][0]["arguments"][0][0]
    assert anli.endswith("True, False, or Neither?\nAnswer:")
    assert res["n-samples"]["truthfulqa_mc1"]["effective"] == 2


def test_groups_run_offline_on_real_data(full_data_dir, tmp_path):
    res = _evaluate(["commonsense"], full_data_dir, tmp_path / "gen", limit=4)
    assert set(res["results"]) == {"commonsense", *COMMONSENSE}
    accs = [res["results"][t]["acc,none"] for t in COMMONSENSE]
    assert res["groups"]["commonsense"]["acc,none"] == pytest.approx(sum(accs) / len(accs))
    assert res["results"]["lambada_openai"]["perplexity,none"] > 0
    assert res["n-samples"]["hellaswag"]["effective"] == 4

    res = _evaluate(["prime_v2_suite"], full_data_dir, tmp_path / "gen", limit=4)
    assert set(res["results"]) == {"prime_v2_suite", "prime_v2_anli", *PRIME_V2}
    rounds = [res["results"][f"anli_r{r}"]["acc,none"] for r in (1, 2, 3)]
    assert res["groups"]["prime_v2_anli"]["acc,none"] == pytest.approx(sum(rounds) / 3)  # 3 docs each
    assert "acc,none" not in res["results"]["prime_v2_suite"]  # no leaf-weighted average (see the YAML)


def test_unknown_task_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"unknown task or group 'pqia'.*Did you mean piqa"):
        T.check_offline(["pqia"], FIXTURES)
    with pytest.raises(UserError, match="not a folder"):
        T.check_offline(["piqa"], tmp_path / "nowhere")
    tm = T.build_task_manager(FIXTURES, ["sciq"], cache_dir=tmp_path / "gen")
    with pytest.raises(UserError, match="unknown task or group 'sciqq'"):
        T.resolve_tasks(["sciqq"], tm)
    with pytest.raises(UserError, match="requested twice"):
        T.resolve_tasks(["anli", "anli_r1"], tm)


def test_missing_split_names_the_expected_file(tmp_path):
    (tmp_path / "race").mkdir()
    (tmp_path / "race" / "validation.jsonl").write_text(json.dumps({"article": "", "problems": "[]"}) + "\n")
    with pytest.raises(UserError) as e:
        T.build_task_manager(tmp_path, ["commonsense"], cache_dir=tmp_path / "gen")
    msg = str(e.value)
    assert str(tmp_path.resolve() / "race" / "test.jsonl") in msg
    assert str(tmp_path.resolve() / "piqa" / "validation.jsonl") in msg


@pytest.mark.parametrize("names", [["prime_v2_anli", "sciq"], ["anli", "sciq"]])  # a group, a tag, a task
def test_prepared_tasks_score_as_task_names_do(tmp_path, names):
    """`lm_eval_run.prepare_tasks` builds the tasks before any model exists; lm-eval given those objects scores
    exactly as when given the names."""
    import lm_eval

    from prime_eval.lm_eval_run import prepare_tasks

    tm = T.build_task_manager(FIXTURES, names, cache_dir=tmp_path / "gen")
    plan = prepare_tasks(names, tm, samples={"sciq": [1, 0]})
    assert plan.leaves == ["anli_r1", "anli_r2", "anli_r3", "sciq"] and plan.samples == {"sciq": [0, 1]}
    kw = dict(task_manager=tm, bootstrap_iters=0, samples=plan.samples, log_samples=True)
    by_name = lm_eval.simple_evaluate(model=_make_lm(), tasks=names, **kw)
    by_object = lm_eval.simple_evaluate(model=_make_lm(), tasks=plan.objects, **kw)
    for key in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "n-samples", "samples"):
        assert by_object.get(key) == by_name.get(key), key


def test_one_task_yaml_emitter(tmp_path):
    from prime_eval import synthetic

    cfg = {"task": "t", "tag": None, "target_delimiter": " ",
           "dataset_kwargs": {"data_files": {"test": str(tmp_path / "a: b #c 'd\" é.jsonl")}}}
    text = T.task_yaml(cfg, "line one\nline two")
    assert text.startswith("# line one\n# line two\n") and yaml.safe_load(text) == cfg
    path = tmp_path / "x" / "t.yaml"
    T.write_task_yaml(path, cfg)
    mtime = path.stat().st_mtime_ns
    T.write_task_yaml(path, cfg)  # unchanged text: the file is left as it is (shared by concurrent runs)
    assert path.stat().st_mtime_ns == mtime and yaml.safe_load(path.read_text()) == cfg
    # the demo's synthetic tasks go through the same emitter
    data_file = tmp_path / "w: 'x'.jsonl"
    assert synthetic.task_yaml("synth_word", data_file) == T.task_yaml(
        synthetic.task_config("synth_word", data_file), "generated by prime_eval.demo: "
        + synthetic.TASK_DESCRIPTIONS["synth_word"])
    assert yaml.safe_load(synthetic.task_yaml("synth_word", data_file))["dataset_kwargs"]["data_files"]["test"] == \
        str(data_file.resolve())
