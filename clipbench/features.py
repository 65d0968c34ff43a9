"""Batched, cached feature extraction.

Image features are computed once per (model weights, dataset split, preprocessing, precision) and
stored on disk; every task and every later run reuses them. A cache entry's key is a digest of
everything that changes the numbers (see :func:`image_cache_key`); entries are written atomically,
so an interrupted run never leaves a half-written file and a rerun resumes from what is complete.

Extraction takes an optional index list so that one split can be sharded across
``torch.distributed`` ranks and gathered (see :mod:`clipbench.distributed`).

Bad samples: an image that cannot be read (decode error, missing file, decompression bomb) is
caught per image in the DataLoader worker; the batch goes on without it and the encoder reports its
position and reason. The cache entry stores the positions encoded (``kept``) and the reasons of the
others (``bad_reasons``), so a cache hit knows them too; :func:`image_features` then applies the
run's ``--on-bad-image`` policy: ``fail`` raises :class:`BadImagesError`, ``skip`` returns the
features of the readable samples with :attr:`ImageFeatures.kept` and :attr:`ImageFeatures.skipped`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clipbench.atomic import atomic_open
from clipbench.errors import ClipbenchError

log = logging.getLogger(__name__)

#: Bumped whenever the stored arrays' meaning or layout changes; part of every cache key.
FEATURE_FORMAT_VERSION = 1


@dataclass
class ImageFeatures:
    """Features of one dataset split, in dataset order.

    projected: (N, D) float32, L2-normalized embeddings (after the projection).
    pre_projection: (N, P) float32 image features before the final projection (linear probes).
    targets: (N,) int64 or (N, C) uint8 labels, or None for retrieval splits.
    kept: positions in the split of the N samples the rows belong to, when unreadable samples were
        skipped (``--on-bad-image skip``); None when every sample was read.
    skipped: the sample ids left out, in split order (empty when none).
    """

    projected: np.ndarray
    pre_projection: np.ndarray
    targets: np.ndarray | None
    pre_projection_kind: str
    from_cache: bool = False
    seconds: float = 0.0
    kept: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass
class EncodedImages:
    """What an image encoder returns: rows of the readable samples, in the order asked for.

    projected: (n, D) float32 L2-normalized; pre_projection: (n, P) float32;
    bad: sample index -> why it could not be read (its row is absent), in index order.
    """

    projected: np.ndarray
    pre_projection: np.ndarray
    bad: dict[int, str] = field(default_factory=dict)


class BadImagesError(ClipbenchError):
    """A split has images that cannot be read and the run's policy is ``--on-bad-image fail``."""


#: how many bad samples a message or a log line names
SHOWN_BAD = 10


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


