"""Batched, cached feature extraction.

Image features are computed once per (model weights, dataset split, preprocessing, precision) and
stored on disk; every task and every later run reuses them. A cache entry's key is a digest of
everything that changes the numbers (see :func:`image_cache_key`); entries are written atomically,
so an interrupted run never leaves a half-written file and a rerun resumes from what is complete.

Extraction takes an optional index list so that one split can be sharded across
``torch.distributed`` ranks and gathered (see :mod:`clipbench.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clipbench.atomic import atomic_open

log = logging.getLogger(__name__)

#: Bumped whenever the stored arrays' meaning or layout changes; part of every cache key.
FEATURE_FORMAT_VERSION = 1


@dataclass
class ImageFeatures:
    """Features of one dataset split, in dataset order.

    projected: (N, D) float32, L2-normalized embeddings (after the projection).
    pre_projection: (N, P) float32 image features before the final projection (linear probes).
    targets: (N,) int64 or (N, C) uint8 labels, or None for retrieval splits.
    """

    projected: np.ndarray
    pre_projection: np.ndarray
    targets: np.ndarray | None
    pre_projection_kind: str
    from_cache: bool = False
    seconds: float = 0.0


class FeatureCache:
    """A directory of ``<key>.npz`` files plus ``<key>.json`` metadata, written atomically."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None

    @staticmethod
    def digest(parts: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _path(self, kind: str, key: str) -> Path:
        assert self.root is not None
        return self.root / kind / key[:2] / f"{key}.npz"

    def load(self, kind: str, key: str,
             expected: Mapping[str, tuple[int | None, ...]] | None = None) -> dict[str, np.ndarray] | None:
        """The arrays of an entry, or None when it is absent or unusable.

        ``expected`` maps each array the caller needs to its shape (None: any size on that axis);
        an entry that is unreadable (truncated, zero bytes, not a .npz), lacks one of them, holds one
        of another shape or of a dtype other than float32, or disagrees with its ``.json`` meta on
        the row count, is ignored with one warning and recomputed (the new entry replaces it).
        """
        if self.root is None:
            return None
        path = self._path(kind, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            problem = f"unreadable: {type(exc).__name__}: {exc}" if str(exc) else f"unreadable ({type(exc).__name__})"
        else:
            problem = _entry_problem(arrays, expected or {}, path.with_suffix(".json"))
            if problem is None:
                return arrays
        log.warning("ignoring cache entry %s (%s); recomputing it", path, problem)
        return None

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if self.root is None:
            return
        path = self._path(kind, key)
        # metadata first: an entry's arrays never exist without it (a kill in between leaves
        # only the small .json, which the next save of the entry overwrites)
        with atomic_open(path.with_suffix(".json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True, default=str)
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)


def _entry_problem(arrays: dict[str, np.ndarray], expected: Mapping[str, tuple[int | None, ...]],
                   meta_path: Path) -> str | None:
    """What makes a readable cache entry unusable, or None."""
    for name, shape in expected.items():
        if name not in arrays:
            return f"no array {name!r}; it holds {sorted(arrays)}"
        array = arrays[name]
        if array.dtype != np.float32:
            return f"{name} is {array.dtype}, expected float32"
        if array.ndim != len(shape) or any(want is not None and got != want
                                           for got, want in zip(array.shape, shape)):
            wanted = tuple("*" if w is None else w for w in shape)
            return f"{name} has shape {array.shape}, expected {wanted}"
    try:
        n = json.loads(meta_path.read_text()).get("n") if meta_path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return f"its metadata {meta_path.name} is unreadable"
    rows = {len(arrays[name]) for name in expected}
    if isinstance(n, int) and rows and rows != {n}:
        return f"its metadata {meta_path.name} says {n} rows, the arrays hold {sorted(rows)}"
    return None


def image_cache_key(model: Any, spec: Any, role: str, samples: Any) -> dict[str, Any]:
    """Everything that changes a split's image features."""
    return {
        "format": FEATURE_FORMAT_VERSION,
        **model.identity(),
        "preprocess": repr(model.preprocess),
        "dataset": spec.name,
        "spec": spec.data_digest(),
        "split": role,
        "split_value": spec.split(role),
        "content": samples.content_digest(),
    }


class _PreprocessedImages(Dataset):
    """Applies the model's eval transform in DataLoader workers; yields (pixels, position)."""

    def __init__(self, samples: Any, preprocess: Any, indices: Sequence[int]):
        self.samples = samples
        self.preprocess = preprocess
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        return self.preprocess(self.samples.load_image(self.indices[position])), position


def encode_image_batches(
    model: Any,
    samples: Any,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 256,
    workers: int = 4,
    desc: str = "images",
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``samples[indices]`` (default: all) in order.

    Returns:
        (projected (n, D) float32 L2-normalized, pre_projection (n, P) float32).
    """
    indices = list(range(len(samples))) if indices is None else list(indices)
    device = torch.device(model.device)
    loader = DataLoader(
        _PreprocessedImages(samples, model.preprocess, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    projected: list[np.ndarray] = []
    pre: list[np.ndarray] = []
    with torch.inference_mode(), model.autocast():
        for pixels, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
            proj, before = model.encode_images(pixels.to(device, non_blocking=True))
            projected.append(proj.float().cpu().numpy())
            pre.append(before.float().cpu().numpy())
    if not projected:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(projected), np.concatenate(pre)


def image_features(
    model: Any,
    spec: Any,
    role: str,
    samples: Any,
    cache: FeatureCache,
    *,
    batch_size: int = 256,
    workers: int = 4,
    encoder: Any = None,
) -> ImageFeatures:
    """Image features of one split, from the cache or computed (and cached).

    ``encoder`` replaces :func:`encode_image_batches` (the distributed runner passes a sharded one).
    """
    import time

    parts = image_cache_key(model, spec, role, samples)
    key = FeatureCache.digest(parts)
    kind = getattr(model, "pre_projection_kind", "before_projection")
    cached = cache.load("image", key, {"projected": (len(samples), None), "pre_projection": (len(samples), None)})
    if cached is not None:
        log.info("%s/%s: image features from cache (%s)", spec.name, role, key[:12])
        return ImageFeatures(cached["projected"], cached["pre_projection"], samples.targets, kind, True)
    start = time.perf_counter()
    encode = encoder or encode_image_batches
    projected, pre = encode(
        model, samples, batch_size=batch_size, workers=workers, desc=f"{spec.name}/{role}"
    )
    seconds = time.perf_counter() - start
    cache.save("image", key, {"projected": projected, "pre_projection": pre},
               {**parts, "n": len(samples), "seconds": seconds})
    return ImageFeatures(projected, pre, samples.targets, kind, False, seconds)


def text_features(
    model: Any, texts: Sequence[str], cache: FeatureCache, *, batch_size: int = 1024
) -> np.ndarray:
    """L2-normalized text embeddings (T, D) float32, encoded many prompts per batch, cached.

    Prompts of all classes go through the text tower together (e.g. 1,000 classes x 80 templates in
    batches of ``batch_size``), rather than one class per batch.
    """
    texts = list(texts)
    parts = {
        "format": FEATURE_FORMAT_VERSION,
        **model.identity(),
        "texts": hashlib.sha256("\x1e".join(texts).encode()).hexdigest(),
        "n": len(texts),
    }
    key = FeatureCache.digest(parts)
    cached = cache.load("text", key, {"features": (len(texts), None)})
    if cached is not None:
        return cached["features"]
    chunks = []
    with torch.inference_mode(), model.autocast():
        for start in tqdm(range(0, len(texts), batch_size), desc="texts", unit="batch", leave=False,
                          disable=None):
            chunks.append(model.encode_texts(texts[start:start + batch_size]).float().cpu().numpy())
    features = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    cache.save("text", key, {"features": features}, parts)
    return features
