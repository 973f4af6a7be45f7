"""A command that starts TensorFlow prints only featcache's own lines on stderr, unless asked for more."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from featcache import quiet
from tests.conftest import make_split_folders

TF_MARKERS = ("tensorflow", "cuInit", "oneDNN", "absl", "cuda")


def tf_lines(stderr: str) -> list[str]:
    """Lines of TensorFlow/absl origin: the absl prefixes I0000/W0000/E0000, or a word only TF prints."""
    return [line for line in stderr.splitlines()
            if line[:5] in ("I0000", "W0000", "E0000") or any(m.lower() in line.lower() for m in TF_MARKERS)]


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet.VERBOSE_ENV)}
    return {**env, "COLUMNS": "200", **extra}


def run_extract(tmp_path, *flags, env=None) -> subprocess.CompletedProcess:
    data = make_split_folders(tmp_path / "data", counts={"train": 2, "validation": 1, "test": 1})
    command = [sys.executable, "-m", "featcache.cli", *flags, "extract", "--weights", "none", "--image-size",
               "32", "--data", str(data), "--workdir", str(tmp_path / "work")]
    return subprocess.run(command, capture_output=True, text=True, env=env or clean_env(), timeout=300)


def test_extract_prints_no_tensorflow_lines(tmp_path):
    done = run_extract(tmp_path)
    assert done.returncode == 0, done.stderr
    assert tf_lines(done.stderr) == [], done.stderr
    assert "backbone:" in done.stderr  # featcache's own progress line still shows


def test_verbose_shows_tensorflow_lines(tmp_path):
    done = run_extract(tmp_path, "--verbose")
    assert done.returncode == 0, done.stderr
    assert tf_lines(done.stderr), done.stderr  # TF 2.21 on a CPU: the absl notice, oneDNN, cuda drivers


def test_verbose_environment_variable_acts_as_the_flag(monkeypatch):
    """FEATCACHE_VERBOSE=1 takes the path --verbose takes (shown end to end above): no import hook,
    the user's TF_CPP_MIN_LOG_LEVEL left alone."""
    import sys

    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setattr(quiet, "_level_before", None)
    monkeypatch.setattr(quiet, "_verbose", False)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)  # so a quiet call would install the hook
    quiet.quiet_tensorflow()
    assert quiet.is_verbose() and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    assert not any(isinstance(f, quiet._QuietImport) for f in sys.meta_path)
    monkeypatch.setenv(quiet.VERBOSE_ENV, "0")  # and "0" means quiet
    quiet.quiet_tensorflow()
    assert not quiet.is_verbose() and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"


def test_filter_keeps_every_line_that_is_not_tensorflow_log():
    """The import-time filter drops absl/TF log lines only; other output written meanwhile survives."""
    script = textwrap.dedent("""
        import os, sys
        from featcache.quiet import stderr_filtered
        with stderr_filtered():
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
            os.write(2, b"I0000 00:00:1796203758.506081    3050 port.cc:153] oneDNN custom operations are on.\\n")
            os.write(2, b"E0000 00:00:1796203764.487712    3050 cuda_platform.cc:52] failed call to cuInit\\n")
            os.write(2, b"2024-01-01 10:00:00.123456: W tensorflow/core/x.cc:1] old style\\n")
            os.write(2, b"F0000 00:00:1796203764.487712    3050 x.cc:1] fatal stays\\n")
            print("a python warning stays", file=sys.stderr)
        print("after", file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["F0000 00:00:1796203764.487712    3050 x.cc:1] fatal stays",
                                        "a python warning stays", "after"]


def test_filter_replays_everything_when_the_block_fails():
    script = textwrap.dedent("""
        import os
        from featcache.quiet import stderr_filtered
        try:
            with stderr_filtered():
                os.write(2, b"E0000 00:00:1.0    1 x.cc:1] why the import failed\\n")
                raise ImportError("boom")
        except ImportError:
            pass
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "why the import failed" in done.stderr


def test_worker_env_carries_the_choice(monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(quiet, "_verbose", False)
    assert quiet.worker_env() == {"TF_CPP_MIN_LOG_LEVEL": "3"}
    monkeypatch.setattr(quiet, "_verbose", True)
    assert quiet.worker_env() == {quiet.VERBOSE_ENV: "1"}


def test_verbose_after_quiet_undoes_it(monkeypatch):
    """`import featcache.api` quiets before the CLI has parsed --verbose: the later verbose call must
    restore the user's TF_CPP_MIN_LOG_LEVEL and take the import hook out."""
    import sys

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setattr(quiet, "_level_before", None)
    monkeypatch.setattr(quiet, "_verbose", quiet._verbose)  # restored after the test
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)  # so the hook would be installed
    quiet.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert any(isinstance(f, quiet._QuietImport) for f in sys.meta_path)
    quiet.quiet_tensorflow(verbose=True)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1" and quiet.is_verbose()
    assert not any(isinstance(f, quiet._QuietImport) for f in sys.meta_path)
