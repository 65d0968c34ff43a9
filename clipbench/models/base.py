"""The contract every model backend fulfils (:class:`ImageTextModel`) and the helpers backends
share: precision names, device resolution, autocast.

The pipeline and :mod:`clipbench.features` see a model only through this Protocol, so a new
backend (Hugging Face transformers, an image-only timm backbone) is one module that returns an
object with these attributes, plus one :func:`clipbench.models.register_backend` call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from clipbench.errors import ClipbenchError

#: ``fp32``; ``fp16``/``bf16``: weights cast; ``amp``: fp32 weights + autocast (fp16 on CUDA,
#: bf16 on CPU).
PRECISIONS = ("fp32", "fp16", "bf16", "amp")


@runtime_checkable
class ImageTextModel(Protocol):
    """A loaded model in eval mode, as the pipeline uses it.

    Attributes:
        name, pretrained: what records call the model (``ViT-B-32``, ``openai``).
        device: torch device string the model runs on (``cpu``, ``cuda:0``).
        precision: the precision the model actually runs at (one of :data:`PRECISIONS`): the
            single source of truth records state.
        preprocess: eval transform, PIL image -> float32 tensor (3, H, W).
        pre_projection_kind: what the second output of :meth:`encode_images` is:
            ``'before_projection'`` (the image feature the projection maps into the shared
            space) or ``'embedding'`` (no separate projection: the unnormalised embedding).
        supports_text: False for image-only backbones (:meth:`encode_texts` then raises).
        text_context: how a text batch is laid out for the text tower, which can change a
            feature's last bits (text-feature cache keys): open_clip ``'trimmed'`` or ``'full'``,
            the Hugging Face tokenizer's padding, None without a text tower. Optional for other
            backends: missing reads as None, batches of a fixed length
            (:func:`clipbench.features.text_context`).
        weights_digest: identifies the weights (feature caches, records).
    """

    name: str
    pretrained: str
    device: str
    precision: str
    preprocess: Callable[[Any], torch.Tensor]
    pre_projection_kind: str
    supports_text: bool
    text_context: str | None
    weights_digest: str

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) pixels -> ((B, D) L2-normalised float32, (B, P) float32 pre-projection)."""
        ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (T, D) L2-normalised float32 embeddings."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context the model's forward passes run in (a no-op unless ``amp``)."""
        ...

    def identity(self) -> dict[str, Any]:
        """Everything about the model that changes its features (feature-cache keys)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What records state about the model (JSON-serialisable)."""
        ...


def identity(name: str, pretrained: str, weights_digest: str, precision: str) -> dict[str, Any]:
    """The cache-key dict of :meth:`ImageTextModel.identity` (its keys are part of every feature
    cache key: changing them invalidates existing caches)."""
    return {"model": name, "pretrained": pretrained, "weights": weights_digest, "precision": precision}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ClipbenchError(f"Unknown precision {precision!r}. Use one of {', '.join(PRECISIONS)}.")
    return precision


def weights_dtype(precision: str) -> torch.dtype:
    """dtype of the weights (and of the pixels fed to them) at ``precision``."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """dtype ``amp`` computes in on ``device`` (fp16 on CUDA, bf16 on CPU); None without autocast."""
    if precision != "amp":
        return None
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def precision_description(precision: str, device: str) -> dict[str, Any]:
    """The ``precision`` part of :meth:`ImageTextModel.describe`: what actually ran."""
    compute = autocast_dtype(precision, device)
    return {
        "precision": precision,
        "weights_dtype": str(weights_dtype(precision)).removeprefix("torch."),
        "autocast_dtype": None if compute is None else str(compute).removeprefix("torch."),
    }


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; checks ``cpu``/``cuda``/``cuda:N``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ClipbenchError(f"Unknown device {device!r}. Use auto, cpu, cuda or cuda:N.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ClipbenchError(
            f"Device {device!r} was requested but torch sees no CUDA GPU (torch "
            f"{torch.__version__}). Use --device cpu, or install a CUDA build of torch."
        )
    return device
