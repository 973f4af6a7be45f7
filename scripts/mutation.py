"""Mutation testing of one core module with mutmut, and its score.

    python scripts/mutation.py scaling          # mutate featcache/heads/scaling.py, print the score
    python scripts/mutation.py --list           # the modules, their files and the command each runs
    python scripts/mutation.py --score scaling  # the score of the last run, without running
    python scripts/mutation.py scaling --survivors  # after adding tests: retest only last run's survivors

Not in CI (minutes per module on two cores). mutmut is configured in pyproject.toml's [tool.mutmut]:
which files it may mutate and the fast tests it runs (no Keras training); it first runs them once to
learn which tests reach which function, then runs, per mutant, only those tests. Its working copy
lives in mutants/ (ignored by git); `mutmut results` and `mutmut show NAME` read the survivors there.
The score is killed / (total - skipped), timeouts counted apart as in mutmut's own summary.
"""

from __future__ import annotations

import argparse
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
    "cache": "featcache/cache.py",
}


def mutant_glob(module: str) -> str:
    """The mutmut name pattern of every mutant of ``module``: featcache.heads.scaling.*."""
    return MODULES[module].removesuffix(".py").replace("/", ".") + ".*"


def mutmut() -> str:
    """The mutmut executable beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "mutmut"
    return str(beside) if beside.exists() else "mutmut"


def run_command(module: str, max_children: int, names: list[str] | None = None) -> list[str]:
    """The mutmut command that mutates ``module`` only (or only the mutants ``names``)."""
    return [mutmut(), "run", "--max-children", str(max_children), *(names or [mutant_glob(module)])]


def statuses(results: str, module: str) -> dict[str, str]:
    """Mutant name -> status for ``module``, from ``mutmut results --all true`` output."""
    prefix = mutant_glob(module)[:-1]
    found = {}
    for line in results.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name.startswith(prefix) and "__mutmut_" in name:
            found[name] = status
    return found


def score(results: str, module: str) -> Counter:
    """Mutant counts by status for ``module`` from ``mutmut results --all true`` output."""
    return Counter(statuses(results, module).values())


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
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    args = parser.parse_args(argv)
    if args.list:
        for module in MODULES:
            print(f"{module:<9} {MODULES[module]:<28} {' '.join(run_command(module, args.max_children)[1:])}")
        return 0
    if args.module is None:
        parser.error(f"name a module: {', '.join(MODULES)} (or --list)")
    if not args.score:
        names = None
        if args.survivors:
            names = [name for name, status in statuses(results(), args.module).items() if status == "survived"]
            if not names:
                print(f"no survivors of {args.module} to retest", file=sys.stderr)
        if names is None or names:
            command = run_command(args.module, args.max_children, names)
            print("$ " + " ".join(command[:4] + [f"<{len(names)} survivors>"] if names else command), file=sys.stderr)
            subprocess.run(command, cwd=ROOT, check=True)
    print(summary(args.module, score(results(), args.module)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
