"""Linear heads: logistic regression and a Platt-calibrated linear SVM, stored as plain arrays.

Fast because of an exact change of basis. An L2-penalised linear model's weights lie in the span
of its training rows, so with n rows of d > n features the fit is the same problem on n numbers
per row: from the Cholesky factor of the Gram matrix G = X Xᵀ = L Lᵀ, the rows Z = L and the
orthonormal basis V = Xᵀ L^-ᵀ (X = Z Vᵀ, ‖w‖ = ‖z‖ for w = V z). scikit-learn fits on Z (1,672 x 1,672 instead of
1,672 x 8,192 on elpv) and the weights come back as V z. Every candidate of the search (scaling x C,
C warm-started from small to large) reuses one Gram matrix per scaling. Rows are centred first
(the unpenalised intercept absorbs the mean), which keeps raw ReLU features well conditioned. The
svm goes one step further while the n x n Gram matrix is small (``KERNEL_SVM_ROWS``), with more
features than rows or fewer: libsvm on the Gram matrix itself, one binary SVM per class
(``KernelOvrSvm``), its weights Xᵀ a from the dual coefficients a. The three scalings are searched
side by side, one thread each.

The C grid is relative: C = t / mean ‖x‖², since scaling the features by s changes the optimal C by
1 / s², so the same grid fits standardised, L2-normalised and raw features. Validation accuracy
chooses (ties: lower validation log loss, then the earlier candidate).

A fitted head is arrays only (``model.npz``, read without pickle): the scaling, W (d, k), b (k),
and for the svm Platt's sigmoid (a, b) per score column; predict_proba and the Keras export are a
few lines over them. Over the memory budget the same heads train by SGD on streamed shards
(``sgd.py``) and are stored the same way.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError
from featcache.heads.protocol import Head, class_weight_of, two_columns
from featcache.heads.scaling import CHOICES, Scaling

# C x mean squared row norm, five decades. On elpv each scaling's best was t = 10 or 100 (2026-12-02);
# larger t costs the most solver iterations.
GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
# Up to this many training rows the svm solves on the n x n Gram matrix (libsvm) even with fewer
# features than rows (at most 512 MiB of float64). Fashion-MNIST's 2,400 x 512 pooled rows: liblinear
# took 52 s for the search.
KERNEL_SVM_ROWS = 8192
# lbfgs iterations per candidate: scikit-learn's default. Warm-started from t = 10's solution, elpv's
# rms path took 245 iterations at t = 100 to converge, with the same validation accuracy (72.6%) at 100,
# and the whole search 4.1-4.4 s instead of 5.2-7.8 s (2026-12-03). ``iterations`` in head.json says
# whether the chosen candidate stopped at the cap.
LOGREG_ITERATIONS = 100
SVM_ITERATIONS = 300  # liblinear's dual coordinate descent: enough below C = 100 / mean ‖x‖², slow above


@dataclass(frozen=True)
class LinearModel:
    """p = link(scaling(x) @ W + b): softmax, a sigmoid column, or Platt-calibrated scores."""

    scaling: Scaling
    weights: np.ndarray  # (d, k): k = 1 for two classes, else one column per class
    bias: np.ndarray
    link: str  # "softmax" | "sigmoid" | "ovr-sigmoid" | "platt"
    platt: np.ndarray | None = None  # (2, k): Platt's a and b per score column

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.scaling.apply(x) @ self.weights + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        s = self.scores(x).astype(np.float64)
        if self.link == "platt":
            from scipy.special import expit

            p = expit(-(self.platt[0] * s + self.platt[1]))
            if p.shape[1] == 1:
                return two_columns(p)
            total = p.sum(axis=1, keepdims=True)
            return np.where(total > 0, p / np.where(total > 0, total, 1), 1 / p.shape[1])
        from scipy.special import expit, softmax

        if s.shape[1] == 1:
            return two_columns(expit(s))
        if self.link == "ovr-sigmoid":
            p = expit(s)
            return p / p.sum(axis=1, keepdims=True)

        return softmax(s, axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        extra = {} if self.platt is None else {"platt": self.platt}
        return {"weights": self.weights, "bias": self.bias, **self.scaling.arrays(), **extra}

    @classmethod
    def from_arrays(cls, scaling: str, link: str, arrays) -> LinearModel:
        platt = np.asarray(arrays["platt"]) if "platt" in arrays else None
        return cls(Scaling.from_arrays(scaling, arrays), np.asarray(arrays["weights"]),
                   np.asarray(arrays["bias"]), link, platt)


class SpanBasis:
    """Rows Z with Z Zᵀ = X Xᵀ (X the centred rows), and the map between Z's space and the features'.

    The Cholesky factor L of the Gram matrix gives Z = L and V = Xᵀ L^-ᵀ, never formed:
    Xv V = (Xv Xᵀ) L^-ᵀ and w = Xᵀ (L^-ᵀ z).

    Centred rows sum to zero, so their Gram matrix is singular along the ones vector. Adding
    ``offset`` = s / n to every entry (s the mean diagonal) gives that direction the eigenvalue s: the
    same as appending the constant feature sqrt(s / n) to every row, training and validation alike
    (``project``). An unpenalised intercept does that feature's work for free, so the optimum gives it
    no weight and the fit is unchanged; whatever weight the solver leaves goes into the bias
    (``weights_and_bias``). Before, Cholesky failed twice on elpv and succeeded with a jitter of 1e-3 of
    the diagonal, more than the Gram matrix's second smallest eigenvalue (8e-4). A jitter of 1e-6 (more
    for repeated rows) is still tried; if even 1e-3 fails, and whenever rows are not fewer than
    features, Z is X itself. With ``kernel`` the Gram matrix itself is kept (a kernel SVM's input) and
    not factored."""

    def __init__(self, x: np.ndarray, *, kernel: bool = False):
        # Centred rows: with an unpenalised intercept, w·(x - m) + b' is the same model as w·x + b
        # (b = b' - w·m), and without the mean direction, which dominates raw ReLU features, the
        # solver converges in a fraction of the iterations.
        self.mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        x = x - self.mean
        self.x, self.factor, self.z, self.gram, self.offset = None, None, x, None, 0.0
        # the centred rows' mean squared norm, which the relative C grid divides by
        self.mean_square = max(float(np.mean(np.einsum("ij,ij->i", x, x, dtype=np.float64))), 1e-12)
        if kernel or len(x) < x.shape[1]:
            from scipy.linalg import LinAlgError, cholesky

            gram = (x @ x.T).astype(np.float64)
            if kernel:
                self.x, self.gram = x, gram
                return
            diagonal, added = np.diag_indices_from(gram), 0.0
            scale = max(float(np.trace(gram)) / len(gram), 1e-12)
            self.offset = scale / len(gram)
            gram += self.offset
            for jitter in (1e-6, 1e-5, 1e-3):  # float32 rounding, repeated rows (views, copies) need more
                gram[diagonal] += jitter * scale - added
                added = jitter * scale
                try:
                    with single_threaded():
                        self.factor = cholesky(gram, lower=True, overwrite_a=False, check_finite=False)
                    break
                except LinAlgError:
                    continue
            else:
                self.factor, self.offset = None, 0.0
                return
            self.x, self.z = x, self.factor.astype(np.float32)

    def bias(self, intercept: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The intercept on uncentred rows: b = b' - m·w."""
        return (np.asarray(intercept, np.float64) - self.mean.astype(np.float64) @ weights).astype(np.float32)

    def cross(self, x: np.ndarray) -> np.ndarray:
        """Inner products of centred rows ``x`` with the training rows: a kernel SVM's input."""
        return ((np.asarray(x, np.float32) - self.mean) @ self.x.T).astype(np.float64)

    def project(self, x: np.ndarray) -> np.ndarray:
        if self.factor is None:
            return np.asarray(x, np.float32) - self.mean
        from scipy.linalg import solve_triangular

        return solve_triangular(self.factor, (self.cross(x) + self.offset).T, lower=True).T.astype(np.float32)

    def weights_and_bias(self, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(d, k) weights and (k,) bias on the uncentred rows from scikit-learn's (k, r) coef_ and (k,)
        intercept_ in the reduced basis: w = Xᵀ a with a = L^-ᵀ z, and the constant feature's part of the
        scores, offset 1ᵀ a, added to the intercept."""
        coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
        if self.factor is None:
            weights = coef.T.astype(np.float32)
            return weights, self.bias(intercept, weights)
        from scipy.linalg import solve_triangular

        dual = solve_triangular(self.factor.T, coef.T, lower=False)
        weights = self.lift_dual(dual.astype(np.float32))
        return weights, self.bias(intercept + self.offset * dual.sum(axis=0), weights)

    def lift_dual(self, dual: np.ndarray) -> np.ndarray:
        """(d, k) weights w = Xᵀ a from (n, k) coefficients a of the training rows."""
        return (self.x.T @ np.asarray(dual, np.float32)).astype(np.float32)


@dataclass(frozen=True)
class Candidate:
    """One point of the search: an estimator fitted at one scaling and C, and its validation score."""

    kind: str
    c: float
    estimator: object
    score: tuple[float, float] | None  # (accuracy, minus log loss) on validation
    basis: SpanBasis
    scaling: Scaling
    kernel: bool  # fitted on the Gram matrix

    @property
    def key(self) -> str:
        return f"{self.kind} C={self.c:.3g}"


class KernelOvrSvm:
    """One-vs-rest linear SVMs on a precomputed Gram matrix, by libsvm (scikit-learn's SVC), in
    scikit-learn's estimator form so that CalibratedClassifierCV splits the matrix by rows and
    columns. On 1,672 elpv rows each C took 0.05-0.2 s where liblinear's LinearSVC on the same rows
    took 0.3-16 s; libsvm leaves the intercept unpenalised, as logistic regression does. The weights
    in feature space are w = Xᵀ a from the dual coefficients a (``dual``)."""

    _estimator_type = "classifier"

    def __init__(self, C: float = 1.0):
        self.C = C

    def get_params(self, deep: bool = True) -> dict:
        return {"C": self.C}

    def set_params(self, **params) -> KernelOvrSvm:
        self.C = params.pop("C", self.C)
        return self

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags(), input_tags=InputTags(pairwise=True))

    def fit(self, gram: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> KernelOvrSvm:
        from sklearn.svm import SVC

        self.classes_ = np.unique(y)
        positives = self.classes_[1:] if len(self.classes_) == 2 else self.classes_
        self.estimators_ = [SVC(kernel="precomputed", C=self.C).fit(gram, (y == k).astype(int),
                                                                     sample_weight=sample_weight) for k in positives]
        return self

    def decision_function(self, gram: np.ndarray) -> np.ndarray:
        scores = np.column_stack([e.decision_function(gram) for e in self.estimators_])
        return scores[:, 0] if len(self.estimators_) == 1 else scores

    def predict(self, gram: np.ndarray) -> np.ndarray:
        scores = self.decision_function(gram)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)]

    def dual(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(n_rows, k) coefficients a of the training rows and (k,) intercepts: scores = K a + b."""
        coefficients = np.zeros((n_rows, len(self.estimators_)))
        for column, estimator in enumerate(self.estimators_):
            coefficients[estimator.support_, column] = estimator.dual_coef_[0]
        return coefficients, np.array([e.intercept_[0] for e in self.estimators_])


class LinearHead(Head):
    """logreg or svm; ``choices`` pins scaling and C (cross-validation folds, a user's grid of one)."""

    kind = "linear"

    def __init__(self, name: str, options, *, loss: str, choices: dict | None = None):
        super().__init__(name, options)
        self.loss = loss  # "log_loss" (logreg) or "hinge" (svm)
        self.choices = choices
        self.model: LinearModel | None = None

    @classmethod
    def restore(cls, name, options, record):
        return cls(name, options, loss=record["loss"])

    # --- fitting in memory --------------------------------------------------------------------------

    def fit(self, x, y, *, n_classes, validation=None, say=None):
        """Every scaling's C path, on as many threads as cores (each solver on one BLAS thread: on
        problems this small two threads per solver wait more than they compute); the most accurate
        candidate on validation wins (ties: lower validation log loss, then the earlier)."""
        say = say or (lambda message: None)
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        y = np.asarray(y)
        if self.choices:
            scalings, grid = [self.choices["scaling"]], [self.choices["C"]]
        else:
            auto = self.options.scaling == "auto"
            scalings, grid = (list(CHOICES) if auto else [self.options.scaling]), None
        if validation is None and (len(scalings) > 1 or grid is None):
            raise FeatcacheError(f"{self.name}: choosing scaling and C needs validation rows")
        from sklearn.exceptions import ConvergenceWarning

        threads = min(len(scalings), os.cpu_count() or 1)
        lock, chosen, scores = threading.Lock(), [], {}

        def search(kind):
            """A path, and its best candidate kept only while it leads: a loser's basis (a copy of the
            rows) is freed as soon as it loses. Ties: the earlier scaling of CHOICES."""
            kind, path_scores, candidate, seconds = self._search(kind, x, y, n_classes, grid, validation)
            with lock:
                leader = chosen[0] if chosen else None
                if leader is None or candidate.score is None or (candidate.score, -scalings.index(kind)) > (
                        leader.score, -scalings.index(leader.kind)):
                    chosen[:] = [candidate]
            return kind, path_scores, seconds

        # warnings' filters are process-wide: set once here, not in the threads
        with warnings.catch_warnings(), single_threaded(), ThreadPoolExecutor(threads) as pool:
            warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear's iteration cap is on purpose
            # raw features take the solver the most iterations: started first, they end with the other two
            for path in as_completed([pool.submit(search, kind)
                                      for kind in sorted(scalings, key=lambda kind: kind not in ("rms", "none"))]):
                kind, scores[kind], seconds = path.result()
                say(f"{self.name} {kind}: val accuracy " + ", ".join(f"{v:.1%}" for v in scores[kind].values())
                    + f" ({seconds:.1f} s)")
        scores = {key: value for kind in scalings for key, value in scores[kind].items()}
        (best,) = chosen
        estimator = self._final(best, y, n_classes)
        self.model = _linear_model(estimator, best.basis, best.scaling)
        solver = "kernel" if best.kernel else ("span" if best.basis.factor is not None else "primal")
        self.record.update(chosen={"scaling": best.kind, "C": float(best.c)}, validation_accuracy=scores,
                           output="proba", solver=solver)
        if hasattr(estimator, "n_iter_"):
            self.record["iterations"] = int(np.max(estimator.n_iter_))
        return self

    def _search(self, kind, x, y, n_classes, grid, validation) -> tuple[str, dict, Candidate, float]:
        """One scaling's C path scored on validation: its validation accuracies, its best candidate
        (the first of equals; without validation, the one candidate) and its seconds."""
        started = time.perf_counter()
        scaling = Scaling.fit(kind, x)
        # a linear SVM solves fastest as a kernel SVM on the Gram matrix, while that matrix is small
        kernel = self.loss == "hinge" and (len(x) < x.shape[1] or len(x) <= KERNEL_SVM_ROWS)
        basis = SpanBasis(scaling.apply(x), kernel=kernel)
        cs = grid or [t / basis.mean_square for t in GRID]
        xv = None if validation is None else scaling.apply(validation[0])
        xv = None if xv is None else (basis.cross(xv) if kernel else basis.project(xv))
        best, scores = None, {}
        for c, estimator in self._path(basis.gram if kernel else basis.z, y, cs, n_classes, kernel):
            candidate = Candidate(kind, c, estimator, None if xv is None else
                                  _score(estimator, xv, validation[1]), basis, scaling, kernel)
            if candidate.score is not None:
                scores[candidate.key] = candidate.score[0]
            if best is None or candidate.score is None or candidate.score > best.score:
                best = candidate
        return kind, scores, best, time.perf_counter() - started

    def _path(self, rows, y, cs, n_classes, kernel):
        """Estimators fitted along ascending C; logistic regression warm-starts each from the previous
        (at scikit-learn's default tolerance: 1e-3 took a third fewer iterations on elpv, but left
        probabilities up to 0.13 from the converged model's at the C it chose)."""
        from sklearn.linear_model import LogisticRegression

        weights = class_weight_of(y, n_classes, self.options.class_weight)
        if self.loss == "log_loss":
            estimator = LogisticRegression(max_iter=LOGREG_ITERATIONS, warm_start=True,
                                           class_weight=weights, random_state=self.options.seed)
        for c in sorted(cs):
            if self.loss == "log_loss":
                estimator.set_params(C=c).fit(rows, y)
                yield c, _snapshot(estimator)
            else:
                yield c, self._svm(c, kernel).fit(
                    rows, y, sample_weight=sample_weights(y, n_classes, self.options.class_weight))

    def _svm(self, c, kernel):
        """One-vs-rest linear SVMs: libsvm on the Gram matrix (fewer rows than features), else liblinear."""
        from sklearn.svm import LinearSVC

        if kernel:
            return KernelOvrSvm(C=c)
        return LinearSVC(C=c, dual="auto", max_iter=SVM_ITERATIONS, random_state=self.options.seed)

    def _final(self, best: Candidate, y, n_classes):
        """The winner as stored: logistic regression as validation scored it; the svm refitted under
        Platt's calibration."""
        if self.loss == "log_loss":
            return best.estimator
        from sklearn.exceptions import ConvergenceWarning

        rows = best.basis.gram if best.kernel else best.basis.z
        with warnings.catch_warnings(), single_threaded():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._calibrated(rows, y, best.c, best.kernel, n_classes)

    def _calibrated(self, rows, y, c, kernel, n_classes):
        """Platt's sigmoid on held-out decision values of shuffled stratified folds, then one SVM on
        every row. Class weights weight the sigmoid's fit as well as the SVM's, or calibration would
        undo them (shuffled: cache rows are sorted by path, and unshuffled folds of neighbouring
        files, whole elpv modules, calibrate nothing). A Gram matrix is split by rows and columns."""
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.model_selection import StratifiedKFold

        folds = calibration_folds(y, n_classes, self.name)
        cv = StratifiedKFold(folds, shuffle=True, random_state=self.options.seed)
        weights = sample_weights(y, n_classes, self.options.class_weight)
        return CalibratedClassifierCV(self._svm(c, kernel), cv=cv, ensemble=False).fit(
            rows, y, sample_weight=weights)

    # --- fitting from streamed shards ---------------------------------------------------------------

    def fit_streamed(self, cache, plan, *, rows=None, say=None):
        from featcache.heads import sgd

        kind = (self.choices or {}).get("scaling") or self.options.scaling
        kind = "standard" if kind == "auto" else kind  # SGD needs comparable feature scales
        cs = [self.choices["C"]] if self.choices else None
        scaling, estimator, details = sgd.fit_sgd(cache, self.name, self.loss, kind, cs, self.options, plan,
                                                  say or (lambda message: None), rows)
        self.model = _linear_model(estimator, None, scaling)
        self.record.update(details, chosen={"scaling": kind, **details["chosen"]}, output="proba")
        return self

    # --- using it -----------------------------------------------------------------------------------

    def predict_proba(self, features):
        return self.model.predict_proba(features)

    def for_fold(self):
        return LinearHead(self.name, self.options, loss=self.loss,
                          choices={k: self.record["chosen"][k] for k in ("scaling", "C")})

    def to_keras(self, feature_shape):
        from featcache.heads.export import linear_keras_model

        return linear_keras_model(self.model, feature_shape, name=f"head_{self.name}")

    def _write(self, folder):
        np.savez(folder / "model.npz", **self.model.arrays())
        self.record.update(link=self.model.link, scaling=self.model.scaling.kind, loss=self.loss)
        return ["model.npz"]

    def _read(self, folder):
        with np.load(folder / "model.npz", allow_pickle=False) as arrays:
            self.model = LinearModel.from_arrays(self.record["scaling"], self.record["link"], arrays)


def calibration_folds(y: np.ndarray, n_classes: int, name: str) -> int:
    """Folds for Platt's cross-validated calibration: 3, or fewer when a class has fewer training rows;
    refused in one line when a class has only one (it cannot be both held out and trained on)."""
    smallest = int(np.bincount(np.asarray(y, int), minlength=n_classes).min())
    if smallest < 2:
        raise FeatcacheError(
            f"{name} calibrates its probabilities on held-out folds, and a class has {smallest} training "
            "row(s); give every class at least 2 training images, or fit logreg"
        )
    return min(3, smallest)


def single_threaded():
    """BLAS and OpenMP held to one thread while scikit-learn solves the reduced problem: on problems
    this small, two threads spend more time waiting for each other than computing, and on a busy
    machine far more (measured 10-30x slower per logistic-regression fit with two threads on two
    loaded cores). The Gram matrices, the large products, keep every thread."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def sample_weights(y: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray | None:
    """Per-row weights from the class weights (None: unweighted)."""
    weights = class_weight_of(y, n_classes, class_weight)
    return None if weights is None else np.array([weights[int(label)] for label in y])


def _snapshot(estimator):
    """The coefficients of a warm-started estimator at this C (the next fit overwrites them)."""
    import copy

    return copy.deepcopy(estimator)


def _score(estimator, x_val, y_val) -> tuple[float, float]:
    """(validation accuracy, minus log loss when the estimator has probabilities)."""
    accuracy = float((estimator.predict(x_val) == y_val).mean())
    if not hasattr(estimator, "predict_proba"):
        return accuracy, 0.0
    from sklearn.metrics import log_loss

    p = np.clip(estimator.predict_proba(x_val), 1e-7, 1)
    return accuracy, -float(log_loss(y_val, p / p.sum(axis=1, keepdims=True), labels=estimator.classes_))


def _linear_model(estimator, basis: SpanBasis | None, scaling: Scaling) -> LinearModel:
    """Arrays of a fitted LogisticRegression, log-loss SGDClassifier or calibrated linear SVM, in
    the original feature space. A multi-class SGDClassifier is one-vs-rest: normalised sigmoids."""
    if hasattr(estimator, "calibrated_classifiers_"):
        (fold,) = estimator.calibrated_classifiers_
        svm = getattr(fold.estimator, "estimator", fold.estimator)  # a FrozenEstimator's inner model
        platt = np.array([[c.a_ for c in fold.calibrators], [c.b_ for c in fold.calibrators]], np.float64)
        return LinearModel(scaling, *_weights(svm, basis), "platt", platt)
    if estimator.coef_.shape[0] == 1:
        link = "sigmoid"
    else:
        link = "ovr-sigmoid" if type(estimator).__name__ == "SGDClassifier" else "softmax"
    return LinearModel(scaling, *_weights(estimator, basis), link)


def _weights(estimator, basis: SpanBasis | None) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) on the scaled features from an estimator fitted in the basis (or on them, without one)."""
    _check_all_classes(estimator)
    if isinstance(estimator, KernelOvrSvm):
        dual, intercept = estimator.dual(len(basis.x))
        weights = basis.lift_dual(dual)
        return weights, basis.bias(intercept, weights)
    if basis is None:
        return np.asarray(estimator.coef_, np.float32).T, np.asarray(estimator.intercept_, np.float32)
    return basis.weights_and_bias(estimator.coef_, estimator.intercept_)


def _check_all_classes(estimator) -> None:
    if not np.array_equal(estimator.classes_, np.arange(len(estimator.classes_))):
        raise FeatcacheError(
            f"the training rows hold only classes {list(estimator.classes_)}; every class needs training rows"
        )
