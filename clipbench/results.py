"""Result records: one strict-JSON file per (model, pretrained, dataset, task), written atomically.

Layout: ``<output>/<model>__<pretrained>/<dataset>/<task>.json`` with sidecars beside it
(``<task>.per_class.json``; ``<task>.samples.npz``, per-sample outputs: :mod:`clipbench.sidecars`).
A record is never half-written: it is written to a temporary file in the same directory and
renamed into place, so a crash leaves either the old file or none.
`load_records` reads such a tree (and clip_benchmark result files) back into one DataFrame for reports.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from clipbench.atomic import atomic_open
from clipbench.errors import ClipbenchError
from clipbench.interop import from_clip_benchmark, is_clip_benchmark_result
from clipbench.lazy import pandas as pd
from clipbench.reference import DatasetLookup
from clipbench.sidecars import PerSample, sidecar_path, write_sample_outputs

log = logging.getLogger(__name__)

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
    #: ids of samples left out as unreadable (``--on-bad-image skip``), of every split the record
    #: used; ``n_samples`` counts the evaluated test samples only. Older records lack it: empty.
    skipped: list[str] = field(default_factory=list)
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


def write_record(record: Record, output: Path, per_class: Any | None = None,
                 per_sample: PerSample | None = None, sample_ids: Sequence[str] | None = None) -> Path:
    """Write the record and its sidecars atomically, sidecars first; returns the record's path.

    ``per_sample`` (with ``sample_ids``, the test split's ids in the same order) goes to
    ``<task>.samples.npz`` (:mod:`clipbench.sidecars`; ``per_sample.ids``, when set, name its units
    instead); without it, a stale one is removed.
    """
    if not record.created:
        record.created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    path = record_path(output, record.model, record.pretrained, record.dataset, record.task)
    if per_class is not None:
        atomic_write_json(path.with_name(f"{path.stem}.per_class.json"), per_class)
    samples = sidecar_path(path)
    if per_sample is not None:
        if sample_ids is None:
            raise ValueError("per-sample outputs need the sample ids they belong to")
        write_sample_outputs(samples, per_sample, per_sample.ids if per_sample.ids is not None else sample_ids)
    else:
        samples.unlink(missing_ok=True)
    atomic_write_json(path, record.to_dict())
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(obj: Any) -> str | None:
    """Why a record (a parsed JSON object) cannot be reported or reused, or None when it can:
    a known ``schema_version`` (<= :data:`SCHEMA_VERSION`; absent in the oldest records), string
    ``model`` / ``dataset`` / ``task``, ``metrics`` a mapping of finite numbers that holds the
    ``primary_metric`` (few-shot records: or ``details.k``), confidence intervals as
    ``[low, high]`` pairs, few-shot ``details.k`` entries with a finite ``mean``."""
    if not isinstance(obj, Mapping):
        return f"a JSON {type(obj).__name__}, not a record object"
    version = obj.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        return (f"schema_version {version!r} is not one this clipbench reads (1 to {SCHEMA_VERSION}); "
                "it was written by another clipbench version")
    missing = [k for k in ("model", "dataset", "task", "metrics", "primary_metric") if k not in obj]
    if missing:
        return f"required field(s) {', '.join(missing)} missing"
    for key in ("model", "dataset", "task", "primary_metric"):
        if not isinstance(obj[key], str):
            return f"{key} is {obj[key]!r}, not a string"
    metrics = obj["metrics"]
    if not isinstance(metrics, Mapping):
        return f"metrics is a {type(metrics).__name__}, not a mapping of metric names to numbers"
    bad = next((k for k, v in metrics.items() if not _finite(v)), None)
    if bad is not None:
        return f"metric {bad} is {metrics[bad]!r}, not a finite number"
    intervals = obj.get("confidence_intervals") or {}
    if not isinstance(intervals, Mapping) or not all(
            isinstance(v, (list, tuple)) and len(v) == 2 and all(_finite(x) for x in v)
            for v in intervals.values()):
        return "confidence_intervals is not a mapping of metric names to [low, high] pairs"
    details = obj.get("details") or {}
    if not isinstance(details, Mapping):
        return f"details is a {type(details).__name__}, not a mapping"
    shots = details.get("k") if obj["task"] == "few_shot" else None
    if shots is not None and not (isinstance(shots, Mapping) and all(
            str(k).isdigit() and isinstance(v, Mapping) and _finite(v.get("mean"))
            and _finite(v.get("std", 0.0)) for k, v in shots.items())):
        return "details.k is not a mapping of shot counts to {mean, std} numbers"
    # few-shot records report one number per k (details.k); schema 1 kept no metrics for them
    if obj["primary_metric"] not in metrics and not shots:
        return f"the primary metric {obj['primary_metric']} is not among its metrics {sorted(metrics)}"
    return None


_REQUIRED_FIELDS = tuple(f.name for f in fields(Record)
                         if f.default is MISSING and f.default_factory is MISSING)


def read_record(path: Path) -> Record:
    """The record stored at ``path``.

    Raises:
        ValueError: not JSON, or not a valid record (:func:`record_problem`, a missing field or
            one :class:`Record` does not have), naming what is wrong.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    problem = record_problem(data)
    if problem is None:
        missing = [k for k in _REQUIRED_FIELDS if k not in data]
        unknown = sorted(set(data) - {f.name for f in fields(Record)})
        problem = (f"required field(s) {', '.join(missing)} missing" if missing else
                   f"unknown field(s) {', '.join(unknown)}" if unknown else None)
    if problem is not None:
        raise ValueError(problem)
    return Record(**data)


def existing_record(output: Path, model: str, pretrained: str, dataset: str, task: str) -> Record | None:
    """The stored record for this key, or None. An unreadable or invalid file counts as missing,
    with one warning: the task is recomputed and its new record replaces the file atomically."""
    path = record_path(output, model, pretrained, dataset, task)
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        log.warning("%s/%s: the stored record %s is invalid (%s); recomputing it, the new record "
                    "replaces it", dataset, task, path, exc)
        return None


def supersede(path: Path, digest: str) -> Path:
    """Move the record at ``path`` (and its sidecars) aside before it is replaced by one
    computed under other settings: ``<task>.<digest>.superseded.json`` (and
    ``<task>.<digest>.superseded.per_class.json``, ``<task>.<digest>.superseded.samples.npz``).
    Returns the record's new path."""
    path = Path(path)
    kept = path.with_name(f"{path.stem}.{safe_name(digest)}{SUPERSEDED_SUFFIX}")
    sidecar = path.with_name(f"{path.stem}.per_class.json")
    if sidecar.is_file():
        sidecar.replace(kept.with_name(f"{kept.name.removesuffix('.json')}.per_class.json"))
    if sidecar_path(path).is_file():
        sidecar_path(path).replace(sidecar_path(kept))
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


# --------------------------------------------------------------------------- reading records for reports

_FRAME_COLUMNS = [
    "model", "pretrained", "dataset", "task", "primary_metric", "value", "ci_low", "ci_high",
    "n_samples", "k", "std", "metrics", "origin", "source", "skipped", "details", "protocol", "precision",
    "language",
]


def record_language(record: Mapping[str, Any]) -> str:
    """The text language a record states (``config.language``, else the ``@LANG`` of its dataset
    name); "" when it states none (a run without --language: the dataset's own language)."""
    stated = (record.get("config") or {}).get("language")
    if isinstance(stated, str) and stated:
        return stated
    _, _, language = str(record.get("dataset", "")).partition("@")
    return language


def _is_clipbench_record(obj: Any) -> bool:
    return isinstance(obj, dict) and {"model", "dataset", "task", "metrics"} <= obj.keys() and (
        "schema_version" in obj or "primary_metric" in obj
    )


def records_frame(
    records: Iterable[Mapping[str, Any]],
    sources: Sequence[str] | None = None,
    origins: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per record (few-shot records: one row per k) with the columns of `load_records`."""
    rows: list[dict[str, Any]] = []
    records = list(records)
    sources = list(sources) if sources is not None else [""] * len(records)
    origins = list(origins) if origins is not None else ["clipbench"] * len(records)
    for record, source, origin in zip(records, sources, origins):
        problem = record_problem(record)
        if problem is not None:
            log.warning("Skipping %s: not a valid result record (%s)", source or "a record", problem)
            continue
        metric = record.get("primary_metric")
        metrics = dict(record.get("metrics") or {})
        ci = (record.get("confidence_intervals") or {}).get(metric) or (None, None)
        base = {
            "model": record["model"],
            "pretrained": record.get("pretrained") or "",
            "dataset": record["dataset"],
            "task": record["task"],
            "primary_metric": metric,
            "value": metrics.get(metric, math.nan),
            "ci_low": ci[0] if ci[0] is not None else math.nan,
            "ci_high": ci[1] if ci[1] is not None else math.nan,
            "n_samples": record.get("n_samples"),
            "k": pd.NA,
            "std": math.nan,
            "metrics": metrics,
            "origin": origin,
            "source": source,
            "skipped": len(record.get("skipped") or ()),  # images left out as unreadable
            "details": dict(record.get("details") or {}),
            # records say the protocol only off the default (pipeline.Evaluator.record_settings)
            "protocol": (record.get("config") or {}).get("protocol", "paper"),
            "precision": (record.get("config") or {}).get("precision") or "",  # "" = not recorded
            "language": record_language(record),
        }
        shots = (record.get("details") or {}).get("k") if record["task"] == "few_shot" else None
        if shots:
            for k, stats in sorted(shots.items(), key=lambda item: int(item[0])):
                rows.append({**base, "k": int(k), "value": stats["mean"], "std": stats.get("std", math.nan),
                             "ci_low": math.nan, "ci_high": math.nan})
        else:
            rows.append(base)
    frame = pd.DataFrame(rows, columns=_FRAME_COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def _record_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ClipbenchError(
            f"Results path {path} does not exist. Pass the --output directory of `clipbench run` "
            "(or a clip_benchmark results directory, or a single result JSON file)."
        )
    return sorted(p for p in path.rglob("*.json") if not p.name.endswith((".per_class.json", SUPERSEDED_SUFFIX)))


def load_records(paths: Sequence[Path], datasets: DatasetLookup | None = None) -> pd.DataFrame:
    """Read every result record found (recursively) under `paths` into a DataFrame.

    Accepts clipbench records and clip_benchmark result files; `*.per_class.json` sidecars are
    skipped, other JSON files are skipped with a warning. Columns: model, pretrained, dataset, task,
    primary_metric, value (fraction), ci_low, ci_high, n_samples, k (few-shot shots per class, one row
    per k; <NA> otherwise), std (few-shot std over seeds), metrics (dict), origin, source (file path),
    skipped (how many images the record left out as unreadable), details (dict, the record's),
    protocol (``paper`` or ``datacomp``, :data:`clipbench.config.PROTOCOLS`), precision (what the
    model ran at, the record's `config.precision`; "" when not recorded).
    When two files hold the same model × pretrained × dataset × task, the later path wins (warned).
    """
    records, sources, origins = [], [], []
    for root in paths:
        for path in _record_files(Path(root)):
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("Skipping %s: not valid JSON (%s)", path, exc)
                continue
            if _is_clipbench_record(obj) or isinstance(obj, dict) and "schema_version" in obj:
                # a damaged clipbench record: records_frame skips it, saying what is wrong
                records.append(obj)
                origins.append("clipbench")
            elif is_clip_benchmark_result(obj):
                records.append(from_clip_benchmark(obj, datasets))
                origins.append("clip_benchmark")
            else:
                log.warning("Skipping %s: not a clipbench or clip_benchmark result record", path)
                continue
            sources.append(str(path))
    frame = records_frame(records, sources, origins)
    key = ["model", "pretrained", "dataset", "task", "k"]
    duplicated = frame.duplicated(subset=key, keep="last")
    for _, row in frame[duplicated].iterrows():
        log.warning("Ignoring %s: a later file has the same %s result", row["source"],
                    "/".join(str(row[c]) for c in key[:4]))
    return frame[~duplicated].reset_index(drop=True)
