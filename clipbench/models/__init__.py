"""Loading image-text models: a registry of backends behind one :func:`load_model`.

A backend is chosen by the model name's prefix: ``open_clip:ViT-B-32`` or plain ``ViT-B-32``
(open_clip, the default), ``hf-hub:org/repo`` (open_clip's own hub ids), ``hf:org/repo`` or
``hf:/path/to/folder`` (Hugging Face transformers, :mod:`.hf_backend`), ``timm:resnet50.a1_in1k``
and ``torchvision:resnet50`` (image-only supervised backbones). A backend is a module
whose loader returns an :class:`~clipbench.models.base.ImageTextModel`, plus one
:func:`register_backend` line below; loaders import optional dependencies themselves, so that
registering costs nothing.

Modules: :mod:`.base` (the contract, precision/device/autocast helpers), :mod:`.openclip_names`
(aliases, name and tag resolution, QuickGELU policy), :mod:`.weights` (checkpoint files,
digests, hub cache, offline guard), :mod:`.openclip_backend` (building and encoding),
:mod:`.hf_backend` (transformers models; imports transformers only when one is loaded);
:mod:`.backbone` (the image-only model both :mod:`.timm_backend` and :mod:`.torchvision_backend` return).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Protocol

from clipbench.errors import ClipbenchError
from clipbench.models.base import PRECISIONS, ImageTextModel, check_precision, resolve_device
from clipbench.models.hf_backend import NAMING_HELP as HF_NAMING
from clipbench.models.hf_backend import PREFIX as PREFIX_HF
from clipbench.models.hf_backend import load_hf
from clipbench.models.openclip_backend import OpenClipModel, load_openclip
from clipbench.models.openclip_names import (
    LOCAL_PRETRAINED,
    MODEL_CONFIG_DIR,
    OPENAI_ALIASES,
    ModelRow,
    ModelSource,
    list_models,
    model_table,
    register_model_configs,
    resolve_model,
)
from clipbench.models.timm_backend import load_timm
from clipbench.models.torchvision_backend import load_torchvision
from clipbench.models.weights import file_sha256
from clipbench.paths import OFFLINE_ENV_VARS, default_cache_dir

#: The open_clip model class under the name it had before backends existed.
ClipModel = OpenClipModel

#: Backend of a name without a registered prefix.
DEFAULT_BACKEND = "open_clip"


class LoadFn(Protocol):
    """A backend's loader. ``name`` arrives without the backend prefix (unless the backend keeps
    it), ``device`` resolved (``cuda``, ``cpu``, ``cuda:N``), ``precision`` checked, ``cache_dir``
    a directory. Backend-specific keyword options follow."""

    def __call__(self, name: str, pretrained: str | None, *, device: str, precision: str,
                 cache_dir: Path, allow_download: bool, **options: Any) -> ImageTextModel: ...


@dataclasses.dataclass(frozen=True)
class Backend:
    """One registry entry: ``prefix`` selects ``load``; ``keep_prefix`` hands the full name
    (``hf-hub:org/repo``) to a loader whose own names carry the prefix."""

    prefix: str
    load: LoadFn
    keep_prefix: bool = False
    naming: str = ""


_BACKENDS: dict[str, Backend] = {}


def register_backend(prefix: str, load: LoadFn, *, keep_prefix: bool = False, naming: str = "") -> None:
    """Make ``<prefix>:<name>`` load through ``load``; ``naming`` is the one line `clipbench
    models` shows on how to name a model of this backend. Raises ValueError for a taken prefix."""
    if prefix in _BACKENDS:
        raise ValueError(f"model backend prefix {prefix!r} is already registered")
    _BACKENDS[prefix] = Backend(prefix, load, keep_prefix, naming)


def backend_names() -> list[str]:
    """The registered prefixes, default first."""
    return sorted(_BACKENDS, key=lambda p: (p != DEFAULT_BACKEND, p))


def backends() -> list[Backend]:
    """The registered backends, default first."""
    return [_BACKENDS[prefix] for prefix in backend_names()]


def select_backend(name: str) -> tuple[Backend, str]:
    """(backend, name as its loader takes it) for a user-given model name.

    Raises:
        ClipbenchError: ``prefix:`` names no registered backend.
    """
    prefix, sep, rest = name.partition(":")
    if not sep:
        return _BACKENDS[DEFAULT_BACKEND], name
    if prefix not in _BACKENDS:
        close = difflib.get_close_matches(prefix, list(_BACKENDS), n=3)
        hint = f" Did you mean {', '.join(p + ':' for p in close)}?" if close else ""
        raise ClipbenchError(
            f"Unknown model backend {prefix!r} in --model {name!r}.{hint} Prefix the model name "
            f"with one of {', '.join(p + ':' for p in backend_names())}, or give no prefix for "
            f"{DEFAULT_BACKEND} (`clipbench models` lists its names)."
        )
    backend = _BACKENDS[prefix]
    return backend, name if backend.keep_prefix else rest


def load_model(
    name: str,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "amp",
    cache_dir: Path | None = None,
    *,
    allow_download: bool = True,
    **options: Any,
) -> ImageTextModel:
    """Load a model for evaluation (eval mode, on ``device``, in ``precision``).

    Args:
        name: ``[prefix:]name``; the prefix picks the backend (see the module docstring).
        pretrained: the backend's weights choice (open_clip: a tag, a checkpoint path, an
            ``hf-hub:`` id, ``'none'``; see :mod:`clipbench.models.openclip_names`).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: one of :data:`PRECISIONS`: ``fp32``; ``fp16``/``bf16`` (weights cast);
            ``amp`` (fp32 weights, autocast fp16 on CUDA, bf16 on CPU).
        cache_dir: clipbench cache (the sha256 table of local checkpoints), default
            :func:`clipbench.paths.default_cache_dir`.
        allow_download: False fails, like offline mode, when the weights are not cached.
        options: backend options. open_clip: ``quick_gelu`` (force the activation; a value that
            contradicts the weights raises), ``seed`` (random initialisation, default 0),
            ``hub_cache_dir`` (where tags are looked up and downloaded; default ``HF_HUB_CACHE``).
            hf (transformers): ``hub_cache_dir`` (where hub ids are looked up and downloaded).

    open_clip's ``weights_digest``: ``<name>:<tag>:sha256=<hex>`` for a tag (the hub cache names
    LFS blobs by sha256; otherwise ``size=...,mtime=...``), ``sha256:<hex>`` for a local file
    (hashed once, remembered in ``cache_dir``), ``hf-hub:org/repo:sha256=<hex>``, ``random:<seed>``.
    The hf backend's: ``sha256:<hex>`` over the folder's weight, config, tokenizer and processor
    files (:func:`clipbench.models.hf_backend.folder_digest`).

    Raises:
        ClipbenchError: bad backend prefix, name, tag, device, precision, missing weights while
            offline, or a checkpoint that does not fit the architecture.
    """
    backend, backend_name = select_backend(name)
    check_precision(precision)
    return backend.load(
        backend_name, pretrained, device=resolve_device(device), precision=precision,
        cache_dir=default_cache_dir() if cache_dir is None else Path(cache_dir),
        allow_download=allow_download, **options,
    )


register_backend(DEFAULT_BACKEND, load_openclip, naming=(
    "ARCH (or open_clip:ARCH) with --pretrained TAG|PATH|none, e.g. ViT-B-32 --pretrained openai, or "
    "an OpenAI name (ViT-B/32, RN50); the table below lists architectures and tags"))
register_backend("hf-hub", load_openclip, keep_prefix=True, naming=(
    "hf-hub:ORG/REPO: an open_clip model on the Hugging Face hub (open_clip_config.json), "
    "e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"))
register_backend(PREFIX_HF, load_hf, naming=HF_NAMING)
register_backend("timm", load_timm, naming=(
    "timm:ARCH[.TAG] with --pretrained PATH|none optional, e.g. timm:resnet50.a1_in1k (image-only: probes)"))
register_backend("torchvision", load_torchvision, naming=(
    "torchvision:ARCH with --pretrained ENUM_MEMBER|PATH|none, e.g. torchvision:resnet50 --pretrained "
    "IMAGENET1K_V1 (image-only: probes)"))

__all__ = [
    "DEFAULT_BACKEND", "LOCAL_PRETRAINED", "MODEL_CONFIG_DIR", "OFFLINE_ENV_VARS", "OPENAI_ALIASES",
    "PRECISIONS", "Backend", "ClipModel", "ImageTextModel",
    "LoadFn", "ModelRow", "ModelSource", "OpenClipModel", "backend_names", "backends", "file_sha256",
    "list_models", "load_model", "model_table", "register_backend", "register_model_configs",
    "resolve_model", "select_backend",
]
