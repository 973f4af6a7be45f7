"""The Ray engine on one local Ray instance: the same cache as the local engine, shard for shard,
with rejects, augmented views, resume, row reuse and the driver's lock; clear errors without Ray."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError, cache
from featcache.cli import main
from featcache.ray_engine import RayEngine  # imports no Ray: the tests of the no-Ray errors run everywhere
from tests.conftest import make_split_folders, run_extract, write_image

pytestmark = pytest.mark.ray

# 38 files (2 corrupt) + 21 train views: 16 shards, each with a second layer
OPTIONS = dict(shard_size=4, batch_size=4, augment=1, also_layer="block4_pool")
CLI_OPTIONS = ["--weights", "none", "--image-size", "32", "--dtype", "float32", "--shard-size", "4",
               "--batch-size", "4", "--augment", "1", "--also-layer", "block4_pool"]
REJECTS = {"train/cat/broken.jpg": "not an image (unrecognised format)", "test/dog/empty.png": "empty file"}
VOLATILE = {"created", "completed", "seconds", "engine"}  # manifest fields that may differ between runs


@pytest.fixture(scope="module")
def ray():
    """Ray itself, for the tests that need it: they skip without it, and fail where CI is set (conftest)."""
    return pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray(ray):
    """One Ray instance for the module (starting one takes seconds); the engine uses it as it is."""
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_split_folders(tmp_path_factory.mktemp("ray") / "data",
                              counts={"train": 10, "validation": 4, "test": 4})
    (root / "train" / "cat" / "broken.jpg").write_text("not an image")
    (root / "test" / "dog" / "empty.png").touch()
    return root


@pytest.fixture(scope="module")
def local(data):
    return run_extract(data, data.parent / "local", **OPTIONS)


@pytest.fixture(scope="module")
def by_ray(data, local_ray):
    """``featcache extract --engine ray --workers 2``, as a user runs it."""
    workdir = data.parent / "ray"
    args = ["extract", "--data", str(data), "--workdir", str(workdir), *CLI_OPTIONS, "--engine", "ray",
            "--workers", "2"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return cache.open_cache(workdir)


def shard_contents(path):
    with h5py.File(path, "r") as f:
        attrs = {k: v for k, v in f.attrs.items() if k != "created"}
        datasets = {}  # also those inside groups (layers/NAME)

        def collect(name, item):
            if isinstance(item, h5py.Dataset):
                datasets[name] = item[:]

        f.visititems(collect)
        return datasets, attrs


def test_ray_writes_the_local_engines_cache_shard_for_shard(local, by_ray):
    assert by_ray.key == local.cache.key
    assert by_ray.path.name == local.cache.path.name
    names = sorted(p.name for p in local.cache.path.glob("*.h5"))
    assert names == sorted(p.name for p in by_ray.path.glob("*.h5")) and len(names) == 16
    for name in names:
        (ours, our_attrs), (theirs, their_attrs) = shard_contents(by_ray.path / name), \
            shard_contents(local.cache.path / name)
        assert our_attrs == their_attrs
        for dataset in ("paths", "labels", "sha256", "views"):
            assert (ours[dataset] == theirs[dataset]).all(), (name, dataset)
        assert sorted(ours) == sorted(theirs) and "layers/block4_pool" in ours
        for dataset in ("features", "layers/block4_pool"):
            np.testing.assert_allclose(ours[dataset], theirs[dataset], rtol=1e-5, atol=1e-5)
    # how the precision was chosen differs (the CLI resolves auto, the fixture gives it); not what it is
    strip = lambda manifest: {k: v for k, v in manifest.items() if k not in {*VOLATILE, "precision"}}  # noqa: E731
    assert strip(by_ray.manifest) == strip(local.cache.manifest)
    assert by_ray.manifest["precision"]["precision"] == local.cache.manifest["precision"]["precision"] == "float32"
    assert (by_ray.manifest["engine"], local.cache.manifest["engine"]) == ("ray", "local")
    assert (by_ray.path.parent / cache.CURRENT).read_text().strip() == by_ray.key


def test_ray_reports_corrupt_images_like_the_local_engine(local, by_ray):
    reasons = {r["relpath"]: r["reason"] for r in by_ray.manifest["rejects"]}
    assert reasons == REJECTS
    assert by_ray.manifest["rejects"] == local.cache.manifest["rejects"]
    assert "train/cat/broken.jpg" not in by_ray.read("train")[2]


class LockProbe(RayEngine):
    """The Ray engine, checking first that the driver holds the cache lock while the workers run."""

    def __call__(self, job, *args):
        with pytest.raises(FeatcacheError, match="being written by another featcache run"):
            with cache.locked(job.cache_dir):
                pass
        return super().__call__(job, *args)


def test_ray_resume_rebuilds_only_the_missing_shard_under_the_lock(data, local, by_ray):
    shards = sorted(by_ray.path.glob("*.h5"))
    missing = by_ray.path / "train-00002.h5"
    with h5py.File(missing, "r") as f:
        rows = len(f["labels"])
    missing.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shards if p != missing}
    resumed = run_extract(data, by_ray.path.parent, engine=LockProbe(workers=2), **OPTIONS)
    assert (resumed.computed, resumed.reused, resumed.shards_kept) == (rows, 0, len(shards) - 1)
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != missing} == before
    assert shard_contents(missing)[0]["paths"].tolist() == shard_contents(local.cache.path / missing.name)[0][
        "paths"].tolist()


def test_ray_copies_shared_rows_and_computes_only_a_changed_image(data, local, local_ray, tmp_path,
                                                                  monkeypatch):
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    write_image(changed / "test" / "cat" / "cat_001.png", (10, 250, 10), seed=99)
    shutil.copytree(local.cache.path.parent, tmp_path / "work")
    monkeypatch.chdir(tmp_path)  # a relative workdir and data: workers must get absolute paths
    result = run_extract(changed.relative_to(tmp_path), "work", engine=RayEngine(), **OPTIONS)
    total = sum(s["rows"] for s in local.cache.manifest["splits"].values())
    assert (result.computed, result.reused) == (1, total - 1)
    reference = run_extract(changed, tmp_path / "reference", **OPTIONS)
    for split in reference.cache.splits:
        ours, theirs = result.cache.read(split), reference.cache.read(split)
        assert ours[2] == theirs[2]
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)


def test_workers_beyond_the_cluster_are_one_clear_error(ray):
    engine = RayEngine(workers=3, cpus_per_worker=1, gpus_per_worker=1)
    fits_not = r"3 Ray workers of 1 CPU \+ 1 GPU each do not fit .*2 CPUs, 0 GPUs"
    with pytest.raises(FeatcacheError, match=fits_not):
        engine.pool_size({"CPU": 2.0}, shards=10)
    assert RayEngine().pool_size({"CPU": 8.0}, shards=3) == 3  # no idle actor per missing shard


def test_ray_options_without_the_ray_engine_are_a_usage_error(data, tmp_path):
    result = CliRunner().invoke(main, ["extract", "--data", str(data), "--workdir", str(tmp_path),
                                       "--workers", "2"])
    assert result.exit_code == 2 and "--workers: Ray options; add --engine ray" in result.output


def test_without_ray_the_engine_names_the_extra_and_featcache_never_imports_ray(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when it is not installed
    result = CliRunner().invoke(main, ["extract", "--data", str(data), "--workdir", str(tmp_path),
                                       "--engine", "ray"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: --engine ray needs Ray Data, which is not installed: pip install 'featcache[ray]'")
    probe = "import sys, featcache.cli, featcache.extract, featcache.ray_engine; print('ray' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"
