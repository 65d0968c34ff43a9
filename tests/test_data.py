"""Adapters: local fixtures in every supported format, read through the real loading path."""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipbench.data import data_status, load_split
from clipbench.errors import ClipbenchError
from clipbench.specs import parse_spec

from conftest import make_image, write_wds

FOLDERS = ["a_red", "b_green", "c_blue"]  # the imagefolder fixture's class folders, in label order

def spec_for(source: dict, splits: dict, *, name="fx", tasks=("zeroshot",), retrieval=False, **extra):
    raw = {
        "name": name,
        "title": name,
        "tasks": ["retrieval"] if retrieval else list(tasks),
        "primary_metric": "text_to_image_R@1" if retrieval else "accuracy",
        "source": source,
        "splits": splits,
        **({} if retrieval else {"num_classes": 3, "classnames": ["red", "green", "blue"],
                                 "templates": ["a {c} image."]}),
    }
    raw.update(extra)
    return parse_spec(raw, Path(f"{name}.yaml"))


def dominant_label(image: Image.Image) -> int:
    return int(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0).argmax())


def check_classification(samples, n_expected: int):
    assert len(samples) == n_expected
    assert samples.targets.dtype == np.int64
    for i in range(len(samples)):
        image, target = samples[i]
        assert image.mode == "RGB"
        assert dominant_label(image) == target  # each image's colour encodes its label


def test_imagefolder(imagefolder_root, tmp_path):
    spec = spec_for({"type": "imagefolder", "path": str(imagefolder_root),
                     "class_folders": list(FOLDERS)}, {"train": "train", "test": "test"})
    check_classification(load_split(spec, "test", tmp_path, tmp_path), 9)
    check_classification(load_split(spec, "train", tmp_path, tmp_path), 15)


def test_imagefolder_class_order_from_class_folders(imagefolder_root, tmp_path):
    spec = spec_for({"type": "imagefolder", "path": str(imagefolder_root),
                     "class_folders": ["c_blue", "b_green", "a_red"]}, {"test": "test"})
    samples = load_split(spec, "test", tmp_path, tmp_path)
    assert len(samples) == 9
    for i in range(len(samples)):
        image, target = samples[i]
        assert dominant_label(image) == 2 - target  # index = position in class_folders


