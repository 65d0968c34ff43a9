"""Tests for clipbench.tasks.retrieval against a brute-force numpy ranking and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipbench.tasks import retrieval
from clipbench.tasks.retrieval import NO_CAPTION_RANK, retrieval_metrics

KS = (1, 5, 10)


def brute_force_ranks(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full similarity matrix (float64) and a stable descending argsort: the reference ranking.

    Returns (caption ranks (n_captions,), image ranks (n_images,), -1 for images without captions).
    """
    sims = texts.astype(np.float64) @ images.astype(np.float64).T  # (n_captions, n_images)
    t2i = np.empty(len(texts), dtype=np.int64)
    for t in range(len(texts)):
        order = np.argsort(-sims[t], kind="stable")
        t2i[t] = np.flatnonzero(order == text_to_image[t])[0] + 1
    i2t = np.full(len(images), -1, dtype=np.int64)
    for i in range(len(images)):
        own = np.flatnonzero(text_to_image == i)
        if own.size:
            order = np.argsort(-sims[:, i], kind="stable")
            position = np.empty_like(order)
            position[order] = np.arange(len(order))
            i2t[i] = position[own].min() + 1
    return t2i, i2t


def expected_metrics(t2i: np.ndarray, i2t: np.ndarray, ks=KS) -> dict[str, float]:
    queries = i2t[i2t > 0]
    out = {f"text_to_image_R@{k}": np.mean(t2i <= k) for k in ks}
    out.update({f"image_to_text_R@{k}": np.mean(queries <= k) for k in ks})
    out["text_to_image_mean_rank"] = t2i.mean()
    out["text_to_image_median_rank"] = np.median(t2i)
    out["image_to_text_mean_rank"] = queries.mean()
    out["image_to_text_median_rank"] = np.median(queries)
    out["rsum"] = sum(v for name, v in out.items() if "_R@" in name)
    return out


def random_problem(seed: int, n_images: int = 40, dim: int = 16, max_captions: int = 7, min_captions: int = 1):
    """Normalized random features; each image gets min..max captions that are noisy copies of it."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    counts = rng.integers(min_captions, max_captions + 1, n_images)
    text_to_image = rng.permutation(np.repeat(np.arange(n_images), counts))
    texts = images[text_to_image] + 0.6 * rng.standard_normal((len(text_to_image), dim)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images, texts.astype(np.float32), text_to_image


def quantized_problem(seed: int, n_images: int = 30, dim: int = 4):
    """Features in {-1, 0, 1} / 2: every dot product is exact in float32, so ties are exact and frequent.

    Some images are duplicated rows, some captions equal their image (tied with the duplicates) and
    a few images have no caption.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(-1, 2, (n_images, dim)).astype(np.float32) / 2
    images[n_images - 5 :] = images[:5]  # duplicated rows
    counts = rng.integers(0, 8, n_images)  # 0 to 7 captions per image
    text_to_image = rng.permutation(np.repeat(np.arange(n_images), counts))
    texts = rng.integers(-1, 2, (len(text_to_image), dim)).astype(np.float32) / 2
    copy = rng.random(len(text_to_image)) < 0.4
    texts[copy] = images[text_to_image[copy]]
    return images, texts, text_to_image


def assert_result_matches(result, t2i, i2t):
    np.testing.assert_array_equal(result.text_to_image_ranks, t2i)
    np.testing.assert_array_equal(result.image_to_text_ranks, i2t)
    expected = expected_metrics(t2i, i2t)
    assert set(result.metrics) == set(expected)
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_features(seed):
    images, texts, t2i = random_problem(seed)
    result = retrieval_metrics(images, texts, t2i, chunk_size=17)
    assert_result_matches(result, *brute_force_ranks(images, texts, t2i))
    assert (result.n_images, result.n_captions, result.n_image_queries) == (len(images), len(texts), len(images))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_brute_force_with_exact_ties(seed):
    images, texts, t2i = quantized_problem(seed)
    expected_t2i, expected_i2t = brute_force_ranks(images, texts, t2i)
    # The data must really contain ties involving the true candidate, or the test proves nothing.
    sims = texts @ images.T
    true_scores = sims[np.arange(len(texts)), t2i]
    assert ((sims == true_scores[:, None]).sum(axis=1) > 1).mean() > 0.3
    assert (expected_i2t == -1).any()
    result = retrieval_metrics(images, texts, t2i, chunk_size=5)
    assert_result_matches(result, expected_t2i, expected_i2t)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 10**6])
