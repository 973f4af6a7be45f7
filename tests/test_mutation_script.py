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
    assert [line.split()[0] for line in lines] == ["scaling", "export", "protocol", "dataset", "cache"]
    for line in lines:
        module, path, *command = line.split()
        assert (ROOT / path).is_file()
        assert command == ["run", "--max-children", "2", path.removesuffix(".py").replace("/", ".") + ".*"]


def test_every_listed_module_is_one_mutmut_may_mutate():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert sorted(load_script().MODULES.values()) == sorted(config["only_mutate"])


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
