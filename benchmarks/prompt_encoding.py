"""Prompt-encoding throughput for zero-shot classifiers: trimmed context, large batches, one class per batch.

Encodes C classes x 80 templates with a randomly initialized ViT-S-32-alt text tower, loaded through
clipbench, in three ways:
* ``trimmed``: clipbench's default (clipbench.features.text_features): the prompts
  (clipbench.tasks.zeroshot.build_prompts) in order of length, in batches of ``--batch-size``, each
  run on the context up to its longest prompt;
* ``full``: class-major batches of ``--batch-size`` on the full 77-token context (what open_clip's
  ``encode_text`` does);
* ``per class``: one batch of 80 prompts per class on the full context, like open_clip's legacy
  per-class loop (and clip_benchmark).
All give the same class weights to float rounding (the largest difference is printed).

    python benchmarks/prompt_encoding.py                       # CPU, 16 classes (< 1 min on 2 cores)
    python benchmarks/prompt_encoding.py --precision amp --batch-size 32,128
    python benchmarks/prompt_encoding.py --classes 1000 --device cuda --batch-size 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipbench.features import FeatureCache, text_features
from clipbench.models import load_model
from clipbench.tasks.zeroshot import build_prompts, class_weights

# 80 prompt templates in the style of the CLIP paper's ImageNet ensemble.
TEMPLATES = [
    f"{prefix} {subject}."
    for prefix in (
        "a photo of", "a bad photo of", "a sculpture of", "a rendering of", "graffiti of",
        "a cropped photo of", "a tattoo of", "a bright photo of", "a drawing of", "a pixelated photo of",
        "a close-up photo of", "a plastic", "a blurry photo of", "a painting of", "a jpeg corrupted photo of",
        "a low resolution photo of", "a toy", "itap of", "a cartoon", "an origami",
    )
    for subject in ("a {c}", "the {c}", "my {c}", "one large {c}")
]
assert len(TEMPLATES) == 80

_WORDS = (
    "red green spotted striped giant common lesser northern desert mountain river golden "
    "fox warbler beetle terrier salamander oak cabinet trombone espresso lighthouse kite"
).split()


def fake_classnames(num_classes: int) -> list[str]:
    """ImageNet-like multi-word class names ("spotted river warbler"), distinct and deterministic."""
    rng = np.random.default_rng(0)
    names = []
    while len(names) < num_classes:
        name = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 4)), replace=False))
        if name not in names:
            names.append(name)
    return names


def encode(model, prompts: list[str], batch_size: int) -> np.ndarray:
    """(T, D) features of ``prompts`` through clipbench's text path (features.text_features), cold."""
    with tempfile.TemporaryDirectory() as cache:
        return text_features(model, prompts, FeatureCache(Path(cache)), batch_size=batch_size)


def timed(fn, device: torch.device) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=16, help="number of classes (ImageNet: 1000)")
    parser.add_argument("--batch-size", default="32", help="prompts per batch across classes, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="fp32, amp, bf16, fp16")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the best time is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    trimmed = load_model("ViT-S-32-alt", "none", device=args.device, precision=args.precision)
    full = dataclasses.replace(trimmed, text_context="full")
    classnames = fake_classnames(args.classes)
    prompts = build_prompts(classnames, TEMPLATES)
    per_class = len(TEMPLATES)
    modes = [(f"trimmed, {bs} prompts/batch", trimmed, int(bs)) for bs in args.batch_size.split(",")]
    modes += [(f"full, {bs} prompts/batch", full, int(bs)) for bs in args.batch_size.split(",")]
    modes.append((f"per class, full, {per_class} prompts/batch", full, per_class))
    for _, model, batch_size in modes:  # warm-up
        encode(model, prompts[: min(len(prompts), 2 * per_class)], batch_size)

    # interleaved repeats, best time of each: load from other processes hits all modes alike
    best = {label: float("inf") for label, _, _ in modes}
    weights = {}
    for _ in range(args.repeats):
        for label, model, batch_size in modes:
            seconds, features = timed(lambda: encode(model, prompts, batch_size), device)
            best[label] = min(best[label], seconds)
            weights[label] = class_weights(features, args.classes)
    reference = modes[-1][0]

    print(f"device={device} threads={torch.get_num_threads()} precision={args.precision} "
          f"classes={args.classes} templates={per_class} prompts={len(prompts)}")
    for label, _, _ in modes:
        difference = np.abs(weights[label] - weights[reference]).max()
        print(f"{label:<38} {best[label]:8.2f} s  {len(prompts) / best[label]:9.1f} prompts/s  "
              f"{best[reference] / best[label]:6.2f}x of per class  max |weight difference| {difference:.2e}")


if __name__ == "__main__":
    main()