def test_chunked_equals_unchunked(chunk_size):
    images, texts, t2i = quantized_problem(seed=7, n_images=50)
    whole = retrieval_metrics(images, texts, t2i, chunk_size=10**9)
    chunked = retrieval_metrics(images, texts, t2i, chunk_size=chunk_size)
    np.testing.assert_array_equal(chunked.text_to_image_ranks, whole.text_to_image_ranks)
    np.testing.assert_array_equal(chunked.image_to_text_ranks, whole.image_to_text_ranks)
    assert chunked.metrics == whole.metrics


@pytest.mark.parametrize("elements", [1, 50, 333])
def test_ranking_a_block_a_few_rows_at_a_time_changes_nothing(monkeypatch, elements):
    # Shrink the counting budget so each score block is ranked in slices of 1 or more rows.
    images, texts, t2i = quantized_problem(seed=4)
    expected = brute_force_ranks(images, texts, t2i)
    monkeypatch.setattr(retrieval, "_COUNT_ELEMENTS_CPU", elements)
    assert_result_matches(retrieval_metrics(images, texts, t2i, chunk_size=20), *expected)


def test_perfect_model_scores_one():
    # Image i is the basis vector e_i and each of its 1..3 captions is e_i as well.
    images = np.eye(6, dtype=np.float32)
    t2i = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 5])
    result = retrieval_metrics(images, images[t2i], t2i)
    assert result.metrics == {
        **{f"{d}_R@{k}": 1.0 for d in ("text_to_image", "image_to_text") for k in KS},
        "text_to_image_mean_rank": 1.0,
        "text_to_image_median_rank": 1.0,
        "image_to_text_mean_rank": 1.0,
        "image_to_text_median_rank": 1.0,
        "rsum": 6.0,
    }


def test_adversarial_model_ranks_truth_last():
    # Each caption is minus its image: similarity -1 to its own image, 0 to the 11 others,
    # so its image ranks 12th of 12, and each image's caption ranks 12th of 12 captions.
    images = np.eye(12, dtype=np.float32)
    t2i = np.arange(12)[::-1].copy()
    result = retrieval_metrics(images, -images[t2i], t2i, recall_k=(1, 5, 10, 12))
    np.testing.assert_array_equal(result.text_to_image_ranks, np.full(12, 12))
    np.testing.assert_array_equal(result.image_to_text_ranks, np.full(12, 12))
    for d in ("text_to_image", "image_to_text"):
        assert [result.metrics[f"{d}_R@{k}"] for k in (1, 5, 10, 12)] == [0.0, 0.0, 0.0, 1.0]
        assert result.metrics[f"{d}_mean_rank"] == 12.0
        assert result.metrics[f"{d}_median_rank"] == 12.0
    assert result.metrics["rsum"] == 2.0


def test_constant_model_ties_break_by_index():
    # Every similarity is equal, so a rank is 1 + the true candidate's index (stable order).
    # Captions' images: [2, 0, 0, 1, 2, 2] -> text->image ranks [3, 1, 1, 2, 3, 3].
    # Image 0's first caption is #1 -> rank 2; image 1's is #3 -> rank 4; image 2's is #0 -> rank 1.
    t2i = np.array([2, 0, 0, 1, 2, 2])
    images = np.ones((3, 4), dtype=np.float32) / 2
    texts = np.ones((6, 4), dtype=np.float32) / 2
    result = retrieval_metrics(images, texts, t2i, recall_k=(1, 2, 5), chunk_size=2)
    np.testing.assert_array_equal(result.text_to_image_ranks, [3, 1, 1, 2, 3, 3])
    np.testing.assert_array_equal(result.image_to_text_ranks, [2, 4, 1])
    m = result.metrics
    assert (m["text_to_image_R@1"], m["text_to_image_R@2"], m["text_to_image_R@5"]) == (2 / 6, 3 / 6, 1.0)
    assert (m["image_to_text_R@1"], m["image_to_text_R@2"], m["image_to_text_R@5"]) == (1 / 3, 2 / 3, 1.0)
    assert m["text_to_image_mean_rank"] == pytest.approx(13 / 6)
    assert m["text_to_image_median_rank"] == 2.5
    assert m["image_to_text_mean_rank"] == pytest.approx(7 / 3)
    assert m["image_to_text_median_rank"] == 2.0
    assert m["rsum"] == pytest.approx(2 / 6 + 3 / 6 + 1 + 1 / 3 + 2 / 3 + 1)


