"""The Hugging Face transformers backend: ``--model hf:ORG/REPO`` (a hub id) or
``--model hf:/path/to/folder`` (a ``save_pretrained`` folder).

Any model :class:`transformers.AutoModel` builds that has ``get_image_features`` and
``get_text_features`` works: ``CLIPModel``, ``SiglipModel``, ``Siglip2Model`` and others with the
same two methods. Images go through the checkpoint's own image processor (transformers' default
backend for it), texts through its own tokenizer: SigLIP-family models pad every text to the
maximum length (their text tower pools the last position, so it was trained that way), others pad
to the longest text of the batch; both truncate at the text tower's context length.

Pre-projection image features (the paper's probe features) are the input of the model's
``visual_projection`` (CLIP: the vision tower's pooled output), captured by a forward hook during
the one ``get_image_features`` call; a model without ``visual_projection`` (SigLIP: its
attention-pooling head is the embedding) reports the unnormalised embedding,
``pre_projection_kind='embedding'``.

Weights are taken from the Hugging Face hub cache, or downloaded when allowed and reachable; when
not, loading stops at once with one message (:func:`clipbench.models.weights.offline_reason`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipbench.errors import ClipbenchError
from clipbench.models import base, weights

log = logging.getLogger(__name__)

#: The backend's prefix: ``--model hf:NAME``.
PREFIX = "hf"
#: ``config.json`` ``model_type`` values whose texts are padded to the maximum length.
MAX_LENGTH_PADDING_TYPES = ("siglip", "siglip2")
#: Weight files of a ``save_pretrained`` folder, in the order transformers looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: Files of a folder that go into the weights digest (weights, configs, tokenizer, processor).
DIGEST_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
#: Files fetched from the hub (weights other than safetensors only when a repo has none).
DOWNLOAD_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors")
NAMING_HELP = ("hf:ORG/REPO (a Hugging Face hub id, e.g. hf:openai/clip-vit-base-patch32, "
               "hf:google/siglip-base-patch16-224) or hf:/path/to/folder (a save_pretrained folder); "
               "models with get_image_features/get_text_features (CLIP, SigLIP, SigLIP 2)")
#: Below this size a file is hashed on every load instead of being remembered in the sha table.
_REMEMBER_SHA_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """Shape and dtype of one processor output per image (without the batch axis)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


