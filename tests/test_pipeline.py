"""The whole path spec -> adapter -> features (cached) -> task -> record, against direct open_clip."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipbench import specs
from clipbench.features import EncodedImages, FeatureCache, image_cache_key
from clipbench.pipeline import Evaluator, RunConfig


def config_for(tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(data_root=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                     batch_size=4, workers=0, device="cpu", precision="fp32", n_bootstrap=200, **kw)


def direct_zeroshot_accuracy(model, root: Path) -> tuple[int, int]:
    """Independent computation: open_clip's own encoders, numpy prompt ensembling, argmax."""
    from PIL import Image

    files = sorted(p for p in (root / "test").rglob("*.png"))
    labels = np.array([["a_red", "b_green", "c_blue"].index(p.parent.name) for p in files])
    net = model.model
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in files])
        img = net.encode_image(pixels).numpy()
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        weights = []
        for name in ("red", "green", "blue"):
            tokens = model.tokenizer([f"a photo of a {name}.", f"a {name} picture."])
            t = net.encode_text(tokens).numpy()
            t /= np.linalg.norm(t, axis=1, keepdims=True)
            w = t.mean(0)
            weights.append(w / np.linalg.norm(w))
    predictions = (img @ np.stack(weights).T).argmax(1)
    return int((predictions == labels).sum()), len(labels)


def test_zeroshot_record_equals_direct_open_clip_computation(model, spec_file, imagefolder_root, tmp_path):
    spec = specs.load_spec(str(spec_file))
    records = Evaluator(model, config_for(tmp_path, tasks=["zeroshot"])).run([spec])
    (record,) = records
    correct, total = direct_zeroshot_accuracy(model, imagefolder_root)
    assert record.n_samples == total
    assert round(record.metrics["accuracy"] * total) == correct
    assert record.metrics["accuracy"] == pytest.approx(correct / total, abs=1e-12)
    lo, hi = record.confidence_intervals["accuracy"]
    assert lo <= record.metrics["accuracy"] <= hi
    stored = json.loads((tmp_path / "out" / "ViT-S-32-alt__none" / "colours" / "zeroshot.json").read_text())
    assert stored["metrics"] == record.metrics and stored["primary_metric"] == "accuracy"
    assert (tmp_path / "out" / "ViT-S-32-alt__none" / "colours" / "zeroshot.per_class.json").is_file()


def test_second_run_uses_the_cache_and_recomputes_nothing(model, spec_file, tmp_path, monkeypatch):
    spec = specs.load_spec(str(spec_file))
    first = Evaluator(model, config_for(tmp_path, tasks=["zeroshot", "linear_probe"])).run([spec])

    def no_model_calls(*args, **kwargs):
        raise AssertionError("the model was called although every feature is cached")

    monkeypatch.setattr(model, "encode_images", no_model_calls)
    monkeypatch.setattr(model, "encode_texts", no_model_calls)
    again = Evaluator(model, config_for(tmp_path, tasks=["zeroshot", "linear_probe"], force=True)).run([spec])
    assert [r.metrics for r in again] == [r.metrics for r in first]
    # without --force the records themselves are reused
    reused = Evaluator(model, config_for(tmp_path, tasks=["zeroshot"])).run([spec])
    assert reused[0].created == again[0].created


def test_feature_seconds_count_only_the_splits_a_record_encoded(model, spec_file, tmp_path):
    def slow_test_split(model, samples, *, spec, role, **kwargs):
        # features without the model: only the test split takes time (1 s), the others none
        if role == "test":
            time.sleep(1.0)
        rng = np.random.default_rng(len(samples))
        projected = rng.normal(size=(len(samples), width)).astype(np.float32)
        return EncodedImages(projected / np.linalg.norm(projected, axis=1, keepdims=True), projected[:, :8].copy())

    with torch.inference_mode():
        width = model.encode_texts(["a"]).shape[1]

    spec = specs.load_spec(str(spec_file))
    evaluator = Evaluator(model, config_for(tmp_path, tasks=["zeroshot", "linear_probe"]), encoder=slow_test_split)
    zeroshot, probe = evaluator.run([spec])
    assert zeroshot.seconds["features"] >= 1.0  # it encoded the test split
    assert probe.seconds["features"] < 1.0  # train only: the test split was the zero-shot record's


