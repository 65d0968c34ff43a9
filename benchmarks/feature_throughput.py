"""Image-feature throughput in images/s: the end-to-end feature path against bare ``encode_image``.

Bare: ``model.encode_image`` on random tensors already on the device, timed after ``--warmup``
batches as the median over ``--n-batches`` batches (CUDA synchronised around each batch): the
ceiling. End to end: ``clipbench.features.encode_image_batches`` over ``--images`` JPEG files
(``--image-size`` pixels, written once into a temporary image folder and read through the
imagefolder adapter), i.e. decode, preprocess in DataLoader workers, copy, encode, copy back.

    python benchmarks/feature_throughput.py                                 # CPU, ViT-S-32-alt, random weights
    python benchmarks/feature_throughput.py --model ViT-B-32 --device cuda --batch-size 256 \\
        --precision bf16,amp --images 4096 --workers 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipbench.data.imagefolder import load_imagefolder
from clipbench.features import encode_image_batches
from clipbench.models import ClipModel, load_model


def bare_encode_throughput(model: ClipModel, batch_size: int, n_batches: int, warmup: int = 2) -> float:
    """Images/s of ``model.model.encode_image`` alone on random (batch_size, 3, H, W) inputs already
    on the device, in the model's precision (cast weights or autocast): the median batch time."""
    device = torch.device(model.device)
    pixels = torch.randn(batch_size, 3, *model.image_size, device=device).to(model.input_dtype)

    def one_batch() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), model.autocast():
            model.model.encode_image(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        one_batch()
    return batch_size / statistics.median(one_batch() for _ in range(n_batches))


def write_jpegs(root: Path, n_images: int, size: tuple[int, int]) -> Path:
    """``n_images`` random-texture JPEGs (quality 90) in ``root/test/<class>/``; returns root."""
    rng = np.random.default_rng(0)
    for i in range(n_images):
        folder = root / "test" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize(size, Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def end_to_end_throughput(model: ClipModel, root: Path, batch_size: int, workers: int) -> float:
    """Images/s of the whole feature path over the JPEG folder (one warm-up batch excluded)."""
    samples = load_imagefolder(root, "test")
    encode_image_batches(model, samples, indices=range(min(batch_size, len(samples))),
                         batch_size=batch_size, workers=0)
    if str(model.device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    encode_image_batches(model, samples, batch_size=batch_size, workers=workers)
    return len(samples) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-S-32-alt")
    parser.add_argument("--pretrained", default="none", help="tag, checkpoint path, or none (random)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32,amp", help="comma-separated: fp32,fp16,bf16,amp")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-batches", type=int, default=5, help="timed batches (median kept)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=256, help="JPEGs for the end-to-end path (0: skip)")
    parser.add_argument("--image-size", default="500x375", help="JPEG size WxH (ImageNet-like)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (end to end)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = None
        if args.images:
            w, h = (int(v) for v in args.image_size.split("x"))
            root = write_jpegs(Path(tmp), args.images, (w, h))
        for precision in args.precision.split(","):
            model = load_model(args.model, args.pretrained, device=args.device, precision=precision)
            bare = bare_encode_throughput(model, args.batch_size, args.n_batches, args.warmup)
            line = (f"{model.name} ({model.pretrained}) {model.device} {precision:>4} batch {args.batch_size}: "
                    f"bare encode_image {bare:9.1f} images/s")
            if root is not None:
                e2e = end_to_end_throughput(model, root, args.batch_size, args.workers)
                line += (f" | end to end ({args.images} JPEG {args.image_size}, {args.workers} workers) "
                         f"{e2e:9.1f} images/s = {e2e / bare:.0%} of bare")
            print(line)


if __name__ == "__main__":
    main()
