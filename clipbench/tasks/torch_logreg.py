"""L2-regularized logistic regression fit by full-batch L-BFGS in torch, with scikit-learn's objective.

A drop-in alternative to ``sklearn.linear_model.LogisticRegression(solver="lbfgs")`` for the linear
probe (``solver="torch"``) that can run on a GPU. It minimizes exactly the objective of the installed
scikit-learn (1.9, ``_logistic_regression_path``)::

    C * sum_i CE_i + 0.5 * ||W||_F^2          (the intercept b is not penalized)

with the same parameterization:

* K >= 3 classes: multinomial softmax with one weight row per class, ``W`` (K, D), ``b`` (K,).
* 2 classes: one logit ``z = x . w + b`` for the larger label (sklearn's ``classes_[1]``),
  ``W`` (1, D), ``b`` (1,), ``CE_i = log(1 + exp(z_i)) - y_i z_i``.

Like scikit-learn, the solver works on the objective divided by ``C * n`` (mean loss plus
``||W||^2 / (2 C n)``) and stops when the largest absolute gradient entry of that scaled objective
is <= ``tol`` (sklearn's ``gtol``, default 1e-4), when the decrease of that objective (of order 1)
falls below 64 float64 epsilons (sklearn's ``ftol``) or after ``max_iter`` iterations. The line search is
strong Wolfe (``torch.optim.LBFGS(line_search_fn="strong_wolfe")``) with 10 correction pairs, as
scipy's L-BFGS-B uses by default.

Both solvers minimize the same function, but their iterates differ (initial step, line search), so
where the default tolerance stops them early (weak regularization, large C) they can stop at
different points: on 10k x 512 synthetic features at C = 1, scikit-learn stopped after 6 iterations
at an objective 3% above this solver's. At a tight ``tol`` both reach the same optimum.

Precision: float64 on CPU by default (as scikit-learn on float64 input); float32 on CUDA by default,
where float64 is slow on most GPUs. Pass ``dtype=torch.float64`` on a GPU with fast float64 (H100)
to match scikit-learn to more digits.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.special import logsumexp

log = logging.getLogger(__name__)

_HISTORY_SIZE = 10  # scipy L-BFGS-B's default number of stored correction pairs (maxcor)
_MAX_EVALS_PER_ITER = 15  # scipy's default maxfun (15000) over sklearn's max_iter (1000)
# sklearn's ftol, in float64 epsilons whatever the compute dtype: a float32-sized threshold would
# stop float32 fits well before the gradient tolerance is met
_FTOL = 64 * float(np.finfo(np.float64).eps)

ArrayLike = np.ndarray | torch.Tensor


def _encode_labels(y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct labels (sklearn's ``classes_``) and each sample's index into them."""
    y = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y.ndim != 1:
        raise ValueError(
            f"labels must be a 1-D array of class indices, got shape {y.shape}; fit multi-label "
            "targets one column at a time (one-vs-rest)."
        )
    classes, encoded = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError(
            f"logistic regression needs samples of at least 2 classes, got only class {classes}. "
            "Check the training split (and its subsampling) before fitting a linear probe."
        )
    return classes, encoded.reshape(-1)


def _scaled_loss(
    X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, C: float
) -> torch.Tensor:
    """Mean cross-entropy plus ``||W||^2 / (2 C n)``: sklearn's objective divided by ``C * n``.

    Args:
        X: (n, D) features. y: (n,) int64 class indices (K >= 3) or 0/1 floats (binary, K = 1).
        W: (K, D). b: (K,). C: inverse L2 strength, > 0.
    """
    logits = torch.addmm(b, X, W.T)
    if W.shape[0] == 1:
        z = logits[:, 0]
        data = (torch.nn.functional.softplus(z) - y * z).mean()
    else:
        data = torch.nn.functional.cross_entropy(logits, y)
    return data + (W * W).sum() / (2.0 * C * X.shape[0])


#: rows copied to the device per step by :func:`to_device` (a few hundred MB of float32 at most)
BLOCK_ROWS = 65_536


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The compute dtype when none is given: float64 on CPU, float32 on accelerators."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def to_device(X: ArrayLike, device: str | torch.device, dtype: torch.dtype | None = None,
              block_rows: int | None = None) -> torch.Tensor:
    """(n, D) features as one tensor on ``device`` in ``dtype`` (default :func:`default_dtype`),
    copied ``block_rows`` (default :data:`BLOCK_ROWS`) rows at a time: a memory-mapped feature file
    is read in blocks and never held in host memory as a whole, nor converted there to another dtype."""
    block_rows = BLOCK_ROWS if block_rows is None else block_rows
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if isinstance(X, torch.Tensor):
        return X.to(device, dtype)
    if X.ndim != 2:
        raise ValueError(f"features must be an (n, D) array, got shape {X.shape}")
    out = torch.empty(X.shape, dtype=dtype, device=device)
    for start in range(0, X.shape[0], block_rows):
        block = np.ascontiguousarray(X[start:start + block_rows])
        out[start:start + len(block)] = torch.from_numpy(block).to(device, dtype)
    return out


