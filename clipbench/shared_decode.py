"""Decode once, encode with several models: one pass over a split's images feeds every model of a
group that shares the same preprocessing.

Reading, decoding and transforming images is most of the cost of a small model's features on CPU
and of any model's on a GPU fed by a few cores. When consecutive models of a run preprocess images
identically (the same ``repr(model.preprocess)``, which is also part of every image cache key),
:func:`clipbench.pipeline.run` keeps them loaded together and gives each model's evaluator the
encoder of one :class:`SharedDecoder`. The first model of the group that asks for a split's
features gets one DataLoader pass whose batches go through every model that still needs the split
(:func:`clipbench.features.encode_shared_batches`); the others' features are held until they ask
(for a split of one chunk) or written straight to their chunk files in the feature cache (a
chunked split), so memory stays bounded by one chunk per model. Each model sees exactly the batches
it sees alone, so its features, cache entries and records are bit-identical to a separate run.

Models are kept together only while the device has room: another model joins a group when the
device's free memory less the size of the group's largest model stays at least
:data:`SHARED_RESERVE` of its total (for activations and features); otherwise the group is
evaluated and released first. Under ``torchrun`` models run one at a time (ranks shard the splits).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from clipbench.features import (
    DEFAULT_DECODE,
    ChunkPlan,
    EncodedImages,
    FeatureCache,
    encode_shared_batches,
    image_cache_key,
    write_chunk,
)

log = logging.getLogger(__name__)

#: the fraction of the device's memory that must stay free after another model joins a group
SHARED_RESERVE = 0.25


def same_preprocessing(a: Any, b: Any) -> bool:
    """Whether models ``a`` and ``b`` run on one device and turn an image into the same pixels."""
    return str(a.device) == str(b.device) and repr(a.preprocess) == repr(b.preprocess)


def model_bytes(model: Any) -> int:
    """Bytes of the parameters and buffers of the torch modules a loaded model holds."""
    modules = {id(v): v for v in vars(model).values() if isinstance(v, torch.nn.Module)}
    tensors = {id(t): t for m in modules.values() for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def device_memory(device: str) -> tuple[int, int] | None:
    """(free, total) bytes of ``device`` (host memory for ``cpu``), or None when unknown."""
    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), int(total)
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def room_for_another(free: int, total: int, largest: int, reserve: float = SHARED_RESERVE) -> bool:
    """Whether a model of ``largest`` bytes fits in ``free`` of ``total`` bytes, leaving
    ``reserve`` of ``total`` free."""
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1), got {reserve}")
    return free - largest >= reserve * total


class SharedDecoder:
    """The image encoders of a group of models with the same preprocessing, on one device.

    ``wanted`` (:meth:`start_dataset`): for each model index, the split roles of the current
    dataset it will encode (those of its tasks without a reusable record); only those models are
    fed in a shared pass, and each model's leftovers are dropped when the next dataset starts.
    """

    def __init__(self, models: Sequence[Any], cache: FeatureCache):
        self.models = list(models)
        self.cache = cache
        self._wanted: dict[int, set[str]] = {}
        self._held: dict[tuple[int, tuple], EncodedImages] = {}
        self._keys: dict[tuple, str] = {}

    def start_dataset(self, wanted: Mapping[int, Collection[str]]) -> None:
        self._wanted = {index: set(roles) for index, roles in wanted.items()}
        self._held = {}
        self._keys = {}

    def finished(self, index: int) -> None:
        """Model ``index`` has run its tasks on the current dataset: it is fed nothing more."""
        self._wanted.pop(index, None)
        self._held = {k: v for k, v in self._held.items() if k[0] != index}

    def encoder(self, index: int) -> Callable[..., EncodedImages]:
        """The ``encoder`` of model ``index``'s :class:`~clipbench.pipeline.Evaluator`."""
        return functools.partial(self._encode, index)

    def _needs(self, j: int, spec: Any, role: str, samples: Any, request: tuple, batch_size: int,
               max_image_pixels: int | None, chunk: range | None, decode: str) -> bool:
        """Whether model ``j`` will ask for what ``request`` names and has it neither held nor on disk."""
        if role not in self._wanted.get(j, ()) or (j, request) in self._held:
            return False
        key = self._key(j, spec, role, samples, max_image_pixels, decode)
        if self.cache.has("image", key):
            return False
        return chunk is None or not self._chunk_path(key, len(samples), batch_size, chunk).is_file()

    def _key(self, j: int, spec: Any, role: str, samples: Any, max_image_pixels: int | None, decode: str) -> str:
        """Model ``j``'s image cache key of the split, computed once per dataset (digesting a
        split's listing is not free, and a chunked split asks once per chunk)."""
        memo = (j, spec.name, role, max_image_pixels, decode)
        if memo not in self._keys:
            self._keys[memo] = FeatureCache.digest(
                image_cache_key(self.models[j], spec, role, samples, max_image_pixels, decode))
        return self._keys[memo]

    def _chunk_path(self, key: str, n: int, batch_size: int, chunk: range) -> Path:
        return self.cache.chunk_dir("image", key) / ChunkPlan(n, batch_size).name(chunk)

    def _encode(self, index: int, model: Any, samples: Any, *, spec: Any, role: str, batch_size: int,
                workers: int, desc: str, max_image_pixels: int | None = None,
                indices: range | None = None, decode: str = DEFAULT_DECODE) -> EncodedImages:
        request = (spec.name, role, None if indices is None else (indices.start, indices.stop))
        held = self._held.pop((index, request), None)
        if held is not None:
            return held
        partners = [j for j in range(len(self.models)) if j != index
                    and self._needs(j, spec, role, samples, request, batch_size, max_image_pixels, indices, decode)]
        if partners:
            log.info("%s: decoding once for %d models", desc, 1 + len(partners))
        encoded = encode_shared_batches([model, *(self.models[j] for j in partners)], samples, indices=indices,
                                        batch_size=batch_size, workers=workers, desc=desc,
                                        max_image_pixels=max_image_pixels, decode=decode)
        for j, theirs in zip(partners, encoded[1:]):
            if indices is None:
                self._held[(j, request)] = theirs
            else:  # a chunk of a large split: on disk at once, where their own run looks for it
                key = self._key(j, spec, role, samples, max_image_pixels, decode)
                write_chunk(self._chunk_path(key, len(samples), batch_size, indices), indices, theirs)
        return encoded[0]
