"""Prompt-encoding throughput for zero-shot classifiers: large batches across classes vs one class per batch.

Encodes C classes x 80 templates with a randomly initialized ViT-S-32-alt text tower in two ways:
* ``across classes``: the class-major prompt list (clipbench.tasks.zeroshot.build_prompts) cut into
  batches of ``--batch-size`` prompts, then clipbench.tasks.zeroshot.class_weights;
* ``per class``: one batch of 80 prompts per class, like open_clip's legacy per-class loop.
Both give the same weights (checked); the script prints prompts/s for each.

    python benchmarks/prompt_encoding.py                       # CPU, 16 classes (< 3 min on 2 cores)
    python benchmarks/prompt_encoding.py --classes 1000 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import open_clip
import torch

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


@torch.no_grad()
def encode(model, tokenizer, prompts: list[str], batch_size: int, device: torch.device) -> np.ndarray:
    features = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            features.append(model.encode_text(tokens).float())
    return torch.cat(features).cpu().numpy()


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
    parser.add_argument("--batch-size", type=int, default=1024, help="prompts per batch across classes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the best time is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32-alt", pretrained=None).to(device).eval()
    tokenizer = open_clip.get_tokenizer("ViT-S-32-alt")
    classnames = fake_classnames(args.classes)
    prompts = build_prompts(classnames, TEMPLATES)
    encode(model, tokenizer, prompts[: min(len(prompts), 2 * len(TEMPLATES))], len(TEMPLATES), device)  # warm-up

    # interleaved repeats, best time of each: load from other processes hits both modes alike
    across_s = per_class_s = float("inf")
    for _ in range(args.repeats):
        seconds, across = timed(lambda: encode(model, tokenizer, prompts, args.batch_size, device), device)
        across_s = min(across_s, seconds)
        seconds, per_class = timed(lambda: encode(model, tokenizer, prompts, len(TEMPLATES), device), device)
        per_class_s = min(per_class_s, seconds)
    difference = np.abs(class_weights(across, args.classes) - class_weights(per_class, args.classes)).max()

    print(f"device={device} threads={torch.get_num_threads()} classes={args.classes} "
          f"templates={len(TEMPLATES)} prompts={len(prompts)}")
    print(f"across classes, {args.batch_size} prompts/batch: {across_s:8.2f} s  {len(prompts) / across_s:9.1f} prompts/s")
    print(f"per class, {len(TEMPLATES)} prompts/batch:       {per_class_s:8.2f} s  {len(prompts) / per_class_s:9.1f} prompts/s")
    print(f"speed-up {per_class_s / across_s:.2f}x; max |weight difference| {difference:.2e}")


if __name__ == "__main__":
    main()
