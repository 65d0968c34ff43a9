"""The timm backend: ``--model timm:ARCH[.TAG]`` (``timm:resnet50.a1_in1k``), an image-only
supervised backbone (see :mod:`.backbone`).

``--pretrained``: omitted, the tag's weights (the name's tag, else timm's default tag of the
architecture), read from the Hugging Face hub cache; a checkpoint file; or ``none`` (seeded random
init). Features: ``forward_head(forward_features(x), pre_logits=True)``, the pooled input of the
classifier. Preprocessing: the model's own data config (``timm.data.resolve_data_config`` and
``create_transform``). timm's hub download retries for long when the network is missing, so the
cache is checked first and an offline miss fails at once (:func:`clipbench.models.weights.offline_reason`).
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

#: timm's default weight file in a hub repo, and the safetensors file it prefers to it.
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class PooledFeatures(torch.nn.Module):
    """A timm model as pixels -> penultimate pooled features (``pre_logits``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)


def _resolve(name: str) -> tuple[str, str]:
    """(architecture, tag or '') of a timm name, checked against timm's registry."""
    import timm
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ClipbenchError(
            f"Unknown timm model {arch!r} in --model timm:{name}.{hint} Name a timm architecture, "
            f"optionally with a pretrained tag (timm:resnet50.a1_in1k); "
            f"python -c \"import timm; print(timm.list_pretrained('resnet50*'))\" lists tags."
        )
    if tag and f"{arch}.{tag}" not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ClipbenchError(
            f"timm has no pretrained tag {tag!r} for {arch}. Its tags: {', '.join(tags) or 'none'} "
            f"(--model timm:{arch}.TAG), or pass a checkpoint with --pretrained PATH."
        )
    return arch, tag


def _hub_files(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The weight files timm reads from the tag's hub repo, in its order (safetensors first)."""
    filename = cfg.get("hf_hub_filename") or TIMM_HUB_FILES[1]
    if filename == TIMM_HUB_FILES[1]:
        return TIMM_HUB_FILES
    if filename.endswith(".bin"):
        return filename[:-4] + ".safetensors", filename
    return (filename,)


def _cached_weights(label: str, cfg: dict[str, Any], hub_cache_dir: Path | None,
                    allow_download: bool) -> Path | None:
    """The local file of a tag's weights; None when absent but a download may be tried.

    Raises:
        ClipbenchError: absent and downloads are impossible (offline, ``--no-download``).
    """
    repo = cfg.get("hf_hub_id")
    if repo:
        files = _hub_files(cfg)
        cached = weights.from_hub_cache(repo, files, hub_cache_dir)
        host, where = weights.PROBE_HOST, f"the Hugging Face hub cache {weights.hub_cache_dir(hub_cache_dir)}"
        needed = f"{' or '.join(files)} from the Hugging Face hub repo {repo} (https://huggingface.co/{repo})"
    elif cfg.get("url"):
        candidate = backbone.torch_hub_checkpoint(cfg["url"])
        cached = candidate if candidate.is_file() else None
        host, where, needed = urlparse(cfg["url"]).hostname, str(candidate.parent), cfg["url"]
    else:
        raise ClipbenchError(f"timm lists no download for the weights of {label}. Pass a checkpoint "
                             f"with --pretrained PATH, or --pretrained none for random weights.")
    if cached is not None:
        return cached
    reason = weights.offline_reason(host, allow_download)
    if reason is not None:
        raise ClipbenchError(
            f"The weights of timm:{label} are not on this machine and cannot be downloaded: {reason}. "
            f"clipbench needs {needed} and looked in {where}. Run the same command once with network "
            f"access (timm caches the file for later offline runs), or download the file elsewhere "
            f"and pass it with --model timm:{label} --pretrained PATH."
        )
    return None


def load_timm(
    name: str,
    pretrained: str | None,
    *,
    device: str,
    precision: str,
    cache_dir: Path,
    allow_download: bool,
    seed: int = 0,
    hub_cache_dir: Path | None = None,
) -> backbone.BackboneModel:
    """The timm backend's loader (see :func:`clipbench.models.load_model`).

    Options: ``seed`` (random init with ``--pretrained none``, default 0), ``hub_cache_dir``
    (where tags are looked up and downloaded; default ``HF_HUB_CACHE``).
    """
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    arch, tag = _resolve(name)
    model_name = f"{arch}.{tag}" if tag else arch
    path = backbone.local_checkpoint(pretrained)
    if path is not None:
        def build(num_classes: int | None) -> torch.nn.Module:
            extra = {} if num_classes is None else {"num_classes": num_classes}
            return timm.create_model(model_name, pretrained=False, **extra)
        head = get_pretrained_cfg(model_name).classifier
        model = backbone.load_checkpoint(build, head if isinstance(head, str) else head[0], path,
                                         f"timm:{model_name}")
        label, kind, digest = str(path), "file", f"sha256:{weights.file_sha256(path, cache_dir)}"
    elif pretrained is not None and pretrained.lower() in backbone.RANDOM_PRETRAINED:
        with backbone.seeded(seed):
            model = timm.create_model(model_name, pretrained=False)
        label, kind, digest = "none", "random", f"random:{seed}"
    elif pretrained:
        raise ClipbenchError(
            f"--pretrained {pretrained!r} is neither a checkpoint file nor 'none'. A timm model names "
            f"its weights by the tag in the model name (--model timm:{arch}.TAG, e.g. "
            f"timm:resnet50.a1_in1k); omit --pretrained for them."
        )
    else:
        cfg = get_pretrained_cfg(model_name).to_dict()  # the name's tag, else timm's default one
        tag = cfg["tag"]
        file = _cached_weights(f"{arch}.{tag}", cfg, hub_cache_dir, allow_download)
        if file is None:
            log.info("downloading the weights of timm:%s.%s", arch, tag)
            cache = str(hub_cache_dir) if hub_cache_dir else None
            model = timm.create_model(f"{arch}.{tag}", pretrained=True, cache_dir=cache)
            file = _cached_weights(f"{arch}.{tag}", cfg, hub_cache_dir, False)
        else:
            # Point timm at the cached file: loading then never touches the network.
            model = timm.create_model(f"{arch}.{tag}", pretrained=True,
                                      pretrained_cfg_overlay={"file": str(file), "source": ""})
        label, kind = tag, "tag"
        digest = f"timm:{arch}.{tag}:{weights.cached_blob_digest(file)}"
    model.eval()
    data_config = resolve_data_config({}, model=model)
    preprocess = create_transform(**data_config, is_training=False)
    module = backbone.prepare(PooledFeatures(model), device, precision)
    log.info("loaded timm:%s (%s) on %s, %s, weights %s", arch, label, device, precision, digest)
    return backbone.BackboneModel(
        name=f"timm:{arch}", pretrained=label, module=module, preprocess=preprocess, device=device,
        precision=precision, weights_digest=digest, backend="timm", library_version=timm.__version__,
        architecture=model_name if kind != "tag" else f"{arch}.{tag}", weights=kind,
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        image_size=tuple(int(s) for s in data_config["input_size"][1:]),
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    )