def fit(
    X: ArrayLike,
    y: ArrayLike,
    C: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    return_n_iter: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, int]:
    """Fit L2-regularized logistic regression with scikit-learn's objective and parameterization.

    Args:
        X: (n, D) float features, numpy or torch (a tensor already on ``device`` is not copied).
        y: (n,) integer labels; the rows of ``coef`` follow ``np.unique(y)`` (sklearn's
            ``classes_``).
        C: inverse L2 regularization strength, > 0 (sklearn's ``C``).
        max_iter: maximum L-BFGS iterations (the paper: 1000).
        tol: stop when max |gradient| of the objective divided by ``C * n`` is <= tol (sklearn's tol).
        device: where to compute.
        dtype: compute dtype; default float64 on CPU, float32 elsewhere.
        init: optional warm start ``(coef, intercept)`` of the returned shapes.
        return_n_iter: also return the number of L-BFGS iterations run (``max_iter`` when it
            stopped at the limit), as scikit-learn's ``n_iter_``.

    Returns:
        ``coef`` (K, D) and ``intercept`` (K,) as float64 numpy arrays, with K = number of classes,
        or K = 1 for two classes (the logit of the larger label); then ``n_iter`` when
        ``return_n_iter``.
    """
    if not C > 0:
        raise ValueError(f"C (inverse L2 strength) must be > 0, got {C}.")
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    classes, encoded = _encode_labels(y)
    X_t = torch.as_tensor(X, device=device, dtype=dtype)
    if X_t.ndim != 2 or X_t.shape[0] != encoded.shape[0]:
        raise ValueError(
            f"features must be an (n, D) array with one row per label; got features {tuple(X_t.shape)} "
            f"and {encoded.shape[0]} labels."
        )
    binary = classes.size == 2
    num_rows = 1 if binary else classes.size
    y_t = torch.as_tensor(encoded, device=device, dtype=dtype if binary else torch.int64)

    W = torch.zeros(num_rows, X_t.shape[1], device=device, dtype=dtype)
    b = torch.zeros(num_rows, device=device, dtype=dtype)
    if init is not None:
        init_coef, init_intercept = (np.asarray(a) for a in init)
        if init_coef.shape != tuple(W.shape) or init_intercept.shape != tuple(b.shape):
            raise ValueError(
                f"warm start has coef {init_coef.shape} and intercept {init_intercept.shape}, expected "
                f"{tuple(W.shape)} and {tuple(b.shape)}; warm-start only from a fit on the same classes."
            )
        W.copy_(torch.from_numpy(init_coef))
        b.copy_(torch.from_numpy(init_intercept))
    W.requires_grad_(True)
    b.requires_grad_(True)

    optimizer = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=_MAX_EVALS_PER_ITER * max_iter,
        tolerance_grad=tol,
        tolerance_change=_FTOL,
        history_size=_HISTORY_SIZE,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _scaled_loss(X_t, y_t, W, b, C)
        loss.backward()
        return loss

    optimizer.step(closure)
    n_iter = optimizer.state[W].get("n_iter", 0)
    if n_iter >= max_iter:
        log.warning(
            "torch L-BFGS did not converge in %d iterations (C=%g, n=%d, D=%d); the probe uses the "
            "last iterate, as scikit-learn does",
            max_iter, C, X_t.shape[0], X_t.shape[1],
        )
    coef, intercept = W.detach().to("cpu", torch.float64).numpy(), b.detach().to("cpu", torch.float64).numpy()
    return (coef, intercept, int(n_iter)) if return_n_iter else (coef, intercept)


def predict_scores(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Decision scores ``X @ coef.T + intercept``, like sklearn's ``decision_function``.

    Args:
        X: (N, D) float features. coef: (K, D). intercept: (K,).

    Returns:
        (N, K) float64 for K >= 3 classes; (N,) float64 for the binary single-logit model (K = 1).
    """
    scores = np.asarray(X, dtype=np.float64) @ np.asarray(coef, dtype=np.float64).T + intercept
    return scores[:, 0] if scores.shape[1] == 1 else scores


def objective(X: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """scikit-learn's logistic regression objective ``C * sum_i CE_i + 0.5 * ||coef||^2``, in float64.

    Args:
        X: (n, D) features. y: (n,) labels (encoded through ``np.unique`` as in :func:`fit`).
        coef: (K, D), or (1, D) for two classes. intercept: (K,). C: inverse L2 strength.

    Returns:
        The objective value (the intercept is not penalized).
    """
    _, encoded = _encode_labels(y)
    logits = np.asarray(X, dtype=np.float64) @ np.asarray(coef, dtype=np.float64).T + intercept
    if logits.shape[1] == 1:
        z = logits[:, 0]
        losses = np.logaddexp(0.0, z) - encoded * z
    else:
        losses = logsumexp(logits, axis=1) - logits[np.arange(len(encoded)), encoded]
    return float(C * losses.sum() + 0.5 * np.sum(np.square(coef)))
