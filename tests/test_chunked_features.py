"""Chunked, resumable image-feature extraction and memory-mapped cache entries.

A split larger than one chunk is encoded chunk by chunk, each chunk written as soon as it is done;
an interrupted run resumes at the first missing chunk with a result bit-identical to an
uninterrupted run. Runs use the embedded ``clipbench-tiny`` model on the 15 train images of
``conftest.write_imagefolder`` (batch 2, chunks of 4: chunks [0,4) [4,8) [8,12) [12,15)).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clipbench import specs
from clipbench.data import load_split
from clipbench.features import BadImagesError, ChunkPlan, FeatureCache, encode_image_batches, image_features, read_arrays

BATCH, CHUNK = 2, 4
CHUNKS = [range(0, 4), range(4, 8), range(8, 12), range(12, 15)]


@pytest.fixture(scope="module")
def tiny():
    from clipbench.models import load_model

    return load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Batches of 2 tiny images: more torch threads only contend on shared cores."""


@pytest.fixture
def split(spec_file, tmp_path):
    spec = specs.load_spec(str(spec_file))
    return spec, load_split(spec, "train", tmp_path, tmp_path)


class Encoder:
    """encode_image_batches that records the index ranges it was asked for and, like a crash,
    raises once it has encoded ``fail_after`` chunks."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[range | None] = []
        self.fail_after = fail_after

    def __call__(self, model, samples, **kw):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(kw.get("indices"))
        return encode_image_batches(model, samples, **kw)


def features(tiny, split, cache, encoder, **kw):
    spec, samples = split
    return image_features(tiny, spec, "train", samples, cache, batch_size=kw.pop("batch_size", BATCH), workers=0,
                          encoder=encoder, chunk_images=kw.pop("chunk_images", CHUNK), **kw)


def chunk_files(cache: FeatureCache) -> list[str]:
    return sorted(p.name for p in cache.root.rglob("*.chunks/*.npz"))


def test_a_chunk_plan_cuts_on_batch_boundaries():
    assert ChunkPlan(15, 2, 4).ranges() == CHUNKS
    plan = ChunkPlan(10, 4, 6)  # 6 images round up to 2 whole batches of 4
    assert plan.size == 8 and plan.ranges() == [range(0, 8), range(8, 10)]
    assert ChunkPlan(8, 4, 8).ranges() == [range(0, 8)]
    assert ChunkPlan(0, 4, 8).ranges() == []
    assert plan.name(range(8, 10)) == "b4-8-10.npz"


def test_a_crashed_extraction_resumes_at_the_missing_chunks_bit_identical(tiny, split, tmp_path):
    spec, samples = split
    cache = FeatureCache(tmp_path / "c1", mmap_min_bytes=0)
    crashing = Encoder(fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        features(tiny, split, cache, crashing)
    assert crashing.calls == CHUNKS[:2]
    assert chunk_files(cache) == ["b2-0-4.npz", "b2-4-8.npz"]

    resumed_encoder = Encoder()
    resumed = features(tiny, split, cache, resumed_encoder)
    assert resumed_encoder.calls == CHUNKS[2:]  # only the chunks the crash left undone
    assert not list(cache.root.rglob("*.chunks"))  # assembled, then the chunks are deleted

    clean = features(tiny, split, FeatureCache(tmp_path / "c2"), Encoder())
    whole = encode_image_batches(tiny, samples, batch_size=BATCH, workers=0)  # one pass, no chunks
    for name in ("projected", "pre_projection"):
        assert np.array_equal(getattr(resumed, name), getattr(clean, name))
        assert np.array_equal(getattr(resumed, name), getattr(whole, name))
    assert resumed.projected.shape == (15, whole.projected.shape[1]) and resumed.kept is None
    assert np.array_equal(resumed.targets, samples.targets)

    again_encoder = Encoder()
    again = features(tiny, split, cache, again_encoder)
    assert again.from_cache and again_encoder.calls == []
    assert isinstance(again.projected, np.memmap) and isinstance(again.pre_projection, np.memmap)
    assert np.array_equal(again.projected, whole.projected)


def test_chunks_of_another_batch_size_are_not_reused(tiny, split, tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(RuntimeError):
        features(tiny, split, cache, Encoder(fail_after=3))
    rerun = Encoder()
    result = features(tiny, split, cache, rerun, batch_size=3)  # chunks of 6: other boundaries
    assert rerun.calls == [range(0, 6), range(6, 12), range(12, 15)]
    whole = encode_image_batches(tiny, split[1], batch_size=3, workers=0)
    assert np.array_equal(result.projected, whole.projected)
    assert not list(cache.root.rglob("*.chunks"))  # the stale chunks go with the rest


@pytest.mark.parametrize("damage", ["truncated", "other rows"])
def test_a_damaged_chunk_is_encoded_again(tiny, split, tmp_path, caplog, damage):
    cache = FeatureCache(tmp_path)
    with pytest.raises(RuntimeError):
        features(tiny, split, cache, Encoder(fail_after=2))
    (first, second) = sorted(cache.root.rglob("*.chunks/*.npz"))
    if damage == "truncated":
        second.write_bytes(second.read_bytes()[:100])
    else:
        first.replace(second)  # the rows of samples 0..3 under the name of 4..7
    rerun = Encoder()
    with caplog.at_level(logging.WARNING, logger="clipbench.features"):
        result = features(tiny, split, cache, rerun)
    # truncated: chunk [4,8) is re-encoded; moved: [0,4) is missing and [4,8) holds the wrong rows
    assert rerun.calls == (CHUNKS[1:] if damage == "truncated" else CHUNKS)
    assert f"ignoring chunk {second}" in caplog.text
    whole = encode_image_batches(tiny, split[1], batch_size=BATCH, workers=0)
    assert np.array_equal(result.projected, whole.projected)


def test_a_split_of_one_chunk_is_encoded_in_one_call_as_before(tiny, split, tmp_path):
    cache = FeatureCache(tmp_path)
    encoder = Encoder()
    result = features(tiny, split, cache, encoder, chunk_images=16)
    assert encoder.calls == [None]  # no indices: the whole split, in one call
    assert not list(cache.root.rglob("*.chunks"))
    (entry,) = cache.root.rglob("*.npz")
    with np.load(entry) as stored:
        assert np.array_equal(stored["projected"], result.projected)


def test_bad_images_in_chunks_are_remembered_and_handled_by_the_policy(tiny, split, tmp_path):
    spec, _ = split
    (tmp_path / "folder" / "train" / "b_green" / "zz_bad.png").write_bytes(b"")  # sample 10, in chunk [8,12)
    samples = load_split(spec, "train", tmp_path, tmp_path)
    assert samples.id_of(10).endswith("zz_bad.png")
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(BadImagesError, match="1 of 16 images cannot be read"):
        features(tiny, (spec, samples), cache, Encoder())
    rerun = Encoder()
    skipped = features(tiny, (spec, samples), cache, rerun, on_bad_image="skip")
    assert rerun.calls == [] and skipped.from_cache  # the failing run cached what it read
    assert skipped.kept.tolist() == [i for i in range(16) if i != 10] and len(skipped.skipped) == 1
    whole = encode_image_batches(tiny, samples, batch_size=BATCH, workers=0)
    assert list(whole.bad) == [10] and np.array_equal(skipped.projected, whole.projected)
    assert np.array_equal(skipped.targets, np.delete(samples.targets, 10))


def test_large_arrays_of_an_entry_are_mapped_and_earlier_entries_still_read(tmp_path):
    cache = FeatureCache(tmp_path)
    big = np.random.default_rng(0).normal(size=(600, 512)).astype(np.float32)  # 1.2 MB: over MMAP_MIN_BYTES
    small = np.arange(6, dtype=np.float32).reshape(3, 2)
    cache.save("image", "ab" * 16, {"projected": big, "pre_projection": small}, {"n": 600})
    loaded = cache.load("image", "ab" * 16, {"projected": (600, None)})
    assert isinstance(loaded["projected"], np.memmap) and loaded["projected"].flags.aligned
    assert loaded["projected"].offset % 64 == 0
    assert not isinstance(loaded["pre_projection"], np.memmap)
    assert np.array_equal(loaded["projected"], big) and np.array_equal(loaded["pre_projection"], small)
    loaded["projected"][0] = 0  # copy-on-write: the file is not changed
    assert np.array_equal(cache.load("image", "ab" * 16, {"projected": (600, None)})["projected"], big)
    # an entry as np.savez writes it (every earlier version): read, mapped only if aligned by chance
    np.savez(cache._path("image", "ab" * 16), projected=big, pre_projection=small)
    old = cache.load("image", "ab" * 16, {"projected": (600, None)})
    assert np.array_equal(old["projected"], big) and old["projected"].flags.aligned


def test_an_entry_shorter_than_its_arrays_is_unreadable(tmp_path):
    cache = FeatureCache(tmp_path)
    big = np.ones((600, 512), np.float32)
    cache.save("image", "ab" * 16, {"projected": big}, {"n": 600})
    path = cache._path("image", "ab" * 16)
    data = bytearray(path.read_bytes())
    start = data.index(b"{'descr'")
    data[start:start + 80] = data[start:start + 80].replace(b"(600, 512)", b"(900, 512)")  # a header that lies
    path.write_bytes(bytes(data))
    arrays, problem = read_arrays(path)
    assert arrays is None and "shorter than its shape (900, 512)" in problem


CHILD = """
import os, signal, sys
from pathlib import Path
from clipbench import specs
from clipbench.data import load_split
from clipbench.features import FeatureCache, encode_image_batches, image_features
from clipbench.models import load_model

