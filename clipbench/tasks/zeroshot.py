"""Zero-shot classification with prompt ensembling (CLIP paper, Section 3.1.4).

Arrays in, metrics out: the caller encodes the prompts from :func:`build_prompts` with the model
(in large batches across classes, cached), and passes the text and image features here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clipbench import metrics, sidecars
from clipbench.tasks.base import TaskInputs, TaskNeeds, TaskOutput

#: Where a prompt template takes the class name: ``{c}``, or OpenAI-style ``{}``.
PLACEHOLDERS = ("{c}", "{}")
# Tolerance on the L2 norm of "normalized" image features: fp16/bf16 features are about 1e-3 off.
_NORM_TOLERANCE = 1e-2


@dataclass
class ZeroShotResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        metrics: metric name -> value in [0, 1] (``metrics.classification_metrics``).
        confidence_intervals: primary metric name -> (low, high) bootstrap interval; empty when
            bootstrapping is disabled.
        per_class: one JSON-ready dict per class: ``{"class", "n", "recall"}`` (single-label) or
            ``{"class", "n", "ap"}`` (multi-label); the value is None for a class without test samples
            (positives). With a class subset, ``class`` indexes the subset.
        n_samples: number of evaluated images N.
        logits: (N, C) float32 image-class cosine similarities when requested, else None.
    """

    metrics: dict[str, float]
    confidence_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_class: list[dict] = field(default_factory=list)
    n_samples: int = 0
    logits: np.ndarray | None = None


def has_placeholder(template: str) -> bool:
    """Whether ``template`` has a class-name placeholder (one of :data:`PLACEHOLDERS`)."""
    return any(placeholder in template for placeholder in PLACEHOLDERS)


def build_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """Fill every template with every class name, class-major.

    Args:
        classnames: C class names.
        templates: T templates, each with the placeholder ``{c}`` (or OpenAI-style ``{}``).

    Returns:
        C * T prompts: all templates for class 0, then all for class 1, ...; prompt ``c * T + t`` is
        template ``t`` filled with class ``c``.
    """
    if not classnames or not templates:
        raise ValueError(
            f"zero-shot needs at least one class name and one template, got {len(classnames)} "
            f"class names and {len(templates)} templates; check the dataset spec's classnames and "
            "templates files."
        )
    for template in templates:
        if not has_placeholder(template):
            raise ValueError(
                f"prompt template {template!r} has no class-name placeholder; write `{{c}}` where "
                "the class name goes, e.g. 'a photo of a {c}.'"
            )
    # str.replace, not str.format: templates may hold other braces, and either placeholder is accepted.
    return [
        template.replace("{c}", classname).replace("{}", classname)
        for classname in classnames
        for template in templates
    ]


def class_weights(prompt_features: np.ndarray, num_classes: int) -> np.ndarray:
    """Zero-shot classifier weights by prompt ensembling.

    Each prompt embedding is L2-normalized, the T embeddings of a class are averaged, and the mean
    is L2-normalized again (the same math as ``open_clip.build_zero_shot_classifier``).

    Args:
        prompt_features: (C * T, D) float text embeddings in :func:`build_prompts` order.
        num_classes: C.

    Returns:
        (D, C) float32 unit-norm columns; ``image_features @ weights`` gives cosine logits.
    """
    prompt_features = np.asarray(prompt_features, dtype=np.float64)
    if prompt_features.ndim != 2 or num_classes < 1 or prompt_features.shape[0] % num_classes:
        raise ValueError(
            f"prompt features of shape {prompt_features.shape} cannot be split into {num_classes} "
            "classes with the same number of templates; pass a (C * T, D) array in build_prompts order."
        )
    norms = np.linalg.norm(prompt_features, axis=1, keepdims=True)
    if not np.all(norms > 0) or not np.isfinite(prompt_features).all():
        raise ValueError(
            "a prompt embedding is zero or not finite, so it cannot be normalized; check the text "
            "encoder's output (precision overflow, empty prompts)."
        )
    per_class = (prompt_features / norms).reshape(num_classes, -1, prompt_features.shape[1]).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=1, keepdims=True)
    return np.ascontiguousarray(per_class.T, dtype=np.float32)


