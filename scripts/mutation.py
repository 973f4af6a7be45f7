"""Mutation testing of one core module with mutmut, and its score.

    python scripts/mutation.py scaling          # mutate featcache/heads/scaling.py, print the score
    python scripts/mutation.py --list           # the modules, their files and the command each runs
    python scripts/mutation.py --score scaling  # the score of the last run, without running
    python scripts/mutation.py scaling --survivors  # after adding tests: retest only last run's survivors
    python scripts/mutation.py cache --functions plan_shards,shard_is_intact,RowSource.*  # a part of a module
    python scripts/mutation.py cache --whole    # the whole module from every run of it and of its parts
    python scripts/mutation.py cache --whole --survivors  # ... after retesting their merged survivors

Not in CI (minutes per module on two cores). mutmut is configured in pyproject.toml's [tool.mutmut]:
which files it may mutate and the fast tests it runs (no Keras training); it first runs them once to
learn which tests reach which function, then runs, per mutant, only those tests. Its working copy
lives in mutants/ (ignored by git); `mutmut results` and `mutmut show NAME` read the survivors there.
The score is killed / (total - skipped), timeouts counted apart as in mutmut's own summary.

`--survivors` retests the survivors and the mutants no test reached (a new test file may reach them),
and scores the module with the earlier verdicts kept for the rest: adding a test file to the selection
in pyproject.toml makes mutmut forget every verdict, while a mutant killed before stays killed when
tests are only added. So each run's verdicts are also kept in mutants/verdicts-MODULE.json, which
`--survivors` starts from. extract.py is mutated in its shard planning only (FUNCTIONS): the rest drives
the backbone, which the fast tests never run.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> the file mutated; mutmut names each mutant after the module's dotted path.
MODULES = {
    "scaling": "featcache/heads/scaling.py",
    "export": "featcache/heads/export.py",
    "protocol": "featcache/heads/protocol.py",
    "dataset": "featcache/dataset.py",
    "targets": "featcache/targets.py",
    "cache": "featcache/cache.py",
    "linear": "featcache/heads/linear.py",
    "kernel": "featcache/heads/kernel.py",
    "sgd": "featcache/heads/sgd.py",
    "keras": "featcache/heads/keras_heads.py",
    "ridge": "featcache/heads/ridge.py",
    "svr": "featcache/heads/svr.py",
    "extract": "featcache/extract.py",
}
# module -> the only functions mutated (Class.method for a method), where the rest of the file is not
# reached by the fast tests: extract's planning (which rows need the backbone, is a cache whole).
FUNCTIONS = {
    "extract": ("pending_rows", "_shards_intact"),
    # the Keras heads' parts that run without training (tests/test_keras_parts.py): training a head per
    # mutant would take hours on two cores
    "keras": ("reduce_features", "build_keras_head", "compile_head", "epoch_of", "TargetScaling.*", "_scaled",
              "parameter_counts", "KerasHead.for_fold", "KerasHead.to_keras", "KerasHead._outputs",
              "KerasHead.predict_proba", "KerasHead.predict_values", "KerasHead._uncompiled"),
}


def mutant_globs(module: str, functions: tuple[str, ...] | None = None) -> list[str]:
    """The mutmut name patterns of the mutants of ``module`` (only of ``functions``, else of FUNCTIONS'
    entry, else all): featcache.heads.scaling.*, featcache.extract.x_pending_rows__mutmut_*."""
    dotted = MODULES[module].removesuffix(".py").replace("/", ".")
    functions = functions or FUNCTIONS.get(module)
    if not functions:
        return [dotted + ".*"]
    return [f"{dotted}.xǁ{name.replace('.', 'ǁ')}__mutmut_*" if "." in name else f"{dotted}.x_{name}__mutmut_*"
            for name in functions]


def mutmut() -> str:
    """The mutmut executable beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "mutmut"
    return str(beside) if beside.exists() else "mutmut"


def run_command(module: str, max_children: int, names: list[str] | None = None,
                functions: tuple[str, ...] | None = None) -> list[str]:
    """The mutmut command that mutates ``module`` only (or only the mutants ``names``)."""
    return [mutmut(), "run", "--max-children", str(max_children), *(names or mutant_globs(module, functions))]


def statuses(results: str, module: str, functions: tuple[str, ...] | None = None) -> dict[str, str]:
    """Mutant name -> status for ``module`` (its ``functions``), from ``mutmut results --all true`` output."""
    globs = mutant_globs(module, functions)
    found = {}
    for line in results.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" in name and any(fnmatch.fnmatchcase(name, glob) for glob in globs):
            found[name] = status
    return found


def score(results: str, module: str, functions: tuple[str, ...] | None = None) -> Counter:
    """Mutant counts by status for ``module`` from ``mutmut results --all true`` output."""
    return Counter(statuses(results, module, functions).values())


RETESTED = ("survived", "no tests", "not checked")  # what --survivors runs again (and what a stopped run left)


