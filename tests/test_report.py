"""Reports against the CLIP paper: reference data, record loading, clip_benchmark interop, tables, CLI."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest

from clipbench import interop, reference, report, results
from clipbench.errors import ClipbenchError
from clipbench.reference import DatasetInfo

FIXTURES = Path(__file__).parent / "fixtures" / "records"
RUN = FIXTURES / "clipbench_run"
CLIP_BENCHMARK = FIXTURES / "clip_benchmark"
REFERENCE = Path(__file__).resolve().parent.parent / "reference"

# Explicit metadata, so the tests do not depend on the dataset specs.
DATASETS = {
    "cifar10": DatasetInfo("cifar10", "CIFAR10", "accuracy", ("paper", "vtab")),
    "imagenet": DatasetInfo("imagenet", "ImageNet", "accuracy", ("paper",)),
    "stanford_cars": DatasetInfo("stanford_cars", "StanfordCars", "accuracy", ("paper",)),
    "food101": DatasetInfo("food101", "Food101", "accuracy", ("paper",)),
    "eurosat": DatasetInfo("eurosat", "EuroSAT", "accuracy", ("paper", "vtab")),
    "imagenet_r": DatasetInfo("imagenet_r", None, "accuracy", ("imagenet_shifts",)),
    "flickr30k": DatasetInfo("flickr30k", None, "text_to_image_R@1", ("retrieval",)),
    "mscoco": DatasetInfo("mscoco", None, "text_to_image_R@5", ("retrieval",)),
}


def paper_table(name: str) -> dict[str, dict[str, float]]:
    """Reference CSV read with the csv module (independently of clipbench): model -> column -> percent."""
    with open(REFERENCE / f"{name}.csv", newline="") as f:
        labels = ("model", "group", "paper_row_label", "setting")
        return {row["model"]: {k: float(v) for k, v in row.items() if k not in labels and v} for row in csv.DictReader(f)}


def record(path: Path) -> dict:
    return json.loads(path.read_text())


def markdown_section(text: str, title: str) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of the markdown table under `## title`."""
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def row_of(body: list[list[str]], header: list[str], model: str, row: str) -> dict[str, str]:
    matches = [dict(zip(header, cells)) for cells in body if cells[0] == model and cells[1] == row]
    assert len(matches) == 1, (model, row, body)
    return matches[0]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return results.load_records([RUN, CLIP_BENCHMARK], datasets=DATASETS)


@pytest.fixture(scope="module")
def markdown(frame: pd.DataFrame) -> str:
    return report.build_report(frame, datasets=DATASETS)


# ----------------------------------------------------------------------------- reference data


def test_reference_tables_have_the_papers_numbers():
    zero_shot, linear_probe = paper_table("zero_shot"), paper_table("linear_probe")
    assert zero_shot["ViT-B/32"]["ImageNet"] == 63.2
    assert linear_probe["ResNet-50"]["ImageNet"] == 74.3
    figure5 = pd.read_csv(REFERENCE / "zero_shot_vs_rn50_probe.csv").set_index("dataset")
    assert figure5.loc["StanfordCars", "delta_reported_fig5"] == 28.9
    assert len(zero_shot) == 9 and len(linear_probe) == 66
    assert all(len(row) == 27 for row in zero_shot.values())


def test_figure5_inputs_agree_with_tables_10_and_11():
    """Figure 5 = zero-shot ViT-L/14@336px (Table 11) minus the ResNet-50 linear probe (Table 10)."""
    zs, lp = paper_table("zero_shot")["ViT-L/14@336px"], paper_table("linear_probe")["ResNet-50"]
    figure5 = pd.read_csv(REFERENCE / "zero_shot_vs_rn50_probe.csv")
    assert sorted(figure5["dataset"]) == sorted(zs)
    for _, row in figure5.iterrows():
        assert row["zs_clip_vit_l14_336_table11"] == zs[row["dataset"]]
        assert row["lp_resnet50_table10"] == lp[row["dataset"]]
        assert row["delta_recomputed"] == pytest.approx(zs[row["dataset"]] - lp[row["dataset"]], abs=0.051)
    # The paper's own claim for Figure 5: zero-shot CLIP wins on 16 of the 27 datasets.
    assert sum(zs[d] > lp[d] for d in zs) == 16


