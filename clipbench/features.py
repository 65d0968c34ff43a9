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

Chunks: a split larger than one chunk (:class:`ChunkPlan`: the smallest multiple of the batch size
that is at least ``CHUNK_IMAGES`` samples) is encoded chunk by chunk; each chunk is written
atomically to ``<cache>/image/<key[:2]>/<key>.chunks/b<batch>-<start>-<stop>.npz`` as soon as it is
done, so a rerun after a crash or ``kill -9`` encodes only the chunks that are missing. Chunk
boundaries are batch boundaries, so every batch is the one an uninterrupted run encodes and the
result is bit-identical. When every chunk exists they are streamed into the split's ordinary entry
(``<key>.npz``, the format every earlier version wrote) and deleted; peak memory is about one chunk.

Memory mapping: entries are uncompressed ``.npz`` archives whose arrays this module writes 64-byte
aligned inside the archive, so :meth:`FeatureCache.load` maps arrays of ``mmap_min_bytes`` or more
straight from the file (``np.memmap``, copy-on-write) instead of reading them: ImageNet-train's
1,281,167 x (768 + 512) float32 features (6.56 GB) are held once, in the page cache. Entries of
earlier versions (unaligned members) are still read, into memory, as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import struct
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from clipbench.atomic import atomic_open
from clipbench.config import RunConfig
from clipbench.errors import ClipbenchError

log = logging.getLogger(__name__)

#: Bumped whenever the stored arrays' meaning or layout changes; part of every cache key.
FEATURE_FORMAT_VERSION = 1
#: Samples per chunk of a split's extraction, rounded up to whole batches (see :class:`ChunkPlan`):
#: at most this much work is redone after a crash, and about this many rows are held in memory.
CHUNK_IMAGES = 50_000
#: Arrays of a cache entry this large or larger are memory-mapped on load; smaller ones are read
#: (each map holds a file descriptor, so the many small arrays are not mapped).
MMAP_MIN_BYTES = 1 << 20
#: ``text_context`` values (:class:`~clipbench.models.base.ImageTextModel`) of text batches as long
#: as their longest prompt: open_clip's trimmed context, Hugging Face's ``longest`` padding. Their
#: prompts are encoded in order of length, so that a batch holds prompts of about one length
#: (ViT-S-32-alt, 16,000 prompts, 256 per batch, 2 CPU cores: 591 prompts/s, 485 in class order).
LENGTH_ADAPTIVE_CONTEXTS = ("trimmed", "longest")
#: ``--decode``: how images become model input (clipbench/decode.py)
DEFAULT_DECODE = RunConfig.default("decode")
#: Alignment of array data inside the archives written here (numpy's own .npy data alignment).
_ALIGN = 64
#: Zip extra-field id of the padding that aligns a member's data (Android's zipalign uses it;
#: zip readers skip extra fields they do not know).
_PAD_FIELD = 0xD935


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
    seconds: the encoding time to charge to this model (several models sharing one pass each get
        their part, see :func:`encode_shared_batches`); None: the caller's wall time.
    """

    projected: np.ndarray
    pre_projection: np.ndarray
    bad: dict[int, str] = field(default_factory=dict)
    seconds: float | None = None


class BadImagesError(ClipbenchError):
    """A split has images that cannot be read and the run's policy is ``--on-bad-image fail``."""


#: how many bad samples a message or a log line names
SHOWN_BAD = 10


