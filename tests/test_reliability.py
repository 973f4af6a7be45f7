"""Bad input and full disks: nothing crashes, hangs, bloats, or leaves a half-written file visible."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from featcache import FeatcacheError, cache
from tests.conftest import flip_bits, make_split_folders, run_extract
from tests.fuzz_corpus import make_corpus
from tests.test_extract import assert_same_cache


def peak_rss_of(command: list[str], folder: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``command`` and return its result and its own peak RSS in KiB: wait4 reports the
    process waited for (and the children it waited for), never other processes of this session."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        timeout = threading.Timer(600, process.kill)
        timeout.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timeout.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    run = subprocess.CompletedProcess(command, process.returncode, (folder / "stdout").read_text(),
                                      (folder / "stderr").read_text())
    return run, usage.ru_maxrss


def extract_command(data: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--workdir", str(workdir),
            "--weights", "none", "--image-size", "32", "--shard-size", "64"]


def test_fuzz_corpus_is_reported_file_by_file_and_the_run_completes(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 3, "validation": 2, "test": 2})
    clean = make_split_folders(tmp_path / "clean", counts={"train": 3, "validation": 2, "test": 2})
    expected = {}
    for name in ("cat", "dog"):
        corpus = make_corpus(data / "train" / name / "fuzz")
        expected.update({p.relative_to(data).as_posix(): bad for p, bad in corpus.items()})
    assert len(expected) >= 400
    run, peak_kib = peak_rss_of(extract_command(data, tmp_path / "out"), tmp_path / "fuzz-run")
    assert run.returncode == 0, run.stderr[-2000:]
    baseline = peak_rss_of(extract_command(clean, tmp_path / "clean-out"), tmp_path / "clean-run")
    assert baseline[0].returncode == 0, baseline[0].stderr[-2000:]
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
    # bombs are refused from their headers, never decoded: the peak stays that of the same command
    # on the 14 good images alone (the corpus's 144 MP bomb, decoded, adds 412 MiB)
    extra_mib = (peak_kib - baseline[1]) / 1024
    assert extra_mib < 100, f"peak RSS {peak_kib / 1024:.0f} MiB, {extra_mib:.0f} MiB over the good images alone"


def _file_size_limit(limit_bytes: int):
    """A full disk for one child process: writes past limit_bytes fail with EFBIG (no root needed)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_during_extract_and_fit_head_is_one_clear_error_and_the_next_run_succeeds(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 20, "validation": 3, "test": 3})
    workdir = tmp_path / "out"
    cli = [sys.executable, "-m", "featcache.cli"]
    extract = [*cli, "extract", "--data", str(data), "--workdir", str(workdir), "--weights", "none",
               "--image-size", "32", "--dtype", "float32", "--shard-size", "16"]
    full = subprocess.run(extract, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(30_000))
    assert full.returncode == 1, full.stderr[-2000:]
    assert "File too large; free space and run the same command again" in full.stderr.splitlines()[-1]
    cache_dir = next(workdir.iterdir())
    assert not list(cache_dir.glob("*.h5")) and not list(cache_dir.glob("*.tmp-*"))
    assert json.loads((cache_dir / "manifest.json").read_text())["status"] == "incomplete"
    assert subprocess.run(extract, capture_output=True, timeout=300).returncode == 0

    fit = [*cli, "fit-head", "--head", "dense256", "--epochs", "1", "--workdir", str(workdir)]
    full = subprocess.run(fit, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(30_000))
    assert full.returncode == 1 and "saving head dense256" in full.stderr.splitlines()[-1]
    assert not list((cache_dir / "heads").iterdir())  # neither a half-written head nor its temporary
    assert subprocess.run(fit, capture_output=True, timeout=300).returncode == 0
    assert (cache_dir / "heads" / "dense256" / "head.json").is_file()


def _truncate(shard):
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _delete_dataset(shard):
    import h5py

    with h5py.File(shard, "a") as f:
        del f["labels"]


