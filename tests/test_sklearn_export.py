"""scikit-learn heads exported as plain Keras models give sklearn's own probabilities."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import make_classification
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from featcache import FeatcacheError
from featcache.heads import sklearn_model
from featcache.sklearn_export import keras_model

TRAIN_ROWS = 90


def features(n_classes: int, shape: tuple[int, ...], imbalanced: bool = False, rows: int = 120):
    """Separable-ish rows shaped like cached features: uneven scales, offsets, one constant feature.

    Offsets are a few standard deviations, as for ReLU features, so folding the scaler matters;
    the constant feature is where StandardScaler's scale_ is 1.
    """
    weights = np.geomspace(4, 1, n_classes) / np.geomspace(4, 1, n_classes).sum() if imbalanced else None
    x, y = make_classification(n_samples=rows, n_features=int(np.prod(shape)), n_informative=6,
                               n_redundant=2, n_classes=n_classes, n_clusters_per_class=1, weights=weights,
                               random_state=n_classes)
    rng = np.random.default_rng(n_classes)
    scale = rng.uniform(0.5, 5.0, x.shape[1])
    x = x * scale + scale * rng.uniform(0.0, 3.0, x.shape[1])
    x[:, 0] = 3.0
    return x.astype(np.float32).reshape(rows, *shape), y


def fitted(name: str, x: np.ndarray, y: np.ndarray, class_weight=None):
    """A head fitted exactly as featcache fits one, on the first TRAIN_ROWS rows."""
    flat = x.reshape(len(x), -1)
    return sklearn_model(name, 0.1, seed=0, class_weight=class_weight).fit(flat[:TRAIN_ROWS], y[:TRAIN_ROWS])


@pytest.mark.parametrize(
    "name, n_classes, shape, class_weight",
    [
        ("logreg", 2, (2, 2, 4), None),
        ("logreg", 4, (24,), None),
        ("logreg", 4, (2, 2, 4), "balanced"),
        ("svm", 2, (2, 2, 4), None),
        ("svm", 4, (2, 2, 4), None),
        ("svm", 4, (3, 4), "balanced"),
    ],
)
def test_exported_head_matches_predict_proba(name, n_classes, shape, class_weight):
    x, y = features(n_classes, shape, imbalanced=class_weight is not None)
    pipeline = fitted(name, x, y, class_weight)
    expected = pipeline.predict_proba(x.reshape(len(x), -1))  # training and unseen rows

    got = np.asarray(keras_model(pipeline, shape)(x), dtype=np.float64)

    assert got.shape == (len(x), n_classes)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


LOAD_WITHOUT_FEATCACHE = """
import sys
sys.modules["featcache"] = None  # importing featcache now fails: the files must not need it
import keras
import numpy as np
folder = sys.argv[1]
for stem in sys.argv[2:]:
    model = keras.saving.load_model(f"{folder}/{stem}.keras", safe_mode=True)
    got = np.asarray(model(np.load(f"{folder}/{stem}_x.npy")), dtype=np.float64)
    np.testing.assert_allclose(got, np.load(f"{folder}/{stem}_expected.npy"), atol=1e-5, rtol=0)
    print(stem, float(np.abs(got - np.load(f"{folder}/{stem}_expected.npy")).max()))
"""


def test_exported_model_loads_in_plain_keras_without_featcache(tmp_path):
    shape = (2, 2, 4)
    stems = []
    for name, n_classes in (("logreg", 2), ("svm", 4), ("svm", 2)):
        x, y = features(n_classes, shape)
        pipeline = fitted(name, x, y)
        stem = f"{name}_{n_classes}"
        keras_model(pipeline, shape, name=f"head_{name}").save(tmp_path / f"{stem}.keras")
        np.save(tmp_path / f"{stem}_x.npy", x)
        np.save(tmp_path / f"{stem}_expected.npy", pipeline.predict_proba(x.reshape(len(x), -1)))
        stems.append(stem)

    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FEATCACHE, str(tmp_path), *stems],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[::2] == stems


def test_rbf_svm_is_refused_with_the_reason():
    x, y = features(2, (12,))
    with pytest.raises(FeatcacheError, match="RBF-kernel SVM has no exact Keras layer equivalent"):
        keras_model(fitted("svm-rbf", x, y), (12,))


def test_isotonic_calibration_is_refused_with_the_reason():
    x, y = features(2, (12,))
    pipeline = make_pipeline(StandardScaler(), CalibratedClassifierCV(LinearSVC(), method="isotonic", cv=3))
    pipeline.fit(x, y)
    with pytest.raises(FeatcacheError, match="isotonic calibration has no exact Keras layer equivalent"):
        keras_model(pipeline, (12,))


def test_feature_shape_of_another_cache_is_refused():
    x, y = features(2, (2, 2, 4))
    with pytest.raises(FeatcacheError, match="fitted on 16 features but feature_shape \\(4, 4, 4\\)"):
        keras_model(fitted("logreg", x, y), (4, 4, 4))