class FeatureCache:
    """A directory of ``<key>.npz`` files plus ``<key>.json`` metadata, written atomically.

    ``mmap_min_bytes``: arrays of loaded entries at least this large are memory-mapped.
    """

    def __init__(self, root: Path | None, *, mmap_min_bytes: int = MMAP_MIN_BYTES):
        self.root = Path(root) if root is not None else None
        self.mmap_min_bytes = mmap_min_bytes

    @staticmethod
    def digest(parts: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _path(self, kind: str, key: str) -> Path:
        assert self.root is not None
        return self.root / kind / key[:2] / f"{key}.npz"

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry is stored under ``key`` (not whether it is valid: :meth:`load` checks)."""
        return self.root is not None and self._path(kind, key).is_file()

    def chunk_dir(self, kind: str, key: str) -> Path:
        """Where the chunks of an entry being extracted live until it is assembled."""
        return self._path(kind, key).with_suffix(".chunks")

    def load(self, kind: str, key: str,
             expected: Mapping[str, tuple[int | None, ...]] | None = None) -> dict[str, np.ndarray] | None:
        """The arrays of an entry (large ones memory-mapped), or None when it is absent or unusable.

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
        arrays, problem = read_arrays(path, self.mmap_min_bytes)
        if arrays is not None:
            problem = _entry_problem(arrays, expected or {}, path.with_suffix(".json"))
            if problem is None:
                return arrays
        log.warning("ignoring cache entry %s (%s); recomputing it", path, problem)
        return None

    def save(self, kind: str, key: str, arrays: Mapping[str, np.ndarray | Rows], meta: dict[str, Any]) -> None:
        """Write an entry: ``arrays`` are arrays, or :class:`Rows` streamed from several blocks."""
        if self.root is None:
            return
        path = self._path(kind, key)
        # metadata first: an entry's arrays never exist without it (a kill in between leaves
        # only the small .json, which the next save of the entry overwrites)
        with atomic_open(path.with_suffix(".json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True, default=str)
        with atomic_open(path, "wb") as f:
            write_arrays(f, arrays)


@dataclass
class Rows:
    """An array written from blocks without being held whole: ``blocks()`` yields C-ordered
    pieces of dtype ``dtype`` whose concatenation along axis 0 has shape ``shape``."""

    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[np.ndarray]]


def write_arrays(f: IO[bytes], arrays: Mapping[str, np.ndarray | Rows]) -> None:
    """Write ``arrays`` to the seekable binary file ``f`` as an uncompressed ``.npz`` that
    ``np.load`` reads, with every array's data 64-byte aligned in the file (so it can be mapped)."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            rows = array if isinstance(array, Rows) else Rows(np.asarray(array).dtype, np.asarray(array).shape,
                                                               lambda a=array: [a])
            if rows.dtype.hasobject:
                raise TypeError(f"array {name!r} holds Python objects; cache entries hold plain arrays only")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {
                "descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False, "shape": rows.shape})
            # local header: 30 fixed bytes, the name, this padding field, then force_zip64's 20 bytes;
            # the .npy header is a multiple of 64 long, so the data lands aligned too
            before = f.tell() + 30 + len(info.filename.encode()) + 4 + 20 + len(header.getvalue())
            pad = -before % _ALIGN
            info.extra = struct.pack("<HH", _PAD_FIELD, pad) + bytes(pad)
            written = 0
            with archive.open(info, "w", force_zip64=True) as out:
                out.write(header.getvalue())
                for block in rows.blocks():
                    block = np.ascontiguousarray(block, dtype=rows.dtype)
                    written += block.size
                    out.write(block.data.cast("B") if block.size else b"")
            if written != int(np.prod(rows.shape)):
                raise ValueError(f"array {name!r}: its blocks hold {written} values, its shape {rows.shape} "
                                 f"{int(np.prod(rows.shape))}")


def read_arrays(path: Path, mmap_min_bytes: int = MMAP_MIN_BYTES) -> tuple[dict[str, np.ndarray] | None, str]:
    """The arrays of the ``.npz`` at ``path`` (those of ``mmap_min_bytes`` or more whose data is
    aligned in the file memory-mapped copy-on-write, the others read), or (None, why unreadable).

    A mapped array reads the file as it is when touched: the cache replaces entries atomically (a
    new file), never in place, so a mapped entry never changes under its reader."""
    try:
        arrays = {}
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    arrays[info.filename[:-4]] = _member(archive, raw, info, path, mmap_min_bytes)
        return arrays, ""
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return None, f"unreadable: {type(exc).__name__}: {exc}" if str(exc) else f"unreadable ({type(exc).__name__})"


def _member(archive: zipfile.ZipFile, raw: IO[bytes], info: zipfile.ZipInfo, path: Path,
            mmap_min_bytes: int) -> np.ndarray:
    """One array of an archive: mapped when it is stored uncompressed, large and aligned."""
    if info.compress_type == zipfile.ZIP_STORED and info.file_size >= max(mmap_min_bytes, 1):
        raw.seek(info.header_offset)
        local = raw.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"member {info.filename} has no local header")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        raw.seek(start)
        version = np.lib.format.read_magic(raw)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(raw)
        offset, nbytes = raw.tell(), int(np.prod(shape)) * dtype.itemsize
        if offset + nbytes > start + info.file_size:
            raise ValueError(f"member {info.filename} is shorter than its shape {shape}")
        if not dtype.hasobject and nbytes and offset % dtype.alignment == 0:
            return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape,
                             order="F" if fortran else "C")
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


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


def image_cache_key(model: Any, spec: Any, role: str, samples: Any,
                    max_image_pixels: int | None = None, decode: str = DEFAULT_DECODE) -> dict[str, Any]:
    """Everything that changes a split's image features (:meth:`FeatureCache.digest` of it is the
    entry's key)."""
    parts = {
        "format": FEATURE_FORMAT_VERSION,
        **model.identity(),
        "preprocess": repr(model.preprocess),
        "dataset": spec.name,
        "spec": spec.data_digest(),
        "split": role,
        "split_value": spec.split(role),
        # a spec with several languages keys its images without the captions, which are the
        # language's: every language shares one encoding of the images
        "content": samples.content_digest(captions=not getattr(spec, "languages", None)),
    }
    if max_image_pixels is not None:
        # which images decode depends on the limit; the default adds no key part, so the keys of
        # entries made under Pillow's default limit stay what they were
        parts["max_image_pixels"] = max_image_pixels
    if decode != DEFAULT_DECODE:
        # another decoder gives other pixels (clipbench/decode.py); likewise only off the default
        parts["decode"] = decode
    return parts


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
    # default_collate stacks into shared memory in a DataLoader worker: the batch then reaches the
    # main process as it is, not copied once more into shared memory when the queue pickles it
    pixels = default_collate([p for p, _ in good]) if good else None
    return pixels, [position for _, position in good], bad


def die_with_parent(parent: int, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: on Linux, the kernel kills this worker when the process that
    started it dies (``PR_SET_PDEATHSIG``), however it dies. torch's own check only runs between
    batches and can miss a parent killed while a worker waits on a full result queue."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux/glibc: torch's own parent check remains
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def batch_loader(decoder: Any, samples: Any, indices: Sequence[int], *, batch_size: int, workers: int,
                 max_image_pixels: int | None, device: torch.device) -> DataLoader:
    """The DataLoader of ``decoder``'s (a :class:`clipbench.decode.Decoder`) batches of
    ``samples[indices]`` in order, for a model on ``device``: what the encoders iterate (and
    ``benchmarks/feature_throughput.py`` times without a model)."""
    return DataLoader(
        decoder.dataset(samples, indices, max_image_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=decoder.collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()),
    )


def encode_image_batches(
    model: Any,
    samples: Any,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 256,
    workers: int = 4,
    desc: str = "images",
    max_image_pixels: int | None = None,
    decode: str = DEFAULT_DECODE,
) -> EncodedImages:
    """Encode ``samples[indices]`` (default: all) in order; unreadable images are left out and
    reported in :attr:`EncodedImages.bad` (by sample index) with the reason.

    Batches are those of ``indices`` (``[0, b)``, ``[b, 2b)``, ...) less their unreadable images.
    """
    return encode_shared_batches([model], samples, indices=indices, batch_size=batch_size, workers=workers,
                                 desc=desc, max_image_pixels=max_image_pixels, decode=decode)[0]


def encode_shared_batches(
    models: Sequence[Any],
    samples: Any,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 256,
    workers: int = 4,
    desc: str = "images",
    max_image_pixels: int | None = None,
    decode: str = DEFAULT_DECODE,
) -> list[EncodedImages]:
    """:func:`encode_image_batches` for several models on one device with the same preprocessing:
    each image is read and transformed once (with ``models[0].preprocess``) and every batch goes
    through every model, so each model gets exactly the rows (and batches) it gets alone.

    :attr:`EncodedImages.seconds` of each: its own forward passes plus an equal share of the
    reading, decoding and transforming (the time spent waiting for batches, and ``decode``'s work
    on the device: :mod:`clipbench.decode`).
    """
    from clipbench.decode import decoder_for

    indices = list(range(len(samples))) if indices is None else list(indices)
    device = torch.device(models[0].device)
    decoder = decoder_for(decode, models[0])
    loader = batch_loader(decoder, samples, indices, batch_size=batch_size, workers=workers,
                          max_image_pixels=max_image_pixels, device=device)
    projected: list[list[np.ndarray]] = [[] for _ in models]
    pre: list[list[np.ndarray]] = [[] for _ in models]
    forward = [0.0] * len(models)
    bad: dict[int, str] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
            pixels, _, bad_here = decoder.pixels(batch, device)
            bad.update({indices[position]: reason for position, reason in bad_here.items()})
            if pixels is None:
                continue
            for i, model in enumerate(models):
                began = time.perf_counter()
                with model.autocast():
                    proj, before = model.encode_images(pixels)
                projected[i].append(proj.float().cpu().numpy())  # the copy to the host waits for the device
                pre[i].append(before.float().cpu().numpy())
                forward[i] += time.perf_counter() - began
    reading = (time.perf_counter() - start - sum(forward)) / len(models)
    out = []
    for i in range(len(models)):
        if projected[i]:
            arrays = np.concatenate(projected[i]), np.concatenate(pre[i])
        else:
            arrays = np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        out.append(EncodedImages(*arrays, dict(bad), seconds=forward[i] + reading))
    return out


def _kept_of(cached: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    """The positions a cache entry's rows belong to (entries before ``kept``: all), or None when
    the entry does not fit a split of ``n`` samples."""
    kept = cached.get("kept")
    kept = np.arange(n, dtype=np.int64) if kept is None else np.asarray(kept, dtype=np.int64)
    fits = (len(cached["projected"]) == len(kept) and (len(kept) == 0 or (kept[0] >= 0 and kept[-1] < n))
            and bool(np.all(np.diff(kept) > 0)))
    return kept if fits else None


@dataclass(frozen=True)
class ChunkPlan:
    """How a split of ``n`` samples is cut into chunks: ``size`` is the smallest multiple of
    ``batch_size`` that is at least ``chunk_images``, so chunk boundaries are batch boundaries."""

    n: int
    batch_size: int
    chunk_images: int = CHUNK_IMAGES

    @property
    def size(self) -> int:
        return self.batch_size * -(-max(self.chunk_images, 1) // self.batch_size)

    def ranges(self) -> list[range]:
        return [range(start, min(start + self.size, self.n)) for start in range(0, self.n, self.size)]

    def name(self, chunk: range) -> str:
        """A chunk's file name; it names the batch size and the bounds, so chunks cut another way
        (another ``--batch-size`` or chunk size) are never taken for this plan's."""
        return f"b{self.batch_size}-{chunk.start}-{chunk.stop}.npz"


def _chunk_problem(arrays: dict[str, np.ndarray], chunk: range) -> str | None:
    """What makes a readable chunk file unusable for ``chunk``, or None."""
    names = ("projected", "pre_projection", "kept", "bad_index", "bad_reasons")
    if any(name not in arrays for name in names):
        return f"it holds {sorted(arrays)}, not {list(names)}"
    projected, pre, kept, bad = (arrays[name] for name in names[:4])
    if projected.dtype != np.float32 or pre.dtype != np.float32 or projected.ndim != 2 or pre.ndim != 2:
        return "its features are not 2-D float32"
    if not len(projected) == len(pre) == len(kept) or len(bad) != len(arrays["bad_reasons"]):
        return "its arrays disagree on the row count"
    if sorted(np.concatenate([kept, bad]).tolist()) != list(chunk) or np.any(np.diff(kept) <= 0):
        return f"its rows are not those of samples {chunk.start}..{chunk.stop - 1}"
    return None


def write_chunk(path: Path, chunk: range, encoded: EncodedImages) -> None:
    """Write the features of the samples ``chunk`` to the chunk file ``path``, atomically."""
    bad = dict(sorted(encoded.bad.items()))
    kept = np.setdiff1d(np.arange(chunk.start, chunk.stop, dtype=np.int64), np.fromiter(bad, np.int64, len(bad)))
    if len(encoded.projected) != len(kept):
        raise ValueError(f"the encoder returned {len(encoded.projected)} rows for the {len(kept)} readable "
                         f"samples {chunk.start}..{chunk.stop - 1}")
    with atomic_open(path, "wb") as f:
        write_arrays(f, {"projected": encoded.projected, "pre_projection": encoded.pre_projection,
                         "kept": kept, "bad_index": np.fromiter(bad, np.int64, len(bad)),
                         "bad_reasons": np.asarray(list(bad.values()), dtype=str)})


def _encode_in_chunks(cache: FeatureCache, key: str, plan: ChunkPlan, encode: Callable[..., EncodedImages],
                      desc: str) -> tuple[dict[str, Rows | np.ndarray], dict[int, str]]:
    """Encode the chunks of ``plan`` not yet on disk (``encode(indices=, desc=)``), each written
    atomically when done; then the entry's arrays (streamed from the chunk files) and every
    unreadable sample's reason."""
    folder = cache.chunk_dir("image", key)
    chunks = plan.ranges()
    files = [folder / plan.name(chunk) for chunk in chunks]
    done = sum(path.is_file() for path in files)
    if done:
        log.info("resuming %s: %d of %d chunks of %d images on disk", desc, done, len(chunks), plan.size)
    for chunk, path in zip(chunks, files):
        if path.is_file():
            arrays, problem = read_arrays(path, cache.mmap_min_bytes)
            problem = problem if arrays is None else _chunk_problem(arrays, chunk)
            if problem is None:
                continue
            log.warning("ignoring chunk %s (%s); encoding it again", path, problem)
        write_chunk(path, chunk, encode(indices=chunk, desc=f"{desc} {chunk.start}:{chunk.stop}"))
    # every chunk is on disk and valid: the entry's arrays, streamed from the mapped chunk files
    parts = [read_arrays(path, 0)[0] for path in files]
    assert all(part is not None for part in parts)
    kept = np.concatenate([part["kept"] for part in parts])
    bad = {int(i): str(r) for part in parts for i, r in zip(part["bad_index"], part["bad_reasons"])}
    arrays: dict[str, Rows | np.ndarray] = {"kept": kept, "bad_reasons": np.asarray(list(bad.values()), dtype=str)}
    for name in ("projected", "pre_projection"):
        dim = max(part[name].shape[1] for part in parts)
        arrays[name] = Rows(np.dtype(np.float32), (len(kept), dim),
                            lambda name=name: (part[name] for part in parts if len(part[name])))
    return arrays, bad


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
    chunk_images: int = CHUNK_IMAGES,
    decode: str = DEFAULT_DECODE,
) -> ImageFeatures:
    """Image features of one split, from the cache or computed (and cached).

    ``encoder`` replaces :func:`encode_image_batches` (the distributed runner passes a sharded one).
    Unreadable images (``max_image_pixels``: see :func:`pixel_limit`) are handled by
    ``on_bad_image``: ``fail`` raises, ``skip`` leaves them out (see :class:`ImageFeatures`).
    A split of more than one chunk (:class:`ChunkPlan` of ``chunk_images``) is encoded chunk by
    chunk, resuming at the chunks a killed run left undone; ``encoder`` is then called with
    ``indices=range(start, stop)`` per chunk. Features of a chunked split are memory-mapped.
    ``decode`` names the :mod:`clipbench.decode` decoder (a cache-key part off the default).

    Raises:
        BadImagesError: ``on_bad_image="fail"`` and some images cannot be read (also on a cache
            hit: the entry remembers them).
    """
    parts = image_cache_key(model, spec, role, samples, max_image_pixels, decode)
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
        base = functools.partial(encoder or encode_image_batches, model, samples, batch_size=batch_size,
                                 workers=workers, max_image_pixels=max_image_pixels, decode=decode)
        overcharged: list[float] = []  # per encoder call: its wall time less what it charges this model

        def encode(**kwargs: Any) -> EncodedImages:
            began = time.perf_counter()
            encoded = base(**kwargs)
            wall = time.perf_counter() - began
            overcharged.append(wall - (wall if encoded.seconds is None else encoded.seconds))
            return encoded

        desc = f"{spec.name}/{role}"
        plan = ChunkPlan(len(samples), batch_size, chunk_images)
        meta = {**parts, "n_split": len(samples)}
        if cache.root is None or len(samples) <= plan.size:
            encoded = encode(desc=desc)
            seconds = time.perf_counter() - start - sum(overcharged)
            bad = dict(sorted(encoded.bad.items()))
            kept = np.setdiff1d(np.arange(len(samples), dtype=np.int64), np.fromiter(bad, np.int64, len(bad)))
            projected, pre = encoded.projected, encoded.pre_projection
            # cached under either policy: the readable images' features do not depend on it
            cache.save("image", key, {"projected": projected, "pre_projection": pre, "kept": kept,
                                      "bad_reasons": np.asarray(list(bad.values()), dtype=str)},
                       {**meta, "n": len(kept), "n_unreadable": len(bad), "seconds": seconds})
        else:
            arrays, bad = _encode_in_chunks(cache, key, plan, encode, desc=desc)
            seconds = time.perf_counter() - start - sum(overcharged)
            cache.save("image", key, arrays, {**meta, "n": len(arrays["kept"]), "n_unreadable": len(bad),
                                              "chunk_images": plan.size, "seconds": seconds})
            shutil.rmtree(cache.chunk_dir("image", key), ignore_errors=True)
            stored = cache.load("image", key, {"projected": (None, None), "pre_projection": (None, None)})
            if stored is None:
                raise ClipbenchError(f"{desc}: the features just written to {cache.root} cannot be read back; "
                                     "check the disk (space, errors) and rerun.")
            kept, projected, pre = stored["kept"], stored["projected"], stored["pre_projection"]
        from_cache = False
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


def text_context(model: Any) -> str | None:
    """The model's ``text_context``; None (fixed-length batches) for a backend that does not say."""
    return getattr(model, "text_context", None)


def text_features(
    model: Any, texts: Sequence[str], cache: FeatureCache, *, batch_size: int = 1024
) -> np.ndarray:
    """L2-normalized text embeddings (T, D) float32 in the order of ``texts``, encoded many prompts
    per batch, cached.

    Prompts of all classes go through the text tower together (e.g. 1,000 classes x 80 templates in
    batches of ``batch_size``), rather than one class per batch; in order of length (characters,
    ties in their given order) where batches are as long as their longest prompt
    (:data:`LENGTH_ADAPTIVE_CONTEXTS`).
    """
    texts = list(texts)
    parts = {
        "format": FEATURE_FORMAT_VERSION,
        **model.identity(),
        "texts": hashlib.sha256("\x1e".join(texts).encode()).hexdigest(),
        "n": len(texts),
        # a batch's shape can change the last bits of its rows (CPU kernels block by batch size)
        "batch_size": batch_size,
    }
    context = text_context(model)
    by_length = context in LENGTH_ADAPTIVE_CONTEXTS
    if by_length:
        # likewise its length and which prompts share it; keys of fixed-length batches, encoded in
        # the given order as before, stay as they were
        parts["text_context"] = context
        parts["order"] = "length"
    key = FeatureCache.digest(parts)
    cached = cache.load("text", key, {"features": (len(texts), None)})
    if cached is not None:
        return cached["features"]
    order = np.argsort([len(t) for t in texts], kind="stable") if by_length else np.arange(len(texts))
    chunks = []
    with torch.inference_mode(), model.autocast():
        for start in tqdm(range(0, len(texts), batch_size), desc="texts", unit="batch", leave=False,
                          disable=None):
            batch = [texts[i] for i in order[start:start + batch_size]]
            chunks.append(model.encode_texts(batch).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, 0), np.float32)
    encoded = np.concatenate(chunks)
    features = np.empty_like(encoded)
    features[order] = encoded
    cache.save("text", key, {"features": features}, parts)
    return features