@pytest.mark.parametrize("corrupt", [_truncate, flip_bits, _delete_dataset])
def test_a_corrupted_shard_is_named_by_readers_and_extract_rebuilds_only_it(corrupt, class_data, tmp_path):
    first = run_extract(class_data, tmp_path / "out")
    shards = first.cache.shard_paths("train")
    rows = first.cache.manifest["splits"]["train"]["rows"]
    corrupt(shards[1])
    with pytest.raises(FeatcacheError, match=f"shard {shards[1]}.*featcache extract"):
        first.cache.read("train")
    rebuilt = run_extract(class_data, tmp_path / "out")
    assert rebuilt.shards_kept == len(list(first.cache.path.glob("*.h5"))) - 1 and 0 < rebuilt.computed <= 4
    assert len(rebuilt.cache.read("train")[2]) == rows


def test_symlink_loops_and_unreadable_links_are_skipped_and_reported(tmp_path):
    import os

    data = make_split_folders(tmp_path / "data", counts={"train": 3, "validation": 2, "test": 2})
    os.symlink(data / "train", data / "train" / "cat" / "loop")  # a folder that contains itself
    os.symlink("self.png", data / "train" / "cat" / "self.png")  # a link to itself
    os.symlink(tmp_path / "nowhere.png", data / "train" / "dog" / "dangling.png")
    result = run_extract(data, tmp_path / "out")
    reasons = {r["relpath"]: r["reason"] for r in result.rejects}
    assert reasons == {"train/cat/self.png": "cannot read (Too many levels of symbolic links)",
                       "train/dog/dangling.png": "cannot read (No such file or directory)"}
    assert result.cache.manifest["splits"]["train"]["rows"] == 6  # the looping folder is not followed


