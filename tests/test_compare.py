"""Paired comparisons (`clipbench compare`): each statistic against an independent computation."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from clipbench import compare, specs
from clipbench.cli import main
from clipbench.errors import ClipbenchError
from clipbench.metrics import percentile_interval, resample_indices
from clipbench.pipeline import Evaluator, RunConfig
from clipbench.sidecars import SampleOutputs, classification_outputs, top_classes


def single_label(predictions, targets, n_classes=4, ids=None) -> SampleOutputs:
    """A zero-shot sidecar whose top class is ``predictions`` (the rest of the order arbitrary)."""
    scores = np.zeros((len(targets), n_classes))
    scores[np.arange(len(targets)), predictions] = 1.0
    ids = ids if ids is not None else [f"s{i}" for i in range(len(targets))]
    return SampleOutputs(list(ids), {"targets": np.asarray(targets), "top_classes": top_classes(scores)},
                         {"kind": "single_label", "primary_metric": "accuracy", "n_classes": n_classes})


def binary(scores, targets) -> SampleOutputs:
    return SampleOutputs([f"s{i}" for i in range(len(targets))],
                         {"targets": np.asarray(targets), "scores": np.asarray(scores, dtype=np.float64)},
                         {"kind": "binary", "primary_metric": "roc_auc", "n_classes": 2})


def retrieval(t2i, i2t, owner) -> SampleOutputs:
    return SampleOutputs([f"i{i}" for i in range(len(i2t))],
                         {"text_to_image_rank": np.asarray(t2i), "image_to_text_rank": np.asarray(i2t),
                          "caption_image": np.asarray(owner)},
                         {"kind": "retrieval", "primary_metric": "text_to_image_R@1", "recall_k": [1, 5]})


def noisy_pair(n=120, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, n)
    pred_a = np.where(rng.random(n) < 0.6, targets, rng.integers(0, 4, n))
    pred_b = np.where(rng.random(n) < 0.7, targets, rng.integers(0, 4, n))
    return targets, pred_a, pred_b


def test_paired_bootstrap_equals_a_naive_loop_over_the_same_resamples():
    targets, pred_a, pred_b = noisy_pair()
    a, b = single_label(pred_a, targets), single_label(pred_b, targets)
    for metric, score in (("accuracy", lambda t, p: np.mean(t == p)), ("mean_per_class_recall", balanced_accuracy_score)):
        replicates = compare.paired_bootstrap(compare.paired_samples(a, b, metric), 200, seed=3)
        naive = [score(targets[rows], pred_b[rows]) - score(targets[rows], pred_a[rows])
                 for idx in resample_indices(len(targets), 200, 3) for rows in idx]
        np.testing.assert_allclose(replicates, naive, rtol=0, atol=1e-12)


def _worst_group_naive(hit: np.ndarray, groups: np.ndarray) -> float:
    return min(hit[groups == g].mean() for g in np.unique(groups))


def test_worst_group_accuracy_is_compared_with_its_groups_resampled():
    targets, pred_a, pred_b = noisy_pair(n=150, seed=4)
    groups = np.random.default_rng(5).integers(0, 5, len(targets)) * 7  # labels need not be 0..G-1
    a, b = (classification_outputs(scores, targets, "worst_group_accuracy", groups=groups)
            for scores in (np.eye(4)[pred_a], np.eye(4)[pred_b]))
    a, b = (SampleOutputs([f"s{i}" for i in range(len(targets))], o.arrays, {"kind": o.kind, **o.meta})
            for o in (a, b))
    pair = compare.paired_samples(a, b, "worst_group_accuracy")
    assert pair.value(pair.a) == pytest.approx(_worst_group_naive(pred_a == targets, groups), abs=1e-12)
    replicates = compare.paired_bootstrap(pair, 100, seed=2)
    naive = [_worst_group_naive(pred_b[rows] == targets[rows], groups[rows])
             - _worst_group_naive(pred_a[rows] == targets[rows], groups[rows])
             for idx in resample_indices(len(targets), 100, 2) for rows in idx]
    np.testing.assert_allclose(replicates, naive, rtol=0, atol=1e-12)
    result = compare.compare_pair(a, b, "worst_group_accuracy")
    assert result.test == "permutation" and result.difference == pytest.approx(
        _worst_group_naive(pred_b == targets, groups) - _worst_group_naive(pred_a == targets, groups), abs=1e-12)
    # a sidecar whose primary metric is another keeps no groups: refused with the reason
    plain = single_label(pred_a, targets)
    with pytest.raises(ValueError, match="do not hold"):
        compare.paired_samples(plain, plain, "worst_group_accuracy")


def test_retrieval_bootstrap_resamples_images_with_their_captions():
    rng = np.random.default_rng(1)
    owner = np.repeat(np.arange(20), 3)
    t2i_a, t2i_b = rng.integers(1, 4, 60), rng.integers(1, 3, 60)
    i2t = rng.integers(1, 8, 20)
    pair = compare.paired_samples(retrieval(t2i_a, i2t, owner), retrieval(t2i_b, i2t, owner), "text_to_image_R@1")
    replicates = compare.paired_bootstrap(pair, 100, seed=0)
    naive = []
    for idx in resample_indices(20, 100, 0):
        for rows in idx:
            captions = np.concatenate([np.flatnonzero(owner == image) for image in rows])
            naive.append(np.mean(t2i_b[captions] <= 1) - np.mean(t2i_a[captions] <= 1))
    np.testing.assert_allclose(replicates, naive, atol=1e-12)


def test_mcnemar_is_the_binomial_test_on_discordant_samples():
    rng = np.random.default_rng(2)
    for _ in range(5):
        a, b = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
        only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
        expected = scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert compare.mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-9)


def test_identical_models_differ_by_zero_with_p_one():
    targets, pred_a, _ = noisy_pair()
    a = single_label(pred_a, targets)
    for metric, test in (("accuracy", "mcnemar"), ("mean_per_class_recall", "permutation")):
        result = compare.compare_pair(a, a, metric, compare.CompareSettings(n_bootstrap=100, n_permutations=100))
        assert (result.difference, result.low, result.high, result.p_value, result.test) == (0.0, 0.0, 0.0, 1.0, test)


def test_a_model_right_on_every_sample_where_the_other_is_wrong():
    targets = np.arange(30) % 4
    a, b = single_label((targets + 1) % 4, targets), single_label(targets, targets)
    result = compare.compare_pair(a, b, "accuracy", compare.CompareSettings(n_bootstrap=100))
    assert (result.difference, result.low, result.high) == (1.0, 1.0, 1.0)
    assert result.p_value == pytest.approx(2 * 0.5 ** 30)
    permuted = compare.paired_permutation_test(compare.paired_samples(a, b, "mean_per_class_recall"), 200)
    assert permuted == 1 / 201  # no swap reaches a difference of 1 except none at all


def test_permutation_test_equals_an_exact_enumeration_of_swaps():
    rng = np.random.default_rng(4)
    targets = np.array([0, 1] * 5)
    scores_a, scores_b = rng.normal(size=10) + 0.3 * targets, rng.normal(size=10) + 1.2 * targets
    pair = compare.paired_samples(binary(scores_a, targets), binary(scores_b, targets), "roc_auc")
    observed = abs(roc_auc_score(targets, scores_b) - roc_auc_score(targets, scores_a))
    hits = 0
    for swap in itertools.product((False, True), repeat=10):
        swap = np.array(swap)
        first, second = np.where(swap, scores_b, scores_a), np.where(swap, scores_a, scores_b)
        hits += abs(roc_auc_score(targets, second) - roc_auc_score(targets, first)) >= observed - 1e-12
    assert compare.paired_permutation_test(pair, exact=True) == hits / 2 ** 10
    assert compare.paired_permutation_test(pair, 4000, seed=1) == pytest.approx(hits / 2 ** 10, abs=0.03)


def test_holm_on_a_hand_case():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 * 0.005, 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    np.testing.assert_allclose(compare.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert compare.holm([0.5, 0.9]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        compare.holm([1.5])


def test_aggregate_over_datasets():
    rng = np.random.default_rng(5)
    one = rng.normal(0.02, 0.01, (1, 500))
    aggregate = compare.aggregate_differences([0.02], one)
    assert (aggregate.low, aggregate.high) == percentile_interval(one[0])  # one dataset: its own interval
    same = compare.aggregate_differences([0.03] * 4, np.full((4, 300), 0.03))
    assert same.mean == pytest.approx(0.03) and same.low == pytest.approx(0.03) and same.high == pytest.approx(0.03)
    # no image noise: the interval is the bootstrap over datasets, inside the range of the differences
    spread = compare.aggregate_differences([0.0, 0.01, 0.05], np.array([[0.0], [0.01], [0.05]]) * np.ones((1, 2000)))
    assert spread.mean == pytest.approx(0.02) and 0.0 <= spread.low < 0.02 < spread.high <= 0.05 + 1e-12
    # both noises: wider than either alone
    noisy = np.array([[0.0], [0.01], [0.05]]) + rng.normal(0, 0.01, (3, 2000))
    both = compare.aggregate_differences([0.0, 0.01, 0.05], noisy)
    assert both.high - both.low > spread.high - spread.low


def test_mismatched_test_sets_are_refused_and_reordered_ones_matched():
    targets, pred_a, pred_b = noisy_pair(40)
    a = single_label(pred_a, targets)
    other = single_label(pred_b, targets, ids=[f"t{i}" for i in range(40)])
    with pytest.raises(ClipbenchError, match="different test sets"):
        compare.align(a, other, "toy/zeroshot")
    relabelled = single_label(pred_b, (targets + 1) % 4)
    with pytest.raises(ClipbenchError, match="different labels"):
        compare.align(a, relabelled, "toy/zeroshot")
    order = np.random.default_rng(0).permutation(40)
    shuffled = single_label(pred_b[order], targets[order], ids=[f"s{i}" for i in order])
    aligned = compare.align(a, shuffled, "toy/zeroshot")
    settings = compare.CompareSettings(n_bootstrap=50, n_permutations=50)
    direct = compare.compare_pair(a, single_label(pred_b, targets), "accuracy", settings)
    assert compare.compare_pair(a, aligned, "accuracy", settings).difference == direct.difference


def test_compare_cli_on_two_runs(spec_file, tmp_path, capsys):
    from clipbench.models import load_model

    spec = specs.load_spec(str(spec_file))
    for name, seed in (("one", 0), ("two", 1)):
        torch.manual_seed(seed)
        model = load_model("ViT-S-32-alt", "none", device="cpu", precision="fp32")
        config = RunConfig(data_root=tmp_path / "data", output=tmp_path / name, cache_dir=tmp_path / f"cache-{name}",
                           tasks=["zeroshot"], batch_size=4, workers=0, device="cpu",
                           precision="fp32", n_bootstrap=50, pretrained="none")
        Evaluator(model, config).run([spec])
    cb = tmp_path / "cb"
    cb.mkdir()
    (cb / "colours.json").write_text(json.dumps({"dataset": "colours", "model": "other", "pretrained": "x",
                                                 "task": "zeroshot_classification", "metrics": {"acc1": 0.5}}))
    assert main(["compare", str(tmp_path / "one"), str(tmp_path / "one"), str(tmp_path / "two"), str(cb),
                 "--format", "csv", "--plot", str(tmp_path / "plots"), "--bootstrap", "100",
                 "--permutations", "100"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    itself = table[table["table"].str.endswith("(none) - ViT-S-32-alt (none)") & (table["column"] == "B - A")]
    assert float(itself["value"].iloc[0]) == 0.0  # the model against itself
    result = table[table["column"] == "result"]
    assert "tie" in set(result["value"])
    assert "unpaired" in set(table[table["column"] == "test"]["value"])  # clip_benchmark: no sidecar
    assert len(list((tmp_path / "plots").glob("compare*__*.png"))) == 3
    assert main(["compare", str(tmp_path / "one")]) == 2


def test_forest_plot_draws_each_difference_and_interval(tmp_path):
    from clipbench.plots import plot_forest

    rows = pd.DataFrame({"difference": [0.01, -0.02], "low": [0.0, -0.03], "high": [0.02, -0.01]}, index=["x", "y"])
    plot = plot_forest(rows, tmp_path / "f.png")
    assert plot.path.is_file()
    np.testing.assert_allclose(plot.data.to_numpy(), 100 * rows.to_numpy())