def _folder_of(root: Path, names: list[str]) -> Path:
    """``root/test/<names[label]>/*.png`` whose dominant colour is ``label`` (3 images each)."""
    for label, name in enumerate(names):
        (root / "test" / name).mkdir(parents=True)
        for i in range(3):
            make_image(label, i).save(root / "test" / name / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("folders", [["red", "green", "blue"], ["Red", "GREEN", "blue"]])
def test_imagefolder_named_like_the_classes_maps_by_name_not_sort_order(folders, tmp_path):
    # sorted, the folders are blue, green, red: label 0 would be blue's images
    spec = spec_for({"type": "imagefolder", "path": str(_folder_of(tmp_path / "f", folders))}, {"test": "test"})
    samples = load_split(spec, "test", tmp_path, tmp_path)
    assert len(samples) == 9
    for i in range(len(samples)):
        image, target = samples[i]
        assert dominant_label(image) == target


def test_imagefolder_matches_separators_and_case_of_class_names(tmp_path):
    root = _folder_of(tmp_path / "f", ["light-red", "Light_Green", "light blue"])
    spec = spec_for({"type": "imagefolder", "path": str(root)}, {"test": "test"},
                    classnames=["light blue", "light red", "light green"])
    samples = load_split(spec, "test", tmp_path, tmp_path)
    # class 0 = "light blue" = the folder whose images are blue (colour 2), and so on
    colour_of_class = {0: 2, 1: 0, 2: 1}
    assert [colour_of_class[int(t)] for t in samples.targets] == [dominant_label(samples[i][0])
                                                                 for i in range(len(samples))]


def test_imagefolder_whose_folders_are_not_the_class_names_is_refused(imagefolder_root, tmp_path):
    spec = spec_for({"type": "imagefolder", "path": str(imagefolder_root)}, {"test": "test"})
    with pytest.raises(ClipbenchError) as info:
        load_split(spec, "test", tmp_path, tmp_path)
    message = str(info.value)
    assert all(name in message for name in ("'a_red'", "'b_green'", "'c_blue'", "'red'", "'green'", "'blue'"))
    assert "source.class_folders" in message


def test_imagefolder_missing_a_class_folder_is_refused_without_class_folders(tmp_path):
    # two of three classes: by sort order 'green' would become label 0
    spec = spec_for({"type": "imagefolder", "path": str(_folder_of(tmp_path / "f", ["green", "blue"]))},
                    {"test": "test"})
    with pytest.raises(ClipbenchError, match="source.class_folders"):
        load_split(spec, "test", tmp_path, tmp_path)


def test_subsample_is_seeded_and_ordered(imagefolder_root, tmp_path):
    spec = spec_for({"type": "imagefolder", "path": str(imagefolder_root),
                     "class_folders": list(FOLDERS)}, {"test": "train"},
                    subsample={"test": 7, "seed": 3})
    a = load_split(spec, "test", tmp_path, tmp_path)
    b = load_split(spec, "test", tmp_path, tmp_path)
    assert len(a) == 7 and list(a.ids) == list(b.ids) and list(a.ids) == sorted(a.ids)


def _write_table_images(root: Path, n: int) -> list[str]:
    (root / "images").mkdir(parents=True)
    names = []
    for i in range(n):
        name = f"images/{i:03d}.png"
        make_image(i % 3, i).save(root / name)
        names.append(name)
    return names


def test_table_jsonl_classification_and_csv(tmp_path):
    root = tmp_path / "table"
    names = _write_table_images(root, 6)
    (root / "test.jsonl").write_text("".join(json.dumps({"file": n, "y": i % 3}) + "\n" for i, n in enumerate(names)))
    (root / "test.csv").write_text("file,y\n" + "".join(f"{n},{i % 3}\n" for i, n in enumerate(names)))
    for split in ("test.jsonl", "test.csv"):
        spec = spec_for({"type": "table", "path": str(root), "image_column": "file", "label_column": "y"},
                        {"test": split})
        check_classification(load_split(spec, "test", tmp_path, tmp_path), 6)


def test_table_captions_lists_strings_and_repeated_rows(tmp_path):
    root = tmp_path / "captions"
    names = _write_table_images(root, 3)
    rows = [{"image": names[0], "captions": ["a", "b"]}, {"image": names[1], "captions": "c"},
            {"image": names[0], "captions": ["d"]}, {"image": names[2], "captions": ["e", "f", "g"]}]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test.csv").write_text(
        'image,captions\n' + f'{names[0]},"[""a"", ""b""]"\n{names[1]},c\n{names[0]},d\n{names[2]},"[""e"",""f"",""g""]"\n'
    )
    for split in ("test.jsonl", "test.csv"):
        spec = spec_for({"type": "table", "path": str(root)}, {"test": split}, retrieval=True)
        samples = load_split(spec, "test", tmp_path, tmp_path)
        assert samples.captions == [["a", "b", "d"], ["c"], ["e", "f", "g"]]
        assert samples.targets is None and samples[2][1] == 2


def _hf_dataset(n: int, offset: int = 0):
    import datasets

    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["red", "green", "blue"])})
    return datasets.Dataset.from_dict(
        {"img": [make_image(i % 3, i + offset) for i in range(n)], "label": [i % 3 for i in range(n)]},
        features=features,
    )


def test_huggingface_save_to_disk_dataset_dict_and_single(tmp_path):
    import datasets

    data_root = tmp_path / "data"
    datasets.DatasetDict({"train": _hf_dataset(6), "test": _hf_dataset(4, 50)}).save_to_disk(str(data_root / "hfset"))
    source = {"type": "huggingface", "path": "someorg/hfset", "image_column": "img", "label_column": "label"}
    spec = spec_for(source, {"train": "train", "test": "test"}, name="hfset")
    check_classification(load_split(spec, "test", data_root, tmp_path), 4)
    check_classification(load_split(spec, "train", data_root, tmp_path), 6)
    _hf_dataset(5).save_to_disk(str(tmp_path / "single"))
    spec = spec_for({**source, "path": str(tmp_path / "single")}, {"test": "train"}, name="single")
    check_classification(load_split(spec, "test", data_root, tmp_path), 5)


def test_huggingface_parquet_folder(tmp_path):
    folder = tmp_path / "data" / "pq" / "data"
    folder.mkdir(parents=True)
    _hf_dataset(6).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    _hf_dataset(3, 50).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    spec = spec_for({"type": "huggingface", "path": "org/pq", "image_column": "img", "label_column": "label"},
                    {"train": "train", "test": "test"}, name="pq")
    check_classification(load_split(spec, "test", tmp_path / "data", tmp_path), 3)
    check_classification(load_split(spec, "train", tmp_path / "data", tmp_path), 6)


def test_huggingface_imagefolder_directory(imagefolder_root, tmp_path):
    spec = spec_for({"type": "huggingface", "path": str(imagefolder_root), "image_column": "image",
                     "label_column": "label"}, {"test": "test"}, name="hfimg")
    samples = load_split(spec, "test", tmp_path, tmp_path)
    assert len(samples) == 9
    check_classification(samples, 9)


