"""Bad samples: an unreadable image fails its split with one clear message (the rest of the run goes
on), or, with ``--on-bad-image skip``, is left out and listed in the records; image modes are
converted to 8-bit RGB by scaling; empty class folders, class-count mismatches and empty captions
are refused.

Runs use the embedded ``clipbench-tiny`` model (64-pixel input) on the 32-pixel images of
``conftest.write_imagefolder``, zero-shot only unless a test needs more.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipbench.cli import main
from clipbench.data import load_split
from clipbench.data.base import FileImageLoader, to_rgb
from clipbench.errors import ClipbenchError
from clipbench.specs import parse_spec

from conftest import COLOURS_SPEC, make_image, write_imagefolder

MODEL_DIR = "clipbench-tiny__synthetic"
FOLDERS = ("a_red", "b_green", "c_blue")


# ------------------------------------------------------------------------------- bad files


def write_truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    make_image(1, 7).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def write_zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def write_text(path: Path) -> None:
    path.write_text("this is not an image\n")


def write_bomb(path: Path) -> None:
    # 64 x 64 = 4096 pixels: over twice the --max-image-pixels 1500 of these runs (3000), which the
    # fixture's 32 x 32 images (1024) are not
    make_image(1, 9, size=64).save(path)


BAD_KINDS = {
    "truncated-jpeg": (write_truncated_jpeg, "bad.jpg", "Truncated File Read"),
    "zero-bytes": (write_zero_bytes, "bad.jpg", "cannot identify image file"),
    "text-named-jpg": (write_text, "bad.jpg", "cannot identify image file"),
    "decompression-bomb": (write_bomb, "bad.png", "the limit is twice --max-image-pixels, now 1500"),
}
PIXEL_FLAGS = ("--max-image-pixels", "1500")


def colours_spec(tmp_path: Path, root: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(COLOURS_SPEC.format(root=root).replace("name: colours", f"name: {name}"))
    return path


def table_spec(tmp_path: Path, root: Path, name: str, fmt: str) -> Path:
    """A classification table over the image folder's test images (paths relative to ``root``)."""
    rows = [(f"test/{folder}/{i:03d}.png", label) for label, folder in enumerate(FOLDERS) for i in range(3)]
    table = root / f"test.{fmt}"
    if fmt == "csv":
        table.write_text("image,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    else:
        table.write_text("".join(json.dumps({"image": p, "label": y}) + "\n" for p, y in rows))
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({
        "name": name, "title": name, "tasks": ["zeroshot"], "primary_metric": "accuracy", "num_classes": 3,
        "source": {"type": "table", "path": str(root)}, "splits": {"test": table.name},
        "classnames": ["red", "green", "blue"], "templates": ["a photo of a {c}."],
    }))
    return path


def add_table_row(root: Path, fmt: str, image: str, label: int) -> None:
    table = root / f"test.{fmt}"
    line = f"{image},{label}\n" if fmt == "csv" else json.dumps({"image": image, "label": label}) + "\n"
    table.write_text(table.read_text() + line)


def run_args(tmp_path: Path, *specs: Path, policy: str = "fail", tasks: str = "zeroshot", cache: str = "c",
             out: str = "out") -> list[str]:
    return ["run", "--datasets", *map(str, specs), "--tasks", tasks, "--output", str(tmp_path / out),
            "--cache-dir", str(tmp_path / cache), "--workers", "0", "--bootstrap", "0", "--device", "cpu",
            "--on-bad-image", policy, *PIXEL_FLAGS]


def record(tmp_path: Path, dataset: str, task: str = "zeroshot", out: str = "out") -> dict:
    return json.loads((tmp_path / out / MODEL_DIR / dataset / f"{task}.json").read_text())


@pytest.fixture
def good_spec(tmp_path) -> Path:
    """A second, clean dataset of the same run: it must get its record whatever the first does."""
    return colours_spec(tmp_path, write_imagefolder(tmp_path / "good"), "good")


