"""Adapters: turn a dataset spec and a split role into :class:`Samples`.

One adapter per storage format (see docs/architecture.md). Data is looked up under the data root
first; a download happens only when the spec's source allows it, the caller allows it and the
network answers — otherwise the user gets one message saying what is missing, where clipbench
looked and how to provide it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipbenchError
from ..paths import network_reachable, offline
from ..specs import DatasetSpec
from .base import Samples

log = logging.getLogger(__name__)

__all__ = ["Samples", "load_split", "data_status", "DataStatus", "local_dir"]


@dataclass(frozen=True)
class DataStatus:
    """Whether a dataset's data is present locally, where, and how to get it when it is not."""

    present: bool
    location: str
    how_to_get: str


def _candidate_dirs(spec: DatasetSpec, data_root: Path) -> list[Path]:
    src = Path(spec.source.path).expanduser()
    dirs = [src] if src.is_absolute() else []
    dirs.append(data_root / spec.name)
    if not src.is_absolute() and spec.source.type not in ("torchvision",):
        dirs.append(data_root / spec.source.path)
    return dirs


def local_dir(spec: DatasetSpec, data_root: Path) -> Path | None:
    """The first existing local directory for the spec's data, or None."""
    if spec.source.type == "torchvision":
        root = data_root / spec.name
        return root if root.is_dir() and any(root.iterdir()) else None
    for d in _candidate_dirs(spec, data_root):
        if d.is_dir():
            return d
    return None


def _how_to_get(spec: DatasetSpec, data_root: Path) -> str:
    src = spec.source
    target = data_root / spec.name
    if src.generator:
        return "generated automatically on first use"
    if src.manual:
        return f"manual download: {src.manual.strip()} Place it at {target} (or pass --data-root DIR)."
    if src.type == "huggingface":
        return (
            f"run once with network access (clipbench downloads the hub dataset '{src.path}'), or save it "
            f"with `datasets.load_dataset('{src.path}').save_to_disk('{target}')` on a machine with "
            f"network and copy it there (or pass --data-root DIR)"
        )
    if src.type == "torchvision":
        return (
            f"run once with network access (torchvision.datasets.{src.path} downloads into {target}), "
            "or copy an existing torchvision download there (or pass --data-root DIR)"
        )
    if src.type == "webdataset":
        return (
            f"run once with network access (downloads the hub repo '{src.path}'), or "
            f"`huggingface-cli download --repo-type dataset {src.path} --local-dir {target}`"
        )
    return f"put the files at {target} in the layout of docs/architecture.md (source type {src.type}), or pass --data-root DIR"


def data_status(spec: DatasetSpec, data_root: Path) -> DataStatus:
    found = local_dir(spec, data_root)
    if found is not None:
        return DataStatus(True, str(found), "")
    looked = ", ".join(str(d) for d in _candidate_dirs(spec, data_root))
    return DataStatus(False, looked, _how_to_get(spec, data_root))


def _may_download(spec: DatasetSpec, allow_download: bool) -> str | None:
    """None if a download may start now, else the reason it may not."""
    if not spec.source.download or spec.source.manual:
        return "this dataset cannot be downloaded automatically"
    if not allow_download:
        return "downloads are disabled (--no-download)"
    if offline():
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / CLIPBENCH_OFFLINE)"
    if not network_reachable():
        return "the network is unreachable"
    return None


def _missing(spec: DatasetSpec, role: str, data_root: Path, reason: str) -> ClipbenchError:
    status = data_status(spec, data_root)
    return ClipbenchError(
        f"Data for dataset '{spec.name}' (split '{role}') is not available locally and {reason}. "
        f"Looked in: {status.location}. To get it: {status.how_to_get}."
    )


