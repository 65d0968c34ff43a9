"""Loading CLIP-like models from open_clip: names, pretrained weights, precision and encoding.

Resolution rules (:func:`resolve_model`):

* ``name`` is an open_clip architecture (``open_clip.list_models()``, matched case-insensitively),
  a ``<name>-quickgelu`` variant of one, an OpenAI-style alias (``ViT-B/32``, ``RN50x4``,
  ``ViT-L/14@336px``; see :data:`OPENAI_ALIASES`) or an ``hf-hub:org/repo`` id.
* ``pretrained`` is a tag of that architecture (open_clip's registry plus
  :data:`LOCAL_PRETRAINED`), a local checkpoint file, an ``hf-hub:org/repo`` id, or ``'none'``
  for random initialisation. Left out: an alias means ``openai``; an architecture with exactly
  one tag means that tag; anything else is an error that lists the tags.

QuickGELU: OpenAI's CLIP (and a few other releases) was trained with QuickGELU; loading those
weights into the default GELU config runs without error but loses accuracy. clipbench therefore
decides the activation from the weights, never from the config name alone:

* a registry tag: the tag's ``quick_gelu`` flag (open_clip's pretrained registry);
* a local file: OpenAI format (a TorchScript archive, or a state dict carrying OpenAI's
  ``input_resolution``/``context_length``/``vocab_size`` entries), a file whose sha256 is that
  of a QuickGELU release in open_clip's registry, or a file inside the Hugging Face cache of a
  QuickGELU tag's repo means QuickGELU; otherwise the config decides (``-quickgelu`` name or
  ``quick_gelu=True``), because an open_clip state dict does not record its activation;
* an ``hf-hub:`` id: the repo's ``open_clip_config.json``.

An explicit choice that contradicts the weights (``quick_gelu=False`` or a plain-GELU config
forced onto QuickGELU weights, or a ``-quickgelu`` config with a GELU tag) is refused.

Offline: pretrained weights are looked up in the local cache first. When they are missing and
the network is declared unavailable (``CLIPBENCH_OFFLINE``/``HF_HUB_OFFLINE``/
``HF_DATASETS_OFFLINE``) or a 2-second TCP probe of the download host fails, loading stops with a
:class:`~clipbench.errors.ClipbenchError` saying which file is needed and how to provide it,
instead of waiting through the downloaders' retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import QuickGELU, VisionTransformer
from open_clip.utils import to_2tuple

from clipbench.errors import ClipbenchError
from clipbench.paths import default_cache_dir, network_reachable, offline

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"

PRECISIONS = ("fp32", "fp16", "bf16", "amp")

#: OpenAI's model names (the ``clip`` package) -> open_clip architecture; their tag is ``openai``.
OPENAI_ALIASES: dict[str, str] = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}

#: clipbench's own pretrained weights: architecture -> tag -> entry. ``file`` is relative to the
#: package directory; ``quick_gelu`` the activation the weights were trained with; optional
#: preprocessing keys (``mean``, ``std``, ``interpolation``, ``resize_mode``) override open_clip's.
LOCAL_PRETRAINED: dict[str, dict[str, dict[str, Any]]] = {
    "clipbench-tiny": {
        "synthetic": {"file": "weights/clipbench-tiny-synthetic.pt", "quick_gelu": False},
    },
}

OFFLINE_ENV_VARS = ("CLIPBENCH_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
#: Host probed (TCP, 2 s) before a download when no offline variable is set.
PROBE_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 2.0

# Entries OpenAI's TorchScript checkpoints carry besides the weights; open_clip's CLIP has none.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_CONFIG_FILE = "open_clip_config.json"
_SHA_TABLE = "weights_sha256.json"
_QUICKGELU_SUFFIX = "-quickgelu"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's architecture and weights come from, decided before anything is loaded.

    Attributes:
        name: open_clip architecture name (``ViT-B-32``), or the ``hf-hub:org/repo`` id.
        pretrained: the tag (``openai``), the absolute checkpoint path, the ``hf-hub:`` id, or
            ``'none'``.
        kind: ``'tag'``, ``'file'``, ``'hf-hub'`` or ``'random'``.
        quick_gelu: whether the model is built with QuickGELU (None for ``hf-hub``: the repo's
            config decides).
        arch: the open_clip config actually instantiated (``ViT-B-32-quickgelu`` has no config
            of its own for every architecture, so it may be the base name).
        tag_cfg: the registry entry of a tag (URL, hub repo, preprocessing), else empty.
        openai_format: a local file in OpenAI's format (TorchScript or OpenAI state dict).
    """

    name: str
    pretrained: str
    kind: str
    quick_gelu: bool | None
    arch: str
    tag_cfg: dict[str, Any] = dataclasses.field(default_factory=dict)
    openai_format: bool = False


