"""Decode once for several models with the same preprocessing (clipbench/shared_decode.py).

A shared run is compared with runs of the same models one at a time (``--no-shared-decode``, each
with its own cache), so both sides are computed independently; images read are counted where the
DataLoader's dataset reads them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clipbench import features, models, shared_decode
from clipbench.cli import main
from clipbench.config import ModelChoice, RunConfig
from clipbench.data import load_split
from clipbench.features import FeatureCache, encode_image_batches, encode_shared_batches, image_features
from clipbench.pipeline import run
from clipbench.shared_decode import SharedDecoder, model_bytes, room_for_another, same_preprocessing
from clipbench.specs import load_spec

from conftest import COLOURS_SPEC, watch_model_loads, write_imagefolder

TINY = "clipbench-tiny"
FAST = ["--tasks", "zeroshot,linear_probe", "--device", "cpu", "--precision", "fp32", "--workers", "0",
        "--batch-size", "4", "--bootstrap", "0", "--probe-jobs", "1"]
N_TRAIN, N_TEST = 15, 9  # write_imagefolder: 3 classes x (5 train, 3 test)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    spec = root / "colours.yaml"
    spec.write_text(COLOURS_SPEC.format(root=write_imagefolder(root / "folder")), encoding="utf-8")
    return spec


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """Positions read by the DataLoader's dataset, in order (workers=0: in this process)."""
    seen: list[int] = []
    real = features._PreprocessedImages.__getitem__

    def counting(self, position):
        seen.append(self.indices[position])
        return real(self, position)

    monkeypatch.setattr(features._PreprocessedImages, "__getitem__", counting)
    return seen


def _records(output: Path) -> dict[tuple[str, ...], dict]:
    found = {}
    for path in output.rglob("*.json"):
        if path.name.count(".") == 1:
            record = json.loads(path.read_text())
            record.pop("seconds")
            record.pop("created", None)
            found[(*path.relative_to(output).parent.parts, path.stem)] = record
    return found


def _features(cache: Path) -> dict[str, np.ndarray]:
    """Every image-feature array in a cache, by its key and array name."""
    arrays = {}
    for path in sorted((cache / "features" / "image").rglob("*.npz")):
        with np.load(path) as entry:
            arrays.update({f"{path.stem}/{name}": entry[name] for name in entry.files})
    return arrays


@pytest.mark.slow
def test_two_models_decode_each_image_once_and_write_what_separate_runs_write(colours, tmp_path, reads):
    argv = ["run", "--model", f"{TINY},synthetic", f"{TINY},none", "--datasets", str(colours), *FAST]
    assert main([*argv, "--output", str(tmp_path / "shared"), "--cache-dir", str(tmp_path / "c1")]) == 0
    shared_reads = len(reads)
    reads.clear()
    assert main([*argv, "--output", str(tmp_path / "alone"), "--cache-dir", str(tmp_path / "c2"),
                 "--no-shared-decode"]) == 0
    assert shared_reads == N_TRAIN + N_TEST and len(reads) == 2 * (N_TRAIN + N_TEST)
    together, alone = _records(tmp_path / "shared"), _records(tmp_path / "alone")
    assert len(together) == 4 and together == alone
    one, two = _features(tmp_path / "c1"), _features(tmp_path / "c2")
    assert sorted(one) == sorted(two) and len(one) == 4 * 4  # 2 models x 2 splits, 4 arrays each
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)

    # a rerun reuses every record: nothing is read again
    reads.clear()
    assert main([*argv, "--output", str(tmp_path / "shared"), "--cache-dir", str(tmp_path / "c1")]) == 0
    assert reads == []


@pytest.mark.slow
def test_a_model_whose_records_exist_is_not_fed_and_the_other_encodes_alone(colours, tmp_path, reads):
    common = ["--datasets", str(colours), "--output", str(tmp_path / "out"), *FAST]
    assert main(["run", "--model", f"{TINY},synthetic", "--cache-dir", str(tmp_path / "c1"), *common]) == 0
    reads.clear()
    # a fresh cache: had the stored model been fed, its features would appear there
    assert main(["run", "--model", f"{TINY},synthetic", f"{TINY},none", "--cache-dir", str(tmp_path / "c2"),
                 *common]) == 0
    assert len(reads) == N_TRAIN + N_TEST
    assert len(list((tmp_path / "c2" / "features" / "image").rglob("*.npz"))) == 2  # the new model's splits


