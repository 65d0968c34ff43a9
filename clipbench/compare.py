"""Paired comparison of models on the same test samples: `clipbench compare A B [C ...]`.

Two models evaluated on the same images are compared image by image (their records' per-sample
sidecars, :mod:`clipbench.sidecars`), which is far more sensitive and more honest than comparing
two separate intervals:

* the difference of the primary metric (B - A) with a **paired** percentile bootstrap interval:
  each resample draws the same images for both models (retrieval: images with all their captions);
* an exact test where one fits: McNemar's (a two-sided binomial test on the discordant samples)
  for a per-sample 0/1 score (accuracy, top-5 accuracy, image-to-text recall@k); otherwise a paired
  permutation test, swapping the two models' outputs of random images (mean per-class recall,
  mAP, ROC AUC, text-to-image recall, few-shot means over seeds);
* across datasets: the mean difference with a two-level bootstrap interval (datasets resampled,
  and images within each), and wins / losses / ties counted only where a difference is
  significant after Holm's correction for testing every dataset.

Everything down to :func:`compare_pair` is pure (arrays in, numbers out; ``ValueError`` on bad
input); :func:`load_run` and the table / plot functions read files and raise ``ClipbenchError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipbench import metrics
from clipbench.errors import ClipbenchError
from clipbench.lazy import pandas as pd
from clipbench.render import ReportTable
from clipbench.sidecars import (
    RANK_METRICS,
    SampleOutputs,
    read_sample_outputs,
    selection_values,
    sidecar_path,
    target_ranks,
)


@dataclass(frozen=True)
class CompareSettings:
    """Settings of a comparison; every default of `clipbench compare` is here."""

    n_bootstrap: int = 1000
    n_permutations: int = 1000
    confidence: float = 0.95
    alpha: float = 0.05  # family-wise error rate of the Holm-corrected tests
    seed: int = 0


#: ``statistic(units, shared, idx)``: a metric on each resample. ``units`` are one model's
#: per-image arrays (leading axis N), ``shared`` the arrays both models share (targets, query
#: counts), ``idx`` (R, N) resampled image indices; returns (R,) float64.
Statistic = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PairedSamples:
    """Two models' per-image outputs on the same N images, and the statistic of one metric.

    ``a``/``b``: name -> (N, ...) arrays of each model; ``shared``: name -> (N, ...) arrays equal for
    both; ``binary``: key of ``a``/``b`` holding a per-image 0/1 score when McNemar's test applies.
    """

    metric: str
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    shared: dict[str, np.ndarray]
    statistic: Statistic
    binary: str | None = None

    @property
    def n(self) -> int:
        return len(next(iter(self.shared.values())))

    def value(self, units: dict[str, np.ndarray]) -> float:
        return float(self.statistic(units, self.shared, np.arange(self.n)[None])[0])


# --------------------------------------------------------------------------- statistics


def _row_bincount(values: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(R, N) ints in [0, size) -> (R, size) per-row counts (or summed weights)."""
    offsets = values + size * np.arange(values.shape[0])[:, None]
    counts = np.bincount(offsets.ravel(), weights=None if weights is None else weights.ravel(),
                         minlength=size * values.shape[0])
    return counts.reshape(values.shape[0], size)


def _mean_statistic(key: str) -> Statistic:
    return lambda units, shared, idx: units[key][idx].mean(axis=1)


def _mean_per_class_statistic(units, shared, idx):
    targets = shared["targets"]
    size = int(targets.max()) + 1
    counts = _row_bincount(targets[idx], size)
    hits = _row_bincount(targets[idx], size, units["correct"][idx])
    recall = np.divide(hits, counts, out=np.zeros_like(hits), where=counts > 0)
    return recall.sum(axis=1) / (counts > 0).sum(axis=1)


def _ratio_statistic(hits: str, queries: str) -> Statistic:
    """Hits over queries of the resampled images (recall with several queries per image)."""
    return lambda units, shared, idx: units[hits][idx].sum(axis=1) / np.maximum(shared[queries][idx].sum(axis=1), 1)


