"""Zero-shot prompt ensembling and evaluation."""

import numpy as np
import open_clip
import pytest
import torch

from clipbench import metrics
from clipbench.tasks import zeroshot


@pytest.fixture(scope="module")
def small_clip():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32-alt", pretrained=None)
    model.eval()
    return model, open_clip.get_tokenizer("ViT-S-32-alt")


def _unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- prompts and weights


def test_build_prompts_is_class_major_and_accepts_both_placeholders():
    prompts = zeroshot.build_prompts(["cat", "dog"], ["a photo of a {c}.", "a {} in the wild", "{c}: {c}"])
    assert prompts == [
        "a photo of a cat.", "a cat in the wild", "cat: cat",
        "a photo of a dog.", "a dog in the wild", "dog: dog",
    ]


def test_build_prompts_rejects_template_without_placeholder():
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot.build_prompts(["cat"], ["a photo of a {c}.", "a photo."])
    with pytest.raises(ValueError, match="at least one"):
        zeroshot.build_prompts([], ["{c}"])


def test_class_weights_hand_computed():
    # class 0: prompts (3, 4) and (0, 2) -> unit (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> normalized
    # class 1: prompts (-5, 0) and (-1, 0) -> both (-1, 0)
    features = np.array([[3.0, 4.0], [0.0, 2.0], [-5.0, 0.0], [-1.0, 0.0]])
    weights = zeroshot.class_weights(features, num_classes=2)
    assert weights.shape == (2, 2) and weights.dtype == np.float32
    np.testing.assert_allclose(weights[:, 0], np.array([0.3, 0.9]) / np.hypot(0.3, 0.9), atol=1e-7)
    np.testing.assert_allclose(weights[:, 1], [-1.0, 0.0], atol=1e-7)


def test_class_weights_rejects_bad_shapes():
    with pytest.raises(ValueError, match="cannot be split"):
        zeroshot.class_weights(np.ones((7, 4)), num_classes=3)
    with pytest.raises(ValueError, match="zero or not finite"):
        zeroshot.class_weights(np.zeros((2, 4)), num_classes=1)


def test_class_weights_equal_open_clip_zero_shot_classifier(small_clip):
    model, tokenizer = small_clip
    classnames = ["goldfish", "great white shark", "tree frog"]
    templates = ["a photo of a {}.", "a bad photo of the {}.", "a sculpture of a {}.", "itap of a {}."]
    with torch.no_grad():
        expected = open_clip.build_zero_shot_classifier(
            model, tokenizer, classnames, templates, num_classes_per_batch=2
        ).numpy()
        # raw (unnormalized) embeddings: class_weights must do the per-prompt normalization itself
        prompt_features = model.encode_text(tokenizer(zeroshot.build_prompts(classnames, templates))).numpy()
    weights = zeroshot.class_weights(prompt_features, len(classnames))
    assert weights.shape == expected.shape == (256, 3)
    assert np.max(np.abs(weights - expected)) <= 1e-5


# ---------------------------------------------------------------- evaluation


def test_evaluate_hand_built_features():
    weights = np.eye(3, dtype=np.float32)  # class c points along axis c
    images = _unit_rows(np.array([[1.0, 0.1, 0], [0.1, 1.0, 0], [0, 0.1, 1.0], [1.0, 0, 0.2]]))
    targets = np.array([0, 1, 2, 2])  # the last image is misclassified as class 0
    result = zeroshot.evaluate(images, weights, targets, "accuracy", n_bootstrap=200, keep_logits=True)
    assert result.metrics == {"accuracy": 0.75, "mean_per_class_recall": pytest.approx((1 + 1 + 0.5) / 3)}
    assert result.n_samples == 4
    low, high = result.confidence_intervals["accuracy"]
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    assert result.per_class == [
        {"class": 0, "n": 1, "recall": 1.0},
        {"class": 1, "n": 1, "recall": 1.0},
        {"class": 2, "n": 2, "recall": 0.5},
    ]
    np.testing.assert_allclose(result.logits, images @ weights, atol=1e-7)