@pytest.mark.parametrize("memory, shared, alive", [
    ((20 << 30, 24 << 30), True, [0, 1, 2]),  # room: all three together
    ((1 << 30, 24 << 30), True, [0, 0, 0]),  # a full device: one at a time
    ((20 << 30, 24 << 30), False, [0, 0, 0]),  # --no-shared-decode
])
def test_models_are_kept_together_only_while_the_device_has_room(colours, tmp_path, monkeypatch, memory,
                                                                 shared, alive):
    alive_at_load, _ = watch_model_loads(monkeypatch)
    monkeypatch.setattr(shared_decode, "device_memory", lambda device: memory)
    checkpoint = tmp_path / "tiny-other.pt"
    other = models.load_model(TINY, "none", device="cpu", precision="fp32", cache_dir=tmp_path / "w")
    state = {k: v + 0.01 for k, v in other.model.state_dict().items()}
    del other
    alive_at_load.clear()
    import torch
    torch.save(state, checkpoint)
    config = RunConfig(models=[ModelChoice(TINY, "synthetic"), ModelChoice(TINY, "none"),
                               ModelChoice(TINY, str(checkpoint))],
                       datasets=[str(colours)], tasks=["zeroshot"], output=tmp_path / "out",
                       cache_dir=tmp_path / "cache", device="cpu", precision="fp32", workers=0, batch_size=8,
                       n_bootstrap=0, shared_decode=shared)
    outcome = run(config)
    assert not outcome.failures
    assert [r.pretrained for r in outcome.records] == ["synthetic", "none", str(checkpoint)]
    assert alive_at_load == alive


def test_a_chunked_split_is_read_once_and_each_models_chunks_match_its_own_run(colours, tmp_path, reads):
    spec = load_spec(colours)
    samples = load_split(spec, "train", tmp_path, tmp_path)
    pair = [models.load_model(TINY, pretrained, device="cpu", precision="fp32", cache_dir=tmp_path / "w")
            for pretrained in ("synthetic", "none")]
    run_features = functools.partial(image_features, spec=spec, role="train", samples=samples, batch_size=4,
                                     workers=0, chunk_images=6)  # 8-image chunks: [0, 8), [8, 15)
    decoder = SharedDecoder(pair, FeatureCache(tmp_path / "shared"))
    decoder.start_dataset({0: {"train"}, 1: {"train"}})
    together = [run_features(model, cache=decoder.cache,
                             encoder=functools.partial(decoder.encoder(i), spec=spec, role="train"))
                for i, model in enumerate(pair)]
    assert len(reads) == N_TRAIN
    reads.clear()
    alone = [run_features(model, cache=FeatureCache(tmp_path / f"alone{i}")) for i, model in enumerate(pair)]
    assert len(reads) == 2 * N_TRAIN
    for shared_one, own in zip(together, alone):
        np.testing.assert_array_equal(shared_one.projected, own.projected)
        np.testing.assert_array_equal(shared_one.pre_projection, own.pre_projection)
    assert not np.array_equal(together[0].projected, together[1].projected)  # two different models


def test_the_shared_pass_gives_each_model_its_own_batches_and_a_share_of_the_time(colours, tmp_path):
    spec = load_spec(colours)
    samples = load_split(spec, "test", tmp_path, tmp_path)
    pair = [models.load_model(TINY, pretrained, device="cpu", precision="fp32", cache_dir=tmp_path / "w")
            for pretrained in ("synthetic", "none")]
    shared = encode_shared_batches(pair, samples, batch_size=4, workers=0)
    for model, theirs in zip(pair, shared):
        own = encode_image_batches(model, samples, batch_size=4, workers=0)
        np.testing.assert_array_equal(theirs.projected, own.projected)
        np.testing.assert_array_equal(theirs.pre_projection, own.pre_projection)
        assert theirs.seconds is not None and theirs.seconds > 0
    assert model_bytes(pair[0]) == sum(p.numel() * 4 for p in pair[0].model.parameters()) + sum(
        b.numel() * b.element_size() for b in pair[0].model.buffers())


def test_grouping_rules():
    a = SimpleNamespace(device="cpu", preprocess="Compose(Resize(224), CenterCrop(224))")
    assert same_preprocessing(a, SimpleNamespace(device="cpu", preprocess="Compose(Resize(224), CenterCrop(224))"))
    assert not same_preprocessing(a, SimpleNamespace(device="cpu", preprocess="Compose(Resize(256), CenterCrop(224))"))
    assert not same_preprocessing(a, SimpleNamespace(device="cuda:0", preprocess=a.preprocess))
    # 100 units of memory, 40 free: a 15-unit model leaves 25 = the 25 % reserve; a 16-unit one does not
    assert room_for_another(40, 100, 15) and not room_for_another(40, 100, 16)
    assert room_for_another(40, 100, 16, reserve=0.2)
    with pytest.raises(ValueError, match="reserve"):
        room_for_another(40, 100, 1, reserve=1.0)
    free, total = shared_decode.device_memory("cpu")
    assert 0 < free <= total