@dataclasses.dataclass(eq=False)
class ClipModel:
    """A loaded image-text model in eval mode, with its preprocessing and tokenizer.

    Attributes:
        name, pretrained: what records call the model (``ViT-B-32``, ``openai``).
        model: the open_clip module (eval mode, on ``device``).
        preprocess: eval transform, PIL image -> float32 tensor (3, H, W).
        tokenizer: list of strings -> int64 token tensor (T, context_length).
        device: torch device string (``cpu``, ``cuda``).
        precision: ``fp32``, ``fp16``, ``bf16`` (weights cast) or ``amp`` (fp32 weights +
            autocast: fp16 on CUDA, bf16 on CPU).
        weights_digest: identifies the weights in feature caches (see :func:`load_model`).
        seed: the seed of a random initialisation, else None.
        quick_gelu: whether the model uses QuickGELU activations.
        logit_scale: the multiplier of cosine similarities, ``exp`` of the learned log scale
            (100.0 for OpenAI's CLIP).
        logit_bias: SigLIP-style additive logit bias, None for CLIP models.
        embed_dim: width D of the projected (shared) embedding.
        pre_projection_dim: width P of the pre-projection image feature.
        pre_projection_kind: ``'before_projection'`` (ViT: pooled feature before ``visual.proj``)
            or ``'embedding'`` (other towers: the unnormalised image embedding).
        image_size: model input (H, W) in pixels.
    """

    name: str
    pretrained: str
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: str
    precision: str
    weights_digest: str
    seed: int | None
    quick_gelu: bool
    logit_scale: float
    logit_bias: float | None
    embed_dim: int
    pre_projection_dim: int
    pre_projection_kind: str
    image_size: tuple[int, int]

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype pixels are cast to before the image tower (the weights' dtype when cast)."""
        return _input_dtype(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for ``amp`` (fp16 on CUDA, bf16 on CPU); a no-op otherwise."""
        if self.precision != "amp":
            return contextlib.nullcontext()
        device_type = torch.device(self.device).type
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=device_type, dtype=dtype)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of preprocessed images in one forward pass of the image tower.

        Args:
            pixels: (B, 3, H, W) float tensor from ``preprocess``, on any device.

        Returns:
            (projected, pre_projection): (B, D) float32 L2-normalised embeddings and (B, P)
            float32 pre-projection features (see ``pre_projection_kind``), on ``device``.
        """
        pixels = pixels.to(self.device, dtype=self.input_dtype, non_blocking=True)
        visual = self.model.visual
        with torch.inference_mode(), self.autocast():
            if self.pre_projection_kind == "before_projection":
                # VisionTransformer.forward (open_clip 3.3.0) split at the projection.
                tokens = visual.transformer(visual._embeds(pixels))
                pre, _ = visual._pool(tokens)
                projected = pre @ visual.proj
            else:
                projected = self.model.encode_image(pixels)
                pre = projected
        return F.normalize(projected.float(), dim=-1), pre.float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Tokenize and encode ``texts`` as one batch; returns (T, D) float32 L2-normalised."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), self.autocast():
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """One line of ``clipbench models``: an architecture, its tags and its OpenAI aliases."""

    name: str
    tags: tuple[str, ...]
    aliases: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# registry


def register_model_configs() -> None:
    """Make clipbench's architecture configs (``clipbench/model_configs/*.json``) known to
    open_clip. Idempotent: the directory is added only while one of its configs is missing."""
    stems = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
    if stems - set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


# At import, so that open_clip's own functions know clipbench's architectures too.
register_model_configs()


def _tags(arch: str) -> list[str]:
    return list(list_pretrained_tags_by_model(arch)) + list(LOCAL_PRETRAINED.get(arch, {}))


def _tag_cfg(arch: str, tag: str) -> dict[str, Any]:
    local = LOCAL_PRETRAINED.get(arch, {}).get(tag)
    if local is not None:
        return {**local, "file": str(PACKAGE_DIR / local["file"])}
    return dict(get_pretrained_cfg(arch, tag))


def list_models() -> list[tuple[str, str]]:
    """Every (architecture, pretrained tag) pair clipbench can load by name."""
    register_model_configs()
    pairs = [tuple(p) for p in open_clip.list_pretrained()]
    pairs += [(arch, tag) for arch, tags in LOCAL_PRETRAINED.items() for tag in tags]
    return pairs


def model_table() -> list[ModelRow]:
    """Rows for ``clipbench models``: every open_clip/clipbench architecture (tags may be empty:
    random initialisation or a checkpoint path only), with the OpenAI aliases that select it."""
    register_model_configs()
    aliases: dict[str, list[str]] = {}
    for alias, arch in OPENAI_ALIASES.items():
        if alias != arch:
            aliases.setdefault(arch, []).append(alias)
    names = dict.fromkeys(list(open_clip.list_models()) + [n for n, _ in open_clip.list_pretrained()])
    return [ModelRow(n, tuple(_tags(n)), tuple(aliases.get(n, ()))) for n in names]


# ---------------------------------------------------------------------------------------------
# resolution


def _unknown_model(name: str) -> ClipbenchError:
    candidates = list(open_clip.list_models()) + list(OPENAI_ALIASES)
    by_lower = {c.lower(): c for c in candidates}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=5)]
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    return ClipbenchError(
        f"Unknown model {name!r}. {hint}Pass an open_clip architecture name (see `clipbench "
        f"models`), an OpenAI name such as ViT-B/32, or an hf-hub:org/repo id."
    )


