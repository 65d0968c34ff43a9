"""open_clip's published results as a reference: the shipped files, the join, the report's tables."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from clipbench import openclip_reference, report, results
from clipbench.errors import ClipbenchError
from clipbench.openclip_reference import load_openclip_reference, record_metric
from clipbench.reference import DatasetInfo
from clipbench.render import CROSS_PROTOCOL_MARK

REFERENCE = Path(__file__).resolve().parent.parent / "reference"
#: git blob ids of the files at open_clip commit 89fb801 (`git ls-tree HEAD docs/`)
UPSTREAM_BLOBS = {
    "openclip_results.csv": "2a32aefd590dbf3c5445a29d08e16de09be48777",
    "openclip_classification_results.csv": "25cdce1e51a5040a2ef9fa3863412431ca143688",
    "openclip_retrieval_results.csv": "65055f2e6568c73615f9a38228b381abde7d5d49",
}
#: spec names of the DataComp datasets the paper's suite lacks (agreed across branches)
NEW_DATACOMP_SPECS = {"clevr_distance", "imagenet_o", "svhn", "winogavil", "iwildcam", "camelyon17", "fmow",
                      "dollar_street", "geode"}

DATASETS = {
    "imagenet": DatasetInfo("imagenet", "ImageNet", "accuracy", ("paper",)),
    "caltech101": DatasetInfo("caltech101", "Caltech101", "mean_per_class_recall", ("paper",)),
    "voc2007": DatasetInfo("voc2007", "VOC2007", "map_11point", ("paper",)),
    "iwildcam": DatasetInfo("iwildcam", None, "macro_f1", ("datacomp",)),
    "flickr30k": DatasetInfo("flickr30k", None, "text_to_image_R@1", ("retrieval",)),
    "winogavil": DatasetInfo("winogavil", None, "jaccard_score_10-12", ("datacomp",)),
}


def published(file: str, model: str, pretrained: str, column: str) -> float:
    """A value read from the shipped CSV with the csv module, independently of clipbench."""
    with open(REFERENCE / file, newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if (r["name"], r["pretrained"]) == (model, pretrained)]
    return float(row[column])


def rec(model: str, pretrained: str, dataset: str, task: str, metrics: dict, primary: str,
        precision: str = "fp32") -> dict:
    return {"model": model, "pretrained": pretrained, "dataset": dataset, "task": task, "split": "test",
            "metrics": metrics, "primary_metric": primary, "config": {"precision": precision},
            "schema_version": 2}


def section(text: str, title: str) -> tuple[list[str], dict[tuple[str, str], dict[str, str]], str]:
    """Header, rows keyed by (model, row) and the notes of the markdown table under `## title`."""
    part = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in part.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header = cells[0]
    rows = {(c[0], c[1]): dict(zip(header, c)) for c in cells[2:]}
    notes = "\n".join(line for line in part.splitlines() if line and not line.startswith("|"))
    return header, rows, notes


def test_shipped_files_are_open_clips_unchanged():
    for name, blob in UPSTREAM_BLOBS.items():
        data = (REFERENCE / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, name


def test_join_reads_vit_b_32_openai_imagenet():
    assert published("openclip_results.csv", "ViT-B-32", "openai", "ImageNet 1k") == 0.6332
    oc = load_openclip_reference()
    (column,) = oc.columns_of("imagenet", "zeroshot")
    assert (column.column, column.metric, column.datacomp_metric) == ("ImageNet 1k", "accuracy", "acc1")
    for model in ("ViT-B-32", "ViT-B/32", "vit-b-32"):  # open_clip's name, OpenAI's, any case
        key = oc.row_key(model, "openai")
        assert key == ("ViT-B-32", "openai")
        assert oc.value(key, column) == 0.6332
    assert oc.row_key("ViT-B-32", "/ckpt/local.pt") is None
    assert oc.row_key("clipbench-tiny", "synthetic") is None


def test_mapping_covers_the_38_tasks_with_datacomps_metrics():
    oc = load_openclip_reference()
    with open(REFERENCE / "openclip_results.csv", newline="") as f:
        header = next(csv.reader(f))
    values = [c for c in header if c not in ("name", "pretrained", "params (M)", "FLOPs (B)")
              and not c.startswith("Average")]
    main = {c.column: c for c in oc.columns if c.main}
    assert len(values) == 38 and set(main) == set(values)
    specs = {p.stem for p in (REFERENCE.parent / "dataset_specs").glob("*.yaml")}
    assert {c.dataset for c in oc.columns} <= specs | NEW_DATACOMP_SPECS
    # tasklist.yml: main_metric where it is not top-1 accuracy
    assert {c.column: c.metric for c in main.values() if c.metric != "accuracy"} == {
        "Caltech-101": "mean_per_class_recall", "FGVC Aircraft": "mean_per_class_recall",
        "Oxford Flowers-102": "mean_per_class_recall", "Oxford-IIIT Pet": "mean_per_class_recall",
        "Flickr": "mean_recall@1", "MSCOCO": "mean_recall@1", "WinoGAViL": "jaccard_score_10-12",
        "iWildCam": "macro_f1", "FMoW": "worst_group_accuracy",
        "Dollar Street": "worst_group_top5_accuracy", "GeoDE": "worst_group_accuracy",
    }
    # Flickr/MSCOCO in the main file are DataComp's mean of both R@1 (retr_eval.py), to 4 decimals
    for name, prefix in (("ViT-B-32", "Flickr"), ("ViT-L-14", "MSCOCO")):
        mean = (published("openclip_retrieval_results.csv", name, "openai", f"{prefix} image retr. R@1")
                + published("openclip_retrieval_results.csv", name, "openai", f"{prefix} text retr. R@1")) / 2
        assert abs(published("openclip_results.csv", name, "openai", prefix) - mean) <= 5e-5


def test_record_metric_derives_datacomps_mean_recall():
    assert record_metric({"image_to_text_R@1": 0.8, "text_to_image_R@1": 0.5}, "mean_recall@1") == pytest.approx(0.65)
    assert record_metric({"mean_recall@1": 0.7, "image_to_text_R@1": 0.8}, "mean_recall@1") == 0.7
    assert record_metric({"image_to_text_R@1": 0.8}, "mean_recall@1") is None
    assert record_metric({"accuracy": 0.5}, "macro_f1") is None


@pytest.fixture(scope="module")
def markdown() -> str:
    records = [
        rec("ViT-B-32", "openai", "imagenet", "zeroshot", {"accuracy": 0.6, "top5_accuracy": 0.9}, "accuracy"),
        # a record that holds DataComp's metric besides its primary one: that one is compared
        rec("ViT-B-32", "openai", "caltech101", "zeroshot",
            {"accuracy": 0.9, "mean_per_class_recall": 0.85}, "accuracy"),
        # clipbench's VOC2007 is multi-label mAP; DataComp's is top-1 accuracy: cross-protocol
        rec("ViT-B-32", "openai", "voc2007", "zeroshot", {"map_11point": 0.8}, "map_11point"),
        rec("ViT-B-32", "openai", "iwildcam", "zeroshot", {"macro_f1": 0.1, "accuracy": 0.3}, "macro_f1"),
        rec("ViT-B-32", "openai", "flickr30k", "retrieval",
            {"image_to_text_R@1": 0.8, "text_to_image_R@1": 0.6, "text_to_image_R@5": 0.85}, "text_to_image_R@1"),
        rec("ViT-B-32", "openai", "imagenet", "linear_probe", {"accuracy": 0.76}, "accuracy"),
        rec("ViT-B-32", "openai", "winogavil", "association",
            {"jaccard_score_10-12": 0.4, "avg_jaccard_score": 0.5}, "jaccard_score_10-12"),
        rec("ViT-B/16", "openai", "imagenet", "zeroshot", {"accuracy": 0.68}, "accuracy", precision="amp"),
        rec("my-model", "none", "imagenet", "zeroshot", {"accuracy": 0.01}, "accuracy"),
        rec("my-model", "none", "flickr30k", "retrieval",
            {"image_to_text_R@1": 0.01, "text_to_image_R@1": 0.01}, "text_to_image_R@1"),
    ]
    return report.build_report(results.records_frame(records), datasets=DATASETS)


def test_report_shows_published_value_and_difference(markdown):
    header, rows, notes = section(markdown, "Zero-shot vs open_clip")
    zero_shot_header, _, _ = section(markdown, "Zero-shot")
    assert header[2:] == zero_shot_header[2:6] == ["VOC2007", "Caltech101", "ImageNet", "iwildcam"]  # paper order
    ours, theirs, diff = (rows[("ViT-B-32 (openai)", r)] for r in ("ours", "open_clip", "diff vs open_clip"))
    assert (ours["ImageNet"], theirs["ImageNet"], diff["ImageNet"]) == ("60.0", "63.3", "-3.3")
    caltech = published("openclip_results.csv", "ViT-B-32", "openai", "Caltech-101")
    assert (ours["Caltech101"], diff["Caltech101"]) == ("85.0", f"{100 * (0.85 - caltech):+.1f}")
    iwildcam = published("openclip_results.csv", "ViT-B-32", "openai", "iWildCam")
    assert (theirs["iwildcam"], diff["iwildcam"]) == (f"{100 * iwildcam:.1f}", f"{100 * (0.1 - iwildcam):+.1f}")
    assert "DataComp evaluation: fp32 without autocast" in notes
    assert "iwildcam macro_f1" in notes and "Caltech101 mean_per_class_recall" in notes
    # the linear-probe record has no open_clip counterpart
    assert "## Linear probe vs open_clip" not in markdown


def test_metric_mismatch_is_marked_cross_protocol(markdown):
    _, rows, notes = section(markdown, "Zero-shot vs open_clip")
    voc = published("openclip_results.csv", "ViT-B-32", "openai", "Pascal VOC 2007")
    assert rows[("ViT-B-32 (openai)", "ours")]["VOC2007"] == f"80.0 {CROSS_PROTOCOL_MARK}"
    assert rows[("ViT-B-32 (openai)", "open_clip")]["VOC2007"] == f"{100 * voc:.1f}"
    assert rows[("ViT-B-32 (openai)", "diff vs open_clip")]["VOC2007"] == f"{100 * (0.8 - voc):+.1f} {CROSS_PROTOCOL_MARK}"
    assert "VOC2007 (ours map_11point, open_clip accuracy)" in notes
    assert CROSS_PROTOCOL_MARK not in rows[("ViT-B-32 (openai)", "diff vs open_clip")]["ImageNet"]
    # a precision other than open_clip's fp32 is said too
    assert "ViT-B/16 (openai) amp" in notes and "also cross protocols" in notes


def test_retrieval_against_open_clip_uses_datacomps_mean_recall(markdown):
    header, rows, _ = section(markdown, "Zero-shot retrieval vs open_clip")
    assert header[2:] == ["flickr30k mean_recall@1", "flickr30k text_to_image_R@1", "flickr30k text_to_image_R@5",
                          "flickr30k image_to_text_R@1"]
    flickr = published("openclip_results.csv", "ViT-B-32", "openai", "Flickr")
    diff = rows[("ViT-B-32 (openai)", "diff vs open_clip")]
    assert diff["flickr30k mean_recall@1"] == f"{100 * (0.7 - flickr):+.1f}"
    image_r5 = published("openclip_retrieval_results.csv", "ViT-B-32", "openai", "Flickr image retr. R@5")
    assert diff["flickr30k text_to_image_R@5"] == f"{100 * (0.85 - image_r5):+.1f}"
    text_r1 = published("openclip_retrieval_results.csv", "ViT-B-32", "openai", "Flickr text retr. R@1")
    assert diff["flickr30k image_to_text_R@1"] == f"{100 * (0.8 - text_r1):+.1f}"


def test_cross_protocol_cells_are_flagged_in_the_tidy_csv():
    import io

    import pandas as pd

    records = [rec("ViT-B-32", "openai", "voc2007", "zeroshot", {"map_11point": 0.8}, "map_11point"),
               rec("ViT-B-32", "openai", "imagenet", "zeroshot", {"accuracy": 0.6}, "accuracy")]
    csv = report.build_report(results.records_frame(records), fmt="csv", datasets=DATASETS)
    table = pd.read_csv(io.StringIO(csv))
    ours = table[(table["table"] == "Zero-shot vs open_clip") & (table["row"] == "ours")].set_index("column")
    assert bool(ours.loc["VOC2007", "cross_protocol"]) and not bool(ours.loc["ImageNet", "cross_protocol"])
    assert not table["skipped"].any()


def test_association_against_open_clip_uses_the_10_to_12_candidate_jaccard(markdown):
    header, rows, _ = section(markdown, "Association (Jaccard) vs open_clip")
    assert header[2:] == ["winogavil"]
    wino = published("openclip_results.csv", "ViT-B-32", "openai", "WinoGAViL")
    assert rows[("ViT-B-32 (openai)", "open_clip")]["winogavil"] == f"{100 * wino:.1f}"
    assert rows[("ViT-B-32 (openai)", "diff vs open_clip")]["winogavil"] == f"{100 * (0.4 - wino):+.1f}"


def test_alias_and_unknown_model(markdown):
    _, rows, notes = section(markdown, "Zero-shot vs open_clip")
    b16 = published("openclip_results.csv", "ViT-B-16", "openai", "ImageNet 1k")
    assert rows[("ViT-B/16 (openai)", "diff vs open_clip")]["ImageNet"] == f"{100 * (0.68 - b16):+.1f}"
    assert "ViT-B/16 (openai) = ViT-B-16/openai" in notes
    assert not [key for key in rows if key[0] == "my-model (none)"]
    assert not [line for line in markdown.splitlines() if line.startswith("| my-model") and "open_clip" in line]
    assert markdown.count("no published results for my-model (none)") == 1


def test_broken_mapping_is_a_clear_error(tmp_path, monkeypatch):
    for name in UPSTREAM_BLOBS:
        (tmp_path / name).write_bytes((REFERENCE / name).read_bytes())
    (tmp_path / "openclip_columns.csv").write_text(
        "file,column,dataset,task,metric,datacomp_task,datacomp_metric\n"
        "openclip_results.csv,ImageNet-1k,imagenet,zeroshot,accuracy,imagenet1k,acc1\n")
    monkeypatch.setattr(openclip_reference, "reference_dir", lambda: tmp_path)
    with pytest.raises(ClipbenchError, match="'ImageNet-1k' of openclip_results.csv"):
        load_openclip_reference()
    (tmp_path / "openclip_results.csv").unlink()
    with pytest.raises(ClipbenchError, match="openclip_results.csv is missing"):
        load_openclip_reference()
