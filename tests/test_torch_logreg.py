"""The torch L-BFGS logistic regression against scikit-learn on the same features and C."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression

from clipbench.tasks import torch_logreg

from conftest import gaussian_mixture as _gaussian_mixture


def gaussian_mixture(*args, **kwargs):
    return _gaussian_mixture(*args, dtype=np.float64, **kwargs)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sklearn_objective(X: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """C * sum CE + 0.5 ||W||^2 written from scikit-learn's documented formulation.

    Binary: labels {classes[0], classes[1]} -> {-1, +1}, CE = log(1 + exp(-t (x.w + b))).
    Multinomial: CE = -log softmax(x W^T + b)[y]."""
    X = X.astype(np.float64)
    classes = np.unique(y)
    if coef.shape[0] == 1:
        t = np.where(y == classes[1], 1.0, -1.0)
        ce = np.log1p(np.exp(-t * (X @ coef[0] + intercept[0])))
    else:
        logits = X @ coef.T + intercept
        log_prob = logits - logsumexp(logits, axis=1, keepdims=True)
        ce = -log_prob[np.arange(len(y)), np.searchsorted(classes, y)]
    return C * ce.sum() + 0.5 * (coef ** 2).sum()


@pytest.mark.parametrize("classes", [2, 7])
@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_matches_sklearn_at_default_tolerance(classes: int, C: float) -> None:
    X, y = gaussian_mixture(700, 32, classes, 0.35, seed=classes)
    train_x, train_y, test_x, test_y = X[:500], y[:500], X[500:], y[500:]
    reference = LogisticRegression(C=C, max_iter=1000).fit(train_x, train_y)
    coef, intercept = torch_logreg.fit(train_x, train_y, C)

    assert coef.shape == reference.coef_.shape and intercept.shape == reference.intercept_.shape
    scores = torch_logreg.predict_scores(test_x, coef, intercept)
    predicted = reference.classes_[(scores > 0).astype(int)] if classes == 2 else reference.classes_[scores.argmax(1)]
    expected = reference.predict(test_x)
    assert np.mean(predicted == expected) >= 0.995
    assert abs(np.mean(predicted == test_y) - np.mean(expected == test_y)) <= 0.002

    ours = sklearn_objective(train_x, train_y, coef, intercept, C)
    theirs = sklearn_objective(train_x, train_y, reference.coef_, reference.intercept_, C)
    assert abs(ours - theirs) <= 1e-4 * abs(theirs)


@pytest.mark.parametrize("classes", [2, 5])
def test_same_minimizer_as_sklearn_when_both_converge_tightly(classes: int) -> None:
    """At a tight tolerance both solvers reach the same optimum: same objective and parameterization."""
    X, y = gaussian_mixture(400, 16, classes, 0.5, seed=10 + classes)
    C = 0.5
    reference = LogisticRegression(C=C, max_iter=1000, tol=1e-10).fit(X, y)
    coef, intercept = torch_logreg.fit(X, y, C, tol=1e-10)
    theirs = sklearn_objective(X, y, reference.coef_, reference.intercept_, C)
    assert sklearn_objective(X, y, coef, intercept, C) == pytest.approx(theirs, rel=1e-9)
    np.testing.assert_allclose(coef, reference.coef_, atol=1e-5)
    np.testing.assert_allclose(intercept, reference.intercept_, atol=1e-5)


def test_objective_function_matches_independent_formula() -> None:
    rng = np.random.default_rng(3)
    for classes, rows in ((2, 1), (4, 4)):
        X, y = gaussian_mixture(50, 6, classes, 1.0, seed=classes)
        coef, intercept = rng.normal(size=(rows, 6)), rng.normal(size=rows)
        assert torch_logreg.objective(X, y, coef, intercept, 0.3) == pytest.approx(
            sklearn_objective(X, y, coef, intercept, 0.3), rel=1e-12
        )


def test_labels_need_not_be_contiguous_and_rows_follow_sorted_labels() -> None:
    X, y = gaussian_mixture(300, 8, 3, 1.0, seed=4)
    labels = np.array([9, 2, 5])[y]
    reference = LogisticRegression(C=1.0, max_iter=1000, tol=1e-10).fit(X, labels)
    coef, intercept = torch_logreg.fit(X, labels, 1.0, tol=1e-10)
    np.testing.assert_allclose(coef, reference.coef_, atol=1e-5)
    assert torch_logreg.predict_scores(X, coef, intercept).shape == (300, 3)


def test_warm_start_at_the_optimum_stays_there() -> None:
    X, y = gaussian_mixture(300, 8, 4, 0.8, seed=5)
    coef, intercept = torch_logreg.fit(X, y, 2.0, tol=1e-9)
    again = torch_logreg.fit(X, y, 2.0, tol=1e-9, init=(coef, intercept))
    np.testing.assert_allclose(again[0], coef, atol=1e-7)
    with pytest.raises(ValueError, match="warm start"):
        torch_logreg.fit(X, y, 2.0, init=(coef[:2], intercept[:2]))


def test_float32_tensor_input_on_cpu() -> None:
    X, y = gaussian_mixture(300, 8, 3, 1.0, seed=6)
    coef64, _ = torch_logreg.fit(X, y, 1.0, tol=1e-8)
    coef32, _ = torch_logreg.fit(torch.from_numpy(X).float(), torch.from_numpy(y), 1.0, dtype=torch.float32, tol=1e-5)
    np.testing.assert_allclose(coef32, coef64, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    X, y = gaussian_mixture(500, 32, 6, 0.4, seed=7)
    cpu = torch_logreg.fit(X, y, 1.0)
    for dtype in (torch.float32, torch.float64):
        gpu = torch_logreg.fit(X, y, 1.0, device="cuda", dtype=dtype)
        agree = np.mean(torch_logreg.predict_scores(X, *gpu).argmax(1) == torch_logreg.predict_scores(X, *cpu).argmax(1))
        assert agree >= 0.995
        assert torch_logreg.objective(X, y, *gpu, 1.0) == pytest.approx(torch_logreg.objective(X, y, *cpu, 1.0), rel=1e-4)


def test_bad_input_raises_clear_errors() -> None:
    X, y = gaussian_mixture(20, 4, 2, 1.0, seed=8)
    with pytest.raises(ValueError, match="at least 2 classes"):
        torch_logreg.fit(X, np.zeros(20, dtype=int), 1.0)
    with pytest.raises(ValueError, match="one row per label"):
        torch_logreg.fit(X[:10], y, 1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        torch_logreg.fit(X, y, 0.0)
