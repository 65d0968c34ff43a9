"""clipbench vs clip_benchmark, side by side: zero-shot classification on the same webdataset folders.

Lays out datasets in clip_benchmark's ``wds_*`` layout (``<name>/test/<i>.tar`` shards of JPEG +
``.cls`` members, ``test/nshards.txt``, ``classnames.txt``, ``zeroshot_classification_templates.txt``)
and a random-weight ViT-S-32-alt checkpoint (one ``.pt`` file, seeded), then times two scenarios,
each a fresh process of each CLI on identical inputs, interleaved round by round (the order of the
two tools alternates between rounds):

* ``multi``: every dataset in one invocation (``--datasets`` names): by default a 10-class one
  (18 templates, 500 images), a 100-class one (18 templates, 400 images) and a 1,000-class one with
  80 templates (140 images), the case where clip_benchmark encodes prompts one class (80 prompts)
  per batch; 1,040 test images in all;
* ``single``: the 10-class dataset alone.

Both run zero-shot only, batch 64, one loader worker (clip_benchmark fails with more workers than
shards), on the CPU, offline, at one precision for both: ``--precision fp32`` (default; clipbench
``--precision fp32``, clip_benchmark ``--no_amp``) or ``amp`` (both tools' default: bf16 autocast on
the CPU, emulated and several times slower on CPUs without native bf16), and with cold caches: every
round gets a fresh clipbench ``--cache-dir`` and ``--output``, so no feature cache is reused. The
script prints each round's wall time (process start to exit), the medians, the ratio
clip_benchmark / clipbench (> 1: clipbench is faster), and both tools' top-1 accuracy per dataset
(the same model on the same images: they agree unless scores tie).

clip_benchmark is never installed into clipbench's environment; give the Python of a separate venv
(clip-benchmark 1.6.2 imports ``requests`` without declaring it)::

    python -m venv /tmp/cbvenv
    /tmp/cbvenv/bin/pip install -c constraints.txt clip-benchmark==1.6.2 'numpy<2.4' requests
    python benchmarks/vs_clip_benchmark.py --cb-python /tmp/cbvenv/bin/python         # the issue's setting
    python benchmarks/vs_clip_benchmark.py --cb-python /tmp/cbvenv/bin/python --big-classes 100 --rounds 3
    python benchmarks/vs_clip_benchmark.py --scale 0.25 --big-classes 20     # ~10 min on 2 shared cores

On a CPU the 1,000 x 80 prompts dominate: clip_benchmark encodes them one class (80 prompts) per
batch on the full 77-token context, clipbench 256 per batch on a context trimmed to each batch's
longest prompt (docs/architecture.md, "Throughput and threads"); ``--big-classes`` scales that
dataset down.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MODEL = "ViT-S-32-alt"
SHARD_SIZE = 100

# the CLIP paper's 18 CIFAR templates and 80 ImageNet-style templates (wording does not affect speed)
SHORT_TEMPLATES = [f"a {adj} photo of a {{c}}." for adj in (
    "", "blurry", "black and white", "low contrast", "high contrast", "bad", "good", "small", "big",
    "bright", "dark", "pixelated", "jpeg corrupted", "cropped", "close-up", "nice", "weird", "cool")]
LONG_TEMPLATES = [f"{prefix} {subject}." for prefix in (
    "a photo of", "a bad photo of", "a sculpture of", "a rendering of", "graffiti of", "a cropped photo of",
    "a tattoo of", "a bright photo of", "a drawing of", "a pixelated photo of", "a close-up photo of",
    "a plastic", "a blurry photo of", "a painting of", "a jpeg corrupted photo of",
    "a low resolution photo of", "a toy", "itap of", "a cartoon", "an origami",
) for subject in ("a {c}", "the {c}", "my {c}", "one large {c}")]

_CB_MISSING = """\
clip_benchmark's Python was not found at {path}.

This benchmark runs clip_benchmark from its own virtual environment, so that nothing is installed
into clipbench's. Create it once (about 2 GB with torch), then pass its Python:

    python -m venv /tmp/cbvenv
    /tmp/cbvenv/bin/pip install -c constraints.txt clip-benchmark==1.6.2 'numpy<2.4' requests
    python benchmarks/vs_clip_benchmark.py --cb-python /tmp/cbvenv/bin/python