def _canonical_arch(name: str) -> tuple[str, bool]:
    """(architecture, is_openai_alias) for a user-given model name; raises when unknown."""
    if name in OPENAI_ALIASES:
        return OPENAI_ALIASES[name], True
    known = list(open_clip.list_models())
    if name in known:
        return name, False
    lower = name.lower()
    for alias, arch in OPENAI_ALIASES.items():
        if alias.lower() == lower:
            return arch, True
    for arch in known:
        if arch.lower() == lower:
            return arch, False
    if lower.endswith(_QUICKGELU_SUFFIX):
        try:
            base, _ = _canonical_arch(name[: -len(_QUICKGELU_SUFFIX)])
        except ClipbenchError:
            raise _unknown_model(name) from None
        return base + _QUICKGELU_SUFFIX, False
    raise _unknown_model(name)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(("~", ".")) or value.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _resolve_tag(arch: str, pretrained: str | None, alias: bool) -> str:
    tags = _tags(arch)
    if pretrained is None:
        if alias:
            return "openai"
        if len(tags) == 1:
            return tags[0]
        if not tags:
            raise ClipbenchError(
                f"Model {arch!r} has no pretrained weights in open_clip's registry. Pass "
                f"--pretrained PATH (a checkpoint file), an hf-hub:org/repo id, or "
                f"--pretrained none for a randomly initialised model."
            )
        raise ClipbenchError(
            f"Model {arch!r} has several pretrained weights; choose one with --pretrained: "
            f"{', '.join(tags)}."
        )
    cleaned = pretrained.lower().replace("-", "_")
    for tag in tags:
        if tag == pretrained or tag == cleaned:
            return tag
    close = difflib.get_close_matches(cleaned, tags, n=3)
    hint = f" Closest: {', '.join(close)}." if close else ""
    listed = ", ".join(tags) if tags else "none (use a checkpoint path or --pretrained none)"
    raise ClipbenchError(
        f"Unknown pretrained tag {pretrained!r} for model {arch!r}.{hint} Tags available for "
        f"{arch}: {listed}. --pretrained also accepts an existing checkpoint file path or an "
        f"hf-hub:org/repo id."
    )


