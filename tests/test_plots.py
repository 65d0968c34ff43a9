"""Report figures: PNGs are written and show the data they were given, in the right order."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipbench import plots, report, results
from clipbench.errors import ClipbenchError

REFERENCE = Path(__file__).resolve().parent.parent / "reference"
RUN = Path(__file__).parent / "fixtures" / "records" / "clipbench_run"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_figure5_from_reference_tables(tmp_path):
    """Zero-shot ViT-L/14@336px minus ResNet-50 linear probe reproduces the paper's Figure 5 bars."""
    with open(REFERENCE / "zero_shot.csv", newline="") as f:
        zs = next(r for r in csv.DictReader(f) if r["model"] == "ViT-L/14@336px")
    with open(REFERENCE / "linear_probe.csv", newline="") as f:
        lp = next(r for r in csv.DictReader(f) if r["model"] == "ResNet-50")
    datasets = [c for c in zs if c not in ("model", "group", "paper_row_label")]
    diffs = pd.Series({d: (float(zs[d]) - float(lp[d])) / 100 for d in datasets})
    result = plots.plot_baseline_differences(diffs, tmp_path / "fig5.png", title="Figure 5")
    assert is_png(result.path)
    drawn = result.data
    assert len(drawn) == 27
    assert list(drawn.index[:3]) == ["StanfordCars", "Country211", "Food101"]  # Figure 5's top bars
    # The figure prints KITTI at -34.0 (above EuroSAT); the tables give -45.2, so KITTI ends last here.
    assert list(drawn.index[-2:]) == ["EuroSAT", "KITTI"]
    assert drawn["StanfordCars"] == pytest.approx(28.9)
    assert drawn["EuroSAT"] == pytest.approx(-37.1)
    assert drawn["KITTI"] == pytest.approx(-45.2)
    assert (np.diff(drawn.to_numpy()) <= 0).all()
    assert int((drawn > 0).sum()) == 16


def test_baseline_differences_drop_missing_and_reject_empty(tmp_path):
    result = plots.plot_baseline_differences(pd.Series({"a": -0.1, "b": math.nan, "c": 0.25}), tmp_path / "d.png")
    assert result.data.to_dict() == pytest.approx({"c": 25.0, "a": -10.0})
    with pytest.raises(ClipbenchError, match="Nothing to plot"):
        plots.plot_baseline_differences(pd.Series({"a": math.nan}), tmp_path / "e.png")


def test_few_shot_curves(tmp_path):
    curves = pd.DataFrame({"CIFAR10": [0.5, 0.7, 0.9], "EuroSAT": [0.6, math.nan, 0.8]}, index=[1, 2, 4])
    std = pd.DataFrame({"CIFAR10": [0.05, 0.02, 0.01], "EuroSAT": [0.03, math.nan, 0.01]}, index=[1, 2, 4])
    result = plots.plot_few_shot(curves, tmp_path / "few.png", zero_shot=pd.Series({"CIFAR10": 0.8}), std=std)
    assert is_png(result.path)
    assert result.data["CIFAR10"].to_dict() == pytest.approx({1: 50.0, 2: 70.0, 4: 90.0})
    assert result.data["EuroSAT"].dropna().to_dict() == pytest.approx({1: 60.0, 4: 80.0})


def test_model_comparison(tmp_path):
    values = pd.DataFrame({"A": [0.9, 0.5], "B": [0.8, math.nan]}, index=["CIFAR10", "ImageNet"])
    result = plots.plot_model_comparison(values, tmp_path / "cmp.png")
    assert is_png(result.path)
    expected = pd.DataFrame({"A": [90.0, 50.0], "B": [80.0, 0.0]}, index=["CIFAR10", "ImageNet"])
    pd.testing.assert_frame_equal(result.data, expected)


def test_report_figures_use_the_records(tmp_path):
    frame = results.load_records([RUN])
    written = {p.path.name: p for p in report.write_plots(frame, tmp_path)}
    assert all(is_png(p.path) for p in written.values())
    assert set(written) == {
        "zeroshot_vs_ResNet-50__ViT-B-32__openai.png", "zeroshot_vs_ResNet-50__tiny-clip__synthetic.png",
        "zeroshot_models.png", "linear_probe_vs_ResNet-50__ViT-B-32__openai.png", "few_shot__ViT-B-32__openai.png",
    }
    # Figure-5 bars: our zero-shot minus Table 10's ResNet-50, largest first, paper datasets only.
    with open(REFERENCE / "linear_probe.csv", newline="") as f:
        rn50 = next(r for r in csv.DictReader(f) if r["model"] == "ResNet-50")
    ours = {"Food101": 83.22, "CIFAR10": 89.87, "StanfordCars": 59.21, "EuroSAT": 45.12, "ImageNet": 63.33}
    expected = sorted(((d, v - float(rn50[d])) for d, v in ours.items()), key=lambda item: -item[1])
    bars = written["zeroshot_vs_ResNet-50__ViT-B-32__openai.png"].data
    assert list(bars.index) == [d for d, _ in expected]
    assert bars.to_numpy() == pytest.approx([v for _, v in expected])
    # Model comparison: one bar per model and dataset, ours in percent; few-shot curve in percent.
    comparison = written["zeroshot_models.png"].data
    assert comparison.loc["ImageNet"].to_dict() == pytest.approx({"ViT-B-32 (openai)": 63.33,
                                                                  "tiny-clip (synthetic)": 12.0})
    assert written["few_shot__ViT-B-32__openai.png"].data["CIFAR10"].to_list() == pytest.approx([52, 71, 86, 92, 94])
