"""Image-feature throughput in images/s: the end-to-end feature path against its physical limit.

Over ``--images`` JPEG files (``--image-size`` pixels, written once into a temporary image folder and
read through the imagefolder adapter) and one model, each round measures, one right after the other:

- decode: the encoders' own DataLoader (``clipbench.features.batch_loader``) with the model's
  decoder (``--decode``), ``--workers`` and ``--batch-size``, each batch made model input on the
  device and dropped: reading, decoding, the model's transform, collation, the transfer; no model.
- bare: ``model.encode_image`` on random tensors already on the device, timed after ``--warmup``
  batches as the median over ``--n-batches`` batches (CUDA synchronised around each batch).
- end to end: ``clipbench.features.encode_image_batches`` over the files (decode, preprocess in
  DataLoader workers, copy, encode, copy back), after one warm-up batch without workers.

The bound is what the end-to-end path could reach given the two rates: on CPU decode and forward
share the cores, so an image costs the time of both, ``1/(1/decode + 1/bare)``; on CUDA they overlap
(CPU cores decode while the GPU encodes), ``min(decode, bare)``. End to end is printed as a fraction
of the bound and of bare, per round and as the median of the rounds' ratios (rounds, since the
figures drift with other jobs on shared machines). With fewer workers than cores the CPU bound is
conservative: decode measured with ``--workers`` processes leaves cores idle that the forward pass
uses when both run. Each figure also has its CPU milliseconds per image (this process and its
workers): ``end to end`` above ``decode + bare`` is work the path adds (or, when other jobs hold
the cores, threads spinning while they wait for each other); it drifts less with load than the
rates do. Worker start-up and the first batch, decoded before the model has work, are in the
decode and end-to-end figures and weigh less the more images are timed.

    python benchmarks/feature_throughput.py                                 # CPU, ViT-S-32-alt, random weights
    python benchmarks/feature_throughput.py --model clipbench-tiny --pretrained synthetic --batch-size 64 \\
        --workers 1 --images 512 --rounds 3
    python benchmarks/feature_throughput.py --model ViT-B-32 --device cuda --batch-size 256 \\
        --precision bf16,amp --images 4096 --workers 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipbench.data.imagefolder import load_imagefolder
from clipbench.decode import decoder_for
from clipbench.features import batch_loader, encode_image_batches
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_throughput(model: ClipModel, samples: Any, batch_size: int, workers: int, decode: str = "pil") -> float:
    """Images/s of the feature path without the model: the encoders' own DataLoader
    (:func:`clipbench.features.batch_loader`) over ``samples`` with the model's decoder, workers and
    batch size, each batch made model input on the device (``Decoder.pixels``) and dropped.
    Worker start-up is included, as it is in :func:`end_to_end_throughput`."""
    device = torch.device(model.device)
    decoder = decoder_for(decode, model)
    loader = batch_loader(decoder, samples, range(len(samples)), batch_size=batch_size, workers=workers,
                          max_image_pixels=None, device=device)
    _synchronize(device)
    start = time.perf_counter()
    for batch in loader:
        decoder.pixels(batch, device)
    _synchronize(device)
    return len(samples) / (time.perf_counter() - start)


def end_to_end_throughput(model: ClipModel, samples: Any, batch_size: int, workers: int,
                          decode: str = "pil") -> float:
    """Images/s of the whole feature path over ``samples`` (:func:`encode_image_batches`), after one
    warm-up batch without workers (model and decoder warm, as the bare figure's)."""
    encode_image_batches(model, samples, indices=range(min(batch_size, len(samples))),
                         batch_size=batch_size, workers=0, decode=decode)
    _synchronize(torch.device(model.device))
    start = time.perf_counter()
    encode_image_batches(model, samples, batch_size=batch_size, workers=workers, decode=decode)
    return len(samples) / (time.perf_counter() - start)


@dataclass
class Round:
    """One round's figures, measured one after the other on the same files and model: images/s,
    and CPU milliseconds per image (this process and its DataLoader workers together)."""

    decode: float
    bare: float
    e2e: float
    decode_ms: float
    bare_ms: float
    e2e_ms: float

    def bound(self, device: torch.device) -> float:
        """The end-to-end path's physical limit (module docstring)."""
        if device.type == "cuda":
            return min(self.decode, self.bare)
        return 1 / (1 / self.decode + 1 / self.bare)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure_round(model: ClipModel, samples: Any, args: argparse.Namespace) -> Round:
    """Decode alone, bare forward, end to end, one after the other."""
    rates, ms = [], []
    bare_images = args.batch_size * (args.warmup + args.n_batches)
    for run, images in ((lambda: decode_throughput(model, samples, args.batch_size, args.workers, args.decode),
                         len(samples)),
                        (lambda: bare_encode_throughput(model, args.batch_size, args.n_batches, args.warmup),
                         bare_images),
                        (lambda: end_to_end_throughput(model, samples, args.batch_size, args.workers, args.decode),
                         len(samples) + min(args.batch_size, len(samples)))):
        before = cpu_seconds()
        rates.append(run())
        ms.append(1e3 * (cpu_seconds() - before) / images)
    return Round(*rates, *ms)


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
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (decode and end to end)")
    parser.add_argument("--decode", default="pil", help="the --decode choice (clipbench/decode.py)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of decode, bare, end to end (medians kept)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        samples = None
        if args.images:
            w, h = (int(v) for v in args.image_size.split("x"))
            samples = load_imagefolder(write_jpegs(Path(tmp), args.images, (w, h)), "test")
        for precision in args.precision.split(","):
            model = load_model(args.model, args.pretrained, device=args.device, precision=precision)
            device = torch.device(model.device)
            head = f"{model.name} ({model.pretrained}) {model.device} {precision:>4} batch {args.batch_size}"
            if samples is None:
                bare = bare_encode_throughput(model, args.batch_size, args.n_batches, args.warmup)
                print(f"{head}: bare encode_image {bare:9.1f} images/s")
                continue
            rounds = []
            for r in range(args.rounds):
                rounds.append(measure_round(model, samples, args))
                got = rounds[-1]
                print(f"{head} round {r + 1}: decode {got.decode:8.1f} | bare {got.bare:8.1f} | bound "
                      f"{got.bound(device):8.1f} | end to end {got.e2e:8.1f} images/s = "
                      f"{got.e2e / got.bound(device):.0%} of bound, {got.e2e / got.bare:.0%} of bare | CPU ms/image: "
                      f"decode {got.decode_ms:.2f} + bare {got.bare_ms:.2f} = {got.decode_ms + got.bare_ms:.2f}, "
                      f"end to end {got.e2e_ms:.2f} | load {os.getloadavg()[0]:.2f}", flush=True)
            kind = "min(decode, bare)" if device.type == "cuda" else "1/(1/decode + 1/bare)"
            print(f"{head}, {args.images} JPEG {args.image_size}, {args.workers} workers, --decode {args.decode}, "
                  f"median of {args.rounds} rounds: decode {statistics.median(r.decode for r in rounds):.1f}, "
                  f"bare {statistics.median(r.bare for r in rounds):.1f}, "
                  f"bound {kind} {statistics.median(r.bound(device) for r in rounds):.1f}, "
                  f"end to end {statistics.median(r.e2e for r in rounds):.1f} images/s = "
                  f"{statistics.median(r.e2e / r.bound(device) for r in rounds):.1%} of bound, "
                  f"{statistics.median(r.e2e / r.bare for r in rounds):.1%} of bare (per-round ratios); CPU ms/image "
                  f"decode + bare {statistics.median(r.decode_ms + r.bare_ms for r in rounds):.2f}, "
                  f"end to end {statistics.median(r.e2e_ms for r in rounds):.2f}")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