@pytest.mark.parametrize("layout", ["imagefolder", pytest.param("csv", marks=pytest.mark.slow),
                                    pytest.param("jsonl", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", [*BAD_KINDS, "missing-file"])
def test_a_bad_image_fails_its_split_clearly_and_the_other_dataset_gets_its_record(
        capsys, tmp_path, good_spec, layout, kind):
    if kind == "missing-file" and layout == "imagefolder":
        pytest.skip("a folder lists only the files it has")
    root = write_imagefolder(tmp_path / "bad")
    if kind == "missing-file":
        bad_id = "test/b_green/gone.png"
    else:
        write, name, _ = BAD_KINDS[kind]
        bad_id = f"test/b_green/{name}"
        write(root / bad_id)
    if layout == "imagefolder":
        spec = colours_spec(tmp_path, root, "bad")
    else:
        spec = table_spec(tmp_path, root, "bad", layout)
        add_table_row(root, layout, bad_id, 1)
    code = main(run_args(tmp_path, spec, good_spec))
    err = capsys.readouterr().err
    reason = "No such file" if kind == "missing-file" else BAD_KINDS[kind][2]
    assert code == 2 and "Traceback" not in err
    assert "bad/zeroshot: bad/test: 1 of 10 images cannot be read" in err
    assert bad_id in err and reason in err and "--on-bad-image skip" in err
    assert record(tmp_path, "good")["n_samples"] == 9
    assert not (tmp_path / "out" / MODEL_DIR / "bad").exists()


@pytest.mark.slow
def test_the_command_line_names_the_files_and_how_many_without_a_traceback(tmp_path, good_spec):
    root = write_imagefolder(tmp_path / "bad")
    names = [f"test/{folder}/bad{i}.jpg" for i, folder in enumerate(FOLDERS * 4)]  # 12 bad images
    for name in names:
        write_zero_bytes(root / name)
    spec = colours_spec(tmp_path, root, "bad")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "clipbench", *run_args(tmp_path, spec, good_spec)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "1 failure(s):" in proc.stderr and "- bad/zeroshot:" in proc.stderr
    assert "12 of 21 images cannot be read" in proc.stderr and "and 2 more" in proc.stderr
    shown = [n for n in names if n in proc.stderr]
    assert len(shown) == 10  # the first ten, in split order
    assert record(tmp_path, "good")["n_samples"] == 9


# ------------------------------------------------------------------------------- skip


def _spoil(root: Path) -> list[str]:
    """A bad image in a test class and one in a train class; returns their ids."""
    bad = ["test/b_green/bad.jpg", "train/a_red/empty.png"]
    write_truncated_jpeg(root / bad[0])
    write_zero_bytes(root / bad[1])
    return bad


@pytest.mark.slow
def test_skip_scores_the_readable_subset_exactly_and_lists_what_it_left_out(tmp_path, caplog):
    root = write_imagefolder(tmp_path / "data")
    bad = _spoil(root)
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    for name in bad:
        (clean / name).unlink()
    tasks = "zeroshot,linear_probe"
    # one batch per split on both sides: the readable images go through the model together
    args = ["--batch-size", "64"]
    assert main([*run_args(tmp_path, colours_spec(tmp_path, root, "colours"), policy="skip", tasks=tasks),
                 *args]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipped" in r.getMessage()]
    assert len(warnings) == 2  # one line per split
    assert any("colours/test: skipped 1 of 10 images" in w and bad[0] in w for w in warnings)
    (tmp_path / "clean-spec").mkdir()
    clean_spec = colours_spec(tmp_path / "clean-spec", clean, "colours")  # same name: same record path
    assert main([*run_args(tmp_path, clean_spec, tasks=tasks, cache="c2", out="out2"), *args]) == 0
    for task, expected_skipped in (("zeroshot", [bad[0]]), ("linear_probe", bad)):
        skipped, direct = record(tmp_path, "colours", task), record(tmp_path, "colours", task, out="out2")
        assert sorted(skipped["skipped"]) == sorted(expected_skipped) and direct["skipped"] == []
        assert skipped["n_samples"] == direct["n_samples"] == 9
        assert skipped["metrics"] == direct["metrics"]
        assert skipped["config"]["on_bad_image"] == "skip" and "on_bad_image" not in direct["config"]
        assert skipped["config"]["settings_digest"] != direct["config"]["settings_digest"]


@pytest.mark.slow
def test_a_skip_rerun_from_the_cache_is_the_same_and_a_fail_rerun_fails(tmp_path, capsys):
    root = write_imagefolder(tmp_path / "data")
    bad = _spoil(root)[0]
    spec = colours_spec(tmp_path, root, "colours")
    assert main(run_args(tmp_path, spec, policy="skip")) == 0
    first = record(tmp_path, "colours")
    entries = list((tmp_path / "c" / "features" / "image").rglob("*.npz"))
    assert len(entries) == 1
    with np.load(entries[0]) as entry:
        assert entry["kept"].tolist() == [i for i in range(10) if i != 6]  # b_green: 3 images, then bad.jpg
        assert "Truncated File Read" in str(entry["bad_reasons"][0])
    stamp = entries[0].stat().st_mtime_ns
    assert main([*run_args(tmp_path, spec, policy="skip"), "--force"]) == 0
    again = record(tmp_path, "colours")
    assert entries[0].stat().st_mtime_ns == stamp  # a cache hit, not a second encoding
    assert again["metrics"] == first["metrics"] and again["skipped"] == first["skipped"] == [bad]
    capsys.readouterr()
    assert main(run_args(tmp_path, spec, policy="fail")) == 2
    err = capsys.readouterr().err
    assert bad in err and "Truncated File Read" in err and "1 of 10 images cannot be read" in err
    assert entries[0].stat().st_mtime_ns == stamp


def test_a_record_without_the_skipped_field_reads_as_nothing_skipped(tmp_path):
    from clipbench import results

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model": "m", "pretrained": "p", "dataset": "d", "task": "zeroshot",
                                "split": "test", "metrics": {"accuracy": 0.5}, "primary_metric": "accuracy",
                                "n_samples": 4, "schema_version": 2}))
    assert results.read_record(path).skipped == []


def test_the_report_marks_numbers_computed_with_skipped_images():
    from clipbench.render import render_tables
    from clipbench.report import report_tables, summary_table
    from clipbench.results import records_frame

    base = {"model": "m", "pretrained": "p", "task": "zeroshot", "split": "test", "primary_metric": "accuracy"}
    records = [{**base, "dataset": "colours", "metrics": {"accuracy": 0.5}, "n_samples": 8,
                "skipped": ["a.jpg", "b.jpg"]},
               {**base, "dataset": "other", "metrics": {"accuracy": 0.25}, "n_samples": 4}]
    text = render_tables(report_tables(records_frame(records)))
    assert "50.0 †" in text and "25.0 †" not in text and "25.0" in text
    assert "†: n images skipped as unreadable" in text and "colours, m (p) 2" in text
    summary = summary_table(records)
    assert "50.0 †" in summary and "colours/zeroshot 2" in summary
    import io

    import pandas as pd

    tidy = pd.read_csv(io.StringIO(render_tables(report_tables(records_frame(records)), "csv")))
    ours = tidy[(tidy["table"] == "Zero-shot") & (tidy["row"] == "ours")].set_index("column")
    assert bool(ours.loc["colours", "skipped"]) and not bool(ours.loc["other", "skipped"])


# ------------------------------------------------------------------------------- image modes


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 128, 257, 514, 32896, 65535]], dtype=np.uint16)
    expected = [0, 0, 1, 2, 128, 255]  # round(v / 257)
    for array in (values, values.astype(">u2")):  # I;16 and I;16B
        path = tmp_path / "gray16.png"
        Image.fromarray(array).save(path)
        with Image.open(path) as opened:
            assert opened.mode.startswith("I")
            clipped = np.asarray(opened.convert("RGB"))[0, :, 0]
        assert (clipped == 255).sum() == 4  # what Image.convert alone gives
        rgb = np.asarray(FileImageLoader([path])(0))
        assert rgb.shape == (1, 6, 3) and rgb.dtype == np.uint8
        assert rgb[0, :, 0].tolist() == rgb[0, :, 1].tolist() == rgb[0, :, 2].tolist() == expected


