"""Where clipbench finds its packaged data and keeps its caches.

Dataset specs, templates and the paper's reference tables sit at the top of a source checkout
(`dataset_specs/`, `templates/`, `reference/`) and inside the installed package
(`clipbench/dataset_specs`, ...) in a wheel; both layouts are looked up, package first.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _packaged_dir(installed_name: str, checkout_relpath: str) -> Path:
    for candidate in (_PACKAGE_DIR / installed_name, _PACKAGE_DIR.parent / checkout_relpath):
        if candidate.is_dir():
            return candidate
    return _PACKAGE_DIR.parent / checkout_relpath


def specs_dir() -> Path:
    """Directory holding the packaged dataset specs (`*.yaml`)."""
    return _packaged_dir("dataset_specs", "dataset_specs")


def templates_dir() -> Path:
    """Directory holding classnames and prompt templates, one sub-directory per dataset."""
    return _packaged_dir("templates", "templates")


def reference_dir() -> Path:
    """Directory holding the CLIP paper's reference tables (CSV)."""
    return _packaged_dir("reference", "reference")


def package_dir() -> Path:
    return _PACKAGE_DIR


def default_cache_dir() -> Path:
    """`$CLIPBENCH_CACHE`, else `$XDG_CACHE_HOME/clipbench`, else `~/.cache/clipbench`."""
    if os.environ.get("CLIPBENCH_CACHE"):
        return Path(os.environ["CLIPBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "clipbench"


def default_data_root() -> Path:
    """`$CLIPBENCH_DATA_ROOT`, else `<cache dir>/data`."""
    if os.environ.get("CLIPBENCH_DATA_ROOT"):
        return Path(os.environ["CLIPBENCH_DATA_ROOT"]).expanduser()
    return default_cache_dir() / "data"


#: Environment variables any of which, set to a true value, declares the network unavailable.
OFFLINE_ENV_VARS = ("CLIPBENCH_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_settings() -> list[str]:
    """``VAR=value`` for each offline variable that is set to a true value (for messages)."""
    return [
        f"{var}={os.environ[var]}" for var in OFFLINE_ENV_VARS
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
    ]


def offline() -> bool:
    """True when the user (or CI) declared the network unavailable."""
    return bool(offline_settings())


def network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    """A quick TCP probe, so that a download on a machine without network fails in seconds
    instead of after the libraries' own retries (~45 s for open_clip, ~23 s for `datasets`)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
