"""Few-shot linear probes as a task: k samples per class, several seeds, C chosen on validation.

The math is :func:`clipbench.tasks.linear_probe.few_shot`; validation comes from the same place as
the full linear probe's (:func:`clipbench.tasks.linear_probe.probe_splits`).
"""

from __future__ import annotations

from clipbench import sidecars
from clipbench.tasks.base import TaskInputs, TaskNeeds, TaskOutput
from clipbench.tasks.linear_probe import few_shot, probe_splits


class FewShotTask:
    """k-shot probes for each k of the run; the primary metric is the largest k's mean."""

    name = "few_shot"
    title = "Few-shot linear probe"
    spec_task = "linear_probe"

    def needs(self, spec) -> TaskNeeds:
        return TaskNeeds(roles=("train", "val", "test"))

    def settings(self, config) -> dict:
        return {"probe_solver": config.probe_solver, "probe_features": config.probe_features,
                "seed": config.seed, "few_shot_k": list(config.few_shot_k),
                "few_shot_seeds": config.few_shot_seeds}

    def run(self, inputs: TaskInputs) -> TaskOutput:
        spec, settings = inputs.spec, inputs.settings
        splits = probe_splits(inputs)
        (tx, ty), (vx, vy), (sx, sy) = splits.train, splits.val, splits.test
        result = few_shot(tx, ty, sx, sy, primary_metric=spec.primary_metric,
                          ks=tuple(settings["few_shot_k"]), seeds=tuple(range(settings["few_shot_seeds"])),
                          val_x=vx, val_y=vy, solver=settings["probe_solver"], device=inputs.device,
                          num_classes=spec.num_classes, n_jobs=inputs.jobs)
        metric = spec.primary_metric
        metrics = {f"{metric}@{k}shot": r.mean for k, r in result.per_k.items()}
        metrics[metric] = result.per_k[max(result.per_k)].mean
        details = {**result.record_details(), "val_source": splits.val_source,
                   "feature_kind": splits.feature_kind, "primary_is_largest_k": int(max(result.per_k))}
        ks = sorted(result.per_k)
        per_sample = sidecars.few_shot_outputs(ks, [result.per_k[k].per_sample for k in ks], sy, metric,
                                               spec.num_classes or int(max(ty.max(), sy.max())) + 1)
        return TaskOutput(metrics=metrics, n_samples=len(sy), details=details, per_sample=per_sample)


TASK = FewShotTask()
