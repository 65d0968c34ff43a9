"""Shared fixtures: tiny datasets written in every on-disk format clipbench reads."""

from __future__ import annotations

import copy
import io
import os
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

# Tests never touch the network and never write outside their tmp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def make_image(label: int, index: int, size: int = 32) -> Image.Image:
    """A small RGB image whose dominant colour encodes the label, with per-index noise."""
    rng = np.random.default_rng(1000 * label + index)
    base = np.array(COLORS[label % len(COLORS)], dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_imagefolder(root: Path) -> Path:
    """``root/{train,test}/{a_red,b_green,c_blue}/*.png``, 5 train and 3 test images per class.

    Folder names sort in label order (red=0, green=1, blue=2)."""
    for split, n in (("train", 5), ("test", 3)):
        for label, name in enumerate(("a_red", "b_green", "c_blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                make_image(label, i + (100 if split == "test" else 0)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    """:func:`write_imagefolder` in the test's tmp dir."""
    return write_imagefolder(tmp_path / "folder")


@pytest.fixture
def one_torch_thread():
    """Tiny problems: torch's thread pool only adds contention on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gaussian_mixture(n: int, dim: int, classes: int, separation: float, seed: int,
                     dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Features of unit-variance clusters around random class means (scaled by ``separation``),
    and their integer labels."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * separation
    y = rng.integers(0, classes, n)
    return (means[y] + rng.normal(size=(n, dim))).astype(dtype), y


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_wds(root: Path, n: int) -> Path:
    """clip_benchmark webdataset layout: ``test/{0,1}.tar`` shards of webp + cls, classnames and templates."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    for shard, indices in enumerate((range(0, n // 2), range(n // 2, n))):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for i in indices:
                buf = io.BytesIO()
                make_image(i % 3, i).save(buf, format="webp", lossless=True)
                _add_bytes(tar, f"s{i:05d}.webp", buf.getvalue())
                _add_bytes(tar, f"s{i:05d}.cls", str(i % 3).encode())
    return root


def reference_sweep(train_x, train_y, val_x, val_y, score_fn):
    """The paper's C search written directly with scikit-learn (sequential, float64).

    Grid in log10 C; warm starts as documented: the decade points from zero, later points from the
    best model so far. Returns the chosen log10 C, every point's validation score and fitted model."""
    train_x, val_x = train_x.astype(np.float64), val_x.astype(np.float64)
    fitted, scores = {}, {}

    def evaluate(x: float, start: LogisticRegression | None) -> None:
        if start is None:
            model = LogisticRegression(C=10.0 ** x, max_iter=1000)
        else:
            model = copy.deepcopy(start).set_params(C=10.0 ** x, warm_start=True)
        fitted[x] = model.fit(train_x, train_y)
        scores[x] = score_fn(model, val_x, val_y)

    def best() -> float:
        top = max(scores.values())
        return min(x for x, s in scores.items() if s == top)

    for x in range(-6, 7, 2):
        evaluate(float(x), None)
    for step in (1.0, 0.5, 0.25, 0.125):
        center = best()
        start = fitted[center]
        for x in (center - step, center + step):
            if -6 <= x <= 6 and x not in scores:
                evaluate(x, start)
    return best(), scores, fitted


def reference_protocol(train_x, train_y, val_x, val_y, score_fn):
    """:func:`reference_sweep`, then the final train+val fit warm-started from the chosen C's model.
    Returns (C, scores by log10 C, final model)."""
    chosen, scores, fitted = reference_sweep(train_x, train_y, val_x, val_y, score_fn)
    final = copy.deepcopy(fitted[chosen]).set_params(warm_start=True)
    final.fit(np.concatenate([train_x, val_x]).astype(np.float64), np.concatenate([train_y, val_y]))
    return 10.0 ** chosen, scores, final


def reference_ap_11point(scores, targets):
    """VOC2007 11-point AP written out literally, with exact fractions for recall and precision."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    num_positives = sum(int(targets[i]) for i in order)
    tp = fp = 0
    points = []  # (recall, precision) at each rank
    for i in order:
        tp += int(targets[i])
        fp += 1 - int(targets[i])
        points.append((Fraction(tp, num_positives), Fraction(tp, tp + fp)))
    total = Fraction(0)
    for i in range(11):
        eligible = [precision for recall, precision in points if recall >= Fraction(i, 10)]
        total += max(eligible) if eligible else 0
    return float(total / 11)


COLOURS_SPEC = """
name: colours
title: Colours
tasks: [zeroshot, linear_probe]
primary_metric: accuracy
num_classes: 3
source:
  type: imagefolder
  path: {root}
  class_folders: [a_red, b_green, c_blue]
splits:
  train: train
  test: test
classnames: [red, green, blue]
templates: ["a photo of a {{c}}.", "a {{c}} picture."]
"""


def child_pids(parent: int) -> set[int]:
    """Pids of the live processes whose parent is ``parent`` (Linux: read from /proc)."""
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # field 4 is the parent pid; the command name (field 2) may contain spaces
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent:
                children.add(int(entry))
    return children


@pytest.fixture(scope="module")
def model():
    """ViT-S-32-alt with seeded random weights, fp32 on CPU (small and fast)."""
    from clipbench.models import load_model

    torch.manual_seed(0)
    return load_model("ViT-S-32-alt", "none", device="cpu", precision="fp32")


@pytest.fixture
def spec_file(imagefolder_root, tmp_path) -> Path:
    """The colours spec (3 classes, 2 templates) over the ``imagefolder_root`` images."""
    path = tmp_path / "colours.yaml"
    path.write_text(COLOURS_SPEC.format(root=imagefolder_root))
    return path


def watch_model_loads(monkeypatch) -> tuple[list[int], list]:
    """Wrap ``clipbench.models.load_model``: returns (how many earlier-loaded models are still
    alive at each load, weak references to every model loaded)."""
    import weakref

    from clipbench import models

    loaded: list[weakref.ref] = []
    alive_at_load: list[int] = []
    real_load = models.load_model

    def load_and_watch(*args, **kwargs):
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(models, "load_model", load_and_watch)
    return alive_at_load, loaded
