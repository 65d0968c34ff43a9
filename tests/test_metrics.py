"""Metrics against hand-computed cases and independent implementations (sklearn, exact fractions)."""

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score, top_k_accuracy_score

from clipbench import metrics

from conftest import reference_ap_11point


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------- top-k accuracy


@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_accuracy_matches_sklearn(rng, k):
    scores = rng.normal(size=(300, 7))
    targets = rng.integers(0, 6, size=300)  # class 6 never occurs
    expected = top_k_accuracy_score(targets, scores, k=k, labels=np.arange(7))
    assert metrics.topk_accuracy(scores, targets, k) == pytest.approx(expected, abs=1e-12)


def test_topk_accuracy_hand_computed_with_ties():
    scores = np.array([
        [0.1, 0.7, 0.2],  # target 1 is the argmax
        [0.5, 0.5, 0.0],  # target 1 ties with class 0; the lower index ranks first
        [0.3, 0.3, 0.3],  # target 0 wins a three-way tie
        [0.9, 0.0, 0.1],  # target 1 is ranked last
    ])
    targets = np.array([1, 1, 0, 1])
    assert metrics.topk_accuracy(scores, targets, 1) == 0.5
    assert metrics.topk_accuracy(scores, targets, 2) == 0.75
    assert metrics.topk_accuracy(scores, targets, 3) == 1.0
    # the tie rule agrees with the argmax prediction used by mean per-class recall
    assert metrics.topk_accuracy(scores, targets, 1) == np.mean(scores.argmax(1) == targets)


def test_mean_top1_top5(rng):
    scores = rng.normal(size=(200, 12))
    targets = rng.integers(0, 12, size=200)
    labels = np.arange(12)
    expected = (top_k_accuracy_score(targets, scores, k=1, labels=labels)
                + top_k_accuracy_score(targets, scores, k=5, labels=labels)) / 2
    assert metrics.mean_top1_top5(scores, targets) == pytest.approx(expected, abs=1e-12)
    assert metrics.compute_metric("mean_top1_top5", scores, targets) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- per-class recall


def test_mean_per_class_recall_matches_sklearn_with_absent_classes(rng):
    scores = rng.normal(size=(250, 9))
    scores[:, 3] += 0.5  # class 3 is predicted often but never occurs
    targets = rng.choice([0, 1, 2, 4, 5, 6, 7, 8], size=250)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about predicted classes absent from y_true
        expected = balanced_accuracy_score(targets, scores.argmax(1))
    assert metrics.mean_per_class_recall(scores, targets) == pytest.approx(expected, abs=1e-12)


def test_per_class_recall_hand_computed():
    scores = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 0]])
    targets = np.array([0, 0, 1, 3, 3])  # class 2 absent
    per_class = metrics.per_class_recall(scores, targets, num_classes=4)
    assert per_class == [
        {"class": 0, "n": 2, "recall": 0.5},
        {"class": 1, "n": 1, "recall": 0.0},
        {"class": 2, "n": 0, "recall": None},
        {"class": 3, "n": 2, "recall": 0.5},
    ]
    assert "NaN" not in json.dumps(per_class)
    assert metrics.mean_per_class_recall(scores, targets) == pytest.approx((0.5 + 0.0 + 0.5) / 3)


# ---------------------------------------------------------------- 11-point AP


def test_ap_11point_hand_computed():
    # ranking: +, -, +, -, +  (3 positives)
    # (recall, precision) per rank: (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2), (1, 3/5)
    # t = 0, .1, .2, .3 -> max precision over all ranks = 1          (4 thresholds)
    # t = .4, .5, .6    -> ranks with recall >= t: 3, 4, 5 -> 2/3    (3 thresholds)
    # t = .7, .8, .9, 1 -> rank 5 only -> 3/5                        (4 thresholds)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 1])
    expected = (4 * 1 + 3 * (2 / 3) + 4 * (3 / 5)) / 11
    assert metrics.average_precision_11point(scores, targets) == pytest.approx(expected, abs=1e-12)
    assert reference_ap_11point(scores, targets) == pytest.approx(expected, abs=1e-12)


