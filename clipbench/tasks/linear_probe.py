"""Linear-probe evaluation with the CLIP paper's protocol (Appendix A.3), and few-shot probes.

Features in, metrics out: nothing here loads a model or a dataset.

Protocol (the paper's): L2-regularized logistic regression fit by L-BFGS with at most 1,000
iterations (scikit-learn ``LogisticRegression(C=C, max_iter=1000)``, default ``tol=1e-4``); the
inverse L2 strength ``C`` is chosen on a validation split by :func:`c_sweep` (a parametric binary
search over 1e-6 ... 1e6 down to 1/8 decade); the final model is refit on train + validation with
the chosen ``C`` and scored on the test split.

Choices this module makes, where the paper says nothing:

* No feature standardization: the paper mentions none, so features go to the solver as given.
* Features are converted to float64 before fitting: the 1e-4 gradient tolerance is close to float32
  resolution for large sums, and float64 makes the fit independent of the caller's dtype.
  The torch solver instead gets each split once as a tensor on its device in its compute dtype
  (float64 on CPU, float32 on a GPU), copied in blocks of rows (:func:`torch_logreg.to_device`):
  memory-mapped features (ImageNet-train's 1.28 M x 768) reach the GPU without a float64 copy in
  host memory, and every fit and score of the sweep reuses the tensors.
* The validation score that selects ``C`` is the dataset's primary metric (accuracy, mean per-class
  recall, 11-point mAP, ROC AUC, ...), computed on decision scores.
* Multi-label datasets (VOC2007): one binary logistic regression per class (one-vs-rest), all with
  the same ``C``; a class whose training column is constant gets constant score 0.
* Warm starts: the 7 initial decade points start from zero and run in parallel (``n_jobs``
  threads, scikit-learn solver only); every later sweep point starts from the solution at the
  best ``C`` found so far (a function of the scores, not of the order fits finish), and the final
  refit on train + validation starts from the sweep's solution at the chosen ``C``.

Determinism guaranteed (scikit-learn solver): for the same features, labels and settings, on one
machine and one installation (numpy, scipy, scikit-learn and their BLAS), the chosen ``C``, every
sweep score, every fit's iteration count and the test decision scores are bit-identical whatever
``n_jobs`` and however many BLAS/OpenMP threads the process has. How: every fit and every scoring
product runs with BLAS and OpenMP limited to one thread (``threadpoolctl``), held by the calling
thread around the whole sweep, so the sweep's worker threads run under it too. A multi-threaded
BLAS splits the sums of ``X.T @ G`` differently per thread count; the last-bit differences change
the iterate at which L-BFGS meets ``tol=1e-4`` (far from the optimum at weak regularization),
which moved test predictions (one dataset: 413, 416 and 412 of 540 correct for 2 jobs, 1 job,
1 job with one BLAS thread). The price is single-threaded BLAS inside each fit: parallelism comes
from ``n_jobs`` (sweep threads) only. Not guaranteed: equality across
machines or library builds (another CPU's BLAS kernels round differently), nor for
``solver="torch"`` (torch's own thread pool and GPU kernels choose their reduction order).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from clipbench import sidecars
from clipbench.metrics import classification_metrics, compute_metric
from clipbench.tasks import torch_logreg
from clipbench.tasks.base import TaskInputs, TaskNeeds, TaskOutput

log = logging.getLogger(__name__)

SOLVERS = ("sklearn", "torch")

#: Default fraction of the training set carved out as validation when a dataset has no val split.
DEFAULT_VAL_FRACTION = 0.2

# The sweep works on integer exponents in units of 1/8 decade: C = 10 ** (k / 8).
_STEPS_PER_DECADE = 8
_K_MIN, _K_MAX = -6 * _STEPS_PER_DECADE, 6 * _STEPS_PER_DECADE
_INITIAL_STEP = 2 * _STEPS_PER_DECADE  # the 7 start points are 2 decades apart
_TOL = 1e-4  # scikit-learn's default tolerance, which the paper's probes used


def _c_value(k: int) -> float:
    return float(10.0 ** (k / _STEPS_PER_DECADE))


def _best(scores: dict[int, float]) -> int:
    """The exponent with the highest score; ties go to the smallest C (strongest regularization)."""
    return max(sorted(scores), key=lambda k: scores[k])  # max() keeps the first of equal maxima


def _parametric_search(evaluate: Callable[[list[int], int | None], list[float]]) -> tuple[int, dict[int, float]]:
    """The search of :func:`c_sweep` on exponents ``k`` (C = 10 ** (k / 8)).

    Args:
        evaluate: ``evaluate(ks, best_k)`` returns the validation scores of the new exponents ``ks``
            (in order); ``best_k`` is the best exponent so far (None for the initial points).

    Returns:
        The chosen exponent and every evaluated exponent's score.
    """
    scores: dict[int, float] = {}

    def run(ks: list[int]) -> None:
        best_k = _best(scores) if scores else None
        for k, score in zip(ks, evaluate(ks, best_k)):
            score = float(score)
            scores[k] = -math.inf if math.isnan(score) else score

    run(list(range(_K_MIN, _K_MAX + 1, _INITIAL_STEP)))
    step = _INITIAL_STEP
    while step > 1:
        step //= 2
        center = _best(scores)
        run([k for k in (center - step, center + step) if _K_MIN <= k <= _K_MAX and k not in scores])
    return _best(scores), scores


def c_sweep(fit_score: Callable[[float], float], *, n_jobs: int | None = None) -> tuple[float, dict[float, float]]:
    """Choose the inverse L2 strength C by the CLIP paper's parametric binary search.

    The search, exactly (all positions in log10 C, range [-6, 6]):

    1. Evaluate the 7 points -6, -4, -2, 0, 2, 4, 6 (C = 1e-6, 1e-4, ..., 1e6).
    2. Set step = 2 decades. Repeat while step > 1/8 decade: halve the step; let b be the best
       point evaluated so far; evaluate b - step and b + step (those inside [-6, 6] and not yet
       evaluated).
    3. Return the best point evaluated.

    "Best" is the highest score; ties go to the smallest C (the strongest regularization); a NaN
    score counts as -inf. The refinement steps are 1, 1/2, 1/4 and 1/8 decade, so the result lies
    on the paper's grid of 8 steps per decade (96 steps over 1e-6 ... 1e6) and the search costs at
    most 7 + 4 * 2 = 15 evaluations; no C is evaluated twice. C values are ``10 ** (k / 8)`` for
    integer k, so the same point always has the same float value.

    Args:
        fit_score: maps C to a validation score (higher is better), e.g. fit a classifier with C
            and return its validation accuracy. Must be deterministic.
        n_jobs: threads for the independent evaluations (the 7 initial points, then each pair of
            midpoints); None or 1 evaluates one at a time. ``fit_score`` must be thread-safe.

    Returns:
        ``(C, sweep)``: the chosen C and ``{C: score}`` for every evaluated C, in evaluation order.
    """
    def evaluate(ks: list[int], _best_k: int | None) -> list[float]:
        return Parallel(n_jobs=n_jobs, backend="threading")(delayed(fit_score)(_c_value(k)) for k in ks)

    best_k, scores = _parametric_search(evaluate)
    return _c_value(best_k), {_c_value(k): s for k, s in scores.items()}


def stratified_val_split(
    targets: np.ndarray, fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of a training set into train and validation parts.

    Each class c with n_c samples sends ``round(fraction * n_c)`` of them, drawn by a seeded
    permutation, to validation, clipped so that a class with at least 2 samples keeps at least one
    sample on each side (a class with 1 sample stays in train). Multi-label targets ((N, C) 0/1)
    get a plain seeded random split of ``round(fraction * N)`` samples.

    Args:
        targets: (N,) integer labels, or (N, C) 0/1 for multi-label.
        fraction: validation fraction in (0, 1); the default 0.2 is used when a dataset spec
            gives no ``val_fraction``.
        seed: seed of ``np.random.default_rng``; the same (targets, fraction, seed) always gives
            the same split.

    Returns:
        ``(train_idx, val_idx)``: sorted int64 index arrays, disjoint, covering ``range(N)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"val_fraction must be in (0, 1), got {fraction}; 0.2 keeps 80% of train for fitting."
        )
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    n = targets.shape[0]
    if targets.ndim == 2:
        val = rng.permutation(n)[: int(round(fraction * n))]
    else:
        val_parts = []
        for c in np.unique(targets):
            members = np.flatnonzero(targets == c)
            n_val = min(max(int(round(fraction * members.size)), 1), members.size - 1)
            val_parts.append(rng.permutation(members)[:n_val])
        val = np.concatenate(val_parts)
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def sample_few_shot(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Class-balanced sample of exactly ``k`` samples per class.

    For each class (in increasing label order) the class's indices are permuted by
    ``np.random.default_rng(seed)`` and the first k are taken. The permutations do not depend on
    k, so for one seed the sets are nested (the 1-shot set is inside the 2-shot set, ...).

    Args:
        targets: (N,) integer labels of the pool to sample from.
        k: samples per class, >= 1.
        seed: sampling seed.

    Returns:
        Sorted int64 indices into ``targets``, ``k`` per distinct label.
    """
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise ValueError(
            "few-shot sampling needs single-label targets (N,); k samples per class is not defined "
            "for multi-label datasets."
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        if members.size < k:
            raise ValueError(
                f"few-shot k={k} needs {k} training samples of every class, but class {c} has "
                f"{members.size} in the pool it is drawn from (train minus validation). Use "
                "smaller ks."
            )
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------------------------
# one probe: fitted linear models and their scores


@dataclass(frozen=True)
class _Linear:
    """A fitted linear classifier in scikit-learn's parameterization.

    ``coef`` (R, D), ``intercept`` (R,), ``classes`` (R,) or (2,): single-label K >= 3 classes: one
    row per class in ``classes``; binary: one row, the logit of ``classes[1]``; multi-label: one
    binary row per label column (``classes`` is ``arange(C)``).
    """

    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    #: L-BFGS iterations of the fit (multi-label: the most over the label columns; 0: not fit)
    n_iter: int = 0
    #: whether a fit stopped at max_iter instead of meeting the tolerance
    max_iter_reached: bool = False


@dataclass(frozen=True)
class _Solver:
    name: str
    max_iter: int
    device: str

    def fit_binary_or_multinomial(self, X: np.ndarray, y: np.ndarray, C: float, init: _Linear | None) -> _Linear:
        classes = np.unique(y)
        if classes.size < 2:
            raise ValueError(
                f"a linear probe needs training samples of at least 2 classes, got only class {classes}. "
                "Check the training split and its subsampling."
            )
        if init is not None and not np.array_equal(init.classes, classes):
            init = None  # the class set changed (e.g. train vs train + val): start from zero
        if self.name == "torch":
            coef, intercept, n_iter = torch_logreg.fit(
                X, y, C, max_iter=self.max_iter, tol=_TOL, device=self.device,
                init=None if init is None else (init.coef, init.intercept), return_n_iter=True,
            )
            return _Linear(coef, intercept, classes, n_iter, n_iter >= self.max_iter)
        model = LogisticRegression(C=C, max_iter=self.max_iter, tol=_TOL, warm_start=init is not None)
        if init is not None:
            # sklearn's warm start reads the previous solution from these attributes
            model.coef_, model.intercept_ = init.coef.copy(), init.intercept.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported by the caller instead
            model.fit(X, y)
        n_iter = int(model.n_iter_.max())
        return _Linear(model.coef_, model.intercept_, model.classes_, n_iter, n_iter >= self.max_iter)

    def features(self, x: np.ndarray) -> np.ndarray | torch.Tensor:
        """``x`` as this solver fits and scores it: float64 numpy for scikit-learn; for torch one
        tensor on ``device``, copied there in blocks, once for every fit of the sweep."""
        if self.name == "torch":
            return torch_logreg.to_device(x, self.device)
        return np.asarray(x, dtype=np.float64)

    def concatenate(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return torch.cat([a, b]) if isinstance(a, torch.Tensor) else np.concatenate([a, b])

    def one_blas_thread(self) -> AbstractContextManager:
        """Held around every fit and scoring product of a probe (module docstring: determinism).

        Entered once, in the calling thread, around a whole sweep: threadpoolctl's limits are
        process-wide, so per-fit limits in concurrent sweep threads would restore each other's."""
        if self.name == "torch":  # torch has its own thread pool; see the module docstring
            return nullcontext()
        return threadpool_limits(limits=1)

    def fit(self, X: np.ndarray, y: np.ndarray, C: float, init: _Linear | None, multilabel: bool) -> _Linear:
        if not multilabel:
            return self.fit_binary_or_multinomial(X, y, C, init)
        rows = []
        for c in range(y.shape[1]):
            column = y[:, c]
            if column.min() == column.max():
                rows.append(_Linear(np.zeros((1, X.shape[1])), np.zeros(1), np.array([0, 1])))
                continue
            init_c = None if init is None else _Linear(init.coef[c:c + 1], init.intercept[c:c + 1], np.array([0, 1]))
            rows.append(self.fit_binary_or_multinomial(X, column, C, init_c))
        return _Linear(
            np.concatenate([r.coef for r in rows]),
            np.concatenate([r.intercept for r in rows]),
            np.arange(y.shape[1]),
            max(r.n_iter for r in rows),
            any(r.max_iter_reached for r in rows),
        )


def _scores(model: _Linear, X: np.ndarray, num_classes: int, multilabel: bool) -> np.ndarray:
    """(N, num_classes) float64 decision scores of ``model`` on ``X``.

    Binary: columns (0, z), so softmax gives sklearn's predict_proba and argmax its predict.
    A class absent from the training labels scores below every other class of its row. Callers
    hold :meth:`_Solver.one_blas_thread`, so the scores do not depend on the thread count either.
    """
    if isinstance(X, torch.Tensor):  # the torch solver's features, on its device
        coef = torch.as_tensor(model.coef, dtype=X.dtype, device=X.device)
        intercept = torch.as_tensor(model.intercept, dtype=X.dtype, device=X.device)
        logits = (X @ coef.T + intercept).to("cpu", torch.float64).numpy()
    else:
        logits = X @ model.coef.T + model.intercept
    if multilabel:
        return logits
    if model.classes.size == 2 and logits.shape[1] == 1:
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    if model.classes.size == num_classes:
        return logits
    scores = np.repeat(logits.min(axis=1, keepdims=True) - 1.0, num_classes, axis=1)
    scores[:, model.classes] = logits
    return scores


def _fit_and_score(
    solver: _Solver, X: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, C: float,
    init: _Linear | None, multilabel: bool, num_classes: int, metric: str,
) -> tuple[float, _Linear]:
    model = solver.fit(X, y, C, init, multilabel)
    return compute_metric(metric, _scores(model, val_x, num_classes, multilabel), val_y), model


def _sweep(
    solver: _Solver, X: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
    multilabel: bool, num_classes: int, metric: str, n_jobs: int | None,
) -> tuple[int, dict[int, float], dict[int, _Linear]]:
    """Run :func:`_parametric_search` with warm starts; returns (best k, scores, models by k)."""
    models: dict[int, _Linear] = {}
    # torch fits run one at a time: a GPU (or torch's own CPU threads) parallelizes each fit.
    # Threads, not processes: the fits spend their time in BLAS and Cython loss code that release
    # the GIL, and threads share the features without copies and cannot outlive the run.
    parallel = Parallel(n_jobs=1 if solver.name == "torch" else n_jobs, backend="threading")

    def evaluate(ks: list[int], best_k: int | None) -> list[float]:
        init = None if best_k is None else models[best_k]
        results = parallel(
            delayed(_fit_and_score)(solver, X, y, val_x, val_y, _c_value(k), init, multilabel, num_classes, metric)
            for k in ks
        )
        for k, (_, model) in zip(ks, results):
            models[k] = model
            if model.max_iter_reached:
                log.warning("L-BFGS reached max_iter=%d at C=%g; using the last iterate", solver.max_iter, _c_value(k))
        return [score for score, _ in results]

    with solver.one_blas_thread():
        best_k, scores = _parametric_search(evaluate)
    return best_k, scores, models


def _convergence(models: dict[int, _Linear], max_iter: int) -> dict:
    """JSON-ready convergence of the sweep's fits: ``{"max_iter", "n_iter": {C: iterations},
    "max_iter_reached": [C, ...]}`` with C as ``repr`` strings, in evaluation order."""
    return {
        "max_iter": max_iter,
        "n_iter": {repr(_c_value(k)): m.n_iter for k, m in models.items()},
        "max_iter_reached": [repr(_c_value(k)) for k, m in models.items() if m.max_iter_reached],
    }


# --------------------------------------------------------------------------------------------
# public API


@dataclass
class ProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        metrics: ``classification_metrics`` of the final model on test (fractions in [0, 1]).
        primary_metric: the metric that selected C on validation.
        C: the chosen inverse L2 strength.
        sweep: ``{C: validation score}`` for every evaluated C, in evaluation order.
        scores: (n_test, num_classes) float64 test decision scores (binary: columns (0, logit)).
        predictions: (n_test,) int64 argmax classes, or (n_test, num_classes) uint8 ``scores > 0``
            for multi-label.
        n_train, n_val, n_test: sample counts (the final model is fit on n_train + n_val).
        solver: ``"sklearn"`` or ``"torch"``.
        convergence: the sweep's fits (:func:`_convergence`) and ``"final"``: ``{"n_iter",
            "max_iter_reached"}`` of the refit on train + validation.
    """

    metrics: dict[str, float]
    primary_metric: str
    C: float
    sweep: dict[float, float]
    scores: np.ndarray = field(repr=False)
    predictions: np.ndarray = field(repr=False)
    n_train: int
    n_val: int
    n_test: int
    solver: str
    convergence: dict = field(default_factory=dict)

    def record_details(self) -> dict:
        """JSON-ready ``details`` for a result record: ``{"C", "sweep", "solver", "n_train", "n_val",
        "convergence"}``."""
        return {
            "C": self.C,
            "sweep": {repr(c): s for c, s in self.sweep.items()},
            "solver": self.solver,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "convergence": self.convergence,
        }


def _check_inputs(solver: str, pairs: Sequence[tuple[str, np.ndarray, np.ndarray]], multilabel: bool) -> int:
    """Validate solver and (name, x, y) splits; return the number of classes (label columns)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown probe solver {solver!r}; use one of {', '.join(SOLVERS)}.")
    dims = {np.shape(x)[1] if np.ndim(x) == 2 else None for _, x, _ in pairs}
    for name, x, y in pairs:
        if np.ndim(x) != 2 or np.shape(y)[0] != np.shape(x)[0] or np.ndim(y) != (2 if multilabel else 1):
            raise ValueError(
                f"linear probe {name} split: features must be (N, D) and labels (N,) "
                f"{'(N, C) 0/1 for multi-label ' if multilabel else ''}with the same N; got features "
                f"{np.shape(x)} and labels {np.shape(y)}."
            )
        if np.shape(x)[0] == 0:
            raise ValueError(f"linear probe {name} split is empty; it needs at least one sample.")
    if len(dims) != 1:
        raise ValueError(
            f"linear probe splits have different feature dimensions {sorted(dims)}; extract every split "
            "with the same model and feature kind."
        )
    if multilabel:
        return int(np.shape(pairs[0][2])[1])
    return int(max(np.max(y) for _, _, y in pairs)) + 1


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    primary_metric: str,
    multilabel: bool = False,
    *,
    solver: str = "sklearn",
    device: str = "cpu",
    max_iter: int = 1000,
    n_jobs: int | None = None,
    num_classes: int | None = None,
) -> ProbeResult:
    """The paper's linear probe: sweep C on validation, refit on train + validation, score test.

    See the module docstring for the protocol and :func:`c_sweep` for the search. Deterministic:
    there is no randomness (hence no seed), and with the scikit-learn solver neither ``n_jobs`` nor
    the BLAS thread count changes a bit of the result (module docstring: what is guaranteed).

    Args:
        train_x, val_x, test_x: (N, D) float features (e.g. float32 pre-projection features).
        train_y, val_y, test_y: (N,) int64 class indices, or (N, C) 0/1 when ``multilabel``.
        primary_metric: the dataset's metric name; it selects C on validation (binary datasets:
            ``roc_auc`` on the decision scores).
        multilabel: one-vs-rest binary probes, e.g. VOC2007 with ``map_11point``.
        solver: ``"sklearn"`` (the paper's) or ``"torch"`` (:mod:`clipbench.tasks.torch_logreg`,
            same objective, runs on ``device``).
        device: torch device for ``solver="torch"``.
        max_iter: L-BFGS iteration limit (the paper: 1000).
        n_jobs: threads for independent sweep points (scikit-learn solver only; None or 1: one
            at a time).
        num_classes: number of classes C (score columns); default max label + 1 over all splits.

    Returns:
        :class:`ProbeResult`.
    """
    n_classes = _check_inputs(
        solver, [("train", train_x, train_y), ("val", val_x, val_y), ("test", test_x, test_y)], multilabel
    )
    num_classes = num_classes or n_classes
    fitter = _Solver(solver, max_iter, device)
    train_x, val_x, test_x = (fitter.features(x) for x in (train_x, val_x, test_x))
    train_y, val_y, test_y = (np.asarray(y) for y in (train_y, val_y, test_y))

    best_k, scores, models = _sweep(
        fitter, train_x, train_y, val_x, val_y, multilabel, num_classes, primary_metric, n_jobs
    )
    C = _c_value(best_k)
    log.info("linear probe: chose C=%g (validation %s=%.4f) after %d fits", C, primary_metric, scores[best_k], len(scores))

    with fitter.one_blas_thread():
        final = fitter.fit(
            fitter.concatenate(train_x, val_x), np.concatenate([train_y, val_y]), C, models[best_k], multilabel
        )
        test_scores = _scores(final, test_x, num_classes, multilabel)
    if final.max_iter_reached:
        log.warning("L-BFGS reached max_iter=%d in the final fit (C=%g); using the last iterate", max_iter, C)
    return ProbeResult(
        metrics=classification_metrics(test_scores, test_y, primary_metric, multilabel),
        primary_metric=primary_metric,
        C=C,
        sweep={_c_value(k): s for k, s in scores.items()},
        scores=test_scores,
        predictions=(test_scores > 0).astype(np.uint8) if multilabel else np.argmax(test_scores, axis=1),
        n_train=len(train_y),
        n_val=len(val_y),
        n_test=len(test_y),
        solver=solver,
        convergence={**_convergence(models, max_iter),
                     "final": {"n_iter": final.n_iter, "max_iter_reached": final.max_iter_reached}},
    )