def test_reference_loader_and_baseline_row():
    ref = reference.load_paper_reference()
    assert ref.datasets == list(paper_table("zero_shot")["RN50"])
    row_id, base = ref.baseline_row("resnet-50")
    assert row_id == "ResNet-50"
    assert base["ImageNet"] == pytest.approx(0.743)
    with pytest.raises(ClipbenchError, match="ResNet-101"):
        ref.baseline_row("ResNet-49")


def test_paper_model_aliases():
    assert reference.paper_model("ViT-B-32", "openai") == "ViT-B/32"
    assert reference.paper_model("ViT-L-14-336", "openai") == "ViT-L/14@336px"
    assert reference.paper_model("RN50x4", "openai") == "RN50x4"
    assert reference.paper_model("ViT-B-32", "laion2b_s34b_b79k") is None
    assert reference.paper_model("tiny-clip", "openai") is None
    ref = reference.load_paper_reference()
    for model in reference.PAPER_MODELS.values():  # every alias has a row in Tables 10 and 11
        assert ref.classification_row("zeroshot", model) is not None
        assert ref.classification_row("linear_probe", model) is not None


def test_dataset_info_lookup_and_fallback():
    assert reference.dataset_info("cifar10", DATASETS).groups == ("paper", "vtab")
    custom = {"stanford_cars": DatasetInfo("stanford_cars", None)}
    assert reference.dataset_info("stanford_cars", custom).paper_name is None  # injected metadata wins
    # Not in the mapping: case/punctuation-insensitive match against paper columns and Figure 5 labels.
    assert reference.dataset_info("Stanford-Cars", {}).paper_name == "StanfordCars"
    assert reference.dataset_info("clevr_counts", {}).paper_name == "CLEVR"
    assert reference.dataset_info("patch_camelyon", {}).paper_name == "PCam"
    assert reference.dataset_info("my_own_data", {}).paper_name is None


# ----------------------------------------------------------------------------- records


def test_load_records_rows_and_skips(caplog):
    with caplog.at_level(logging.WARNING, logger="clipbench.results"):
        df = results.load_records([RUN], datasets=DATASETS)
    assert "notes.json" in caplog.text
    assert not df["source"].str.endswith(".per_class.json").any()
    files = [p for p in RUN.rglob("*.json") if not p.name.endswith(".per_class.json") and p.name != "notes.json"]
    few_shot_rows = sum(len(record(p)["details"]["k"]) for p in files if record(p)["task"] == "few_shot")
    assert len(df) == len(files) - 2 + few_shot_rows  # two few-shot files expand to one row per k
    imagenet = df[(df["model"] == "ViT-B-32") & (df["dataset"] == "imagenet") & (df["task"] == "zeroshot")].iloc[0]
    raw = record(RUN / "ViT-B-32__openai" / "imagenet" / "zeroshot.json")
    assert imagenet["value"] == raw["metrics"]["accuracy"]
    assert [imagenet["ci_low"], imagenet["ci_high"]] == raw["confidence_intervals"]["accuracy"]
    shots = df[(df["task"] == "few_shot") & (df["dataset"] == "cifar10")]
    assert list(shots["k"]) == [1, 2, 4, 8, 16]
    assert list(shots["std"]) == [0.05, 0.03, 0.02, 0.01, 0.005]


def test_missing_results_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ClipbenchError, match="does not exist"):
        results.load_records([tmp_path / "nope"])
    with pytest.raises(ClipbenchError, match="No result records"):
        report.build_report(results.load_records([tmp_path]))


def test_clip_benchmark_interop(frame):
    cb = frame[frame["origin"] == "clip_benchmark"].set_index(["dataset", "task"])
    assert set(cb.index) == {("imagenet", "zeroshot"), ("eurosat", "zeroshot"),
                             ("stanford_cars", "linear_probe"), ("mscoco", "retrieval")}
    assert cb.loc[("imagenet", "zeroshot"), "value"] == 0.6811  # acc1 -> accuracy
    assert cb.loc[("imagenet", "zeroshot"), "metrics"]["top5_accuracy"] == 0.8912
    # image_retrieval_recall@k ranks images per caption: text->image; text_retrieval is image->text.
    retrieval = cb.loc[("mscoco", "retrieval"), "metrics"]
    assert retrieval == {"text_to_image_R@5": 0.5521, "image_to_text_R@5": 0.7402}
    assert cb.loc[("mscoco", "retrieval"), "primary_metric"] == "text_to_image_R@5"
    assert interop.clip_benchmark_dataset("wds/vtab/cifar10") == "cifar10"
    assert interop.clip_benchmark_dataset("vtab/pets") == "oxford_pets"


