"""The command line: every layout end to end, info, backbones, and one-line errors."""

from __future__ import annotations

import json

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
