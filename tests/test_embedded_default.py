"""The embedded default through the full pipeline: the trained tiny CLIP is far from chance, the same
architecture with random weights is at chance, so a broken pipeline (shuffled labels, a wrong
normalization, a transposed similarity) cannot pass."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from clipbench import specs
from clipbench.cli import _build_parser, main
from clipbench.models import load_model
from clipbench.pipeline import Evaluator, RunConfig
from clipbench.results import load_records, record_path

# the module's fixtures run the embedded default on its synthetic datasets
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedded")


def run(model, shared: Path, name: str, datasets: list[str], tasks: list[str]):
    config = RunConfig(data_root=shared / "data", output=shared / name, cache_dir=shared / "cache",
                       tasks=tasks, batch_size=128, workers=0, device="cpu", precision="fp32",
                       n_bootstrap=200)
    records = Evaluator(model, config).run(specs.select(datasets))
    return {(r.dataset, r.task): r for r in records}


@pytest.fixture(scope="module")
def trained(shared):
    model = load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")
    return run(model, shared, "trained", ["synthetic-shapes", "synthetic-captions", "synthetic-composition"],
               ["zeroshot", "linear_probe", "retrieval", "caption_selection"])


@pytest.fixture(scope="module")
def random_init(shared):
    model = load_model("clipbench-tiny", "none", device="cpu", precision="fp32")
    return run(model, shared, "random", ["synthetic-shapes", "synthetic-captions", "synthetic-composition"],
               ["zeroshot", "retrieval", "caption_selection"])


def test_trained_tiny_clip_zero_shot_is_far_above_chance(trained, random_init):
    chance = 1 / 6
    trained_acc = trained[("synthetic-shapes", "zeroshot")].metrics["accuracy"]
    random_acc = random_init[("synthetic-shapes", "zeroshot")].metrics["accuracy"]
    # measured: trained 0.86 (test split, 300 images); random init ~ chance
    assert trained_acc >= 0.8
    assert random_acc <= chance + 0.1


def test_trained_tiny_clip_retrieval_is_far_above_chance(trained, random_init):
    record = trained[("synthetic-captions", "retrieval")]
    assert record.details["n_images"] >= 1000 and record.details["n_captions"] == 5 * record.details["n_images"]
    chance_r5 = 5 / record.details["n_images"]
    # measured: trained text->image R@5 0.50 over 1,000 images (chance 0.005)
    assert record.metrics["text_to_image_R@5"] >= 0.35
    assert record.metrics["image_to_text_R@5"] >= 0.35
    assert random_init[("synthetic-captions", "retrieval")].metrics["text_to_image_R@5"] <= chance_r5 + 0.03


def test_trained_tiny_clip_tells_a_replaced_attribute_apart_random_init_does_not(trained, random_init):
    trained_record = trained[("synthetic-composition", "caption_selection")]
    random_record = random_init[("synthetic-composition", "caption_selection")]
    assert trained_record.n_samples == 300 and trained_record.details["n_negatives"] == 300
    # one negative per image: chance 0.5 (binomial sd over 300 images: 0.029). measured: trained
    # 0.997, random init 0.49 to 0.52
    assert trained_record.metrics["accuracy"] >= 0.9
    assert abs(random_record.metrics["accuracy"] - 0.5) <= 0.1


def test_linear_probe_beats_zero_shot_on_the_trained_model(trained):
    # measured: probe 0.937 vs zero-shot 0.860 on synthetic-shapes
    probe = trained[("synthetic-shapes", "linear_probe")]
    assert probe.metrics["accuracy"] > trained[("synthetic-shapes", "zeroshot")].metrics["accuracy"]
    assert probe.details["feature_kind"] == "before_projection" and probe.details["C"] > 0


# --------------------------------------------------------------------------- report after the quick start

ROOT = Path(__file__).resolve().parent.parent


def default_output() -> Path:
    """The --output of a bare `clipbench run`, as its parser reads it."""
    output = _build_parser().parse_args(["run"]).output
    assert not output.is_absolute()
    return output


def test_nothing_packaged_lives_under_the_default_output():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packaged = [Path(d) for d in setuptools["package-dir"].values()]
    assert "clipbench.reference" in setuptools["package-dir"]  # the paper's tables still ship
    assert [d for d in packaged if d.is_relative_to(default_output())] == []


def test_report_after_the_quick_start_shows_exactly_that_run(trained, shared, tmp_path, monkeypatch, capsys):
    """The quick start runs `clipbench run` in a checkout, then `clipbench report <default output>`:
    the report must hold that run's records and nothing checked in beside them."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    checkout = tmp_path / "checkout"
    for name in filter(None, listed.stdout.split("\0")):
        if Path(name).is_relative_to(default_output()):  # what a fresh clone already has there
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    shutil.copytree(shared / "trained", checkout / default_output(), dirs_exist_ok=True)
    monkeypatch.chdir(checkout)

    assert main(["report", str(default_output()), "--format", "csv"]) == 0
    tidy = pd.read_csv(io.StringIO(capsys.readouterr().out))
    ours = tidy[tidy["row"] == "ours"]
    scores = ours[ours["task"].isin(["zeroshot", "linear_probe", "caption_selection"])
                  & ~ours["column"].str.startswith("mean")]
    shown = {(dataset, task): value for dataset, task, value in zip(scores["column"], scores["task"], scores["value"])}
    for (dataset, metric), value in ((c.rsplit(" ", 1), v) for c, v in zip(
            ours.loc[ours["task"] == "retrieval", "column"], ours.loc[ours["task"] == "retrieval", "value"])):
        shown[(dataset, "retrieval", metric)] = value
    expected = {}
    for (dataset, task), record in trained.items():
        if task == "retrieval":
            expected.update({(dataset, task, m): v for m, v in record.metrics.items() if "_R@" in m})
        else:
            expected[(dataset, task)] = record.primary_value
    assert set(shown) == set(expected)
    assert shown == pytest.approx(expected, abs=1e-9)
    assert set(tidy["task"]) == {task for _, task in trained}


def test_load_records_reads_back_exactly_what_the_run_wrote(trained, shared):
    frame = load_records([shared / "trained"])
    assert sorted(zip(frame["dataset"], frame["task"])) == sorted(trained)
    for _, row in frame.iterrows():
        record = trained[(row["dataset"], row["task"])]
        assert (row["model"], row["pretrained"]) == (record.model, record.pretrained)
        assert row["metrics"] == record.metrics and row["value"] == record.primary_value
        assert Path(row["source"]) == record_path(shared / "trained", record.model, record.pretrained,
                                                  record.dataset, record.task)
