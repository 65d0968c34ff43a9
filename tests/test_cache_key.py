"""The feature cache key follows the stored pixels: data rewritten in place is encoded afresh."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipbench import specs
from clipbench.pipeline import Evaluator, RunConfig

from conftest import COLOURS_SPEC, _add_bytes, make_image


def config_for(tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(data_root=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                     batch_size=4, workers=0, device="cpu", precision="fp32", n_bootstrap=20,
                     tasks=["zeroshot"], **kw)


def direct_features(model, images: list[Image.Image]) -> np.ndarray:
    """open_clip's own image tower on the images, L2-normalized (independent of the cache)."""
    with torch.no_grad():
        out = model.model.encode_image(torch.stack([model.preprocess(im.convert("RGB")) for im in images]))
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def shuffled_colours(label: int, index: int) -> Image.Image:
    """Other pixels for the same file: the colour of another class, other noise."""
    return make_image((label + 2) % 3, index + 7)


def test_imagefolder_rewritten_in_place_is_encoded_afresh(model, tmp_path):
    root = tmp_path / "folder"
    folders = ("a_red", "b_green", "c_blue")
    paths = [(label, i, root / "test" / name / f"{i:03d}.png") for label, name in enumerate(folders) for i in range(3)]
    for label, i, path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(label, i).save(path)
    spec_path = tmp_path / "colours.yaml"
    spec_path.write_text(COLOURS_SPEC.format(root=root).replace("  train: train\n", "").replace(
        "[zeroshot, linear_probe]", "[zeroshot]"))
    spec = specs.load_spec(str(spec_path))

    (first,) = Evaluator(model, config_for(tmp_path)).run([spec])
    # same file names, same labels, other pixels
    for label, i, path in paths:
        shuffled_colours(label, i).save(path)
    (second,) = Evaluator(model, config_for(tmp_path, force=True)).run([spec])

    features, _ = Evaluator(model, config_for(tmp_path)).split_features(spec, "test")
    fresh = direct_features(model, [shuffled_colours(label, i) for label, i, _ in paths])
    stale = direct_features(model, [make_image(label, i) for label, i, _ in paths])
    assert features.from_cache  # the second run stored them under the new key
    assert np.abs(features.projected - fresh).max() < 1e-5
    assert np.abs(stale - fresh).max() > 1e-2  # the rewrite really changed the features
    labels = np.repeat(np.arange(3), 3)
    expected = float(((fresh @ _class_weights(model).T).argmax(1) == labels).mean())
    assert second.metrics["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert first.metrics["accuracy"] == pytest.approx(
        float(((stale @ _class_weights(model).T).argmax(1) == labels).mean()), abs=1e-12)
    assert second.metrics["accuracy"] != first.metrics["accuracy"]  # stale features would repeat it


def _class_weights(model) -> np.ndarray:
    """The colours spec's zero-shot weights (two templates, averaged, renormalized), by open_clip."""
    weights = []
    with torch.no_grad():
        for name in ("red", "green", "blue"):
            t = model.model.encode_text(model.tokenizer([f"a photo of a {name}.", f"a {name} picture."])).numpy()
            t /= np.linalg.norm(t, axis=1, keepdims=True)
            w = t.mean(0)
            weights.append(w / np.linalg.norm(w))
    return np.stack(weights)


def _write_shard(path: Path, images: list[Image.Image], labels: list[int]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, (image, y) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            image.save(buf, format="png")
            _add_bytes(tar, f"s{i:05d}.png", buf.getvalue())
            _add_bytes(tar, f"s{i:05d}.cls", str(y).encode())


def test_webdataset_shard_rewritten_with_other_pixels_is_encoded_afresh(model, tmp_path):
    root = tmp_path / "data" / "wdscolours"
    (root / "test").mkdir(parents=True)
    labels = [i % 3 for i in range(6)]
    old = [make_image(y, i) for i, y in enumerate(labels)]
    new = [shuffled_colours(y, i) for i, y in enumerate(labels)]
    _write_shard(root / "test" / "0.tar", old, labels)
    spec = specs.parse_spec({"name": "wdscolours", "title": "wds", "tasks": ["zeroshot"],
                             "primary_metric": "accuracy", "num_classes": 3,
                             "source": {"type": "webdataset", "path": str(root)}, "splits": {"test": "test"},
                             "classnames": ["red", "green", "blue"],
                             "templates": ["a photo of a {c}.", "a {c} picture."]}, tmp_path / "wdscolours.yaml")
    Evaluator(model, config_for(tmp_path)).run([spec])
    _write_shard(root / "test" / "0.tar", new, labels)  # same row count, same labels
    (second,) = Evaluator(model, config_for(tmp_path, force=True)).run([spec])
    features, _ = Evaluator(model, config_for(tmp_path)).split_features(spec, "test")
    fresh = direct_features(model, new)
    assert np.abs(features.projected - fresh).max() < 1e-5
    expected = float(((fresh @ _class_weights(model).T).argmax(1) == np.array(labels)).mean())
    assert second.metrics["accuracy"] == pytest.approx(expected, abs=1e-12)
