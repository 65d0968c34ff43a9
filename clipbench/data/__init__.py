"""Storage formats: turn a dataset spec and a split role into :class:`Samples`.

One :class:`SourceFormat` per ``source.type``, each in its own module and registered with
:func:`register_format` (see docs/architecture.md). Data is looked up under the data root first; a
download happens only when the spec's source allows it, the caller allows it and the network
answers — otherwise the user gets one message saying what is missing, where clipbench looked and
how to provide it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipbench.data.base import FileStats, Samples
from clipbench.data.formats import (
    DataStatus,
    NoOptions,
    Prompts,
    SourceFormat,
    get_format,
    known_types,
    parse_options,
    register_format,
    unregister_format,
)
from clipbench.errors import ClipbenchError

# The built-in formats register themselves on import.
from clipbench.data import (  # noqa: E402,F401  isort: skip
    aligned_captions, huggingface, imagefolder, jsonl_captions, synthetic, table, torchvision_adapter, video, webdataset,
)

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec

log = logging.getLogger(__name__)

__all__ = [
    "DataStatus", "FileStats", "NoOptions", "Samples", "SourceFormat", "data_status", "get_format", "known_types",
    "load_split", "local_dir", "parse_options", "register_format", "source_prompts", "unregister_format",
]


def local_dir(spec: "DatasetSpec", data_root: Path) -> Path | None:
    """The first existing local directory for the spec's data, or None."""
    return get_format(spec.source.type).locate(spec, Path(data_root))


def data_status(spec: "DatasetSpec", data_root: Path) -> DataStatus:
    return get_format(spec.source.type).status(spec, Path(data_root))


def source_prompts(spec: "DatasetSpec", data_root: Path) -> Prompts:
    """Classnames, templates and their origin as the data itself carries them (each None if not)."""
    return get_format(spec.source.type).prompts(spec, Path(data_root))


def load_split(
    spec: "DatasetSpec",
    role: str,
    data_root: Path,
    cache_dir: Path,
    allow_download: bool = True,
) -> Samples:
    """Load the split playing ``role`` (``train``/``val``/``test``) of a dataset.

    Raises:
        ClipbenchError: the spec has no such split, or the data is missing and cannot be fetched.
    """
    if spec.split(role) is None:
        raise ClipbenchError(f"Dataset '{spec.name}' has no '{role}' split in its spec ({spec.file}).")
    fmt = get_format(spec.source.type)
    samples = fmt.load(spec, role, Path(data_root), Path(cache_dir), allow_download)
    _refuse_empty_captions(spec, role, samples)
    return _subsample(spec, role, samples)


#: spec tasks whose caption-set images each carry one text, a caption or a negative (association:
#: the cue), rather than both
_ONE_TEXT_PER_IMAGE = ("association",)


def _refuse_empty_captions(spec: "DatasetSpec", role: str, samples: Samples) -> None:
    """An empty (or blank) caption would be scored as a retrieval query, and an image without one
    can never be retrieved; an image of caption-set data without a negative cannot be scored
    (association data: an image without its one text). Whatever the format, such data is refused."""
    either = samples.negatives is not None and any(t in _ONE_TEXT_PER_IMAGE for t in spec.tasks)
    for texts, kind in ((samples.captions, "caption"), (samples.negatives, "negative caption")):
        if texts is None:
            continue
        other = samples.negatives if kind == "caption" else samples.captions
        bad = [i for i, items in enumerate(texts) if (not items and not (either and other[i]))
               or any(not c.strip() for c in items)]
        if not bad:
            continue
        ids = ", ".join(samples.id_of(i) for i in bad[:10])
        raise ClipbenchError(
            f"{spec.name}/{role}: {len(bad)} image(s) have an empty {kind} or none ({samples.description}): "
            f"{ids}{' ...' if len(bad) > 10 else ''}. An empty {kind} would be scored as a text of the "
            f"image; fill in or remove those {kind}s (or the images' rows)."
        )


def _subsample(spec: "DatasetSpec", role: str, samples: Samples) -> Samples:
    if not spec.subsample or role not in spec.subsample:
        return samples
    count = spec.subsample[role]
    if count >= len(samples):
        return samples
    rng = np.random.default_rng(spec.subsample.get("seed", 0))
    chosen = np.sort(rng.permutation(len(samples))[:count])
    log.info("%s/%s: using a seeded random subset of %d of %d samples", spec.name, role, count, len(samples))
    return samples.subset(chosen)