def test_a_16_bit_gradient_keeps_its_range():
    gradient = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(1, 256)  # 0 .. 65535
    rgb = np.asarray(to_rgb(Image.fromarray(gradient)))
    assert rgb[0, :, 0].tolist() == list(range(256))


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),     # [0, 1]: scaled by 255
    ([0.0, 2.0, 100.4, 300.0], [0, 2, 100, 255]),   # otherwise [0, 255], clipped
])
def test_float_images_are_read_as_unit_or_byte_range(values, expected):
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert image.mode == "F"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == expected


def test_alpha_is_dropped_and_cmyk_and_palette_are_converted():
    rgba = Image.new("RGBA", (1, 1), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[10, 20, 30]]]
    assert np.asarray(to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))).tolist() == [[[255, 0, 0]]]
    palette = Image.new("P", (1, 1), 1)
    palette.putpalette([0, 0, 0, 30, 200, 30])
    assert np.asarray(to_rgb(palette)).tolist() == [[[30, 200, 30]]]


# ------------------------------------------------------------------------------- folders and captions


def _spec(source: dict, splits: dict, **extra):
    raw = {"name": "fx", "title": "fx", "tasks": ["zeroshot"], "primary_metric": "accuracy",
           "num_classes": 3, "classnames": ["red", "green", "blue"], "templates": ["a {c} image."],
           "source": source, "splits": splits, **extra}
    return parse_spec(raw, Path("fx.yaml"))


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    root = write_imagefolder(tmp_path / "f")
    for image in (root / "test" / "b_green").iterdir():
        image.unlink()
    spec = _spec({"type": "imagefolder", "path": str(root), "class_folders": list(FOLDERS)}, {"test": "test"})
    with pytest.raises(ClipbenchError, match="class folders without images") as info:
        load_split(spec, "test", tmp_path, tmp_path)
    assert "'b_green'" in str(info.value) and "drop out of the metrics" in str(info.value)


