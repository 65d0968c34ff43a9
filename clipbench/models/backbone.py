"""What the image-only backends (:mod:`.timm_backend`, :mod:`.torchvision_backend`) share: the
:class:`BackboneModel` they return, local checkpoint loading, and the torch hub checkpoint cache.

A supervised backbone has no text tower and no projection: its features are the penultimate
layer, global pooled (the input of the classifier), the features the CLIP paper's Table 10 probes
of ImageNet models use. ``encode_images`` returns them twice: L2-normalised as ``projected`` and
as they are as the pre-projection feature (``pre_projection_kind = 'embedding'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipbench.errors import ClipbenchError
from clipbench.models import base

#: ``--pretrained`` values that mean a random initialisation (seeded).
RANDOM_PRETRAINED = ("none", "random")
#: What ``projected`` is for an image-only model (records say it).
PROJECTED_MEANING = "L2-normalised pooled penultimate features (no projection: image-only model)"


@dataclasses.dataclass(eq=False)
class BackboneModel:
    """An image-only backbone in eval mode whose ``module`` maps pixels to pooled features.

    Attributes:
        name, pretrained, device, precision, preprocess, weights_digest: see
            :class:`~clipbench.models.base.ImageTextModel`. ``name`` keeps the backend prefix
            (``timm:resnet50``); ``pretrained`` is the tag / weights enum, a checkpoint path or
            ``none``.
        module: the network with its classifier removed (eval mode, on ``device``).
        backend: ``timm`` or ``torchvision``.
        library_version: the version of that library.
        architecture: the library's model name (``resnet50``).
        weights: how the weights were chosen (``tag``, ``enum``, ``file``, ``random``).
        feature_dim: width of the pooled feature.
        image_size: model input (H, W) in pixels.
        preprocessing: the preprocessing's own configuration (records and cache keys).
    """

    name: str
    pretrained: str
    module: torch.nn.Module = dataclasses.field(repr=False)
    preprocess: Callable[[Any], torch.Tensor]
    device: str
    precision: str
    weights_digest: str
    backend: str
    library_version: str
    architecture: str
    weights: str
    feature_dim: int
    image_size: tuple[int, int]
    preprocessing: dict[str, Any]

    supports_text = False
    text_context = None
    pre_projection_kind = "embedding"

    def autocast(self) -> contextlib.AbstractContextManager:
        return base.autocast(self.precision, self.device)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) pixels -> ((B, F) L2-normalised pooled features, (B, F) the same unnormalised)."""
        pixels = pixels.to(self.device, dtype=base.weights_dtype(self.precision), non_blocking=True)
        with torch.inference_mode(), self.autocast():
            features = self.module(pixels).float()
        return F.normalize(features, dim=-1), features

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise TypeError(f"{self.name} is an image-only model: it has no text encoder")

    def identity(self) -> dict[str, Any]:
        return {**base.identity(self.name, self.pretrained, self.weights_digest, self.precision),
                "backend": self.backend, "features": "penultimate, global pooled",
                "preprocessing": self.preprocessing}

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            f"{self.backend}_version": self.library_version,
            "architecture": self.architecture,
            "weights": self.weights,
            **base.precision_description(self.precision, self.device),
            "features": "penultimate layer, global pooled (the classifier's input)",
            "feature_dim": self.feature_dim,
            "pre_projection_kind": self.pre_projection_kind,
            "projected": PROJECTED_MEANING,
            "image_size": list(self.image_size),
            "preprocessing": self.preprocessing,
        }


def prepare(module: torch.nn.Module, device: str, precision: str) -> torch.nn.Module:
    """``module`` in eval mode on ``device``, its weights cast for fp16/bf16."""
    return module.eval().to(device=device, dtype=base.weights_dtype(precision))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed a random initialisation without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def local_checkpoint(pretrained: str | None) -> Path | None:
    """The checkpoint file ``--pretrained`` names, None when it names no path.

    Raises:
        ClipbenchError: it looks like a path (a separator or a checkpoint suffix) but is no file.
    """
    if not pretrained or pretrained.lower() in RANDOM_PRETRAINED:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path.resolve()
    if os.sep in pretrained or "/" in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
        raise ClipbenchError(f"Checkpoint file {str(path.absolute())!r} does not exist. Pass an existing "
                             f"file to --pretrained.")
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, read without running pickled code (safetensors, or
    ``torch.load(weights_only=True)``); a ``state_dict`` / ``model`` entry is unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ClipbenchError(
            f"Could not read the checkpoint {path}: {str(error).splitlines()[0][:300]}. clipbench reads "
            f"safetensors files and torch.save'd state dicts (loaded with weights_only=True, so "
            f"pickled objects other than tensors are refused); save the model's state_dict()."
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClipbenchError(f"The checkpoint {path} holds no state dict of tensors. Save the model's "
                             f"state_dict() with torch.save or safetensors.")
    return state


def load_checkpoint(build: Callable[[int | None], torch.nn.Module], head: str, path: Path,
                    label: str) -> torch.nn.Module:
    """A model from ``build(num_classes)`` with the tensors of ``path`` loaded strictly.

    ``head`` is the classifier's module name (``fc``): its output width is taken from the
    checkpoint (fine-tuned heads of any width load; None builds the default width), and a
    checkpoint without any head tensor (saved headless) may lack exactly those keys.
    """
    state = read_state_dict(path)
    head_weight = state.get(f"{head}.weight")
    fix = "Check that --model names the architecture the checkpoint was saved from."
    try:
        model = build(None if head_weight is None else int(head_weight.shape[0]))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of other shapes
        lines = str(error).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ClipbenchError(f"The checkpoint {path} does not fit {label}: {detail[:300]} "
                             f"({len(lines) - 1} such tensors). {fix}") from error
    has_head = any(k.startswith(f"{head}.") for k in state)
    missing = [k for k in missing if has_head or not k.startswith(f"{head}.")]
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({', '.join(missing[:4])}...)" if missing else "",
                 f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}...)" if unexpected else ""]
        raise ClipbenchError(
            f"The checkpoint {path} does not fit {label}: {' and '.join(p for p in parts if p)} "
            f"tensors. {fix}"
        )
    return model


def torch_hub_checkpoint(url: str) -> Path:
    """Where torch's hub keeps the download of ``url`` (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
