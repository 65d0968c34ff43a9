"""The synthetic world: determinism, captions, and materialisation into the adapters' formats."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipbench import specs, synthetic
from clipbench.data import load_split
from clipbench.errors import ClipbenchError

REPO = Path(__file__).resolve().parents[1]


def _png_sha(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def test_same_arguments_give_identical_bytes_and_captions():
    a = synthetic.generate("test/stream", 7)
    np.random.seed(123)  # the global RNG must play no part
    np.random.random(10)
    b = synthetic.generate("test/stream", 7)
    assert _png_sha(a.image) == _png_sha(b.image)
    assert a.captions == b.captions and a.scene == b.scene


def test_generation_leaves_global_rng_alone():
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    synthetic.generate("test/stream", 0)
    assert np.array_equal(np.random.get_state()[1], before)


def test_different_index_stream_or_seed_give_different_images():
    base = np.asarray(synthetic.generate("test/stream", 0).image)
    for other in (
        synthetic.generate("test/stream", 1),
        synthetic.generate("test/other", 0),
        synthetic.generate("test/stream", 0, seed=synthetic.WORLD_SEED + 1),
    ):
        assert not np.array_equal(base, np.asarray(other.image))


def test_image_is_small_rgb():
    image = synthetic.generate("test/stream", 3).image
    assert image.mode == "RGB" and image.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)


def test_captions_name_shape_and_colour():
    for i in range(60):
        ex = synthetic.generate("test/captions", i)
        assert len(ex.captions) == synthetic.CAPTIONS_PER_IMAGE
        assert len(set(ex.captions)) == len(ex.captions)
        for caption in ex.captions:
            words = caption.replace(",", " ").replace(":", " ").split()
            assert ex.scene.shape in words, caption
            assert ex.scene.color in words, caption
            assert "a orange" not in caption  # article agrees with the next word


def test_shape_pixels_have_the_named_colour_and_background_does_not():
    for i in range(40):
        ex = synthetic.generate("test/pixels", i)
        pixels = np.asarray(ex.image, dtype=np.float64)
        cx, cy = synthetic.POSITIONS[ex.scene.position]
        centre = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)
        nominal = np.asarray(synthetic.COLORS[ex.scene.color], dtype=np.float64)
        assert np.linalg.norm(centre - nominal) < 50, (ex.scene, centre)
        # The corner opposite the shape is background: never close to the shape's colour.
        corner = pixels[:6, :6] if cy > 32 or cx > 32 else pixels[-6:, -6:]
        if ex.scene.position == "center":
            corner = pixels[:4, :4]
        assert np.linalg.norm(corner.reshape(-1, 3).mean(axis=0) - nominal) > 80, ex.scene


def test_attribute_distribution_covers_the_world():
    scenes = [synthetic.generate("test/coverage", i).scene for i in range(400)]
    assert {s.shape for s in scenes} == set(synthetic.SHAPES)
    assert {s.color for s in scenes} == set(synthetic.COLORS)
    assert {s.size for s in scenes} == set(synthetic.SIZES)
    assert {s.position for s in scenes} == set(synthetic.POSITIONS)
    assert {s.background for s in scenes} == set(synthetic.BACKGROUNDS)
    assert {s.texture for s in scenes} == set(synthetic.TEXTURES)
    assert not set(synthetic.BACKGROUNDS) & set(synthetic.COLORS)


def test_class_examples_are_balanced_and_labelled():
    rows = list(synthetic.class_examples("synthetic-colors", "val", 3))
    assert len(rows) == 3 * len(synthetic.COLORS)
    for index, classname, ex in rows:
        assert ex.scene.color == classname == tuple(synthetic.COLORS)[index % len(synthetic.COLORS)]


def test_splits_and_training_stream_are_disjoint():
    streams = {
        _png_sha(synthetic.generate(s, 0).image)
        for s in ("synthetic-shapes/train", "synthetic-shapes/val", "synthetic-shapes/test",
                  "synthetic-captions/test", synthetic.TRAIN_STREAM)
    }
    assert len(streams) == 5


def test_templates_and_classnames_files_match_the_module():
    for name in ("synthetic-shapes", "synthetic-colors"):
        spec = specs.load_spec(name)
        assert spec.classnames == synthetic.CLASSNAMES[name]
        assert spec.templates == synthetic.CLASS_TEMPLATES[name]
        assert spec.source.type == "synthetic" and "default" in spec.groups
        # Sorted, so sorted class folders and the classnames file agree on label indices.
        assert list(spec.classnames) == sorted(spec.classnames)


@pytest.fixture
def small_splits(monkeypatch):
    monkeypatch.setattr(synthetic, "CLASS_SPLIT_SIZES", {"train": 2, "val": 1, "test": 3})
    monkeypatch.setattr(synthetic, "RETRIEVAL_IMAGES", 12)


def test_materialize_imagefolder_layout_and_idempotence(tmp_path, small_splits):
    root = synthetic.materialize("synthetic-shapes", tmp_path / "synthetic-shapes")
    assert root == tmp_path / "synthetic-shapes"
    for split, n in {"train": 2, "val": 1, "test": 3}.items():
        assert sorted(p.name for p in (root / split).iterdir()) == list(synthetic.SHAPES)
        files = sorted((root / split).glob("*/*.png"))
        assert len(files) == n * len(synthetic.SHAPES)
    # The files are exactly the generator's images, in the folder of their shape.
    sample = root / "test" / "cross" / "00007.png"
    assert sample.exists()
    index, classname, ex = list(synthetic.class_examples("synthetic-shapes", "test", 3))[7]
    assert classname == "cross" and index == 7
    assert np.array_equal(np.asarray(Image.open(sample).convert("RGB")), np.asarray(ex.image))

    mtime = sample.stat().st_mtime_ns
    assert synthetic.materialize("synthetic-shapes", root) == root
    assert sample.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_materialize_table_layout(tmp_path, small_splits):
    root = synthetic.materialize("synthetic-captions", tmp_path / "synthetic-captions")
    rows = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert rows[0]["image"] == "images/00000.png"
    for row in rows:
        assert len(row["captions"]) == 5 and all(isinstance(c, str) for c in row["captions"])
        assert (root / row["image"]).is_file()


def test_materialized_data_read_by_the_standard_adapters(tmp_path, small_splits):
    shapes = load_split(specs.load_spec("synthetic-shapes"), "test", tmp_path, tmp_path / "cache")
    assert len(shapes) == 3 * len(synthetic.SHAPES)
    rows = synthetic.class_examples("synthetic-shapes", "test", 3)
    truth = {np.asarray(ex.image).tobytes(): classname for _, classname, ex in rows}
    for i in range(len(shapes)):
        image, target = shapes[i]
        assert synthetic.SHAPES[int(target)] == truth[np.asarray(image.convert("RGB")).tobytes()]
    assert np.bincount(shapes.targets).tolist() == [3] * len(synthetic.SHAPES)
    captions = load_split(specs.load_spec("synthetic-captions"), "test", tmp_path, tmp_path / "cache")
    assert len(captions) == 12 and all(len(c) == 5 for c in captions.captions)


def test_materialize_discards_partial_dirs_of_dead_processes(tmp_path, small_splits):
    dead = tmp_path / ".synthetic-colors.partial-999999999-abc"
    (dead / "train").mkdir(parents=True)
    synthetic.materialize("synthetic-colors", tmp_path / "synthetic-colors")
    assert not dead.exists()
    assert (tmp_path / "synthetic-colors" / "val" / "red").is_dir()


def test_materialize_rebuilds_other_generator_versions(tmp_path, small_splits):
    root = synthetic.materialize("synthetic-colors", tmp_path / "synthetic-colors")
    marker = root / ".clipbench-synthetic.json"
    marker.write_text(json.dumps({"generator_version": -1}))
    (root / "stale.txt").write_text("x")
    synthetic.materialize("synthetic-colors", root)
    assert not (root / "stale.txt").exists()
    assert json.loads(marker.read_text())["generator_version"] == synthetic.GENERATOR_VERSION


def test_materialize_refuses_foreign_directories_and_unknown_names(tmp_path):
    foreign = tmp_path / "synthetic-shapes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    with pytest.raises(ClipbenchError, match="not a complete clipbench synthetic data set"):
        synthetic.materialize("synthetic-shapes", foreign)
    assert (foreign / "mine.txt").exists()
    with pytest.raises(ClipbenchError, match="not a synthetic data set"):
        synthetic.materialize("cifar10", tmp_path / "cifar10")


def test_full_size_constants():
    # The offline default's budget: small splits, yet >= 1,000 retrieval images with 5 captions.
    assert synthetic.CLASS_SPLIT_SIZES == {"train": 50, "val": 20, "test": 50}
    assert synthetic.RETRIEVAL_IMAGES >= 1000 and synthetic.CAPTIONS_PER_IMAGE == 5
    assert len(synthetic.SHAPES) >= 6 and len(synthetic.COLORS) >= 6