def test_image_rank_is_its_best_caption():
    # Image 0 has one perfect caption (e_0) and one awful one (-e_0); image 1's only caption is e_1.
    images = np.eye(3, dtype=np.float32)
    texts = np.stack([-images[0], images[1], images[0]])
    t2i = np.array([0, 1, 0])
    result = retrieval_metrics(images, texts, t2i)
    np.testing.assert_array_equal(result.text_to_image_ranks, [3, 1, 1])
    # Image 0: captions scored [-1, 0, 1] -> own caption #2 is first. Image 1: [0, 1, 0] -> #1 first.
    np.testing.assert_array_equal(result.image_to_text_ranks, [1, 1, NO_CAPTION_RANK])


def test_image_without_captions_is_a_distractor_not_a_query():
    # Image 0 has no caption but equals image 1, at a lower index: under the tie rule it outranks
    # image 1 for image 1's caption. It is left out of the image->text averages.
    images = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    texts = np.array([[1, 0], [0, 1]], dtype=np.float32)
    t2i = np.array([1, 2])
    result = retrieval_metrics(images, texts, t2i, recall_k=(1, 2))
    np.testing.assert_array_equal(result.text_to_image_ranks, [2, 1])
    np.testing.assert_array_equal(result.image_to_text_ranks, [NO_CAPTION_RANK, 1, 1])
    assert result.n_image_queries == 2
    assert result.metrics["text_to_image_R@1"] == 0.5
    assert result.metrics["image_to_text_R@1"] == 1.0
    assert result.metrics["image_to_text_mean_rank"] == 1.0


def test_torch_and_float64_inputs_give_the_same_result():
    images, texts, t2i = random_problem(seed=5, n_images=20)
    reference = retrieval_metrics(images, texts, t2i)
    from_torch = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(t2i))
    from_float64 = retrieval_metrics(images.astype(np.float64), texts.astype(np.float64), t2i.astype(np.int32))
    for other in (from_torch, from_float64):
        np.testing.assert_array_equal(other.text_to_image_ranks, reference.text_to_image_ranks)
        np.testing.assert_array_equal(other.image_to_text_ranks, reference.image_to_text_ranks)
        assert other.metrics == reference.metrics


