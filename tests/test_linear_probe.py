"""Linear probe protocol: the C search, validation splits, the probe against scikit-learn, few-shot."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score

from clipbench.tasks.linear_probe import (
    c_sweep,
    few_shot,
    linear_probe,
    sample_few_shot,
    stratified_val_split,
)

from conftest import gaussian_mixture, reference_protocol

DECADES = [-6, -4, -2, 0, 2, 4, 6]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def splits(n_train: int, n_val: int, n_test: int, dim: int, classes: int, separation: float, seed: int):
    X, y = gaussian_mixture(n_train + n_val + n_test, dim, classes, separation, seed)
    a, b = n_train, n_train + n_val
    return X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:]


# ----------------------------------------------------------------------------- c_sweep


def log10s(sweep: dict[float, float]) -> list[float]:
    return [math.log10(c) for c in sweep]


def test_c_sweep_starts_at_the_seven_decades_and_refines_to_an_eighth_decade() -> None:
    calls = []

    def score(c: float) -> float:
        calls.append(c)
        return -(math.log10(c) - 1.37) ** 2

    best, sweep = c_sweep(score)
    assert [round(math.log10(c), 9) for c in calls[:7]] == DECADES
    assert len(calls) == len(set(calls)) == len(sweep) <= 15
    # every point lies on the 1/8-decade grid, and the search stopped at 1/8-decade resolution
    eighths = [8 * x for x in log10s(sweep)]
    assert all(abs(e - round(e)) < 1e-9 for e in eighths)
    assert math.log10(best) == pytest.approx(1.375)
    for neighbour in (1.25, 1.5):
        assert any(abs(x - neighbour) < 1e-9 for x in log10s(sweep))
    # by hand: best decade 2; step 1 -> {1, 3}, best 1; step 1/2 -> {0.5, 1.5}, best 1.5;
    # step 1/4 -> {1.25, 1.75}, best 1.25; step 1/8 -> {1.125, 1.375}, best 1.375
    refinements = [1, 3, 0.5, 1.5, 1.25, 1.75, 1.125, 1.375]
    assert [math.log10(c) for c in calls[7:]] == pytest.approx(refinements)


@pytest.mark.parametrize("peak", [-5.93, -3.1, -0.55, 0.0, 2.2, 4.71, 5.99])
def test_c_sweep_finds_the_grid_optimum_of_a_unimodal_function(peak: float) -> None:
    grid = [k / 8 for k in range(-48, 49)]
    expected = max(grid, key=lambda x: (-abs(x - peak), -x))  # nearest grid point, smaller on ties
    best, sweep = c_sweep(lambda c: -abs(math.log10(c) - peak))
    assert math.log10(best) == pytest.approx(expected)
    assert len(sweep) <= 15


def test_c_sweep_ties_prefer_the_smallest_c() -> None:
    best, _ = c_sweep(lambda c: 1.0)
    assert best == pytest.approx(1e-6)
    # plateau above 1e-2: the smallest C reaching the plateau wins
    best, _ = c_sweep(lambda c: min(math.log10(c), -2.0))
    assert best == pytest.approx(1e-2)
    # NaN counts as the worst score
    best, _ = c_sweep(lambda c: float("nan") if c < 1 else -math.log10(c))
    assert best == pytest.approx(1.0)


def test_c_sweep_at_the_boundary_never_leaves_the_range() -> None:
    best, sweep = c_sweep(lambda c: math.log10(c))
    assert best == pytest.approx(1e6)
    assert all(-6 - 1e-9 <= x <= 6 + 1e-9 for x in log10s(sweep))


def test_c_sweep_in_parallel_gives_the_same_result() -> None:
    def score(c: float) -> float:
        return -(math.log10(c) + 2.3) ** 2

    assert c_sweep(score, n_jobs=2) == c_sweep(score, n_jobs=1)


# ----------------------------------------------------------------------------- splits


def test_stratified_val_split_is_disjoint_stratified_and_deterministic() -> None:
    targets = np.repeat(np.arange(4), [50, 30, 10, 2])
    np.random.default_rng(0).shuffle(targets)
    train, val = stratified_val_split(targets, 0.2, seed=1)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(targets.size))
    assert np.bincount(targets[val], minlength=4).tolist() == [10, 6, 2, 1]
    again = stratified_val_split(targets, 0.2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again))
    assert not np.array_equal(val, stratified_val_split(targets, 0.2, seed=2)[1])
    multilabel_train, multilabel_val = stratified_val_split(np.zeros((40, 3)), 0.25, seed=0)
    assert multilabel_val.size == 10 and multilabel_train.size == 30
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_val_split(targets, 1.0)


# ----------------------------------------------------------------------------- the probe


def accuracy_of(model, x, y):
    return accuracy_score(y, model.predict(x))


def test_probe_equals_an_independent_scikit_learn_run() -> None:
    train_x, train_y, val_x, val_y, test_x, test_y = splits(360, 120, 200, 32, 6, 0.3, seed=0)
    result = linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, "accuracy", n_jobs=1)
    C, scores, final = reference_protocol(train_x, train_y, val_x, val_y, accuracy_of)

    assert result.C == pytest.approx(C, rel=1e-12)
    assert sorted(math.log10(c) for c in result.sweep) == pytest.approx(sorted(scores))
    assert [result.sweep[c] for c in sorted(result.sweep)] == [scores[x] for x in sorted(scores)]
    expected = final.predict(test_x.astype(np.float64))
    assert np.array_equal(result.predictions, expected)
    assert result.metrics["accuracy"] == accuracy_score(test_y, expected)
    assert (result.n_train, result.n_val, result.n_test) == (360, 120, 200)
    assert result.record_details()["C"] == result.C
    # the chosen C is an interior optimum here, so the search had to refine
    assert 1e-6 < result.C < 1e6 and len(result.sweep) > 7


def test_binary_probe_uses_roc_auc_on_decision_scores() -> None:
    train_x, train_y, val_x, val_y, test_x, test_y = splits(300, 100, 200, 16, 2, 0.25, seed=1)

    def auc_of(model, x, y):
        return roc_auc_score(y, model.decision_function(x))

    result = linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, "roc_auc")
    C, _, final = reference_protocol(train_x, train_y, val_x, val_y, auc_of)
    assert result.C == pytest.approx(C, rel=1e-12)
    decision = final.decision_function(test_x.astype(np.float64))
    np.testing.assert_allclose(result.scores[:, 1] - result.scores[:, 0], decision, rtol=1e-10, atol=1e-12)
    assert result.metrics["roc_auc"] == pytest.approx(roc_auc_score(test_y, decision), abs=1e-12)


def test_multilabel_probe_is_one_vs_rest_with_a_shared_c() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(500, 12))
    weights = rng.normal(size=(12, 3))
    Y = (X @ weights + rng.normal(size=(500, 3)) > 0.5).astype(np.uint8)
    train_x, val_x, test_x = X[:250], X[250:350], X[350:]
    train_y, val_y, test_y = Y[:250], Y[250:350], Y[350:]
    result = linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, "map_11point", multilabel=True)

    assert result.scores.shape == (150, 3) and result.predictions.shape == (150, 3)
    assert set(result.metrics) == {"map_11point"}
    for c in range(3):  # each column is a binary probe at the chosen C (up to the warm start)
        column = LogisticRegression(C=result.C, max_iter=1000, tol=1e-8).fit(X[:350], Y[:350, c])
        np.testing.assert_allclose(result.scores[:, c], column.decision_function(test_x), atol=2e-2)


def test_random_features_give_chance_accuracy() -> None:
    rng = np.random.default_rng(3)
    classes, n_test = 5, 500
    X = rng.normal(size=(1300, 32)).astype(np.float32)
    y = rng.integers(0, classes, 1300)
    result = linear_probe(X[:600], y[:600], X[600:800], y[600:800], X[800:], y[800:], "accuracy")
    chance = np.bincount(y[800:]).max() / n_test
    sigma = math.sqrt(chance * (1 - chance) / n_test)
    assert result.metrics["accuracy"] <= chance + 4 * sigma


def test_torch_solver_agrees_with_sklearn() -> None:
    data = splits(360, 120, 200, 32, 6, 0.3, seed=0)
    reference = linear_probe(*data, "accuracy")
    result = linear_probe(*data, "accuracy", solver="torch")
    assert result.solver == "torch"
    assert np.mean(result.predictions == reference.predictions) >= 0.99
    assert abs(result.metrics["accuracy"] - reference.metrics["accuracy"]) <= 0.01
    assert abs(math.log10(result.C) - math.log10(reference.C)) <= 0.25


def test_torch_solver_reads_memory_mapped_float32_features_in_blocks(tmp_path, monkeypatch) -> None:
    """Features as clipbench's cache hands them over (float32, memory-mapped) give the torch probe
    exactly the result of the same features in memory; each split reaches the solver once, copied
    in blocks of rows."""
    import torch

    from clipbench.tasks import torch_logreg

    data = [a.astype(np.float32) if a.ndim == 2 else a for a in splits(300, 100, 150, 16, 5, 0.5, seed=2)]
    mapped = []
    for i, a in enumerate(data):
        if a.ndim == 2:
            np.save(tmp_path / f"x{i}.npy", a)
            a = np.load(tmp_path / f"x{i}.npy", mmap_mode="r")
        mapped.append(a)
    in_memory = linear_probe(*data, "accuracy", solver="torch")

    monkeypatch.setattr(torch_logreg, "BLOCK_ROWS", 7)
    uploads = []
    real_to_device = torch_logreg.to_device
    monkeypatch.setattr(torch_logreg, "to_device", lambda x, *a, **k: uploads.append(len(x)) or real_to_device(x, *a, **k))
    from_disk = linear_probe(*mapped, "accuracy", solver="torch")
    assert uploads == [300, 100, 150]  # once per split, not once per fit of the sweep
    assert from_disk.C == in_memory.C and from_disk.sweep == in_memory.sweep
    np.testing.assert_array_equal(from_disk.scores, in_memory.scores)

    blocks = []
    real_from_numpy = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: blocks.append(len(a)) or real_from_numpy(a))
    x = real_to_device(mapped[0], "cpu")
    assert blocks == [7] * 42 + [6] and x.dtype == torch.float64
    np.testing.assert_array_equal(x.numpy(), data[0].astype(np.float64))
    with pytest.raises(ValueError, match="block_rows"):
        real_to_device(data[0], "cpu", block_rows=0)


def test_class_missing_from_training_scores_last() -> None:
    train_x, train_y, val_x, val_y, test_x, test_y = splits(200, 80, 80, 8, 4, 1.0, seed=4)
    keep = train_y != 3
    result = linear_probe(train_x[keep], train_y[keep], val_x[val_y != 3], val_y[val_y != 3], test_x, test_y, "accuracy")
    assert result.scores.shape == (80, 4)
    assert np.all(result.scores[:, 3] < np.delete(result.scores, 3, axis=1).min(axis=1))


def test_probe_rejects_bad_input() -> None:
    train_x, train_y, val_x, val_y, test_x, test_y = splits(60, 20, 20, 4, 3, 1.0, seed=5)
    with pytest.raises(ValueError, match="solver"):
        linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, "accuracy", solver="liblinear")
    with pytest.raises(ValueError, match="same N"):
        linear_probe(train_x, train_y[:-1], val_x, val_y, test_x, test_y, "accuracy")
    with pytest.raises(ValueError, match="feature dimensions"):
        linear_probe(train_x, train_y, val_x[:, :3], val_y, test_x, test_y, "accuracy")
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(train_x, np.zeros_like(train_y), val_x, val_y, test_x, test_y, "accuracy")


# ----------------------------------------------------------------------------- few-shot


def test_sample_few_shot_is_balanced_nested_and_seeded() -> None:
    targets = np.random.default_rng(6).integers(0, 5, 200)
    one, four = sample_few_shot(targets, 1, seed=3), sample_few_shot(targets, 4, seed=3)
    assert np.bincount(targets[four], minlength=5).tolist() == [4] * 5
    assert np.isin(one, four).all()
    assert np.array_equal(four, sample_few_shot(targets, 4, seed=3))
    assert not np.array_equal(four, sample_few_shot(targets, 4, seed=4))
    with pytest.raises(ValueError, match="k=500"):
        sample_few_shot(targets, 500, seed=0)


@pytest.mark.slow
def test_few_shot_never_uses_validation_or_test_samples() -> None:
    train_x, train_y, _, _, test_x, test_y = splits(300, 0, 150, 16, 4, 0.8, seed=7)
    kwargs = dict(primary_metric="accuracy", ks=(1, 4), seeds=(0, 1), val_fraction=0.25, split_seed=5)
    result = few_shot(train_x, train_y, test_x, test_y, **kwargs)

    _, val_idx = stratified_val_split(train_y, 0.25, seed=5)
    assert result.val_source == "carved" and result.n_val == val_idx.size
    for k, entry in result.per_k.items():
        assert len(entry.scores) == len(entry.C) == 2
        assert entry.mean == pytest.approx(np.mean(entry.scores))
        assert entry.std == pytest.approx(np.std(entry.scores, ddof=1))
        for shots in entry.indices:
            assert np.intersect1d(shots, val_idx).size == 0
            assert np.bincount(train_y[shots], minlength=4).tolist() == [k] * 4

    # test labels and features only reach the final scoring: changing them leaves every choice intact
    rng = np.random.default_rng(8)
    other = few_shot(train_x, train_y, rng.normal(size=test_x.shape), rng.permutation(test_y), **kwargs)
    for k in result.per_k:
        assert other.per_k[k].C == result.per_k[k].C
        assert all(np.array_equal(a, b) for a, b in zip(other.per_k[k].indices, result.per_k[k].indices))

    again = few_shot(train_x, train_y, test_x, test_y, **kwargs)
    assert again.per_k[4].scores == result.per_k[4].scores and again.per_k[4].C == result.per_k[4].C


def test_few_shot_with_a_given_validation_split_matches_direct_fits() -> None:
    train_x, train_y, val_x, val_y, test_x, test_y = splits(200, 100, 150, 16, 4, 0.8, seed=9)
    result = few_shot(train_x, train_y, test_x, test_y, primary_metric="accuracy", ks=(2,), seeds=(0,),
                      val_x=val_x, val_y=val_y)
    assert result.val_source == "given" and result.n_val == 100
    entry = result.per_k[2]
    shots = entry.indices[0]
    assert np.array_equal(shots, sample_few_shot(train_y, 2, seed=0))
    # the reported score is the shot-set model at the chosen C, fit without validation data
    model = LogisticRegression(C=entry.C[0], max_iter=1000, tol=1e-10).fit(train_x[shots].astype(np.float64), train_y[shots])
    direct = accuracy_score(test_y, model.predict(test_x.astype(np.float64)))
    assert abs(entry.scores[0] - direct) <= 2 / len(test_y)