def test_chaos_kills_in_every_phase_lose_nothing_and_no_partial_cache_is_accepted(tmp_path):
    """The short version of scripts/chaos.py: six faults, one in each phase (five SIGKILLs and a file
    rewritten during extract), then resume. 8 images (4 shards): a run's time is mostly TensorFlow's
    start-up."""
    report = tmp_path / "chaos.json"
    run = subprocess.run([sys.executable, "scripts/chaos.py", "--faults", "6", "--images", "8",
                          "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    totals = json.loads(report.read_text())
    assert totals["faults_by_phase"] == {p: 1 for p in ("decode", "backbone", "shard", "rename", "manifest",
                                                        "rewrite")}
    assert totals["runs_resumed"] >= 1 and totals["shards_bitflipped"] == 1 and totals["files_rewritten"] == 1
    assert totals["images_lost"] == 0 and totals["corrupt_caches_accepted"] == 0 and not totals["problems"]


def load_script(name: str):
    """A script of scripts/ as a module, to test its own functions."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chaos_checker_reports_every_difference_from_the_uninterrupted_run(split_data, tmp_path):
    """scripts/chaos.py passes only if its checker fails: each kind of damage, alone, is reported."""
    chaos = load_script("chaos")
    run_extract(split_data, tmp_path / "ref")
    reference = chaos.snapshot(tmp_path / "ref")
    assert chaos.differences(reference, chaos.snapshot(tmp_path / "ref")) == []
    assert chaos.lost_images(reference, chaos.snapshot(tmp_path / "ref")) == 0

    def damaged(split, change):
        got = chaos.snapshot(tmp_path / "ref")
        got["splits"][split] = change(*got["splits"][split])
        return got

    def one_row_changed(features, labels, paths):
        features = features.copy()
        features[3].flat[0] += 1e-3
        return features, labels, paths

    cases = {
        "train: features differ": damaged("train", one_row_changed),
        "validation: rows or labels differ": damaged("validation", lambda f, y, p: (f, y[::-1].copy(), p)),
        "test: rows or labels differ": damaged("test", lambda f, y, p: (f[::-1], y[::-1], p[::-1])),
    }
    duplicate = damaged("train", lambda f, y, p: (np.concatenate([f, f[:1]]), np.append(y, y[0]), p + p[:1]))
    missing = damaged("train", lambda f, y, p: (f[1:], y[1:], p[1:]))
    for expected, got in cases.items():
        assert chaos.differences(reference, got) == [expected]
    assert chaos.differences(reference, duplicate) == ["train: duplicate rows", "train: rows or labels differ"]
    assert chaos.differences(reference, missing) == ["train: rows or labels differ"]
    assert chaos.lost_images(reference, missing) == 1
    other = chaos.snapshot(tmp_path / "ref")
    other["manifest"] = {**other["manifest"], "key": "0" * 64, "rejects": [{"relpath": "train/cat/x.png"}]}
    assert chaos.differences(reference, other) == ["different key", "rejects differ"]
    swapped = chaos.swap_shards(tmp_path / "ref", random.Random(0))  # on disk: readers refuse it
    refused = chaos.snapshot(tmp_path / "ref")
    assert swapped and "holds the rows of" in refused["refused"]
    run_extract(split_data, tmp_path / "ref")  # and the next run rebuilds both
    assert chaos.differences(reference, chaos.snapshot(tmp_path / "ref")) == []
    flip_bits(next((tmp_path / "ref").glob("*/train-00001.h5")))  # on disk: a reader refuses it
    refused = chaos.snapshot(tmp_path / "ref")
    assert chaos.differences(reference, refused) == [f"refused: {refused['refused']}"]
    assert chaos.lost_images(reference, refused) == sum(len(p) for _, _, p in reference["splits"].values())


def _wait_for(condition, what: str, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_two_extract_processes_on_one_key_never_interleave(tmp_path):
    """A second process fails clearly (or waits with --lock-timeout) while the first holds the cache."""
    data = make_split_folders(tmp_path / "data", counts={"train": 12, "validation": 3, "test": 3})
    workdir = tmp_path / "out"
    extract = [sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--workdir",
               str(workdir), "--weights", "none", "--image-size", "32", "--dtype", "float32",
               "--shard-size", "4", "--batch-size", "4"]
    first = subprocess.Popen(extract, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: list(workdir.glob("*/*.h5")) or first.poll() is not None, "the first shard")
    first.send_signal(signal.SIGSTOP)  # frozen mid-run, holding the lock
    try:
        assert first.poll() is None, "the first run finished before it could be frozen"
        refused = subprocess.run(extract, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1
        assert "being written by another featcache run (pid" in refused.stderr.splitlines()[-1]
        waiter = subprocess.Popen([*extract, "--lock-timeout", "120"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        lines = iter(waiter.stderr.readline, "")
        assert any("waiting up to 120 s for featcache run (pid" in line for line in lines)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    waited, _ = waiter.communicate(timeout=300)
    assert waiter.returncode == 0 and "nothing to compute: the cache was already complete" in waited
    reference = run_extract(data, tmp_path / "reference")
    assert_same_cache(reference.cache, cache.open_cache(workdir))


@pytest.mark.parametrize("damage, message", [
    ({"format": 99}, "cache format 99, not 1"),
    ({"classes": "cat,dog"}, "not a valid manifest \\(classes missing or of the wrong type\\)"),
    ({"config": {"backbone": "vgg16"}}, "the manifest's config is not an extraction config"),
])
def test_a_foreign_or_malformed_manifest_is_refused_in_one_line(damage, message, tmp_path):
    import json

    from featcache.cache import Cache, open_cache
    from tests.conftest import synthetic_cache

    cache = synthetic_cache(tmp_path)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    (cache.path / "manifest.json").write_text(json.dumps({**manifest, **damage}))
    with pytest.raises(FeatcacheError, match=message) as refusal:
        Cache(cache.path)
    assert "\n" not in str(refusal.value) and str(cache.path / "manifest.json") in str(refusal.value)
    with pytest.raises(FeatcacheError, match=message):
        open_cache(tmp_path)


def test_progress_lines_without_a_terminal_never_show_a_placeholder_rate(monkeypatch):
    """Piped output (CI, logs) shows a real images/s figure, or none, never '- img/s'."""
    import io

    from rich.console import Console

    from featcache import progress as module

    out = io.StringIO()
    monkeypatch.setattr(module, "Console", lambda stderr: Console(file=out, force_terminal=False))
    progress = module.ImageProgress(total=3)
    with progress:
        for done in (1, 2, 3):
            progress.advance_to(done)
    lines = out.getvalue().splitlines()
    assert lines and all("- img/s" not in line for line in lines), lines
    assert all(re.search(r"\d+/3 images(, \d+\.\d img/s)?( ETA \d+ s)?$", line) for line in lines), lines
