"""Storage format ``webdataset``: shards in the clip_benchmark ``wds_*`` layout.

Layout (local folder, or a hub id such as ``clip-benchmark/wds_cifar10`` downloaded with
``huggingface_hub.snapshot_download``)::

    <root>/classnames.txt                          # one class name per line
    <root>/zeroshot_classification_templates.txt   # one template per line, {c} placeholder
    <root>/<split>/*.tar                           # shards: <key>.<webp|jpg|png>, <key>.cls, <key>.txt

Shards are read in place: each is indexed once with ``tarfile`` (:mod:`clipbench.data.tar_index`;
the index is cached under ``<cache-dir>/webdataset-index/``) and images are read by offset and size, so
nothing is copied and nothing is written outside the cache dir. ``.cls`` -> int, ``.json`` -> JSON, ``.txt`` -> str,
as the Hugging Face ``webdataset`` builder decodes them; samples come in the same order.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from clipbench.data.base import FileStats, Samples, to_rgb
from clipbench.data.formats import Prompts, SourceFormat, register_format
from clipbench.data.tar_index import TEXT_EXTENSIONS, ShardSample, index_shard
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec

_IMAGE_FIELDS = ("webp", "jpg", "jpeg", "png")
_INT_FIELDS = ("cls", "cls2", "index", "inx", "id")  # the HF builder's decoders
_JSON_FIELDS = ("json", "jsn")
TEMPLATES_ORIGIN = "zeroshot_classification_templates.txt of the webdataset"
INDEX_DIR = "webdataset-index"  # under the cache dir


@dataclass(frozen=True)
class WebDatasetOptions:
    label_column: str = "cls"    # the shard member holding the class index
    caption_column: str = "txt"  # retrieval: the shard member holding the captions, one per line
    #: the shard member holding each sample's group label (worst-group metrics): an integer text
    #: member, a JSON list, or a ``.npy`` array of metadata fields (DataComp's WILDS and fairness
    #: shards: ``npy``); None: no groups
    group_column: str | None = None
    #: which entry of a vector-valued group member is the group (DataComp's FMoW ``npy`` holds
    #: [region, year, y]: 0 is the region); None: the member holds one value
    group_index: int | None = None


@register_format
class WebDatasetFormat(SourceFormat):
    type = "webdataset"
    options_class = WebDatasetOptions
    provides_prompts = True  # classnames.txt / zeroshot_classification_templates.txt

    def automatic_hint(self, spec: "DatasetSpec", target: Path) -> str:
        return (
            f"run once with network access (downloads the hub repo '{spec.source.path}'), or "
            f"`huggingface-cli download --repo-type dataset {spec.source.path} --local-dir {target}`"
        )

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        root = self.locate(spec, data_root)
        if root is None:
            reason = self.may_download(spec, allow_download)
            if reason:
                raise self.missing(spec, role, data_root, reason)
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(spec.source.path, repo_type="dataset",
                                          local_dir=str(data_root / spec.name)))
        options: WebDatasetOptions = spec.source.options
        return load_webdataset(root, str(spec.split(role)), num_classes=spec.num_classes,
                               multilabel=spec.multilabel,
                               label_column=None if spec.is_retrieval else options.label_column,
                               caption_column=options.caption_column if spec.is_retrieval else None,
                               index_dir=cache_dir / INDEX_DIR, group_column=options.group_column,
                               group_index=options.group_index)

    def prompts(self, spec: "DatasetSpec", data_root: Path) -> Prompts:
        root = self.locate(spec, data_root)
        if root is None:
            return None, None, None
        classnames, templates = read_wds_prompts(root)
        return classnames, templates, TEMPLATES_ORIGIN if templates else None


def shard_files(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*.tar"))


def load_webdataset(root: Path, split: str, *, num_classes: int | None, multilabel: bool,
                    label_column: str | None, caption_column: str | None,
                    index_dir: Path | None = None, group_column: str | None = None,
                    group_index: int | None = None) -> Samples:
    """The samples of ``<root>/<split>/*.tar``, in shard order (sorted names) then member order, with
    row numbers as ids, as the Hugging Face ``webdataset`` builder lists them. ``index_dir``: where the
    shard indexes are cached (None: scan every time). ``group_column`` / ``group_index``: the member
    (and entry) holding each sample's group label (:class:`WebDatasetOptions`)."""
    shards = shard_files(root, split)
    if not shards:
        raise ClipbenchError(f"No webdataset shards ({root / split}/*.tar) found.")
    field = caption_column or label_column
    if not field:
        raise ClipbenchError(f"webdataset {root / split}: set source.label_column (or caption_column) in the spec.")
    if multilabel and num_classes is None and not caption_column:
        raise ClipbenchError(f"webdataset {root / split}: a multi-label dataset needs num_classes.")
    shard_of, offsets, sizes, names, values, groups = [], [], [], [], [], []
    for number, shard in enumerate(shards):
        for sample in index_shard(shard, index_dir):
            image = next((f for f in _IMAGE_FIELDS if f in sample.members), None)
            if image is None:
                raise _bad_sample(shard, sample.key, f"has no image member ({', '.join(_IMAGE_FIELDS)}; "
                                                      f"it has {sorted(sample.members)})")
            value = _member_value(shard, sample, field)
            problem = None if caption_column else _label_problem(value, num_classes, multilabel)
            if problem:
                raise _bad_sample(shard, sample.key, problem)
            offset, size = sample.members[image]
            shard_of.append(number)
            offsets.append(offset)
            sizes.append(size)
            names.append(f"{sample.key}.{image}")
            values.append(value)
            if group_column:
                groups.append(_group_value(shard, sample, group_column, group_index))
    loader = ShardImageLoader([str(s) for s in shards], shard_of, offsets, sizes, names)
    n = len(names)
    common = dict(ids=[str(i) for i in range(n)], description=f"webdataset {root / split}",
                  fingerprint=FileStats(shards, relative_to=root), load_bytes=loader.read_bytes,
                  groups=np.asarray(groups, dtype=np.int64) if group_column else None)
    if caption_column:
        # clip_benchmark's mirrors store an image's captions in one text member, one per line
        captions = [[v for v in str(value).split("\n") if v.strip()] for value in values]
        return Samples(loader, n, captions=captions, **common)
    if multilabel:
        targets = np.zeros((n, num_classes), dtype=np.uint8)
        for i, value in enumerate(values):
            targets[i, [value] if isinstance(value, int) else value] = 1
    else:
        targets = np.asarray(values, dtype=np.int64)
    return Samples(loader, n, targets=targets, **common)


def _bad_sample(shard: Path, key: str, problem: str) -> ClipbenchError:
    return ClipbenchError(
        f"Sample '{key}' of webdataset shard {shard} {problem}. Re-download the shard (or remove it "
        "from the split's folder if it does not belong there)."
    )


def _member_value(shard: Path, sample: ShardSample, field: str) -> Any:
    """A text member decoded as the HF builder does: by its last extension (int, JSON or text)."""
    if field not in sample.members:
        raise _bad_sample(shard, sample.key, f"has no '{field}' member (it has {sorted(sample.members)}); "
                                              "if the data is elsewhere, fix source.*_column in the spec")
    if field not in sample.text:
        raise ClipbenchError(f"Member '{sample.key}.{field}' of webdataset shard {shard} is not a text member "
                             f"({', '.join(sorted(TEXT_EXTENSIONS))}): fix source.*_column in the spec.")
    text = sample.text[field]
    kind = field.rsplit(".", 1)[-1].lower()
    try:
        if kind in _INT_FIELDS:
            return int(text)
        if kind in _JSON_FIELDS:
            return json.loads(text)
    except ValueError:
        raise _bad_sample(shard, sample.key, f"has '{field}' = {text[:40]!r}, not "
                                             f"{'an integer' if kind in _INT_FIELDS else 'JSON'}") from None
    return text


def _group_value(shard: Path, sample: ShardSample, column: str, index: int | None) -> int:
    """The integer group label of a sample: entry ``index`` of its ``column`` member (a ``.npy``
    array, read from the shard, or a JSON list), or the member itself when ``index`` is None."""
    if column in sample.text:
        value: Any = _member_value(shard, sample, column)
    elif column not in sample.members:
        raise _bad_sample(shard, sample.key, f"has no '{column}' member for its group (it has "
                                              f"{sorted(sample.members)}); fix source.group_column in the spec")
    elif column.rsplit(".", 1)[-1].lower() == "npy":
        offset, size = sample.members[column]
        with open(shard, "rb") as f:
            f.seek(offset)
            value = np.load(io.BytesIO(f.read(size)), allow_pickle=False).ravel().tolist()
    else:
        raise _bad_sample(shard, sample.key, f"has a group member '{column}' that is neither text nor .npy")
    if index is not None:
        if not isinstance(value, list) or not -len(value) <= index < len(value):
            raise _bad_sample(shard, sample.key, f"has group member '{column}' = {str(value)[:60]}, which "
                                                  f"has no entry {index} (source.group_index)")
        value = value[index]
    elif isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # npy metadata arrays of floats hold integer codes
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad_sample(shard, sample.key, f"has group {str(value)[:60]!r} in '{column}', not an integer "
                                              "(set source.group_index to pick one entry of a vector)")
    return value


def _is_index(value: Any, num_classes: int | None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 and (
        num_classes is None or value < num_classes)


def _label_problem(value: Any, num_classes: int | None, multilabel: bool) -> str | None:
    """What is wrong with a sample's label, or None."""
    classes = f"[0, {num_classes})" if num_classes is not None else "[0, ...)"
    if multilabel:
        labels = [value] if isinstance(value, int) else value
        if isinstance(labels, list) and all(_is_index(y, num_classes) for y in labels):
            return None
        return f"has labels {value!r}, not class indices in {classes}"
    if not isinstance(value, int) or isinstance(value, bool):
        return f"has label {value!r}, not an integer class index"
    return None if _is_index(value, num_classes) else f"has label {value}, outside the spec's classes {classes}"


class ShardImageLoader:
    """``loader(i)`` reads image i from its shard by offset and size and decodes it (picklable for
    DataLoader workers: it holds paths and numbers, no open files)."""

    def __init__(self, shards: list[str], shard_of: list[int], offsets: list[int], sizes: list[int],
                 names: list[str]):
        self.shards = shards
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.names = names

    def __call__(self, i: int) -> Image.Image:
        return decode_image(self.read_bytes(i))

    def read_bytes(self, i: int) -> bytes:
        """Image ``i``'s member as stored in its shard (``Samples.load_bytes``)."""
        path = self.shards[self.shard_of[i]]
        size = int(self.sizes[i])
        with open(path, "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"member '{self.names[i]}' of {path} is cut short (the shard changed after it was "
                          "indexed): rerun, or re-download the shard")
        return data


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL, as the HF ``Image`` feature decoded them: EXIF orientation applied."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.getexif().get(ExifTags.Base.Orientation) is not None:
            return to_rgb(ImageOps.exif_transpose(img))
        return to_rgb(img)


def read_wds_prompts(root: Path) -> tuple[list[str] | None, list[str] | None]:
    """classnames.txt and zeroshot_classification_templates.txt of a wds folder, when present."""

    def read(name: str) -> list[str] | None:
        path = root / name
        if not path.is_file():
            return None
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    return read("classnames.txt"), read("zeroshot_classification_templates.txt")