def _registered_statistic(metric: str) -> Statistic:
    """A registered metric on (N, S) scores per image (S seeds, averaged), by its resampled form."""
    entry = metrics.get_metric(metric)

    def statistic(units, shared, idx):
        scores, targets = units["scores"], shared["targets"]
        values = []
        for s in range(scores.shape[1]):
            column = scores[:, s]
            if entry.resampled is not None:
                values.append(entry.resampled(column, targets)(idx))
            else:  # recomputed on each resample
                values.append(np.array([entry.compute(column[rows], targets[rows]) for rows in idx]))
        return np.mean(values, axis=0)

    return statistic


def paired_samples(a: SampleOutputs, b: SampleOutputs, metric: str) -> PairedSamples:
    """The paired per-image data of ``metric`` from two sidecars of the same test set.

    Raises:
        ValueError: the sidecars are of different kinds, or the metric is not computable from them.
    """
    if a.kind != b.kind:
        raise ValueError(f"per-sample outputs of kinds {a.kind!r} and {b.kind!r} cannot be paired")
    if a.kind == "retrieval":
        return _retrieval_pair(a, b, metric)
    if metric in metrics.metric_names() and metrics.get_metric(metric).grouped:
        return _worst_group_pair(a, b, metric)
    if a.kind == "selection":
        names = a.meta["metrics"]
        if metric not in names:
            raise ValueError(f"{metric!r} is not among these records' metrics {names}")
        column = names.index(metric)
        values_a, values_b = selection_values(a)[:, column], selection_values(b)[:, column]
        counted = ~np.isnan(values_a)  # the metric's subset of units (association: by candidate count)
        if not np.array_equal(counted, ~np.isnan(values_b)):
            raise ValueError(f"the two records count different units for {metric!r}; they were computed on "
                             "different test sets")
        binary = "value" if "correct" in a.arrays and "correct" in b.arrays else None
        return PairedSamples(metric, {"value": np.where(counted, values_a, 0.0)},
                             {"value": np.where(counted, values_b, 0.0)}, {"units": counted.astype(np.float64)},
                             _ratio_statistic("value", "units"), binary)
    targets = a.arrays["targets"].astype(np.int64)
    if metric in RANK_METRICS and ("target_rank" in a.arrays or "top_classes" in a.arrays):
        def units(outputs: SampleOutputs) -> dict[str, np.ndarray]:
            ranks = target_ranks(outputs)  # (G, N)
            values = {"accuracy": ranks < 1, "top5_accuracy": ranks < 5,
                      "mean_top1_top5": ((ranks < 1).astype(float) + (ranks < 5)) / 2.0,
                      "mean_per_class_recall": ranks == 0}[metric]
            key = "correct" if metric == "mean_per_class_recall" else "value"
            return {key: values.mean(axis=0).astype(np.float64)}

        single = target_ranks(a).shape[0] == 1
        statistic = _mean_per_class_statistic if metric == "mean_per_class_recall" else _mean_statistic("value")
        binary = "value" if single and metric in ("accuracy", "top5_accuracy") else None
        return PairedSamples(metric, units(a), units(b), {"targets": targets}, statistic, binary)
    if "scores" not in a.arrays:
        raise ValueError(f"{metric!r} cannot be computed from these per-sample outputs (no scores kept)")

    def score_units(outputs: SampleOutputs) -> dict[str, np.ndarray]:
        scores = outputs.arrays["scores"]
        if outputs.kind == "few_shot":
            return {"scores": np.moveaxis(scores[-1], 0, -1)}  # (seeds, N) at the largest k -> (N, seeds)
        if outputs.kind == "multilabel":
            return {"scores": scores}  # (N, C)
        return {"scores": scores[:, None]}  # binary: (N,) -> (N, 1)

    statistic = _multilabel_statistic(metric) if a.kind == "multilabel" else _registered_statistic(metric)
    return PairedSamples(metric, score_units(a), score_units(b), {"targets": a.arrays["targets"]}, statistic)


