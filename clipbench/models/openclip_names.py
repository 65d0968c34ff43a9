"""open_clip model names: OpenAI aliases, clipbench's own architectures and weights, name and
tag resolution, and the QuickGELU policy (:func:`resolve_model`).

Resolution rules:

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
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import open_clip
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

from clipbench.errors import ClipbenchError
from clipbench.models.weights import checkpoint_shapes, file_sha256, is_openai_format
from clipbench.paths import package_dir
from clipbench.reference import OPENAI_ALIASES

MODEL_CONFIG_DIR = package_dir() / "model_configs"


#: clipbench's own pretrained weights: architecture -> tag -> entry. ``file`` is relative to the
#: package directory; ``quick_gelu`` the activation the weights were trained with; optional
#: preprocessing keys (``mean``, ``std``, ``interpolation``, ``resize_mode``) override open_clip's.
LOCAL_PRETRAINED: dict[str, dict[str, dict[str, Any]]] = {
    "clipbench-tiny": {
        "synthetic": {"file": "weights/clipbench-tiny-synthetic.pt", "quick_gelu": False},
    },
}

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


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """One line of ``clipbench models``: an architecture, its tags and its OpenAI aliases."""

    name: str
    tags: tuple[str, ...]
    aliases: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# architectures and tags


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
        return {**local, "file": str(package_dir() / local["file"])}
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
        if path.is_dir():
            checkpoint_shapes(path)  # raises: a directory is not a checkpoint, and says which file
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
    openai_format = is_openai_format(path)
    known = openai_format or _known_quick_gelu_file(path, cache_dir)
    if known and explicit is False:
        raise _refuse_mismatch(f"Checkpoint {str(path)!r}", True, arch)
    # Unknown provenance: an open_clip state dict does not record its activation; the config
    # (or quick_gelu=True) decides.
    qg = known or bool(explicit)
    return ModelSource(arch, str(path), "file", qg, _buildable_arch(arch), {}, openai_format)


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


