"""Image-feature throughput: bare ``model.encode_image`` on random tensors, in images/s.

The bare figure is the ceiling the end-to-end feature path (decode, preprocess, DataLoader,
encode, copy back) is compared against. Each precision is timed after ``--warmup`` batches as the
median over ``--n-batches`` timed batches (CUDA synchronised around each batch).

    python benchmarks/feature_throughput.py                                 # CPU, ViT-S-32-alt, random weights
    python benchmarks/feature_throughput.py --model ViT-B-32 --device cuda --batch-size 256 \\
        --precision fp32,fp16,bf16,amp
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-S-32-alt")
    parser.add_argument("--pretrained", default="none", help="tag, checkpoint path, or none (random)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32,amp", help="comma-separated: fp32,fp16,bf16,amp")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-batches", type=int, default=5, help="timed batches (median kept)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for precision in args.precision.split(","):
        model = load_model(args.model, args.pretrained, device=args.device, precision=precision)
        rate = bare_encode_throughput(model, args.batch_size, args.n_batches, args.warmup)
        print(f"{model.name} ({model.pretrained}) {model.device} {precision:>4} "
              f"batch {args.batch_size}: bare encode_image {rate:10.1f} images/s")


if __name__ == "__main__":
    main()
