"""Per-sample outputs of a record: ``<task>.samples.npz`` beside ``<task>.json``.

They are what a paired comparison of two models (:mod:`clipbench.compare`) reads, and a record's
summary metrics are recomputed from them exactly (:func:`recompute_metrics`). Compact by design:

* single-label classification (zero-shot, linear probe): ``targets`` (N,) and ``top_classes``
  (N, min(5, C)), the five highest-scored classes (int16 up to 32767 classes), ties broken
  toward the lower class index as every metric does; binary metrics (``roc_auc``) add
  ``scores`` (N,) float64, the positive-class score the metric ranks; multi-label (``map_11point``)
  keeps ``targets`` (N, C) uint8 and ``scores`` (N, C) in the dtype the metric saw (exact: a cast
  could create ties); a grouped primary metric (worst-group accuracy) adds ``groups`` (N,) int64;
* few-shot: ``ks`` (n_k,), ``targets`` and ``target_rank`` (n_k, n_seeds, N) uint8, the 0-based
  rank of the target class clipped at 5 (5 = not in the top 5), or ``scores`` (n_k, n_seeds, N)
  float64 for a binary metric;
* retrieval: ``text_to_image_rank`` (n_captions,), ``image_to_text_rank`` (n_images,; -1 for an
  image without captions) and ``caption_image`` (n_captions,), the image of each caption;
* selection (caption selection, Winoground, association): ``correct`` (N, S) uint8, 1 where unit i
  is right by metric ``meta["metrics"][j]``, or, for scores that are not 0/1 (association's
  Jaccard indices), ``values`` (N, S) float64, NaN where unit i is outside metric j's subset of
  units; each metric is the mean of its column (NaN left out). A unit is a test image, or an
  example (Winoground, association: its ids are then the example ids).

Every file also holds ``ids`` (N,) the test split's sample ids (UTF-8) and ``meta``, a JSON
string: format version, task kind, metric names. ImageNet's 50,000 test images take about
0.7 MB per zero-shot record (a synthetic 1000-class case with ImageNet-like ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipbench import metrics
from clipbench.atomic import atomic_open

#: File name suffix of a record's per-sample outputs: ``<task>.samples.npz``.
SIDECAR_SUFFIX = ".samples.npz"
#: Version of the layout above; bumped when an array changes meaning.
FORMAT_VERSION = 1
#: Classes kept per sample (and where few-shot target ranks are clipped).
TOP_K = 5
#: Single-label metrics computable from the target's rank among the classes.
RANK_METRICS = ("accuracy", "top5_accuracy", "mean_per_class_recall", "mean_top1_top5")
#: Task kinds a sidecar's ``meta["kind"]`` names.
KINDS = ("single_label", "multilabel", "binary", "few_shot", "retrieval", "selection")


@dataclass(frozen=True)
class PerSample:
    """What a task returns for its sidecar (:attr:`clipbench.tasks.base.TaskOutput.per_sample`):
    ``kind`` (one of :data:`KINDS`), ``arrays`` (layout: module docstring) and JSON-ready ``meta``
    (``primary_metric``, ``n_classes`` or ``recall_k``). The pipeline adds the test split's sample
    ids, unless ``ids`` names other units (Winoground's examples, each of two images)."""

    kind: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SampleOutputs:
    """A read sidecar: ``ids`` (N,) sample ids, ``arrays`` by name (layout: module docstring),
    ``meta`` (``format``, ``kind``, ``primary_metric``, ``n_classes`` or ``recall_k``)."""

    ids: list[str]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta["kind"]


def sidecar_path(record_path: Path) -> Path:
    """``<task>.samples.npz`` beside the record ``<task>.json``."""
    record_path = Path(record_path)
    return record_path.with_name(record_path.name.removesuffix(".json") + SIDECAR_SUFFIX)


# --------------------------------------------------------------------------- what tasks return


def top_classes(scores: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The ``min(k, C)`` highest-scored classes of each row, best first.

    Ties go to the lower class index (``np.argmax`` picks the first maximum), as in
    :mod:`clipbench.metrics`: the target's position here is its rank there whenever it is < k.

    Args:
        scores: (N, C) float.

    Returns:
        (N, min(k, C)) int16 (int32 above 32767 classes).
    """
    scores = np.array(scores, dtype=np.float64)  # a copy: chosen entries are masked below
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"top_classes needs (N, C) scores with C >= 1, got shape {scores.shape}.")
    k = min(k, scores.shape[1])
    dtype = np.int16 if scores.shape[1] <= np.iinfo(np.int16).max else np.int32
    out = np.empty((scores.shape[0], k), dtype=dtype)
    rows = np.arange(scores.shape[0])
    for j in range(k):
        best = np.argmax(scores, axis=1)
        out[:, j] = best
        scores[rows, best] = -np.inf
    return out


def _label_dtype(num_classes: int) -> type:
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def classification_outputs(scores: np.ndarray, targets: np.ndarray, primary_metric: str,
                           multilabel: bool = False, groups: np.ndarray | None = None) -> PerSample:
    """The per-sample arrays of a zero-shot or linear-probe record (module docstring).

    Args:
        scores: (N, C) test scores the record's metrics were computed from.
        targets: (N,) int class indices, or (N, C) 0/1 when ``multilabel``.
        primary_metric: the record's primary metric.
        groups: (N,) int group labels; kept (``groups``) when the primary metric is grouped.

    Returns:
        :class:`PerSample` of kind ``single_label``, ``binary`` or ``multilabel``.
    """
    scores, targets = np.asarray(scores), np.asarray(targets)
    kind = metrics.get_metric(primary_metric).kind
    meta = {"primary_metric": primary_metric, "n_classes": int(scores.shape[1])}
    if multilabel or kind == "multilabel":
        return PerSample("multilabel", {"targets": targets.astype(np.uint8), "scores": scores}, meta)
    out = {"targets": targets.astype(_label_dtype(scores.shape[1])), "top_classes": top_classes(scores)}
    if kind == "binary":
        out["scores"] = metrics.binary_scores(scores)
    elif primary_metric not in RANK_METRICS:
        out["scores"] = scores  # a plugin metric: only the scores themselves are sure to suffice
    if metrics.get_metric(primary_metric).grouped and groups is not None:
        out["groups"] = np.asarray(groups, dtype=np.int64)
    return PerSample(kind, out, meta)


def few_shot_keeps(primary_metric: str) -> bool:
    """Whether few-shot runs keep per-sample outputs for ``primary_metric`` (:func:`compact_outputs`)."""
    return primary_metric in RANK_METRICS or metrics.get_metric(primary_metric).kind == "binary"


def few_shot_outputs(ks: Sequence[int], per_seed: Sequence[Sequence[np.ndarray]], targets: np.ndarray,
                     primary_metric: str, num_classes: int) -> PerSample | None:
    """A few-shot record's per-sample arrays from ``per_seed[i][s]``, :func:`compact_outputs` of
    k = ``ks[i]`` (ascending) and seed s; None when they were not kept (:func:`few_shot_keeps`)."""
    if not all(len(runs) for runs in per_seed):
        return None
    stacked = np.stack([np.stack(runs) for runs in per_seed])  # (n_k, n_seeds, N)
    name = "scores" if metrics.get_metric(primary_metric).kind == "binary" else "target_rank"
    arrays = {"ks": np.asarray(ks, dtype=np.int32), name: stacked,
              "targets": np.asarray(targets).astype(_label_dtype(num_classes))}
    return PerSample("few_shot", arrays, {"primary_metric": primary_metric, "n_classes": int(num_classes)})


def compact_outputs(scores: np.ndarray, targets: np.ndarray, primary_metric: str) -> np.ndarray:
    """One few-shot run's per-sample values: the target's 0-based rank clipped at :data:`TOP_K`
    (N,) uint8, or for a binary metric the (N,) float64 positive-class scores."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if metrics.get_metric(primary_metric).kind == "binary":
        return metrics.binary_scores(scores)
    if not few_shot_keeps(primary_metric):
        raise ValueError(
            f"few-shot per-sample outputs cover the metrics {', '.join(RANK_METRICS)} and binary ones; "
            f"{primary_metric!r} needs its scores, which are not kept per seed."
        )
    target_scores = np.take_along_axis(scores, targets[:, None], axis=1)
    higher = (scores > target_scores).sum(axis=1)
    tied_before = ((scores == target_scores) & (np.arange(scores.shape[1]) < targets[:, None])).sum(axis=1)
    return np.minimum(higher + tied_before, TOP_K).astype(np.uint8)


def retrieval_outputs(text_to_image_rank: np.ndarray, image_to_text_rank: np.ndarray,
                      caption_image: np.ndarray, primary_metric: str, recall_k: Sequence[int]) -> PerSample:
    """A retrieval record's per-sample arrays: ranks (n_captions,) and (n_images,), and the
    (n_captions,) image of each caption, int32."""
    arrays = {"text_to_image_rank": np.asarray(text_to_image_rank, dtype=np.int32),
              "image_to_text_rank": np.asarray(image_to_text_rank, dtype=np.int32),
              "caption_image": np.asarray(caption_image, dtype=np.int32)}
    return PerSample("retrieval", arrays, {"primary_metric": primary_metric, "recall_k": [int(k) for k in recall_k]})


def selection_outputs(values: dict[str, np.ndarray], primary_metric: str,
                      ids: Sequence[str] | None = None) -> PerSample:
    """A selection record's per-unit values: ``values[name]`` (N,) per metric, whose mean is that
    metric: bool correctness (kept as ``correct``), or float scores with NaN for units outside the
    metric's subset (kept as ``values``); ``ids`` when the units are not the test images."""
    names = list(values)
    meta = {"primary_metric": primary_metric, "metrics": names}
    ids = tuple(ids) if ids is not None else None
    if all(np.asarray(values[n]).dtype == bool for n in names):
        stacked = np.stack([np.asarray(values[n]) for n in names], axis=1).astype(np.uint8)
        return PerSample("selection", {"correct": stacked}, meta, ids)
    stacked = np.stack([np.asarray(values[n], dtype=np.float64) for n in names], axis=1)
    return PerSample("selection", {"values": stacked}, meta, ids)


def selection_values(outputs: "SampleOutputs") -> np.ndarray:
    """(N, S) float64 per-unit values of a selection sidecar (0/1 correctness, or scores with NaN
    outside a metric's subset)."""
    arrays = outputs.arrays
    return arrays["values"] if "values" in arrays else arrays["correct"].astype(np.float64)


# --------------------------------------------------------------------------- files


def write_sample_outputs(path: Path, per_sample: PerSample, ids: Sequence[str]) -> Path:
    """Write a sidecar atomically (compressed ``.npz``, no pickled objects); returns ``path``."""
    if per_sample.kind not in KINDS:
        raise ValueError(f"per-sample kind must be one of {KINDS}, got {per_sample.kind!r}")
    encoded = np.array([str(i).encode("utf-8") for i in ids], dtype=np.bytes_)
    meta = {"format": FORMAT_VERSION, "kind": per_sample.kind, **per_sample.meta}
    payload = {**per_sample.arrays, "ids": encoded, "meta": np.array(json.dumps(meta))}
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **payload)
    return Path(path)


def read_sample_outputs(path: Path) -> SampleOutputs:
    """Read a sidecar written by :func:`write_sample_outputs`.

    Raises:
        ValueError: not a sidecar of a known format (truncated, another version).
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    if "meta" not in arrays or "ids" not in arrays:
        raise ValueError(f"{path} is not a clipbench per-sample file (no ids / meta)")
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has per-sample format {meta.get('format')}, this clipbench reads {FORMAT_VERSION}")
    ids = [i.decode("utf-8") for i in arrays.pop("ids")]
    return SampleOutputs(ids, arrays, meta)


# --------------------------------------------------------------------------- metrics from a sidecar


def target_ranks(outputs: SampleOutputs) -> np.ndarray:
    """(G, N) 0-based target ranks clipped at :data:`TOP_K` (G = 1, or seeds of the primary k
    for few-shot) of a single-label sidecar."""
    arrays = outputs.arrays
    if outputs.kind == "few_shot":
        return arrays["target_rank"][-1].astype(np.int64)  # the largest k (ks ascending) is primary
    top, targets = arrays["top_classes"], arrays["targets"].astype(np.int64)
    found = top == targets[:, None]
    return np.where(found.any(axis=1), found.argmax(axis=1), TOP_K)[None].astype(np.int64)


def rank_metric(name: str, ranks: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    """A :data:`RANK_METRICS` metric from (N,) target ranks, by the formula of :mod:`clipbench.metrics`."""
    if name == "accuracy":
        return float(np.mean(ranks < 1))
    if name == "top5_accuracy":
        return float(np.mean(ranks < 5))
    if name == "mean_top1_top5":
        return 0.5 * (float(np.mean(ranks < 1)) + float(np.mean(ranks < 5)))
    if name == "mean_per_class_recall":
        correct = ranks == 0
        counts = np.bincount(targets, minlength=num_classes)
        hits = np.bincount(targets, weights=correct, minlength=num_classes)
        present = counts > 0
        return float(np.mean(hits[present] / counts[present]))
    raise ValueError(f"{name!r} is not computable from target ranks; these are: {', '.join(RANK_METRICS)}")


def _classification_metric(name: str, outputs: SampleOutputs, group: int | None = None,
                           k_index: int = -1) -> float:
    arrays, meta = outputs.arrays, outputs.meta
    targets = arrays["targets"].astype(np.int64)
    if outputs.kind == "few_shot":
        if "scores" in arrays:
            return metrics.compute_metric(name, arrays["scores"][k_index, group], targets)
        ranks = arrays["target_rank"][k_index, group].astype(np.int64)
        return rank_metric(name, ranks, targets, meta["n_classes"])
    if name in RANK_METRICS and "top_classes" in arrays:
        return rank_metric(name, target_ranks(outputs)[0], targets, meta["n_classes"])
    return metrics.compute_metric(name, arrays["scores"], arrays["targets"], arrays.get("groups"))


def recompute_metrics(outputs: SampleOutputs) -> dict[str, float]:
    """The metrics of the sidecar's record, recomputed from it (the same formulas, so equal)."""
    meta, arrays = outputs.meta, outputs.arrays
    primary = meta["primary_metric"]
    if outputs.kind == "retrieval":
        return metrics.with_mean_recalls(
            retrieval_metrics_from_ranks(arrays["text_to_image_rank"], arrays["image_to_text_rank"],
                                         meta["recall_k"]), meta["recall_k"])
    if outputs.kind == "selection":
        values = selection_values(outputs)
        return {name: float(np.nanmean(values[:, j])) for j, name in enumerate(meta["metrics"])}
    if outputs.kind == "few_shot":
        out = {}
        for i, k in enumerate(arrays["ks"]):
            seeds = arrays["target_rank" if "target_rank" in arrays else "scores"].shape[1]
            out[f"{primary}@{int(k)}shot"] = float(np.mean(
                [_classification_metric(primary, outputs, g, i) for g in range(seeds)]))
        out[primary] = out[f"{primary}@{int(arrays['ks'][-1])}shot"]
        return out
    names = [primary]
    if outputs.kind != "multilabel":
        names += ["accuracy"] + (["top5_accuracy"] if meta["n_classes"] > 5 else []) + ["mean_per_class_recall"]
    return {name: _classification_metric(name, outputs) for name in dict.fromkeys(names)}


def retrieval_metrics_from_ranks(text_to_image_rank: np.ndarray, image_to_text_rank: np.ndarray,
                                 recall_k: Sequence[int]) -> dict[str, float]:
    """Recall@k, mean and median ranks and rsum from per-query ranks, by the formulas of
    :func:`clipbench.tasks.retrieval.retrieval_metrics` (images without captions: rank -1, no query)."""
    t2i = np.asarray(text_to_image_rank)
    i2t = np.asarray(image_to_text_rank)
    i2t = i2t[i2t != -1]
    out: dict[str, float] = {}
    for direction, ranks in zip(metrics.RETRIEVAL_DIRECTIONS, (t2i, i2t)):
        for k in recall_k:
            out[metrics.recall_metric_name(direction, k)] = float(np.mean(ranks <= k))
    out["text_to_image_mean_rank"] = float(np.mean(t2i))
    out["text_to_image_median_rank"] = float(np.median(t2i))
    out["image_to_text_mean_rank"] = float(np.mean(i2t))
    out["image_to_text_median_rank"] = float(np.median(i2t))
    out[metrics.RSUM] = float(sum(out[metrics.recall_metric_name(d, k)]
                                  for d in metrics.RETRIEVAL_DIRECTIONS for k in recall_k))
    return out
