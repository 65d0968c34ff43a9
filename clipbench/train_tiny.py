"""Train ``clipbench-tiny``, the small CLIP of clipbench's offline default, on the synthetic world.

    python -m clipbench.train_tiny --out clipbench/weights/clipbench-tiny-synthetic.pt

Contrastive (CLIP InfoNCE with a learnable logit scale, open_clip's ``ClipLoss``) on a stream of
synthetic images (``clipbench.synthetic.TRAIN_STREAM``, disjoint from every evaluation split), one
random caption per image, AdamW with linear warm-up and cosine decay. On CPU the run is
deterministic for a given seed, thread count, torch version and machine: torch is seeded,
``torch.use_deterministic_algorithms(True)`` is on and the thread count is fixed (``--threads``).

The checkpoint is a plain fp16 ``state_dict`` that open_clip loads directly:
``open_clip.create_model('clipbench-tiny', pretrained=PATH)`` (after
``open_clip.add_model_config(MODEL_CONFIG_DIR)``). Its sha256 is written to ``SHA256SUMS`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import open_clip
import torch

from clipbench import synthetic
from clipbench.errors import ClipbenchError
from clipbench.models.weights import file_sha256

log = logging.getLogger(__name__)

MODEL_NAME = "clipbench-tiny"
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "clipbench-tiny-synthetic.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (``lr`` is the peak learning rate after warm-up).

    ``threads`` is recorded with the run; :func:`main` applies it (``train`` leaves torch's
    process-wide thread count alone).
    """

    steps: int = 1100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    threads: int = 1
    workers: int = 1
    device: str = "cpu"
    model: str = MODEL_NAME


@dataclass(frozen=True)
class TinyClip:
    """An open_clip model with its evaluation preprocessing (PIL → (3, H, W) float32) and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable


def load_tiny_clip(
    pretrained: Optional[str] = None, device: str = "cpu", model: str = MODEL_NAME
) -> TinyClip:
    """Build ``clipbench-tiny`` through open_clip's standard path; ``pretrained``: a checkpoint file."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    net, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=None if pretrained is None else str(pretrained), device=device
    )
    net.eval()
    return TinyClip(model=net, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(model))