spec = specs.load_spec(sys.argv[1])
samples = load_split(spec, "train", Path(sys.argv[2]), Path(sys.argv[2]))
calls = []

def encoder(model, samples, **kw):
    if sys.argv[4] == "kill" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the extraction
    calls.append(kw["indices"])
    return encode_image_batches(model, samples, **kw)

model = load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")
image_features(model, spec, "train", samples, FeatureCache(Path(sys.argv[3])), batch_size=2, workers=0,
               encoder=encoder, chunk_images=4)
print("CALLS", [(r.start, r.stop) for r in calls])
"""


@pytest.mark.slow
def test_an_extraction_killed_with_sigkill_resumes(tiny, split, spec_file, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, str(script), str(spec_file), str(tmp_path), str(tmp_path / "cache")]
    killed = subprocess.run([*argv, "kill"], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run([*argv, "resume"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "CALLS [(8, 12), (12, 15)]" in resumed.stdout
    result = features(tiny, split, FeatureCache(tmp_path / "cache"), Encoder())
    assert result.from_cache
    whole = encode_image_batches(tiny, split[1], batch_size=BATCH, workers=0)
    assert np.array_equal(result.projected, whole.projected)
    assert np.array_equal(result.pre_projection, whole.pre_projection)


def _pixels(image):
    import torch

    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


class _PixelStats:
    """A cheap image "model" (per-channel means and maxima) for two spawned ranks."""

    device = "cpu"
    preprocess = staticmethod(_pixels)

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def identity(self):
        return {"model": "pixel-stats"}

    def encode_images(self, pixels):
        return pixels.mean((2, 3)), pixels.amax((2, 3))


def _chunked_rank(rank: int, init_file: str, spec_file: str, data: str, cache: str, out: str) -> None:
    import functools

    import torch.distributed as dist

    from clipbench.distributed import DistContext

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, _control=dist.new_group(backend="gloo"))
    spec = specs.load_spec(spec_file)

    def load(spec, role):
        return load_split(spec, role, Path(data), Path(data))

    if rank == 0:
        feats = image_features(_PixelStats(), spec, "train", load(spec, "train"), FeatureCache(Path(cache)),
                               batch_size=BATCH, workers=0, chunk_images=CHUNK,
                               encoder=functools.partial(ctx.encode, spec=spec, role="train"))
        np.save(out, np.asarray(feats.projected))
    else:
        ctx.serve(_PixelStats(), load)
    ctx.close()


@pytest.mark.slow
def test_two_ranks_encode_each_chunk_as_one_process_does(spec_file, tmp_path):
    import torch.multiprocessing as mp

    spec = specs.load_spec(str(spec_file))
    samples = load_split(spec, "train", tmp_path, tmp_path)
    out = tmp_path / "rank0.npy"
    mp.spawn(_chunked_rank, args=(str(tmp_path / "init"), str(spec_file), str(tmp_path), str(tmp_path / "cache"),
                                  str(out)), nprocs=2, join=True)
    single = encode_image_batches(_PixelStats(), samples, batch_size=BATCH, workers=0)
    assert np.array_equal(np.load(out), single.projected) and len(single.projected) == 15
    assert not list((tmp_path / "cache").rglob("*.chunks"))