def zero_shot_logits(image_features: np.ndarray, weights: np.ndarray,
                     class_subset: np.ndarray | None = None) -> np.ndarray:
    """Cosine logits of images against zero-shot class weights (checked to fit).

    Args:
        image_features: (N, D) float32, L2-normalized.
        weights: (D, C) float32 from :func:`class_weights`.
        class_subset: optional (C',) int indices of the columns of ``weights`` to keep, in subset
            order (see :func:`evaluate`).

    Returns:
        (N, C') float32 ``image_features @ weights`` (C' = C without a subset).
    """
    image_features = np.asarray(image_features, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    if image_features.ndim != 2 or weights.ndim != 2 or image_features.shape[1] != weights.shape[0]:
        raise ValueError(
            f"image features {image_features.shape} and class weights {weights.shape} do not fit: "
            "expected (N, D) and (D, C) with the same embedding size D, from the same model."
        )
    norms = np.linalg.norm(image_features, axis=1)
    if image_features.shape[0] and np.max(np.abs(norms - 1.0)) > _NORM_TOLERANCE:
        raise ValueError(
            "image features must be L2-normalized (unit rows): ranking metrics (roc_auc, map_11point) "
            "compare scores across images. Pass the projected, normalized features."
        )
    if class_subset is not None:
        class_subset = np.asarray(class_subset)
        if (class_subset.ndim != 1 or not np.issubdtype(class_subset.dtype, np.integer)
                or class_subset.size == 0 or class_subset.min() < 0
                or class_subset.max() >= weights.shape[1]):
            raise ValueError(
                f"class_subset must be a non-empty 1-D array of class indices in [0, {weights.shape[1]}) "
                "(columns of the classifier); check the dataset spec's class_subset file."
            )
        weights = weights[:, class_subset]

    return image_features @ weights


def class_subset_of(spec) -> np.ndarray | None:
    """The spec's ``class_subset`` as the indices :func:`evaluate` takes, or None."""
    return np.asarray(spec.class_subset) if spec.class_subset else None


def evaluate(
    image_features: np.ndarray,
    weights: np.ndarray,
    targets: np.ndarray,
    primary_metric: str,
    multilabel: bool = False,
    class_subset: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    keep_logits: bool = False,
    groups: np.ndarray | None = None,
) -> ZeroShotResult:
    """Score images against zero-shot class weights.

    Args:
        image_features: (N, D) float32, L2-normalized.
        weights: (D, C) float32 from :func:`class_weights`.
        targets: (N,) int class indices, or (N, C') 0/1 when ``multilabel``. With ``class_subset``
            the indices (columns) refer to positions in the subset, not to the C classes.
        primary_metric: the dataset's metric name (docs/architecture.md).
        multilabel: whether ``targets`` is a 0/1 matrix (VOC2007).
        class_subset: optional (C',) int indices of the columns of ``weights`` to keep, in subset
            order. ImageNet-R/A evaluate a model's 1000-class ImageNet classifier restricted to their
            200 classes: predictions are only made among the subset.
        n_bootstrap: bootstrap resamples for the primary metric's confidence interval; 0 disables it.
        seed: bootstrap seed.
        keep_logits: return the (N, C') logits in the result.
        groups: (N,) int group label of each image, for a grouped primary metric
            (``worst_group_accuracy``).

    Returns:
        A :class:`ZeroShotResult`.
    """
    logits = zero_shot_logits(image_features, weights, class_subset)
    values = metrics.classification_metrics(logits, targets, primary_metric, multilabel, groups)
    intervals = {}
    if n_bootstrap > 0:
        intervals[primary_metric] = metrics.bootstrap_ci(
            logits, targets, primary_metric, n_resamples=n_bootstrap, seed=seed, groups=groups
        )
    if multilabel:
        per_class = metrics.per_class_ap(logits, targets)
    else:
        per_class = metrics.per_class_recall(logits, targets, logits.shape[1])
    return ZeroShotResult(
        metrics=values,
        confidence_intervals=intervals,
        per_class=per_class,
        n_samples=int(logits.shape[0]),
        logits=logits if keep_logits else None,
    )


class ZeroShotTask:
    """Zero-shot classification of the test split with the spec's prompt ensemble."""

    name = "zeroshot"
    title = "Zero-shot"
    spec_task = "zeroshot"

    def needs(self, spec) -> TaskNeeds:
        return TaskNeeds(roles=("test",), text="class_prompts")

    def settings(self, config) -> dict:
        return {"n_bootstrap": config.n_bootstrap, "seed": config.seed}

    def run(self, inputs: TaskInputs) -> TaskOutput:
        spec, prompts, test = inputs.spec, inputs.class_prompts, inputs.images["test"]
        weights = class_weights(prompts.features, len(prompts.classnames))
        result = evaluate(test.projected, weights, test.targets, spec.primary_metric,
                          multilabel=spec.multilabel, class_subset=class_subset_of(spec),
                          n_bootstrap=inputs.settings["n_bootstrap"], seed=inputs.settings["seed"],
                          keep_logits=True, groups=test.groups)
        details = {"n_classes": spec.num_classes, "n_templates": len(prompts.templates)}
        classnames = prompts.classnames
        if spec.class_subset:
            details["logits_restricted_to_class_subset"] = len(spec.class_subset)
            classnames = [classnames[i] for i in spec.class_subset]
        return TaskOutput(
            metrics=result.metrics, n_samples=result.n_samples,
            confidence_intervals=result.confidence_intervals, details=details,
            per_class={"classnames": classnames, "per_class": result.per_class},
            per_sample=sidecars.classification_outputs(result.logits, test.targets, spec.primary_metric,
                                                       spec.multilabel, groups=test.groups),
            config={"templates_origin": prompts.origin},
        )


TASK = ZeroShotTask()
