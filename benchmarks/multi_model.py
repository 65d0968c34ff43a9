"""Several models over the same data: decode once for all of them vs once per model.

Writes ``--images`` JPEGs of ``--size`` pixels (ImageNet-validation-like 500x375 by default) into an
image folder (10 classes, one split used as train and test), saves ``--models`` random-weight
checkpoints of ``--arch`` (default the embedded ``clipbench-tiny``, whose forward pass is cheap
next to decoding a JPEG, i.e. decode-bound), and times zero-shot runs of all of them:

- ``shared``: one ``clipbench run --model M1 ... MN`` (the default: each image decoded once);
- ``one process, one at a time``: the same with ``--no-shared-decode`` (each image decoded N times);
- ``N processes``: N separate ``clipbench run --model Mi``, as without multi-model runs.

Each round uses fresh output and cache folders, so every run encodes everything; rounds are
interleaved, and the medians and the ratios to ``shared`` are printed. The records of the shared
and the one-at-a-time runs are checked to be identical (timings aside).

    python benchmarks/multi_model.py                          # 4 x clipbench-tiny, 400 images, 3 rounds
    python benchmarks/multi_model.py --models 8 --images 1000 --workers 4 --device cuda
    python benchmarks/multi_model.py --arch ViT-S-32-alt --models 2 --images 200   # forward-heavier
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SPEC = """
name: multi-bench
title: Multi-model benchmark
tasks: [zeroshot]
primary_metric: accuracy
num_classes: 10
source:
  type: imagefolder
  path: {root}
  class_folders: [{folders}]
splits:
  test: test
classnames: [{folders}]
templates: ["a photo of a {{c}}."]
"""
FOLDERS = [f"c{i}" for i in range(10)]


def write_data(root: Path, n_images: int, size: tuple[int, int]) -> Path:
    """``n_images`` JPEGs (smooth random colour fields with noise, quality 90) and their spec."""
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n_images):
        folder = root / "images" / "test" / FOLDERS[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
        noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:06d}.jpg", quality=90)
    spec = root / "multi-bench.yaml"
    spec.write_text(SPEC.format(root=root / "images", folders=", ".join(FOLDERS)), encoding="utf-8")
    return spec


def save_checkpoints(arch: str, n: int, folder: Path) -> list[str]:
    """``n`` random-weight checkpoints of ``arch`` (seeds 0..n-1), as ``arch,path`` model choices."""
    import open_clip
    import torch

    from clipbench.models import register_model_configs

    register_model_configs()
    choices = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
        path = folder / f"{arch}-seed{seed}.pt"
        torch.save(model.state_dict(), path)
        choices.append(f"{arch},{path}")
    return choices


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clipbench", "run", *argv], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"clipbench run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def feature_seconds(*outputs: Path) -> float:
    """The records' ``seconds.features`` summed: the decode and encode time of the runs."""
    return sum(json.loads(path.read_text())["seconds"]["features"]
               for output in outputs for path in output.rglob("*.json") if path.name.count(".") == 1)


def records(output: Path) -> dict[str, dict]:
    found = {}
    for path in output.rglob("*.json"):
        if path.name.count(".") == 1:
            record = json.loads(path.read_text())
            record.pop("seconds")
            record.pop("created", None)
            found[str(path.relative_to(output))] = record
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="clipbench-tiny")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="clipbench-multi-") as tmp:
        root = Path(tmp)
        spec = write_data(root, args.images, tuple(args.size))
        choices = save_checkpoints(args.arch, args.models, root)
        common = ["--datasets", str(spec), "--tasks", "zeroshot", "--device", args.device, "--precision",
                  args.precision, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                  "--bootstrap", "0", "--no-download"]
        names = ("shared", "one process, one at a time", "N processes")
        times: dict[str, list[float]] = {name: [] for name in names}
        feats: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            run_dir = root / f"round{r}"
            times["shared"].append(timed(["--model", *choices, *common, "--output", str(run_dir / "shared"),
                                          "--cache-dir", str(run_dir / "c-shared")], env))
            times["one process, one at a time"].append(timed(
                ["--model", *choices, *common, "--no-shared-decode", "--output", str(run_dir / "serial"),
                 "--cache-dir", str(run_dir / "c-serial")], env))
            times["N processes"].append(sum(
                timed(["--model", choice, *common, "--output", str(run_dir / f"alone{i}"),
                       "--cache-dir", str(run_dir / f"c-alone{i}")], env) for i, choice in enumerate(choices)))
            for name, outputs in zip(names, ([run_dir / "shared"], [run_dir / "serial"],
                                             [run_dir / f"alone{i}" for i in range(len(choices))])):
                feats[name].append(feature_seconds(*outputs))
            if records(run_dir / "shared") != records(run_dir / "serial"):
                sys.exit("the shared and the one-at-a-time runs wrote different records")
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    base = statistics.median(times["shared"])
    print(f"\n{args.models} x {args.arch}, {args.images} JPEGs of {args.size[0]}x{args.size[1]}, "
          f"zero-shot, batch {args.batch_size}, {args.workers} loader worker(s), {args.device}, "
          f"{args.precision}; medians of {args.rounds} rounds, each run in a fresh process and cache")
    base_features = statistics.median(feats["shared"])
    print(f"{'':28} {'wall s':>8} {'vs shared':>10} {'features s':>11} {'vs shared':>10}")
    for name in names:
        wall, feat = statistics.median(times[name]), statistics.median(feats[name])
        print(f"{name:28} {wall:8.2f} {wall / base:9.2f}x {feat:11.2f} {feat / base_features:9.2f}x")
    print("(wall: whole `clipbench run` processes, start-up included; features: the records' "
          "seconds.features, the decode and encode stage)")


if __name__ == "__main__":
    main()
