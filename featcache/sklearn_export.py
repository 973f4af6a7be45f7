"""scikit-learn heads as plain Keras models, for exports that must load anywhere.

An exported end-to-end model is loaded with ``keras.saving.load_model(path, safe_mode=True)`` by
people who have neither featcache nor a reason to unpickle a joblib file, so it may hold built-in
Keras layers only: no Lambda, no custom layer. The linear heads fit that exactly. The
StandardScaler folds into the first Dense layer; logistic regression is one softmax; Platt's
sigmoid calibration of a linear SVM is a softplus, a softmax and a mean over the calibration folds
(see ``_calibrated_linear``). The heads fitted by streamed SGD are linear too: log-loss SGD is a
sigmoid (two classes) or normalised one-vs-rest sigmoids, and the hinge SGD of a streamed svm is
Platt-calibrated like a LinearSVC. An RBF SVM or an isotonic calibration has no such form and is
refused rather than approximated.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from featcache import FeatcacheError

# Classifiers whose decision function is exactly features @ coef_.T + intercept_.
LINEAR_CLASSIFIERS = (LinearSVC, LogisticRegression, SGDClassifier)
PREDICT = "use `featcache predict`, which runs any head"
INSTEAD = f"export a Keras head, logreg or svm instead, or {PREDICT}"


@dataclass(frozen=True)
class Standardisation:
    """The scaler's (x - mean) / scale, to be folded into the Dense layer that follows it."""

    mean: np.ndarray
    scale: np.ndarray

    def fold(self, kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kernel, bias) acting on raw features as the given ones act on standardised features."""
        kernel = kernel / self.scale[:, None]
        return kernel, bias - self.mean @ kernel


def keras_model(pipeline, feature_shape: tuple[int, ...], name: str = "head") -> keras.Model:
    """A Keras model from features of ``feature_shape`` to the pipeline's (N, n_classes) probabilities.

    ``pipeline`` is a fitted head as ``heads.sklearn_model`` or ``streaming.fit_sgd`` builds it (a
    StandardScaler, then a LogisticRegression, a log-loss SGDClassifier or a sigmoid-calibrated
    linear SVM), applied to the flattened features.
    """
    steps = [step for _, step in pipeline.steps] if isinstance(pipeline, Pipeline) else [pipeline]
    *before, classifier = steps
    n_features = int(np.prod(feature_shape))
    fitted_on = getattr(steps[0], "n_features_in_", n_features)
    if fitted_on != n_features:
        raise FeatcacheError(
            f"the head was fitted on {fitted_on} features but feature_shape {tuple(feature_shape)} holds "
            f"{n_features}; export it with the cache it was fitted on"
        )
    build = next((b for kind, b in BUILDERS.items() if isinstance(classifier, kind)), None)
    if build is None:
        raise FeatcacheError(_refusal(classifier))
    standardisation = _standardisation(before, n_features)
    features = keras.Input(tuple(feature_shape), name="features")
    flat = keras.layers.Flatten(name="flatten")(features) if len(feature_shape) > 1 else features
    return keras.Model(features, build(classifier, flat, standardisation), name=name)


def _standardisation(before: list, n_features: int) -> Standardisation:
    """The affine map of the steps before the classifier: nothing, or one StandardScaler."""
    if not before:
        return Standardisation(np.zeros(n_features), np.ones(n_features))
    scaler = before[0]
    if len(before) > 1 or not isinstance(scaler, StandardScaler):
        names = ", ".join(type(step).__name__ for step in before)
        raise FeatcacheError(
            f"pipeline steps {names} before the classifier have no Keras export: only one StandardScaler "
            f"may precede it; {INSTEAD}"
        )
    mean = scaler.mean_ if scaler.with_mean else np.zeros(n_features)
    scale = scaler.scale_ if scaler.with_std else np.ones(n_features)  # already 1 where variance is 0
    return Standardisation(np.asarray(mean, np.float64), np.asarray(scale, np.float64))


def _logistic_regression(classifier: LogisticRegression, x, standardisation: Standardisation):
    """Two classes: [1 - σ(z), σ(z)] == softmax([0, z]); more: softmax(z), as multinomial lbfgs fits."""
    kernel, bias = _linear_scores(classifier)
    if kernel.shape[1] == 1:
        kernel = np.hstack([np.zeros_like(kernel), kernel])
        bias = np.concatenate([[0.0], bias])
    return _dense(x, *standardisation.fold(kernel, bias), name="probabilities", activation="softmax")


def _log_loss_sgd(classifier: SGDClassifier, x, standardisation: Standardisation):
    """Two classes: σ(z) as logistic regression. More: sklearn's one-vs-rest σ(z_k) / Σ σ(z_j), which
    is softmax(log σ(z)) == softmax(-softplus(-z)): a Dense computing -z, softplus, a Dense with
    kernel -I and a softmax."""
    if classifier.loss != "log_loss":
        raise FeatcacheError(
            f"an SGDClassifier with {classifier.loss!r} loss gives no probabilities; calibrate it "
            f"(featcache's streamed svm does) or {PREDICT}"
        )
    kernel, bias = _linear_scores(classifier)
    if kernel.shape[1] == 1:
        return _logistic_regression(classifier, x, standardisation)
    kernel, bias = standardisation.fold(-kernel, -bias)
    minus_scores = _dense(x, kernel, bias, name="minus_scores")
    minus_log_p = keras.layers.Activation("softplus", name="minus_log_sigmoid")(minus_scores)
    return _dense(minus_log_p, -np.eye(kernel.shape[1]), None, name="probabilities", activation="softmax")


def _calibrated_linear(calibrated: CalibratedClassifierCV, x, standardisation: Standardisation):
    """The mean over calibration folds of Platt-calibrated linear scores, as sklearn's predict_proba.

    Fold k scores u = a·f + b per class from its decision function f and sigmoid calibrator (a, b),
    and sklearn takes p = σ(-u). Two classes (one calibrator): [1 - p, p] == softmax([0, -u]). More
    classes: p / Σp == softmax(log σ(-u)) == softmax(-softplus(u)), i.e. softplus, then a Dense with
    kernel -I and a softmax. One Dense computes every fold's u at once.
    """
    classes = calibrated.classes_
    binary = len(classes) == 2
    kernels, biases = [], []
    for index, fold in enumerate(calibrated.calibrated_classifiers_):
        _check_fold(fold, classes, index)
        kernel, bias = _linear_scores(_unfrozen(fold.estimator))
        slope = np.array([calibrator.a_ for calibrator in fold.calibrators], np.float64)
        offset = np.array([calibrator.b_ for calibrator in fold.calibrators], np.float64)
        kernel, bias = kernel * slope, bias * slope + offset
        if binary:
            kernel, bias = np.hstack([np.zeros_like(kernel), -kernel]), np.concatenate([[0.0], -bias])
        kernels.append(kernel)
        biases.append(bias)
    kernel, bias = standardisation.fold(np.hstack(kernels), np.concatenate(biases))
    scores = _dense(x, kernel, bias, name="fold_scores")
    per_fold = (len(kernels), len(classes))
    if binary:
        scores = keras.layers.Reshape(per_fold, name="fold_logits")(scores)
        calibrated_folds = keras.layers.Activation("softmax", name="calibrated")(scores)
    else:
        minus_log_p = keras.layers.Activation("softplus", name="minus_log_sigmoid")(scores)
        minus_log_p = keras.layers.Reshape(per_fold, name="fold_minus_log_sigmoid")(minus_log_p)
        calibrated_folds = _dense(minus_log_p, -np.eye(len(classes)), None, name="calibrated",
                                  activation="softmax")
    return keras.layers.GlobalAveragePooling1D(name="probabilities")(calibrated_folds)


def _check_fold(fold, classes: np.ndarray, index: int) -> None:
    """Refuse what the exact construction does not cover, saying why."""
    if fold.method != "sigmoid":
        raise FeatcacheError(
            f"{fold.method} calibration has no exact Keras layer equivalent (Platt's sigmoid has); "
            f"refit with method='sigmoid' (featcache's svm head does), or {PREDICT}"
        )
    estimator = _unfrozen(fold.estimator)
    if not isinstance(estimator, LINEAR_CLASSIFIERS):
        raise FeatcacheError(_refusal(estimator))
    if not np.array_equal(estimator.classes_, classes):
        raise FeatcacheError(
            f"calibration fold {index} saw only classes {list(estimator.classes_)} of {list(classes)}, "
            f"and sklearn gives the others an exact 0 that no softmax can; refit with stratified folds "
            f"(featcache's 3 shuffled stratified folds do)"
        )


def _unfrozen(estimator):
    """The estimator inside a FrozenEstimator (a prefit model calibrated on held-out rows), else itself."""
    return estimator.estimator if isinstance(estimator, FrozenEstimator) else estimator


def _linear_scores(classifier) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (d, k), bias (k,)) in float64 with decision_function(x) == x @ kernel + bias."""
    kernel = np.asarray(classifier.coef_, np.float64).T
    bias = np.broadcast_to(np.asarray(classifier.intercept_, np.float64), kernel.shape[1:])
    return kernel, bias.copy()


def _dense(x, kernel: np.ndarray, bias: np.ndarray | None, name: str, activation=None):
    """A Dense layer holding fixed float32 weights (computed in float64), applied to x."""
    layer = keras.layers.Dense(kernel.shape[1], activation=activation, use_bias=bias is not None, name=name)
    layer.build((None, kernel.shape[0]))
    weights = [kernel] if bias is None else [kernel, bias]
    layer.set_weights([np.asarray(w, np.float32) for w in weights])
    return layer(x)


def _refusal(classifier) -> str:
    what = f"a {type(classifier).__name__}"
    if isinstance(classifier, SVC):
        what = "an RBF-kernel SVM" if classifier.kernel == "rbf" else f"an SVC ({classifier.kernel!r} kernel)"
    return f"{what} has no exact Keras layer equivalent; {INSTEAD}"


BUILDERS = {LogisticRegression: _logistic_regression, SGDClassifier: _log_loss_sgd,
            CalibratedClassifierCV: _calibrated_linear}