@dataclass
class FewShotK:
    """Few-shot results at one k: primary-metric test scores per seed and their summary.

    ``std`` is the sample standard deviation over seeds (ddof=1; 0.0 for a single seed).
    ``indices[i]`` are the indices into ``train_x`` of seed i's shot set; ``convergence[i]`` its
    sweep's fits (:func:`_convergence`).
    """

    mean: float
    std: float
    scores: list[float]
    C: list[float]
    indices: list[np.ndarray] = field(repr=False)
    convergence: list[dict] = field(default_factory=list)
    #: per seed, :func:`clipbench.sidecars.compact_outputs` of the test scores (empty for a
    #: metric they do not cover)
    per_sample: list[np.ndarray] = field(default_factory=list, repr=False)


@dataclass
class FewShotResult:
    """Outcome of :func:`few_shot`: ``per_k[k]`` for each k, and how the validation set was made."""

    primary_metric: str
    seeds: list[int]
    per_k: dict[int, FewShotK]
    val_source: str  # "given" (val_x/val_y passed) or "carved" (stratified from train)
    n_val: int

    def record_details(self) -> dict:
        """JSON-ready ``details``: ``{"k": {"1": {"mean", "std", "seeds", "C", "convergence"}},
        "val_source", "n_val"}``."""
        return {
            "k": {
                str(k): {"mean": r.mean, "std": r.std, "seeds": r.scores, "C": r.C, "convergence": r.convergence}
                for k, r in self.per_k.items()
            },
            "val_source": self.val_source,
            "n_val": self.n_val,
        }