def _config_quick_gelu(arch: str) -> bool:
    cfg = open_clip.get_model_config(arch)
    return bool(cfg and cfg.get("quick_gelu", False)) or arch.endswith(_QUICKGELU_SUFFIX)


def _buildable_arch(arch: str) -> str:
    """The config to instantiate: ``X-quickgelu`` without a config of its own builds ``X``
    (QuickGELU is then forced)."""
    if open_clip.get_model_config(arch) is None and arch.endswith(_QUICKGELU_SUFFIX):
        return arch[: -len(_QUICKGELU_SUFFIX)]
    return arch


def _refuse_mismatch(what: str, weights_quick_gelu: bool, arch: str) -> ClipbenchError:
    trained = "QuickGELU" if weights_quick_gelu else "standard GELU"
    other = "standard GELU" if weights_quick_gelu else "QuickGELU"
    return ClipbenchError(
        f"{what} was trained with {trained} activations, but {other} was requested for {arch!r}. "
        f"The model would run without error and silently lose accuracy. Leave the choice to "
        f"clipbench (omit quick_gelu and use the plain architecture name, e.g. "
        f"{arch.removesuffix(_QUICKGELU_SUFFIX)!r}) so the activation matches the weights."
    )


def resolve_model(
    name: str,
    pretrained: str | None = None,
    quick_gelu: bool | None = None,
    cache_dir: Path | None = None,
) -> ModelSource:
    """Decide architecture, weights source and activation without loading any weights.

    Args:
        name: architecture, ``-quickgelu`` variant, OpenAI alias, or ``hf-hub:org/repo``.
        pretrained: tag, checkpoint path, ``hf-hub:`` id, ``'none'``/None (see module doc).
        quick_gelu: force the activation; None lets the weights decide. A value that
            contradicts the weights raises.
        cache_dir: clipbench cache (holds the sha256 table of local checkpoints).

    Raises:
        ClipbenchError: unknown model or tag, missing file, or a QuickGELU mismatch.
    """
    register_model_configs()
    for value in (name, pretrained):
        if value and value.startswith("hf-hub:"):
            if quick_gelu is not None:
                raise ClipbenchError(
                    f"quick_gelu cannot be set for {value}: the repo's open_clip_config.json "
                    f"fixes the architecture. Drop the quick_gelu option."
                )
            return ModelSource(value, value, "hf-hub", None, value)
    arch, alias = _canonical_arch(name)
    config_qg = _config_quick_gelu(arch)
    if quick_gelu is False and config_qg:
        raise ClipbenchError(
            f"Config {arch!r} uses QuickGELU, but quick_gelu=False was requested. Use the "
            f"architecture without the -quickgelu suffix for standard GELU."
        )

    if pretrained is not None and pretrained.lower() == "none":
        qg = config_qg if quick_gelu is None else quick_gelu
        return ModelSource(arch, "none", "random", qg, _buildable_arch(arch))

    if pretrained is not None and not _is_tag(arch, pretrained):
        path = Path(pretrained).expanduser()
        if path.is_file():
            # A QuickGELU config (or quick_gelu=...) is a choice the weights must agree with.
            explicit = quick_gelu if quick_gelu is not None else (True if config_qg else None)
            return _resolve_file(arch, path.resolve(), explicit, cache_dir)
        if _looks_like_path(pretrained):
            raise ClipbenchError(
                f"Checkpoint file {str(path.absolute())!r} does not exist. Pass an existing file to "
                f"--pretrained, or a pretrained tag of {arch} ({', '.join(_tags(arch)) or 'none'})."
            )
        base = arch.removesuffix(_QUICKGELU_SUFFIX)
        if arch.endswith(_QUICKGELU_SUFFIX) and _is_tag(base, pretrained):
            tag = _resolve_tag(base, pretrained, False)
            raise _refuse_mismatch(f"Pretrained tag {base}:{tag}", False, arch)

    tag = _resolve_tag(arch, pretrained, alias)
    cfg = _tag_cfg(arch, tag)
    # The registry flags QuickGELU tags of GELU configs; a QuickGELU config's own tags
    # (roberta-ViT-B-32) were trained with it too.
    needed = bool(cfg.get("quick_gelu", False)) or config_qg
    if quick_gelu is not None and quick_gelu != needed:
        raise _refuse_mismatch(f"Pretrained tag {arch}:{tag}", needed, arch)
    return ModelSource(arch, tag, "tag", needed, _buildable_arch(arch), cfg)


