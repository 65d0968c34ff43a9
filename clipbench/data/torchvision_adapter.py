"""Adapter for torchvision dataset classes (``torchvision.datasets.<Class>(root, download, **kwargs)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClipbenchError
from .base import Samples, to_rgb

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
    )
