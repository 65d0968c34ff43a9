"""Storage format ``torchvision``: torchvision dataset classes
(``torchvision.datasets.<Class>(root, download, **kwargs)``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipbench.data.base import FileStats, Samples, to_rgb
from clipbench.data.formats import SourceFormat, register_format
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec


@dataclass(frozen=True)
class TorchvisionOptions:
    #: extra constructor arguments of the torchvision class (the split's own arguments come on top)
    kwargs: dict[str, Any] = field(default_factory=dict,
                                   metadata={"expected": "a mapping of torchvision constructor arguments"})


@register_format
class TorchvisionFormat(SourceFormat):
    type = "torchvision"
    options_class = TorchvisionOptions

    def candidate_dirs(self, spec: "DatasetSpec", data_root: Path) -> list[Path]:
        # source.path is a class name, not a directory: the data sits in the dataset's own folder
        return [data_root / spec.name]

    def locate(self, spec: "DatasetSpec", data_root: Path) -> Path | None:
        root = data_root / spec.name
        return root if root.is_dir() and any(root.iterdir()) else None

    def automatic_hint(self, spec: "DatasetSpec", target: Path) -> str:
        return (
            f"run once with network access (torchvision.datasets.{spec.source.path} downloads into {target}), "
            "or copy an existing torchvision download there (or pass --data-root DIR)"
        )

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        split = spec.split(role)
        tv_root = data_root / spec.name
        present = self.locate(spec, data_root) is not None
        reason = None if present else self.may_download(spec, allow_download)
        if reason:
            raise self.missing(spec, role, data_root, reason)
        split_kwargs = dict(split) if isinstance(split, dict) else {"split": split}
        try:
            return load_torchvision(spec.source.path, tv_root, split_kwargs, spec.source.options.kwargs,
                                    download=not present)
        except RuntimeError as exc:
            raise ClipbenchError(
                f"torchvision could not load '{spec.name}' from {tv_root}: {exc}. "
                f"To get it: {self.how_to_get(spec, data_root).rstrip('.')}."
            ) from None

# Attribute names under which torchvision classes keep their labels, so targets are read without
# decoding every image.
_TARGET_ATTRS = ("targets", "_labels", "labels", "y")


class TorchvisionImageLoader:
    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __call__(self, i: int):
        return to_rgb(self.dataset[int(i)][0])


def _targets(dataset: Any) -> np.ndarray:
    for attr in _TARGET_ATTRS:
        value = getattr(dataset, attr, None)
        if value is not None and len(value) == len(dataset):
            return np.asarray(value, dtype=np.int64)
    samples = getattr(dataset, "samples", None) or getattr(dataset, "_samples", None)
    if samples is not None and len(samples) == len(dataset):
        return np.asarray([s[1] for s in samples], dtype=np.int64)
    return np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


def load_torchvision(class_name: str, root: Path, split_kwargs: dict, kwargs: dict,
                     download: bool) -> Samples:
    import torchvision.datasets as tvd

    cls = getattr(tvd, class_name, None)
    if cls is None:
        raise ClipbenchError(f"torchvision.datasets has no class '{class_name}'; fix source.path in the spec.")
    try:
        dataset = cls(root=str(root), download=download, **kwargs, **split_kwargs)
    except TypeError:
        # a few classes (e.g. Caltech101 variants) take no download flag in some versions
        dataset = cls(root=str(root), **kwargs, **split_kwargs)
    return Samples(
        load_image=TorchvisionImageLoader(dataset),
        size=len(dataset),
        targets=_targets(dataset),
        ids=[str(i) for i in range(len(dataset))],
        description=f"torchvision {class_name}({split_kwargs}) at {root}",
        fingerprint=FileStats([root], relative_to=root),  # every file the class reads sits under root
    )