def _worst_group_pair(a: SampleOutputs, b: SampleOutputs, metric: str) -> PairedSamples:
    """A worst-group top-k accuracy: each resample's per-group accuracies from the samples' target
    ranks, and their minimum (the groups travel in the sidecar of a grouped primary metric)."""
    k = metrics.WORST_GROUP_K.get(metric)
    if k is None or "groups" not in a.arrays or "groups" not in b.arrays:
        raise ValueError(f"{metric!r} depends on sample groups, which these per-sample outputs do not hold "
                         "(a record keeps them when the metric is its primary one): compare another metric")
    if not np.array_equal(a.arrays["groups"], b.arrays["groups"]):
        raise ValueError("the two records label the samples with different groups; they were computed on "
                         "different versions of the test set")

    def hits(outputs: SampleOutputs) -> dict[str, np.ndarray]:
        return {"hit": (target_ranks(outputs)[0] < k).astype(np.float64)}

    def statistic(units, shared, idx):
        return metrics.worst_group_of_hits(units["hit"], shared["groups"])(idx)

    return PairedSamples(metric, hits(a), hits(b), {"groups": a.arrays["groups"]}, statistic)


def _multilabel_statistic(metric: str) -> Statistic:
    """A registered multi-label metric on (N, C) scores per image, by its resampled form."""
    entry = metrics.get_metric(metric)

    def statistic(units, shared, idx):
        scores, targets = units["scores"], shared["targets"].astype(bool)
        if entry.resampled is not None:
            return entry.resampled(scores, targets)(idx)
        return np.array([entry.compute(scores[rows], targets[rows]) for rows in idx])

    return statistic


def _retrieval_pair(a: SampleOutputs, b: SampleOutputs, metric: str) -> PairedSamples:
    ks = a.meta["recall_k"]
    parsed = metrics.parse_recall_metric(metric)
    if metric != metrics.RSUM and (parsed is None or parsed[1] not in ks):
        raise ValueError(f"retrieval metric {metric!r} is not a recall@k of these records (k in {ks}) or rsum")

    def units(outputs: SampleOutputs) -> dict[str, np.ndarray]:
        arrays, n = outputs.arrays, len(outputs.ids)
        t2i, owner, i2t = arrays["text_to_image_rank"], arrays["caption_image"], arrays["image_to_text_rank"]
        out = {}
        for k in ks:
            out[f"text_to_image_R@{k}"] = np.bincount(owner, weights=t2i <= k, minlength=n)
            out[f"image_to_text_R@{k}"] = ((i2t != -1) & (i2t <= k)).astype(np.float64)
        return out

    n = len(a.ids)
    shared = {"text_to_image": np.bincount(a.arrays["caption_image"], minlength=n).astype(np.float64),
              "image_to_text": (a.arrays["image_to_text_rank"] != -1).astype(np.float64)}

    def recall(name: str) -> Statistic:
        return _ratio_statistic(name, metrics.parse_recall_metric(name)[0])

    if metric == metrics.RSUM:
        names = [metrics.recall_metric_name(d, k) for d in metrics.RETRIEVAL_DIRECTIONS for k in ks]
        parts = [recall(name) for name in names]
        statistic = lambda u, s, idx: np.sum([p(u, s, idx) for p in parts], axis=0)  # noqa: E731
        return PairedSamples(metric, units(a), units(b), shared, statistic)
    # an image-to-text query is one per image: McNemar applies when every image has captions
    binary = metric if parsed[0] == "image_to_text" and shared["image_to_text"].all() else None
    return PairedSamples(metric, units(a), units(b), shared, recall(metric), binary)


