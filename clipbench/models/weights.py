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
import math
import os
import pickle
import re
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
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in archive.namelist())
    except zipfile.BadZipFile:  # damaged: checkpoint_shapes says how
        return False


#: What to do about a checkpoint that cannot be read (said after what is wrong with it).
_REFETCH = ("Download or copy the file again (compare its size or sha256 with the source), or pass "
            "another checkpoint with --pretrained PATH.")


def _bad_checkpoint(path: Path, problem: str, fix: str = _REFETCH) -> ClipbenchError:
    return ClipbenchError(f"Checkpoint {path} {problem}. {fix}")


def _unpickling_problem(error: Exception) -> str:
    """What torch's safe loader refused, in clipbench's words (torch's own text suggests
    ``weights_only=False``, which would run whatever code the file holds)."""
    code = re.search(r"GLOBAL ([\w.]+)", str(error))
    if code:
        return f"holds Python objects, not only tensors (it references {code.group(1)})"
    return "is not a readable PyTorch checkpoint (the pickle inside is truncated or garbage)"


def _torch_state(path: Path) -> Any:
    """``torch.load`` with the safe loader; every failure becomes a :class:`ClipbenchError`."""
    try:
        # mmap reads only the archive's index; legacy (pre-zip) files cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        if re.search(r"GLOBAL ([\w.]+)", str(error)):
            raise _bad_checkpoint(
                path, _unpickling_problem(error),
                "clipbench loads checkpoints with torch's safe loader and never runs code stored in "
                "one. If you trust the file, re-save its weights alone where it was made "
                "(torch.save(model.state_dict(), PATH) or safetensors) and pass that file.") from None
        raise _bad_checkpoint(path, _unpickling_problem(error)) from None
    except EOFError:
        raise _bad_checkpoint(path, "ends early (truncated)") from None
    except RuntimeError as error:
        text = str(error)
        if "data.pkl" in text or "not in a subdirectory" in text:
            raise _bad_checkpoint(path, "is a zip archive but not a PyTorch checkpoint "
                                  "(no data.pkl inside)") from None
        if "central directory" in text or "zip archive" in text:
            raise _bad_checkpoint(path, "is a damaged zip archive (truncated, or not a PyTorch "
                                  "checkpoint)") from None
        raise _bad_checkpoint(path, f"cannot be read by torch ({text.splitlines()[0][:200]})") from None
    except (IndexError, KeyError, ValueError, UnicodeDecodeError, OverflowError) as error:
        # the safe unpickler fed random bytes fails in many ways; all mean the same to a user
        raise _bad_checkpoint(path, "is not a readable PyTorch checkpoint (the pickle inside is truncated "
                              f"or garbage: {type(error).__name__})") from None


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint file (PyTorch state dict, ``{"state_dict": ...}``
    wrapper, ``module.``-prefixed keys, or safetensors), read without running code stored in it
    and without reading the tensors' data where the format allows (safetensors, zip archives).
    Non-tensor entries (OpenAI's :data:`OPENAI_METADATA_KEYS`) map to ``()``.

    Raises:
        ClipbenchError: the path is a directory, empty, truncated, garbage, a zip that is not a
            checkpoint, a pickle holding code, or holds no tensors; naming the file and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise _bad_checkpoint(path, "is a directory", "Pass the weights file itself (.pt, .bin or "
                              ".safetensors), e.g. the open_clip_pytorch_model.bin inside it.")
    size = path.stat().st_size
    if size == 0:
        raise _bad_checkpoint(path, "is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as error:
            raise _bad_checkpoint(path, f"is not a valid safetensors file ({error})") from None
    else:
        state = _torch_state(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise _bad_checkpoint(path, f"holds a {type(state).__name__}, not a state dict (a mapping "
                                  "of parameter names to tensors)",
                                  "Save the model's weights with torch.save(model.state_dict(), PATH).")
        odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)
               and not (k in OPENAI_METADATA_KEYS and isinstance(v, int))]
        if odd:
            raise _bad_checkpoint(path, f"holds {type(state[odd[0]]).__name__} under {odd[0]!r}, not a "
                                  "tensor: it is not a state dict",
                                  "Save the model's weights with torch.save(model.state_dict(), PATH).")
        shapes = {(k[7:] if k.startswith("module.") else k): tuple(v.shape) if isinstance(v, torch.Tensor)
                  else () for k, v in state.items()}
    if not shapes:
        raise _bad_checkpoint(path, "holds no tensors")
    return shapes


def is_openai_format(path: Path) -> bool:
    """TorchScript archive or a state dict with OpenAI's extra keys.

    Raises:
        ClipbenchError: the file is not a readable checkpoint (see :func:`checkpoint_shapes`).
    """
    if is_torchscript(path):
        return True
    if Path(path).suffix in (".npz", ".npy"):  # big_vision (SigLIP) weights, read by open_clip
        return False
    return any(k in checkpoint_shapes(path) for k in OPENAI_METADATA_KEYS)


def describe_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                      shown: int = 3) -> str:
    """What differs between an architecture's parameters and a checkpoint's, in one sentence
    (empty when nothing does). Scalars stored as 1-element tensors count as the same shape."""
    def listed(names: list[str]) -> str:
        more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(OPENAI_METADATA_KEYS))
    reshaped = [k for k in sorted(set(expected) & set(found)) if expected[k] != found[k]
                and not (math.prod(expected[k]) == math.prod(found[k]) == 1)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) of the architecture missing from the file ({listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} entry(ies) the architecture does not have ({listed(unexpected)})")
    if reshaped:
        shapes = [f"{k}: file {list(found[k])}, architecture {list(expected[k])}" for k in reshaped]
        parts.append(f"{len(reshaped)} of another shape ({listed(shapes)})")
    return "; ".join(parts)


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
