"""Image–caption selection: does an image score its own caption above negative captions?

Compositionality benchmarks (SugarCrepe; the synthetic world's ``synthetic-composition``) pair
each image with its caption and one or more negative captions, hard negatives that differ from
the caption in one object, attribute or relation. An image is scored correct when each of its
captions scores **strictly** higher than every one of its negatives (cosine similarity of the
L2-normalized embeddings); a tie counts as wrong, so a model that cannot tell the texts apart
(identical text features, or a constant text tower) scores 0, never 50 %. Accuracy is the
fraction of images scored correct. (clip_benchmark takes the ``argmax`` over the captions, which
gives a tie to the first caption, the positive: on tied scores its accuracy is higher.)

Features in, metrics out: this module never loads a model or a dataset.
"""

from __future__ import annotations

import numpy as np

from clipbench.metrics import percentile_interval, resample_indices
from clipbench.sidecars import selection_outputs
from clipbench.tasks import CAPTION_SET_METRICS
from clipbench.tasks.base import CaptionSets, CaptionSetTask, TaskInputs, TaskOutput

__all__ = ["text_scores", "selection_correct", "mean_interval", "TASK"]


def text_scores(image_features: np.ndarray, sets: CaptionSets) -> np.ndarray:
    """(M,) float64 similarity of each text of ``sets`` to its own image (a dot product of the
    float32 features, accumulated in float64: no dot product depends on a batch shape)."""
    images = np.asarray(image_features, dtype=np.float64)
    texts = np.asarray(sets.features, dtype=np.float64)
    owner = np.asarray(sets.owner, dtype=np.int64)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"image features {images.shape} and text features {texts.shape} must be (N, D) "
                         "and (M, D) of one joint embedding space")
    if owner.shape != (len(texts),) or np.asarray(sets.positive).shape != (len(texts),):
        raise ValueError(f"owner {owner.shape} and positive {np.asarray(sets.positive).shape} must be "
                         f"({len(texts)},): one entry per text")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(images)):
        raise ValueError(f"owner holds image indices {owner.min()}..{owner.max()}, but there are "
                         f"{len(images)} images")
    return np.einsum("md,md->m", images[owner], texts)


def selection_correct(scores: np.ndarray, owner: np.ndarray, positive: np.ndarray, n_images: int) -> np.ndarray:
    """(n_images,) bool: True where every caption of the image scores strictly above every one of
    its negatives (ties are wrong).

    Args:
        scores: (M,) each text's similarity to its image.
        owner: (M,) int, the image of each text.
        positive: (M,) bool, caption (True) or negative (False).

    Raises:
        ValueError: an image lacks a caption or a negative.
    """
    scores, owner = np.asarray(scores, dtype=np.float64), np.asarray(owner, dtype=np.int64)
    positive = np.asarray(positive, dtype=bool)
    worst_caption = np.full(n_images, np.inf)
    best_negative = np.full(n_images, -np.inf)
    np.minimum.at(worst_caption, owner[positive], scores[positive])
    np.maximum.at(best_negative, owner[~positive], scores[~positive])
    lacking = np.flatnonzero(np.isinf(worst_caption) | np.isinf(best_negative))
    if lacking.size:
        raise ValueError(f"{lacking.size} image(s) lack a caption or a negative caption (e.g. image "
                         f"{lacking[0]}); caption selection needs both for every image")
    return worst_caption > best_negative


def mean_interval(values: np.ndarray, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval (95 %) of the mean of per-unit 0/1 values."""
    values = np.asarray(values, dtype=np.float64)
    means = np.concatenate([values[idx].mean(axis=1) for idx in resample_indices(len(values), n_resamples, seed)])
    return percentile_interval(means)


class CaptionSelectionTask(CaptionSetTask):
    """Each test image against its captions and negative captions; accuracy (strict, ties wrong)."""

    name = "caption_selection"
    title = "Caption selection"
    spec_task = "caption_selection"

    def run(self, inputs: TaskInputs) -> TaskOutput:
        sets, images = inputs.caption_sets, inputs.images["test"].projected
        correct = selection_correct(text_scores(images, sets), sets.owner, sets.positive, len(images))
        (metric,) = CAPTION_SET_METRICS[self.spec_task]
        intervals = {}
        if inputs.settings["n_bootstrap"]:
            intervals[metric] = mean_interval(correct, inputs.settings["n_bootstrap"], inputs.settings["seed"])
        n_negatives = int((~np.asarray(sets.positive, dtype=bool)).sum())
        return TaskOutput(metrics={metric: float(correct.mean())}, n_samples=len(images),
                          primary_metric=metric, confidence_intervals=intervals,
                          details={"n_images": len(images), "n_negatives": n_negatives, "ties": "wrong"},
                          per_sample=selection_outputs({metric: correct}, metric))


TASK = CaptionSelectionTask()
