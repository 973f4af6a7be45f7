"""The command line: every layout end to end, info, backbones, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli import main
from tests.conftest import make_class_folders

FAST = ["--weights", "none", "--image-size", "32", "--shard-size", "8"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("layout", ["split", "class", "csv"])
def test_extract_every_layout_then_info(layout, split_data, class_data, tmp_path):
    data = {"split": split_data, "class": class_data}.get(layout)
    if layout == "csv":
        make_class_folders(tmp_path / "csvdata", per_class=6)
        rows = [f"{c}/{c}_{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(6)]
        data = tmp_path / "csvdata" / "labels.csv"
        data.write_text("path,label\n" + "\n".join(rows) + "\n")
    result = invoke("extract", "--data", data, "--workdir", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert "rows through the backbone" in result.output and "cache:" in result.output
    info = invoke("info", "--workdir", tmp_path / "out")
    assert info.exit_code == 0 and "rows per split and class" in info.output
    listing = invoke("info", "--all", "--workdir", tmp_path / "out")
    assert listing.exit_code == 0 and "complete" in listing.output and "vgg16" in listing.output
    manifest_path = next((tmp_path / "out").glob("*/manifest.json"))
    assert json.loads(manifest_path.read_text())["dataset"]["layout"].startswith(
        {"split": "split", "class": "class", "csv": "csv"}[layout]
    )


def test_default_data_root_is_data_folder(tmp_path, monkeypatch):
    make_class_folders(tmp_path / "data", per_class=6)
    monkeypatch.chdir(tmp_path)
    result = invoke("extract", *FAST)
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "featcache-out").glob("*/manifest.json"))


def test_second_run_reports_nothing_to_compute(class_data, tmp_path):
    invoke("extract", "--data", class_data, "--workdir", tmp_path / "out", *FAST)
    again = invoke("extract", "--data", class_data, "--workdir", tmp_path / "out", *FAST)
    assert "nothing to compute" in again.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "--data", "/no/such/dir"], "--data /no/such/dir: no such file or folder"),
        (["extract", "--backbone", "vgg61"], "unknown backbone 'vgg61': did you mean vgg19, vgg16"),
        (["extract", "--image-size", "16"], "--image-size 16 is below vgg16's minimum of 32 px"),
        (["info", "--workdir", "/no/such/dir"], "no complete cache in /no/such/dir"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_weights_file_is_one_line(class_data):
    result = CliRunner().invoke(main, ["extract", "--data", str(class_data), "--weights", "missing.h5"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = result.stderr.strip().splitlines()[-1]  # the whole error, on the last line of stderr
    assert error == "Error: --weights 'missing.h5': not 'imagenet', 'none' or an existing weights file"


def test_backbones_lists_registry_and_layers():
    listing = invoke("backbones")
    assert all(name in listing.output for name in ("vgg16", "mobilenet_v2", "inception_v3", "resnet50"))
    layers = invoke("backbones", "vgg16")
    assert "block5_conv1" in layers.output and "14,714,688 trainable" in layers.output


def test_commands_default_to_the_cache_of_the_last_extract(split_data, tmp_path):
    from featcache.cache import open_cache

    out = tmp_path / "out"
    first = invoke("extract", "--data", split_data, "--workdir", out, *FAST)
    key_a = first.output.split("cache: ")[1].split("/")[-1].strip()
    invoke("extract", "--data", split_data, "--workdir", out, "--pooling", "avg", *FAST)
    assert open_cache(out).path.name != key_a
    again = invoke("extract", "--data", split_data, "--workdir", out, *FAST)  # nothing to compute
    assert "nothing to compute" in again.output and open_cache(out).path.name == key_a


# --- the first hour (issue 21): tables, help, predict, backbone names, fit-head's log loss ----------------


def test_tables_keep_every_name_whole_when_piped():
    """CliRunner's output is not a terminal: no name may be cut to fit 80 columns."""
    listing = CliRunner().invoke(main, ["backbones"], terminal_width=80)
    assert listing.exit_code == 0
    assert "…" not in listing.output
    assert "mobilenet_v2_keras" in listing.output
    assert "featcache.backbones.torchvision_mobilenet_v2:build" in listing.output


def test_tables_fold_long_names_in_a_narrow_terminal():
    import io
    import re

    from rich.console import Console
    from rich.table import Table

    from featcache.info import print_table

    console = Console(file=io.StringIO(), force_terminal=True, width=24, color_system=None)
    table = Table()
    table.add_column("n")
    table.add_column("class")
    table.add_row("3", "1_possibly_defective_cells_of_a_module")
    print_table(console, table)
    text = console.file.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 24
    assert "1_possibly_defective_cells_of_a_module" in "".join(re.findall(r"\w+", text))


def test_every_command_help_line_is_a_whole_sentence():
    """The one-line help in a command list is the docstring's whole first paragraph (no "et al." cut)."""
    import click

    commands = [(name, command) for name, command in main.commands.items()]
    commands += [(f"{name} {sub}", c) for name, group in main.commands.items()
                 if isinstance(group, click.Group) for sub, c in group.commands.items()]
    for name, command in commands:
        first = " ".join(command.help.split("\n\n")[0].split())
        assert command.get_short_help_str(limit=300) == first, name
    help_text = invoke("datasets", "--help").output
    assert "The elpv solar-cell images: 4 classes, 25% test as in the paper." in help_text