def test_cache_key_changes_with_every_part_that_changes_features(model, spec_file, imagefolder_root, tmp_path):
    from clipbench.data import load_split

    spec = specs.load_spec(str(spec_file))
    samples = load_split(spec, "test", tmp_path, tmp_path)
    base = FeatureCache.digest(image_cache_key(model, spec, "test", samples))
    assert FeatureCache.digest(image_cache_key(model, spec, "test", samples)) == base

    class Variant:
        def __init__(self, **changes):
            self.__dict__.update({k: getattr(model, k) for k in
                                  ("name", "pretrained", "weights_digest", "precision", "preprocess")})
            self.__dict__.update(changes)

        def identity(self):
            from clipbench.models.base import identity

            return identity(self.name, self.pretrained, self.weights_digest, self.precision)

    variants = [Variant(weights_digest="other"), Variant(precision="bf16"), Variant(name="ViT-B-32"),
                Variant(pretrained="laion"), Variant(preprocess="Resize(64)")]
    keys = {FeatureCache.digest(image_cache_key(v, spec, "test", samples)) for v in variants}
    keys.add(FeatureCache.digest(image_cache_key(model, spec, "train", load_split(spec, "train", tmp_path, tmp_path))))
    moved = spec_file.read_text().replace("test: test", "test: train")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "colours.yaml").write_text(moved)
    spec2 = specs.load_spec(str(tmp_path / "b" / "colours.yaml"))
    keys.add(FeatureCache.digest(image_cache_key(model, spec2, "test", load_split(spec2, "test", tmp_path, tmp_path))))
    (imagefolder_root / "test" / "a_red" / "000.png").unlink()
    keys.add(FeatureCache.digest(image_cache_key(model, spec, "test", load_split(spec, "test", tmp_path, tmp_path))))
    assert base not in keys and len(keys) == len(variants) + 3


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "clipbench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_offline_pretrained_weights_fail_fast_with_the_fix(tmp_path):
    # the same interpreter importing what the run imports (torch, torchvision, open_clip) is the
    # floor; the downloaders' retries would add ~45 s on top of it
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import clipbench.models, clipbench.pipeline"], check=True)
    imports = time.perf_counter() - start
    start = time.perf_counter()
    proc = run_cli("run", "--model", "ViT-B/32", "--datasets", "cifar10", "--cache-dir", str(tmp_path))
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0 and elapsed < imports + 10
    assert "Traceback" not in proc.stderr
    assert "--pretrained" in proc.stderr


