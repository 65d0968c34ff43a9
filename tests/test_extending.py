"""Executes docs/extending.md: each extension module verbatim, loaded the way the guide says
(`$CLIPBENCH_PLUGINS`), and checked against an independent computation."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def modules_in_guide() -> dict[str, str]:
    """``# name.py``-headed python blocks of the guide, by module name."""
    blocks = re.findall(r"```python\n# (\w+)\.py\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return {name: body for name, body in blocks}


def yaml_files_in_guide() -> dict[str, str]:
    """``# name.yaml``-headed yaml blocks of the guide, by file name."""
    return dict(re.findall(r"```yaml\n# ([\w.]+\.yaml)\n(.*?)```", GUIDE.read_text(), flags=re.S))


def commands_in_guide() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """The guide's modules written to a directory on sys.path; registries restored afterwards."""
    from clipbench import data, metrics, models, tasks

    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, body in modules_in_guide().items():
        (folder / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(folder))
    saved = [(registry, dict(registry)) for registry in (tasks._REGISTRY, metrics._REGISTRY, data.formats._FORMATS,
                                                     models._BACKENDS)]
    yield folder
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)
    for name in modules_in_guide():
        sys.modules.pop(name, None)


def run_guide_command(argv: list[str], tmp_path: Path, monkeypatch) -> int:
    """A `VAR=value clipbench ...` line of the guide, in this process, writing under tmp_path."""
    from clipbench.cli import main

    while "=" in argv[0]:
        var, value = argv.pop(0).split("=", 1)
        monkeypatch.setenv(var, value)
    assert argv[0] == "clipbench"
    return main([*argv[1:], "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                 "--workers", "0", "--device", "cpu", "--precision", "fp32", "--bootstrap", "0"])


def test_guide_task_runs_through_the_cli_and_equals_a_direct_computation(plugin_dir, tmp_path, monkeypatch):
    (command,) = [c for c in commands_in_guide() if "nearest_mean" in " ".join(c)]
    assert run_guide_command(command, tmp_path, monkeypatch) == 0
    folder = tmp_path / "out" / "clipbench-tiny__synthetic" / "synthetic-shapes"
    record = json.loads((folder / "nearest_mean.json").read_text())
    assert (folder / "zeroshot.json").is_file()

    # independent: the cached features of the same run, class means and argmax in numpy
    from clipbench import specs
    from clipbench.config import RunConfig
    from clipbench.models import load_model
    from clipbench.pipeline import Evaluator

    model = load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")
    evaluator = Evaluator(model, RunConfig(cache_dir=tmp_path / "cache", workers=0, device="cpu"))
    spec = specs.load_spec("synthetic-shapes")
    (train, _), (test, _) = evaluator.split_features(spec, "train"), evaluator.split_features(spec, "test")
    assert train.from_cache and test.from_cache
    means = np.stack([train.projected[train.targets == c].mean(0) for c in range(spec.num_classes)])
    cosine = (test.projected @ means.T) / np.linalg.norm(means, axis=1)
    predicted = np.argmax(cosine, axis=1)
    assert record["metrics"]["accuracy"] == pytest.approx(np.mean(predicted == test.targets), abs=1e-12)
    assert record["n_samples"] == len(test.targets)
    # far above chance (1/6) for the trained tiny CLIP
    assert record["metrics"]["accuracy"] > 0.5


def test_guide_metric_is_computed_bootstrapped_and_accepted_by_specs(plugin_dir, monkeypatch, tmp_path):
    from clipbench import metrics, specs
    from clipbench.plugins import load_plugins

    monkeypatch.setenv("CLIPBENCH_PLUGINS", "top3")
    assert load_plugins() == ["top3"]
    rng = np.random.default_rng(0)
    scores, targets = rng.normal(size=(200, 7)), rng.integers(0, 7, 200)
    # independent: the target's position in a descending argsort (no ties in Gaussian scores)
    ranks = np.argsort(-scores, axis=1)
    expected = np.mean([t in row[:3] for t, row in zip(targets, ranks)])
    assert metrics.compute_metric("top3_accuracy", scores, targets) == pytest.approx(expected, abs=1e-12)
    low, high = metrics.bootstrap_ci(scores, targets, "top3_accuracy", n_resamples=50, seed=0)
    assert low <= expected <= high and high - low < 0.2
    spec = specs.parse_spec({"name": "mine", "title": "Mine", "tasks": ["zeroshot"], "primary_metric": "top3_accuracy",
                             "num_classes": 7, "source": {"type": "imagefolder", "path": "mine"},
                             "splits": {"test": "test"}, "classnames": [str(i) for i in range(7)],
                             "templates": ["a {c}."]}, tmp_path / "mine.yaml")
    assert spec.primary_metric == "top3_accuracy"
    assert metrics.classification_metrics(scores, targets, "top3_accuracy")["top3_accuracy"] == pytest.approx(expected)


@pytest.mark.slow
def test_guide_format_loads_through_the_cli_like_the_same_images_in_an_image_folder(plugin_dir, tmp_path,
                                                                                    monkeypatch):
    from clipbench.synthetic import generate

    # the guide's layout: <data-root>/my_arrays/{train,test}.npz, labels under "y"
    names = ["circle", "square", "triangle"]
    folder_root = tmp_path / "my-data" / "as_folder"
    for split, n in (("train", 8), ("test", 6)):
        images, labels = [], []
        for label, shape in enumerate(names):
            for i in range(n):
                image = generate(f"extending/{split}", i, shape=shape).image
                images.append(np.asarray(image))
                labels.append(label)
                (folder_root / split / shape).mkdir(parents=True, exist_ok=True)
                image.save(folder_root / split / shape / f"{i:03d}.png")
        (tmp_path / "my-data" / "my_arrays").mkdir(parents=True, exist_ok=True)
        np.savez(tmp_path / "my-data" / "my_arrays" / f"{split}.npz", images=np.stack(images), y=np.array(labels))
    for name, text in yaml_files_in_guide().items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    (command,) = [c for c in commands_in_guide() if "npz_format" in " ".join(c)]
    assert run_guide_command(command, tmp_path, monkeypatch) == 0
    out = tmp_path / "out" / "clipbench-tiny__synthetic" / "my_arrays"
    zeroshot = json.loads((out / "zeroshot.json").read_text())
    probe = json.loads((out / "linear_probe.json").read_text())
    assert zeroshot["n_samples"] == 18 and probe["n_samples"] == 18

    # the same pixels through the built-in imagefolder format give the same numbers
    spec_text = (tmp_path / "my_arrays.yaml").read_text().replace("name: my_arrays", "name: as_folder")
    spec_text = spec_text.replace("  type: npz\n  path: my_arrays\n  labels_key: y\n",
                                  "  type: imagefolder\n  path: as_folder\n")
    (tmp_path / "as_folder.yaml").write_text(spec_text)
    assert run_guide_command(["clipbench", "run", "--datasets", "as_folder.yaml", "--tasks", "zeroshot,linear_probe",
                              "--data-root", "my-data"],
                             tmp_path, monkeypatch) == 0
    folder = tmp_path / "out" / "clipbench-tiny__synthetic" / "as_folder"
    assert json.loads((folder / "zeroshot.json").read_text())["metrics"] == zeroshot["metrics"]
    assert json.loads((folder / "linear_probe.json").read_text())["metrics"] == probe["metrics"]
    assert zeroshot["metrics"]["accuracy"] > 0.6  # the embedded model knows these shapes


@pytest.mark.slow
def test_guide_backend_probes_its_own_features_and_skips_the_text_tasks(plugin_dir, tmp_path, monkeypatch, caplog):
    from PIL import Image

    from clipbench import specs
    from clipbench.config import RunConfig
    from clipbench.data import load_split
    from clipbench.tasks.linear_probe import linear_probe

    (command,) = [c for c in commands_in_guide() if "pixels_backend" in " ".join(c)]
    assert run_guide_command(command, tmp_path, monkeypatch) == 0
    folder = tmp_path / "out" / "pixels-8__none" / "synthetic-shapes"
    assert not (folder / "zeroshot.json").exists()
    assert any("zeroshot: skipped" in r.getMessage() and "image-only" in r.getMessage() for r in caplog.records)
    record = json.loads((folder / "linear_probe.json").read_text())
    assert record["config"]["precision"] == "fp32" and record["details"]["feature_kind"] == "embedding"

    # independent features: PIL's bicubic resize to 8x8, pixels / 255, in the spec's splits
    spec = specs.load_spec("synthetic-shapes")
    data_root = tmp_path / "cache" / "data"

    def pixels(role):
        samples = load_split(spec, role, data_root, tmp_path / "cache")
        rows = [np.asarray(samples.load_image(i).resize((8, 8), Image.BICUBIC), dtype=np.float32)
                .transpose(2, 0, 1).ravel() / 255.0 for i in range(len(samples))]
        return np.stack(rows), samples.targets

    (tx, ty), (vx, vy), (sx, sy) = pixels("train"), pixels("val"), pixels("test")
    direct = linear_probe(tx, ty, vx, vy, sx, sy, "accuracy", num_classes=spec.num_classes,
                          n_jobs=RunConfig.default("probe_jobs"))
    assert record["metrics"] == direct.metrics and record["details"]["C"] == direct.C
    assert record["config"]["model"] == {"backend": "pixels", "size": 8, "precision": "fp32"}
