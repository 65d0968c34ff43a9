"""Classification metrics of the CLIP paper (Table 9), their bootstrap confidence intervals, and
the names of the retrieval metrics.

Pure numpy functions: arrays in, Python floats out. All values are fractions in [0, 1] and never NaN;
an undefined metric (no positive sample, a single class for ROC AUC, ...) or a malformed input
raises :class:`ValueError` (:class:`TypeError` for an array of the wrong dtype) instead.

Every classification metric is a :class:`Metric` in a registry: :func:`register_metric` adds one,
:func:`get_metric` looks one up, and :func:`compute_metric` / :func:`bootstrap_distribution` read
it. Retrieval metrics (``text_to_image_R@{k}``, ``image_to_text_R@{k}``, ``rsum``) are computed
from ranks by :mod:`clipbench.tasks.retrieval`; their names are parsed by
:func:`parse_recall_metric` and :func:`is_retrieval_metric`.

Conventions shared by every function:

* ``scores`` are real-valued (logits, similarities, probabilities); only their order matters.
* Single-label ``targets`` are class indices, shape ``(N,)``, integers in ``[0, C)``.
* Multi-label ``targets`` (VOC2007) are an ``(N, C)`` 0/1 matrix.
* Ties in a row of ``scores`` are broken toward the lower class index, as ``np.argmax`` does: the
  rank of the target class is the number of classes scored strictly higher plus the number of
  lower-indexed classes scored equally. Top-1 accuracy therefore always agrees with the argmax
  prediction used by mean per-class recall.
* Ties between samples in the 11-point AP are ranked in their input order (a stable sort by
  descending score, as the VOC devkit's sort); ROC AUC gives tied positive/negative pairs half credit.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

# Bootstrap resamples are processed in chunks of about this many (resample, sample) cells, which
# bounds the temporary arrays to a few tens of MB whatever N is.
_BOOTSTRAP_CHUNK_CELLS = 1_000_000


# --------------------------------------------------------------------------------------------
# input validation


def _as_scores(scores: np.ndarray, ndim: int, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D array, got shape {scores.shape}. "
            + ("Pass one row of class scores per sample, shape (N, C)." if ndim == 2
               else "Pass one score per sample, shape (N,).")
        )
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if scores.shape[0] == 0:
        raise ValueError(f"{name} is empty: a metric needs at least one sample.")
    if not np.isfinite(scores).all():
        raise ValueError(
            f"{name} contains NaN or infinite values; check the features and classifier weights "
            "(e.g. a zero-norm embedding or an fp16 overflow) before computing metrics."
        )
    return scores


def _check_single_label(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, C) scores and (N,) integer targets in [0, C); returns (scores, int64 targets)."""
    scores = _as_scores(scores, 2)
    targets = np.asarray(targets)
    if targets.ndim != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"targets must have shape (N,) = ({scores.shape[0]},) to match scores {scores.shape}, "
            f"got {targets.shape}. Multi-label targets (N, C) are only valid for map_11point."
        )
    if not (np.issubdtype(targets.dtype, np.integer) or np.issubdtype(targets.dtype, np.bool_)):
        raise TypeError(
            f"targets must be integer class indices, got dtype {targets.dtype}; convert labels to "
            "indices into the class list first."
        )
    targets = targets.astype(np.int64)
    num_classes = scores.shape[1]
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(
            f"targets must lie in [0, {num_classes}) (one column of scores per class), got values "
            f"in [{targets.min()}, {targets.max()}]. Check the class list, or pass class_subset "
            "targets as indices into the subset."
        )
    return scores, targets


def _check_binary(scores: np.ndarray, targets: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N,) scores and (N,) 0/1 targets; returns (scores, bool targets)."""
    scores = _as_scores(scores, 1)
    targets = np.asarray(targets)
    if targets.shape != scores.shape:
        raise ValueError(
            f"{name}: targets must have the same shape as scores {scores.shape}, got {targets.shape}."
        )
    if not np.isin(targets, (0, 1)).all():
        raise ValueError(
            f"{name}: targets must be 0/1 (negative/positive), got values {np.unique(targets)[:10]}."
        )
    return scores, targets.astype(bool)


def _check_multilabel(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, C) scores and an (N, C) 0/1 target matrix; returns (scores, bool targets)."""
    scores = _as_scores(scores, 2)
    targets = np.asarray(targets)
    if targets.shape != scores.shape:
        raise ValueError(
            f"multi-label targets must be an (N, C) 0/1 matrix of the same shape as scores "
            f"{scores.shape}, got {targets.shape}. Single-label datasets use accuracy-type metrics."
        )
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("multi-label targets must contain only 0 and 1.")
    return scores, targets.astype(bool)


# --------------------------------------------------------------------------------------------
# single-label metrics


