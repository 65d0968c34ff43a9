"""Data-parallel feature extraction: images/s with 1 vs N torchrun processes, JPEG decode included.

Writes ``--images`` synthetic JPEGs (``--size``, ImageNet-like 500x375 by default) as an imagefolder,
then for each N in ``--procs`` runs ``torchrun --nproc_per_node N -m clipbench run --tasks zeroshot``
on them with an empty cache and reports

* ``features``: images / rank 0's feature-extraction seconds from the record (request, decode,
  preprocess, encode of every shard, gather to rank 0);
* ``wall``: the whole command (process start, model load, text prompts, task);

next to the bare ``encode_image`` ceiling of one process on tensors already on the device
(``benchmarks/feature_throughput.py``). On CPU each of the N processes gets ``cores // N`` threads
(``--threads`` overrides).

    python benchmarks/distributed_throughput.py                      # CPU, ViT-S-32-alt, 1 and 2 processes
    python benchmarks/distributed_throughput.py --device cuda --precision bf16 --model ViT-B-32 \\
        --procs 1,2,4,8 --images 20000 --batch-size 256 --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_throughput import bare_encode_throughput  # noqa: E402

SPEC = """name: jpegs
title: Synthetic JPEGs
tasks: [zeroshot]
primary_metric: accuracy
num_classes: 2
source: {{type: imagefolder, path: {root}}}
splits: {{test: test}}
classnames: [first, second]
templates: ["a photo of a {{c}}."]
"""


def write_jpegs(root: Path, n: int, size: tuple[int, int]) -> None:
    """``root/test/{0,1}/*.jpg``: smooth random images (JPEG-typical file sizes and decode cost)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "test" / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=90)


def run(nproc: int, args: argparse.Namespace, work: Path, spec: Path) -> tuple[float, float]:
    """(wall seconds, rank 0's feature seconds) of one torchrun launch with an empty cache."""
    out, cache = work / f"out{nproc}", work / f"cache{nproc}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "clipbench", "run", "--model", args.model, "--pretrained", args.pretrained,
           "--device", args.device, "--precision", args.precision, "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--tasks", "zeroshot", "--bootstrap", "10",
           "--datasets", str(spec), "--output", str(out), "--cache-dir", str(cache),
           "--data-root", str(work)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"torchrun with {nproc} processes failed:\n{proc.stderr[-3000:]}")
    (record,) = list(out.rglob("zeroshot.json"))
    return wall, json.loads(record.read_text())["seconds"]["features"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-S-32-alt")
    parser.add_argument("--pretrained", default="none", help="tag, checkpoint path, or none (random)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="500x375", help="JPEG width x height")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process (default: cores // processes)")
    args = parser.parse_args()

    import torch

    from clipbench.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_jpegs(work / "jpegs", args.images, tuple(int(s) for s in args.size.split("x")))
        spec = work / "jpegs.yaml"
        spec.write_text(SPEC.format(root=work / "jpegs"))
        model = load_model(args.model, args.pretrained, device=args.device, precision=args.precision)
        bare = bare_encode_throughput(model, args.batch_size, n_batches=3)
        del model
        print(f"torch {torch.__version__}, {os.cpu_count()} cores, {args.model} {args.device} "
              f"{args.precision}, {args.images} JPEGs {args.size}, batch {args.batch_size}, "
              f"{args.workers} workers per process")
        print(f"bare encode_image, 1 process, {torch.get_num_threads()} threads: {bare:9.1f} images/s")
        base = None
        for nproc in (int(p) for p in args.procs.split(",")):
            wall, features = run(nproc, args, work, spec)
            rate = args.images / features
            base = base or rate
            print(f"{nproc} process(es): features {rate:9.1f} images/s ({features:6.2f} s, "
                  f"x{rate / base:4.2f} vs the first), wall {wall:6.2f} s")


if __name__ == "__main__":
    main()
