"""Per-sample sidecars (`<task>.samples.npz`): written with every record, the record's metrics are
recomputed from them exactly, moved aside with a superseded record, and compact."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clipbench import results, sidecars, specs
from clipbench.metrics import topk_accuracy
from clipbench.pipeline import Evaluator, RunConfig
from clipbench.tasks import get_task
from clipbench.tasks.base import Captions, ClassPrompts, FeatureSplit, TaskInputs


def config_for(tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(data_root=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                     batch_size=4, workers=0, device="cpu", precision="fp32", n_bootstrap=50, **kw)


def test_every_classification_record_is_recomputed_from_its_sidecar(model, spec_file, tmp_path):
    spec = specs.load_spec(str(spec_file))
    config = config_for(tmp_path, tasks=["zeroshot", "linear_probe", "few_shot"], few_shot_k=(1, 2),
                        few_shot_seeds=2)
    records = Evaluator(model, config).run([spec])
    assert {r.task for r in records} == {"zeroshot", "linear_probe", "few_shot"}
    for record in records:
        path = results.record_path(config.output, record.model, record.pretrained, record.dataset, record.task)
        outputs = sidecars.read_sample_outputs(path.with_name(f"{record.task}.samples.npz"))
        assert sidecars.recompute_metrics(outputs) == record.metrics
        assert len(outputs.ids) == record.n_samples == 9
        assert len(set(outputs.ids)) == 9
    # sidecars are not records: the report reads three records (few-shot: one row per k)
    assert len(results.load_records([config.output])) == 4


def _spec(**kw):
    base = {"primary_metric": "accuracy", "multilabel": False, "num_classes": 4, "class_subset": None,
            "val_fraction": 0.2, "name": "toy"}
    return SimpleNamespace(**{**base, **kw})


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _zeroshot_inputs(rng, spec, targets, n_classes):
    images = _unit(rng, len(targets))
    prompts = ClassPrompts([f"c{i}" for i in range(n_classes)], ["{c}"], "test", _unit(rng, n_classes))
    return TaskInputs(spec=spec, settings={"n_bootstrap": 0, "seed": 0},
                      images={"test": FeatureSplit(images, images, targets, "embedding")}, class_prompts=prompts)


@pytest.mark.parametrize("metric, multilabel, n_classes", [
    ("accuracy", False, 8), ("mean_per_class_recall", False, 3), ("roc_auc", False, 2), ("map_11point", True, 5),
])
def test_zero_shot_sidecar_recomputes_each_metric_kind(metric, multilabel, n_classes, tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    targets = (rng.random((n, n_classes)) < 0.4).astype(np.uint8) if multilabel else rng.integers(0, n_classes, n)
    spec = _spec(primary_metric=metric, multilabel=multilabel, num_classes=n_classes)
    output = get_task("zeroshot").run(_zeroshot_inputs(rng, spec, targets, n_classes))
    path = sidecars.write_sample_outputs(tmp_path / "zeroshot.samples.npz", output.per_sample,
                                         [f"s{i}" for i in range(n)])
    outputs = sidecars.read_sample_outputs(path)
    assert sidecars.recompute_metrics(outputs) == output.metrics
    assert outputs.ids == [f"s{i}" for i in range(n)]


def test_linear_probe_binary_sidecar_recomputes_roc_auc(tmp_path):
    rng = np.random.default_rng(1)
    spec = _spec(primary_metric="roc_auc", num_classes=2)

    def split(n):
        y = rng.integers(0, 2, n)
        x = (rng.normal(size=(n, 6)) + y[:, None]).astype(np.float32)
        return FeatureSplit(x, x, y, "embedding")

    inputs = TaskInputs(spec=spec, settings={"probe_solver": "sklearn", "probe_features": "projected", "seed": 0},
                        images={"train": split(40), "val": split(20), "test": split(50)})
    output = get_task("linear_probe").run(inputs)
    sidecars.write_sample_outputs(tmp_path / "p.samples.npz", output.per_sample, [str(i) for i in range(50)])
    assert sidecars.recompute_metrics(sidecars.read_sample_outputs(tmp_path / "p.samples.npz")) == output.metrics


def test_retrieval_sidecar_recomputes_recalls_and_ranks(tmp_path):
    rng = np.random.default_rng(2)
    images, owner = _unit(rng, 30), np.repeat(np.arange(30), rng.integers(0, 4, 30))
    texts = _unit(rng, len(owner))
    inputs = TaskInputs(spec=_spec(primary_metric="text_to_image_R@5"),
                        settings={"recall_k": [1, 5, 10], "n_bootstrap": 0, "seed": 0},
                        images={"test": FeatureSplit(images, images, None, "embedding")},
                        captions=Captions(texts, owner))
    output = get_task("retrieval").run(inputs)
    sidecars.write_sample_outputs(tmp_path / "r.samples.npz", output.per_sample, [str(i) for i in range(30)])
    outputs = sidecars.read_sample_outputs(tmp_path / "r.samples.npz")
    assert sidecars.recompute_metrics(outputs) == output.metrics
    assert (outputs.arrays["image_to_text_rank"] == -1).sum() == (np.bincount(owner, minlength=30) == 0).sum()


def test_top_classes_break_ties_toward_the_lower_index():
    scores = np.array([[0.5, 0.9, 0.9, 0.1, 0.5, 0.0]])
    assert sidecars.top_classes(scores).tolist() == [[1, 2, 0, 4, 3]]
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (200, 7)).astype(np.float32)  # many ties
    targets = rng.integers(0, 7, 200)
    outputs = sidecars.SampleOutputs([], {"top_classes": sidecars.top_classes(scores), "targets": targets},
                                     {"kind": "single_label"})
    ranks = sidecars.target_ranks(outputs)[0]
    for k in (1, 3, 5):
        assert np.mean(ranks < k) == topk_accuracy(scores, targets, k)


def test_superseded_record_takes_its_sidecar_along(model, spec_file, tmp_path):
    spec = specs.load_spec(str(spec_file))
    Evaluator(model, config_for(tmp_path, tasks=["zeroshot"])).run([spec])
    Evaluator(model, config_for(tmp_path, tasks=["zeroshot"], seed=1)).run([spec])
    folder = tmp_path / "out" / "ViT-S-32-alt__none" / "colours"
    kept = sorted(p.name for p in folder.glob("zeroshot.*.superseded.samples.npz"))
    assert len(kept) == 1 and (folder / "zeroshot.samples.npz").is_file()
    record = json.loads((folder / "zeroshot.json").read_text())
    assert record["config"]["seed"] == 1


def test_imagenet_sized_sidecar_fits_the_budget(tmp_path):
    """50,000 images, 1,000 classes, ImageNet-like ids: the zero-shot sidecar is under 2 MB."""
    rng = np.random.default_rng(4)
    n, c = 50_000, 1_000
    targets = rng.integers(0, c, n)
    scores = rng.normal(size=(n, c)).astype(np.float32)
    scores[np.arange(n), targets] += 2.5  # a target often among the top classes
    per_sample = sidecars.classification_outputs(scores, targets, "accuracy")
    ids = [f"val/n{t:08d}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i, t in enumerate(targets)]
    path = sidecars.write_sample_outputs(tmp_path / "zeroshot.samples.npz", per_sample, ids)
    assert path.stat().st_size < 2_000_000
    assert sidecars.recompute_metrics(sidecars.read_sample_outputs(path))["accuracy"] == topk_accuracy(scores, targets)