def test_clip_benchmark_primary_metric_follows_dataset_metadata():
    raw = {"dataset": "cars", "model": "RN50", "pretrained": "openai", "task": "linear_probe",
           "metrics": {"acc1": 0.8, "mean_per_class_recall": 0.7}}
    meta = {"stanford_cars": DatasetInfo("stanford_cars", "StanfordCars", "mean_per_class_recall")}
    converted = interop.from_clip_benchmark(raw, meta)
    assert converted["primary_metric"] == "mean_per_class_recall"
    assert results.records_frame([converted])["value"].item() == 0.7


# ----------------------------------------------------------------------------- tables


def test_zero_shot_table_columns_rows_and_paper_differences(markdown):
    header, body = markdown_section(markdown, "Zero-shot")
    paper_order = list(paper_table("zero_shot")["RN50"])
    present = ["Food101", "CIFAR10", "StanfordCars", "EuroSAT", "ImageNet"]
    assert header[2:7] == sorted(present, key=paper_order.index)
    assert header[7:] == ["imagenet_r", "mean (paper datasets)", "mean (vtab)", "mean (imagenet_shifts)"]
    assert [(r[0], r[1]) for r in body] == [
        ("ViT-B-16 (openai)", "ours"), ("ViT-B-16 (openai)", "paper"), ("ViT-B-16 (openai)", "diff vs paper"),
        ("ViT-B-32 (openai)", "ours"), ("ViT-B-32 (openai)", "paper"), ("ViT-B-32 (openai)", "diff vs paper"),
        ("tiny-clip (synthetic)", "ours"),
    ]
    paper = paper_table("zero_shot")["ViT-B/32"]
    ours_raw = {DATASETS[d].paper_name: record(RUN / "ViT-B-32__openai" / d / "zeroshot.json")["metrics"]["accuracy"]
                for d in ("food101", "cifar10", "stanford_cars", "eurosat", "imagenet")}
    ours = row_of(body, header, "ViT-B-32 (openai)", "ours")
    theirs = row_of(body, header, "ViT-B-32 (openai)", "paper")
    diff = row_of(body, header, "ViT-B-32 (openai)", "diff vs paper")
    for column, value in ours_raw.items():
        assert theirs[column] == f"{paper[column]:.1f}"
        assert diff[column] == f"{100 * value - paper[column]:+.1f}"
    assert ours["ImageNet"] == "63.3 [62.9, 63.7]"  # value with its confidence interval
    assert ours["imagenet_r"] == "69.2" and theirs["imagenet_r"] == ""
    mean_ours = sum(ours_raw.values()) / 5
    mean_paper = sum(paper[c] for c in ours_raw) / 5
    assert ours["mean (paper datasets)"] == f"{100 * mean_ours:.1f}"
    assert diff["mean (paper datasets)"] == f"{100 * mean_ours - mean_paper:+.1f}"
    assert ours["mean (vtab)"] == f"{100 * (ours_raw['CIFAR10'] + ours_raw['EuroSAT']) / 2:.1f}"
    # A model the paper did not evaluate gets no paper row; its mean covers only its own datasets.
    tiny = row_of(body, header, "tiny-clip (synthetic)", "ours")
    assert tiny["mean (paper datasets)"] == f"{100 * (0.41 + 0.12) / 2:.1f}"
    # Mixed sources: the clip_benchmark ViT-B-16 run is compared with the paper's ViT-B/16 row.
    assert row_of(body, header, "ViT-B-16 (openai)", "diff vs paper")["ImageNet"] == \
        f"{68.11 - paper_table('zero_shot')['ViT-B/16']['ImageNet']:+.1f}"


def test_baseline_table_is_figure5_style(markdown):
    header, body = markdown_section(markdown, "Zero-shot vs baseline ResNet-50")
    rn50 = paper_table("linear_probe")["ResNet-50"]
    baseline = row_of(body, header, "ResNet-50 (paper, Table 10)", "baseline")
    diff = row_of(body, header, "ViT-B-32 (openai)", "diff vs ResNet-50")
    wins = 0
    for d in ("food101", "cifar10", "stanford_cars", "eurosat", "imagenet"):
        column = DATASETS[d].paper_name
        value = 100 * record(RUN / "ViT-B-32__openai" / d / "zeroshot.json")["metrics"]["accuracy"]
        assert baseline[column] == f"{rn50[column]:.1f}"
        assert diff[column] == f"{value - rn50[column]:+.1f}"
        wins += value > rn50[column]
    assert (diff["wins"], diff["datasets"]) == (str(wins), "5")
    assert "imagenet_r" not in header  # no baseline number outside the paper's datasets


