"""The whole paper suite, timed: synthetic JPEG stand-ins of the CLIP paper's 27 datasets, run end to end.

Builds stand-ins with the paper's train/test image counts (Table 9; ImageNet with its 1.28 M training
images) and a typical image side per dataset, each count multiplied by ``--scale`` (at least one
image per class and split, three per class in train), in the storage layout the real spec uses: ``imagefolder``
(``<split>/<class>/<i>.jpg``) or clip_benchmark ``webdataset`` shards (``<split>/<i>.tar`` with
``classnames.txt`` and ``zeroshot_classification_templates.txt``) for the datasets clipbench reads from
the ``clip-benchmark/wds_*`` mirrors. Video datasets (UCF101, Kinetics700) are stood in for by one
frame per clip, VOC2007 as single-label. Then runs one ``clipbench run`` (zero-shot + linear probe)
over all of them and prints, from the records' ``seconds``, the wall time per stage summed over
datasets: image features (decode + encode), text (prompt encoding), probe sweep (the linear-probe
task), the rest (records, sidecars, bootstrap, start-up: wall time minus the stages) and the total,
with each stage's extrapolation to ``--scale 1`` (features and probe in proportion to the images;
text and the rest as measured, they do not grow with the images; the factor is the paper's
image count over the one written, which the per-class floors make smaller than 1 / scale).

    python benchmarks/suite_timing.py --scale 0.002 --model clipbench-tiny --only cifar10,eurosat,dtd  # a check
    python benchmarks/suite_timing.py --scale 0.01 --pretrained none                # CPU, ViT-B-32 random weights
    python benchmarks/suite_timing.py --scale 1 --device cuda --probe-solver torch  # the GPU figure
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}.", "a close-up photo of the {c}."]


@dataclass(frozen=True)
class StandIn:
    name: str
    classes: int
    train: int
    test: int
    side: int      # typical image side in pixels
    layout: str    # imagefolder | webdataset


# CLIP paper Table 9 (train / test sizes, classes); sides are typical of each dataset's images
PAPER_SUITE = [
    StandIn("food101", 101, 75750, 25250, 512, "imagefolder"),
    StandIn("cifar10", 10, 50000, 10000, 32, "imagefolder"),
    StandIn("cifar100", 100, 50000, 10000, 32, "imagefolder"),
    StandIn("birdsnap", 500, 37221, 2500, 400, "imagefolder"),
    StandIn("sun397", 397, 19850, 19850, 300, "imagefolder"),
    StandIn("stanford_cars", 196, 8144, 8041, 360, "imagefolder"),
    StandIn("fgvc_aircraft", 100, 6667, 3333, 700, "imagefolder"),
    StandIn("voc2007", 20, 5011, 4952, 400, "imagefolder"),
    StandIn("dtd", 47, 3760, 1880, 500, "imagefolder"),
    StandIn("oxford_pets", 37, 3680, 3669, 400, "imagefolder"),
    StandIn("caltech101", 102, 3060, 6085, 300, "webdataset"),
    StandIn("flowers102", 102, 2040, 6149, 500, "imagefolder"),
    StandIn("mnist", 10, 60000, 10000, 28, "imagefolder"),
    StandIn("fer2013", 7, 32140, 3574, 48, "imagefolder"),
    StandIn("stl10", 10, 1000, 8000, 96, "imagefolder"),
    StandIn("eurosat", 10, 10000, 5000, 64, "webdataset"),
    StandIn("resisc45", 45, 3150, 25200, 256, "webdataset"),
    StandIn("gtsrb", 43, 26640, 12630, 50, "imagefolder"),
    StandIn("kitti_distance", 4, 6770, 711, 375, "webdataset"),
    StandIn("country211", 211, 43200, 21100, 400, "imagefolder"),
    StandIn("pcam", 2, 294912, 32768, 96, "imagefolder"),
    StandIn("ucf101", 101, 9537, 1794, 240, "imagefolder"),
    StandIn("kinetics700", 700, 494801, 31669, 340, "imagefolder"),
    StandIn("clevr_counts", 8, 2000, 500, 320, "webdataset"),
    StandIn("hateful_memes", 2, 8500, 500, 500, "imagefolder"),
    StandIn("rendered_sst2", 2, 7792, 1821, 300, "imagefolder"),
    StandIn("imagenet", 1000, 1281167, 50000, 400, "imagefolder"),
]


def jpeg(rng: np.random.Generator, side: int) -> bytes:
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth content: a realistic JPEG size
    buf = io.BytesIO()
    Image.fromarray(low).resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Every class once, then random classes: each class folder has an image."""
    return np.concatenate([np.arange(classes), rng.integers(0, classes, max(0, n - classes))])