def test_ap_11point_recall_exactly_on_threshold():
    # 10 positives; recall reaches exactly 0.3 at rank 3 with precision 1, then falls to 3/13 of
    # precision until the end. A float grid (np.arange(0, 1.1, 0.1)[3] = 0.30000000000000004)
    # would wrongly skip rank 3 for t = 0.3.
    targets = np.array([1, 1, 1] + [0] * 10 + [1] * 7)
    scores = -np.arange(targets.size, dtype=float)
    ap = metrics.average_precision_11point(scores, targets)
    assert ap == pytest.approx(reference_ap_11point(scores, targets), abs=1e-12)
    # t = 0 .. 0.3 use precision 1 (4 thresholds); t = 0.4 .. 1 use the final rank, 10/20.
    assert ap == pytest.approx((4 * 1 + 7 * 0.5) / 11, abs=1e-12)


def test_ap_11point_ties_keep_input_order():
    assert metrics.average_precision_11point(np.array([0.5, 0.5]), np.array([1, 0])) == 1.0
    assert metrics.average_precision_11point(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def test_ap_11point_matches_reference_on_random_with_ties(rng):
    for _ in range(20):
        n = int(rng.integers(5, 60))
        scores = np.round(rng.normal(size=n), 1)  # many ties
        targets = rng.integers(0, 2, size=n)
        targets[0] = 1
        assert metrics.average_precision_11point(scores, targets) == pytest.approx(
            reference_ap_11point(scores, targets), abs=1e-12
        )


def test_map_11point_skips_classes_without_positives(rng):
    scores = rng.normal(size=(40, 4))
    targets = rng.integers(0, 2, size=(40, 4))
    targets[:, 2] = 0
    expected = np.mean([reference_ap_11point(scores[:, c], targets[:, c]) for c in (0, 1, 3)])
    assert metrics.map_11point(scores, targets) == pytest.approx(expected, abs=1e-12)
    per_class = metrics.per_class_ap(scores, targets)
    assert per_class[2] == {"class": 2, "n": 0, "ap": None}
    assert per_class[0]["n"] == targets[:, 0].sum()


# ---------------------------------------------------------------- ROC AUC


def test_roc_auc_hand_computed():
    # positives 0.35, 0.8; negatives 0.1, 0.4: 3 of the 4 pairs are ordered correctly
    assert metrics.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # a tied pair gets half credit
    assert metrics.roc_auc(np.array([0.5, 0.5, 0.9]), np.array([0, 1, 1])) == 0.75


def test_roc_auc_matches_sklearn_with_ties(rng):
    scores = np.round(rng.normal(size=500), 1)
    targets = rng.integers(0, 2, size=500)
    assert metrics.roc_auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_compute_metric_roc_auc_from_two_column_scores(rng):
    scores = rng.normal(size=(100, 2))
    targets = rng.integers(0, 2, size=100)
    expected = roc_auc_score(targets, scores[:, 1] - scores[:, 0])
    assert metrics.compute_metric("roc_auc", scores, targets) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- dispatch and metric sets


def test_compute_metric_dispatch(rng):
    scores = rng.normal(size=(80, 8))
    targets = rng.integers(0, 8, size=80)
    assert metrics.compute_metric("accuracy", scores, targets) == metrics.topk_accuracy(scores, targets, 1)
    assert metrics.compute_metric("top5_accuracy", scores, targets) == metrics.topk_accuracy(scores, targets, 5)
    assert metrics.compute_metric("mean_per_class_recall", scores, targets) == metrics.mean_per_class_recall(
        scores, targets
    )


def test_classification_metrics_sets(rng):
    many = metrics.classification_metrics(rng.normal(size=(50, 10)), rng.integers(0, 10, 50), "mean_per_class_recall")
    assert list(many) == ["mean_per_class_recall", "accuracy", "top5_accuracy"]
    few = metrics.classification_metrics(rng.normal(size=(50, 3)), rng.integers(0, 3, 50), "accuracy")
    assert list(few) == ["accuracy", "mean_per_class_recall"]
    binary = metrics.classification_metrics(rng.normal(size=(50, 2)), rng.integers(0, 2, 50), "roc_auc")
    assert list(binary) == ["roc_auc", "accuracy", "mean_per_class_recall"]
    multi = metrics.classification_metrics(
        rng.normal(size=(50, 4)), rng.integers(0, 2, (50, 4)), "map_11point", multilabel=True
    )
    assert list(multi) == ["map_11point"]
    for values in (many, few, binary, multi):
        assert all(np.isfinite(v) and 0 <= v <= 1 for v in values.values())
    with pytest.raises(ValueError, match="primary metric"):
        metrics.classification_metrics(rng.normal(size=(5, 3)), rng.integers(0, 3, 5), "map_11point")


@pytest.mark.parametrize(
    "name, scores, targets, error, message",
    [
        ("accuracy", np.zeros((3, 4)), np.array([0, 1, 4]), ValueError, r"\[0, 4\)"),
        ("accuracy", np.array([[np.nan, 0.0]]), np.array([0]), ValueError, "NaN"),
        ("accuracy", np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]), TypeError, "integer"),
        ("top5_accuracy", np.zeros((3, 4)), np.array([0, 1, 2]), ValueError, "number of classes"),
        ("roc_auc", np.array([0.1, 0.2]), np.array([1, 1]), ValueError, "both positive and negative"),
        ("roc_auc", np.zeros((4, 3)), np.array([0, 1, 0, 1]), ValueError, "binary"),
        ("map_11point", np.zeros((3, 2)), np.zeros((3, 2), dtype=int), ValueError, "no class has a positive"),
        ("recall@5", np.zeros((3, 2)), np.array([0, 1, 0]), ValueError, "unknown classification metric"),
    ],
)
def test_bad_input_raises_clear_errors(name, scores, targets, error, message):
    with pytest.raises(error, match=message):
        metrics.compute_metric(name, scores, targets)