def few_shot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    primary_metric: str,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (0, 1, 2),
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
    solver: str = "sklearn",
    device: str = "cpu",
    max_iter: int = 1000,
    n_jobs: int | None = None,
    num_classes: int | None = None,
) -> FewShotResult:
    """k-shot linear probes: fit on k samples per class, C chosen on a held-out validation set.

    Rule, for each k and seed:

    1. Validation set: ``val_x``/``val_y`` when given (the dataset's validation split); otherwise
       a stratified split carved once from train by ``stratified_val_split(train_y, val_fraction,
       split_seed)``. The same validation set serves every k and seed.
    2. Shot set: :func:`sample_few_shot` (exactly k per class, nested over k for a seed) drawn
       from the training samples not in the validation set; validation and test samples are
       never fit on.
    3. C: :func:`c_sweep` fits on the shot set and scores the primary metric on validation.
    4. Test: the shot-set model at the chosen C (no refit with validation data, which would add
       samples beyond k per class) scores the test split.

    Selecting C on a full validation set uses labels beyond the k shots; this follows the common
    practice of few-shot probe benchmarks and is the only option at k = 1, where the shot set
    cannot be split. Single-label datasets only.

    Args:
        train_x, test_x: (N, D) features. train_y, test_y: (N,) int class indices.
        primary_metric: the dataset's metric name.
        ks: shots per class. seeds: one shot set per seed.
        val_x, val_y: optional validation split; see rule 1.
        val_fraction, split_seed: how validation is carved when not given.
        solver, device, max_iter, n_jobs, num_classes: as for :func:`linear_probe`.

    Returns:
        :class:`FewShotResult`; scores are the primary metric on test.
    """
    if (val_x is None) != (val_y is None):
        raise ValueError("few_shot needs both val_x and val_y, or neither (then validation is carved from train).")
    if not ks or min(ks) < 1 or not seeds:
        raise ValueError(f"few_shot needs ks >= 1 and at least one seed; got ks={list(ks)}, seeds={list(seeds)}.")
    train_y = np.asarray(train_y)
    if val_x is None:
        pool, val_idx = stratified_val_split(train_y, val_fraction, split_seed)
        val_x, val_y, val_source = np.asarray(train_x)[val_idx], train_y[val_idx], "carved"
    else:
        pool, val_source = np.arange(len(train_y)), "given"
    n_classes = _check_inputs(
        solver, [("train", train_x, train_y), ("val", val_x, val_y), ("test", test_x, test_y)], False
    )
    num_classes = num_classes or n_classes
    train_x, val_x, test_x = (np.asarray(x, dtype=np.float64) for x in (train_x, val_x, test_x))
    val_y, test_y = np.asarray(val_y), np.asarray(test_y)
    fitter = _Solver(solver, max_iter, device)

    per_k = {}
    for k in ks:
        scores, chosen, shot_sets, convergence, per_sample = [], [], [], [], []
        for seed in seeds:
            shots = pool[sample_few_shot(train_y[pool], k, seed)]
            best_k, _, models = _sweep(
                fitter, train_x[shots], train_y[shots], val_x, val_y, False, num_classes, primary_metric, n_jobs
            )
            with fitter.one_blas_thread():
                test_scores = _scores(models[best_k], test_x, num_classes, False)
            scores.append(compute_metric(primary_metric, test_scores, test_y))
            chosen.append(_c_value(best_k))
            shot_sets.append(shots)
            convergence.append(_convergence(models, max_iter))
            if sidecars.few_shot_keeps(primary_metric):
                per_sample.append(sidecars.compact_outputs(test_scores, test_y, primary_metric))
        std = float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0
        per_k[int(k)] = FewShotK(float(np.mean(scores)), std, scores, chosen, shot_sets, convergence,
                                 per_sample)
        log.info("few-shot k=%d: %s %.4f +- %.4f", k, primary_metric, per_k[int(k)].mean, std)
    return FewShotResult(primary_metric, [int(s) for s in seeds], per_k, val_source, len(val_y))


