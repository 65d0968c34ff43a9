"""Storage format ``webdataset``: shards in the clip_benchmark ``wds_*`` layout.

Layout (local folder, or a hub id such as ``clip-benchmark/wds_cifar10`` downloaded with
``huggingface_hub.snapshot_download``)::

    <root>/classnames.txt                          # one class name per line
    <root>/zeroshot_classification_templates.txt   # one template per line, {c} placeholder
    <root>/<split>/*.tar                           # shards: <key>.<webp|jpg|png>, <key>.cls, <key>.txt

Shards are read with the Hugging Face ``webdataset`` builder (``.cls`` -> int, ``.txt`` -> str).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipbench.data.base import FileStats, Samples
from clipbench.data.formats import Prompts, SourceFormat, register_format
from clipbench.data.huggingface import samples_from_dataset
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec

_IMAGE_FIELDS = ("webp", "jpg", "jpeg", "png")
TEMPLATES_ORIGIN = "zeroshot_classification_templates.txt of the webdataset"


@dataclass(frozen=True)
class WebDatasetOptions:
    label_column: str = "cls"    # the shard member holding the class index
    caption_column: str = "txt"  # retrieval: the shard member holding the captions, one per line


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
                               caption_column=options.caption_column if spec.is_retrieval else None)

    def prompts(self, spec: "DatasetSpec", data_root: Path) -> Prompts:
        root = self.locate(spec, data_root)
        if root is None:
            return None, None, None
        classnames, templates = read_wds_prompts(root)
        return classnames, templates, TEMPLATES_ORIGIN if templates else None


def shard_files(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*.tar"))


def load_webdataset(root: Path, split: str, *, num_classes: int | None, multilabel: bool,
                    label_column: str | None, caption_column: str | None) -> Samples:
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
        label_column=label_column,
        caption_column=caption_column,
        num_classes=num_classes,
        multilabel=multilabel,
        description=f"webdataset {root / split}",
        # the shards are the stored content (the Arrow copy is derived from them)
        fingerprint=FileStats(shards, relative_to=root),
    )


def read_wds_prompts(root: Path) -> tuple[list[str] | None, list[str] | None]:
    """classnames.txt and zeroshot_classification_templates.txt of a wds folder, when present."""

    def read(name: str) -> list[str] | None:
        path = root / name
        if not path.is_file():
            return None
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    return read("classnames.txt"), read("zeroshot_classification_templates.txt")
