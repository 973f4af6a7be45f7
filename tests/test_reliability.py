"""Bad input at scale: a 200-file fuzz corpus never crashes, hangs or bloats an extract run."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from tests.conftest import make_split_folders
from tests.fuzz_corpus import make_corpus


def test_fuzz_corpus_is_reported_file_by_file_and_the_run_completes(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 3, "validation": 2, "test": 2})
    expected = {}
    for name in ("cat", "dog"):
        corpus = make_corpus(data / "train" / name / "fuzz")
        expected.update({p.relative_to(data).as_posix(): bad for p, bad in corpus.items()})
    assert len(expected) >= 400
    command = [sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--workdir",
               str(tmp_path / "out"), "--weights", "none", "--image-size", "32", "--shard-size", "64"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads(next((tmp_path / "out").glob("*/manifest.json")).read_text())
    rejected = {r["relpath"]: r["reason"] for r in manifest["rejects"]}
    must_reject = {p for p, bad in expected.items() if bad is True}
    must_accept = {p for p, bad in expected.items() if bad is False}
    assert must_reject <= set(rejected), sorted(must_reject - set(rejected))[:5]
    assert not must_accept & set(rejected), sorted(must_accept & set(rejected))
    assert all(reason for reason in rejected.values())
    good = 3 * 2
    rows = manifest["splits"]["train"]["rows"]
    assert rows == good + len(expected) - len(set(expected) & set(rejected))  # every file a row or a reject
    assert "rejected" in run.stdout and "empty.png" in run.stdout
    # bombs are refused from their headers, never decoded: memory stays that of TensorFlow itself
    assert peak_kib < 4 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
