"""Keep TensorFlow's start-up chatter off the user's stderr unless they ask for it.

TensorFlow 2.21 writes its C++ log lines through absl before absl is initialised, and those lines
ignore ``TF_CPP_MIN_LOG_LEVEL``: on every start, twice (two libraries each carry absl), come
``WARNING: All log messages before absl::InitializeLog() ...``, the oneDNN notice and "Could not
find cuda drivers". All of them are printed while ``import tensorflow`` runs; after it, the C++
level 3 (errors such as ``failed call to cuInit`` hidden, fatal ones kept) does hold.

So quiet mode does three things, none of which hides a GPU: sets ``TF_CPP_MIN_LOG_LEVEL=3``;
installs an import hook that runs the one ``import tensorflow`` of the process with file
descriptor 2 pointed at a temporary file, then writes back to stderr every line that is not an
absl/TensorFlow log line (so a Python warning or a fatal message printed meanwhile still shows);
and sets the ``tensorflow`` and ``absl`` Python loggers to errors only. ``--verbose`` or
``FEATCACHE_VERBOSE=1`` leaves all of it alone.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

VERBOSE_ENV = "FEATCACHE_VERBOSE"
_verbose = False  # this process's choice, as the CLI or the environment made it
_level_before: str | None = None  # TF_CPP_MIN_LOG_LEVEL as it was before quieting ("" unset); None: not quieted

# absl's format (I0000 00:00:1796203758.506081    3050 port.cc:153] ...), TensorFlow's own before 2.16
# (2024-01-01 10:00:00.000000: I tensorflow/core/util/port.cc:113] ...), and absl's notice. F (fatal) stays.
NOISE = re.compile(
    r"^(?:[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$)"
)


def verbose_requested() -> bool:
    """True when FEATCACHE_VERBOSE is set to anything but empty, 0, false or no."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_noise(line: str) -> bool:
    """Whether a stderr line is TensorFlow/absl log chatter that quiet mode drops."""
    return bool(NOISE.match(line))


def quiet_tensorflow(verbose: bool = False) -> None:
    """Silence TensorFlow's log lines for the rest of this process, unless ``verbose`` or
    FEATCACHE_VERBOSE asks for them (then the environment stays as the user set it).

    Call it before TensorFlow is imported; calling it again, or after the import, is harmless (the
    import lines are then already out). A later call with ``verbose`` undoes an earlier quiet one
    (``import featcache.api`` quiets; the CLI's ``--verbose`` is parsed after that import). Child
    processes inherit TF_CPP_MIN_LOG_LEVEL.
    """
    global _verbose, _level_before
    _verbose = verbose or verbose_requested()
    if _verbose:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietImport)]
        if _level_before is not None:  # quieted earlier: the user's own setting back
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
            os.environ.update({"TF_CPP_MIN_LOG_LEVEL": _level_before} if _level_before else {})
            for name in ("tensorflow", "absl"):
                logging.getLogger(name).setLevel(logging.NOTSET)
            _level_before = None
        return
    if _level_before is None:
        _level_before = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def is_verbose() -> bool:
    """Whether this process shows other libraries' log lines (``quiet_tensorflow(verbose=True)`` or the
    environment variable)."""
    return _verbose or verbose_requested()


def worker_env() -> dict[str, str]:
    """Environment variables that carry this process's choice to workers started elsewhere (Ray)."""
    return {VERBOSE_ENV: "1"} if is_verbose() else {"TF_CPP_MIN_LOG_LEVEL": "3"}


@contextlib.contextmanager
def stderr_filtered():
    """File descriptor 2 goes to a temporary file for the block; afterwards the lines that are not
    noise are written to the real stderr (every line, noise included, if the block raised). Where
    there is no file descriptor 2 to redirect, the block runs unfiltered."""
    _flush()
    try:
        saved, captured = os.dup(2), tempfile.TemporaryFile()
    except OSError:
        yield
        return
    with captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            _flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if failed or not is_noise(line)]
            if kept and sys.stderr is not None:
                sys.stderr.write("".join(kept))
                _flush()


def _flush() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, with a loader that runs the import inside ``stderr_filtered``."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import per process; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    """The real loader, its ``exec_module`` run with stderr filtered; the module keeps the real one."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # TensorFlow's own code sees its loader
        with stderr_filtered():
            self.loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)
