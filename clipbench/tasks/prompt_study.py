"""Prompt sensitivity of zero-shot classification: each template alone against the ensemble.

Zero-shot scores move with the prompts. From the same test-image features and class-prompt
features the ``zeroshot`` task gets (the pipeline's feature cache shares them, so no image or
prompt is encoded twice), this task scores every single template on its own (class weight = that
template's normalized text embedding) and the whole ensemble (exactly the ``zeroshot`` task's
number), with :mod:`clipbench.tasks.zeroshot`'s weights and logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipbench import metrics
from clipbench.tasks.base import TaskInputs, TaskNeeds, TaskOutput
from clipbench.tasks.zeroshot import class_subset_of, class_weights, zero_shot_logits

#: Degrees of freedom of ``template_std``: the templates studied are the whole set, not a sample.
STD_DDOF = 0


@dataclass(frozen=True)
class TemplateScores:
    """Outcome of :func:`template_study`.

    ensemble: the ensemble's metrics (``metrics.classification_metrics``; the zeroshot task's).
    per_template: per template, in the templates' order, its metrics computed alone (same names).
    """

    ensemble: dict[str, float]
    per_template: list[dict[str, float]]


def template_study(image_features: np.ndarray, prompt_features: np.ndarray, num_classes: int,
                   targets: np.ndarray, primary_metric: str, multilabel: bool = False,
                   class_subset: np.ndarray | None = None) -> TemplateScores:
    """Score each template alone and the ensemble of all of them.

    Args:
        image_features: (N, D) float32, L2-normalized.
        prompt_features: (C * T, D) prompt embeddings in ``build_prompts`` order (class-major).
        num_classes: C.
        targets, primary_metric, multilabel, class_subset: as for
            :func:`clipbench.tasks.zeroshot.evaluate`.

    Returns:
        A :class:`TemplateScores`.
    """
    prompt_features = np.asarray(prompt_features)
    ensemble = class_weights(prompt_features, num_classes)  # validates the (C * T, D) shape

    def scored(weights: np.ndarray) -> dict[str, float]:
        logits = zero_shot_logits(image_features, weights, class_subset)
        return metrics.classification_metrics(logits, targets, primary_metric, multilabel)

    by_template = prompt_features.reshape(num_classes, -1, prompt_features.shape[1])
    return TemplateScores(
        ensemble=scored(ensemble),
        per_template=[scored(class_weights(by_template[:, t], num_classes))
                      for t in range(by_template.shape[1])],
    )


def spread(values: list[float]) -> dict[str, float]:
    """``template_min``/``_median``/``_max``/``_std`` (ddof :data:`STD_DDOF`) of per-template values."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("a prompt study needs at least one template")
    return {"template_min": float(array.min()), "template_median": float(np.median(array)),
            "template_max": float(array.max()), "template_std": float(array.std(ddof=STD_DDOF))}


class PromptStudyTask:
    """Each zero-shot template alone, and their ensemble, on the test split (opt-in)."""

    name = "prompt_study"
    title = "Prompt sensitivity"
    spec_task = "zeroshot"

    def needs(self, spec) -> TaskNeeds:
        return TaskNeeds(roles=("test",), text="class_prompts")

    def settings(self, config) -> dict:
        return {}  # no bootstrap: every number is a deterministic function of the features

    def run(self, inputs: TaskInputs) -> TaskOutput:
        spec, prompts, test = inputs.spec, inputs.class_prompts, inputs.images["test"]
        primary = spec.primary_metric
        scores = template_study(test.projected, prompts.features, len(prompts.classnames), test.targets,
                                primary, multilabel=spec.multilabel, class_subset=class_subset_of(spec))
        per_template = []
        for template, values in zip(prompts.templates, scores.per_template):
            entry = {"template": template, "value": values[primary]}
            if "accuracy" in values and primary != "accuracy":
                entry["accuracy"] = values["accuracy"]
            per_template.append(entry)
        return TaskOutput(
            metrics={**scores.ensemble, **spread([entry["value"] for entry in per_template])},
            n_samples=int(test.projected.shape[0]),
            primary_metric=primary,
            details={"n_templates": len(prompts.templates), "template_std_ddof": STD_DDOF,
                     "per_template": per_template},
            config={"templates_origin": prompts.origin},
        )


TASK = PromptStudyTask()
