"""Storage-format registry: a new format is one class plus one registration; per-format validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipbench.data import (
    NoOptions,
    Samples,
    SourceFormat,
    data_status,
    get_format,
    known_types,
    load_split,
    register_format,
    source_prompts,
    unregister_format,
)
from clipbench.errors import ClipbenchError
from clipbench.specs import parse_spec

from conftest import write_wds

BUILT_IN = ["huggingface", "imagefolder", "synthetic", "table", "torchvision", "video", "webdataset"]


def raw_spec(source: dict, **extra) -> dict:
    return {
        "name": "fx", "tasks": ["zeroshot"], "primary_metric": "accuracy", "num_classes": 3,
        "classnames": ["red", "green", "blue"], "templates": ["a {c} image."],
        "source": source, "splits": {"test": "test"}, **extra,
    }


def spec_errors(source: dict, **extra) -> str:
    with pytest.raises(ClipbenchError) as info:
        parse_spec(raw_spec(source, **extra), Path("fx.yaml"))
    return str(info.value)


# ----------------------------------------------------------------- a format added by a test


@dataclass(frozen=True)
class NpzOptions:
    images_key: str = "images"
    labels_key: str = "labels"


class _ArrayLoader:
    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")


class NpzFormat(SourceFormat):
    """``<root>/<split>.npz`` holding an (N, H, W, 3) uint8 image array and (N,) labels."""

    type = "npz"
    options_class = NpzOptions

    def load(self, spec, role, data_root, cache_dir, allow_download) -> Samples:
        root = self.require_local(spec, role, data_root)
        options: NpzOptions = spec.source.options
        with np.load(root / f"{spec.split(role)}.npz") as arrays:
            images, labels = arrays[options.images_key], arrays[options.labels_key]
        return Samples(_ArrayLoader(images), len(images), targets=labels.astype(np.int64),
                       ids=[str(i) for i in range(len(images))])


@pytest.fixture
def npz_format():
    register_format(NpzFormat)
    yield NpzFormat
    unregister_format("npz")


def write_npz(root: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(n) % 3
    root.mkdir(parents=True)
    np.savez(root / "test.npz", pixels=images, y=labels)
    return images, labels


def test_a_registered_format_validates_and_loads_through_load_split(npz_format, tmp_path):
    images, labels = write_npz(tmp_path / "data" / "fx", 7)
    spec = parse_spec(raw_spec({"type": "npz", "path": "fx", "images_key": "pixels", "labels_key": "y"}),
                      Path("fx.yaml"))
    assert spec.source.options == NpzOptions(images_key="pixels", labels_key="y")
    assert data_status(spec, tmp_path / "data").present
    samples = load_split(spec, "test", tmp_path / "data", tmp_path / "cache")
    assert len(samples) == 7 and samples.targets.tolist() == labels.tolist()
    for i in range(7):
        assert np.array_equal(np.asarray(samples[i][0]), images[i])


def test_a_registered_format_gets_the_shared_steps(npz_format, tmp_path):
    images, labels = write_npz(tmp_path / "data" / "fx", 9)
    spec = parse_spec(raw_spec({"type": "npz", "path": "fx", "images_key": "pixels", "labels_key": "y"},
                               subsample={"test": 4, "seed": 1}), Path("fx.yaml"))
    samples = load_split(spec, "test", tmp_path / "data", tmp_path)
    assert len(samples) == 4
    for i in range(4):  # every kept image keeps its own label
        image, target = samples[i]
        row = int(samples.ids[i])
        assert np.array_equal(np.asarray(image), images[row]) and target == labels[row]
    # missing data: the base class's message, with where it looked
    with pytest.raises(ClipbenchError) as info:
        load_split(spec, "test", tmp_path / "elsewhere", tmp_path)
    assert "has no download source" in str(info.value) and str(tmp_path / "elsewhere" / "fx") in str(info.value)


def test_registered_format_fields_are_checked(npz_format):
    message = spec_errors({"type": "npz", "path": "fx", "image_key": "pixels", "labels_key": 5})
    assert "field 'source.image_key': expected a field of source type 'npz' (did you mean 'images_key'?)" in message
    assert "field 'source.labels_key': expected a string, got 5" in message


def test_registration_rejects_duplicates_and_common_field_clashes(npz_format):
    with pytest.raises(ValueError, match="already registered"):
        register_format(NpzFormat)

    @dataclass(frozen=True)
    class Clash:
        path: str = ""

    class ClashFormat(SourceFormat):
        type = "clash"
        options_class = Clash

    with pytest.raises(ValueError, match="common source fields"):
        register_format(ClashFormat)
    assert "clash" not in known_types()


# ----------------------------------------------------------------- the built-in formats


def test_built_in_formats_are_registered():
    assert set(BUILT_IN) <= set(known_types())
    assert all(get_format(t).type == t for t in BUILT_IN)
    assert get_format("video").options_class is NoOptions


def test_unknown_source_type_lists_the_known_types():
    with pytest.raises(ClipbenchError) as info:
        get_format("webdatset")
    message = str(info.value)
    assert "Did you mean 'webdataset'?" in message and all(t in message for t in BUILT_IN)
    message = spec_errors({"type": "tabel", "path": "x"})
    assert "field 'source.type'" in message and "did you mean 'table'?" in message and "'tabel'" in message
    assert all(t in message for t in BUILT_IN)


def test_a_field_of_another_format_is_an_error():
    message = spec_errors({"type": "table", "path": "x", "class_folders": ["a", "b", "c"]})
    assert "field 'source.class_folders': expected a field of source type 'table'" in message
    assert "'caption_column'" in message  # the format's own fields are listed


def test_wrong_option_types_are_reported_per_field():
    message = spec_errors({"type": "torchvision", "path": "MNIST", "kwargs": [1, 2]})
    assert "field 'source.kwargs': expected a mapping of torchvision constructor arguments, got [1, 2]" in message
    message = spec_errors({"type": "huggingface", "path": "a/b", "image_column": 3, "config": True})
    assert "field 'source.image_column': expected a string, got 3" in message
    assert "field 'source.config': expected a string, got True" in message
    message = spec_errors({"type": "imagefolder", "path": "x", "class_folders": "no-such-file.txt"})
    assert "field 'source.class_folders'" in message and "no-such-file.txt" in message


def test_options_hold_only_the_formats_fields_with_their_defaults():
    spec = parse_spec(raw_spec({"type": "table", "path": "x", "label_column": "y"}), Path("fx.yaml"))
    assert (spec.source.options.image_column, spec.source.options.label_column) == ("image", "y")
    assert not hasattr(spec.source.options, "kwargs")
    spec = parse_spec(raw_spec({"type": "imagefolder", "path": "x", "class_folders": ["b", "a", "c"]}),
                      Path("fx.yaml"))
    assert spec.source.options.class_folders == ("b", "a", "c")


def test_webdataset_provides_prompts_so_a_spec_may_omit_them(tmp_path):
    bare = raw_spec({"type": "webdataset", "path": "clip-benchmark/wds_fx"})
    del bare["classnames"], bare["templates"]
    spec = parse_spec(bare, Path("fx.yaml"))
    write_wds(tmp_path / "fx", 2)
    assert source_prompts(spec, tmp_path) == (
        ["red", "green", "blue"], ["a photo of a {c}."], "zeroshot_classification_templates.txt of the webdataset")
    assert source_prompts(spec, tmp_path / "absent") == (None, None, None)

    folder = {**bare, "source": {"type": "imagefolder", "path": str(tmp_path)}}
    with pytest.raises(ClipbenchError, match="field 'classnames'"):
        parse_spec(folder, Path("fx.yaml"))
    with_names = parse_spec({**folder, "classnames": ["r", "g", "b"], "templates": ["{c}"]}, Path("fx.yaml"))
    assert source_prompts(with_names, tmp_path) == (None, None, None)