def test_webdataset_clip_benchmark_layout(tmp_path):
    root = write_wds(tmp_path / "data" / "wds", 8)
    spec = spec_for({"type": "webdataset", "path": "clip-benchmark/wds_fx"}, {"test": "test"}, name="wds")
    check_classification(load_split(spec, "test", tmp_path / "data", tmp_path), 8)
    from clipbench.data.webdataset import read_wds_prompts

    assert read_wds_prompts(root) == (["red", "green", "blue"], ["a photo of a {c}."])


def _write_idx(path: Path, array: np.ndarray) -> None:
    dtype_code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_raw_files(tmp_path):
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        labels = np.arange(n) % 3
        images = (labels[:, None, None] * 100 + rng.integers(0, 20, (n, 28, 28))).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    spec = spec_for({"type": "torchvision", "path": "MNIST"}, {"train": {"train": True}, "test": {"train": False}},
                    name="mnist")
    samples = load_split(spec, "test", tmp_path / "data", tmp_path, allow_download=False)
    assert len(samples) == 6 and list(samples.targets) == [0, 1, 2, 0, 1, 2]
    image, label = samples[4]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert abs(np.asarray(image, dtype=float).mean() - 100 * label - 9.5) < 3


def test_missing_hub_data_offline_fails_fast_with_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = spec_for({"type": "huggingface", "path": "uoft-cs/cifar10", "image_column": "img",
                     "label_column": "label"}, {"test": "test"}, name="cifar10")
    start = time.perf_counter()
    with pytest.raises(ClipbenchError) as info:
        load_split(spec, "test", tmp_path / "data", tmp_path)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert str(tmp_path / "data" / "cifar10") in message
    assert "offline" in message and "uoft-cs/cifar10" in message and "--data-root" in message
    assert not data_status(spec, tmp_path / "data").present


def test_missing_torchvision_data_without_download_names_the_fix(tmp_path):
    spec = spec_for({"type": "torchvision", "path": "MNIST"}, {"test": {"train": False}}, name="mnist")
    with pytest.raises(ClipbenchError) as info:
        load_split(spec, "test", tmp_path / "data", tmp_path, allow_download=False)
    assert "--no-download" in str(info.value) and "torchvision.datasets.MNIST" in str(info.value)


def test_manual_dataset_says_how_to_get_it(tmp_path):
    spec = spec_for({"type": "imagefolder", "path": "imagenet", "download": False,
                     "manual": "Download ILSVRC2012 from image-net.org."}, {"test": "val"}, name="imnet")
    with pytest.raises(ClipbenchError) as info:
        load_split(spec, "test", tmp_path / "data", tmp_path)
    assert "image-net.org" in str(info.value) and str(tmp_path / "data" / "imnet") in str(info.value)


def test_table_multilabel_lists(tmp_path):
    root = tmp_path / "voc"
    names = _write_table_images(root, 3)
    rows = [{"image": names[0], "labels": [0, 2]}, {"image": names[1], "labels": [1]}, {"image": names[2], "labels": []}]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_for({"type": "table", "path": str(root), "label_column": "labels"}, {"test": "test.jsonl"},
                    multilabel=True, primary_metric="map_11point")
    samples = load_split(spec, "test", tmp_path, tmp_path)
    assert samples.targets.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_retrieval_captions_from_webdataset_and_huggingface(tmp_path):
    import tarfile

    import datasets

    from conftest import _add_bytes

    captions = [["a red one", "red"], ["green thing"], ["blue", "a blue image", "bluish"]]
    root = tmp_path / "data" / "wdscap"
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, caps in enumerate(captions):
            buf = io.BytesIO()
            make_image(i, i).save(buf, format="png")
            _add_bytes(tar, f"s{i:05d}.png", buf.getvalue())
            _add_bytes(tar, f"s{i:05d}.txt", "\n".join(caps).encode())  # clip_benchmark: one caption per line
    spec = spec_for({"type": "webdataset", "path": "clip-benchmark/wds_cap"}, {"test": "test"}, name="wdscap",
                    retrieval=True)
    samples = load_split(spec, "test", tmp_path / "data", tmp_path)
    assert samples.captions == captions
    assert [dominant_label(samples[i][0]) for i in range(3)] == [0, 1, 2]

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    datasets.Dataset.from_dict({"image": [make_image(i, i) for i in range(3)], "caption": captions},
                               features=features).save_to_disk(str(tmp_path / "data" / "hfcap"))
    spec = spec_for({"type": "huggingface", "path": "org/hfcap", "image_column": "image", "caption_column": "caption"},
                    {"test": "train"}, name="hfcap", retrieval=True)
    samples = load_split(spec, "test", tmp_path / "data", tmp_path)
    assert samples.captions == captions and samples.targets is None
    assert [dominant_label(samples[i][0]) for i in range(3)] == [0, 1, 2]
