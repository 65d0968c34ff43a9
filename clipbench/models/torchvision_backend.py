"""The torchvision backend: ``--model torchvision:ARCH`` (``torchvision:resnet50``), an image-only
supervised classification backbone (see :mod:`.backbone`).

``--pretrained``: a member of the architecture's weights enum (``IMAGENET1K_V1``, or
``ResNet50_Weights.IMAGENET1K_V1``; omitted or ``DEFAULT``: the enum's ``DEFAULT``), read from
torch's hub cache (``$TORCH_HOME/hub/checkpoints``); a checkpoint file; or ``none`` (seeded random
init). Features: the input of the model's last ``Linear`` layer (replaced by ``Identity``): for
ResNets the global-average-pooled ``fc`` input. Preprocessing: the weights' own
``transforms()`` (for a checkpoint file or random weights, those of the enum's ``DEFAULT``).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from clipbench.errors import ClipbenchError
from clipbench.models import backbone, weights

log = logging.getLogger(__name__)


def _classification_models() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def _weights_enum(arch: str) -> Any:
    import torchvision.models as tvm

    names = _classification_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ClipbenchError(
            f"Unknown torchvision classification model {arch!r} in --model torchvision:{arch}.{hint} "
            f"python -c \"import torchvision; print(torchvision.models.list_models(module="
            f"torchvision.models))\" lists them."
        )
    return tvm.get_model_weights(arch)


def _weights_member(arch: str, enum: Any, pretrained: str | None) -> Any:
    """The enum member ``--pretrained`` names (``IMAGENET1K_V1``, ``ResNet50_Weights.IMAGENET1K_V1``)."""
    choice = (pretrained or "DEFAULT").rpartition(".")[2]
    if choice == "DEFAULT":
        return enum.DEFAULT
    members = {m.name: m for m in enum}
    if choice not in members:
        raise ClipbenchError(
            f"--pretrained {pretrained!r} is no weights of torchvision:{arch}: not a checkpoint file and "
            f"not a member of {enum.__name__} ({', '.join(members)}, or DEFAULT = {enum.DEFAULT.name}). "
            f"Pass one of those, a checkpoint path, or none for random weights."
        )
    return members[choice]


def _cached_weights(arch: str, member: Any, allow_download: bool) -> Path | None:
    """The local file of an enum member's weights; None when absent but a download may be tried.

    Raises:
        ClipbenchError: absent and downloads are impossible (offline, ``--no-download``).
    """
    path = backbone.torch_hub_checkpoint(member.url)
    if path.is_file():
        return path
    reason = weights.offline_reason(urlparse(member.url).hostname, allow_download)
    if reason is not None:
        raise ClipbenchError(
            f"The weights {type(member).__name__}.{member.name} of torchvision:{arch} are not on this "
            f"machine and cannot be downloaded: {reason}. clipbench needs {member.url} and looked for "
            f"{path} (torch's hub cache, $TORCH_HOME/hub/checkpoints). Run the same command once with "
            f"network access (torchvision caches the file there), or download the file into that "
            f"folder, or pass it with --model torchvision:{arch} --pretrained PATH."
        )
    return None


def _last_linear(model: torch.nn.Module) -> str:
    """Module name of the model's last ``Linear`` layer (its classifier)."""
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise ClipbenchError(f"{type(model).__name__} has no Linear classifier whose input could be "
                             f"taken as its features; choose another torchvision model.")
    return names[-1]


def _drop_classifier(model: torch.nn.Module, head: str) -> int:
    """Replace the classifier ``head`` by ``Identity``; returns its input width."""
    parent_name, _, child = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    width = int(getattr(parent, child).in_features)
    setattr(parent, child, torch.nn.Identity())
    return width


def load_torchvision(
    name: str,
    pretrained: str | None,
    *,
    device: str,
    precision: str,
    cache_dir: Path,
    allow_download: bool,
    seed: int = 0,
) -> backbone.BackboneModel:
    """The torchvision backend's loader (see :func:`clipbench.models.load_model`).

    Option: ``seed`` (random init with ``--pretrained none``, default 0).
    """
    import torchvision
    import torchvision.models as tvm

    enum = _weights_enum(name)
    path = backbone.local_checkpoint(pretrained)
    if path is not None:
        def build(num_classes: int | None) -> torch.nn.Module:
            extra = {} if num_classes is None else {"num_classes": num_classes}
            return tvm.get_model(name, weights=None, **extra)
        model = backbone.load_checkpoint(build, _last_linear(build(None)), path, f"torchvision:{name}")
        member, label, kind = enum.DEFAULT, str(path), "file"
        digest = f"sha256:{weights.file_sha256(path, cache_dir)}"
    elif pretrained is not None and pretrained.lower() in backbone.RANDOM_PRETRAINED:
        with backbone.seeded(seed):
            model = tvm.get_model(name, weights=None)
        member, label, kind, digest = enum.DEFAULT, "none", "random", f"random:{seed}"
    else:
        member = _weights_member(name, enum, pretrained)
        file = _cached_weights(name, member, allow_download)
        if file is None:
            log.info("downloading %s", member.url)
        # With the file in torch's hub cache, torchvision reads it without touching the network.
        model = tvm.get_model(name, weights=member)
        file = backbone.torch_hub_checkpoint(member.url)
        label, kind = member.name, "enum"
        digest = f"torchvision:{name}:{member.name}:sha256={weights.file_sha256(file, cache_dir)}"
    width = _drop_classifier(model, _last_linear(model))
    preprocess = member.transforms()
    crop = [int(s) for s in preprocess.crop_size]
    preprocessing = {"weights": f"{type(member).__name__}.{member.name}", "transform": repr(preprocess)}
    log.info("loaded torchvision:%s (%s) on %s, %s, weights %s", name, label, device, precision, digest)
    return backbone.BackboneModel(
        name=f"torchvision:{name}", pretrained=label, module=backbone.prepare(model, device, precision),
        preprocess=preprocess, device=device, precision=precision, weights_digest=digest,
        backend="torchvision", library_version=torchvision.__version__, architecture=name, weights=kind,
        feature_dim=width, image_size=(crop[0], crop[-1]), preprocessing=preprocessing,
    )
