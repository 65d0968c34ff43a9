"""Adapter for webdataset shards in the clip_benchmark ``wds_*`` layout.

Layout (local folder, or a hub id such as ``clip-benchmark/wds_cifar10`` downloaded with
``huggingface_hub.snapshot_download``)::

    <root>/classnames.txt                          # one class name per line
    <root>/zeroshot_classification_templates.txt   # one template per line, {c} placeholder
    <root>/<split>/*.tar                           # shards: <key>.<webp|jpg|png>, <key>.cls, <key>.txt

Shards are read with the Hugging Face ``webdataset`` builder (``.cls`` -> int, ``.txt`` -> str).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipbenchError
from .base import Samples
from .huggingface import samples_from_dataset

_IMAGE_FIELDS = ("webp", "jpg", "jpeg", "png")


def shard_files(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*.tar"))


def load_webdataset(root: Path, split: str, *, num_classes: int | None, multilabel: bool,
                    retrieval: bool) -> Samples:
    import datasets

    shards = shard_files(root, split)
    if not shards:
        raise ClipbenchError(f"No webdataset shards ({root / split}/*.tar) found.")
    dataset = datasets.load_dataset(
        "webdataset", data_files={split: [str(s) for s in shards]}, split=split
    )
    image_column = next((c for c in _IMAGE_FIELDS if c in dataset.features), None)
    if image_column is None:
        raise ClipbenchError(f"Shards under {root / split} have no image field ({_IMAGE_FIELDS}).")
    return samples_from_dataset(
        dataset,
        image_column=image_column,
        label_column=None if retrieval else "cls",
        caption_column="txt" if retrieval else None,
        num_classes=num_classes,
        multilabel=multilabel,
        description=f"webdataset {root / split}",
    )


def read_wds_prompts(root: Path) -> tuple[list[str] | None, list[str] | None]:
    """classnames.txt and zeroshot_classification_templates.txt of a wds folder, when present."""

    def read(name: str) -> list[str] | None:
        path = root / name
        if not path.is_file():
            return None
        return [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]

    return read("classnames.txt"), read("zeroshot_classification_templates.txt")