def test_score_blocks_hold_at_most_chunk_size_queries(monkeypatch):
    """Peak memory is bounded by the chunk: every score block has <= chunk_size rows.

    Spies on the one function that allocates score blocks; running with more captions must not
    enlarge the text->image blocks (chunk_size x n_images), only add more of them.
    """
    blocks: list[tuple[int, int]] = []
    real_block = retrieval._similarity_block

    def spy(queries, candidates):
        out = real_block(queries, candidates)
        blocks.append(tuple(out.shape))
        return out

    monkeypatch.setattr(retrieval, "_similarity_block", spy)
    chunk = 8
    for n_images, max_captions in ((30, 2), (30, 7)):
        blocks.clear()
        images, texts, t2i = random_problem(seed=3, n_images=n_images, max_captions=max_captions)
        result = retrieval_metrics(images, texts, t2i, chunk_size=chunk)
        assert_result_matches(result, *brute_force_ranks(images, texts, t2i))
        t2i_blocks = [b for b in blocks if b[1] == n_images]
        i2t_blocks = [b for b in blocks if b[1] == len(texts)]
        assert len(t2i_blocks) + len(i2t_blocks) == len(blocks)
        assert max(rows for rows, _ in blocks) == chunk
        assert sum(rows for rows, _ in t2i_blocks) == len(texts)
        assert sum(rows for rows, _ in i2t_blocks) == n_images
        assert max(rows * cols for rows, cols in blocks) <= chunk * max(n_images, len(texts))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_peak_memory_is_bounded():
    images, texts, t2i = quantized_problem(seed=11, n_images=40)
    cpu = retrieval_metrics(images, texts, t2i)
    gpu = retrieval_metrics(images, texts, t2i, device="cuda", chunk_size=6)
    # Quantized features are exact in float16 too, so the half-precision path must agree exactly.
    half = retrieval_metrics(
        torch.from_numpy(images).half().cuda(), torch.from_numpy(texts).half().cuda(), t2i, device="cuda", chunk_size=6
    )
    for other in (gpu, half):
        np.testing.assert_array_equal(other.text_to_image_ranks, cpu.text_to_image_ranks)
        np.testing.assert_array_equal(other.image_to_text_ranks, cpu.image_to_text_ranks)

    rng = np.random.default_rng(0)
    n_images, n_captions, dim, chunk = 8000, 40000, 32, 64
    big_images = torch.nn.functional.normalize(torch.randn(n_images, dim), dim=1)
    big_texts = torch.nn.functional.normalize(torch.randn(n_captions, dim), dim=1)
    big_t2i = rng.integers(0, n_images, n_captions)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    retrieval_metrics(big_images, big_texts, big_t2i, device="cuda", chunk_size=chunk)
    peak = torch.cuda.max_memory_allocated() - baseline
    # One score block (4 bytes per element) plus at most 12 bytes of ranking temporaries per
    # element, the inputs copied to the GPU (and their finiteness masks), O(n) vectors and 1 MiB
    # slack; a full similarity matrix would take 1.28 GB.
    bound = 16 * chunk * max(n_images, n_captions) + 2 * (n_images + n_captions) * dim * 4 + 64 * n_captions + 2**20
    assert bound < n_images * n_captions * 4 / 10
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"image_features": np.zeros((3, 4, 1), np.float32)}, ValueError, "2-D"),
        ({"text_features": np.zeros((0, 4), np.float32)}, ValueError, "non-empty"),
        ({"text_features": np.zeros((4, 5), np.float32)}, ValueError, "dimension"),
        ({"image_features": np.zeros((3, 4), np.int64)}, TypeError, "floating-point"),
        ({"text_features": np.full((4, 4), np.nan, np.float32)}, ValueError, "NaN"),
        ({"text_to_image": np.array([0, 1, 2])}, ValueError, "shape"),
        ({"text_to_image": np.array([0.0, 1.0, 2.0, 0.0])}, TypeError, "integer"),
        ({"text_to_image": np.array([0, 1, 3, 0])}, ValueError, "valid indices 0..2"),
        ({"text_to_image": np.array([0, -1, 2, 0])}, ValueError, "valid indices"),
        ({"recall_k": (1, 0)}, ValueError, "positive integers"),
        ({"recall_k": ()}, ValueError, "positive integers"),
        ({"recall_k": (1, 5, 1)}, ValueError, "repeats"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, message):
    args = {
        "image_features": np.eye(3, 4, dtype=np.float32),
        "text_features": np.eye(4, dtype=np.float32),
        "text_to_image": np.array([0, 1, 2, 0]),
    }
    args.update(kwargs)
    with pytest.raises(error, match=message):
        retrieval_metrics(**args)


def test_recall_interval_resamples_images_with_their_captions():
    from clipbench.metrics import resample_indices
    from clipbench.tasks.retrieval import recall_confidence_interval

    rng = np.random.default_rng(5)
    n_images = 40
    per_image = rng.integers(1, 6, n_images)
    owner = np.repeat(np.arange(n_images), per_image)
    images = rng.normal(size=(n_images, 16)).astype(np.float32)
    texts = images[owner] + rng.normal(scale=1.2, size=(len(owner), 16)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    result = retrieval_metrics(images, texts, owner)
    for metric in ("text_to_image_R@1", "image_to_text_R@5"):
        low, high = recall_confidence_interval(result, owner, metric, n_resamples=300, seed=2)
        # naive: loop over resampled images, collect their queries' hits
        values = []
        for idx in resample_indices(n_images, 300, 2):
            for row in idx:
                if metric.startswith("text"):
                    hits = [result.text_to_image_ranks[owner == i] <= 1 for i in row]
                    values.append(np.concatenate(hits).mean())
                else:
                    values.append((result.image_to_text_ranks[row] <= 5).mean())
        expected = np.quantile(values, [0.025, 0.975])
        assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
        assert low <= result.metrics[metric] <= high and high - low > 0