def test_a_missing_declared_class_folder_is_refused(tmp_path):
    root = write_imagefolder(tmp_path / "f")
    shutil.rmtree(root / "test" / "c_blue")
    spec = _spec({"type": "imagefolder", "path": str(root), "class_folders": list(FOLDERS)}, {"test": "test"})
    with pytest.raises(ClipbenchError, match="missing class folders 'c_blue'"):
        load_split(spec, "test", tmp_path, tmp_path)


def test_more_classes_declared_than_folders_is_refused(tmp_path):
    root = write_imagefolder(tmp_path / "f")
    spec = _spec({"type": "imagefolder", "path": str(root)}, {"train": "train", "test": "test"}, num_classes=4,
                 classnames=None, templates=None, tasks=["linear_probe"])
    with pytest.raises(ClipbenchError, match="declares 4 classes but .* has 3 class folders"):
        load_split(spec, "test", tmp_path, tmp_path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_empty_caption_is_refused_with_the_image_named(tmp_path, fmt):
    root = tmp_path / "t"
    root.mkdir()
    for i in range(3):
        make_image(i, i).save(root / f"{i}.png")
    rows = [("0.png", "a red square"), ("1.png", ""), ("2.png", "   ")]
    table = root / f"test.{fmt}"
    if fmt == "csv":
        table.write_text("image,captions\n" + "".join(f"{p},{c}\n" for p, c in rows))
    else:
        table.write_text("".join(json.dumps({"image": p, "captions": [c]}) + "\n" for p, c in rows))
    spec = parse_spec({"name": "fx", "title": "fx", "tasks": ["retrieval"], "primary_metric": "text_to_image_R@1",
                       "source": {"type": "table", "path": str(root)}, "splits": {"test": table.name}},
                      Path("fx.yaml"))
    with pytest.raises(ClipbenchError, match="2 image\\(s\\) have an empty caption or none") as info:
        load_split(spec, "test", tmp_path, tmp_path)
    assert "1.png, 2.png" in str(info.value) and "0.png" not in str(info.value)


@pytest.mark.parametrize("flags, message", [
    (["--on-bad-image", "ignore"], "invalid choice: 'ignore'"),
    (["--max-image-pixels", "-1"], "--max-image-pixels -1 is invalid"),
])
def test_bad_values_of_the_new_flags_are_refused(capsys, tmp_path, flags, message):
    try:
        code = main(["run", *flags, "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    except SystemExit as exc:  # argparse's choices
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------- distributed


def _pixels(image: Image.Image):
    import torch

    return torch.from_numpy(np.asarray(image.resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)


class _PixelStatsModel:
    """An image "model" whose features are per-channel means and maxima of the pixels: enough to
    tell which image a row came from, and cheap enough for two spawned ranks."""

    device = "cpu"
    preprocess = staticmethod(_pixels)

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def encode_images(self, pixels):
        return pixels.mean((2, 3)), pixels.amax((2, 3))


def _shard_worker(rank: int, init_file: str, root: str, out_dir: str) -> None:
    import torch.distributed as dist

    import clipbench.distributed as cd
    from clipbench.data.imagefolder import load_imagefolder

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = cd.DistContext(rank=rank, world_size=2, _control=dist.new_group(backend="gloo"))
    samples = load_imagefolder(Path(root), "test", FOLDERS)
    request = {"spec": type("Spec", (), {"name": "toy"})(), "role": "test", "n": len(samples), "batch_size": 2,
               "workers": 0, "max_image_pixels": None}
    encoded = ctx._encode_shard(_PixelStatsModel(), samples, request)
    if rank:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=ctx._control)
    ctx.close()
    if rank == 0:
        np.savez(Path(out_dir) / "rank0.npz", projected=encoded.projected, pre=encoded.pre_projection,
                 bad=np.array(list(encoded.bad), dtype=np.int64), reasons=np.array(list(encoded.bad.values())))


@pytest.mark.slow
def test_two_ranks_report_the_bad_images_of_every_shard_as_one_process_does(tmp_path):
    import torch.multiprocessing as mp

    from clipbench.data.imagefolder import load_imagefolder
    from clipbench.features import encode_image_batches

    root = write_imagefolder(tmp_path / "f")
    write_zero_bytes(root / "test" / "a_red" / "bad.jpg")   # index 3: rank 0's shard (batches 0-2)
    write_text(root / "test" / "c_blue" / "bad.jpg")        # index 10: rank 1's shard (batches 3-5)
    mp.spawn(_shard_worker, args=(str(tmp_path / "init"), str(root), str(tmp_path)), nprocs=2, join=True)
    single = encode_image_batches(_PixelStatsModel(), load_imagefolder(root, "test", FOLDERS), batch_size=2,
                                  workers=0)
    assert list(single.bad) == [3, 10] and len(single.projected) == 9
    with np.load(tmp_path / "rank0.npz") as dist_result:
        assert dist_result["bad"].tolist() == [3, 10]
        assert [str(r) for r in dist_result["reasons"]] == list(single.bad.values())
        assert np.array_equal(dist_result["projected"], single.projected)
        assert np.array_equal(dist_result["pre"], single.pre_projection)


def test_the_pixel_limit_applies_in_dataloader_workers_and_leaves_the_parent_alone(tmp_path):
    from clipbench.data.imagefolder import load_imagefolder
    from clipbench.features import encode_image_batches

    root = write_imagefolder(tmp_path / "f")
    write_bomb(root / "test" / "b_green" / "bad.png")
    before = Image.MAX_IMAGE_PIXELS
    samples = load_imagefolder(root, "test", FOLDERS)
    encoded = encode_image_batches(_PixelStatsModel(), samples, batch_size=4, workers=1, max_image_pixels=1500)
    assert list(encoded.bad) == [6] and "now 1500" in encoded.bad[6] and len(encoded.projected) == 9
    assert Image.MAX_IMAGE_PIXELS == before
    assert encode_image_batches(_PixelStatsModel(), samples, batch_size=4, workers=1).bad == {}  # Pillow's limit


def _collate_in_shared_memory(batch):
    """The encoders' collate, and whether its pixels came out in shared memory (asked in the worker)."""
    from clipbench.features import _collate

    pixels, positions, bad = _collate(batch)
    return pixels.is_shared(), pixels, positions, bad


def test_workers_collate_batches_into_shared_memory_with_the_rows_of_the_main_process(tmp_path):
    from torch.utils.data import DataLoader

    from clipbench.data.imagefolder import load_imagefolder
    from clipbench.features import _PreprocessedImages, encode_image_batches

    root = write_imagefolder(tmp_path / "f")
    write_text(root / "test" / "b_green" / "bad.jpg")
    samples = load_imagefolder(root, "test", FOLDERS)
    # in a worker the batch is stacked into shared memory, so the queue passes it without a copy
    loader = DataLoader(_PreprocessedImages(samples, _pixels, range(len(samples))), batch_size=4, num_workers=1,
                        collate_fn=_collate_in_shared_memory)
    assert [shared for shared, *_ in loader] == [True, True, True]
    in_main = encode_image_batches(_PixelStatsModel(), samples, batch_size=4, workers=0)
    in_worker = encode_image_batches(_PixelStatsModel(), samples, batch_size=4, workers=1)
    assert list(in_worker.bad) == list(in_main.bad) == [6] and len(in_worker.projected) == 9
    assert np.array_equal(in_worker.projected, in_main.projected)
    assert np.array_equal(in_worker.pre_projection, in_main.pre_projection)