def test_backbone_names_ignore_case(tmp_path):
    from featcache import backbones
    from featcache.cache import open_cache
    from tests.conftest import make_split_folders

    assert backbones.get("VGG16").name == "vgg16"
    with pytest.raises(Exception, match="did you mean mobilenet_v2"):
        backbones.get("MobileNetV2")
    data = make_split_folders(tmp_path / "data", counts={"train": 2, "validation": 1, "test": 1})
    result = invoke("extract", "--backbone", "VGG16", "--data", data, "--workdir", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert open_cache(tmp_path / "out").config["backbone"] == "vgg16"


@pytest.fixture
def logreg_cache(tmp_path):
    """A synthetic cache (no backbone) with logreg fitted: predict and compare run without TensorFlow."""
    import featcache
    from tests.conftest import synthetic_cache

    cache = synthetic_cache(tmp_path / "work", per_class=(30, 10, 10))
    featcache.fit_head(cache, "logreg", workdir=tmp_path / "work", show_progress=False)
    return cache


def test_predict_refuses_a_text_file_before_starting_tensorflow(logreg_cache, tmp_path):
    import subprocess
    import sys

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    script = ("import sys\nfrom click.testing import CliRunner\nfrom featcache.cli import main\n"
              f"r = CliRunner().invoke(main, ['predict', {str(notes)!r}, '--workdir', {str(tmp_path / 'work')!r}])\n"
              "print(r.exit_code, 'tensorflow' in sys.modules)\nprint(r.output)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    status, output = done.stdout.split("\n", 1)
    assert status == "1 False", done.stdout + done.stderr
    assert "notes.txt: not an image (unrecognised format)" in output
    assert "none of the 1 files could be used" in output


def test_predict_suggests_only_heads_that_exist(logreg_cache, tmp_path):
    from tests.conftest import write_image

    image = write_image(tmp_path / "cell.png")
    work = tmp_path / "work"
    unknown = CliRunner().invoke(main, ["predict", str(image), "--head", "dense512", "--workdir", str(work)])
    assert unknown.exit_code == 1
    assert "fit-head --head dense512" not in unknown.output
    assert "--head dense512: no head of that name exists: did you mean dense1024, dense256?" in unknown.output
    assert "`featcache heads`" in unknown.output
    unfitted = CliRunner().invoke(main, ["predict", str(image), "--head", "svm", "--workdir", str(work)])
    assert unfitted.exit_code == 1 and "run `featcache fit-head --head svm`" in unfitted.output
    key = logreg_cache.key[:16]
    named = CliRunner().invoke(main, ["predict", str(image), "--head", "svm", "--cache", key, "--workdir", str(work)])
    assert named.exit_code == 1 and f"run `featcache fit-head --head svm --cache {key}`" in named.output


@pytest.mark.parametrize("head, options", [("logreg", []), ("dense256", ["--epochs", "6", "--patience", "1"])])
def test_fit_head_reports_the_log_loss_that_compare_reports(head, options, tmp_path):
    """One definition: the saved head's log loss (early stopping's kept epoch, not the last epoch's line)."""
    from tests.conftest import synthetic_cache

    synthetic_cache(tmp_path, per_class=(30, 10, 10), separation=2)
    fitted = CliRunner().invoke(main, ["fit-head", "--head", head, *options, "--workdir", str(tmp_path)])
    assert fitted.exit_code == 0, fitted.output
    compared = CliRunner().invoke(main, ["compare", "--workdir", str(tmp_path), "--format", "json"])
    row = json.loads(compared.stdout)[0]
    assert f"validation accuracy {row['val_accuracy']:.1%}, log loss {row['val_log_loss']:.3f}" in fitted.output
    assert f"test accuracy {row['test_accuracy']:.1%}, log loss {row['test_log_loss']:.3f}" in fitted.output


# --- the install (issue 21, item 3) -------------------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]


def make_dry_run(target: str, venv) -> list[str]:
    """The pip installs `make TARGET` would run for a fresh virtualenv at ``venv``."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    return [line for line in done.stdout.splitlines() if "pip install" in line and " -e " in line]


def test_make_demo_installs_the_runtime_and_make_test_the_dev_extra(tmp_path):
    venv = tmp_path / "venv"
    assert make_dry_run("demo", venv) == [f'{venv}/bin/pip install --progress-bar on -e ".[offline]"']
    assert make_dry_run("test", venv)[-1] == f'{venv}/bin/pip install --progress-bar on -e ".[dev]"'


def test_pyproject_license_is_an_spdx_string():
    """A TOML table makes setuptools>=77 warn on every install; the SPDX string needs setuptools>=77."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]


def test_no_tagline_promises_heads_in_seconds():
    """sklearn heads take tens of seconds on elpv (README's demo table): the taglines promise no time."""
    import tomllib

    assert "in seconds" not in main.help
    assert "in seconds" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]


def test_predict_table_never_cuts_a_long_path():
    import re

    import numpy as np

    from featcache.predict import Predictions, format_predictions

    path = Path("/data/" + "/".join(["a_rather_long_folder_name"] * 12) + "/1_possibly_defective_cell.png")
    text = format_predictions(Predictions(["0_functional", "1_possibly_defective"], [path],
                                          np.array([[0.25, 0.75]])), "table")
    assert "…" not in text
    assert re.sub(r"\s", "", str(path)) in "".join(line.split("  ")[0].strip() for line in text.splitlines())


@pytest.mark.parametrize("command", [["extract"], ["info"], ["fit-head"], ["compare"]])
def test_a_workdir_that_is_a_file_is_one_line_before_any_work(command, tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    result = CliRunner().invoke(main, [*command, "--workdir", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output