def paired_bootstrap(pair: PairedSamples, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of the difference B - A, the same images drawn for both models.

    Returns:
        (R,) float64 differences, R = ``n_resamples`` (NaN where the metric is undefined on a resample).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    parts = [pair.statistic(pair.b, pair.shared, idx) - pair.statistic(pair.a, pair.shared, idx)
             for idx in metrics.resample_indices(pair.n, n_resamples, seed)]
    return np.concatenate(parts)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar test: a binomial test (p = 1/2) on the discordant samples.

    Args:
        correct_a, correct_b: (N,) 0/1 per-sample scores of the two models.

    Returns:
        p-value in [0, 1]; 1.0 when no sample is discordant.
    """
    correct_a, correct_b = np.asarray(correct_a), np.asarray(correct_b)
    if correct_a.shape != correct_b.shape or correct_a.ndim != 1:
        raise ValueError(f"McNemar needs two (N,) 0/1 arrays of the same N, got {correct_a.shape} and {correct_b.shape}")
    if not (np.isin(correct_a, (0, 1)).all() and np.isin(correct_b, (0, 1)).all()):
        raise ValueError("McNemar needs per-sample 0/1 scores (correct or not)")
    only_a = int(np.sum((correct_a == 1) & (correct_b == 0)))
    only_b = int(np.sum((correct_a == 0) & (correct_b == 1)))
    n = only_a + only_b
    if n == 0:
        return 1.0
    from scipy.stats import binom  # scipy.stats takes ~1 s to import: not for every `clipbench` start

    return float(min(1.0, 2.0 * binom.cdf(min(only_a, only_b), n, 0.5)))


def _swapped(pair: PairedSamples, mask: np.ndarray) -> tuple[dict, dict]:
    def pick(first, second):
        shape = (-1,) + (1,) * (first.ndim - 1)
        return np.where(mask.reshape(shape), second, first)

    return ({k: pick(pair.a[k], pair.b[k]) for k in pair.a}, {k: pick(pair.b[k], pair.a[k]) for k in pair.b})


def paired_permutation_test(pair: PairedSamples, n_permutations: int = 1000, seed: int = 0,
                            exact: bool = False) -> float:
    """Two-sided paired permutation test of "A and B score alike": each image's outputs of the two
    models are swapped with probability 1/2, and the difference of the metric recomputed.

    Args:
        pair: :func:`paired_samples`.
        n_permutations: random swaps drawn (Monte Carlo); ignored when ``exact``.
        exact: enumerate all 2^N swaps (tiny N only, N <= 20).

    Returns:
        p-value: the fraction of swaps whose |difference| reaches the observed one (Monte Carlo:
        ``(1 + hits) / (1 + n_permutations)``, never 0).
    """
    observed = abs(pair.value(pair.b) - pair.value(pair.a))
    tolerance = 1e-12 * max(1.0, observed)  # a swap reproducing the observed value counts
    if exact:
        if pair.n > 20:
            raise ValueError(f"an exact permutation test enumerates 2^N swaps; N = {pair.n} is too many (max 20)")
        masks = ((np.arange(2 ** pair.n)[:, None] >> np.arange(pair.n)) & 1).astype(bool)
    else:
        if n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
        masks = np.random.default_rng(seed).random((n_permutations, pair.n)) < 0.5
    hits = 0
    for mask in masks:
        a, b = _swapped(pair, mask)
        hits += abs(pair.value(b) - pair.value(a)) >= observed - tolerance
    return hits / len(masks) if exact else (1 + hits) / (1 + len(masks))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control over m tests).

    Args:
        pvalues: (m,) p-values.

    Returns:
        (m,) adjusted p-values in the input order: the i-th smallest becomes
        ``max over j <= i of min(1, (m - j + 1) * p_(j))``; reject where adjusted <= alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1)).any() or np.isnan(p).any():
        raise ValueError(f"Holm's correction needs a 1-D array of p-values in [0, 1], got {pvalues!r}")
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


@dataclass(frozen=True)
class Aggregate:
    """Mean difference over datasets and its two-level bootstrap interval."""

    mean: float
    low: float
    high: float
    n_datasets: int


def aggregate_differences(differences: Sequence[float], replicates: np.ndarray, confidence: float = 0.95,
                          seed: int = 0) -> Aggregate:
    """The mean of per-dataset differences with a bootstrap over datasets and images within them.

    Replicate r draws D datasets with replacement and averages their r-th paired-bootstrap
    replicate (images resampled inside each dataset), so the interval has both sources of noise.

    Args:
        differences: (D,) per-dataset differences B - A.
        replicates: (D, R) per-dataset paired bootstrap replicates (:func:`paired_bootstrap`).

    Returns:
        :class:`Aggregate`; its interval is the central ``confidence`` percentile interval.
    """
    differences = np.asarray(differences, dtype=np.float64)
    replicates = np.asarray(replicates, dtype=np.float64)
    if differences.ndim != 1 or replicates.ndim != 2 or replicates.shape[0] != differences.size or not differences.size:
        raise ValueError(f"need (D,) differences and (D, R) replicates, got {differences.shape} and {replicates.shape}")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, differences.size, size=(replicates.shape[1], differences.size))  # (R, D)
    means = np.nanmean(replicates[drawn, np.arange(replicates.shape[1])[:, None]], axis=1)
    low, high = metrics.percentile_interval(means[~np.isnan(means)], confidence)
    return Aggregate(float(differences.mean()), low, high, int(differences.size))


@dataclass
class PairedResult:
    """One dataset's paired comparison of B against A."""

    metric: str
    value_a: float
    value_b: float
    difference: float
    low: float
    high: float
    test: str  # "mcnemar" or "permutation"
    p_value: float
    n: int
    replicates: np.ndarray = field(repr=False)


def compare_pair(a: SampleOutputs, b: SampleOutputs, metric: str,
                 settings: CompareSettings = CompareSettings()) -> PairedResult:
    """Difference B - A of ``metric``, its paired bootstrap interval and the exact test's p-value."""
    pair = paired_samples(a, b, metric)
    replicates = paired_bootstrap(pair, settings.n_bootstrap, settings.seed)
    defined = replicates[~np.isnan(replicates)]
    if not defined.size:
        raise ValueError(f"{metric} is undefined on every bootstrap resample")
    low, high = metrics.percentile_interval(defined, settings.confidence)
    if pair.binary is not None:
        test, p = "mcnemar", mcnemar_exact(pair.a[pair.binary], pair.b[pair.binary])
    else:
        test, p = "permutation", paired_permutation_test(pair, settings.n_permutations, settings.seed)
    value_a, value_b = pair.value(pair.a), pair.value(pair.b)
    return PairedResult(metric, value_a, value_b, value_b - value_a, low, high, test, p, pair.n, replicates)


# --------------------------------------------------------------------------- runs on disk


def align(a: SampleOutputs, b: SampleOutputs, label: str) -> SampleOutputs:
    """``b`` reordered to ``a``'s sample order (matched by id).

    Raises:
        ClipbenchError: the two test sets differ (other ids, other labels or captions).
    """
    if a.ids != b.ids:
        only_a, only_b = sorted(set(a.ids) - set(b.ids)), sorted(set(b.ids) - set(a.ids))
        if only_a or only_b or len(a.ids) != len(b.ids) or a.kind == "retrieval":
            raise ClipbenchError(
                f"{label}: the two runs were evaluated on different test sets ({len(a.ids)} vs {len(b.ids)} "
                f"samples; {len(only_a)} ids only in the first, e.g. {only_a[:3]}, {len(only_b)} only in "
                f"the second, e.g. {only_b[:3]}). A paired comparison needs the same images: rerun both "
                "models on the same dataset version and spec (same subsample, same split)."
            )
        position = {sample: i for i, sample in enumerate(b.ids)}
        order = np.array([position[sample] for sample in a.ids])
        # few-shot runs are (n_k, n_seeds, N); every other per-sample array has N first
        per_run = ("target_rank", "scores") if b.kind == "few_shot" else ()
        arrays = {k: v if k == "ks" else v[..., order] if k in per_run else v[order] for k, v in b.arrays.items()}
        b = SampleOutputs(list(a.ids), arrays, b.meta)
    same = {"retrieval": ("caption_image",), "selection": ()}.get(a.kind, ("targets",))
    for key in same:
        if not np.array_equal(a.arrays[key], b.arrays[key]):
            raise ClipbenchError(
                f"{label}: the two runs have the same sample ids but different "
                f"{'captions per image' if key == 'caption_image' else 'labels'}; they were evaluated on "
                "different versions of the test set, so a paired comparison is impossible. Rerun both on "
                "the same data."
            )
    return b


@dataclass
class Run:
    """The records of one model found under a path: (dataset, task) -> record row, and sidecars."""

    label: str
    rows: dict[tuple[str, str], dict]
    path: Path

    def outputs(self, key: tuple[str, str]) -> SampleOutputs | None:
        source = self.rows[key].get("source")
        path = sidecar_path(Path(source)) if source and self.rows[key].get("origin") == "clipbench" else None
        return read_sample_outputs(path) if path is not None and path.is_file() else None


def load_run(path: Path) -> Run:
    """The records of one model under ``path`` (a results directory holding one model, a model
    subdirectory, or a clip_benchmark result file or directory).

    Raises:
        ClipbenchError: no record there, or records of several models (pass a model subdirectory).
    """
    from clipbench.results import load_records

    frame = load_records([path])
    if frame.empty:
        raise ClipbenchError(f"No result records under {path}; pass the --output directory of `clipbench run` "
                             "(or one model's subdirectory of it).")
    models = frame[["model", "pretrained"]].drop_duplicates()
    if len(models) > 1:
        listed = ", ".join(f"{m} ({p})" for m, p in models.itertuples(index=False))
        raise ClipbenchError(f"{path} holds records of {len(models)} models ({listed}); `clipbench compare` "
                             "compares one model per argument: pass each model's subdirectory "
                             f"(e.g. {path}/<model>__<pretrained>).")
    # few-shot records give one row per k: keep the primary one (the largest k)
    frame = frame.sort_values("k", na_position="first").drop_duplicates(["dataset", "task"], keep="last")
    model, pretrained = models.iloc[0]
    rows = {(r["dataset"], r["task"]): r for r in frame.to_dict("records")}
    return Run(f"{model} ({pretrained})" if pretrained else str(model), rows, Path(path))


@dataclass
class Comparison:
    """B against A on every (dataset, task) both hold: a frame of results and the aggregate."""

    label_a: str
    label_b: str
    frame: pd.DataFrame
    aggregate: Aggregate | None
    settings: CompareSettings


COMPARISON_COLUMNS = ["dataset", "task", "metric", "value_a", "low_a", "high_a", "value_b", "low_b", "high_b",
                      "difference", "low", "high", "test", "p_value", "p_holm", "outcome", "n"]


def compare_runs(a: Run, b: Run, settings: CompareSettings = CompareSettings()) -> Comparison:
    """Compare run ``b`` against run ``a`` on every (dataset, task) they share.

    Pairs with sidecars on both sides get the paired statistics; others an unpaired row (the two
    values with their own intervals, test ``unpaired``).

    Raises:
        ClipbenchError: no shared (dataset, task), or a pair evaluated on different test sets.
    """
    keys = sorted(set(a.rows) & set(b.rows))
    if not keys:
        raise ClipbenchError(
            f"{a.path} and {b.path} share no (dataset, task): {sorted(a.rows)} vs {sorted(b.rows)}. "
            "Evaluate both models on the same datasets and tasks.")
    rows, replicates = [], []
    for key in keys:
        ra, rb = a.rows[key], b.rows[key]
        metric = ra["primary_metric"]
        row = {"dataset": key[0], "task": key[1], "metric": metric,
               "value_a": ra["value"], "low_a": ra["ci_low"], "high_a": ra["ci_high"],
               "value_b": rb["value"], "low_b": rb["ci_low"], "high_b": rb["ci_high"],
               "difference": rb["value"] - ra["value"], "low": math.nan, "high": math.nan,
               "test": "unpaired", "p_value": math.nan, "p_holm": math.nan, "outcome": "not tested", "n": ra["n_samples"]}
        if rb["primary_metric"] != metric:
            raise ClipbenchError(f"{key[0]}/{key[1]}: the runs use different primary metrics ({metric} vs "
                                 f"{rb['primary_metric']}); compare records made with the same dataset spec.")
        oa, ob = a.outputs(key), b.outputs(key)
        if oa is not None and ob is not None:
            ob = align(oa, ob, f"{key[0]}/{key[1]}")
            result = compare_pair(oa, ob, metric, settings)
            row.update(difference=result.difference, low=result.low, high=result.high, test=result.test,
                       p_value=result.p_value, n=result.n)
            replicates.append(result.replicates)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    paired = frame["test"] != "unpaired"
    aggregate = None
    if paired.any():
        frame.loc[paired, "p_holm"] = holm(frame.loc[paired, "p_value"].to_numpy())
        significant = paired & (frame["p_holm"] <= settings.alpha)
        frame.loc[paired, "outcome"] = "tie"
        frame.loc[significant & (frame["difference"] > 0), "outcome"] = "win"
        frame.loc[significant & (frame["difference"] < 0), "outcome"] = "loss"
        aggregate = aggregate_differences(frame.loc[paired, "difference"].to_numpy(), np.stack(replicates),
                                          settings.confidence, settings.seed)
    return Comparison(a.label, b.label, frame, aggregate, settings)


# --------------------------------------------------------------------------- tables and figures


def _p_text(p: float) -> str:
    return "" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3g}"


