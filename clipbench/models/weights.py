"""Checkpoint files: their formats, digests, the Hugging Face hub cache and the offline guard.

Pretrained weights are looked up in the local cache first. When they are missing and the network
is declared unavailable (:data:`clipbench.paths.OFFLINE_ENV_VARS`) or a 2-second TCP probe of
the download host fails, loading stops with a :class:`~clipbench.errors.ClipbenchError` saying
which file is needed and how to provide it, instead of waiting through the downloaders' retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from clipbench.atomic import atomic_open
from clipbench.errors import ClipbenchError
from clipbench.paths import network_reachable, offline_settings

log = logging.getLogger(__name__)

#: Host probed (TCP, 2 s) before a download when no offline variable is set.
PROBE_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 2.0

#: Entries OpenAI's TorchScript checkpoints carry besides the weights; open_clip's CLIP has none.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
#: open_clip's weight files in a hub repo, in the order open_clip tries them.
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG_FILE = "open_clip_config.json"
_SHA_TABLE = "weights_sha256.json"


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
        with atomic_open(table_path, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    return digest


def cached_blob_digest(path: Path) -> str:
    """``sha256=...`` for a Hugging Face cache file (LFS blobs are named by their sha256), else
    ``size=...,mtime=...`` (cheap; a new download changes it)."""
    blob = Path(path).resolve()
    name = blob.name
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return f"sha256={name}"
    stat = blob.stat()
    return f"size={stat.st_size},mtime={stat.st_mtime_ns}"


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (the format OpenAI released CLIP in)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in archive.namelist())


def is_openai_format(path: Path) -> bool:
    """TorchScript archive or a state dict with OpenAI's extra keys."""
    if is_torchscript(path):
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
    return any(k in keys for k in OPENAI_METADATA_KEYS)


def hub_cache_dir(override: Path | None) -> Path:
    """``override``, else the Hugging Face hub cache (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(override) if override is not None else Path(constants.HF_HUB_CACHE)


def from_hub_cache(repo: str, filenames: tuple[str, ...], cache: Path | None) -> Path | None:
    """The first of ``filenames`` present in the hub cache for ``repo``, else None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        hit = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(cache))
        if isinstance(hit, str):
            return Path(hit)
    return None


def offline_reason(host: str, allow_download: bool) -> str | None:
    """Why downloads are impossible now, or None when they may be attempted."""
    if not allow_download:
        return "downloads are disabled (--no-download)"
    declared = offline_settings()
    if declared:
        return f"{', '.join(declared)} declares the network unavailable"
    if not network_reachable(host, 443, timeout=PROBE_TIMEOUT_S):
        return f"{host}:443 could not be reached (TCP probe, {PROBE_TIMEOUT_S:g} s timeout)"
    return None


def _tag_hub_repo(cfg: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(repo id, candidate file names in open_clip's order) of a tag's ``hf_hub`` entry."""
    repo, filename = os.path.split(cfg["hf_hub"])
    if not filename or filename == HF_WEIGHT_FILES[1]:
        return repo, HF_WEIGHT_FILES
    if filename.endswith((".bin", ".pth")):
        return repo, (filename[:-4] + ".safetensors", filename)
    return repo, (filename,)


def tag_checkpoint(cfg: dict[str, Any], arch: str, tag: str, cache: Path | None,
                   allow_download: bool) -> tuple[Path, str]:
    """Local path of a pretrained tag's weights (packaged, cached, or downloaded now) and its
    digest. ``cfg`` is the tag's registry entry (``file``, ``hf_hub`` or ``url``)."""
    label = f"{arch}:{tag}"
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
        cached = from_hub_cache(repo, files, cache)
        where = f"the Hugging Face hub cache {hub_cache_dir(cache)}"
        needed = f"{' or '.join(files)} from the Hugging Face hub repo {repo} (https://huggingface.co/{repo})"
        host = PROBE_HOST
    else:
        url = cfg["url"]
        clip_cache = Path(cache) if cache else Path("~/.cache/clip").expanduser()
        candidate = clip_cache / os.path.basename(url)
        cached = candidate if candidate.is_file() else None
        where = f"{clip_cache}"
        needed = f"{os.path.basename(url)} from {url}"
        host = url.split("/")[2]
    if cached is None:
        reason = offline_reason(host, allow_download)
        if reason is not None:
            alt = f" (OpenAI's original file {cfg['url']} also works)" if "openaipublic" in cfg.get("url", "") else ""
            raise ClipbenchError(
                f"The weights of {label} are not on this machine and cannot be downloaded: "
                f"{reason}. clipbench needs {needed} and looked in {where}. Run the same command "
                f"once with network access (the file is cached for later offline runs), or "
                f"download the file elsewhere and pass it with --pretrained PATH --model "
                f"{arch}{alt}."
            )
        from open_clip.pretrained import download_pretrained

        log.info("downloading the weights of %s", label)
        try:
            cached = Path(download_pretrained(cfg, cache_dir=str(cache) if cache else None))
        except Exception as error:
            raise ClipbenchError(
                f"Downloading the weights of {label} failed ({error}). clipbench needs {needed}; "
                f"download it and pass it with --pretrained PATH --model {arch}."
            ) from error
    return cached, cached_blob_digest(cached)
