"""Cue–image association (WinoGAViL: Bitton et al. 2022, "WinoGAViL: Gamified Association Benchmark
to Challenge Vision-and-Language Models"), scored as DataComp scores it.

An example is one textual cue against a set of 5 to 12 candidate images, some of which (the
associations) a human player linked to the cue. The model picks as many candidates as there are
associations, those whose images are most similar to the cue (cosine similarity of the
L2-normalized embeddings), and the example scores the Jaccard index of the picked and the
associated sets, |picked ∩ associated| / |picked ∪ associated|.

The pick follows DataComp (``eval_utils/wino_eval.py``: ``np.argsort(similarities)[-n:]``): the
candidates sorted ascending, the last ``n``. DataComp's default ``argsort`` leaves the order of
equal scores to numpy's sort kernel, which differs between dtypes and CPUs (the SIMD kernels for
float32 are not stable), so its tied examples are not reproducible; here the sort is stable, so
among equal scores the later candidate is picked, on every machine. Without ties the two agree.

The metrics are DataComp's: the mean Jaccard index over all examples (``avg_jaccard_score``), over
examples of 5, 6, 10 and 12 candidates (``jaccard_score_5``, ...), of at most 6
(``jaccard_score_5-6``) and of at least 10 (``jaccard_score_10-12``, DataComp's main metric).

On the sample contract an example is its candidate images, in order, sharing one ``examples`` id;
each carries the cue as its one text, a caption if it is an association, else a negative
(:func:`clipbench.data.base.caption_set_rows`, candidate rows).

Features in, metrics out: this module never loads a model or a dataset.
"""

from __future__ import annotations

import math

import numpy as np

from clipbench.sidecars import selection_outputs
from clipbench.tasks import CAPTION_SET_METRICS
from clipbench.tasks.base import CaptionSets, CaptionSetTask, TaskInputs, TaskOutput
from clipbench.tasks.caption_selection import mean_interval, text_scores

__all__ = ["SUBSETS", "jaccard_index", "example_scores", "subset_values", "TASK"]

#: DataComp's metrics: name -> (fewest, most) candidates of the examples it averages
SUBSETS: dict[str, tuple[float, float]] = {
    "avg_jaccard_score": (0, math.inf),
    "jaccard_score_5": (5, 5),
    "jaccard_score_6": (6, 6),
    "jaccard_score_10": (10, 10),
    "jaccard_score_12": (12, 12),
    "jaccard_score_5-6": (0, 6),
    "jaccard_score_10-12": (10, math.inf),
}


def jaccard_index(scores: np.ndarray, associated: np.ndarray) -> float:
    """The Jaccard index of the ``n`` best-scored candidates and the ``n`` associated ones.

    Args:
        scores: (K,) each candidate's similarity to the cue.
        associated: (K,) bool, True for the associations (n >= 1 of them).

    Raises:
        ValueError: shapes differ, or no candidate is associated.
    """
    scores, associated = np.asarray(scores, dtype=np.float64), np.asarray(associated, dtype=bool)
    if scores.ndim != 1 or scores.shape != associated.shape:
        raise ValueError(f"scores {scores.shape} and associated {associated.shape} must be one (K,) vector each")
    n = int(associated.sum())
    if n == 0:
        raise ValueError("an example needs at least one associated candidate")
    picked = np.zeros(len(scores), dtype=bool)
    picked[np.argsort(scores, kind="stable")[-n:]] = True
    return float((picked & associated).sum() / (picked | associated).sum())


def example_scores(scores: np.ndarray, sets: CaptionSets, n_images: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each example's Jaccard index from the per-text scores of
    :func:`clipbench.tasks.caption_selection.text_scores`.

    Returns:
        example ids (first-appearance order), (E,) float64 Jaccard indices, (E,) int64 candidate counts.

    Raises:
        ValueError: no example ids, or an image that is not scored against exactly one text.
    """
    if sets.examples is None or len(sets.examples) != n_images:
        raise ValueError("association needs the example of each candidate image (CaptionSets.examples, one per "
                         "image); the storage format sets it for candidate rows (source.candidate_column)")
    owner, positive = np.asarray(sets.owner, dtype=np.int64), np.asarray(sets.positive, dtype=bool)
    counts = np.bincount(owner, minlength=n_images)
    if (counts != 1).any():
        image = int(np.flatnonzero(counts != 1)[0])
        raise ValueError(f"image {image} has {int(counts[image])} texts; each candidate image is scored against "
                         "exactly one text, its example's cue")
    score, associated = np.empty(n_images), np.empty(n_images, dtype=bool)
    score[owner], associated[owner] = scores, positive
    members: dict[str, list[int]] = {}
    for image, example in enumerate(sets.examples):
        members.setdefault(str(example), []).append(image)
    values = np.array([jaccard_index(score[images], associated[images]) for images in members.values()])
    sizes = np.array([len(images) for images in members.values()], dtype=np.int64)
    return list(members), values, sizes


def subset_values(values: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Per metric of :data:`SUBSETS`, (E,) the examples' values, NaN outside its subset."""
    values, sizes = np.asarray(values, dtype=np.float64), np.asarray(sizes)
    return {name: np.where((sizes >= low) & (sizes <= high), values, np.nan) for name, (low, high) in SUBSETS.items()}


class AssociationTask(CaptionSetTask):
    """Each cue against its candidate images: DataComp's Jaccard scores (WinoGAViL)."""

    name = "association"
    title = "Association (Jaccard)"
    spec_task = "association"

    def run(self, inputs: TaskInputs) -> TaskOutput:
        sets, images = inputs.caption_sets, inputs.images["test"].projected
        examples, values, sizes = example_scores(text_scores(images, sets), sets, len(images))
        per_metric = subset_values(values, sizes)
        # a subset without examples has no mean: left out rather than NaN in the record
        means = {name: float(np.nanmean(v)) for name, v in per_metric.items() if not np.isnan(v).all()}
        primary = inputs.spec.primary_metric
        if primary not in means:
            raise ValueError(f"no example has the candidate count of {primary!r} ({SUBSETS[primary]}); the test "
                             f"split's examples have {sorted(set(sizes.tolist()))} candidates")
        intervals = {}
        if inputs.settings["n_bootstrap"]:
            chosen = per_metric[primary]
            intervals[primary] = mean_interval(chosen[~np.isnan(chosen)], inputs.settings["n_bootstrap"],
                                               inputs.settings["seed"])
        counts = {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))}
        return TaskOutput(metrics={name: means[name] for name in CAPTION_SET_METRICS[self.spec_task] if name in means},
                          n_samples=len(examples), confidence_intervals=intervals,
                          details={"n_examples": len(examples), "n_images": len(images),
                                   "examples_by_candidates": counts, "bootstrap_unit": "example",
                                   "ties": "the later candidate (DataComp's stable ascending argsort)"},
                          per_sample=selection_outputs({name: per_metric[name] for name in means}, primary,
                                                       ids=examples))


TASK = AssociationTask()
