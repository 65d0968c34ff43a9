"""The prompt study (`--tasks prompt_study`): each template alone against an independent numpy
computation, the ensemble equal to the zero-shot task's number, and a run on the embedded default
that encodes no image twice and reports the spread."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clipbench import specs
from clipbench.config import RunConfig
from clipbench.reference import dataset_info
from clipbench.tasks import builtin_task_names, get_task
from clipbench.tasks.base import ClassPrompts, FeatureSplit, TaskInputs


def _spec(**kw):
    base = {"primary_metric": "accuracy", "multilabel": False, "num_classes": 3, "class_subset": None,
            "name": "toy"}
    return SimpleNamespace(**{**base, **kw})


def _inputs(spec, images, targets, prompt_features, templates):
    classnames = [f"class{i}" for i in range(len(prompt_features) // len(templates))]
    return TaskInputs(spec=spec, settings={"n_bootstrap": 0, "seed": 0},
                      images={"test": FeatureSplit(images, images, targets, "embedding")},
                      class_prompts=ClassPrompts(classnames, templates, "hand-built", prompt_features))


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_accuracy(images, targets, class_embeddings):
    """Independent: normalize each class embedding, cosine, argmax."""
    weights = class_embeddings / np.linalg.norm(class_embeddings, axis=1, keepdims=True)
    return float(np.mean(np.argmax(images @ weights.T, axis=1) == targets))


def test_each_template_alone_gives_its_hand_computed_accuracy():
    # 3 classes, images near the axes; template A points each class at its own axis (all right),
    # template B swaps classes 0 and 1 (only class 2 right: 1/3); prompts are class-major.
    images = _unit([[1, 0.1, 0], [1, 0, 0.2], [0.1, 1, 0], [0, 1, 0.1], [0, 0.2, 1], [0.1, 0, 1]])
    targets = np.array([0, 0, 1, 1, 2, 2])
    a = np.array([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]])  # unnormalized on purpose
    b = np.array([[0, 1.0, 0.3], [1.0, 0, 0.3], [0.2, 0, 1.0]])
    prompts = np.stack([a, b], axis=1).reshape(6, 3).astype(np.float32)
    output = get_task("prompt_study").run(_inputs(_spec(), images, targets, prompts, ["a {c}", "b {c}"]))

    per_template = output.details["per_template"]
    assert [p["template"] for p in per_template] == ["a {c}", "b {c}"]
    assert [p["value"] for p in per_template] == [1.0, pytest.approx(1 / 3)]
    assert per_template[0]["value"] == _numpy_accuracy(images, targets, a)
    assert per_template[1]["value"] == pytest.approx(_numpy_accuracy(images, targets, b), abs=1e-12)
    # ensemble independently: mean of the normalized template embeddings per class
    ensemble = (a / np.linalg.norm(a, axis=1, keepdims=True) + b / np.linalg.norm(b, axis=1, keepdims=True)) / 2
    assert output.metrics["accuracy"] == pytest.approx(_numpy_accuracy(images, targets, ensemble), abs=1e-12)
    assert output.metrics["template_min"] == pytest.approx(1 / 3)
    assert output.metrics["template_max"] == 1.0
    assert output.metrics["template_median"] == pytest.approx(2 / 3)
    assert output.metrics["template_std"] == pytest.approx(statistics.pstdev([1.0, 1 / 3]))
    assert output.details["n_templates"] == 2 and output.details["template_std_ddof"] == 0
    assert output.primary_metric == "accuracy" and output.config == {"templates_origin": "hand-built"}


@pytest.mark.parametrize("metric, n_classes, subset", [
    ("accuracy", 8, None), ("mean_per_class_recall", 4, None), ("roc_auc", 2, None), ("accuracy", 10, [7, 2, 5]),
])
def test_ensemble_equals_the_zero_shot_task_and_templates_match_numpy(metric, n_classes, subset):
    rng = np.random.default_rng(n_classes)
    n, d, templates = 80, 16, ["{c}", "a {c}", "the {c}", "one {c}", "big {c}"]
    n_scored = len(subset) if subset else n_classes
    images = _unit(rng.normal(size=(n, d)))
    targets = rng.integers(0, n_scored, n)
    prompts = rng.normal(size=(n_classes * len(templates), d)).astype(np.float32)
    spec = _spec(primary_metric=metric, num_classes=n_classes, class_subset=subset)
    inputs = _inputs(spec, images, targets, prompts, templates)

    study = get_task("prompt_study").run(inputs)
    zeroshot = get_task("zeroshot").run(inputs)
    assert {k: study.metrics[k] for k in zeroshot.metrics} == zeroshot.metrics  # exactly equal
    assert study.config["templates_origin"] == zeroshot.config["templates_origin"]

    by_template = prompts.reshape(n_classes, len(templates), d)
    columns = subset if subset else list(range(n_classes))
    values = []
    for t, entry in enumerate(study.details["per_template"]):
        weights = by_template[:, t] / np.linalg.norm(by_template[:, t], axis=1, keepdims=True)
        scores = (images @ weights.T)[:, columns]
        if metric == "accuracy":
            expected = np.mean(np.argmax(scores, axis=1) == targets)
        elif metric == "mean_per_class_recall":
            from sklearn.metrics import balanced_accuracy_score
            expected = balanced_accuracy_score(targets, np.argmax(scores, axis=1))
        else:
            from sklearn.metrics import roc_auc_score
            expected = roc_auc_score(targets, scores[:, 1] - scores[:, 0])
        assert entry["value"] == pytest.approx(expected, abs=1e-6)
        if metric != "accuracy":
            assert entry["accuracy"] == pytest.approx(np.mean(np.argmax(scores, axis=1) == targets), abs=1e-6)
        values.append(entry["value"])
    assert study.metrics["template_median"] == pytest.approx(float(np.median(values)))
    assert study.metrics["template_std"] == pytest.approx(statistics.pstdev(values))


def test_prompt_study_is_opt_in_and_applies_where_zero_shot_does():
    assert "prompt_study" not in builtin_task_names()
    assert RunConfig().resolved().tasks == builtin_task_names()
    task = get_task("prompt_study")
    assert task.spec_task == "zeroshot" and task.needs(None).text == "class_prompts"


def test_report_table_and_plot_from_records(tmp_path):
    from clipbench.report import report_tables, write_plots
    from clipbench.results import records_frame

    def record(dataset, values, ensemble):
        return {"model": "m", "pretrained": "p", "dataset": dataset, "task": "prompt_study",
                "primary_metric": "accuracy", "n_samples": 10,
                "metrics": {"accuracy": ensemble, "template_min": min(values), "template_max": max(values),
                            "template_median": float(np.median(values)), "template_std": float(np.std(values))},
                "details": {"n_templates": len(values),
                            "per_template": [{"template": f"t{i} {{c}}", "value": v} for i, v in enumerate(values)]}}

    frame = records_frame([record("synthetic-shapes", [0.5, 0.7, 0.6], 0.8), record("synthetic-colors", [0.9, 0.4], 0.95)])
    (table,) = [t for t in report_tables(frame) if t.task == "prompt_study"]
    body = table.frame.set_index("row")
    shapes = dataset_info("synthetic-shapes").label
    assert body.loc[shapes, ["min", "median", "max", "ensemble"]].tolist() == [0.5, 0.6, 0.7, 0.8]
    assert body.loc[shapes, "templates"] == 3
    (plot,) = [p for p in write_plots(frame, tmp_path) if "prompt_study" in p.path.name]
    assert plot.path.is_file()
    drawn = plot.data.groupby(["dataset", "kind"])["value"].apply(sorted).to_dict()
    assert drawn[(shapes, "template")] == pytest.approx([50.0, 60.0, 70.0])
    assert drawn[(shapes, "ensemble")] == pytest.approx([80.0])


@pytest.mark.slow
def test_embedded_default_prompt_study_reuses_the_features_and_is_reported(tmp_path, monkeypatch):
    from clipbench.models import load_model
    from clipbench.pipeline import Evaluator
    from clipbench.report import build_report, write_plots
    from clipbench.results import load_records

    model = load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")
    config = RunConfig(data_root=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                       tasks=["zeroshot", "prompt_study"], batch_size=128, workers=0, device="cpu",
                       precision="fp32", n_bootstrap=0)
    evaluator = Evaluator(model, config)
    spec = specs.load_spec("synthetic-shapes")
    evaluator.start_dataset(spec)
    zeroshot_task, study_task = evaluator.tasks_for(spec)
    zeroshot = evaluator.run_task(spec, zeroshot_task)

    def no_model_calls(*args, **kwargs):
        raise AssertionError("the prompt study encoded again what the zero-shot task had encoded")

    monkeypatch.setattr(model, "encode_images", no_model_calls)
    monkeypatch.setattr(model, "encode_texts", no_model_calls)
    study = evaluator.run_task(spec, study_task)

    assert study.metrics["accuracy"] == zeroshot.metrics["accuracy"]
    assert study.primary_metric == "accuracy" and study.seconds["features"] == 0.0
    templates = [line for line in Path(spec.file).parent.parent.joinpath(
        "templates", "synthetic-shapes", "templates.txt").read_text().splitlines() if line]
    assert [p["template"] for p in study.details["per_template"]] == templates
    values = [p["value"] for p in study.details["per_template"]]
    assert study.metrics["template_min"] == min(values) and study.metrics["template_max"] == max(values)
    assert study.config["templates_origin"] == zeroshot.config["templates_origin"]

    frame = load_records([config.output])
    text = build_report(frame)
    assert "## Prompt sensitivity: clipbench-tiny (synthetic)" in text
    section = text.split("## Prompt sensitivity")[1].split("##")[0]
    row = next(line for line in section.splitlines() if f"| {dataset_info(spec.name).label} " in line)
    assert f"{100 * study.metrics['accuracy']:.1f}" in row and f"{100 * min(values):.1f}" in row
    assert any(p.path.name.startswith("prompt_study") for p in write_plots(frame, tmp_path / "plots"))

    # a user's templates file (--templates) is the study's ensemble, and the record says so
    monkeypatch.undo()
    user = tmp_path / "templates.txt"
    user.write_text("a {c} on a wall.\nthe {c}.\n")
    user_config = dataclasses.replace(config, templates_file=user, output=tmp_path / "user", tasks=["prompt_study"])
    (record,) = Evaluator(model, user_config).run([spec])
    assert [p["template"] for p in record.details["per_template"]] == ["a {c} on a wall.", "the {c}."]
    assert record.config["templates_origin"] == f"user file {user}" and record.config["templates_file"] == user
