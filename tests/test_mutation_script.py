"""scripts/mutation.py (mutation testing with mutmut, run by hand: minutes per module) cannot rot: its
list names files that exist and the commands it would run, and its score reads mutmut's results."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mutation.py"


def load_script():
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_list_names_each_core_module_its_file_and_mutmut_command():
    run = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["scaling", "export", "protocol", "dataset", "targets", "cache",
                                                      "linear", "kernel", "sgd", "keras", "ridge",
                                                      "svr", "extract"]
    for line in lines:
        module, path, *command = line.split()
        assert (ROOT / path).is_file()
        dotted = path.removesuffix(".py").replace("/", ".")
        if module == "extract":  # its planning functions only
            assert command == ["run", "--max-children", "2", f"{dotted}.x_pending_rows__mutmut_*",
                               f"{dotted}.x__shards_intact__mutmut_*"]
        elif module == "keras":  # the parts that need no training
            assert command[3:5] == [f"{dotted}.x_reduce_features__mutmut_*", f"{dotted}.x_build_keras_head__mutmut_*"]
            assert f"{dotted}.xǁTargetScalingǁ*__mutmut_*" in command and f"{dotted}.*" not in command
        else:
            assert command == ["run", "--max-children", "2", dotted + ".*"]


def test_functions_limit_the_mutants_run_and_scored_to_those_functions_and_methods():
    script = load_script()
    results = "\n".join([
        "    featcache.cache.x_plan_shards__mutmut_1: killed",
        "    featcache.cache.x_plan_shards_more__mutmut_1: killed",
        "    featcache.cache.xǁRowSourceǁ__init____mutmut_2: survived",
        "    featcache.cache.xǁCacheǁread__mutmut_3: survived",
        "    featcache.cache.x_write_shard__mutmut_4: killed",
    ])
    functions = ("plan_shards", "RowSource.*")
    assert script.score(results, "cache", functions) == {"killed": 1, "survived": 1}
    assert script.run_command("cache", 1, functions=functions)[2:] == [
        "--max-children", "1", "featcache.cache.x_plan_shards__mutmut_*", "featcache.cache.xǁRowSourceǁ*__mutmut_*"]
    assert len(script.statuses(results, "extract")) == 0


def test_a_retest_of_survivors_keeps_the_earlier_verdicts_of_the_others():
    script = load_script()
    earlier = {"m1": "killed", "m2": "survived", "m3": "no tests", "m4": "timeout"}
    now = {"m1": "not checked", "m2": "killed", "m3": "survived", "m4": "not checked"}  # mutmut forgot m1, m4
    assert script.merged(earlier, now, ["m2", "m3"]) == {"m1": "killed", "m2": "killed", "m3": "survived",
                                                          "m4": "timeout"}


def test_every_listed_module_is_one_mutmut_may_mutate():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert sorted(load_script().MODULES.values()) == sorted(config["only_mutate"])
    assert set(load_script().FUNCTIONS) <= set(load_script().MODULES)


def test_score_counts_one_modules_mutants_by_status():
    script = load_script()
    results = "\n".join([
        "    featcache.heads.scaling.x_streamed_moments__mutmut_1: killed",
        "    featcache.heads.scaling.xǁScalingǁapply__mutmut_2: survived",
        "    featcache.heads.scaling.xǁScalingǁapply__mutmut_3: timeout",
        "    featcache.heads.scaling.xǁScalingǁapply__mutmut_4: killed",
        "    featcache.heads.export.x_dense__mutmut_1: survived",
    ])
    counts = script.score(results, "scaling")
    assert counts == {"killed": 2, "survived": 1, "timeout": 1}
    assert "killed 2/4 =  50.0%" in script.summary("scaling", counts)
    assert list(script.statuses(results, "export")) == ["featcache.heads.export.x_dense__mutmut_1"]


def test_verdicts_of_a_long_list_of_functions_go_by_its_hash_under_the_file_name_limit():
    mutation = load_script()
    short = mutation.verdicts_file("cache", ("plan_shards", "RowSource.*"))
    assert short.name == "verdicts-cache-plan_shards-RowSource_all.json"
    many = tuple(f"Cache.function_number_{i}" for i in range(20))
    long = mutation.verdicts_file("cache", many)
    assert len(long.name) < 64 and long.name.startswith("verdicts-cache-") and long.parent == short.parent
    assert long != mutation.verdicts_file("cache", many[:-1]) and long == mutation.verdicts_file("cache", many)


def test_the_whole_module_score_takes_each_mutants_latest_verdict_from_every_run(tmp_path):
    import json
    import os

    mutation = load_script()
    runs = {"verdicts-cache.json": {"a": "survived", "b": "killed", "c": "not checked", "d": "no tests"},
            "verdicts-cache-reading.json": {"a": "killed", "d": "not checked"},  # a part, retested later
            "verdicts-cache-planning.json": {"c": "survived"},
            "verdicts-dataset.json": {"x": "survived"}}  # another module's
    for age, (name, verdicts) in enumerate(runs.items()):
        (tmp_path / name).write_text(json.dumps(verdicts))
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    assert mutation.whole_module_verdicts("cache", tmp_path) == {"a": "killed", "b": "killed", "c": "survived",
                                                                  "d": "no tests"}


def test_whole_survivors_retests_the_merged_survivors_and_keeps_their_verdicts_apart(tmp_path, monkeypatch, capsys):
    import json

    mutation = load_script()
    (tmp_path / "mutants").mkdir()
    name = "featcache.cache.x_f__mutmut_{}".format
    (tmp_path / "mutants" / "verdicts-cache.json").write_text(
        json.dumps({name(1): "killed", name(2): "survived", name(3): "no tests", name(4): "survived"}))
    ran = []
    monkeypatch.setattr(mutation, "ROOT", tmp_path)
    monkeypatch.setattr(mutation.subprocess, "run", lambda command, **kwargs: ran.append(command))
    monkeypatch.setattr(mutation, "results", lambda: f"    {name(2)}: killed\n    {name(3)}: survived\n"
                                                     f"    {name(4)}: not checked\n")
    assert mutation.main(["cache", "--whole", "--survivors"]) == 0
    assert ran == [mutation.run_command("cache", 2, [name(2), name(3), name(4)])]
    retested = json.loads((tmp_path / "mutants" / "verdicts-cache-retested.json").read_text())
    assert retested == {name(2): "killed", name(3): "survived", name(4): "not checked"}
    assert "killed 2/4 =  50.0%  (survived 2)" in capsys.readouterr().out  # a mutant not reached keeps its verdict


def test_survivors_retests_what_survived_and_what_a_stopped_run_never_checked(tmp_path, monkeypatch, capsys):
    import json

    mutation = load_script()
    (tmp_path / "mutants").mkdir()
    name = "featcache.heads.sgd.x_f__mutmut_{}".format
    (tmp_path / "mutants" / "verdicts-sgd.json").write_text(
        json.dumps({name(1): "killed", name(2): "not checked", name(3): "survived", name(4): "timeout"}))
    ran = []
    monkeypatch.setattr(mutation, "ROOT", tmp_path)
    monkeypatch.setattr(mutation.subprocess, "run", lambda command, **kwargs: ran.append(command))
    monkeypatch.setattr(mutation, "results", lambda: f"    {name(2)}: killed\n    {name(3)}: survived\n")
    assert mutation.main(["sgd", "--survivors"]) == 0
    assert ran == [mutation.run_command("sgd", 2, [name(2), name(3)])]
    assert json.loads((tmp_path / "mutants" / "verdicts-sgd.json").read_text()) == {
        name(1): "killed", name(2): "killed", name(3): "survived", name(4): "timeout"}
    assert "killed 2/4 =  50.0%" in capsys.readouterr().out
