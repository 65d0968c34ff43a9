"""Winoground's text, image and group scores (Thrush et al. 2022, "Winoground: Probing Vision and
Language Models for Visio-Linguistic Compositionality", Section 3.2).

An example holds two images and two captions that use the same words in another order; caption
``j`` describes image ``j``. With ``s(C, I)`` the model's image–caption similarity:

- text score: ``s(C0, I0) > s(C1, I0)`` and ``s(C1, I1) > s(C0, I1)`` (each image prefers its caption);
- image score: ``s(C0, I0) > s(C0, I1)`` and ``s(C1, I1) > s(C1, I0)`` (each caption prefers its image);
- group score: both.

Each is the fraction of examples that pass; the inequalities are strict as in the paper, so a tie
fails. Chance is 25 % (text, image) and 16.7 % (group).

On the sample contract an example is two samples of one ``examples`` id, in order: image 0 with
caption 0 as its caption and caption 1 as its negative, then image 1 with caption 1 and negative
caption 0 (see docs/datasets.md); their four caption scores are the example's 2 × 2 matrix.
"""

from __future__ import annotations

import numpy as np

from clipbench.sidecars import selection_outputs
from clipbench.tasks import CAPTION_SET_METRICS
from clipbench.tasks.base import CaptionSets, CaptionSetTask, TaskInputs, TaskOutput
from clipbench.tasks.caption_selection import mean_interval, text_scores

__all__ = ["winoground_scores", "example_matrices", "TASK"]


def winoground_scores(similarity: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example pass/fail of the three scores.

    Args:
        similarity: (E, 2, 2), ``similarity[e, i, c]`` = s(caption c, image i) of example e.

    Returns:
        ``{"group_score", "text_score", "image_score"}`` -> (E,) bool.
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"Winoground similarities must be (E, 2, 2) [example, image, caption], got {s.shape}")
    text = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    image = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    return {"group_score": text & image, "text_score": text, "image_score": image}


def example_matrices(scores: np.ndarray, sets: CaptionSets, n_images: int) -> tuple[list[str], np.ndarray]:
    """The example ids (first-appearance order) and their (E, 2, 2) similarity matrices from the
    per-text scores of :func:`clipbench.tasks.caption_selection.text_scores`.

    Raises:
        ValueError: no example ids, or an example that is not two images of one caption and one
            negative each.
    """
    if sets.examples is None or len(sets.examples) != n_images:
        raise ValueError("Winoground needs the example of each image (CaptionSets.examples, one per image); "
                         "the data's storage format sets it for paired rows (source.image_columns)")
    members: dict[str, list[int]] = {}
    for image, example in enumerate(sets.examples):
        members.setdefault(str(example), []).append(image)
    owner, positive = np.asarray(sets.owner), np.asarray(sets.positive, dtype=bool)
    caption = np.full(n_images, np.nan)
    negative = np.full(n_images, np.nan)
    counts = np.bincount(owner, minlength=n_images)
    caption[owner[positive]] = scores[positive]
    negative[owner[~positive]] = scores[~positive]
    for example, images in members.items():
        if len(images) != 2 or any(counts[i] != 2 for i in images) or np.isnan(caption[images]).any() \
                or np.isnan(negative[images]).any():
            raise ValueError(f"Winoground example {example!r} has {len(images)} image(s) with "
                             f"{[int(counts[i]) for i in images]} texts; each example needs two images, "
                             "each with one caption and one negative (the other image's caption)")
    first, second = (np.array([images[k] for images in members.values()]) for k in (0, 1))
    similarity = np.empty((len(members), 2, 2))
    similarity[:, 0, 0], similarity[:, 0, 1] = caption[first], negative[first]
    similarity[:, 1, 1], similarity[:, 1, 0] = caption[second], negative[second]
    return list(members), similarity


class WinogroundTask(CaptionSetTask):
    """Winoground's three scores over the test examples (two images and two captions each)."""

    name = "winoground"
    title = "Winoground"
    spec_task = "winoground"

    def run(self, inputs: TaskInputs) -> TaskOutput:
        sets, images = inputs.caption_sets, inputs.images["test"].projected
        examples, similarity = example_matrices(text_scores(images, sets), sets, len(images))
        passed = winoground_scores(similarity)
        names = CAPTION_SET_METRICS[self.spec_task]
        primary = inputs.spec.primary_metric
        intervals = {}
        if inputs.settings["n_bootstrap"]:
            intervals[primary] = mean_interval(passed[primary], inputs.settings["n_bootstrap"],
                                               inputs.settings["seed"])
        return TaskOutput(metrics={name: float(passed[name].mean()) for name in names},
                          n_samples=len(examples), confidence_intervals=intervals,
                          details={"n_examples": len(examples), "n_images": len(images),
                                   "bootstrap_unit": "example", "ties": "fail (strict inequalities)"},
                          per_sample=selection_outputs({name: passed[name] for name in names}, primary,
                                                       ids=examples))


TASK = WinogroundTask()