def test_other_baseline_and_unknown_baseline(frame):
    text = report.build_report(frame, baseline="resnet-101", datasets=DATASETS)
    header, body = markdown_section(text, "Linear probe vs baseline ResNet-101")
    rn101 = paper_table("linear_probe")["ResNet-101"]
    diff = row_of(body, header, "ViT-B-32 (openai)", "diff vs ResNet-101")
    assert diff["CIFAR10"] == f"{94.77 - rn101['CIFAR10']:+.1f}"
    with pytest.raises(ClipbenchError, match="Unknown baseline"):
        report.build_report(frame, baseline="AlexNet", datasets=DATASETS)


def test_csv_is_tidy_raw_fractions(frame):
    table = pd.read_csv(io.StringIO(report.build_report(frame, fmt="csv", datasets=DATASETS)))
    assert list(table.columns) == ["table", "task", "model", "row", "column", "value", "ci_low", "ci_high", "std",
                                   "skipped", "cross_protocol"]
    zs = table[(table["table"] == "Zero-shot") & (table["model"] == "ViT-B-32 (openai)")]
    ours = zs[zs["row"] == "ours"].set_index("column")
    assert list(ours.index[:6]) == ["Food101", "CIFAR10", "StanfordCars", "EuroSAT", "ImageNet", "imagenet_r"]
    assert ours.loc["ImageNet", "value"] == 0.6333
    assert (ours.loc["ImageNet", "ci_low"], ours.loc["ImageNet", "ci_high"]) == (0.629, 0.6375)
    diff = zs[zs["row"] == "diff vs paper"].set_index("column")
    assert diff.loc["Food101", "value"] == pytest.approx(0.8322 - 0.844, abs=1e-12)
    base = table[(table["table"] == "Zero-shot vs baseline ResNet-50") & (table["model"] == "ViT-B-32 (openai)")]
    assert base.set_index("column").loc["StanfordCars", "value"] == pytest.approx(0.5921 - 0.499, abs=1e-12)


def test_other_formats(frame):
    latex = report.build_report(frame, fmt="latex", datasets=DATASETS)
    html = report.build_report(frame, fmt="html", datasets=DATASETS)
    # 7 tables against the paper and the baseline, 2 against open_clip (zero-shot, retrieval)
    assert latex.count("\\begin{tabular}") == html.count("<table>") == 9
    assert "imagenet\\_r" in latex and "<h2>Zero-shot</h2>" in html
    with pytest.raises(ClipbenchError, match="format"):
        report.build_report(frame, fmt="xlsx")


def test_crossing_k_hand_computed():
    assert report.crossing_k([1, 4], [0.2, 0.6], 0.4) == pytest.approx(2.0)  # halfway in log k
    assert report.crossing_k([1, 2, 4], [0.5, 0.6, 0.7], 0.3) == 1.0
    assert report.crossing_k([1, 2, 4], [0.1, 0.2, 0.3], 0.5) is None
    expected = 4 * 2 ** ((0.8987 - 0.86) / (0.92 - 0.86))
    assert report.crossing_k([1, 2, 4, 8, 16], [0.52, 0.71, 0.86, 0.92, 0.94], 0.8987) == pytest.approx(expected)


def test_few_shot_tables(markdown):
    header, body = markdown_section(markdown, "Few-shot linear probe")
    assert header[2:] == ["CIFAR10", "EuroSAT"]
    assert [r[1] for r in body] == ["zero-shot", "k=1", "k=2", "k=4", "k=8", "k=16"]
    shots = record(RUN / "ViT-B-32__openai" / "cifar10" / "few_shot.json")["details"]["k"]
    k4 = row_of(body, header, "ViT-B-32 (openai)", "k=4")
    assert k4["CIFAR10"] == f"{100 * shots['4']['mean']:.1f} ± {100 * shots['4']['std']:.1f}"
    assert row_of(body, header, "ViT-B-32 (openai)", "k=2")["EuroSAT"] == ""
    header, body = markdown_section(markdown, "Few-shot vs zero-shot crossing")
    crossing = row_of(body, header, "ViT-B-32 (openai)", "k to match zero-shot")
    assert crossing["CIFAR10"] == f"{4 * 2 ** ((0.8987 - 0.86) / (0.92 - 0.86)):.1f}"
    assert crossing["EuroSAT"] == "1.0"  # 1-shot already beats zero-shot