def test_evaluate_matches_metrics_on_random_features():
    rng = np.random.default_rng(0)
    images = _unit_rows(rng.normal(size=(120, 16)))
    weights = _unit_rows(rng.normal(size=(10, 16))).T
    targets = rng.integers(0, 10, size=120)
    result = zeroshot.evaluate(images, weights, targets, "mean_per_class_recall", n_bootstrap=0)
    logits = images @ weights
    assert result.metrics["top5_accuracy"] == metrics.topk_accuracy(logits, targets, 5)
    assert result.metrics["mean_per_class_recall"] == metrics.mean_per_class_recall(logits, targets)
    assert result.confidence_intervals == {} and result.logits is None


def test_evaluate_class_subset_restricts_predictions():
    weights = np.eye(5, dtype=np.float32)
    subset = np.array([4, 1])
    # image 0 is closest to class 0 overall, which is outside the subset; among {4, 1} it is nearest 4
    images = _unit_rows(np.array([[1.0, 0, 0, 0, 0.3], [0, 1.0, 0, 0, 0], [0, 0.2, 0, 0, 1.0]]))
    targets = np.array([0, 1, 0])  # indices into the subset: class 4, class 1, class 4
    result = zeroshot.evaluate(images, weights, targets, "accuracy", class_subset=subset,
                               n_bootstrap=0, keep_logits=True)
    assert result.metrics["accuracy"] == 1.0
    assert result.logits.shape == (3, 2)
    np.testing.assert_allclose(result.logits, (images @ weights)[:, subset])
    assert [entry["n"] for entry in result.per_class] == [2, 1]
    # without the subset, image 0 is predicted as ImageNet-style class 0 and the targets mean other classes
    full = zeroshot.evaluate(images, weights, np.array([4, 1, 4]), "accuracy", n_bootstrap=0)
    assert full.metrics["accuracy"] == pytest.approx(2 / 3)


def test_evaluate_multilabel_reports_map():
    rng = np.random.default_rng(1)
    images = _unit_rows(rng.normal(size=(40, 8)))
    weights = _unit_rows(rng.normal(size=(3, 8))).T
    targets = (rng.random((40, 3)) < 0.4).astype(np.uint8)
    result = zeroshot.evaluate(images, weights, targets, "map_11point", multilabel=True, n_bootstrap=100)
    assert result.metrics == {"map_11point": metrics.map_11point(images @ weights, targets)}
    assert set(result.per_class[0]) == {"class", "n", "ap"}
    low, high = result.confidence_intervals["map_11point"]
    assert low <= result.metrics["map_11point"] <= high


@pytest.mark.parametrize(
    "images, weights, subset, message",
    [
        (np.ones((2, 3), np.float32), np.eye(3, dtype=np.float32), None, "L2-normalized"),
        (np.eye(2, 3, dtype=np.float32), np.eye(4, dtype=np.float32), None, "embedding size"),
        (np.eye(2, 3, dtype=np.float32), np.eye(3, dtype=np.float32), np.array([0, 3]), "class_subset"),
    ],
)
def test_evaluate_rejects_bad_input(images, weights, subset, message):
    with pytest.raises(ValueError, match=message):
        zeroshot.evaluate(images, weights, np.array([0, 1]), "accuracy", class_subset=subset)


def test_has_placeholder_accepts_either_placeholder():
    assert zeroshot.has_placeholder("a photo of a {c}.")
    assert zeroshot.has_placeholder("a photo of a {}.")
    assert not zeroshot.has_placeholder("a photo of a {class}.")



def test_text_features_are_cached_per_batch_size(tmp_path):
    # a batch's shape can change the last bits of a text feature on CPU, so the cache never serves
    # features encoded in other batches
    from clipbench.features import FeatureCache, text_features
    from clipbench.models import load_model

    model = load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")
    prompts = zeroshot.build_prompts([f"class {i}" for i in range(10)], ["a photo of a {c}.", "itap of my {}."])
    cache = FeatureCache(tmp_path)
    first = text_features(model, prompts, cache, batch_size=3)
    assert len(list((tmp_path / "text").rglob("*.npz"))) == 1
    other = text_features(model, prompts, cache, batch_size=20)
    assert len(list((tmp_path / "text").rglob("*.npz"))) == 2
    np.testing.assert_allclose(first, other, rtol=0, atol=1e-5)  # the same features up to rounding
    assert np.array_equal(text_features(model, prompts, cache, batch_size=3), first)  # read back
