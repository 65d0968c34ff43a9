"""DataComp's suite: its metrics against hand cases and sklearn, per-sample groups from webdataset
metadata, the 38-task average and group means against a hand computation, and --protocol datacomp."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import f1_score

from clipbench import datacomp, metrics, results, sidecars
from clipbench.config import RunConfig
from clipbench.data import load_split
from clipbench.errors import ClipbenchError
from clipbench.report import build_report
from clipbench.specs import load_spec, parse_spec

from conftest import _add_bytes, make_image

# ------------------------------------------------------------------------------- metrics


def test_macro_f1_hand_case_counts_a_predicted_absent_class_only_against_recall():
    # targets: classes 0, 0, 1, 2; class 3 never occurs but is predicted once (a tie of 0 and 3
    # goes to class 0, the lower index)
    scores = np.array([[1.0, 0, 0, 1.0],   # tie 0/3 -> 0, correct
                       [0, 0, 0, 1.0],     # 3, wrong (class 0 loses recall)
                       [0, 1.0, 0, 0],     # 1, correct
                       [0, 1.0, 0, 0]])    # 1, wrong (class 1 loses precision)
    targets = np.array([0, 0, 1, 2])
    # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 1, fp 1, fn 0 -> 2/3; class 2: 0
    assert metrics.compute_metric("macro_f1", scores, targets) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    expected = f1_score(targets, np.argmax(scores, axis=1), average="macro", labels=np.unique(targets))
    assert metrics.compute_metric("macro_f1", scores, targets) == pytest.approx(expected)


def test_worst_group_accuracy_hand_cases_with_ties():
    scores = np.array([[1.0, 1.0, 0.0],   # tie -> class 0
                       [0.0, 1.0, 0.0],
                       [0.5, 0.5, 0.5],   # three-way tie -> class 0
                       [0.0, 0.0, 1.0],
                       [0.0, 1.0, 0.0]])
    targets = np.array([0, 1, 1, 2, 0])
    groups = np.array([7, 7, 3, 3, 9])  # group 7: 2/2, group 3: 1/2, group 9: 0/1
    assert metrics.group_topk_accuracy(scores, targets, groups) == {3: (0.5, 2), 7: (1.0, 2), 9: (0.0, 1)}
    assert metrics.compute_metric("worst_group_accuracy", scores, targets, groups) == 0.0
    assert metrics.compute_metric("worst_group_accuracy", scores[:4], targets[:4], groups[:4]) == 0.5
    with pytest.raises(ValueError, match="group_column"):
        metrics.compute_metric("worst_group_accuracy", scores, targets)


def test_worst_group_top5_is_the_brute_force_minimum():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=(90, 9)), 1)  # many ties
    targets = rng.integers(0, 9, 90)
    groups = rng.integers(0, 4, 90)
    worst = math.inf
    for g in range(4):
        hits = []
        for row, target in zip(scores[groups == g], targets[groups == g]):
            # rank by descending score, ties toward the lower class index
            order = sorted(range(9), key=lambda c: (-row[c], c))
            hits.append(target in order[:5])
        worst = min(worst, float(np.mean(hits)))
    assert metrics.compute_metric("worst_group_top5_accuracy", scores, targets, groups) == worst


def test_mean_recall_is_the_mean_of_both_directions():
    values = {"text_to_image_R@1": 0.25, "image_to_text_R@1": 0.5, "text_to_image_R@5": 0.75,
              "image_to_text_R@5": 1.0}
    out = metrics.with_mean_recalls(values, [1, 5])
    assert out["mean_recall@1"] == 0.375 and out["mean_recall@5"] == 0.875
    assert metrics.is_retrieval_metric("mean_recall@1")


# ------------------------------------------------------------------------------- groups from the data

GROUPED_SPEC = """\
name: tiny_geode
title: tiny GeoDE
tasks: [zeroshot]
primary_metric: worst_group_accuracy
num_classes: 3
source:
  type: webdataset
  path: {root}
  download: false
  group_column: npy
  group_index: 0
splits:
  test: test