def test_retrieval_table_against_table13(markdown):
    header, body = markdown_section(markdown, "Zero-shot retrieval")
    clip = paper_table("retrieval")["CLIP (ViT-L/14@336px)"]
    ours = record(RUN / "ViT-L-14-336__openai" / "flickr30k" / "retrieval.json")["metrics"]
    diff = row_of(body, header, "ViT-L-14-336 (openai)", "diff vs paper")
    # Table 13 "text retrieval" = image->text, "image retrieval" = text->image.
    assert diff["flickr30k image_to_text_R@1"] == f"{100 * ours['image_to_text_R@1'] - clip['text_flickr30k_R@1']:+.1f}"
    expected = 100 * ours["text_to_image_R@5"] - clip["image_flickr30k_R@5"]
    assert diff["flickr30k text_to_image_R@5"] == f"{expected:+.1f}"
    assert row_of(body, header, "ViT-B-16 (openai)", "ours")["mscoco text_to_image_R@5"] == "55.2"
    assert not [r for r in body if r[0] == "ViT-B-16 (openai)" and r[1] == "paper"]


def test_summary_table():
    records = [record(RUN / "ViT-B-32__openai" / "imagenet" / "zeroshot.json"),
               record(RUN / "tiny-clip__synthetic" / "cifar10" / "zeroshot.json")]
    lines = report.summary_table(records, datasets=DATASETS).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["model", "pretrained", "dataset", "task", "metric", "value (%)", "paper (%)", "diff"]
    assert cells[2] == ["ViT-B-32", "openai", "imagenet", "zeroshot", "accuracy", "63.3 [62.9, 63.7]", "63.2", "+0.1"]
    assert cells[3] == ["tiny-clip", "synthetic", "cifar10", "zeroshot", "accuracy", "41.0", "", ""]


# ----------------------------------------------------------------------------- CLI


def test_cli_report_writes_file_and_plots(tmp_path):
    parser = argparse.ArgumentParser(prog="clipbench")
    report.register_cli(parser.add_subparsers(dest="command"))
    out, plots = tmp_path / "report.csv", tmp_path / "plots"
    args = parser.parse_args(["report", str(RUN), "--format", "csv", "--out", str(out), "--plot", str(plots)])
    assert args.handler(args) == 0
    table = pd.read_csv(out)
    assert {"Zero-shot", "Linear probe", "Few-shot linear probe", "Zero-shot retrieval"} <= set(table["table"])
    names = sorted(p.name for p in plots.iterdir())
    assert "zeroshot_vs_ResNet-50__ViT-B-32__openai.png" in names
    assert "few_shot__ViT-B-32__openai.png" in names
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert not math.isnan(table["value"].iloc[0])


def test_clipbench_report_command(tmp_path, capsys):
    from clipbench.cli import main

    out = tmp_path / "report.md"
    assert main(["report", str(RUN), "--baseline", "ResNet-152", "--out", str(out)]) == 0
    assert "## Zero-shot vs baseline ResNet-152" in out.read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_two_names_for_one_paper_dataset_stay_apart(caplog):
    records = [{"model": "RN50", "pretrained": "openai", "dataset": name, "task": "zeroshot", "split": "test",
                "metrics": {"accuracy": value}, "primary_metric": "accuracy", "schema_version": 1}
               for name, value in (("kitti", 0.3), ("kitti_distance", 0.4))]
    with caplog.at_level(logging.WARNING, logger="clipbench.report"):
        text = report.build_report(results.records_frame(records), datasets={})
    header, body = markdown_section(text, "Zero-shot")
    assert header[2:4] == ["KITTI", "kitti_distance"]
    ours = row_of(body, header, "RN50 (openai)", "ours")
    assert (ours["KITTI"], ours["kitti_distance"]) == ("30.0", "40.0")
    assert "both map to the paper's 'KITTI'" in caplog.text