def _target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target class in its row of ``scores``; ties go to the lower index.

    Args:
        scores: (N, C) float.
        targets: (N,) int64 in [0, C).

    Returns:
        (N,) int64; 0 means the target is the argmax prediction.
    """
    target_scores = np.take_along_axis(scores, targets[:, None], axis=1)
    higher = (scores > target_scores).sum(axis=1)
    tied_before = ((scores == target_scores) & (np.arange(scores.shape[1]) < targets[:, None])).sum(axis=1)
    return higher + tied_before


def topk_accuracy(scores: np.ndarray, targets: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose target class is among the ``k`` highest-scored classes.

    Args:
        scores: (N, C) float class scores.
        targets: (N,) int class indices in [0, C).
        k: 1 <= k <= C.

    Returns:
        Top-k accuracy in [0, 1]. Ties are broken toward the lower class index (module docstring).
    """
    scores, targets = _check_single_label(scores, targets)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(
            f"top-{k} accuracy needs 1 <= k <= number of classes ({scores.shape[1]}); "
            "top5_accuracy is only reported for datasets with more than 5 classes."
        )
    return float(np.mean(_target_ranks(scores, targets) < k))


def mean_top1_top5(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean of top-1 and top-5 accuracy (the paper's Kinetics700 metric).

    Args:
        scores: (N, C) float with C >= 5.
        targets: (N,) int in [0, C).
    """
    return 0.5 * (topk_accuracy(scores, targets, 1) + topk_accuracy(scores, targets, 5))


def per_class_recall(scores: np.ndarray, targets: np.ndarray, num_classes: int) -> list[dict]:
    """Recall of the argmax prediction for each class, JSON-ready.

    Args:
        scores: (N, num_classes) float.
        targets: (N,) int in [0, num_classes).
        num_classes: number of classes C (columns of ``scores``).

    Returns:
        One dict per class, in class order: ``{"class": i, "n": number of test samples of class i,
        "recall": float in [0, 1], or None when class i has no test sample}``.
    """
    scores, targets = _check_single_label(scores, targets)
    if scores.shape[1] != num_classes:
        raise ValueError(
            f"scores have {scores.shape[1]} columns but num_classes is {num_classes}; they must agree."
        )
    predictions = np.argmax(scores, axis=1)
    counts = np.bincount(targets, minlength=num_classes)
    hits = np.bincount(targets, weights=predictions == targets, minlength=num_classes)
    return [
        {"class": c, "n": int(counts[c]), "recall": float(hits[c] / counts[c]) if counts[c] else None}
        for c in range(num_classes)
    ]


def mean_per_class_recall(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes present in ``targets`` of the recall of the argmax prediction.

    Equals ``sklearn.metrics.balanced_accuracy_score(targets, scores.argmax(1))``: classes with no
    test sample are left out of the mean (they have no recall), even when they are predicted.

    Args:
        scores: (N, C) float.
        targets: (N,) int in [0, C).
    """
    scores, targets = _check_single_label(scores, targets)
    correct = np.argmax(scores, axis=1) == targets
    counts = np.bincount(targets, minlength=scores.shape[1])
    hits = np.bincount(targets, weights=correct, minlength=scores.shape[1])
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


# --------------------------------------------------------------------------------------------
# ranking metrics


def _eleven_point_ap(tp: np.ndarray, retrieved: np.ndarray, num_positives: np.ndarray) -> np.ndarray:
    """11-point interpolated AP from cumulative counts along the ranking.

    Args:
        tp: (R, N) float, cumulative (weighted) count of true positives at each rank.
        retrieved: (R, N) float, cumulative (weighted) count of samples at each rank.
        num_positives: (R,) float, total positive weight of each row (> 0).

    Returns:
        (R,) float64 AP. Recall thresholds t = i / 10 are compared as ``10 * tp >= i * P`` on the
        integer-valued counts, so a recall exactly equal to a threshold always counts (the VOC
        devkit's floating-point ``np.arange(0, 1.1, 0.1)`` can miss it by one ulp).
    """
    tp = tp.astype(np.float64, copy=False)
    precision = np.divide(tp, retrieved, out=np.zeros_like(tp), where=retrieved > 0)
    # reversed_max[r, N - 1 - j] = max precision over ranks >= j; recall is non-decreasing along
    # the ranking, so "recall >= t" selects a suffix starting at the first rank that reaches t.
    reversed_max = np.maximum.accumulate(precision[:, ::-1], axis=1).ravel()
    num_rows, num_ranks = tp.shape
    # One searchsorted over all rows: key = 20 * row + 10 * recall is non-decreasing when
    # flattened. 10 * tp / P is exact when it equals an integer i and otherwise at least 1 / P
    # away from it, far more than the rounding error, so ">= i" is decided exactly.
    row_offset = 20.0 * np.arange(num_rows)
    key = (row_offset[:, None] + 10.0 * tp / num_positives[:, None]).ravel()
    queries = row_offset[:, None] + np.arange(11.0)
    first = np.searchsorted(key, queries, side="left")
    row_end = (np.arange(1, num_rows + 1) * num_ranks)[:, None]
    reached = first < row_end
    # flat index of rank j of row r in reversed_max: r * N + (N - 1 - j) = row_end - 1 - (first - r * N)
    mirrored = 2 * row_end - num_ranks - 1 - first
    values = np.where(reached, reversed_max[np.clip(mirrored, 0, key.size - 1)], 0.0)
    return values.mean(axis=1)


def average_precision_11point(scores: np.ndarray, targets: np.ndarray) -> float:
    """PASCAL VOC2007 11-point interpolated average precision of one class.

    AP = mean over t in {0, 0.1, ..., 1} of the maximum precision over ranks whose recall is
    >= t (0 when no rank reaches t). Samples are ranked by descending score with a stable sort, so
    tied samples keep their input order (the VOC devkit's rule).

    Args:
        scores: (N,) float.
        targets: (N,) 0/1, at least one 1.
    """
    scores, targets = _check_binary(scores, targets, "average_precision_11point")
    if not targets.any():
        raise ValueError(
            "average_precision_11point is undefined without a positive sample; leave such classes "
            "out (map_11point does)."
        )
    ranked = targets[np.argsort(-scores, kind="stable")]
    tp = np.cumsum(ranked, dtype=np.float64)[None]
    retrieved = np.arange(1.0, ranked.size + 1)[None]
    return float(_eleven_point_ap(tp, retrieved, tp[:, -1])[0])


def per_class_ap(scores: np.ndarray, targets: np.ndarray) -> list[dict]:
    """11-point AP of each class of a multi-label problem, JSON-ready.

    Args:
        scores: (N, C) float.
        targets: (N, C) 0/1.

    Returns:
        One dict per class: ``{"class": i, "n": number of positives, "ap": float, or None when the
        class has no positive}``.
    """
    scores, targets = _check_multilabel(scores, targets)
    result = []
    for c in range(scores.shape[1]):
        n = int(targets[:, c].sum())
        ap = average_precision_11point(scores[:, c], targets[:, c]) if n else None
        result.append({"class": c, "n": n, "ap": ap})
    return result


def map_11point(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean 11-point AP over the classes that have at least one positive (VOC2007 mAP).

    Args:
        scores: (N, C) float.
        targets: (N, C) 0/1.
    """
    aps = [entry["ap"] for entry in per_class_ap(scores, targets) if entry["ap"] is not None]
    if not aps:
        raise ValueError("map_11point is undefined: no class has a positive sample.")
    return float(np.mean(aps))


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative).

    Tied positive/negative pairs count one half (Mann-Whitney U with average ranks); equals
    ``sklearn.metrics.roc_auc_score``. For (N, 2) classifier scores pass
    ``scores[:, 1] - scores[:, 0]`` (or use ``compute_metric("roc_auc", ...)``).

    Args:
        scores: (N,) float, higher means more likely positive.
        targets: (N,) 0/1 with both values present.
    """
    scores, targets = _check_binary(scores, targets, "roc_auc")
    num_pos = int(targets.sum())
    num_neg = targets.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            "roc_auc needs both positive and negative samples; the evaluated split has only one class."
        )
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # average 1-based rank of each group of tied scores
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[group.ravel()][targets].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


# --------------------------------------------------------------------------------------------
# DataComp's WILDS and fairness metrics (mlfoundations/datacomp eval_utils/wilds_eval.py and
# fairness_eval.py): macro-F1 and the accuracy of the worst group of samples


def macro_f1(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean F1 of the argmax prediction over the classes present in ``targets``.

    Equals ``sklearn.metrics.f1_score(targets, scores.argmax(1), average="macro",
    labels=np.unique(targets))``, which is what WILDS' ``F1(average="macro")`` computes and DataComp
    reports for iWildCam as ``F1-macro_all``: a class predicted but absent from the test labels
    adds no F1 term of its own, but its wrong predictions still lower the recall of the true classes.

    Args:
        scores: (N, C) float.
        targets: (N,) int in [0, C).
    """
    scores, targets = _check_single_label(scores, targets)
    predictions = np.argmax(scores, axis=1)
    num_classes = scores.shape[1]
    support = np.bincount(targets, minlength=num_classes)
    predicted = np.bincount(predictions, minlength=num_classes)
    hits = np.bincount(targets[predictions == targets], minlength=num_classes)
    present = support > 0
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted + support); support > 0 keeps it defined
    return float(np.mean(2.0 * hits[present] / (predicted[present] + support[present])))


def _check_groups(groups: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if groups is None:
        raise ValueError(
            f"{name} needs each sample's group label; the dataset spec names the metadata column "
            "that holds it (source.group_column) and the data must provide it."
        )
    groups = np.asarray(groups)
    if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"{name}: groups must be (N,) = ({n},) integers, got {groups.shape} {groups.dtype}.")
    return groups.astype(np.int64)


def group_topk_accuracy(scores: np.ndarray, targets: np.ndarray, groups: np.ndarray,
                        k: int = 1) -> dict[int, tuple[float, int]]:
    """Top-k accuracy of each group present: ``{group: (accuracy, number of samples)}``, by group."""
    scores, targets = _check_single_label(scores, targets)
    groups = _check_groups(groups, scores.shape[0], "group accuracy")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"top-{k} accuracy needs 1 <= k <= number of classes ({scores.shape[1]}).")
    hit = _target_ranks(scores, targets) < k
    labels, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse.ravel(), weights=hit, minlength=labels.size)
    return {int(g): (float(h / c), int(c)) for g, h, c in zip(labels, hits, counts)}


def worst_group_accuracy(scores: np.ndarray, targets: np.ndarray, groups: np.ndarray, k: int = 1) -> float:
    """The lowest top-k accuracy over the groups that have samples (WILDS' ``worst`` over group
    accuracies with a count > 0, as DataComp's GeoDE ``acc_wg`` (regions), Dollar Street
    ``acc_top5_wg`` (k = 5, income groups) and FMoW ``acc_worst_region`` (regions)).

    Args:
        scores: (N, C) float.
        targets: (N,) int in [0, C).
        groups: (N,) int group label of each sample.
        k: top-k (ties toward the lower class index, as every metric here).
    """
    return min(acc for acc, _ in group_topk_accuracy(scores, targets, groups, k).values())


# --------------------------------------------------------------------------------------------
# the metric registry

#: What a metric's inputs are; :func:`compute_metric` validates them per kind (see :class:`Metric`).
MetricKind = Literal["single_label", "multilabel", "binary"]

#: ``resampled(scores, targets)`` -> a function from bootstrap indices (R, N) to R metric values.
ResampledForm = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class Metric:
    """One classification metric, as registered with :func:`register_metric`.

    Attributes:
        name: the name used in dataset specs and result records, e.g. ``"accuracy"``.
        kind: the inputs ``compute`` takes, validated by :func:`compute_metric`:
            ``"single_label"``: (N, C) scores and (N,) int class indices in [0, C);
            ``"multilabel"``: (N, C) scores and an (N, C) 0/1 matrix;
            ``"binary"``: (N,) scores of the positive class and (N,) 0/1 targets (callers may pass
            (N, 2) scores, reduced to ``scores[:, 1] - scores[:, 0]``).
        compute: ``compute(scores, targets) -> float`` on inputs of that kind; raises ValueError
            where the metric is undefined (e.g. a single class for ROC AUC).
        resampled: ``resampled(scores, targets)`` returns a function mapping bootstrap indices
            (R, N) to the metric on each resample (R,), NaN where it is undefined; it must equal
            ``compute(scores[idx[r]], targets[idx[r]])`` for every row r. None: the bootstrap
            recomputes ``compute`` on each resample instead (exact, but a Python loop).
        min_classes: fewest score columns the metric is defined for (5 for top-5 accuracy).
        description: one line for listings and docs.
        grouped: the metric also needs each sample's group label (worst-group accuracy): then
            ``compute`` and ``resampled`` take (N,) int groups as a third argument; the data gives
            them (a spec's ``source.group_column``).
    """

    name: str
    kind: MetricKind
    compute: Callable[..., float]
    resampled: ResampledForm | None
    min_classes: int = 1
    description: str = ""
    grouped: bool = False


def binary_scores(scores: np.ndarray, name: str = "a binary metric") -> np.ndarray:
    """The positive-class score a binary metric ranks: (N,) as given, or from (N, 2) scores
    ``scores[:, 1] - scores[:, 0]`` in float64 (class 1 is positive)."""
    scores = np.asarray(scores)
    if scores.ndim == 2:
        if scores.shape[1] != 2:
            raise ValueError(
                f"{name} is a binary metric: scores must be (N,) or (N, 2), got {scores.shape}."
            )
        scores = scores[:, 1].astype(np.float64) - scores[:, 0]
    return scores


def _binary_inputs(name: str, scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) or (N, 2) scores (class 1 is positive) and (N,) 0/1 targets -> (N,) scores, bool targets."""
    return _check_binary(binary_scores(scores, name), targets, name)


# kind -> validation of (metric name, scores, targets), returning the arrays `compute` takes
_KIND_INPUTS: dict[str, Callable[[str, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "single_label": lambda _name, scores, targets: _check_single_label(scores, targets),
    "multilabel": lambda _name, scores, targets: _check_multilabel(scores, targets),
    "binary": _binary_inputs,
}

_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to the registry read by :func:`compute_metric`, the bootstrap and spec validation.

    Returns:
        ``metric``, so a module can keep it under a name.

    Raises:
        ValueError: the name is taken, or the kind or ``min_classes`` is invalid.
    """
    if not isinstance(metric.name, str) or not metric.name:
        raise ValueError(f"a metric needs a non-empty string name, got {metric.name!r}.")
    if metric.name in _REGISTRY:
        raise ValueError(
            f"metric {metric.name!r} is already registered; choose another name (a registered "
            "metric is never replaced, so records keep one meaning per name)."
        )
    if metric.kind not in _KIND_INPUTS:
        raise ValueError(
            f"metric {metric.name!r} has kind {metric.kind!r}; use one of {', '.join(_KIND_INPUTS)}."
        )
    if not isinstance(metric.min_classes, int) or metric.min_classes < 1:
        raise ValueError(f"metric {metric.name!r}: min_classes must be an integer >= 1, got {metric.min_classes!r}.")
    _REGISTRY[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric called ``name``.

    Raises:
        ValueError: unknown name; the message lists the close names and every registered one.
    """
    metric = _REGISTRY.get(name)
    if metric is not None:
        return metric
    names = list(_REGISTRY)
    close = difflib.get_close_matches(str(name), names, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    if is_retrieval_metric(name):
        hint += " It is a retrieval metric: clipbench.tasks.retrieval.retrieval_metrics computes it."
    raise ValueError(
        f"unknown classification metric {name!r}.{hint} Registered metrics: {', '.join(names)}; "
        "add another with clipbench.metrics.register_metric."
    )


def metric_names(kind: MetricKind | None = None) -> tuple[str, ...]:
    """Names of the registered metrics (of one ``kind`` when given), in registration order."""
    return tuple(name for name, metric in _REGISTRY.items() if kind is None or metric.kind == kind)


# --------------------------------------------------------------------------------------------
# bootstrap resampling (used by the resampled forms below)


def resample_indices(n_samples: int, n_resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``range(n_samples)``, in chunks of rows.

    Draws with ``np.random.default_rng(seed).integers(0, n_samples, (rows, n_samples))`` chunk by
    chunk (the chunk size depends only on ``n_samples``) and sorts each row, so a resample lists its
    samples in input order: order-dependent tie rules (11-point AP) see ties as in the full data.

    Yields:
        (rows, n_samples) int64 arrays; rows sum to ``n_resamples``.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // max(n_samples, 1))
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        yield np.sort(rng.integers(0, n_samples, size=(rows, n_samples)), axis=1)


def _row_bincount(values: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-row bincount: (R, N) ints in [0, size) -> (R, size) counts (or summed weights)."""
    offsets = values + size * np.arange(values.shape[0])[:, None]
    flat_weights = None if weights is None else weights.ravel()
    counts = np.bincount(offsets.ravel(), weights=flat_weights, minlength=size * values.shape[0])
    return counts.reshape(values.shape[0], size)


# --------------------------------------------------------------------------------------------
# the built-in metrics: each one's resampled form beside its registration. The resampled forms
# reuse one pass over the full data and equal recomputing the metric on every resample.


def _resampled_per_sample_mean(per_sample: Callable[[np.ndarray], np.ndarray]) -> ResampledForm:
    """Resampled form of a mean of a per-sample value computed from the target ranks."""

    def form(scores: np.ndarray, targets: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        values = per_sample(_target_ranks(scores, targets))
        return lambda idx: values[idx].mean(axis=1)

    return form


register_metric(Metric(
    name="accuracy",
    kind="single_label",
    compute=functools.partial(topk_accuracy, k=1),
    resampled=_resampled_per_sample_mean(lambda ranks: (ranks < 1).astype(np.float64)),
    description="top-1 accuracy: fraction of samples whose argmax class is the target",
))
register_metric(Metric(
    name="top5_accuracy",
    kind="single_label",
    compute=functools.partial(topk_accuracy, k=5),
    resampled=_resampled_per_sample_mean(lambda ranks: (ranks < 5).astype(np.float64)),
    min_classes=5,
    description="top-5 accuracy: fraction of samples whose target is among the 5 highest-scored classes",
))


def _resampled_mean_per_class_recall(scores: np.ndarray, targets: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """From per-resample class counts and hit counts."""
    correct = (np.argmax(scores, axis=1) == targets).astype(np.float64)
    num_classes = scores.shape[1]

    def mean_recall(idx: np.ndarray) -> np.ndarray:
        counts = _row_bincount(targets[idx], num_classes)
        hits = _row_bincount(targets[idx], num_classes, correct[idx])
        recall = np.divide(hits, counts, out=np.zeros_like(hits), where=counts > 0)
        return recall.sum(axis=1) / (counts > 0).sum(axis=1)

    return mean_recall


register_metric(Metric(
    name="mean_per_class_recall",
    kind="single_label",
    compute=mean_per_class_recall,
    resampled=_resampled_mean_per_class_recall,
    description="mean over the classes present of the recall of the argmax prediction (balanced accuracy)",
))


def _resampled_map_11point(scores: np.ndarray, targets: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """From the resample multiplicities read along each class's fixed ranking."""
    orders = [np.argsort(-scores[:, c], kind="stable") for c in range(scores.shape[1])]

    def mean_ap(idx: np.ndarray) -> np.ndarray:
        multiplicity = _row_bincount(idx, scores.shape[0]).astype(np.float64)
        aps = np.full((idx.shape[0], scores.shape[1]), np.nan)
        for c, order in enumerate(orders):
            ranked = multiplicity[:, order]
            tp = np.cumsum(ranked * targets[order, c], axis=1)
            has_positive = tp[:, -1] > 0
            if has_positive.all():
                aps[:, c] = _eleven_point_ap(tp, np.cumsum(ranked, axis=1), tp[:, -1])
            elif has_positive.any():
                retrieved = np.cumsum(ranked[has_positive], axis=1)
                aps[has_positive, c] = _eleven_point_ap(tp[has_positive], retrieved, tp[has_positive, -1])
        defined = ~np.isnan(aps)
        sums = np.where(defined, aps, 0.0).sum(axis=1)
        count = defined.sum(axis=1)
        return np.divide(sums, count, out=np.full_like(sums, np.nan), where=count > 0)

    return mean_ap


register_metric(Metric(
    name="map_11point",
    kind="multilabel",
    compute=map_11point,
    resampled=_resampled_map_11point,
    description="VOC2007 mean 11-point interpolated average precision over classes with a positive",
))


def _resampled_roc_auc(scores: np.ndarray, targets: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """From per-resample positive / negative counts in each group of tied scores."""
    _, group = np.unique(scores, return_inverse=True)
    group = group.ravel()  # ascending index of each sample's tied-score group
    num_groups = int(group.max()) + 1
    positive = targets.astype(np.float64)

    def auc(idx: np.ndarray) -> np.ndarray:
        positives = _row_bincount(group[idx], num_groups, positive[idx])
        negatives = _row_bincount(group[idx], num_groups, 1.0 - positive[idx])
        negatives_below = np.cumsum(negatives, axis=1) - negatives
        wins = (positives * (negatives_below + 0.5 * negatives)).sum(axis=1)
        pairs = positives.sum(axis=1) * negatives.sum(axis=1)
        return np.divide(wins, pairs, out=np.full_like(wins, np.nan), where=pairs > 0)

    return auc


register_metric(Metric(
    name="roc_auc",
    kind="binary",
    compute=roc_auc,
    resampled=_resampled_roc_auc,
    min_classes=2,
    description="area under the ROC curve of the positive class (class 1)",
))
register_metric(Metric(
    name="mean_top1_top5",
    kind="single_label",
    compute=mean_top1_top5,
    resampled=_resampled_per_sample_mean(
        lambda ranks: ((ranks < 1).astype(np.float64) + (ranks < 5).astype(np.float64)) / 2.0
    ),
    min_classes=5,
    description="mean of top-1 and top-5 accuracy (the paper's Kinetics700 metric)",
))


def _resampled_macro_f1(scores: np.ndarray, targets: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """From per-resample class supports, prediction counts and hits."""
    predictions = np.argmax(scores, axis=1)
    correct = (predictions == targets).astype(np.float64)
    num_classes = scores.shape[1]

    def f1(idx: np.ndarray) -> np.ndarray:
        support = _row_bincount(targets[idx], num_classes)
        predicted = _row_bincount(predictions[idx], num_classes)
        hits = _row_bincount(targets[idx], num_classes, correct[idx])
        present = support > 0
        terms = np.divide(2.0 * hits, predicted + support, out=np.zeros_like(hits), where=present)
        return terms.sum(axis=1) / present.sum(axis=1)

    return f1


def worst_group_of_hits(hit: np.ndarray, groups: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Worst-group accuracy on resamples, from each sample's 0/1 ``hit`` (N,) and group (N,): a
    function from resample indices (R, N) to (R,) the lowest per-group mean over the groups each
    resample holds."""
    hit = np.asarray(hit, dtype=np.float64)
    labels, group_index = np.unique(groups, return_inverse=True)
    group_index = group_index.ravel()

    def worst(idx: np.ndarray) -> np.ndarray:
        counts = _row_bincount(group_index[idx], labels.size)
        hits = _row_bincount(group_index[idx], labels.size, hit[idx])
        accuracy = np.divide(hits, counts, out=np.full_like(hits, np.inf), where=counts > 0)
        return accuracy.min(axis=1)  # a resample holds at least one group

    return worst


def _resampled_worst_group(k: int) -> Callable[..., Callable[[np.ndarray], np.ndarray]]:
    """Resampled worst-group top-k accuracy, from per-resample group counts and hits."""

    def form(scores: np.ndarray, targets: np.ndarray, groups: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return worst_group_of_hits(_target_ranks(scores, targets) < k, groups)

    return form


#: the grouped metrics that are worst-group top-k accuracies, and their k
WORST_GROUP_K = {"worst_group_accuracy": 1, "worst_group_top5_accuracy": 5}


register_metric(Metric(
    name="macro_f1",
    kind="single_label",
    compute=macro_f1,
    resampled=_resampled_macro_f1,
    description="mean F1 over the classes present in the test labels (DataComp's iWildCam F1-macro_all)",
))
register_metric(Metric(
    name="worst_group_accuracy",
    kind="single_label",
    compute=worst_group_accuracy,
    resampled=_resampled_worst_group(WORST_GROUP_K["worst_group_accuracy"]),
    grouped=True,
    description="lowest top-1 accuracy over the sample groups (DataComp: GeoDE acc_wg, FMoW acc_worst_region)",
))
register_metric(Metric(
    name="worst_group_top5_accuracy",
    kind="single_label",
    compute=functools.partial(worst_group_accuracy, k=WORST_GROUP_K["worst_group_top5_accuracy"]),
    resampled=_resampled_worst_group(WORST_GROUP_K["worst_group_top5_accuracy"]),
    min_classes=5,
    grouped=True,
    description="lowest top-5 accuracy over the sample groups (DataComp: Dollar Street acc_top5_wg)",
))

#: The built-in classification metrics (see docs/architecture.md); :func:`metric_names` also
#: lists metrics registered later.
CLASSIFICATION_METRICS = metric_names()


# --------------------------------------------------------------------------------------------
# dispatch


def _prepare(metric: Metric, scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate inputs for ``metric`` by its kind; returns the arrays its ``compute`` takes."""
    return _KIND_INPUTS[metric.kind](metric.name, scores, targets)


def compute_metric(name: str, scores: np.ndarray, targets: np.ndarray,
                   groups: np.ndarray | None = None) -> float:
    """Compute the registered classification metric ``name`` (see :func:`metric_names`).

    Args:
        name: metric name from docs/architecture.md, or one added by :func:`register_metric`.
        scores: (N, C) float; for a binary metric (``roc_auc``) also (N,) scores of the positive
            class, and (N, 2) scores are reduced to ``scores[:, 1] - scores[:, 0]`` (class 1 is
            positive).
        targets: (N,) int class indices, or (N, C) 0/1 for a multi-label metric (``map_11point``).
        groups: (N,) int group label of each sample; needed by a grouped metric
            (``worst_group_accuracy``), ignored by the others.

    Raises:
        ValueError: unknown name (with the close names), malformed input, or an undefined metric.
    """
    metric = get_metric(name)
    scores, targets = _prepare(metric, scores, targets)
    if metric.grouped:
        return metric.compute(scores, targets, _check_groups(groups, len(targets), name))
    return metric.compute(scores, targets)


def classification_metrics(
    scores: np.ndarray, targets: np.ndarray, primary_metric: str, multilabel: bool = False,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics recorded for a classification evaluation.

    Single-label: ``primary_metric`` plus ``accuracy``, ``top5_accuracy`` (only when C > 5) and
    ``mean_per_class_recall``. Multi-label: the primary metric only (``map_11point``).

    Args:
        scores: (N, C) float.
        targets: (N,) int, or (N, C) 0/1 when ``multilabel``.
        primary_metric: the dataset's metric name (docs/architecture.md).
        multilabel: whether ``targets`` is a 0/1 matrix.
        groups: (N,) int group labels, for a grouped primary metric (worst-group accuracy).

    Returns:
        name -> value in [0, 1], never NaN; the primary metric first.
    """
    if multilabel != (get_metric(primary_metric).kind == "multilabel"):
        raise ValueError(
            f"primary metric {primary_metric!r} does not fit a "
            f"{'multi' if multilabel else 'single'}-label dataset; multi-label datasets use "
            "map_11point and single-label datasets any other classification metric. Fix the "
            "dataset spec's primary_metric or multilabel field."
        )
    names = [primary_metric]
    if not multilabel:
        names += ["accuracy"] + (["top5_accuracy"] if np.shape(scores)[1] > 5 else []) + ["mean_per_class_recall"]
    return {name: compute_metric(name, scores, targets, groups) for name in dict.fromkeys(names)}


# --------------------------------------------------------------------------------------------
# bootstrap


def _recomputed(metric: Metric, scores: np.ndarray, targets: np.ndarray,
                groups: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The resampled form of a metric without one: ``compute`` on each resample (a grouped metric
    with the resampled samples' groups), NaN where undefined."""

    def statistic(idx: np.ndarray) -> np.ndarray:
        values = np.empty(idx.shape[0])
        for r, rows in enumerate(idx):
            extra = (groups[rows],) if metric.grouped else ()
            try:
                values[r] = metric.compute(scores[rows], targets[rows], *extra)
            except ValueError:  # undefined on this resample (e.g. a single class)
                values[r] = np.nan
        return values

    return statistic


def _resampled_metric(name: str, scores: np.ndarray, targets: np.ndarray,
                      groups: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping resample indices (R, N) to metric ``name`` on each resample (R,).

    ``scores`` and ``targets`` are already validated for the metric's kind. The registered
    resampled form when there is one, else :func:`_recomputed`; NaN where the metric is undefined.
    """
    metric = get_metric(name)
    if metric.resampled is None:
        return _recomputed(metric, scores, targets, groups)
    return metric.resampled(scores, targets, *((groups,) if metric.grouped else ()))


def bootstrap_distribution(
    scores: np.ndarray, targets: np.ndarray, metric: str, n_resamples: int = 1000, seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Metric ``metric`` on each bootstrap resample (samples drawn with replacement).

    Args:
        scores, targets: as for :func:`compute_metric`.
        metric: a registered metric name (:func:`metric_names`).
        n_resamples: number of resamples R.
        seed: seed of the resampling (:func:`resample_indices`).
        groups: (N,) int group labels, for a grouped metric.

    Returns:
        (R,) float64; NaN for resamples where the metric is undefined (e.g. ROC AUC of a resample
        holding a single class).
    """
    entry = get_metric(metric)
    scores, targets = _prepare(entry, scores, targets)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}.")
    # binary scores are (N,) by now: two classes by construction
    if scores.ndim == 2 and scores.shape[1] < entry.min_classes:
        raise ValueError(f"{metric} needs at least {entry.min_classes} classes, got {scores.shape[1]}.")
    if entry.grouped:
        groups = _check_groups(groups, len(targets), metric)
    statistic = _resampled_metric(metric, scores, targets, groups)
    return np.concatenate([statistic(idx) for idx in resample_indices(scores.shape[0], n_resamples, seed)])


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}.")


def percentile_interval(statistics: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap statistics, e.g. 2.5th-97.5th percentiles."""
    _check_confidence(confidence)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(statistics, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    scores: np.ndarray,
    targets: np.ndarray,
    metric: str,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a classification metric over test samples.

    Args:
        scores, targets: as for :func:`compute_metric`.
        metric: a registered metric name (:func:`metric_names`).
        n_resamples: number of resamples (1000 takes well under a second for accuracy-type
            metrics at N = 50,000).
        confidence: coverage in (0, 1), e.g. 0.95 for the 2.5th and 97.5th percentiles.
        seed: makes the interval reproducible.
        groups: (N,) int group labels, for a grouped metric.

    Returns:
        (low, high) fractions in [0, 1]. Resamples where the metric is undefined are skipped.
    """
    _check_confidence(confidence)  # before the resampling, which can take a while
    statistics = bootstrap_distribution(scores, targets, metric, n_resamples, seed, groups)
    defined = statistics[~np.isnan(statistics)]
    if defined.size == 0:
        raise ValueError(
            f"{metric} is undefined on every bootstrap resample (too few samples of some class); "
            "evaluate on more samples or disable confidence intervals (n_bootstrap=0)."
        )
    if defined.size < statistics.size:
        log.warning(
            "%s undefined on %d of %d bootstrap resamples; they are skipped",
            metric, statistics.size - defined.size, statistics.size,
        )
    return percentile_interval(defined, confidence)


# --------------------------------------------------------------------------------------------
# retrieval metric names (the metrics themselves: clipbench.tasks.retrieval)

#: Query directions of retrieval, in the order their metrics are recorded.
RETRIEVAL_DIRECTIONS = ("text_to_image", "image_to_text")
#: Sum of every recall@k of both directions.
RSUM = "rsum"

_RECALL_METRIC_RE = re.compile(r"(text_to_image|image_to_text)_R@([0-9]+)")
_MEAN_RECALL_RE = re.compile(r"mean_recall@([0-9]+)")


def recall_metric_name(direction: str, k: int) -> str:
    """The name of recall@k in ``direction`` (one of :data:`RETRIEVAL_DIRECTIONS`), e.g. ``text_to_image_R@5``."""
    return f"{direction}_R@{k}"


def parse_recall_metric(name: str) -> tuple[str, int] | None:
    """``(direction, k)`` of a recall@k name such as ``"image_to_text_R@5"``; None for any other name."""
    match = _RECALL_METRIC_RE.fullmatch(name) if isinstance(name, str) else None
    return None if match is None else (match.group(1), int(match.group(2)))


def mean_recall_metric_name(k: int) -> str:
    """DataComp's name of the mean of both directions' recall@k, e.g. ``mean_recall@1``."""
    return f"mean_recall@{k}"


def with_mean_recalls(values: dict[str, float], recall_k: Sequence[int]) -> dict[str, float]:
    """``values`` plus ``mean_recall@k`` = (text_to_image_R@k + image_to_text_R@k) / 2 for each k:
    DataComp's retrieval metric (eval_utils/retr_eval.py: the mean of clip_benchmark's
    ``text_retrieval_recall@1`` and ``image_retrieval_recall@1``)."""
    out = dict(values)
    for k in recall_k:
        pair = [values[recall_metric_name(direction, k)] for direction in RETRIEVAL_DIRECTIONS]
        out[mean_recall_metric_name(k)] = 0.5 * (pair[0] + pair[1])
    return out


def is_retrieval_metric(name: str) -> bool:
    """Whether ``name`` is a retrieval metric a dataset can be scored by: a recall@k, a
    ``mean_recall@k`` or ``rsum``.

    The rank statistics ``{direction}_mean_rank`` / ``{direction}_median_rank`` are recorded too,
    but lower is better, so they are not primary metrics and this returns False for them.
    """
    if isinstance(name, str) and _MEAN_RECALL_RE.fullmatch(name):
        return True
    return name == RSUM or parse_recall_metric(name) is not None
