"""Webdataset shards read in place: the same samples, labels, captions and pixels as the Hugging Face
``webdataset`` builder gives (the reference), a clear error for every kind of bad shard, and nothing
written outside the cache dir."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipbench.data import load_split
from clipbench.data.base import to_rgb
from clipbench.data.tar_index import index_shard, scan_shard
from clipbench.data.webdataset import INDEX_DIR, load_webdataset
from clipbench.errors import ClipbenchError
from clipbench.specs import parse_spec

from conftest import _add_bytes, make_image


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def rotated_jpeg(label: int, index: int) -> bytes:
    """A non-square JPEG whose EXIF says "rotate 90°" (the HF Image feature applies it)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return encoded(make_image(label, index).resize((32, 20)), "JPEG", quality=90, exif=exif.tobytes())


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            _add_bytes(tar, name, payload)
    return path


def classification_shards(root: Path) -> list[int]:
    """Three shards of JPEGs (some with EXIF orientation, some grey or CMYK) with keys in folders,
    dotted extra fields, hidden and extension-less members, a directory entry and labels with
    whitespace; returns the labels in listing order."""
    labels = []
    for shard in range(3):
        with tarfile.open(root / "test" / f"shard-{shard:02d}.tar", "w") as tar:
            directory = tarfile.TarInfo("imgs")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            _add_bytes(tar, "__meta__.json", b"{}")
            for j in range(5):
                i = 5 * shard + j
                y = (i * 7) % 3
                labels.append(y)
                key = f"imgs/s{i:04d}"
                if i % 4 == 1:
                    image = rotated_jpeg(y, i)
                elif i % 4 == 2:
                    image = encoded(make_image(y, i).convert("CMYK"), "JPEG")
                elif i % 4 == 3:
                    image = encoded(make_image(y, i).convert("L"), "JPEG")
                else:
                    image = encoded(make_image(y, i), "JPEG", quality=75)
                _add_bytes(tar, f"{key}.jpg", image)
                _add_bytes(tar, f"{key}.cls", f" {y}\n".encode())
                _add_bytes(tar, f"{key}.seg.png", encoded(make_image(y, i).convert("L"), "PNG"))
                _add_bytes(tar, f"imgs/.hidden{i}.txt", b"skipped")
                _add_bytes(tar, "README", b"no extension: not a sample member")
    return labels


def reference(root: Path, split: str, cache: Path):
    import datasets

    shards = [str(p) for p in sorted((root / split).glob("*.tar"))]
    return datasets.load_dataset("webdataset", data_files={split: shards}, split=split, cache_dir=str(cache))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_classification_matches_the_hugging_face_builder(tmp_path):
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    labels = classification_shards(root)
    samples = load_webdataset(root, "test", num_classes=3, multilabel=False, label_column="cls",
                              caption_column=None, index_dir=tmp_path / "index")
    ref = reference(root, "test", tmp_path / "hf")
    assert len(samples) == len(ref) == 15
    assert list(samples.ids) == [str(i) for i in range(len(ref))]
    assert samples.targets.tolist() == ref["cls"] == labels
    assert samples.targets.dtype == np.int64
    rotated = 0
    for i in range(len(ref)):
        expected = to_rgb(ref[i]["jpg"])
        image = samples.load_image(i)
        assert image.mode == "RGB" and image.size == expected.size
        assert np.array_equal(pixels(image), pixels(expected))
        rotated += image.size == (20, 32)
    assert rotated == 4  # the EXIF orientation was applied, as the builder does


def test_captions_match_the_hugging_face_builder(tmp_path):
    root = tmp_path / "cap"
    captions = [["a red one", "red"], ["green thing"], ["blue", "", "a blue image"], ["x\ty", "  z  "]]
    members = []
    for i, caps in enumerate(captions):
        members += [(f"{i:03d}.webp", encoded(make_image(i, i), "WEBP", lossless=True)),
                    (f"{i:03d}.txt", "\n".join(caps).encode())]
    write_tar(root / "test" / "0.tar", members[:4])
    write_tar(root / "test" / "1.tar", members[4:])
    samples = load_webdataset(root, "test", num_classes=None, multilabel=False, label_column=None,
                              caption_column="txt")
    ref = reference(root, "test", tmp_path / "hf")
    assert samples.targets is None
    assert samples.captions == [[c for c in text.split("\n") if c.strip()] for text in ref["txt"]]
    assert samples.captions[2] == ["blue", "a blue image"]
    for i in range(len(ref)):
        assert np.array_equal(pixels(samples.load_image(i)), pixels(to_rgb(ref[i]["webp"])))


def test_loader_is_picklable_and_reads_by_offset(tmp_path):
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    classification_shards(root)
    samples = load_webdataset(root, "test", num_classes=3, multilabel=False, label_column="cls", caption_column=None)
    loader = pickle.loads(pickle.dumps(samples.load_image))
    for i in (0, 7, 14):
        assert np.array_equal(pixels(loader(i)), pixels(samples.load_image(i)))


