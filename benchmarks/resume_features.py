"""Resumable feature extraction: kill -9 at a random point, resume, count the work redone.

Writes ``--images`` small random-texture PNGs into an image folder (one split, 10 classes), then
runs ``clipbench.features.image_features`` with the embedded ``clipbench-tiny`` model in child
processes, in chunks of ``--chunk-images`` (rounded up to whole batches):

1. a clean, uninterrupted extraction (the reference arrays and the encode time T);
2. an extraction SIGKILLed after a uniformly random delay in [0, 0.9 T) once its first chunk began;
3. a resume of (2) in the same cache.

Each child logs every chunk it begins; the images redone are those of the chunks the resume
encodes that the killed run had begun (its chunk in progress at the kill; at most one chunk). The
resumed entry is compared with the clean one with ``np.array_equal``.

    python benchmarks/resume_features.py                          # 20,000 images, chunks of 2,048
    python benchmarks/resume_features.py --images 4000 --chunk-images 512 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SPEC = """
name: resume-bench
title: Resume benchmark
tasks: [linear_probe]
primary_metric: accuracy
num_classes: 10
source:
  type: imagefolder
  path: {root}
  class_folders: [{folders}]
splits:
  train: train
  test: train
classnames: [{folders}]
templates: ["a photo of a {{c}}."]
"""
FOLDERS = [f"c{i}" for i in range(10)]


def write_split(root: Path, n_images: int, size: int = 24) -> Path:
    """``n_images`` random PNGs in ``root/images/train/c<k>/`` and their spec; returns the spec."""
    rng = np.random.default_rng(0)
    for i in range(n_images):
        folder = root / "images" / "train" / FOLDERS[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    spec = root / "resume-bench.yaml"
    spec.write_text(SPEC.format(root=root / "images", folders=", ".join(FOLDERS)))
    return spec


def child(spec_path: str, cache: str, log_path: str, batch_size: int, chunk_images: int, threads: int) -> None:
    """One extraction; appends ``begin <start> <stop>`` per chunk and ``done <seconds>`` to the log."""
    import torch

    from clipbench import specs
    from clipbench.data import load_split
    from clipbench.features import FeatureCache, encode_image_batches, image_features
    from clipbench.models import load_model

    torch.set_num_threads(threads)
    spec = specs.load_spec(spec_path)
    samples = load_split(spec, "train", Path(cache), Path(cache))
    model = load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")
    log = open(log_path, "a", buffering=1)

    def encoder(model, samples, **kw):
        chunk = kw["indices"]
        log.write(f"begin {chunk.start} {chunk.stop} {time.time()}\n")
        os.fsync(log.fileno())
        return encode_image_batches(model, samples, **kw)

    start = time.perf_counter()
    image_features(model, spec, "train", samples, FeatureCache(Path(cache) / "features"), batch_size=batch_size,
                   workers=0, encoder=encoder, chunk_images=chunk_images)
    log.write(f"done {time.perf_counter() - start}\n")


def chunks_begun(log: Path) -> list[tuple[int, int, float]]:
    lines = log.read_text().split("\n") if log.is_file() else []
    return [(int(a), int(b), float(t)) for kind, a, b, t in (ln.split() for ln in lines if ln.startswith("begin"))]


def encode_seconds(log: Path) -> float:
    return next(float(ln.split()[1]) for ln in log.read_text().split("\n") if ln.startswith("done"))


def stored_arrays(cache: Path) -> dict[str, np.ndarray]:
    (entry,) = (cache / "features" / "image").rglob("*.npz")
    with np.load(entry) as data:
        return {name: data[name] for name in data.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-images", type=int, default=2_048)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each child")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill time")
    parser.add_argument("--keep", action="store_true", help="keep the temporary images and caches")
    parser.add_argument("--child", nargs=3, metavar=("SPEC", "CACHE", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.batch_size, args.chunk_images, args.threads)
        return

    work = Path(tempfile.mkdtemp(prefix="clipbench-resume-"))
    started = time.perf_counter()
    spec = write_split(work, args.images)
    print(f"wrote {args.images} images in {time.perf_counter() - started:.1f} s under {work}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def run_child(cache: str, log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--batch-size", str(args.batch_size), "--chunk-images",
                                 str(args.chunk_images), "--threads", str(args.threads), "--child", str(spec),
                                 str(work / cache), str(work / log)], env=env)

    assert run_child("clean", "clean.log").wait() == 0
    clean_seconds = encode_seconds(work / "clean.log")
    plan = chunks_begun(work / "clean.log")
    print(f"clean run: {len(plan)} chunks of {plan[0][1] - plan[0][0]} images, {clean_seconds:.1f} s")

    killed = run_child("resumed", "killed.log")
    while not chunks_begun(work / "killed.log"):
        if killed.poll() is not None:
            raise SystemExit("the child to be killed exited before it began encoding")
        time.sleep(0.05)
    delay = random.Random(args.seed).uniform(0, 0.9 * clean_seconds)
    time.sleep(delay)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = chunks_begun(work / "killed.log")
    on_disk = sorted((work / "resumed" / "features" / "image").rglob("*.chunks/*.npz"))
    print(f"killed after {delay:.1f} s of encoding: {len(before)} chunks begun, {len(on_disk)} on disk")

    assert run_child("resumed", "resumed.log").wait() == 0
    after = chunks_begun(work / "resumed.log")
    begun_before = {(a, b) for a, b, _ in before}
    redone = sum(b - a for a, b, _ in after if (a, b) in begun_before)
    encoded_after = sum(b - a for a, b, _ in after)
    clean, resumed = stored_arrays(work / "clean"), stored_arrays(work / "resumed")
    identical = clean.keys() == resumed.keys() and all(np.array_equal(clean[k], resumed[k]) for k in clean)
    print(json.dumps({
        "images": args.images, "batch_size": args.batch_size, "chunk_images": plan[0][1] - plan[0][0],
        "chunks": len(plan), "kill_after_s": round(delay, 2), "chunks_done_before_kill": len(on_disk),
        "images_encoded_on_resume": encoded_after, "images_redone": redone,
        "redone_at_most_one_chunk": redone <= plan[0][1] - plan[0][0],
        "clean_encode_s": round(clean_seconds, 1), "resume_encode_s": round(encode_seconds(work / "resumed.log"), 1),
        "bit_identical_to_clean": identical,
    }, indent=1))
    if not args.keep:
        shutil.rmtree(work)
    if not identical:
        raise SystemExit("the resumed features differ from the clean run's")


if __name__ == "__main__":
    main()