"""


@dataclass(frozen=True)
class WdsDataset:
    name: str
    classes: int
    templates: list[str]
    images: int


def write_dataset(root: Path, ds: WdsDataset, image_size: int, seed: int) -> None:
    """``root/<name>``: shards ``test/<i>.tar`` (+ ``nshards.txt``), classnames and templates."""
    rng = np.random.default_rng(seed)
    folder = root / ds.name
    (folder / "test").mkdir(parents=True)
    (folder / "classnames.txt").write_text("".join(f"{ds.name} class {c}\n" for c in range(ds.classes)))
    (folder / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in ds.templates))
    shards = range(0, ds.images, SHARD_SIZE)
    (folder / "test" / "nshards.txt").write_text(str(len(shards)))
    for shard, start in enumerate(shards):
        with tarfile.open(folder / "test" / f"{shard}.tar", "w") as tar:
            for i in range(start, min(ds.images, start + SHARD_SIZE)):
                low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth content, a typical JPEG size
                buf = io.BytesIO()
                Image.fromarray(low).resize((image_size, image_size), Image.BILINEAR).save(buf, "JPEG", quality=90)
                for name, payload in ((f"s{i:07d}.jpg", buf.getvalue()),
                                      (f"s{i:07d}.cls", str(int(rng.integers(ds.classes))).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def write_spec(folder: Path, ds: WdsDataset) -> Path:
    """A clipbench spec for ``ds`` (data under ``--data-root``; prompts from the folder)."""
    path = folder / f"{ds.name}.yaml"
    path.write_text(
        f"name: {ds.name}\ntitle: {ds.name}\ntasks: [zeroshot]\nprimary_metric: accuracy\n"
        f"num_classes: {ds.classes}\nsource:\n  type: webdataset\n  path: {ds.name}\n  download: false\n"
        "splits:\n  test: test\n"
    )
    return path


def write_checkpoint(path: Path) -> None:
    """A seeded random-weight ViT-S-32-alt state dict both tools load with ``--pretrained PATH``."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    torch.save(model.state_dict(), path)


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": ""}  # clip_benchmark 1.6.2 has no --device: it takes cuda when it sees one


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=offline_env())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{cmd[0]} failed (exit {done.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    return seconds


def clipbench_cmd(work: Path, names: list[str], checkpoint: Path, tag: str, precision: str) -> list[str]:
    return [sys.executable, "-m", "clipbench", "run", "--model", MODEL, "--pretrained", str(checkpoint),
            "--datasets", *[str(work / "specs" / f"{n}.yaml") for n in names], "--tasks", "zeroshot",
            "--batch-size", "64", "--workers", "1", "--device", "cpu", "--precision", precision, "--no-download",
            "--data-root", str(work / "data"), "--cache-dir", str(work / f"cache-{tag}"),
            "--output", str(work / f"out-{tag}")]


def clip_benchmark_cmd(cb_python: str, work: Path, names: list[str], checkpoint: Path, tag: str,
                       precision: str) -> list[str]:
    out = work / f"cbout-{tag}"
    out.mkdir()
    return [cb_python, "-m", "clip_benchmark.cli", "eval", "--dataset", *[f"wds/{n}" for n in names],
            "--dataset_root", str(work / "data" / "{dataset}"), "--model", MODEL, "--pretrained", str(checkpoint),
            "--task", "zeroshot_classification", "--batch_size", "64", "--num_workers", "1",
            "--output", str(out / "{dataset}.json"), *([] if precision == "amp" else ["--no_amp"])]


def accuracies(work: Path, tag: str) -> tuple[dict[str, float], dict[str, float]]:
    """Top-1 per dataset: (clipbench's records, clip_benchmark's JSON files) of round ``tag``."""
    ours = {}
    for path in (work / f"out-{tag}").rglob("zeroshot.json"):
        record = json.loads(path.read_text())
        ours[record["dataset"]] = record["metrics"]["accuracy"]
    theirs = {p.stem: json.loads(p.read_text())["metrics"]["acc1"] for p in (work / f"cbout-{tag}").glob("*.json")}
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cb-python", default="/tmp/cbvenv/bin/python",
                        help="Python of a venv with clip-benchmark installed (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--big-classes", type=int, default=1000, help="classes of the 80-template dataset")
    parser.add_argument("--big-images", type=int, default=140)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every dataset's image count")
    parser.add_argument("--image-size", type=int, default=64, help="JPEG side in pixels (resized to 224 by both)")
    parser.add_argument("--scenarios", default="multi,single", help="comma-separated: multi, single")
    parser.add_argument("--precision", choices=("fp32", "amp"), default="fp32", help="for both tools")
    parser.add_argument("--work", type=Path, default=None, help="keep data and outputs here (default: a temp dir)")
    args = parser.parse_args()

    cb_python = shutil.which(args.cb_python) or args.cb_python
    probe = subprocess.run([cb_python, "-c", "import clip_benchmark"], capture_output=True) \
        if Path(cb_python).exists() else None
    if probe is None or probe.returncode != 0:
        sys.exit(_CB_MISSING.format(path=args.cb_python))

    def scaled(n: int) -> int:
        return max(1, round(n * args.scale))

    datasets = [WdsDataset("small10", 10, SHORT_TEMPLATES, scaled(500)),
                WdsDataset("mid100", 100, SHORT_TEMPLATES, scaled(400)),
                WdsDataset(f"big{args.big_classes}", args.big_classes, LONG_TEMPLATES, scaled(args.big_images))]
    scenarios = {"multi": [d.name for d in datasets], "single": [datasets[0].name]}
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="vs-cb-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        (work / "specs").mkdir(exist_ok=True)
        for seed, ds in enumerate(datasets):
            if (work / "data" / ds.name).exists():  # a kept --work from another --scale: rewrite
                shutil.rmtree(work / "data" / ds.name)
            write_dataset(work / "data", ds, args.image_size, seed)
            write_spec(work / "specs", ds)
        checkpoint = work / "vit-s-32-alt-random.pt"
        if not checkpoint.exists():
            write_checkpoint(checkpoint)
        print(f"data: {work / 'data'}; " + ", ".join(
            f"{d.name}: {d.classes} classes x {len(d.templates)} templates, {d.images} images" for d in datasets))

        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for scenario in chosen:
                names = scenarios[scenario]
                tools = ["clip_benchmark", "clipbench"] if r % 2 == 0 else ["clipbench", "clip_benchmark"]
                for tool in tools:
                    tag = f"{scenario}-{tool}-{r}"
                    for stale in (f"cache-{tag}", f"out-{tag}", f"cbout-{tag}"):  # cold caches, also in a kept --work
                        shutil.rmtree(work / stale, ignore_errors=True)
                    cmd = (clipbench_cmd(work, names, checkpoint, tag, args.precision) if tool == "clipbench"
                           else clip_benchmark_cmd(cb_python, work, names, checkpoint, tag, args.precision))
                    seconds = timed(cmd, work / f"{tag}.log")
                    times.setdefault((scenario, tool), []).append(seconds)
                    print(f"round {r} {scenario:6s} {tool:14s} {seconds:7.2f} s", flush=True)
                ours, _ = accuracies(work, f"{scenario}-clipbench-{r}")
                _, theirs = accuracies(work, f"{scenario}-clip_benchmark-{r}")
                if r == 0:
                    for name in names:
                        print(f"  top-1 {name}: clipbench {ours.get(name)}  clip_benchmark {theirs.get(name)}")

        print(f"\nmedians of {args.rounds} rounds (wall time per invocation; cold caches):")
        for scenario in chosen:
            cb = statistics.median(times[(scenario, "clip_benchmark")])
            ours = statistics.median(times[(scenario, "clipbench")])
            print(f"{scenario:6s} clip_benchmark {cb:7.2f} s   clipbench {ours:7.2f} s   "
                  f"ratio clip_benchmark/clipbench {cb / ours:.2f}x")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