def test_index_is_cached_under_the_cache_dir_and_nothing_is_written_elsewhere(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(var, str(home / var))
    data = tmp_path / "data"
    root = data / "wds"
    (root / "test").mkdir(parents=True)
    labels = classification_shards(root)
    before = sorted(p for p in data.rglob("*"))
    spec = parse_spec({"name": "wds", "title": "wds", "tasks": ["zeroshot"], "primary_metric": "accuracy",
                       "num_classes": 3, "source": {"type": "webdataset", "path": "clip-benchmark/wds_fx"},
                       "splits": {"test": "test"}}, tmp_path / "wds.yaml")
    cache = tmp_path / "cache"
    samples = load_split(spec, "test", data, cache)
    assert samples.targets.tolist() == labels
    assert not any(home.iterdir()) and sorted(p for p in data.rglob("*")) == before
    indexes = sorted((cache / INDEX_DIR).glob("*.json"))
    assert len(indexes) == 3 and {p.parent for p in cache.rglob("*") if p.is_file()} == {cache / INDEX_DIR}

    # a rerun reads the cached index: the shards' headers are not scanned again
    def no_scan(path):
        raise AssertionError(f"rescanned {path}")

    monkeypatch.setattr("clipbench.data.tar_index.scan_shard", no_scan)
    again = load_split(spec, "test", data, cache)
    assert again.targets.tolist() == labels and again.content_digest() == samples.content_digest()
    monkeypatch.undo()

    # a rewritten shard (new size and mtime) is indexed afresh
    shard = root / "test" / "shard-00.tar"
    write_tar(shard, [("a.png", encoded(make_image(2, 0), "PNG")), ("a.cls", b"2")])
    fresh = load_split(spec, "test", data, cache)
    assert fresh.targets.tolist() == [2] + labels[5:]
    assert fresh.content_digest() != samples.content_digest()


def test_a_damaged_cached_index_is_rebuilt(tmp_path):
    shard = write_tar(tmp_path / "s" / "0.tar", [("a.png", encoded(make_image(1, 0), "PNG")), ("a.cls", b"1")])
    index_shard(shard, tmp_path / "index")
    (cached,) = (tmp_path / "index").glob("*.json")
    cached.write_text('{"samples": [[')
    assert [s.key for s in index_shard(shard, tmp_path / "index")] == ["a"]
    assert "samples" in cached.read_text() and index_shard(shard, tmp_path / "index")[0].text == {"cls": "1"}


def _good_members(n: int = 3) -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        members += [(f"k{i}.png", encoded(make_image(i % 3, i, size=48), "PNG")), (f"k{i}.cls", str(i % 3).encode())]
    return members


def _truncated_mid_member(path: Path) -> None:
    write_tar(path, _good_members())
    data = path.read_bytes()
    offset = next(m.offset_data for m in tarfile.open(path).getmembers() if m.name == "k2.png")
    path.write_bytes(data[:offset + 100])


def _truncated_mid_header(path: Path) -> None:
    write_tar(path, _good_members())
    offset = next(m.offset for m in tarfile.open(path).getmembers() if m.name == "k1.png")
    path.write_bytes(path.read_bytes()[:offset + 200])


def _truncated_at_a_member_boundary(path: Path) -> None:
    write_tar(path, _good_members())
    offset = next(m.offset for m in tarfile.open(path).getmembers() if m.name == "k2.png")
    path.write_bytes(path.read_bytes()[:offset])


BAD_SHARDS = {
    "not a tar": (lambda p: p.write_bytes(b"<html>rate limited</html>\n" * 40), "not a readable uncompressed tar"),
    "gzip-compressed": (lambda p: p.write_bytes(__import__("gzip").compress(write_tar(p, _good_members()).read_bytes())),
                        "not a readable uncompressed tar"),
    "zero bytes": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "no members": (lambda p: write_tar(p, []), "holds no samples"),
    "only hidden members": (lambda p: write_tar(p, [(".DS_Store", b"x"), ("__init__.py", b"")]), "holds no samples"),
    "truncated mid-member": (_truncated_mid_member, "is truncated: member 'k2.png'"),
    "truncated mid-header": (_truncated_mid_header, "is truncated or damaged after offset"),
    "truncated at a member boundary": (_truncated_at_a_member_boundary, "is truncated or damaged after offset"),
    "a field twice": (lambda p: write_tar(p, _good_members(1) + [("k0.cls", b"1")]), "holds field 'cls' of sample 'k0' twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_is_a_clear_error_naming_the_shard(case, tmp_path):
    make, problem = BAD_SHARDS[case]
    root = tmp_path / "wds"
    write_tar(root / "test" / "0.tar", _good_members())
    bad = root / "test" / "1.tar"
    make(bad)
    with pytest.raises(ClipbenchError) as info:
        load_webdataset(root, "test", num_classes=3, multilabel=False, label_column="cls", caption_column=None,
                        index_dir=tmp_path / "index")
    message = str(info.value)
    assert f"shard {bad} " in message and problem in message and "Re-download the shard" in message


BAD_SAMPLES = {
    "no image member": ([("k0.cls", b"0"), ("k0.txt", b"hi")],
                        "has no image member (webp, jpg, jpeg, png; it has ['cls', 'txt'])"),
    "image with an upper-case extension": ([("k0.JPG", encoded(make_image(0, 0), "JPEG")), ("k0.cls", b"0")],
                                           "it has ['JPG', 'cls']"),
    "no label member": ([("k0.png", encoded(make_image(0, 0), "PNG"))], "has no 'cls' member"),
    "label not an integer": ([("k0.png", encoded(make_image(0, 0), "PNG")), ("k0.cls", b"cat")],
                             "has 'cls' = 'cat', not an integer"),
    "label out of range": ([("k0.png", encoded(make_image(0, 0), "PNG")), ("k0.cls", b"3")],
                           "has label 3, outside the spec's classes [0, 3)"),
    "negative label": ([("k0.png", encoded(make_image(0, 0), "PNG")), ("k0.cls", b"-1")],
                       "has label -1, outside"),
    "label not UTF-8": ([("k0.png", encoded(make_image(0, 0), "PNG")), ("k0.cls", b"\xff\xfe")], "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_is_a_clear_error_naming_shard_and_key(case, tmp_path):
    members, problem = BAD_SAMPLES[case]
    shard = write_tar(tmp_path / "wds" / "test" / "0.tar", _good_members(2) + members)
    with pytest.raises(ClipbenchError) as info:
        load_webdataset(tmp_path / "wds", "test", num_classes=3, multilabel=False, label_column="cls",
                        caption_column=None)
    message = str(info.value)
    assert str(shard) in message and "k0" in message and problem in message


def test_a_member_that_is_not_an_image_fails_when_loaded_not_when_listed(tmp_path):
    members = _good_members(2) + [("k2.png", b"not a png at all"), ("k2.cls", b"2")]
    write_tar(tmp_path / "wds" / "test" / "0.tar", members)
    samples = load_webdataset(tmp_path / "wds", "test", num_classes=3, multilabel=False, label_column="cls",
                              caption_column=None)
    assert samples.targets.tolist() == [0, 1, 2]
    assert samples.load_image(1).mode == "RGB"
    with pytest.raises(Image.UnidentifiedImageError):
        samples.load_image(2)


def test_a_shard_cut_short_after_indexing_fails_at_load_time(tmp_path):
    shard = write_tar(tmp_path / "wds" / "test" / "0.tar", _good_members(3))
    samples = load_webdataset(tmp_path / "wds", "test", num_classes=3, multilabel=False, label_column="cls",
                              caption_column=None)
    offset = next(m.offset_data for m in tarfile.open(shard).getmembers() if m.name == "k2.png")
    with open(shard, "r+b") as f:
        f.truncate(offset + 10)
    with pytest.raises(OSError, match="k2.png"):
        samples.load_image(2)


def test_scan_lists_members_by_offset_and_size(tmp_path):
    payload = os.urandom(1500)
    shard = write_tar(tmp_path / "0.tar", [("dir/a.b.jpg", payload), ("dir/a.b.cls", b"4"), ("c.jpg", b"xy")])
    first, second = scan_shard(shard)
    assert (first.key, sorted(first.members), first.text) == ("dir/a", ["b.cls", "b.jpg"], {"b.cls": "4"})
    offset, size = first.members["b.jpg"]
    assert size == 1500 and shard.read_bytes()[offset:offset + size] == payload
    assert second.key == "c" and second.members["jpg"][1] == 2 and second.text == {}


def test_multilabel_json_members_match_the_hugging_face_builder(tmp_path):
    root = tmp_path / "ml"
    labels = [[0, 2], [1], [], [2]]
    members = []
    for i, ys in enumerate(labels):
        members += [(f"{i:03d}.png", encoded(make_image(i, i), "PNG")), (f"{i:03d}.json", str(ys).encode())]
    write_tar(root / "test" / "0.tar", members)
    samples = load_webdataset(root, "test", num_classes=3, multilabel=True, label_column="json", caption_column=None)
    ref = reference(root, "test", tmp_path / "hf")
    expected = np.zeros((len(ref), 3), dtype=np.uint8)
    for i, ys in enumerate(ref["json"]):
        expected[i, ys] = 1
    assert samples.targets.dtype == np.uint8 and np.array_equal(samples.targets, expected)
    assert samples.targets.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 1]]
