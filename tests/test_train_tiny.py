"""clipbench-tiny: the training script, and the committed checkpoint against a random initialisation."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from clipbench import train_tiny

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




@pytest.mark.slow
def test_evaluate_runs_the_checkpoint_through_the_pipeline(tmp_path):
    # the committed checkpoint on the synthetic test splits (measured: shapes 0.86, colors 0.99, R@5 0.50)
    scores = train_tiny.evaluate(CHECKPOINT, cache_dir=tmp_path)
    assert set(scores) == {"synthetic-shapes/accuracy", "synthetic-colors/accuracy",
                           "synthetic-captions/text_to_image_R@5"}
    assert scores["synthetic-shapes/accuracy"] >= 0.8 and scores["synthetic-colors/accuracy"] >= 0.9
    assert scores["synthetic-captions/text_to_image_R@5"] >= 0.35