def _is_tag(arch: str, value: str) -> bool:
    cleaned = value.lower().replace("-", "_")
    return any(t in (value, cleaned) for t in _tags(arch))


def _resolve_file(arch: str, path: Path, explicit: bool | None, cache_dir: Path | None) -> ModelSource:
    openai_format = _is_openai_format(path)
    known = openai_format or _known_quick_gelu_file(path, cache_dir)
    if known and explicit is False:
        raise _refuse_mismatch(f"Checkpoint {str(path)!r}", True, arch)
    # Unknown provenance: an open_clip state dict does not record its activation; the config
    # (or quick_gelu=True) decides.
    qg = known or bool(explicit)
    return ModelSource(arch, str(path), "file", qg, _buildable_arch(arch), {}, openai_format)


def _is_openai_format(path: Path) -> bool:
    """TorchScript archive (OpenAI's release format) or a state dict with OpenAI's extra keys."""
    if _is_torchscript(path):
        return True
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip-format checkpoint (legacy pickle): open_clip decides later
            return False
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = checkpoint["state_dict"]
        keys = set(checkpoint) if isinstance(checkpoint, dict) else set()
    return any(k in keys for k in _OPENAI_METADATA_KEYS)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in archive.namelist())


def _known_quick_gelu_file(path: Path, cache_dir: Path | None) -> bool:
    """A copy of a QuickGELU release from open_clip's registry: same sha256 as the release URL
    says, or a file inside the Hugging Face cache folder of such a tag's hub repo."""
    parts = set(path.parts)
    quick = [get_pretrained_cfg(m, t) for m, t in open_clip.list_pretrained()]
    quick = [c for c in quick if c.get("quick_gelu")]
    for cfg in quick:
        repo = cfg.get("hf_hub", "").rstrip("/").split("/")
        if len(repo) >= 2 and f"models--{repo[0]}--{repo[1]}" in parts:
            return True
    digest = file_sha256(path, cache_dir)
    for cfg in quick:
        url = cfg.get("url", "")
        if "openaipublic" in url and url.split("/")[-2] == digest:
            return True
        if "mlfoundations" in url:
            prefix = Path(url).stem.split("-")[-1]
            if prefix and digest.startswith(prefix):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# weights files, digests and the offline guard


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 hex digest of a file, remembered in ``<cache_dir>/weights_sha256.json`` keyed by
    absolute path, size and mtime so that each checkpoint is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    table_path = Path(cache_dir) / _SHA_TABLE if cache_dir is not None else None
    table: dict[str, str] = {}
    if table_path is not None and table_path.is_file():
        try:
            table = json.loads(table_path.read_text())
        except (OSError, json.JSONDecodeError):
            table = {}
        if key in table:
            return table[key]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    digest = sha.hexdigest()
    if table_path is not None:
        table[key] = digest
        table_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=table_path.parent, prefix=".sha256.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, table_path)
    return digest


def _cached_blob_digest(path: Path) -> str:
    """``sha256=...`` for a Hugging Face cache file (LFS blobs are named by their sha256), else
    ``size=...,mtime=...`` (cheap; a new download changes it)."""
    blob = Path(path).resolve()
    name = blob.name
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return f"sha256={name}"
    stat = blob.stat()
    return f"size={stat.st_size},mtime={stat.st_mtime_ns}"


def _hub_cache_dir(hub_cache_dir: Path | None) -> Path:
    from huggingface_hub import constants

    return Path(hub_cache_dir) if hub_cache_dir is not None else Path(constants.HF_HUB_CACHE)


