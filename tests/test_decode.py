"""--decode torchvision: pixels against the PIL path, the per-image fallback, cache keys, digests, refusals."""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from clipbench.config import RunConfig
from clipbench.data.base import Samples
from clipbench.data.imagefolder import load_imagefolder
from clipbench.decode import decoder_for, device_decodable, tensor_preprocess
from clipbench.errors import ClipbenchError
from clipbench.features import FeatureCache, encode_image_batches, image_cache_key

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class _Model:
    """What a decoder needs of a model: its name and eval transform (open_clip's layout, 32 px)."""

    name = "fake-32"
    device = "cpu"

    def __init__(self, preprocess=None, interpolation=T.InterpolationMode.BICUBIC):
        self.preprocess = preprocess or T.Compose([
            T.Resize(32, interpolation=interpolation), T.CenterCrop(32),
            T.ToTensor(), T.Normalize(MEAN, STD)])

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def encode_images(self, pixels):
        flat = pixels.flatten(1)[:, :8]  # the pixels themselves: rows compare decoders directly
        return flat, flat


def _photo(rng, size=(120, 90)) -> Image.Image:
    """A smooth image with some edges (a JPEG-friendly stand-in for a photo)."""
    low = rng.integers(0, 256, (size[1] // 10, size[0] // 10, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.BILINEAR)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        d = tmp_path / "test" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        image = _photo(rng, (120, 90) if i % 3 else (75, 100))
        if i == 5:
            image.save(d / f"{i}.png")  # not a JPEG: the PIL fallback
        elif i == 4:
            image.convert("L").save(d / f"{i}.jpg", quality=90)  # grayscale JPEG: decode_jpeg, as RGB
        else:
            image.save(d / f"{i}.jpg", quality=90)
    return load_imagefolder(tmp_path, "test")


def _pixels(name, model, samples):
    decoder = decoder_for(name, model)
    data = decoder.dataset(samples, range(len(samples)), None)
    return decoder.pixels(decoder.collate([data[i] for i in range(len(data))]), torch.device("cpu"))


@pytest.mark.parametrize("interpolation", [T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR])
def test_tensor_pixels_match_pil_within_one_level(folder, interpolation):
    model = _Model(interpolation=interpolation)
    pil, positions, bad = _pixels("pil", model, folder)
    tv, tv_positions, tv_bad = _pixels("torchvision", model, folder)
    assert tv.shape == pil.shape == (6, 3, 32, 32) and tv.dtype == pil.dtype == torch.float32
    assert tv_positions == positions == list(range(6)) and bad == tv_bad == {}
    # in 0..255 units: both round to uint8 after the resize; libjpeg-turbo in both decoders
    levels = ((tv - pil) * torch.tensor(STD)[:, None, None] * 255).abs()
    assert levels.max() <= 1.0 + 1e-4
    assert levels.mean() < 0.05
    # the PNG (index 5) falls back to Pillow's decode; a 32 px crop of it differs by the kernel only
    assert levels[5].max() <= 1.0 + 1e-4


def test_which_images_go_to_decode_jpeg(rng=np.random.default_rng(1)):
    image = _photo(rng)

    def encoded(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    assert device_decodable(encoded(image, "JPEG"))
    assert device_decodable(encoded(image.convert("L"), "JPEG"))
    assert not device_decodable(encoded(image, "PNG"))
    assert not device_decodable(encoded(image.convert("CMYK"), "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the format's loader decides whether to apply it, so Pillow decodes it
    assert not device_decodable(encoded(image, "JPEG", exif=exif.tobytes()))
    exif[0x0112] = 1
    assert device_decodable(encoded(image, "JPEG", exif=exif.tobytes()))


def test_formats_without_bytes_and_broken_jpegs(folder, tmp_path):
    """No ``load_bytes``: every image through the format's loader; a damaged JPEG is a bad image."""
    model = _Model()
    no_bytes = Samples(folder.load_image, len(folder), targets=folder.targets, ids=folder.ids)
    pil, _, _ = _pixels("pil", model, folder)
    tv, _, _ = _pixels("torchvision", model, no_bytes)
    assert ((tv - pil) * torch.tensor(STD)[:, None, None] * 255).abs().max() <= 1.0 + 1e-4

    good = folder.load_bytes(0)
    blobs = [good, good[: len(good) // 3], good]
    broken = Samples(lambda i: Image.open(io.BytesIO(blobs[i])).convert("RGB"), 3, targets=np.zeros(3, np.int64),
                     load_bytes=blobs.__getitem__)
    encoded = encode_image_batches(model, broken, batch_size=3, workers=0, decode="torchvision")
    assert sorted(encoded.bad) == [1] and len(encoded.projected) == 2
    np.testing.assert_array_equal(encoded.projected[0], encoded.projected[1])


def test_subset_keeps_the_bytes(folder):
    sub = folder.subset(np.array([3, 0]))
    assert sub.load_bytes(0) == folder.load_bytes(3) and sub.load_bytes(1)[:3] == b"\xff\xd8\xff"


def test_cache_key_and_settings_digest_change_only_off_the_default(folder, tmp_path):
    from clipbench import specs
    from clipbench.pipeline import Evaluator
    from clipbench.tasks import get_task

    spec = specs.select(["synthetic-shapes"])[0]
    model = _Model()
    model.identity = lambda: {"model": "fake-32"}
    default = image_cache_key(model, spec, "test", folder)
    assert image_cache_key(model, spec, "test", folder, decode="pil") == default
    assert "decode" not in default
    other = image_cache_key(model, spec, "test", folder, decode="torchvision")
    assert other == {**default, "decode": "torchvision"}
    assert FeatureCache.digest(other) != FeatureCache.digest(default)

    tiny = types.SimpleNamespace(name="fake-32", pretrained="none", precision="fp32", weights_digest="0" * 16,
                                 identity=model.identity, device="cpu")
    task = get_task("zeroshot")
    base = dict(output=tmp_path / "out", cache_dir=tmp_path / "cache", data_root=tmp_path / "data")
    at_default = Evaluator(tiny, RunConfig(**base)).record_settings(spec, task)
    explicit = Evaluator(tiny, RunConfig(**base, decode="pil")).record_settings(spec, task)
    off = Evaluator(tiny, RunConfig(**base, decode="torchvision")).record_settings(spec, task)
    assert explicit == at_default and "decode" not in at_default
    assert off["decode"] == "torchvision" and off["settings_digest"] != at_default["settings_digest"]
    assert {k: v for k, v in off.items() if k not in ("decode", "settings_digest")} == \
        {k: v for k, v in at_default.items() if k != "settings_digest"}


def test_unsupported_preprocessing_and_unknown_names_are_refused():
    odd = _Model(T.Compose([T.RandomResizedCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)]))
    with pytest.raises(ClipbenchError, match=r"fake-32.*--decode pil"):
        decoder_for("torchvision", odd)
    with pytest.raises(ClipbenchError, match="--decode pil"):
        tensor_preprocess(lambda image: image, "hf:some/model")
    nearest = _Model(interpolation=T.InterpolationMode.NEAREST)
    with pytest.raises(ClipbenchError, match="bicubic or bilinear"):
        decoder_for("torchvision", nearest)
    with pytest.raises(ClipbenchError, match="did you mean torchvision"):
        decoder_for("torchvison", _Model())
    with pytest.raises(ClipbenchError, match="--decode 'gpu' is invalid"):
        RunConfig(decode="gpu").validate()


def test_cli_flag_reaches_the_config():
    from clipbench.cli import _build_parser as build_parser
    from clipbench.cli import config_from_args

    args = build_parser().parse_args(["run", "--decode", "torchvision"])
    assert config_from_args(args).decode == "torchvision"
    assert config_from_args(build_parser().parse_args(["run"])).decode == RunConfig.default("decode") == "pil"


def _jpeg_spec(tmp_path, n_per_class=1):
    import yaml

    from clipbench import synthetic

    root = tmp_path / "jpegs"
    for index, shape, example in synthetic.class_examples("synthetic-shapes", "test", n_per_class):
        (root / "test" / shape).mkdir(parents=True, exist_ok=True)
        example.image.resize((96, 72), Image.BICUBIC).save(root / "test" / shape / f"{index}.jpg", quality=90)
    base = specs_select("synthetic-shapes")
    path = tmp_path / "shapes-jpeg.yaml"
    path.write_text(yaml.safe_dump({
        "name": "shapes-jpeg", "title": "t", "tasks": ["zeroshot"], "primary_metric": "accuracy",
        "num_classes": 6, "source": {"type": "imagefolder", "path": str(root)}, "splits": {"test": "test"},
        "classnames": list(base.classnames), "templates": list(base.templates)}))
    return path


def specs_select(name):
    from clipbench import specs

    return specs.select([name])[0]


def test_a_run_records_its_decode_and_refuses_models_it_cannot_serve(tmp_path, monkeypatch):
    from clipbench import models
    from clipbench.pipeline import run

    spec = _jpeg_spec(tmp_path)
    base = dict(datasets=[str(spec)], tasks=["zeroshot"], cache_dir=tmp_path / "cache", data_root=tmp_path / "data",
                workers=0, n_bootstrap=10, device="cpu")
    outcome = run(RunConfig(**base, output=tmp_path / "tv", decode="torchvision"))
    assert not outcome.failures
    (record,) = outcome.records
    assert record.config["decode"] == "torchvision" and record.n_samples == 6

    real = models.load_model

    def odd_preprocess(*args, **kwargs):
        model = real(*args, **kwargs)
        model.preprocess = T.Compose([T.RandomResizedCrop(64), T.ToTensor(), T.Normalize(MEAN, STD)])
        return model

    monkeypatch.setattr(models, "load_model", odd_preprocess)
    refused = run(RunConfig(**base, output=tmp_path / "odd", decode="torchvision"))
    assert not refused.records and [(f.dataset, f.task) for f in refused.failures] == [("*", "load")]
    assert "clipbench-tiny" in refused.failures[0].message and "--decode pil" in refused.failures[0].message


def test_webdataset_members_are_served_as_bytes(tmp_path):
    import tarfile

    from clipbench.data.webdataset import load_webdataset

    rng = np.random.default_rng(2)
    (tmp_path / "test").mkdir()
    blobs = []
    with tarfile.open(tmp_path / "test" / "0.tar", "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            _photo(rng).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
            for name, data in ((f"{i:03d}.jpg", blobs[-1]), (f"{i:03d}.cls", b"%d" % (i % 2))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = load_webdataset(tmp_path, "test", num_classes=2, multilabel=False, label_column="cls",
                              caption_column=None)
    assert [samples.load_bytes(i) for i in range(3)] == blobs
    model = _Model()
    pil, _, _ = _pixels("pil", model, samples)
    tv, _, _ = _pixels("torchvision", model, samples)
    assert ((tv - pil) * torch.tensor(STD)[:, None, None] * 255).abs().max() <= 1.0 + 1e-4