notes: test data
"""


def _npy(values) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float64))
    return buf.getvalue()


def write_grouped_wds(root: Path, n: int = 24) -> np.ndarray:
    """One shard of webp + cls + npy ([region, country]) samples; returns the regions."""
    import tarfile

    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    regions = np.arange(n) * 5 % 3
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            make_image(i % 3, i).save(buf, format="webp", lossless=True)
            _add_bytes(tar, f"s{i:04d}.webp", buf.getvalue())
            _add_bytes(tar, f"s{i:04d}.cls", str(i % 3).encode())
            _add_bytes(tar, f"s{i:04d}.npy", _npy([regions[i], 100 + i]))
    return regions


def test_group_column_reads_the_npy_metadata_entry(tmp_path):
    regions = write_grouped_wds(tmp_path / "wds")
    spec = parse_spec(yaml.safe_load(GROUPED_SPEC.format(root=tmp_path / "wds")), tmp_path / "tiny_geode.yaml")
    samples = load_split(spec, "test", tmp_path, tmp_path / "cache", allow_download=False)
    np.testing.assert_array_equal(samples.groups, regions)
    assert samples.subset(np.array([3, 1])).groups.tolist() == [regions[3], regions[1]]
    bad = parse_spec({**spec.raw, "source": {**spec.raw["source"], "group_index": 5}}, spec.file)
    with pytest.raises(ClipbenchError, match="no entry 5"):
        load_split(bad, "test", tmp_path, tmp_path / "cache", allow_download=False)
    ungrouped = {**spec.raw, "source": {k: v for k, v in spec.raw["source"].items() if not k.startswith("group")}}
    with pytest.raises(ClipbenchError, match="source.group_column"):
        parse_spec(ungrouped, spec.file)


def test_datacomp_protocol_run_scores_worst_group_in_fp32(tmp_path):
    from clipbench import pipeline

    regions = write_grouped_wds(tmp_path / "wds")
    spec_path = tmp_path / "tiny_geode.yaml"
    spec_path.write_text(GROUPED_SPEC.format(root=tmp_path / "wds"))
    config = RunConfig(datasets=[str(spec_path)], tasks=["zeroshot"], protocol="datacomp", data_root=tmp_path,
                       output=tmp_path / "out", cache_dir=tmp_path / "cache", workers=0, device="cpu",
                       n_bootstrap=0, batch_size=8)
    outcome = pipeline.run(config)
    assert not outcome.failures
    (record,) = outcome.records
    assert record.config["protocol"] == "datacomp" and record.config["precision"] == "fp32"
    path = results.record_path(config.output, record.model, record.pretrained, "tiny_geode", "zeroshot")
    outputs = sidecars.read_sample_outputs(path.with_name("zeroshot.samples.npz"))
    np.testing.assert_array_equal(outputs.arrays["groups"], regions)  # in sample order
    predictions = outputs.arrays["scores"].argmax(axis=1)
    by_hand = min(np.mean(predictions[regions == g] == outputs.arrays["targets"][regions == g]) for g in range(3))
    assert record.metrics["worst_group_accuracy"] == pytest.approx(by_hand)
    assert sidecars.recompute_metrics(outputs) == record.metrics
    # the paper protocol's record of the same data has another settings digest
    # (at fp32 too: the same features, read from the cache)
    paper = pipeline.run(RunConfig(**{**config.__dict__, "protocol": "paper", "precision": "fp32",
                                      "output": tmp_path / "out2"}))
    assert paper.records[0].config["settings_digest"] != record.config["settings_digest"]
    assert "protocol" not in paper.records[0].config


# ------------------------------------------------------------------------------- protocol settings


def test_protocol_sets_fp32_and_refuses_another_precision():
    assert RunConfig().resolved().precision == "amp"
    assert RunConfig(protocol="datacomp").resolved().precision == "fp32"
    RunConfig(protocol="datacomp", precision="fp32").validate()
    with pytest.raises(ClipbenchError, match="contradicts --protocol datacomp"):
        RunConfig(protocol="datacomp", precision="amp").validate()
    with pytest.raises(ClipbenchError, match="--protocol"):
        RunConfig(protocol="openai").validate()


def test_protocol_block_replaces_fields_and_leaves_the_paper_digest_alone():
    voc = load_spec("voc2007")
    applied = voc.for_protocol("datacomp")
    assert (applied.source.type, applied.source.path) == ("webdataset", "djghosh/wds_voc2007_test")
    assert (applied.multilabel, applied.primary_metric, applied.tasks) == (False, "accuracy", ("zeroshot",))
    assert applied.for_protocol("datacomp") is applied and voc.for_protocol("paper") is voc
    assert applied.eval_digest() != voc.eval_digest()
    without = parse_spec({k: v for k, v in voc.raw.items() if k != "protocols"}, voc.file)
    assert without.eval_digest() == voc.eval_digest() and without.data_digest() == voc.data_digest()
    assert load_spec("flickr30k").for_protocol("datacomp").primary_metric == "mean_recall@1"
    with pytest.raises(ClipbenchError, match="protocols.datacomp.nmae"):
        parse_spec({**voc.raw, "protocols": {"datacomp": {"nmae": "x"}}}, voc.file)


def test_every_datacomp_task_has_its_spec_and_metric():
    assert len(datacomp.TASKS) == 38 and len({t.title for t in datacomp.TASKS}) == 38
    from clipbench.specs import all_groups

    assert all(t.dataset is not None for t in datacomp.TASKS)
    assert sorted(all_groups()["datacomp"]) == sorted(t.dataset for t in datacomp.TASKS)
    for task in datacomp.TASKS:
        spec = load_spec(task.dataset).for_protocol("datacomp")
        assert spec.primary_metric == task.metric, task.dataset
        assert task.task == ("retrieval" if spec.is_retrieval else "association" if spec.has_caption_sets
                             else "zeroshot")


# ------------------------------------------------------------------------------- the average

TITLES = [t.title for t in datacomp.TASKS]


def test_summary_of_38_values_against_a_hand_computation():
    values = {title: (i + 1) / 100 for i, title in enumerate(TITLES)}  # tasklist order: 0.01 .. 0.38
    summary = datacomp.summarize(values)
    assert summary.average == pytest.approx(sum(range(1, 39)) / 38 / 100)  # 0.195
    # positions (1-based, tasklist.yml order) of each group's tasks
    assert summary.groups["ImageNet"] == pytest.approx(0.12)
    assert summary.groups["ImageNet dist. shifts"] == pytest.approx((13 + 14 + 15 + 16 + 17 + 20) / 6 / 100)
    assert summary.groups["VTAB"] == pytest.approx(
        (1 + 3 + 4 + 5 + 7 + 8 + 18 + 21 + 22 + 24 + 26 + 30 + 29) / 13 / 100)
    assert summary.groups["Retrieval"] == pytest.approx((31 + 32 + 33) / 3 / 100)
    assert summary.missing == () and summary.partial_mean == summary.average
    with pytest.raises(ValueError, match="not DataComp task titles"):
        datacomp.summarize({"ImageNet": 0.5})


def _record(dataset: str, task: str, record_metrics: dict, protocol: str | None) -> dict:
    config = {"precision": "fp32", **({"protocol": protocol} if protocol else {})}
    primary = next(iter(record_metrics))
    return {"schema_version": results.SCHEMA_VERSION, "model": "ViT-B-32", "pretrained": "openai",
            "dataset": dataset, "task": task, "split": "test", "metrics": record_metrics,
            "primary_metric": primary, "n_samples": 10, "config": config}


def test_records_give_a_partial_summary_never_called_the_average(tmp_path):
    expected = {}
    for i, task in enumerate(datacomp.TASKS):
        if task.dataset == "winogavil":
            continue  # written below: first a run without it
        value = (i + 1) / 100
        expected[task.title] = value
        # every record also holds another metric (accuracy next to the DataComp one)
        record_metrics = {task.metric: value, "accuracy": 0.99} if task.metric != "accuracy" else {"accuracy": value}
        folder = tmp_path / "r" / "ViT-B-32__openai" / task.dataset
        folder.mkdir(parents=True)
        (folder / f"{task.task}.json").write_text(json.dumps(_record(task.dataset, task.task, record_metrics,
                                                                     "datacomp")))
    # a paper-protocol record of another model is not counted
    other = tmp_path / "r" / "RN50__openai" / "cifar10"
    other.mkdir(parents=True)
    (other / "zeroshot.json").write_text(json.dumps({**_record("cifar10", "zeroshot", {"accuracy": 0.5}, None),
                                                     "model": "RN50"}))
    df = results.load_records([tmp_path / "r"])
    values = datacomp.values_from_records(df)
    assert list(values) == [("ViT-B-32", "openai")] and values[("ViT-B-32", "openai")] == expected
    summary = datacomp.summarize(values[("ViT-B-32", "openai")])
    assert summary.average is None and summary.missing == ("WinoGAViL",)
    assert summary.partial_mean == pytest.approx((sum(range(1, 39)) - 33) / 37 / 100)
    assert summary.groups["Retrieval"] is None and summary.groups["VTAB"] is not None
    report = build_report(df)
    assert "DataComp (38 tasks)" in report and "37/38" in report and "missing WinoGAViL" in report
    assert "not the DataComp average" in report and "1 records of these datasets" in report

    # with WinoGAViL's record the 38 are complete: the DataComp average and every group mean
    folder = tmp_path / "r" / "ViT-B-32__openai" / "winogavil"
    folder.mkdir(parents=True)
    (folder / "association.json").write_text(json.dumps(_record(
        "winogavil", "association", {"jaccard_score_10-12": 0.33, "avg_jaccard_score": 0.9}, "datacomp")))
    df = results.load_records([tmp_path / "r"])
    summary = datacomp.summarize(datacomp.values_from_records(df)[("ViT-B-32", "openai")])
    assert summary.missing == () and summary.average == pytest.approx(sum(range(1, 39)) / 38 / 100)
    assert summary.groups["Retrieval"] == pytest.approx((31 + 32 + 33) / 3 / 100)
    report = build_report(df)
    assert "38/38" in report and "missing" not in report.split("DataComp (38 tasks)")[1]
