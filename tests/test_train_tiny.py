"""clipbench-tiny: the training script, and the committed checkpoint against a random initialisation."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from clipbench import synthetic, train_tiny

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "clipbench" / "weights" / "clipbench-tiny-synthetic.pt"


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    cfg = train_tiny.TrainConfig(steps=110, warmup_steps=10, lr=1e-3)
    assert train_tiny._lr_at(0, cfg) == pytest.approx(1e-4)
    assert train_tiny._lr_at(9, cfg) == pytest.approx(1e-3)
    assert train_tiny._lr_at(10, cfg) == pytest.approx(1e-3)
    assert train_tiny._lr_at(60, cfg) == pytest.approx(0.5e-3)
    assert train_tiny._lr_at(109, cfg) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 99 / 100)))


@pytest.mark.slow
def test_cli_trains_a_few_steps_from_a_clean_checkout(tmp_path):
    out = tmp_path / "w" / "tiny.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "clipbench.train_tiny", "--out", str(out), "--steps", "3",
         "--batch-size", "8", "--workers", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stderr.split("done: ", 1)[1].splitlines()[0])
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert summary["sha256"] == digest
    assert (out.parent / "SHA256SUMS").read_text() == f"{digest}  tiny.pt\n"
    # open_clip's own checkpoint path loads the fp16 state dict into an fp32 model.
    open_clip.add_model_config(train_tiny.MODEL_CONFIG_DIR)
    model = open_clip.create_model("clipbench-tiny", pretrained=str(out))
    saved = torch.load(out, weights_only=True)
    assert torch.equal(model.logit_scale.detach(), saved["logit_scale"].float())


def _state(clip: train_tiny.TinyClip) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clip.model.state_dict().items()}


@pytest.mark.slow
def test_training_is_deterministic_with_or_without_a_loader_worker():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, losses_a = train_tiny.train(train_tiny.TrainConfig(steps=2, batch_size=8, workers=0), log_every=0)
    b, losses_b = train_tiny.train(train_tiny.TrainConfig(steps=2, batch_size=8, workers=1), log_every=0)
    c, _ = train_tiny.train(train_tiny.TrainConfig(steps=2, batch_size=8, workers=0, seed=1), log_every=0)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG state is untouched
    assert not torch.are_deterministic_algorithms_enabled()
    assert losses_a == losses_b
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], sc["visual.conv1.weight"])


def test_save_checkpoint_keeps_other_sums(tmp_path):
    clip = train_tiny.load_tiny_clip()
    (tmp_path / "SHA256SUMS").write_text("abc  other.pt\n")
    digest = train_tiny.save_checkpoint(clip.model, tmp_path / "m.pt")
    lines = (tmp_path / "SHA256SUMS").read_text().splitlines()
    assert sorted(lines) == sorted(["abc  other.pt", f"{digest}  m.pt"])
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())


def test_committed_checkpoint_matches_sha256sums():
    sums = (CHECKPOINT.parent / "SHA256SUMS").read_text().split()
    expected = dict(zip(sums[1::2], sums[0::2]))[CHECKPOINT.name]
    assert hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() == expected
    assert CHECKPOINT.stat().st_size <= 15 * 2**20


@pytest.fixture(scope="module")
def trained() -> train_tiny.TinyClip:
    return train_tiny.load_tiny_clip(pretrained=str(CHECKPOINT))


@pytest.fixture(scope="module")
def random_init() -> train_tiny.TinyClip:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return train_tiny.load_tiny_clip()


@pytest.mark.parametrize("name", ["synthetic-shapes", "synthetic-colors"])
def test_committed_checkpoint_zero_shot_far_above_a_random_init(name, trained, random_init):
    chance = 1 / len(synthetic.CLASSNAMES[name])
    assert train_tiny.zero_shot_accuracy(trained, name, n_per_class=20) >= 0.8
    assert train_tiny.zero_shot_accuracy(random_init, name, n_per_class=20) <= chance + 0.1


def test_committed_checkpoint_retrieval_far_above_a_random_init(trained, random_init):
    n = 200
    chance = 5 / n
    assert train_tiny.text_to_image_recall(trained, n_images=n, k=5) >= 0.5
    assert train_tiny.text_to_image_recall(random_init, n_images=n, k=5) <= chance + 0.05


def test_recall_matches_a_brute_force_count(trained):
    # Independent count of text->image R@5 over 30 images: sort every caption's image scores.
    examples = [e for _, e in synthetic.retrieval_examples(30)]
    images = train_tiny._encode_images(trained, [e.image for e in examples], "cpu")
    hits = total = 0
    for i, e in enumerate(examples):
        for caption in e.captions:
            text = train_tiny._encode_texts(trained, [caption], "cpu")[0]
            order = np.argsort(-(images @ text), kind="stable")
            hits += int(i in order[:5])
            total += 1
    assert train_tiny.text_to_image_recall(trained, n_images=30, k=5) == pytest.approx(hits / total)
