"""``--decode torchvision`` against ``--decode pil``: accuracy, per-image agreement, pixels, speed.

Two sets, each run through ``clipbench run`` (zero-shot) once per decode:
- the embedded default's classification sets (``clipbench-tiny`` on synthetic-shapes and
  synthetic-colors: 64x64 PNGs, so every image takes the per-image Pillow fallback and the resize
  is 64 -> 64);
- a realistic JPEG set: ``--jpegs`` scenes of the synthetic shapes world rendered as 500x375 JPEGs
  (quality 85): the 64 px scene upscaled to 375x375 (bicubic), fine texture noise added, mirrored
  to 500 px wide; the model's transform downsamples them 375 -> 64, where the kernels differ.

Printed per set: accuracy of each decode, the difference, the record's bootstrap 95 % CI
half-width, per-image top-1 agreement, mean |pixel difference| of the model inputs in 0..255
units, and both decode paths' throughput (images/s of reading + decoding + transforming, no model,
side by side in one run on the same files).

    PYTHONPATH=$PWD python benchmarks/decode_agreement.py          # CPU (about 6 min on 2 shared cores)
    PYTHONPATH=$PWD python benchmarks/decode_agreement.py --device cuda --workers 8 --batch-size 256  # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from clipbench import synthetic
from clipbench.config import RunConfig
from clipbench.data import load_split
from clipbench.decode import decoder_for
from clipbench.models import load_model
from clipbench.pipeline import run
from clipbench.sidecars import read_sample_outputs
from clipbench.specs import select

DECODES = ("pil", "torchvision")


def write_jpeg_set(root: Path, n_images: int, seed: int = 0) -> Path:
    """``n_images`` 500x375 JPEGs of synthetic-shapes scenes in ``root/test/<shape>/``, and a spec."""
    rng = np.random.default_rng(seed)
    per_class = -(-n_images // len(synthetic.SHAPES))
    for _, shape, example in synthetic.class_examples("synthetic-shapes", "test", per_class):
        folder = root / "test" / shape
        folder.mkdir(parents=True, exist_ok=True)
        big = np.asarray(example.image.resize((375, 375), Image.BICUBIC), dtype=np.float64)
        big += rng.normal(0, 12, big.shape)  # photo-like fine texture: what the antialias filters see
        wide = np.pad(big, ((0, 0), (62, 63), (0, 0)), mode="reflect")
        Image.fromarray(np.clip(wide, 0, 255).round().astype(np.uint8)).save(
            folder / f"{len(list(folder.iterdir())):04d}.jpg", quality=85)
    base = select(["synthetic-shapes"])[0]
    spec = {"name": "shapes-jpeg", "title": "synthetic shapes as 500x375 JPEGs", "tasks": ["zeroshot"],
            "primary_metric": "accuracy", "num_classes": len(synthetic.SHAPES),
            "source": {"type": "imagefolder", "path": str(root)}, "splits": {"test": "test"},
            "classnames": list(base.classnames), "templates": list(base.templates)}
    path = root / "shapes-jpeg.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def zero_shot(datasets: list[str], decode: str, work: Path, args) -> dict[str, dict]:
    config = RunConfig(datasets=datasets, tasks=["zeroshot"], output=work / f"out-{decode}",
                       cache_dir=work / "cache", data_root=work / "data", device=args.device,
                       batch_size=args.batch_size, workers=args.workers, decode=decode)
    outcome = run(config)
    assert not outcome.failures, outcome.failures
    out = {}
    for record in outcome.records:
        folder = Path(config.output) / f"{record.model}__{record.pretrained}" / record.dataset
        assert record.config["decode"] == decode
        top1 = read_sample_outputs(folder / "zeroshot.samples.npz").arrays["top_classes"][:, 0]
        out[record.dataset] = {"accuracy": record.metrics["accuracy"], "top1": top1,
                               "ci": record.confidence_intervals["accuracy"]}
    return out


def pixels_and_speed(model, samples, args) -> tuple[float, dict[str, float]]:
    """Mean |difference| of the two decodes' model inputs (0..255 units), and each one's images/s."""
    from torch.utils.data import DataLoader

    device = torch.device(model.device)
    batches: dict[str, list[torch.Tensor]] = {}
    speed = {}
    for decode in DECODES * 2:  # interleaved, the second round timed (the first warms the page cache)
        decoder = decoder_for(decode, model)
        loader = DataLoader(decoder.dataset(samples, range(len(samples)), None), batch_size=args.batch_size,
                            num_workers=args.workers, collate_fn=decoder.collate, pin_memory=device.type == "cuda")
        start = time.perf_counter()
        got = [decoder.pixels(batch, device)[0] for batch in loader]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        speed[decode] = len(samples) / (time.perf_counter() - start)
        batches[decode] = [g.cpu() for g in got]
    std = torch.tensor(decoder_for("torchvision", model).transform.std)[:, None, None]
    diffs = [((a - b) * std * 255).abs() for a, b in zip(batches["pil"], batches["torchvision"])]
    return float(torch.cat(diffs).mean()), speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jpegs", type=int, default=504, help="images of the JPEG set (84 per class)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec_file = write_jpeg_set(work / "jpegs", args.jpegs)
        sets = ["synthetic-shapes", "synthetic-colors", str(spec_file)]
        runs = {decode: zero_shot(sets, decode, work, args) for decode in DECODES}
        model = load_model("clipbench-tiny", "synthetic", device=args.device, precision="fp32")
        print(f"device {args.device}, batch {args.batch_size}, workers {args.workers}, torch {torch.__version__}")
        print(f"{'dataset':18} {'n':>5} {'acc pil':>8} {'acc tv':>8} {'diff':>8} {'CI ±':>7} {'agree':>7} "
              f"{'|px|':>7} {'pil img/s':>10} {'tv img/s':>10}")
        rows = []
        for name in runs["pil"]:
            pil, tv = runs["pil"][name], runs["torchvision"][name]
            spec = select([name])[0] if not name.startswith("shapes-jpeg") else select([str(spec_file)])[0]
            samples = load_split(spec, "test", work / "data", work / "cache", allow_download=False)
            px, speed = pixels_and_speed(model, samples, args)
            half = (pil["ci"][1] - pil["ci"][0]) / 2
            row = {"dataset": name, "n": len(pil["top1"]), "accuracy_pil": pil["accuracy"],
                   "accuracy_torchvision": tv["accuracy"], "difference": tv["accuracy"] - pil["accuracy"],
                   "ci_half_width": half, "top1_agreement": float(np.mean(pil["top1"] == tv["top1"])),
                   "mean_abs_pixel_diff": px, "images_per_s": speed}
            rows.append(row)
            print(f"{name:18} {row['n']:5d} {pil['accuracy']:8.4f} {tv['accuracy']:8.4f} {row['difference']:+8.4f} "
                  f"{half:7.4f} {row['top1_agreement']:7.4f} {px:7.4f} {speed['pil']:10.1f} {speed['torchvision']:10.1f}")
        print(json.dumps(rows, default=float))


if __name__ == "__main__":
    main()