def comparison_tables(comparisons: Sequence[Comparison]) -> list[ReportTable]:
    """One table per comparison (B against A): a row per (dataset, task) and the aggregate."""
    tables = []
    for comparison in comparisons:
        frame, settings = comparison.frame, comparison.settings
        label = f"{comparison.label_b} - {comparison.label_a}"
        body = pd.DataFrame({
            "model": label, "row": frame["dataset"] + "/" + frame["task"], "metric": frame["metric"],
            "A": frame["value_a"], "B": frame["value_b"], "B - A": frame["difference"], "test": frame["test"],
            "p": frame["p_value"].map(_p_text), "p (Holm)": frame["p_holm"].map(_p_text), "result": frame["outcome"],
        })
        low = pd.DataFrame({"A": frame["low_a"], "B": frame["low_b"], "B - A": frame["low"]})
        high = pd.DataFrame({"A": frame["high_a"], "B": frame["high_b"], "B - A": frame["high"]})
        notes = [f"A = {comparison.label_a}, B = {comparison.label_b}; B - A with a paired bootstrap "
                 f"{100 * settings.confidence:g}% interval ({settings.n_bootstrap} resamples of the same "
                 "images for both models; retrieval: images with their captions). Tests: exact McNemar "
                 "(binomial on the discordant samples) for per-sample 0/1 scores, else a paired permutation "
                 f"test ({settings.n_permutations} random swaps)."]
        aggregate = comparison.aggregate
        if aggregate is not None:
            counts = frame["outcome"].value_counts()
            body.loc[len(body)] = {"model": label, "row": f"mean over {aggregate.n_datasets} paired",
                                   "metric": "", "A": math.nan, "B": math.nan, "B - A": aggregate.mean,
                                   "test": "bootstrap", "p": "", "p (Holm)": "", "result": ""}
            low.loc[len(low)] = {"A": math.nan, "B": math.nan, "B - A": aggregate.low}
            high.loc[len(high)] = {"A": math.nan, "B": math.nan, "B - A": aggregate.high}
            notes.append(
                f"Wins / losses / ties of B: {counts.get('win', 0)} / {counts.get('loss', 0)} / "
                f"{counts.get('tie', 0)}, a win or loss only where significant at {settings.alpha:g} after "
                f"Holm's correction over the {aggregate.n_datasets} paired datasets. The mean's interval "
                "resamples datasets and the images within each.")
        if (frame["test"] == "unpaired").any():
            notes.append("Rows marked unpaired lack per-sample outputs on one side (e.g. clip_benchmark "
                         "results, or records written before clipbench kept them): only an unpaired "
                         "comparison is possible, so they show each value with its own interval and no test.")
        columns = body.columns[2:]  # the renderer reads a bound for every value column
        tables.append(ReportTable(title=f"Paired comparison: {label}", task="compare", frame=body,
                                  percent_columns=["A", "B", "B - A"], notes=notes,
                                  ci_low=low.reindex(columns=columns), ci_high=high.reindex(columns=columns)))
    return tables