def _from_hub_cache(repo: str, filenames: tuple[str, ...], hub_cache_dir: Path | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        hit = try_to_load_from_cache(repo, filename, cache_dir=_hub_cache_dir(hub_cache_dir))
        if isinstance(hit, str):
            return Path(hit)
    return None


def _offline_reason(host: str, allow_download: bool) -> str | None:
    """Why downloads are impossible now, or None when they may be attempted."""
    if not allow_download:
        return "downloads are disabled (--no-download)"
    if offline():
        set_vars = [f"{v}={os.environ[v]}" for v in OFFLINE_ENV_VARS if os.environ.get(v, "").strip()]
        return f"{', '.join(set_vars)} declares the network unavailable"
    if not network_reachable(host, 443, timeout=PROBE_TIMEOUT_S):
        return f"{host}:443 could not be reached (TCP probe, {PROBE_TIMEOUT_S:g} s timeout)"
    return None


def _tag_hub_repo(cfg: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(repo id, candidate file names in open_clip's order) of a tag's ``hf_hub`` entry."""
    repo, filename = os.path.split(cfg["hf_hub"])
    if not filename or filename == _HF_WEIGHT_FILES[1]:
        return repo, _HF_WEIGHT_FILES
    if filename.endswith((".bin", ".pth")):
        return repo, (filename[:-4] + ".safetensors", filename)
    return repo, (filename,)


def _tag_checkpoint(source: ModelSource, hub_cache_dir: Path | None,
                    allow_download: bool) -> tuple[Path, str]:
    """Local path of a tag's weights (cached, packaged, or downloaded now) and its digest."""
    cfg = source.tag_cfg
    label = f"{source.name}:{source.pretrained}"
    if "file" in cfg:
        path = Path(cfg["file"])
        if not path.is_file():
            raise ClipbenchError(
                f"The packaged weights of {label} are missing: expected {path}. Reinstall "
                f"clipbench, or pass another checkpoint with --pretrained PATH."
            )
        return path, f"sha256={file_sha256(path)}"
    if cfg.get("hf_hub"):
        repo, files = _tag_hub_repo(cfg)
        cached = _from_hub_cache(repo, files, hub_cache_dir)
        where = f"the Hugging Face hub cache {_hub_cache_dir(hub_cache_dir)}"
        needed = f"{' or '.join(files)} from the Hugging Face hub repo {repo} (https://huggingface.co/{repo})"
        host = PROBE_HOST
    else:
        url = cfg["url"]
        clip_cache = Path(hub_cache_dir) if hub_cache_dir else Path("~/.cache/clip").expanduser()
        candidate = clip_cache / os.path.basename(url)
        cached = candidate if candidate.is_file() else None
        where = f"{clip_cache}"
        needed = f"{os.path.basename(url)} from {url}"
        host = url.split("/")[2]
    if cached is None:
        reason = _offline_reason(host, allow_download)
        if reason is not None:
            alt = f" (OpenAI's original file {cfg['url']} also works)" if "openaipublic" in cfg.get("url", "") else ""
            raise ClipbenchError(
                f"The weights of {label} are not on this machine and cannot be downloaded: "
                f"{reason}. clipbench needs {needed} and looked in {where}. Run the same command "
                f"once with network access (the file is cached for later offline runs), or "
                f"download the file elsewhere and pass it with --pretrained PATH --model "
                f"{source.name}{alt}."
            )
        log.info("downloading the weights of %s", label)
        try:
            cached = Path(download_pretrained(
                cfg, cache_dir=str(hub_cache_dir) if hub_cache_dir else None))
        except Exception as error:
            raise ClipbenchError(
                f"Downloading the weights of {label} failed ({error}). clipbench needs {needed}; "
                f"download it and pass it with --pretrained PATH --model {source.name}."
            ) from error
    return cached, _cached_blob_digest(cached)


# ---------------------------------------------------------------------------------------------
# loading


def _input_dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def _resolve_device(device: str) -> str:
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


def _seeded(seed: int) -> contextlib.AbstractContextManager:
    """Seed the random initialisation without touching the caller's RNG state."""
    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    return scope()


def _load_openai_weights(model: torch.nn.Module, path: Path) -> None:
    """Load an OpenAI-format checkpoint strictly, minus its metadata entries and the buffers
    (``attn_mask``) that TorchScript saves but the open_clip module rebuilds itself."""
    if _is_torchscript(path):
        with warnings.catch_warnings():
            # OpenAI released TorchScript; torch's deprecation notice is not actionable here.
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = open_clip.factory.load_state_dict(str(path))
    expected = model.state_dict()
    rebuilt = {name for name, _ in model.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in _OPENAI_METADATA_KEYS and k not in rebuilt}
    model.load_state_dict(state, strict=True)


def _preprocess_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    # open_clip merges a tag's preprocessing only when it downloads the tag itself; clipbench
    # passes the file, so it hands the same keys over (size always follows the model).
    return {k: v for k, v in merge_preprocess_dict({}, cfg).items() if k != "size"}


def _build(source: ModelSource, device: str, precision: str, seed: int, hub_cache_dir: Path | None,
           cache_dir: Path | None, allow_download: bool) -> tuple[torch.nn.Module, Any, str]:
    """(open_clip model, tokenizer, weights digest) for a resolved source."""
    oc_precision = "fp32" if precision == "amp" else precision
    common = dict(precision=oc_precision, device=device, force_quick_gelu=bool(source.quick_gelu))
    if source.kind == "random":
        with _seeded(seed):
            model = open_clip.create_model(source.arch, pretrained=None, **common)
        return model, open_clip.get_tokenizer(source.arch), f"random:{seed}"
    if source.kind == "hf-hub":
        return _build_hf_hub(source, oc_precision, device, hub_cache_dir, allow_download)
    if source.kind == "tag":
        path, file_digest = _tag_checkpoint(source, hub_cache_dir, allow_download)
        digest = f"{source.name}:{source.pretrained}:{file_digest}"
        overrides = _preprocess_overrides(source.tag_cfg)
    else:
        path = Path(source.pretrained)
        digest = f"sha256:{file_sha256(path, cache_dir)}"
        overrides = {}
    try:
        if source.openai_format or _is_torchscript(path):
            with _seeded(seed):
                model = open_clip.create_model(source.arch, pretrained=None, **common)
            _load_openai_weights(model, path)
        else:
            model = open_clip.create_model(source.arch, pretrained=str(path),
                                           force_preprocess_cfg=overrides, **common)
    except (RuntimeError, KeyError, ValueError) as error:
        first = str(error).strip().splitlines()[0][:300]
        raise ClipbenchError(
            f"Could not load the weights {path} into architecture {source.arch!r}: {first}. "
            f"Check that --model names the architecture the checkpoint was trained with."
        ) from error
    return model, open_clip.get_tokenizer(source.arch), digest


def _build_hf_hub(source: ModelSource, precision: str, device: str, hub_cache_dir: Path | None,
                  allow_download: bool) -> tuple[torch.nn.Module, Any, str]:
    repo = source.name.removeprefix("hf-hub:")
    config = _from_hub_cache(repo, (_HF_CONFIG_FILE,), hub_cache_dir)
    weights = _from_hub_cache(repo, _HF_WEIGHT_FILES, hub_cache_dir)
    if config is not None and weights is not None:
        # Everything is local: load the snapshot folder, so nothing touches the network.
        identifier = f"local-dir:{config.parent}"
    else:
        reason = _offline_reason(PROBE_HOST, allow_download)
        if reason is not None:
            raise ClipbenchError(
                f"The model {source.name} is not on this machine and cannot be downloaded: "
                f"{reason}. clipbench needs {_HF_CONFIG_FILE} and {' or '.join(_HF_WEIGHT_FILES)} "
                f"from https://huggingface.co/{repo} and looked in the Hugging Face hub cache "
                f"{_hub_cache_dir(hub_cache_dir)}. Run the same command once with network "
                f"access, or download the repo and pass its weights with --pretrained PATH and "
                f"the matching --model."
            )
        identifier = source.name
    cache = str(hub_cache_dir) if hub_cache_dir else None
    try:
        model = open_clip.create_model(identifier, precision=precision, device=device,
                                       cache_dir=cache, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(identifier, cache_dir=cache)
    except (RuntimeError, OSError, ValueError) as error:
        raise ClipbenchError(f"Could not load {source.name}: {error}") from error
    weights = weights or _from_hub_cache(repo, _HF_WEIGHT_FILES, hub_cache_dir)
    digest = f"{source.name}:{_cached_blob_digest(weights)}" if weights else source.name
    return model, tokenizer, digest


def _dims(model: torch.nn.Module, image_size: tuple[int, int], device: str,
          input_dtype: torch.dtype) -> tuple[int, int, str]:
    """(embed_dim, pre_projection_dim, pre_projection_kind) of the image tower."""
    visual = model.visual
    if isinstance(visual, VisionTransformer) and visual.proj is not None:
        width, dim = visual.proj.shape
        return int(dim), int(width), "before_projection"
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        with torch.inference_mode():
            dim = model.encode_image(torch.zeros(1, 3, *image_size, device=device,
                                                 dtype=input_dtype)).shape[-1]
    return int(dim), int(dim), "embedding"


def load_model(
    name: str,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "amp",
    cache_dir: Path | None = None,
    *,
    quick_gelu: bool | None = None,
    seed: int = 0,
    hub_cache_dir: Path | None = None,
    allow_download: bool = True,
) -> ClipModel:
    """Load a model for evaluation (eval mode, on ``device``, in ``precision``).

    Args:
        name, pretrained, quick_gelu: see :func:`resolve_model` and the module docstring.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``; ``fp16``/``bf16`` (weights cast, as open_clip's ``precision``);
            ``amp`` (fp32 weights, autocast fp16 on CUDA, bf16 on CPU).
        cache_dir: clipbench cache for the sha256 table of local checkpoints (default
            :func:`clipbench.paths.default_cache_dir`).
        seed: seed of a random initialisation (``pretrained='none'``).
        hub_cache_dir: where pretrained tags are looked up and downloaded (default: the Hugging
            Face hub cache, ``HF_HUB_CACHE``).
        allow_download: False fails, like offline mode, when the weights are not cached.

    ``weights_digest``: ``<name>:<tag>:sha256=<hex>`` for a tag (the hub cache names LFS blobs by
    sha256; otherwise ``size=...,mtime=...``), ``sha256:<hex>`` for a local file (hashed once,
    remembered in ``cache_dir``), ``hf-hub:org/repo:sha256=<hex>``, ``random:<seed>``.

    Raises:
        ClipbenchError: bad name, tag, device, precision, missing weights while offline, or a
            checkpoint that does not fit the architecture.
    """
    if precision not in PRECISIONS:
        raise ClipbenchError(f"Unknown precision {precision!r}. Use one of {', '.join(PRECISIONS)}.")
    device = _resolve_device(device)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    source = resolve_model(name, pretrained, quick_gelu, cache_dir)
    model, tokenizer, digest = _build(source, device, precision, seed, hub_cache_dir, cache_dir,
                                      allow_download)
    model.eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    image_size = tuple(int(s) for s in to_2tuple(model.visual.image_size))
    embed_dim, pre_dim, kind = _dims(model, image_size, device, _input_dtype(precision))
    bias = getattr(model, "logit_bias", None)
    quick = any(isinstance(m, QuickGELU) for m in model.modules())
    log.info("loaded %s (%s) on %s, %s, QuickGELU=%s, weights %s", source.name, source.pretrained,
             device, precision, quick, digest)
    return ClipModel(
        name=source.name,
        pretrained=source.pretrained,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        weights_digest=digest,
        seed=seed if source.kind == "random" else None,
        quick_gelu=quick,
        logit_scale=float(model.logit_scale.detach().float().exp().item()),
        logit_bias=None if bias is None else float(bias.detach().float().item()),
        embed_dim=embed_dim,
        pre_projection_dim=pre_dim,
        pre_projection_kind=kind,
        image_size=image_size,
    )