class HFPreprocess:
    """The checkpoint's image processor as a picklable PIL -> tensor callable (DataLoader workers).

    A processor that returns only ``pixel_values`` yields that (3, H, W) tensor. One that returns
    several tensors of fixed shape per image (SigLIP 2's patches, patch mask and spatial shape)
    yields them packed into one flat float32 tensor, which :meth:`unpack` splits again after
    batching; int values below 2**24 survive the float round trip exactly.
    """

    def __init__(self, processor: Any, layout: tuple[TensorLayout, ...]):
        self.processor = processor
        self.layout = layout

    @property
    def packed(self) -> bool:
        return [part.key for part in self.layout] != ["pixel_values"]

    def outputs(self, image: Any) -> dict[str, torch.Tensor]:
        """The processor's tensors for one image, without the batch axis."""
        out = self.processor(images=image, return_tensors="pt")
        return {key: value[0] for key, value in out.items() if isinstance(value, torch.Tensor)}

    def __call__(self, image: Any) -> torch.Tensor:
        out = self.outputs(image)
        if not self.packed:
            return out["pixel_values"]
        return torch.cat([out[part.key].reshape(-1).float() for part in self.layout])

    def unpack(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch of ``__call__`` outputs as the model's keyword arguments."""
        if not self.packed:
            return {"pixel_values": batch}
        parts, start = {}, 0
        for part in self.layout:
            chunk = batch[:, start:start + part.numel].reshape(batch.shape[0], *part.shape)
            parts[part.key] = chunk if part.dtype.is_floating_point else chunk.round().to(part.dtype)
            start += part.numel
        return parts

    def __repr__(self) -> str:
        # part of the feature-cache key: the processor's class and every setting it has
        return f"HFPreprocess({type(self.processor).__name__}, {self.processor.to_json_string()})"


def _layout(processor: Any, image_size: tuple[int, int]) -> tuple[TensorLayout, ...]:
    """The per-image tensors ``processor`` returns, found by processing a blank image; raises
    ClipbenchError when their shape depends on the image (it could not be batched)."""
    from PIL import Image

    probe = HFPreprocess(processor, ())
    shapes = [probe.outputs(Image.new("RGB", size)) for size in (image_size, (image_size[0] * 2, image_size[1]))]
    if any(shapes[0][k].shape != shapes[1].get(k, torch.empty(0)).shape for k in shapes[0]):
        raise ClipbenchError(
            f"The image processor {type(processor).__name__} returns tensors whose shape depends on "
            f"the image ({ {k: tuple(v.shape) for k, v in shapes[0].items()} } vs "
            f"{ {k: tuple(v.shape) for k, v in shapes[1].items()} }), so its images cannot be batched. "
            f"Save the processor with a fixed output size (e.g. do_resize with a fixed size)."
        )
    return tuple(TensorLayout(k, tuple(v.shape), v.dtype) for k, v in shapes[0].items())


@dataclasses.dataclass(eq=False)
class HFModel:
    """A transformers model in eval mode, with its image processor and tokenizer.

    Attributes:
        name, pretrained, device, precision, preprocess, weights_digest, pre_projection_kind:
            see :class:`~clipbench.models.base.ImageTextModel`. ``name`` is ``hf:<id or folder>``,
            ``pretrained`` ``hf-hub`` or ``local``.
        model: the transformers module (eval mode, on ``device``).
        tokenizer: the checkpoint's tokenizer.
        padding: ``'max_length'`` (SigLIP family) or ``'longest'``.
        max_length: texts are truncated (and, with ``max_length`` padding, padded) to this.
        logit_scale: multiplier of cosine similarities (``exp`` of the learned log scale), None
            when the model has none; logit_bias: SigLIP's additive bias, else None.
    """

    name: str
    pretrained: str
    model: torch.nn.Module
    preprocess: HFPreprocess
    tokenizer: Any
    device: str
    precision: str
    weights_digest: str
    padding: str
    max_length: int
    logit_scale: float | None
    logit_bias: float | None
    embed_dim: int
    pre_projection_dim: int
    pre_projection_kind: str
    image_size: tuple[int, int]

    supports_text = True
    backend = "transformers"

    @property
    def text_context(self) -> str:
        return self.padding

    def autocast(self) -> contextlib.AbstractContextManager:
        return base.autocast(self.precision, self.device)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, ...) preprocessed images -> ((B, D) L2-normalised, (B, P) pre-projection), float32."""
        inputs = self.preprocess.unpack(pixels.to(self.device, non_blocking=True))
        dtype = base.weights_dtype(self.precision)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode(), self.autocast(), _projection_input(self.model) as captured:
            embedding = _pooled(self.model.get_image_features(**inputs))
        pre = captured[0] if captured else embedding
        return F.normalize(embedding.float(), dim=-1), pre.float()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The tokenizer's outputs that ``get_text_features`` takes, on ``device``."""
        tokens = self.tokenizer(list(texts), padding=self.padding, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        accepted = _named_parameters(self.model.get_text_features)
        return {k: v.to(self.device) for k, v in tokens.items() if k in accepted}

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (T, D) float32 L2-normalised embeddings, one batch."""
        with torch.inference_mode(), self.autocast():
            features = _pooled(self.model.get_text_features(**self.tokenize(texts)))
        return F.normalize(features.float(), dim=-1)

    def identity(self) -> dict[str, Any]:
        return base.identity(self.name, self.pretrained, self.weights_digest, self.precision)

    def describe(self) -> dict[str, Any]:
        import transformers

        config = self.model.config
        return {
            "backend": self.backend,
            "transformers_version": transformers.__version__,
            "model_class": type(self.model).__name__,
            "model_type": getattr(config, "model_type", None),
            **base.precision_description(self.precision, self.device),
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "logits_note": "zero-shot and retrieval rank by cosine similarity; the logit scale and "
                           "bias are monotone transforms of it and change no ranking metric",
            "embed_dim": self.embed_dim,
            "pre_projection_dim": self.pre_projection_dim,
            "pre_projection_kind": self.pre_projection_kind,
            "pre_projection_note": (
                "input of visual_projection (the vision tower's pooled output)"
                if self.pre_projection_kind == "before_projection" else
                "no separate projection: the pooled output is the embedding (unnormalised)"),
            "image_processor": type(self.preprocess.processor).__name__,
            # a packed processor (SigLIP 2) keeps each image's aspect ratio: no single size
            "image_size": None if self.preprocess.packed else list(self.image_size),
            "max_num_patches": getattr(self.preprocess.processor, "max_num_patches", None),
            "text_padding": self.padding,
            "text_max_length": self.max_length,
        }


def _pooled(output: Any) -> torch.Tensor:
    """The embedding of a ``get_*_features`` result: a tensor, or (transformers 5) a model output
    whose ``pooler_output`` holds it."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"get_*_features returned {type(output).__name__} without pooler_output")
    return pooled


@contextlib.contextmanager
def _projection_input(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Capture the input of ``model.visual_projection`` (empty list when it has none)."""
    captured: list[torch.Tensor] = []
    projection = getattr(model, "visual_projection", None)
    if not isinstance(projection, torch.nn.Module):
        yield captured
        return
    handle = projection.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def _named_parameters(fn: Any) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


# ---------------------------------------------------------------------------------------------
# locating and digesting the files


def _has_weights(folder: Path) -> bool:
    for filename in WEIGHT_FILES:
        path = folder / filename
        if path.is_file():
            if not filename.endswith(".index.json"):
                return True
            shards = set(json.loads(path.read_text()).get("weight_map", {}).values())
            return all((folder / shard).is_file() for shard in shards)
    return False


def folder_digest(folder: Path, cache_dir: Path | None) -> str:
    """``sha256:<hex>`` over the name and content digest of every weight, config, tokenizer and
    processor file of ``folder``. Hub-cache blobs are named by their sha256 (free); other large
    files are hashed once and remembered in ``cache_dir`` by path, size and mtime
    (:func:`clipbench.models.weights.file_sha256`)."""
    lines = []
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix in DIGEST_SUFFIXES and p.is_file()):
        blob = weights.cached_blob_digest(path)
        if not blob.startswith("sha256="):
            remember = cache_dir if path.stat().st_size >= _REMEMBER_SHA_BYTES else None
            blob = f"sha256={weights.file_sha256(path, remember)}"
        lines.append(f"{path.name} {blob}")
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _missing_message(repo: str, reason: str, hub_cache: Path) -> str:
    return (
        f"The Hugging Face model {repo} is not on this machine and cannot be downloaded: {reason}. "
        f"clipbench needs its config.json and weights ({' or '.join(WEIGHT_FILES[::2])}) from "
        f"https://huggingface.co/{repo} and looked in the Hugging Face hub cache {hub_cache}. Run "
        f"`huggingface-cli download {repo}` with network access (later runs find it in the cache "
        f"offline), or pass a local save_pretrained folder as --model hf:/path/to/folder."
    )


def hub_snapshot(repo: str, hub_cache_dir: Path | None, allow_download: bool) -> Path:
    """The local snapshot folder of hub repo ``repo`` with its weights: cached, or downloaded now.

    Raises:
        ClipbenchError: not cached and downloads are disabled, declared offline, or unreachable
            (decided in seconds, before any download is tried), or the download failed.
    """
    config = weights.from_hub_cache(repo, ("config.json",), hub_cache_dir)
    if config is not None and _has_weights(config.parent):
        return config.parent
    cache = weights.hub_cache_dir(hub_cache_dir)
    reason = weights.offline_reason(weights.PROBE_HOST, allow_download)
    if reason is not None:
        raise ClipbenchError(_missing_message(repo, reason, cache))
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub", repo)
    try:
        folder = Path(snapshot_download(repo, cache_dir=cache, allow_patterns=list(DOWNLOAD_PATTERNS)))
        if not _has_weights(folder):  # a repo with .bin weights only
            folder = Path(snapshot_download(repo, cache_dir=cache,
                                            allow_patterns=[*DOWNLOAD_PATTERNS, "*.bin"]))
    except Exception as error:
        raise ClipbenchError(
            f"Downloading the Hugging Face model {repo} failed ({error}). Check the id at "
            f"https://huggingface.co/{repo}, run `huggingface-cli download {repo}`, or pass a "
            f"local save_pretrained folder as --model hf:/path/to/folder."
        ) from error
    return folder


def locate(name: str, hub_cache_dir: Path | None, allow_download: bool) -> tuple[Path, str]:
    """(folder holding the model's files, ``'local'`` or ``'hf-hub'``) for ``name`` (an existing
    folder, else a hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() or not _has_weights(path):
            raise ClipbenchError(
                f"{path} is not a transformers save_pretrained folder: it needs config.json and "
                f"one of {', '.join(WEIGHT_FILES)}. Save the model with "
                f"model.save_pretrained(folder) (and its processor and tokenizer beside it)."
            )
        return path.resolve(), "local"
    if name.startswith(("/", ".", "~")) or path.exists() or name.count("/") > 1 or not name:
        raise ClipbenchError(
            f"--model hf:{name}: no such folder. Give a save_pretrained folder (hf:/path/to/folder) "
            f"or a hub id (hf:ORG/REPO, e.g. hf:openai/clip-vit-base-patch32)."
        )
    return hub_snapshot(name, hub_cache_dir, allow_download), "hf-hub"


# ---------------------------------------------------------------------------------------------
# building


def _text_policy(model: torch.nn.Module, tokenizer: Any) -> tuple[str, int]:
    """(padding, max_length): SigLIP pads to the maximum (its tower pools the last position)."""
    config = model.config
    text_config = getattr(config, "text_config", config)
    limits = [n for n in (getattr(text_config, "max_position_embeddings", None),
                          getattr(tokenizer, "model_max_length", None)) if isinstance(n, int) and n > 0]
    if not limits:
        raise ClipbenchError(f"{type(model).__name__}: neither the text config nor the tokenizer "
                             f"states a maximum text length (max_position_embeddings).")
    padding = "max_length" if getattr(config, "model_type", "") in MAX_LENGTH_PADDING_TYPES else "longest"
    return padding, min(limits)


def _image_size(model: torch.nn.Module, layout: tuple[TensorLayout, ...]) -> tuple[int, int]:
    """(H, W) the processor makes (its output, once ``layout`` is known), else the config's."""
    pixels = next((part for part in layout if part.key == "pixel_values"), None)
    if pixels is not None and len(pixels.shape) == 3:
        return int(pixels.shape[1]), int(pixels.shape[2])
    size = getattr(getattr(model.config, "vision_config", model.config), "image_size", None)
    return (size, size) if isinstance(size, int) else (224, 224)


def _scalar(model: torch.nn.Module, attribute: str, exp: bool) -> float | None:
    value = getattr(model, attribute, None)
    if not isinstance(value, torch.Tensor):
        return None
    value = value.detach().float()
    return float((value.exp() if exp else value).item())


def load_hf(
    name: str,
    pretrained: str | None,
    *,
    device: str,
    precision: str,
    cache_dir: Path,
    allow_download: bool,
    hub_cache_dir: Path | None = None,
) -> HFModel:
    """The transformers backend's loader (see :func:`clipbench.models.load_model`).

    ``name`` is a hub id or a ``save_pretrained`` folder; the weights come with it, so
    ``pretrained`` must be None. ``hub_cache_dir``: where hub ids are looked up (default
    ``HF_HUB_CACHE``). ``weights_digest``: :func:`folder_digest` of the files loaded.
    """
    if pretrained not in (None, ""):
        raise ClipbenchError(
            f"--pretrained {pretrained!r} does not apply to --model hf:{name}: a transformers model's "
            f"weights come with its hub id or folder. Drop --pretrained."
        )
    try:
        import transformers
    except ImportError as error:
        raise ClipbenchError(
            f"--model hf:{name} needs the transformers package: pip install 'clipbench[hf]'."
        ) from error
    folder, kind = locate(name, hub_cache_dir, allow_download)
    digest = folder_digest(folder, cache_dir)
    try:
        model = transformers.AutoModel.from_pretrained(
            folder, local_files_only=True, dtype=base.weights_dtype(precision))
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as error:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ClipbenchError(
            f"Could not load the transformers model in {folder}: {first}. The folder needs the "
            f"model's config.json and weights, its image processor (preprocessor_config.json) and "
            f"its tokenizer, as save_pretrained writes them."
        ) from error
    missing = [m for m in ("get_image_features", "get_text_features") if not callable(getattr(model, m, None))]
    if missing:
        raise ClipbenchError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) has no "
            f"{' or '.join(missing)}: the hf backend evaluates image-text models such as CLIPModel, "
            f"SiglipModel and Siglip2Model."
        )
    model.to(device).eval()
    layout = _layout(processor, _image_size(model, ()))
    preprocess = HFPreprocess(processor, layout)
    padding, max_length = _text_policy(model, tokenizer)
    image_size = _image_size(model, layout)
    hf_model = HFModel(
        name=f"{PREFIX}:{name}", pretrained=kind, model=model, preprocess=preprocess,
        tokenizer=tokenizer, device=device, precision=precision, weights_digest=digest,
        padding=padding, max_length=max_length, logit_scale=_scalar(model, "logit_scale", exp=True),
        logit_bias=_scalar(model, "logit_bias", exp=False), embed_dim=0, pre_projection_dim=0,
        pre_projection_kind="", image_size=image_size,
    )
    _set_dims(hf_model)
    log.info("loaded %s (%s, %s) on %s, %s, weights %s", hf_model.name, type(model).__name__, kind,
             device, precision, digest)
    return hf_model


def _set_dims(hf_model: HFModel) -> None:
    """Fill embed_dim, pre_projection_dim and pre_projection_kind by encoding one blank image."""
    from PIL import Image

    projected, pre = hf_model.encode_images(hf_model.preprocess(Image.new("RGB", hf_model.image_size))[None])
    projection = getattr(hf_model.model, "visual_projection", None)
    hf_model.embed_dim = int(projected.shape[-1])
    hf_model.pre_projection_dim = int(pre.shape[-1])
    hf_model.pre_projection_kind = "before_projection" if isinstance(projection, torch.nn.Module) else "embedding"