def write_forest_plots(comparisons: Sequence[Comparison], out_dir: Path) -> list[Path]:
    """One forest plot PNG per comparison in ``out_dir`` (``compare<i>__<B>__vs__<A>.png``); returns the paths."""
    from clipbench.plots import plot_forest
    from clipbench.results import safe_name

    written = []
    for number, comparison in enumerate(comparisons, start=1):  # numbered: two runs may share a label
        frame = comparison.frame
        rows = frame.set_index(frame["dataset"] + "/" + frame["task"])[["difference", "low", "high"]]
        if comparison.aggregate is not None:
            agg = comparison.aggregate
            rows.loc[f"mean over {agg.n_datasets}"] = [agg.mean, agg.low, agg.high]
        path = Path(out_dir) / safe_name(f"compare{number}__{comparison.label_b}__vs__{comparison.label_a}.png")
        written.append(plot_forest(rows, path, title=f"{comparison.label_b} - {comparison.label_a}",
                                   xlabel="B - A (percentage points; lines: paired 95% interval)").path)
    return written


def register_cli(subparsers) -> None:
    """Add `clipbench compare A B [C ...]`; its handler is :func:`run_compare`."""
    from clipbench.render import FORMATS

    default = CompareSettings()
    parser = subparsers.add_parser(
        "compare", help="paired significance of model differences on the same test samples",
        description="Compare each of B, C, ... against A on every dataset and task they share, sample by "
                    "sample (records' <task>.samples.npz): paired bootstrap intervals, McNemar / permutation "
                    "tests, Holm-corrected wins and losses, and the mean difference over datasets.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RESULTS",
                        help="result directories of one model each (or model subdirectories of a run's --output)")
    parser.add_argument("--format", choices=FORMATS, default="markdown", dest="fmt")
    parser.add_argument("--out", type=Path, default=None, help="write the tables to FILE instead of stdout")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR", help="also write forest plots to DIR")
    parser.add_argument("--bootstrap", type=int, default=default.n_bootstrap, help="paired bootstrap resamples")
    parser.add_argument("--permutations", type=int, default=default.n_permutations,
                        help="random swaps of the permutation test")
    parser.add_argument("--alpha", type=float, default=default.alpha,
                        help="family-wise significance level of the Holm-corrected tests")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.set_defaults(handler=run_compare)


def run_compare(args) -> int:
    """Handler of `clipbench compare`."""
    from clipbench.render import render_tables

    if len(args.runs) < 2:
        raise ClipbenchError("`clipbench compare` needs at least two result directories: A B [C ...] "
                             "(each of B, C, ... is compared against A).")
    if args.bootstrap < 1 or args.permutations < 1 or not 0 < args.alpha < 1:
        raise ClipbenchError("--bootstrap and --permutations must be >= 1 and --alpha in (0, 1), "
                             f"got {args.bootstrap}, {args.permutations}, {args.alpha}.")
    settings = CompareSettings(n_bootstrap=args.bootstrap, n_permutations=args.permutations, alpha=args.alpha,
                               seed=args.seed)
    baseline, *others = [load_run(path) for path in args.runs]
    comparisons = [compare_runs(baseline, other, settings) for other in others]
    text = render_tables(comparison_tables(comparisons), args.fmt)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text)
    if args.plot is not None:
        write_forest_plots(comparisons, args.plot)
    return 0
