"""The task contract: what a task asks the pipeline for, what it gets, and what it returns.

A task never loads data or models. It declares the image-feature splits and the text it needs
(:class:`TaskNeeds`); the pipeline computes them (cached) and calls :meth:`Task.run` with numpy
arrays (:class:`TaskInputs`); the task returns metrics (:class:`TaskOutput`) that the pipeline
writes as a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

#: What a task may ask for as text input.
TEXT_KINDS = (None, "class_prompts", "captions", "caption_sets")


@dataclass(frozen=True)
class TaskNeeds:
    """Inputs a task needs for one dataset.

    roles: image-feature splits by role (``train``/``val``/``test``); a role the spec does not
        define is left out of :attr:`TaskInputs.images` (``val``: carve it from ``train``).
    text: ``"class_prompts"`` (every template filled with every class name, encoded),
        ``"captions"`` (every caption of the test images, encoded), ``"caption_sets"`` (every
        test image's captions and negative captions, encoded) or None.
    """

    roles: tuple[str, ...] = ("test",)
    text: str | None = None


@dataclass(frozen=True)
class FeatureSplit:
    """Image features of one split, in dataset order.

    projected: (N, D) float32, L2-normalized embeddings.
    pre_projection: (N, P) float32 features before the final projection.
    targets: (N,) int64 or (N, C) uint8 labels; None for retrieval splits.
    pre_projection_kind: what ``pre_projection`` is (``before_projection`` or ``embedding``).
    groups: (N,) int64 group label of each sample (the spec's ``source.group_column``), or None.
    """

    projected: np.ndarray
    pre_projection: np.ndarray
    targets: np.ndarray | None
    pre_projection_kind: str
    groups: np.ndarray | None = None


@dataclass(frozen=True)
class ClassPrompts:
    """Zero-shot text input: C class names, T templates, (C * T, D) prompt features class-major."""

    classnames: list[str]
    templates: list[str]
    origin: str
    features: np.ndarray


@dataclass(frozen=True)
class Captions:
    """Retrieval text input: (M, D) caption features and (M,) the index of each caption's image."""

    features: np.ndarray
    owner: np.ndarray


@dataclass(frozen=True)
class CaptionSets:
    """Caption-selection text input (images scored against their captions and negative captions).

    features: (M, D) features of every test image's captions then its negatives, image by image.
    owner: (M,) the index of each text's image.
    positive: (M,) bool, True for a caption of its image, False for a negative.
    examples: (N,) the example each test image belongs to (images scored jointly, e.g. the two
        images of a Winoground example, in example order), or None when every image stands alone.
    """

    features: np.ndarray
    owner: np.ndarray
    positive: np.ndarray
    examples: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TaskInputs:
    """Everything a task computes from. ``spec`` is the dataset spec (data: metric, classes, ...);
    ``settings`` is the task's own :meth:`Task.settings` of the run. ``device`` (torch math) and
    ``jobs`` (probe sweep threads) say where to compute; they must not change a number."""

    spec: Any
    settings: dict[str, Any]
    images: dict[str, FeatureSplit]
    class_prompts: ClassPrompts | None = None
    captions: Captions | None = None
    caption_sets: CaptionSets | None = None
    device: str = "cpu"
    jobs: int = 1


@dataclass
class TaskOutput:
    """A task's result for one dataset.

    metrics: name -> value (fractions in [0, 1]; ranks are 1-based counts).
    primary_metric: the metric the record leads with; None means the spec's.
    confidence_intervals: metric -> (low, high).
    details: task-specific JSON-ready data (the record's ``details``).
    per_class: JSON-ready per-class sidecar, or None.
    per_sample: per-test-sample outputs (:class:`clipbench.sidecars.PerSample`) for the record's
        ``<task>.samples.npz``, in test-split order, or None.
    n_samples: evaluated test samples.
    config: record ``config`` entries that describe the inputs (e.g. where templates came from).
    """

    metrics: dict[str, float]
    n_samples: int
    primary_metric: str | None = None
    confidence_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    per_class: Any | None = None
    per_sample: Any | None = None
    config: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """One evaluation task.

    name: the ``--tasks`` name and the record's ``task``.
    title: how reports name it.
    spec_task: the entry of a spec's ``tasks`` field that makes the dataset eligible.
    """

    name: str
    title: str
    spec_task: str

    def needs(self, spec: Any) -> TaskNeeds:
        """The inputs this task needs for ``spec``."""

    def settings(self, config: Any) -> dict[str, Any]:
        """The run settings (from a :class:`clipbench.config.RunConfig`) that change this task's
        numbers; they go into the record and its settings digest."""

    def run(self, inputs: TaskInputs) -> TaskOutput:
        """Compute the metrics (pure: arrays in, metrics out)."""


class CaptionSetTask:
    """What the caption-set tasks (caption selection, Winoground, association) share: they read
    the test images with their captions and negatives, and their bootstrap intervals depend on
    ``n_bootstrap`` and ``seed``. Subclasses set the :class:`Task` names and :meth:`run`."""

    def needs(self, spec: Any) -> TaskNeeds:
        return TaskNeeds(roles=("test",), text="caption_sets")

    def settings(self, config: Any) -> dict[str, Any]:
        return {"n_bootstrap": config.n_bootstrap, "seed": config.seed}