@dataclass(frozen=True)
class ProbeSplits:
    """Train / validation / test features and labels of a probe, and where validation came from."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    val_source: str
    feature_kind: str


def probe_splits(inputs: TaskInputs) -> ProbeSplits:
    """The probe's splits from the task inputs: the spec's validation split when it has one, else
    a stratified ``val_fraction`` of train (:func:`stratified_val_split`, seeded by the run's
    seed); ``settings["probe_features"]`` picks projected or pre-projection features."""
    spec, settings, images = inputs.spec, inputs.settings, inputs.images
    kind = settings["probe_features"]

    def arrays(role: str) -> tuple[np.ndarray, np.ndarray]:
        split = images[role]
        return (split.pre_projection if kind == "pre_projection" else split.projected), split.targets

    (tx, ty), test = arrays("train"), arrays("test")
    if "val" in images:
        val, val_source = arrays("val"), "the dataset's validation split"
    else:
        seed = settings["seed"]
        tr, va = stratified_val_split(ty, spec.val_fraction, seed)
        (tx, ty), val = (tx[tr], ty[tr]), (tx[va], ty[va])
        val_source = f"stratified {spec.val_fraction:g} of train (seed {seed})"
    if kind == "pre_projection":
        kind = images["train"].pre_projection_kind  # "embedding" for towers without a separate projection
    return ProbeSplits((tx, ty), val, test, val_source, kind)


class LinearProbeTask:
    """The paper's linear probe: C swept on validation, refit on train + validation, test scored."""

    name = "linear_probe"
    title = "Linear probe"
    spec_task = "linear_probe"

    def needs(self, spec) -> TaskNeeds:
        return TaskNeeds(roles=("train", "val", "test"))

    def settings(self, config) -> dict:
        return {"probe_solver": config.probe_solver, "probe_features": config.probe_features,
                "seed": config.seed}

    def run(self, inputs: TaskInputs) -> TaskOutput:
        spec, settings = inputs.spec, inputs.settings
        splits = probe_splits(inputs)
        result = linear_probe(*splits.train, *splits.val, *splits.test, primary_metric=spec.primary_metric,
                              multilabel=spec.multilabel, solver=settings["probe_solver"],
                              device=inputs.device, num_classes=spec.num_classes, n_jobs=inputs.jobs)
        details = {**result.record_details(), "feature_kind": splits.feature_kind,
                   "validation": splits.val_source}
        per_sample = sidecars.classification_outputs(result.scores, splits.test[1], spec.primary_metric,
                                                     spec.multilabel)
        return TaskOutput(metrics=result.metrics, n_samples=result.n_test, details=details,
                          per_sample=per_sample)


TASK = LinearProbeTask()
