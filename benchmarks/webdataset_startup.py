"""Webdataset start-up: time from calling the adapter to the first decoded image.

Lays out ``--datasets`` clip_benchmark-style webdataset folders (``<root>/test/*.tar`` of JPEG +
``.cls`` members, ``--images`` images in all, ``--shard-size`` per shard), then times, each in a fresh
Python process (clipbench imported before the clock starts, so the adapter's own lazy imports count):

* ``hf builder``: the previous adapter, ``datasets.load_dataset("webdataset", ...)`` with a cold
  (empty) Hugging Face cache dir, which copies every shard into Arrow files before the first image;
* ``tar index, cold``: ``clipbench.data.webdataset.load_webdataset`` with an empty index dir (scans
  every shard's headers with ``tarfile`` and writes the index);
* ``tar index, warm``: the same with the index cached by the previous run.

It also times indexing ``--index-shards`` x ``--index-per-shard`` small images without and with the
cached index, the case the cache exists for. Figures are medians of ``--rounds`` rounds, interleaved.

    python benchmarks/webdataset_startup.py                      # ~1 min on 2 shared cores
    python benchmarks/webdataset_startup.py --images 1040 --datasets 3 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_TIMED = """
import sys, time
from pathlib import Path
from clipbench.data.huggingface import samples_from_dataset
from clipbench.data.webdataset import load_webdataset, shard_files
mode, scratch, roots = sys.argv[1], Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
start = time.perf_counter()
for root in roots:
    if mode == "hf":  # the adapter before the tar index, but for its cache dir
        import datasets
        shards = shard_files(root, "test")
        dataset = datasets.load_dataset("webdataset", data_files={"test": [str(s) for s in shards]},
                                        split="test", cache_dir=str(scratch / "hf"))
        samples = samples_from_dataset(dataset, image_column="jpg", label_column="cls", caption_column=None,
                                       num_classes=10, multilabel=False, description="")
    else:
        samples = load_webdataset(root, "test", num_classes=10, multilabel=False, label_column="cls",
                                  caption_column=None, index_dir=scratch / "index")
    if root == roots[0]:
        samples.load_image(0)
        first = time.perf_counter() - start
print(f"{first:.4f} {time.perf_counter() - start:.4f}")
"""


def write_shards(root: Path, n: int, shard_size: int, image_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"class {c}\n" for c in range(10)))
    for shard, start in enumerate(range(0, n, shard_size)):
        with tarfile.open(root / "test" / f"{shard:06d}.tar", "w") as tar:
            for i in range(start, min(n, start + shard_size)):
                pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
                for name, payload in ((f"s{i:07d}.jpg", buf.getvalue()), (f"s{i:07d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def timed(mode: str, scratch: Path, roots: list[Path]) -> tuple[float, float]:
    """(seconds to the first decoded image, seconds to list every dataset) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _TIMED, mode, str(scratch), *map(str, roots)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1040, help="images over all datasets")
    parser.add_argument("--datasets", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--index-shards", type=int, default=20)
    parser.add_argument("--index-per-shard", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wds-startup-"))
    try:
        per = [args.images // args.datasets + (d < args.images % args.datasets) for d in range(args.datasets)]
        roots = [work / f"wds_{d}" for d in range(args.datasets)]
        for d, (root, n) in enumerate(zip(roots, per)):
            write_shards(root, n, args.shard_size, args.image_size, seed=d)
        big = work / "wds_index"
        write_shards(big, args.index_shards * args.index_per_shard, args.index_per_shard, 16, seed=99)

        figures: dict[str, list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            for mode, label in (("hf", "hf builder, cold cache"), ("tar", "tar index, cold")):
                scratch = work / f"scratch-{mode}-{r}"
                figures.setdefault(label, []).append(timed(mode, scratch, roots))
                if mode == "tar":
                    figures.setdefault("tar index, warm", []).append(timed(mode, scratch, roots))
            scratch = work / f"scratch-big-{r}"
            figures.setdefault("big: scan", []).append(timed("tar", scratch, [big]))
            figures.setdefault("big: cached index", []).append(timed("tar", scratch, [big]))
            for path in work.glob("scratch-*"):
                shutil.rmtree(path)

        def median(label: str, which: int) -> float:
            return statistics.median(f[which] for f in figures[label])

        print(f"{args.datasets} datasets, {args.images} images of {args.image_size}px, {args.shard_size} per shard; "
              f"median of {args.rounds} rounds")
        print(f"{'':26s} {'first image (s)':>16s} {'all listed (s)':>15s}")
        for label in ("hf builder, cold cache", "tar index, cold", "tar index, warm"):
            print(f"{label:26s} {median(label, 0):16.3f} {median(label, 1):15.3f}")
        old = median("hf builder, cold cache", 0)
        print(f"start-up ratio hf / tar (cold): {old / median('tar index, cold', 0):.1f}x, "
              f"hf / tar (warm): {old / median('tar index, warm', 0):.1f}x")
        scan, cached = median("big: scan", 1), median("big: cached index", 1)
        print(f"index of {args.index_shards} shards x {args.index_per_shard} images: scan {scan:.3f} s, "
              f"cached {cached:.3f} s ({scan / cached:.1f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