# ---------------------------------------------------------------- bootstrap


def _groups(name, n):
    """Group labels for a grouped metric (three groups of unequal sizes), else None."""
    return (np.arange(n) * 7 % 5 % 3) if metrics.get_metric(name).grouped else None


def _naive_bootstrap(scores, targets, metric, n_resamples, seed, groups=None):
    values = []
    for chunk in metrics.resample_indices(len(targets), n_resamples, seed):
        for idx in chunk:
            try:
                values.append(metrics.compute_metric(metric, scores[idx], targets[idx],
                                                     None if groups is None else groups[idx]))
            except ValueError:
                values.append(np.nan)
    return np.array(values)


def _problem(rng, metric, n):
    if metric == "map_11point":
        targets = (rng.random((n, 4)) < 0.3).astype(np.uint8)
        targets[:, 3] = 0
        targets[:2, 3] = 1  # a rare class, absent from many resamples
        return np.round(rng.normal(size=(n, 4)) + targets, 1), targets
    if metric == "roc_auc":
        targets = rng.integers(0, 2, size=n)
        targets[:3] = [1, 0, 1]
        return np.round(rng.normal(size=(n, 2)) + np.eye(2)[targets], 1), targets
    targets = rng.integers(0, 8, size=n)
    return np.round(rng.normal(size=(n, 8)) + 1.5 * np.eye(8)[targets], 1), targets


@pytest.mark.parametrize("metric", metrics.CLASSIFICATION_METRICS)
def test_bootstrap_matches_naive_loop(rng, metric):
    scores, targets = _problem(rng, metric, 60)
    groups = _groups(metric, 60)
    fast = metrics.bootstrap_distribution(scores, targets, metric, n_resamples=150, seed=3, groups=groups)
    naive = _naive_bootstrap(scores, targets, metric, 150, 3, groups)
    np.testing.assert_allclose(fast, naive, rtol=0, atol=1e-12)
    defined = naive[~np.isnan(naive)]
    assert metrics.bootstrap_ci(scores, targets, metric, 150, 0.9, seed=3, groups=groups) == pytest.approx(
        tuple(np.quantile(defined, [0.05, 0.95])), abs=1e-12
    )


def test_bootstrap_seeded_and_contains_point_estimate(rng):
    scores, targets = _problem(rng, "accuracy", 400)
    first = metrics.bootstrap_ci(scores, targets, "accuracy", seed=7)
    assert metrics.bootstrap_ci(scores, targets, "accuracy", seed=7) == first
    assert metrics.bootstrap_ci(scores, targets, "accuracy", seed=8) != first
    low, high = first
    assert low < metrics.compute_metric("accuracy", scores, targets) < high


def test_bootstrap_width_shrinks_with_n(rng):
    small = metrics.bootstrap_ci(*_problem(rng, "accuracy", 100), "accuracy", n_resamples=400)
    large = metrics.bootstrap_ci(*_problem(rng, "accuracy", 3000), "accuracy", n_resamples=400)
    # the width of a binomial proportion's interval scales as 1 / sqrt(N): about 5.5x here
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3


# ---------------------------------------------------------------- the registry