@pytest.mark.slow
def test_cli_unknown_dataset_and_model_list_close_matches(spec_file, tmp_path):
    proc = run_cli("run", "--model", "ViT-S-32-alt", "--pretrained", "none", "--datasets", "colour",
                   "--cache-dir", str(tmp_path))
    assert proc.returncode != 0 and "Unknown dataset 'colour'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("run", "--model", "ViT-S-32-alts", "--datasets", str(spec_file), "--cache-dir", str(tmp_path))
    assert proc.returncode != 0 and "ViT-S-32-alt" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_bad_spec_names_file_and_field(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\ntasks: [zeroshot]\nprimary_metric: accuracy\n")
    proc = run_cli("datasets", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)
    proc = run_cli("run", "--model", "ViT-S-32-alt", "--pretrained", "none", "--datasets", str(bad),
                   "--cache-dir", str(tmp_path))
    assert proc.returncode != 0 and str(bad) in proc.stderr and "field 'source'" in proc.stderr


@pytest.mark.slow
def test_cli_run_with_local_checkpoint_writes_records(model, spec_file, tmp_path):
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.model.state_dict(), checkpoint)
    out = tmp_path / "out"
    proc = run_cli("run", "--model", "ViT-S-32-alt", "--pretrained", str(checkpoint), "--datasets", str(spec_file),
                   "--tasks", "zeroshot", "--output", str(out), "--cache-dir", str(tmp_path / "c"),
                   "--workers", "0", "--device", "cpu", "--precision", "fp32", "--batch-size", "8", timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = list(out.rglob("zeroshot.json"))
    record = json.loads(path.read_text())
    assert record["model"] == "ViT-S-32-alt" and record["n_samples"] == 9
    assert "zeroshot" in proc.stdout and "colours" in proc.stdout


def test_webdataset_spec_takes_classnames_and_templates_from_the_folder(model, tmp_path):
    from conftest import write_wds

    write_wds(tmp_path / "data" / "wdsset", 6)
    spec = specs.parse_spec({"name": "wdsset", "title": "wds", "tasks": ["zeroshot"], "primary_metric": "accuracy",
                             "num_classes": 3, "source": {"type": "webdataset", "path": "org/wds_x"},
                             "splits": {"test": "test"}}, tmp_path / "wdsset.yaml")
    (record,) = Evaluator(model, config_for(tmp_path, tasks=["zeroshot"])).run([spec])
    assert record.n_samples == 6 and record.details["n_templates"] == 1
    assert record.config["templates_origin"] == "zeroshot_classification_templates.txt of the webdataset"
    sidecar = json.loads((tmp_path / "out" / "ViT-S-32-alt__none" / "wdsset" / "zeroshot.per_class.json").read_text())
    assert sidecar["classnames"] == ["red", "green", "blue"]


def _same_images_in(fmt: str, imagefolder_root: Path, dest: Path) -> dict:
    """The imagefolder fixture's test images (same PNG bytes, same labels) in another format;
    returns the spec's source and test split."""
    import tarfile

    from conftest import _add_bytes

    files = sorted((imagefolder_root / "test").rglob("*.png"))
    labels = [["a_red", "b_green", "c_blue"].index(p.parent.name) for p in files]
    dest.mkdir(parents=True)
    if fmt == "table":
        (dest / "test.jsonl").write_text("".join(
            json.dumps({"image": str(p), "label": y}) + "\n" for p, y in zip(files, labels)))
        return {"source": {"type": "table", "path": str(dest)}, "split": "test.jsonl"}
    if fmt == "huggingface":
        import datasets

        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        datasets.Dataset.from_dict({"image": [str(p) for p in files], "label": labels},
                                   features=features).save_to_disk(str(dest / "hf"))
        return {"source": {"type": "huggingface", "path": str(dest / "hf"), "image_column": "image",
                           "label_column": "label"}, "split": "train"}
    (dest / "test").mkdir()
    with tarfile.open(dest / "test" / "0.tar", "w") as tar:
        for i, (p, y) in enumerate(zip(files, labels)):
            _add_bytes(tar, f"s{i:05d}.png", p.read_bytes())
            _add_bytes(tar, f"s{i:05d}.cls", str(y).encode())
    return {"source": {"type": "webdataset", "path": str(dest)}, "split": "test"}


@pytest.mark.parametrize("fmt", ["table", "huggingface", "webdataset"])
def test_zeroshot_record_equals_direct_computation_in_every_format(model, fmt, imagefolder_root, tmp_path):
    made = _same_images_in(fmt, imagefolder_root, tmp_path / fmt)
    spec = specs.parse_spec({"name": "colours", "title": "Colours", "tasks": ["zeroshot"],
                             "primary_metric": "accuracy", "num_classes": 3, "source": made["source"],
                             "splits": {"test": made["split"]}, "classnames": ["red", "green", "blue"],
                             "templates": ["a photo of a {c}.", "a {c} picture."]}, tmp_path / "colours.yaml")
    evaluator = Evaluator(model, config_for(tmp_path, tasks=["zeroshot"]))
    (record,) = evaluator.run([spec])
    correct, total = direct_zeroshot_accuracy(model, imagefolder_root)
    assert record.n_samples == total
    assert record.metrics["accuracy"] == pytest.approx(correct / total, abs=1e-12)
    # same images, same order: the cached features equal open_clip's on the imagefolder files
    from PIL import Image

    files = sorted((imagefolder_root / "test").rglob("*.png"))
    with torch.no_grad():
        direct = model.model.encode_image(torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in files]))
    direct = torch.nn.functional.normalize(direct, dim=-1).numpy()
    features, _ = Evaluator(model, config_for(tmp_path, tasks=["zeroshot"])).split_features(spec, "test")
    assert features.from_cache and np.abs(features.projected - direct).max() < 1e-5