def merged(earlier: dict[str, str], now: dict[str, str], retested: list[str]) -> dict[str, str]:
    """The earlier verdicts, with those of the mutants just retested replaced by their new ones."""
    return {**earlier, **{name: now.get(name, "not checked") for name in retested}}


def verdicts_file(module: str, functions: tuple[str, ...] | None = None) -> Path:
    """Where a module's (or its functions') last verdicts are kept, beside mutmut's working copy."""
    part = "-" + "-".join(functions).replace("*", "all").replace(".", "_") if functions else ""
    if len(part) > 160:  # a file name has at most 255 bytes: a long list of functions goes by its hash
        part = "-" + hashlib.sha256(part.encode()).hexdigest()[:16]
    return ROOT / "mutants" / f"verdicts-{module}{part}.json"


def kept_verdicts(module: str, functions: tuple[str, ...] | None = None) -> dict[str, str] | None:
    path = verdicts_file(module, functions)
    return json.loads(path.read_text()) if path.exists() else None


def whole_module_verdicts(module: str, folder: Path | None = None) -> dict[str, str]:
    """Every kept verdict of a module's mutants, from its whole runs and the runs of its parts
    (``--functions``), a later file's verdict replacing an earlier one (a part retested after tests were
    added) except by "not checked" (a run stopped before it reached the mutant)."""
    folder = folder or ROOT / "mutants"
    files = [*folder.glob(f"verdicts-{module}.json"), *folder.glob(f"verdicts-{module}-*.json")]
    whole: dict[str, str] = {}
    for path in sorted(files, key=lambda path: path.stat().st_mtime):
        for name, status in json.loads(path.read_text()).items():
            if status != "not checked" or name not in whole:
                whole[name] = status
    return whole


def summary(module: str, counts: Counter) -> str:
    """One line: module, killed / tested, percent, and the other statuses."""
    total = sum(counts.values())
    tested = total - counts["skipped"] - counts["not checked"]
    killed = counts["killed"]
    percent = 100.0 * killed / tested if tested else 0.0
    others = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()) if status != "killed")
    return f"{module:<9} {MODULES[module]:<28} killed {killed}/{tested} = {percent:5.1f}%  ({others or 'no other'})"


def results() -> str:
    """`mutmut results --all true`: every mutant of the last runs with its status."""
    return subprocess.run([mutmut(), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", choices=list(MODULES))
    parser.add_argument("--list", action="store_true", help="print the modules and commands, run nothing")
    parser.add_argument("--score", action="store_true", help="print the last run's score, run nothing")
    parser.add_argument("--survivors", action="store_true",
                        help="retest only the mutants that survived the last run (tests were added since)")
    parser.add_argument("--functions", type=lambda text: tuple(text.split(",")),
                        help="mutate only these functions of the module, comma separated (Class.method, * allowed)")
    parser.add_argument("--whole", action="store_true",
                        help="score the whole module from every kept verdict of its runs and its parts' runs "
                             "(with --survivors, after retesting that score's survivors)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    args = parser.parse_args(argv)
    if args.list:
        for module in MODULES:
            print(f"{module:<9} {MODULES[module]:<28} {' '.join(run_command(module, args.max_children)[1:])}")
        return 0
    if args.module is None:
        parser.error(f"name a module: {', '.join(MODULES)} (or --list)")
    if args.whole:
        whole = whole_module_verdicts(args.module)
        names = [name for name, status in whole.items() if status in RETESTED]
        if args.survivors and names:  # retest the merged survivors: their verdicts go in a file of their own
            subprocess.run(run_command(args.module, args.max_children, names), cwd=ROOT, check=True)
            now = statuses(results(), args.module)
            retested = verdicts_file(args.module, ("retested",))
            retested.write_text(json.dumps({name: now.get(name, "not checked") for name in names}, indent=0))
            whole = whole_module_verdicts(args.module)
        print(summary(args.module, Counter(whole.values())))
        return 0
    earlier, names = None, None
    if args.survivors and not args.score:
        earlier = kept_verdicts(args.module, args.functions) or statuses(results(), args.module, args.functions)
        names = [name for name, status in earlier.items() if status in RETESTED]
        if not names:
            print(f"no survivors of {args.module} to retest", file=sys.stderr)
    if not args.score and (names is None or names):
        command = run_command(args.module, args.max_children, names, args.functions)
        print("$ " + " ".join(command[:4] + [f"<{len(names)} survivors>"] if names else command), file=sys.stderr)
        subprocess.run(command, cwd=ROOT, check=True)
    now = statuses(results(), args.module, args.functions)
    if earlier is not None:
        now = merged(earlier, now, names)
    kept = kept_verdicts(args.module, args.functions) or {}
    # where mutmut has no verdict (it forgot them when the test selection changed, or a run was stopped)
    now = {name: kept.get(name, status) if status == "not checked" else status for name, status in now.items()}
    verdicts_file(args.module, args.functions).write_text(json.dumps(now, indent=0, sort_keys=True))
    print(summary(args.module, Counter(now.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