def load_split(
    spec: DatasetSpec,
    role: str,
    data_root: Path,
    cache_dir: Path,
    allow_download: bool = True,
) -> Samples:
    """Load the split playing ``role`` (``train``/``val``/``test``) of a dataset.

    Raises:
        ClipbenchError: the spec has no such split, or the data is missing and cannot be fetched.
    """
    split = spec.split(role)
    if split is None:
        raise ClipbenchError(f"Dataset '{spec.name}' has no '{role}' split in its spec ({spec.file}).")
    data_root = Path(data_root)
    src = spec.source
    root = local_dir(spec, data_root)
    if src.generator == "synthetic":
        from .. import synthetic

        # returns at once when complete; rebuilds data written by an older generator version
        root = synthetic.materialize(spec.name, data_root / spec.name)

    if src.type == "imagefolder":
        from .imagefolder import load_imagefolder

        if root is None:
            raise _missing(spec, role, data_root, "it has no download source")
        samples = load_imagefolder(root, str(split), src.class_folders)
    elif src.type == "table":
        from .table import load_table

        if root is None:
            raise _missing(spec, role, data_root, "it has no download source")
        samples = load_table(
            root / str(split),
            image_column=src.image_column or "image",
            label_column=None if spec.is_retrieval else (src.label_column or "label"),
            caption_column=(src.caption_column or "captions") if spec.is_retrieval else None,
            num_classes=spec.num_classes,
            multilabel=spec.multilabel,
        )
    elif src.type == "huggingface":
        from .huggingface import open_hub, open_local, samples_from_dataset

        if root is not None:
            dataset = open_local(root, str(split), src.config)
        else:
            reason = _may_download(spec, allow_download)
            if reason:
                raise _missing(spec, role, data_root, reason)
            dataset = open_hub(src.path, str(split), src.config, data_root / "hf-cache")
        samples = samples_from_dataset(
            dataset,
            image_column=src.image_column,
            label_column=None if spec.is_retrieval else src.label_column,
            caption_column=src.caption_column if spec.is_retrieval else None,
            num_classes=spec.num_classes,
            multilabel=spec.multilabel,
            description=f"{spec.name}:{split}",
        )
    elif src.type == "webdataset":
        from .webdataset import load_webdataset

        if root is None:
            reason = _may_download(spec, allow_download)
            if reason:
                raise _missing(spec, role, data_root, reason)
            from huggingface_hub import snapshot_download

            root = Path(
                snapshot_download(src.path, repo_type="dataset", local_dir=str(data_root / spec.name))
            )
        samples = load_webdataset(root, str(split), num_classes=spec.num_classes,
                                  multilabel=spec.multilabel, retrieval=spec.is_retrieval)
    elif src.type == "torchvision":
        from .torchvision_adapter import load_torchvision

        tv_root = data_root / spec.name
        present = root is not None
        reason = None if present else _may_download(spec, allow_download)
        if reason:
            raise _missing(spec, role, data_root, reason)
        split_kwargs = dict(split) if isinstance(split, dict) else {"split": split}
        try:
            samples = load_torchvision(src.path, tv_root, split_kwargs, src.kwargs, download=not present)
        except RuntimeError as exc:
            raise ClipbenchError(
                f"torchvision could not load '{spec.name}' from {tv_root}: {exc}. "
                f"To get it: {_how_to_get(spec, data_root)}."
            ) from None
    elif src.type == "video":
        from .video import load_video_split

        if root is None:
            raise _missing(spec, role, data_root, "it must be downloaded by hand")
        samples = load_video_split(root, root / str(split), list(spec.classnames or ()),
                                   cache_dir / "video-frames" / spec.name)
    else:  # validated in specs.py
        raise ClipbenchError(f"Unknown source type {src.type}")

    return _subsample(spec, role, samples)


def _subsample(spec: DatasetSpec, role: str, samples: Samples) -> Samples:
    if not spec.subsample or role not in spec.subsample:
        return samples
    count = spec.subsample[role]
    if count >= len(samples):
        return samples
    rng = np.random.default_rng(spec.subsample.get("seed", 0))
    chosen = np.sort(rng.permutation(len(samples))[:count])
    log.info("%s/%s: using a seeded random subset of %d of %d samples", spec.name, role, count, len(samples))
    return samples.subset(chosen)