def _registry_problem(rng, metric, n=120):
    """Random inputs of the metric's kind, with ties (scores rounded to one decimal)."""
    if metric.kind == "multilabel":
        targets = (rng.random((n, 5)) < 0.3).astype(np.uint8)
        targets[0] = 1  # every class has a positive
        return np.round(rng.normal(size=(n, 5)) + targets, 1), targets
    if metric.kind == "binary":
        targets = rng.integers(0, 2, size=n)
        targets[:2] = [0, 1]
        return np.round(rng.normal(size=n) + targets, 1), targets
    targets = rng.integers(0, 8, size=n)
    return np.round(rng.normal(size=(n, 8)) + np.eye(8)[targets], 1), targets


def _independent(name, scores, targets, groups=None):
    """Each built-in metric by sklearn.metrics, or by the literal VOC AP above; worst-group
    accuracy by a loop over the groups."""
    labels = np.arange(np.shape(scores)[1]) if np.ndim(scores) == 2 else None
    if name in ("worst_group_accuracy", "worst_group_top5_accuracy"):
        per_group = []
        for g in set(groups.tolist()):
            rows = groups == g
            if name == "worst_group_accuracy":
                per_group.append(accuracy_score(targets[rows], np.argmax(scores[rows], axis=1)))
            else:
                per_group.append(top_k_accuracy_score(targets[rows], scores[rows], k=5, labels=labels))
        return min(per_group)
    if name == "macro_f1":
        # WILDS' F1(average="macro"): sklearn over the labels present in the targets
        return f1_score(targets, np.argmax(scores, axis=1), average="macro", labels=np.unique(targets))
    if name == "accuracy":
        # sklearn's accuracy of the argmax (np.argmax breaks ties toward the lower index, as the metric)
        return accuracy_score(targets, np.argmax(scores, axis=1))
    if name == "top5_accuracy":
        # top_k_accuracy_score breaks ties differently: compare on tie-free scores only
        return top_k_accuracy_score(targets, scores, k=5, labels=labels)
    if name == "mean_top1_top5":
        return (accuracy_score(targets, np.argmax(scores, axis=1))
                + top_k_accuracy_score(targets, scores, k=5, labels=labels)) / 2
    if name == "mean_per_class_recall":
        return balanced_accuracy_score(targets, np.argmax(scores, axis=1))
    if name == "roc_auc":
        return roc_auc_score(targets, scores)
    if name == "map_11point":
        return np.mean([reference_ap_11point(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    raise AssertionError(f"no independent implementation of {name}")


@pytest.mark.parametrize("name", metrics.CLASSIFICATION_METRICS)
def test_every_registered_metric_equals_an_independent_implementation(rng, name):
    metric = metrics.get_metric(name)
    scores, targets = _registry_problem(rng, metric)
    if name in ("top5_accuracy", "mean_top1_top5", "worst_group_top5_accuracy"):
        scores = scores + rng.normal(scale=1e-6, size=scores.shape)  # sklearn's top-k tie rule differs
    groups = _groups(name, len(targets))
    extra = () if groups is None else (groups,)
    expected = _independent(name, scores, targets, groups)
    assert metric.compute(scores, targets, *extra) == pytest.approx(expected, abs=1e-12)
    assert metrics.compute_metric(name, scores, targets, groups) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", metrics.CLASSIFICATION_METRICS)
def test_resampled_form_equals_compute_on_each_explicit_resample(rng, name):
    metric = metrics.get_metric(name)
    scores, targets = _registry_problem(rng, metric, n=40)
    # explicit resamples: with repeats, a sample missing, and (for small data) rare classes lost
    idx = np.sort(rng.integers(0, len(targets), size=(25, len(targets))), axis=1)
    idx[0] = np.arange(len(targets))  # the full data
    groups = _groups(name, len(targets))
    extra = () if groups is None else (groups,)
    resampled = metric.resampled(scores, targets, *extra)(idx)
    for r, rows in enumerate(idx):
        try:
            expected = metric.compute(scores[rows], targets[rows], *(g[rows] for g in extra))
        except ValueError:
            expected = np.nan
        np.testing.assert_allclose(resampled[r], expected, rtol=0, atol=1e-12)
    assert resampled[0] == metric.compute(scores, targets, *extra)


def test_registry_entries_state_kind_and_minimum_classes():
    kinds = {name: metrics.get_metric(name).kind for name in metrics.metric_names()}
    assert kinds == {
        "accuracy": "single_label", "top5_accuracy": "single_label", "mean_per_class_recall": "single_label",
        "map_11point": "multilabel", "roc_auc": "binary", "mean_top1_top5": "single_label",
        "macro_f1": "single_label", "worst_group_accuracy": "single_label",
        "worst_group_top5_accuracy": "single_label",
    }
    assert [n for n in metrics.metric_names() if metrics.get_metric(n).grouped] == [
        "worst_group_accuracy", "worst_group_top5_accuracy"]
    assert metrics.metric_names("multilabel") == ("map_11point",)
    assert {n: metrics.get_metric(n).min_classes for n in ("accuracy", "top5_accuracy", "roc_auc")} == {
        "accuracy": 1, "top5_accuracy": 5, "roc_auc": 2,
    }
    assert metrics.CLASSIFICATION_METRICS == metrics.metric_names()


def test_unknown_metric_is_an_error_naming_close_names(rng):
    scores, targets = rng.normal(size=(10, 3)), rng.integers(0, 3, 10)
    with pytest.raises(ValueError, match=r"unknown classification metric 'acuracy'\. Did you mean 'accuracy'"):
        metrics.compute_metric("acuracy", scores, targets)
    with pytest.raises(ValueError, match="unknown classification metric 'no_such_metric'"):
        metrics.bootstrap_distribution(scores, targets, "no_such_metric", n_resamples=5)
    with pytest.raises(ValueError, match="retrieval metric"):
        metrics.compute_metric("text_to_image_R@1", scores, targets)


def test_resampled_metric_of_an_unknown_name_is_an_error_not_map(rng):
    # it used to fall through to the 11-point mAP for any name it did not know
    scores, targets = rng.normal(size=(10, 3)), (rng.random((10, 3)) < 0.5).astype(np.uint8)
    with pytest.raises(ValueError, match=r"unknown classification metric 'mAP'.*map_11point"):
        metrics._resampled_metric("mAP", scores, targets)


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for this test, so registrations do not leak into other tests."""
    monkeypatch.setattr(metrics, "_REGISTRY", dict(metrics._REGISTRY))


def test_registered_metric_without_resampled_form_bootstraps_by_recomputing(rng, registry):
    from functools import partial

    metrics.register_metric(metrics.Metric(
        "top1_recomputed", "single_label", partial(metrics.topk_accuracy, k=1), resampled=None,
    ))
    scores, targets = _problem(rng, "accuracy", 50)
    assert metrics.compute_metric("top1_recomputed", scores, targets) == accuracy_score(targets, scores.argmax(1))
    np.testing.assert_allclose(
        metrics.bootstrap_distribution(scores, targets, "top1_recomputed", n_resamples=40, seed=2),
        metrics.bootstrap_distribution(scores, targets, "accuracy", n_resamples=40, seed=2),
        rtol=0, atol=1e-12,
    )


def test_register_metric_rejects_taken_names_and_unknown_kinds(registry):
    accuracy = metrics.get_metric("accuracy")
    with pytest.raises(ValueError, match="already registered"):
        metrics.register_metric(accuracy)
    with pytest.raises(ValueError, match="kind 'ranking'"):
        metrics.register_metric(metrics.Metric("other", "ranking", accuracy.compute, None))
    with pytest.raises(ValueError, match="min_classes"):
        metrics.register_metric(metrics.Metric("other", "single_label", accuracy.compute, None, min_classes=0))
    assert "other" not in metrics.metric_names()


def test_bootstrap_checks_minimum_classes(rng):
    scores, targets = rng.normal(size=(20, 4)), rng.integers(0, 4, 20)
    with pytest.raises(ValueError, match="top5_accuracy needs at least 5 classes, got 4"):
        metrics.bootstrap_distribution(scores, targets, "top5_accuracy", n_resamples=5)


# ---------------------------------------------------------------- retrieval metric names


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("text_to_image_R@1", ("text_to_image", 1)),
        ("image_to_text_R@10", ("image_to_text", 10)),
        ("text_to_image_R@", None),
        ("image_to_text_r@5", None),
        ("text_to_image_R@5x", None),
        ("rsum", None),
        ("text_to_image_mean_rank", None),
        ("accuracy", None),
        (None, None),
    ],
)
def test_parse_recall_metric(name, parsed):
    assert metrics.parse_recall_metric(name) == parsed
    if parsed is not None:
        assert metrics.recall_metric_name(*parsed) == name


def test_is_retrieval_metric():
    assert metrics.is_retrieval_metric("rsum")
    assert metrics.is_retrieval_metric("image_to_text_R@5")
    assert not metrics.is_retrieval_metric("text_to_image_median_rank")  # lower is better
    assert not metrics.is_retrieval_metric("accuracy")
    assert not metrics.is_retrieval_metric("rsum ")
