"""Zero-shot image-text retrieval: recall@k in both directions from precomputed features.

Features in, metrics out: this module never loads a model or a dataset.

Protocol (CLIP paper, Flickr30k / MSCOCO Karpathy test splits):

- text -> image: each caption queries all images; it hits at k if its own image is among the top k.
- image -> text: each image queries all captions; it hits at k if ANY of its captions is among the
  top k, i.e. the image's rank is the best (smallest) rank of its own captions. An image without
  captions is still a candidate (a distractor) for text -> image, but is not an image -> text query.

Ranks are 1-based. Ties are broken by candidate index (lower index ranks first): a rank equals the
position of the true candidate in a stable sort of the candidates by descending similarity. It is
computed without sorting, as ``1 + #(strictly greater scores) + #(equal scores at a lower index)``.

Similarities are computed query-chunk by query-chunk on the chosen device; each chunk's
``(chunk_size, n_candidates)`` score block is reduced to one integer rank per query before the next
chunk starts, so peak memory is about one score block, O(chunk_size * n_candidates), and never
O(n_images * n_captions).
Each direction scores every pair once: 2 * n_images * n_captions * D multiply-adds in all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from clipbench.metrics import (
    parse_recall_metric,
    percentile_interval,
    resample_indices,
    with_mean_recalls,
)
from clipbench.sidecars import retrieval_metrics_from_ranks, retrieval_outputs
from clipbench.tasks.base import TaskInputs, TaskNeeds, TaskOutput

log = logging.getLogger(__name__)

__all__ = ["RetrievalResult", "retrieval_metrics", "recall_confidence_interval", "TASK"]

# Images that query no caption (they have none) get this value in `image_to_text_ranks`.
NO_CAPTION_RANK = -1

_HALF_DTYPES = (torch.float16, torch.bfloat16)

# Score elements ranked at once (about 8 bytes of temporaries each): cache-sized on CPU, and
# large enough on an accelerator to keep its kernels busy.
_COUNT_ELEMENTS_CPU = 1 << 20
_COUNT_ELEMENTS_ACCELERATOR = 1 << 24


@dataclass
class RetrievalResult:
    """Recall@k and rank statistics of a retrieval evaluation.

    Attributes:
        metrics: name -> value. ``text_to_image_R@{k}`` and ``image_to_text_R@{k}`` are fractions
            in [0, 1] of queries whose rank is <= k; ``*_mean_rank`` / ``*_median_rank`` are in
            1-based rank units; ``rsum`` is the sum of all the R@k fractions of both directions
            (in [0, 2 * len(recall_k)], i.e. the usual "RSUM" divided by 100).
        text_to_image_ranks: (n_captions,) int64, 1-based rank of each caption's image.
        image_to_text_ranks: (n_images,) int64, 1-based rank of each image's best-ranked own
            caption; ``NO_CAPTION_RANK`` (-1) for an image without captions (not a query).
        n_images: number of images (all of them candidates for text -> image).
        n_captions: number of captions.
        n_image_queries: number of images with at least one caption (the image -> text queries).
    """

    metrics: dict[str, float]
    text_to_image_ranks: np.ndarray
    image_to_text_ranks: np.ndarray
    n_images: int
    n_captions: int
    n_image_queries: int


def retrieval_metrics(
    image_features: np.ndarray | torch.Tensor,
    text_features: np.ndarray | torch.Tensor,
    text_to_image: np.ndarray,
    recall_k: Iterable[int] = (1, 5, 10),
    chunk_size: int = 4096,
    device: str | torch.device = "cpu",
) -> RetrievalResult:
    """Recall@k, mean and median rank for text -> image and image -> text retrieval.

    Args:
        image_features: (n_images, D) image embeddings, assumed L2-normalized (similarity is the
            plain dot product; nothing is renormalized here).
        text_features: (n_captions, D) caption embeddings, assumed L2-normalized.
        text_to_image: (n_captions,) integer array, the index of each caption's image in
            ``image_features``. Any number of captions per image (including none) is allowed.
        recall_k: the k of the R@k metrics (positive integers).
        chunk_size: number of queries scored at once; peak memory is about one score block,
            ``chunk_size * n_candidates`` values of the compute dtype (4 bytes in float32).
        device: where similarities are computed (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Similarities are computed in float32, except on an accelerator when both inputs are already
    float16/bfloat16 tensors, which keep their dtype. Ranks are exact integers given the scores,
    so chunking changes no result (barring a BLAS that rounds one dot product differently for
    different batch shapes, which can only matter between scores within an ulp of each other).

    Returns:
        RetrievalResult with metrics named as in docs/architecture.md and the per-query ranks.

    Raises:
        ValueError: on inputs of the wrong shape or range, or with non-finite values.
        TypeError: on features that are not floating-point or caption indices that are not integers.
    """
    ks = _check_recall_k(recall_k)
    if not _is_positive_int(chunk_size):
        raise ValueError(
            f"retrieval chunk_size must be a positive integer, got {chunk_size!r}. "
            "Pass e.g. chunk_size=4096 (smaller uses less memory, larger is faster)."
        )
    dev = torch.device(device)
    images = _as_matrix(image_features, "image_features", dev)
    texts = _as_matrix(text_features, "text_features", dev)
    n_images, n_captions = images.shape[0], texts.shape[0]
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_features has dimension {images.shape[1]} but text_features has dimension "
            f"{texts.shape[1]}; both must come from the same model's joint embedding space "
            "(projected, L2-normalized features)."
        )
    targets = _check_text_to_image(text_to_image, n_captions, n_images)
    images, texts = _common_dtype(images, texts)

    targets_dev = torch.from_numpy(targets).to(dev)
    t2i = _text_to_image_ranks(texts, images, targets_dev, int(chunk_size))
    i2t = _image_to_text_ranks(images, texts, targets, int(chunk_size))
    has_caption = i2t != NO_CAPTION_RANK

    metrics = retrieval_metrics_from_ranks(t2i, i2t, ks)
    log.debug("retrieval over %d images, %d captions: %s", n_images, n_captions, metrics)
    return RetrievalResult(
        metrics=metrics,
        text_to_image_ranks=t2i,
        image_to_text_ranks=i2t,
        n_images=n_images,
        n_captions=n_captions,
        n_image_queries=int(has_caption.sum()),
    )


def _ranks_in_block(scores: torch.Tensor, true_index: torch.Tensor) -> torch.Tensor:
    """1-based rank of one true candidate per row, ties broken by candidate index.

    Args:
        scores: (q, n) similarities of q queries to n candidates.
        true_index: (q,) int64 index of each row's true candidate.

    Returns:
        (q,) int64 ranks: ``1 + #(scores > true) + #(scores == true at a lower index)``.
    """
    q, n = scores.shape
    true_score = scores.gather(1, true_index[:, None])
    candidate_index = torch.arange(n, device=scores.device)
    ranks = torch.empty(q, dtype=torch.int64, device=scores.device)
    # Counting makes boolean and integer temporaries the size of its input: bound them by
    # counting a few rows at a time instead of the whole block.
    budget = _COUNT_ELEMENTS_CPU if scores.device.type == "cpu" else _COUNT_ELEMENTS_ACCELERATOR
    step = max(1, budget // n)
    for start in range(0, q, step):
        rows = slice(start, start + step)
        block, score = scores[rows], true_score[rows]
        ahead = torch.where(candidate_index < true_index[rows, None], block >= score, block > score)
        ranks[rows] = ahead.sum(dim=1, dtype=torch.int32) + 1  # int32 halves the cast's temporary
    return ranks


def _similarity_block(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(q, D) x (n, D) -> (q, n) dot products; the only place a score block is allocated."""
    return queries @ candidates.T


def _text_to_image_ranks(
    texts: torch.Tensor, images: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> np.ndarray:
    """(n_captions,) int64 rank of each caption's image among all images."""
    ranks = np.empty(texts.shape[0], dtype=np.int64)
    for start in range(0, texts.shape[0], chunk_size):
        stop = min(start + chunk_size, texts.shape[0])
        # The score block is never bound to a name, so it is freed before the next is made.
        block_ranks = _ranks_in_block(_similarity_block(texts[start:stop], images), targets[start:stop])
        ranks[start:stop] = block_ranks.cpu().numpy()
    return ranks


def _image_to_text_ranks(
    images: torch.Tensor, texts: torch.Tensor, targets: np.ndarray, chunk_size: int
) -> np.ndarray:
    """(n_images,) int64 rank of each image's best-ranked own caption; -1 if it has none.

    The best-ranked own caption is the one that comes first in the tie rule's order (highest
    score, then lowest index); its rank is the minimum of the image's captions' ranks.
    """
    n_images, dev = images.shape[0], images.device
    # Captions grouped by image: the captions of images [a, b) are caption_order[offsets[a]:offsets[b]].
    caption_order = np.argsort(targets)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(targets, minlength=n_images))])
    ranks = np.full(n_images, NO_CAPTION_RANK, dtype=np.int64)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        own = caption_order[offsets[start] : offsets[stop]]
        if own.size == 0:
            continue
        own_captions = torch.from_numpy(own).to(dev)
        own_rows = torch.from_numpy(targets[own] - start).to(dev)
        # The score block is never bound to a name here, so it is freed before the next is made.
        block_ranks = _best_own_caption_ranks(_similarity_block(images[start:stop], texts), own_rows, own_captions)
        block_ranks = block_ranks.cpu().numpy()
        queried = offsets[start + 1 : stop + 1] > offsets[start:stop]
        ranks[start:stop][queried] = block_ranks[queried]
    return ranks


