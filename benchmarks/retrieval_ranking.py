"""Throughput of retrieval scoring and ranking (clipbench.tasks.retrieval.retrieval_metrics).

MSCOCO 5k-test sized problem by default: 5,000 images x 25,000 captions (5 per image), D = 512,
random L2-normalized float32 features. Each run scores every pair in both directions
(2 x n_images x n_captions pairs); the features are already on the device before timing starts.

    python benchmarks/retrieval_ranking.py [--images 5000] [--captions-per-image 5] [--dim 512]
        [--chunk-sizes 256 1024 4096] [--devices cpu cuda] [--repeats 1]

Prints one line per (device, chunk size): best wall seconds over the repeats, pairs/s and, on CUDA,
the peak GPU memory allocated (features included).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from clipbench.tasks.retrieval import retrieval_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n_captions = args.images * args.captions_per_image
    images = rng.standard_normal((args.images, args.dim), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = rng.standard_normal((n_captions, args.dim), dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    text_to_image = rng.permutation(np.repeat(np.arange(args.images), args.captions_per_image))
    pairs = 2 * args.images * n_captions

    print(
        f"{args.images} images x {n_captions} captions, D={args.dim}, {pairs / 1e6:.0f}M pairs per run "
        f"(both directions); torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    for name in args.devices:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"{name}: not available, skipped")
            continue
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        image_t, text_t = torch.from_numpy(images).to(device), torch.from_numpy(texts).to(device)
        retrieval_metrics(image_t[:64], text_t[:320], text_to_image[:320] % 64, device=device)  # warm-up
        for chunk in args.chunk_sizes:
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                result = retrieval_metrics(image_t, text_t, text_to_image, chunk_size=chunk, device=device)
                times.append(time.perf_counter() - start)  # ranks are copied to the host: already synchronized
            best = min(times)
            peak = f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
            print(
                f"{label:>24} chunk {chunk:>6}: {best:8.3f} s  {pairs / best / 1e6:10.1f} M pairs/s{peak}  "
                f"(t2i R@1 {result.metrics['text_to_image_R@1']:.4f})"
            )


if __name__ == "__main__":
    main()