def _training_batch(step: int, batch_size: int, clip: TinyClip) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) float32 and tokens (B, L) int64 of training step ``step``: fresh images."""
    examples = [
        synthetic.generate(synthetic.TRAIN_STREAM, step * batch_size + j, n_captions=1)
        for j in range(batch_size)
    ]
    images = torch.stack([clip.preprocess(e.image) for e in examples])
    tokens = clip.tokenizer([e.captions[0] for e in examples])
    return images, tokens


class _TrainingBatches(torch.utils.data.Dataset):
    """Item ``step`` is training step ``step``'s batch, so a loader worker can render ahead."""

    def __init__(self, steps: int, batch_size: int, clip: TinyClip):
        self.steps, self.batch_size, self.clip = steps, batch_size, clip

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _training_batch(step, self.batch_size, self.clip)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, log_every: int = 50) -> tuple[TinyClip, list[float]]:
    """Train from a seeded random initialisation; returns the model (eval mode) and per-step losses."""
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise ClipbenchError(
            f"Training needs steps >= 1 and batch_size >= 2 (a contrastive batch), got "
            f"steps={cfg.steps}, batch_size={cfg.batch_size}."
        )
    deterministic = torch.are_deterministic_algorithms_enabled()
    # Seed and determinism apply to this run only: the caller's RNG state and settings are restored.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        torch.use_deterministic_algorithms(cfg.device == "cpu" or deterministic)
        try:
            return _train(cfg, log_every)
        finally:
            torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, log_every: int) -> tuple[TinyClip, list[float]]:
    clip = load_tiny_clip(device=cfg.device, model=cfg.model)
    model = clip.model
    model.train()
    params = list(model.named_parameters())
    # CLIP's recipe: no weight decay on gains, biases and the logit scale.
    decay = [p for n, p in params if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in params if p.ndim < 2 or "logit_scale" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    loss_fn = open_clip.ClipLoss()
    losses = []
    start = time.perf_counter()
    # Rendering runs in a worker process beside the training step; batches do not depend on it.
    batches = torch.utils.data.DataLoader(
        _TrainingBatches(cfg.steps, cfg.batch_size, clip), batch_size=None, shuffle=False,
        num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None,
    )
    for step, (images, tokens) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        image_features, text_features, logit_scale = model(images.to(cfg.device), tokens.to(cfg.device))
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            # As in CLIP: the temperature may not exceed 100.
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise ClipbenchError(f"Training diverged at step {step} (loss {losses[-1]}); lower --lr.")
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            log.info(
                "step %d/%d loss %.4f logit_scale %.2f lr %.2e (%.0f s)",
                step + 1, cfg.steps, losses[-1], logit_scale.item(), _lr_at(step, cfg),
                time.perf_counter() - start,
            )
    model.eval()
    return clip, losses


def save_checkpoint(model: torch.nn.Module, out: Path) -> str:
    """Write ``model``'s state_dict in fp16 to ``out`` atomically; record and return its sha256.

    ``SHA256SUMS`` beside ``out`` gets a ``sha256sum``-format line for it (other lines are kept).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).clone()
             for k, v in model.state_dict().items()}
    # torch.save to a path, not atomic_open's file object: the path names the archive's root
    # folder, so the bytes (and the published sha256) stay those of earlier releases.
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    digest = file_sha256(out)
    sums = out.parent / "SHA256SUMS"
    lines = [] if not sums.exists() else [
        line for line in sums.read_text(encoding="utf-8").splitlines() if not line.endswith(f"  {out.name}")
    ]
    lines.append(f"{digest}  {out.name}")
    sums.write_text("\n".join(sorted(lines, key=lambda s: s.split("  ", 1)[1])) + "\n", encoding="utf-8")
    return digest


def evaluate(checkpoint: Path, device: str = "cpu", cache_dir: Path | None = None) -> dict[str, float]:
    """The headline numbers of a saved checkpoint, through the evaluation pipeline (the synthetic
    test splits: zero-shot accuracy and text->image R@5)."""
    from clipbench.config import RunConfig
    from clipbench.pipeline import run

    config = RunConfig(model=MODEL_NAME, pretrained=str(checkpoint), tasks=["zeroshot", "retrieval"],
                       datasets=["default"], device=device, precision="fp32", n_bootstrap=0,
                       cache_dir=cache_dir, output=Path(cache_dir or ".") / "train-tiny-eval")
    outcome = run(config)
    if outcome.failures:
        raise ClipbenchError(f"evaluating {checkpoint} failed: {outcome.failures}")
    return {f"{r.dataset}/{r.primary_metric}": r.primary_value for r in outcome.records}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clipbench.train_tiny", description=__doc__.split("\n", 1)[0]
    )
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, required=True,
                        help="checkpoint file to write (fp16 state_dict)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch CPU threads; fixed because results depend on it (1 is fastest on a "
                             "busy 2-core machine: 2 threads stall each other behind other processes)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="processes rendering training images ahead of the step "
                             "(0: in the main process)")
    parser.add_argument("--device", default=defaults.device, help="cpu (deterministic) or cuda")
    parser.add_argument("--eval", action="store_true",
                        help="evaluate on the synthetic test splits afterwards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=min(args.warmup_steps, args.steps), seed=args.seed,
                      threads=args.threads, workers=args.workers, device=args.device)
    start = time.perf_counter()
    clip, losses = train(cfg)
    seconds = time.perf_counter() - start
    digest = save_checkpoint(clip.model, args.out)
    summary = {"config": asdict(cfg), "train_seconds": round(seconds, 1), "final_loss": losses[-1],
               "sha256": digest, "bytes": args.out.stat().st_size}
    if args.eval:
        summary["eval"] = evaluate(args.out, device=args.device)
    log.info("done: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
