"""featcache.sklearn.FeatureExtractor: a scikit-learn transformer over the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils import estimator_checks

from featcache import FeatcacheError
from featcache.sklearn import FeatureExtractor

FAST = dict(backbone="vgg16", weights="none", image_size=32, pooling="avg", batch_size=8)


def colour_images(n=12, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 40x40 images, alternately reddish (class 0) and bluish (class 1)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    colours = np.array([(200, 60, 40), (40, 80, 200)])[y]
    pixels = colours[:, None, None, :] + rng.normal(0, 20, (n, 40, 40, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), y


@pytest.fixture
def extractor(tmp_path):
    return FeatureExtractor(workdir=tmp_path / "out", **FAST)


def test_transform_gives_float32_rows_in_input_order(extractor):
    images, _ = colour_images()
    features = extractor.fit(images).transform(images)
    assert features.dtype == np.float32 and features.shape == (12, 512)
    order = np.random.default_rng(1).permutation(12)
    np.testing.assert_array_equal(extractor.transform(images[order]), features[order])
    assert len({row.tobytes() for row in features}) == 12  # distinct images, distinct rows


def test_a_second_transform_runs_no_backbone(extractor, monkeypatch):
    images, _ = colour_images()
    first = extractor.transform(images)

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone ran again for the same images")

    monkeypatch.setattr("featcache.extract.extraction_model", refuse)
    monkeypatch.setattr("featcache.arrays._write", refuse)
    np.testing.assert_array_equal(clone(extractor).transform(images.copy()), first)


def test_paths_give_the_features_of_the_same_pixels(extractor, tmp_path):
    images, _ = colour_images()
    grey = images[..., 0]
    paths = []
    for i, image in enumerate(np.concatenate([images[:6], np.repeat(grey[6:, ..., None], 3, axis=3)])):
        paths.append(tmp_path / "files" / f"image_{i:02d}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(paths[-1])
    mixed = [str(p) if i % 2 else p for i, p in enumerate(paths)]  # str and Path alike
    from_files = extractor.transform(mixed)
    # another batch size: on AVX2-only CPUs oneDNN then rounds differently (1e-7 here); another
    # preprocessing would move features by 1e-3 or more
    np.testing.assert_allclose(from_files[:6], extractor.transform(images[:6]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_files[6:], extractor.transform(grey[6:]), rtol=0, atol=1e-6)  # (N, H, W) grey


def test_clone_and_params_round_trip(extractor, tmp_path):
    params = extractor.get_params()
    assert params == dict(FAST, workdir=tmp_path / "out", dtype="float32", layer=None)
    copy = clone(extractor)
    assert copy is not extractor and copy.get_params() == params
    assert copy.set_params(pooling="max", image_size=48) is copy
    assert copy.get_params() == dict(params, pooling="max", image_size=48)
    assert extractor.get_params() == params


@pytest.mark.parametrize(("params", "message"), [
    (dict(pooling="mean"), "--pooling 'mean': choose one of"),
    (dict(backbone="vgg61"), "unknown backbone 'vgg61'"),
    (dict(batch_size=0), "batch_size=0: give 1 or more"),
    (dict(image_size="32"), "image_size='32' is not int or None"),
])
def test_fit_checks_the_parameters_in_one_line(params, message, extractor):
    with pytest.raises(FeatcacheError, match=message):
        extractor.set_params(**params).fit(colour_images()[0])


def test_bad_input_is_one_line(extractor, tmp_path):
    with pytest.raises(FeatcacheError, match="one path"):
        extractor.transform(str(tmp_path))
    with pytest.raises(FeatcacheError, match="dtype float64"):
        extractor.transform(colour_images()[0] / 255.0)
    with pytest.raises(FeatcacheError, match="not an image"):
        (tmp_path / "bad.png").write_text("no pixels")
        extractor.transform([tmp_path / "bad.png"])
    with pytest.raises(FeatcacheError, match="no usable images"):
        extractor.transform(colour_images()[0][:, :4, :4])  # under 8 px a side: rejected


def test_pipeline_in_grid_search_fits_and_predicts(extractor):
    images, y = colour_images(16)
    model = Pipeline([("features", extractor), ("clf", LogisticRegression(max_iter=1000))])
    search = GridSearchCV(model, {"clf__C": [0.1, 1]}, cv=2).fit(images, y)
    assert search.best_params_["clf__C"] in (0.1, 1)
    assert search.predict(images).shape == (16,)
    assert search.score(images, y) > 0.5


# check_estimator's other checks feed 2-D float tables (and sparse matrices, NaN, pandas frames) to fit
# and transform and compare the outputs; a FeatureExtractor takes images or image paths, so those
# checks test input it rightly rejects. These are the checks of the estimator itself.
APPLICABLE_CHECKS = [
    estimator_checks.check_estimator_cloneable,
    estimator_checks.check_estimator_repr,
    estimator_checks.check_no_attributes_set_in_init,
    estimator_checks.check_parameters_default_constructible,
    estimator_checks.check_get_params_invariance,
    estimator_checks.check_set_params,
    estimator_checks.check_do_not_raise_errors_in_init_or_set_params,
    estimator_checks.check_mixin_order,
    estimator_checks.check_valid_tag_types,
    estimator_checks.check_estimator_tags_renamed,
]


@pytest.mark.parametrize("check", APPLICABLE_CHECKS, ids=lambda check: check.__name__)
def test_scikit_learn_estimator_checks(check):
    check("FeatureExtractor", FeatureExtractor(**FAST))