def write_standin(root: Path, specs: Path, ds: StandIn, scale: float, seed: int) -> int:
    """Data under ``root/<name>`` and its spec ``specs/<name>_standin.yaml`` (named apart from the
    packaged spec); returns the images written."""
    rng = np.random.default_rng(seed)
    folder = root / ds.name
    classnames = [f"{ds.name} class {c:04d}" for c in range(ds.classes)]
    folders = [name.replace(" ", "_") for name in classnames]  # matched to the class names by clipbench
    written = 0
    for split, full in (("train", ds.train), ("test", ds.test)):
        # at least one image per class, three in train (the probe carves its validation part from train)
        n = max(ds.classes * (3 if split == "train" else 1), round(full * scale))
        ys = labels(n, ds.classes, rng)
        if ds.layout == "webdataset":
            (folder / split).mkdir(parents=True)
            with tarfile.open(folder / split / "0.tar", "w") as tar:
                for i, y in enumerate(ys):
                    for name, payload in ((f"s{i:07d}.jpg", jpeg(rng, ds.side)), (f"s{i:07d}.cls", str(y).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            (folder / split / "nshards.txt").write_text("1")
        else:
            for c in range(ds.classes):
                (folder / split / folders[c]).mkdir(parents=True)
            for i, y in enumerate(ys):
                (folder / split / folders[y] / f"{i:07d}.jpg").write_bytes(jpeg(rng, ds.side))
        written += n
    spec = [f"name: {ds.name}_standin", f"title: {ds.name} stand-in", "tasks: [zeroshot, linear_probe]",
            "primary_metric: accuracy", f"num_classes: {ds.classes}", "source:", f"  type: {ds.layout}",
            f"  path: {ds.name}", "  download: false", "splits:", "  train: train", "  test: test"]
    if ds.layout == "webdataset":
        (folder / "classnames.txt").write_text("".join(c + "\n" for c in classnames))
        (folder / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in TEMPLATES))
    else:
        spec += ["classnames:", *[f"- {c}" for c in classnames], "templates:", *[f"- '{t}'" for t in TEMPLATES]]
    (specs / f"{ds.name}_standin.yaml").write_text("\n".join(spec) + "\n")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.01, help="multiplies every image count")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None,
                        help="tag, checkpoint path, or none (random weights); default: the model's own default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe-solver", default=None, help="sklearn (default) or torch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated subset of the stand-in names")
    parser.add_argument("--work", type=Path, default=None, help="where data, cache and records go (kept)")
    args = parser.parse_args()

    chosen = [d for d in PAPER_SUITE if args.only is None or d.name in args.only.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="suite-timing-"))
    data, specs = work / "data", work / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if data.exists():
        sys.exit(f"{data} exists; give a new --work (the image counts depend on --scale)")
    images = {d.name: write_standin(data, specs, d, args.scale, seed) for seed, d in enumerate(chosen)}
    print(f"wrote {sum(images.values())} images for {len(images)} stand-ins in {time.perf_counter() - start:.1f} s "
          f"({work})")

    cmd = [sys.executable, "-m", "clipbench", "run", "--model", args.model,
           "--datasets", *[str(specs / f"{d.name}_standin.yaml") for d in chosen], "--tasks", "zeroshot,linear_probe",
           "--device", args.device, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--no-download", "--data-root", str(data), "--cache-dir", str(work / "cache"),
           "--output", str(work / "records"), "--force"]
    if args.pretrained:
        cmd += ["--pretrained", args.pretrained]
    if args.probe_solver:
        cmd += ["--probe-solver", args.probe_solver]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"clipbench run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")

    stages = {"features": 0.0, "text": 0.0, "probe sweep": 0.0}
    for path in (work / "records").rglob("*.json"):
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or "seconds" not in record:
            continue  # sidecar metadata, not a record
        seconds = record["seconds"]
        stages["features"] += seconds.get("features", 0.0)
        stages["text"] += seconds.get("text", 0.0)
        if record["task"] == "linear_probe":
            stages["probe sweep"] += seconds.get("task", 0.0)
    stages["rest"] = max(0.0, wall - sum(stages.values()))
    grows = {"features", "probe sweep"}  # with the image count; text and the rest do not
    factor = sum(d.train + d.test for d in chosen) / sum(images.values())  # per-class floors: not 1/scale
    print(f"\n{len(chosen)} datasets, scale {args.scale} ({sum(images.values())} images, x{factor:.0f} to the "
          f"paper's counts), {args.model} on {args.device}")
    print(f"{'stage':14s} {'measured (s)':>13s} {'at scale 1 (s)':>15s}")
    total1 = 0.0
    for stage, seconds in stages.items():
        full = seconds * factor if stage in grows else seconds
        total1 += full
        print(f"{stage:14s} {seconds:13.1f} {full:15.1f}")
    print(f"{'total':14s} {wall:13.1f} {total1:15.1f}")


if __name__ == "__main__":
    main()