def _best_own_caption_ranks(scores: torch.Tensor, own_rows: torch.Tensor, own_captions: torch.Tensor) -> torch.Tensor:
    """Rank of each row's first own caption in the tie rule's order (highest score, lowest index).

    Args:
        scores: (q, n_captions) similarities of q images to all captions.
        own_rows, own_captions: (m,) int64, the block row and caption index of each of the m
            (image, own caption) pairs of these images.

    Returns:
        (q,) int64 ranks; rows without an own caption get the rank of caption 0 (to be discarded).
    """
    own_scores = scores[own_rows, own_captions]
    best_score = torch.full((scores.shape[0],), -torch.inf, dtype=scores.dtype, device=scores.device)
    best_score.scatter_reduce_(0, own_rows, own_scores, reduce="amax", include_self=False)
    is_best = own_scores == best_score[own_rows]
    best_caption = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    best_caption.scatter_reduce_(0, own_rows[is_best], own_captions[is_best], reduce="amin", include_self=False)
    return _ranks_in_block(scores, best_caption)


def recall_confidence_interval(
    result: RetrievalResult,
    text_to_image: np.ndarray,
    metric: str,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of one recall@k, resampling images with all their captions.

    The captions of one image are not independent queries (they share the image), so the unit
    of resampling is the image: a resample draws ``n_images`` images with replacement and the
    recall is the hits of their queries over the number of their queries (text -> image: their
    captions; image -> text: the images that have captions).

    Args:
        result: from :func:`retrieval_metrics`.
        text_to_image: (n_captions,) the image index of each caption, as passed there.
        metric: ``text_to_image_R@k`` or ``image_to_text_R@k``.

    Returns:
        (low, high) fractions in [0, 1].
    """
    parsed = parse_recall_metric(metric)
    if parsed is None:
        raise ValueError(f"{metric!r} is not a recall@k metric (e.g. 'text_to_image_R@1').")
    direction, k = parsed
    owner = np.asarray(text_to_image, dtype=np.int64)
    if direction == "text_to_image":
        hits = np.bincount(owner, weights=result.text_to_image_ranks <= k, minlength=result.n_images)
        queries = np.bincount(owner, minlength=result.n_images).astype(np.float64)
    else:
        ranks = result.image_to_text_ranks
        queries = (ranks != NO_CAPTION_RANK).astype(np.float64)
        hits = queries * (ranks <= k)
    statistics = []
    for idx in resample_indices(result.n_images, n_resamples, seed):
        n_queries = queries[idx].sum(axis=1)
        statistics.append(hits[idx].sum(axis=1) / np.maximum(n_queries, 1))
    return percentile_interval(np.concatenate(statistics), confidence)


def _is_positive_int(value: object) -> bool:
    """A Python or numpy integer >= 1 (a bool is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _check_recall_k(recall_k: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(recall_k)
    if not ks or not all(_is_positive_int(k) for k in ks):
        raise ValueError(
            f"recall_k must be a non-empty sequence of positive integers, got {recall_k!r}. "
            "Pass e.g. recall_k=(1, 5, 10), the CLIP paper's values."
        )
    if len(set(ks)) != len(ks):
        raise ValueError(f"recall_k {ks} repeats a value; list each k once, e.g. (1, 5, 10).")
    return tuple(int(k) for k in ks)


def _as_matrix(features: np.ndarray | torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """Validate a (N, D) feature matrix and move it to `device` (float32 on CPU)."""
    tensor = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D array of shape (N, D), got shape {tuple(tensor.shape)}. "
            "Pass one embedding row per item."
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; retrieval needs floating-point embeddings "
            "(float32 L2-normalized features from the model)."
        )
    tensor = tensor.detach().to(device)
    if device.type == "cpu" or tensor.dtype not in _HALF_DTYPES:
        tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{name} contains NaN or infinite values, so similarities cannot be ranked. "
            "Check the model's precision (fp16 overflow) or the feature cache, and recompute the features."
        )
    return tensor


def _common_dtype(images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in one dtype: a shared half dtype stays, anything mixed becomes float32."""
    if images.dtype == texts.dtype:
        return images, texts
    return images.to(torch.float32), texts.to(torch.float32)


def _check_text_to_image(text_to_image: np.ndarray, n_captions: int, n_images: int) -> np.ndarray:
    """Validate the caption -> image index array; return it as (n_captions,) int64 numpy."""
    if isinstance(text_to_image, torch.Tensor):
        text_to_image = text_to_image.detach().cpu().numpy()
    targets = np.asarray(text_to_image)
    if targets.shape != (n_captions,):
        raise ValueError(
            f"text_to_image has shape {targets.shape} but there are {n_captions} captions; it must "
            "be a 1-D array giving, for each row of text_features, the index of its image."
        )
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(
            f"text_to_image has dtype {targets.dtype}; it must hold integer image indices "
            "(row numbers into image_features)."
        )
    targets = targets.astype(np.int64)
    if targets.min() < 0 or targets.max() >= n_images:
        raise ValueError(
            f"text_to_image holds image indices from {targets.min()} to {targets.max()}, but there "
            f"are {n_images} images (valid indices 0..{n_images - 1}). Every caption must point at "
            "a row of image_features."
        )
    return targets


class RetrievalTask:
    """Zero-shot retrieval over the test images and all their captions, both directions."""

    name = "retrieval"
    title = "Zero-shot retrieval"
    spec_task = "retrieval"

    def needs(self, spec) -> TaskNeeds:
        return TaskNeeds(roles=("test",), text="captions")

    def settings(self, config) -> dict:
        return {"recall_k": list(config.recall_k), "n_bootstrap": config.n_bootstrap, "seed": config.seed}

    def run(self, inputs: TaskInputs) -> TaskOutput:
        spec, settings, captions = inputs.spec, inputs.settings, inputs.captions
        images = inputs.images["test"].projected
        result = retrieval_metrics(images, captions.features, captions.owner,
                                   recall_k=tuple(settings["recall_k"]), device=inputs.device)
        intervals = {}
        metric = spec.primary_metric
        if settings["n_bootstrap"] and metric in result.metrics and parse_recall_metric(metric):
            intervals[metric] = recall_confidence_interval(result, captions.owner, metric,
                                                           settings["n_bootstrap"], seed=settings["seed"])
        details = {"n_images": result.n_images, "n_captions": result.n_captions,
                   "bootstrap_unit": "image (with all its captions)"}
        per_sample = retrieval_outputs(result.text_to_image_ranks, result.image_to_text_ranks, captions.owner,
                                       metric, settings["recall_k"])
        return TaskOutput(metrics=with_mean_recalls(result.metrics, settings["recall_k"]),
                          n_samples=result.n_images, confidence_intervals=intervals, details=details, per_sample=per_sample)


TASK = RetrievalTask()