@contextlib.contextmanager
def pixel_limit(max_image_pixels: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to ``max_image_pixels`` (0: none; None: unchanged)
    while decoding, then restored (in DataLoader workers as in the main process)."""
    if max_image_pixels is None:
        yield
        return
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels or None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _reason(exc: BaseException) -> str:
    """One line saying why an image could not be read (and, for a bomb, how to allow it)."""
    text = " ".join(str(exc).split())[:300] or "no message"
    if isinstance(exc, Image.DecompressionBombError):
        return (f"{type(exc).__name__}: {text} (the limit is twice --max-image-pixels, now "
                f"{Image.MAX_IMAGE_PIXELS}; if the image is genuine, raise it with --max-image-pixels N, "
                "0 for no limit)")
    return f"{type(exc).__name__}: {text}"


class _PreprocessedImages(Dataset):
    """Applies the model's eval transform in DataLoader workers; yields (pixels, position, None),
    or (None, position, reason) for an image that cannot be read, so the batch goes on."""

    def __init__(self, samples: Any, preprocess: Any, indices: Sequence[int],
                 max_image_pixels: int | None = None):
        self.samples = samples
        self.preprocess = preprocess
        self.indices = list(indices)
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        with pixel_limit(self.max_image_pixels):  # set here: workers do not share the parent's
            try:
                return self.preprocess(self.samples.load_image(self.indices[position])), position, None
            except Exception as exc:  # any loader's failure is this sample's, not the run's
                return None, position, _reason(exc)


def _collate(batch: list[tuple[Any, int, str | None]]) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
    """(pixels of the readable items or None, their positions, position -> reason of the others)."""
    good = [(pixels, position) for pixels, position, reason in batch if reason is None]
    bad = {position: reason for _, position, reason in batch if reason is not None}
    pixels = torch.stack([p for p, _ in good]) if good else None
    return pixels, [position for _, position in good], bad


def encode_image_batches(
    model: Any,
    samples: Any,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 256,
    workers: int = 4,
    desc: str = "images",
    max_image_pixels: int | None = None,
) -> EncodedImages:
    """Encode ``samples[indices]`` (default: all) in order; unreadable images are left out and
    reported in :attr:`EncodedImages.bad` (by sample index) with the reason.

    Batches are those of ``indices`` (``[0, b)``, ``[b, 2b)``, ...) less their unreadable images.
    """
    indices = list(range(len(samples))) if indices is None else list(indices)
    device = torch.device(model.device)
    loader = DataLoader(
        _PreprocessedImages(samples, model.preprocess, indices, max_image_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    projected: list[np.ndarray] = []
    pre: list[np.ndarray] = []
    bad: dict[int, str] = {}
    with torch.inference_mode(), model.autocast():
        for pixels, _, bad_here in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
            bad.update({indices[position]: reason for position, reason in bad_here.items()})
            if pixels is None:
                continue
            proj, before = model.encode_images(pixels.to(device, non_blocking=True))
            projected.append(proj.float().cpu().numpy())
            pre.append(before.float().cpu().numpy())
    if not projected:
        return EncodedImages(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), bad)
    return EncodedImages(np.concatenate(projected), np.concatenate(pre), bad)


def _kept_of(cached: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    """The positions a cache entry's rows belong to (entries before ``kept``: all), or None when
    the entry does not fit a split of ``n`` samples."""
    kept = cached.get("kept")
    kept = np.arange(n, dtype=np.int64) if kept is None else np.asarray(kept, dtype=np.int64)
    fits = (len(cached["projected"]) == len(kept) and (len(kept) == 0 or (kept[0] >= 0 and kept[-1] < n))
            and bool(np.all(np.diff(kept) > 0)))
    return kept if fits else None


def bad_images_message(spec_name: str, role: str, samples: Any, bad: dict[int, str]) -> str:
    """The paragraph of a split that fails on its unreadable images."""
    shown = ", ".join(samples.id_of(i) for i in list(bad)[:SHOWN_BAD])
    more = f" and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else ""
    first = next(iter(bad.values()))
    where = f" ({samples.description})" if getattr(samples, "description", "") else ""
    return (f"{spec_name}/{role}: {len(bad)} of {len(samples)} images cannot be read{where}: {shown}{more}. "
            f"First reason: {first}. Repair or remove these files (for a table, its rows), or pass "
            "--on-bad-image skip to leave them out (records then list them).")


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
    on_bad_image: str = "fail",
    max_image_pixels: int | None = None,
) -> ImageFeatures:
    """Image features of one split, from the cache or computed (and cached).

    ``encoder`` replaces :func:`encode_image_batches` (the distributed runner passes a sharded one).
    Unreadable images (``max_image_pixels``: see :func:`pixel_limit`) are handled by
    ``on_bad_image``: ``fail`` raises, ``skip`` leaves them out (see :class:`ImageFeatures`).

    Raises:
        BadImagesError: ``on_bad_image="fail"`` and some images cannot be read (also on a cache
            hit: the entry remembers them).
    """
    import time

    parts = image_cache_key(model, spec, role, samples)
    if max_image_pixels is not None:
        # which images decode depends on the limit; the default adds no key part, so the keys of
        # entries made under Pillow's default limit stay what they were
        parts["max_image_pixels"] = max_image_pixels
    key = FeatureCache.digest(parts)
    kind = getattr(model, "pre_projection_kind", "before_projection")
    # rows: the split's readable images (``kept``), checked against the split by _kept_of
    cached = cache.load("image", key, {"projected": (None, None), "pre_projection": (None, None)})
    kept = _kept_of(cached, len(samples)) if cached is not None else None
    if kept is not None:
        log.info("%s/%s: image features from cache (%s)", spec.name, role, key[:12])
        missing = np.setdiff1d(np.arange(len(samples)), kept)
        reasons = list(cached.get("bad_reasons", ()))
        reasons += ["unreadable (reason not stored)"] * (len(missing) - len(reasons))
        bad = {int(i): str(r) for i, r in zip(missing, reasons)}
        projected, pre, from_cache, seconds = cached["projected"], cached["pre_projection"], True, 0.0
    else:
        start = time.perf_counter()
        encode = encoder or encode_image_batches
        encoded = encode(model, samples, batch_size=batch_size, workers=workers, desc=f"{spec.name}/{role}",
                         max_image_pixels=max_image_pixels)
        seconds = time.perf_counter() - start
        bad = dict(sorted(encoded.bad.items()))
        kept = np.setdiff1d(np.arange(len(samples), dtype=np.int64), np.fromiter(bad, np.int64, len(bad)))
        projected, pre, from_cache = encoded.projected, encoded.pre_projection, False
        # cached under either policy: the readable images' features do not depend on it
        cache.save("image", key, {"projected": projected, "pre_projection": pre, "kept": kept,
                                  "bad_reasons": np.asarray(list(bad.values()), dtype=str)},
                   {**parts, "n": len(kept), "n_split": len(samples), "n_unreadable": len(bad),
                    "seconds": seconds})
    if not bad:
        return ImageFeatures(projected, pre, samples.targets, kind, from_cache, seconds)
    if on_bad_image != "skip" or len(kept) == 0:
        raise BadImagesError(bad_images_message(spec.name, role, samples, bad))
    skipped = [samples.id_of(i) for i in bad]
    log.warning("%s/%s: skipped %d of %d images that cannot be read (--on-bad-image skip): %s%s; first "
                "reason: %s", spec.name, role, len(bad), len(samples), ", ".join(skipped[:SHOWN_BAD]),
                " ..." if len(skipped) > SHOWN_BAD else "", next(iter(bad.values())))
    targets = samples.targets[kept] if samples.targets is not None else None
    return ImageFeatures(projected, pre, targets, kind, from_cache, seconds, kept=kept, skipped=skipped)


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
