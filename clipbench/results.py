"""Result records: one strict-JSON file per (model, pretrained, dataset, task), written atomically.

Layout: ``<output>/<model>__<pretrained>/<dataset>/<task>.json`` with sidecars beside it
(``<task>.per_class.json``). A record is never half-written: it is written to a temporary file in
the same directory and renamed into place, so a crash leaves either the old file or none.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_open
from .errors import ClipbenchError

SCHEMA_VERSION = 2
#: Bumped whenever a metric's definition or a task's protocol changes: part of every record's
#: settings digest, so a rerun recomputes records made under the old definition.
METRIC_VERSION = 1
#: Records replaced because their settings changed are kept under this suffix (reports skip them).
SUPERSEDED_SUFFIX = ".superseded.json"


@dataclass
class Record:
    """One evaluation result (see docs/architecture.md for every field)."""

    model: str
    pretrained: str
    dataset: str
    task: str
    split: str
    metrics: dict[str, float]
    primary_metric: str
    n_samples: int
    confidence_intervals: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def primary_value(self) -> float:
        return self.metrics[self.primary_metric]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_name(text: str) -> str:
    """A filesystem-safe version of a model / tag / dataset name."""
    return re.sub(r"[^A-Za-z0-9._@=-]+", "-", text).strip("-") or "none"


def record_dir(output: Path, model: str, pretrained: str, dataset: str) -> Path:
    return Path(output) / f"{safe_name(model)}__{safe_name(pretrained)}" / safe_name(dataset)


def record_path(output: Path, model: str, pretrained: str, dataset: str, task: str) -> Path:
    return record_dir(output, model, pretrained, dataset) / f"{safe_name(task)}.json"


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples; refuse NaN/inf so records stay strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"non-finite value {value} cannot go into a result record")
        return value
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :mod:`clipbench.atomic`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(payload), indent=2, allow_nan=False, sort_keys=False) + "\n")


def write_record(record: Record, output: Path, per_class: Any | None = None) -> Path:
    """Write the record (and its per-class sidecar) atomically; returns the record's path."""
    if not record.created:
        record.created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    path = record_path(output, record.model, record.pretrained, record.dataset, record.task)
    if per_class is not None:
        atomic_write_json(path.with_name(f"{path.stem}.per_class.json"), per_class)
    atomic_write_json(path, record.to_dict())
    return path


def read_record(path: Path) -> Record:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return Record(**data)


def existing_record(output: Path, model: str, pretrained: str, dataset: str, task: str) -> Record | None:
    """The stored record for this key, or None (an unreadable file counts as missing)."""
    path = record_path(output, model, pretrained, dataset, task)
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except (ValueError, TypeError):
        return None


def supersede(path: Path, digest: str) -> Path:
    """Move the record at ``path`` (and its per-class sidecar) aside before it is replaced by one
    computed under other settings: ``<task>.<digest>.superseded.json`` (and
    ``<task>.<digest>.superseded.per_class.json``). Returns the record's new path."""
    path = Path(path)
    kept = path.with_name(f"{path.stem}.{safe_name(digest)}{SUPERSEDED_SUFFIX}")
    sidecar = path.with_name(f"{path.stem}.per_class.json")
    if sidecar.is_file():
        sidecar.replace(kept.with_name(f"{kept.name.removesuffix('.json')}.per_class.json"))
    path.replace(kept)
    return kept


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short list of the settings that differ between two record configs, for a log line."""
    keys = [k for k in new if k != "settings_digest" and old.get(k) != new[k]]
    if not keys:
        return "the record predates settings digests" if "settings_digest" not in old else "clipbench's digest rule"
    return ", ".join(f"{k}: {old.get(k, '(absent)')!s:.40} -> {new[k]!s:.40}" for k in keys)


def ensure_writable(directory: Path, flag: str) -> None:
    """Create ``directory`` and check a file can be written there, before any work is done.

    Raises:
        ClipbenchError: naming the flag and the reason (a file in the way, no permission, ...).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_open(directory / ".clipbench-write-check", "w") as f:
            f.write("ok")
        (directory / ".clipbench-write-check").unlink()
    except OSError as exc:
        raise ClipbenchError(
            f"{flag} {directory} cannot be written ({exc.strerror or exc}). Pass a directory you can "
            "write to; nothing was computed yet."
        ) from None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("clipbench", "torch", "torchvision", "open_clip_torch", "datasets", "scikit-learn", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
