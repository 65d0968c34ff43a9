"""How a split's images become model input: the ``--decode`` choices, one :class:`Decoder` each.

- ``pil`` (the default): DataLoader workers decode with Pillow and apply the model's own eval
  transform (``model.preprocess``), as the CLIP, open_clip and clip_benchmark pipelines do.
- ``torchvision``: workers only read each image's stored bytes (``Samples.load_bytes``); JPEGs are
  decoded by ``torchvision.io.decode_jpeg`` on the model's device (one batched call: nvJPEG on
  CUDA, libjpeg-turbo on CPU) and resized (antialiased), center-cropped and normalized there with
  torch, using the parameters of the model's torchvision ``Compose``
  (:func:`tensor_preprocess`). An image that is not a baseline RGB or grayscale JPEG (PNG, WebP,
  CMYK, an EXIF orientation to apply), or of a format without stored bytes, is decoded by the
  format's own Pillow loader in the worker (so exactly as under ``pil``) and then resized on the
  device like the others. The pixels differ slightly from ``pil`` (another JPEG decoder's IDCT and
  chroma upsampling, torch's resize kernels instead of Pillow's), so the choice is part of the
  feature-cache key and of a record's settings digest (``benchmarks/decode_agreement.py`` measures
  the effect on accuracy).

A new decoder is a :class:`Decoder` class plus one :func:`register_decoder` call.
"""

from __future__ import annotations

import difflib
import io
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image
from torch.utils.data import Dataset

from clipbench.errors import ClipbenchError
from clipbench.features import _collate, _PreprocessedImages, _reason, pixel_limit

#: one batch as :meth:`Decoder.pixels` returns it: (pixels of the readable images in batch order
#: or None, their positions, position -> why unreadable)
Pixels = tuple["torch.Tensor | None", list[int], dict[int, str]]


class Decoder(Protocol):
    """Turns samples into batches of model input: ``dataset`` and ``collate`` run in DataLoader
    workers, ``pixels`` in the main process, on the model's device."""

    name: str

    def dataset(self, samples: Any, indices: Sequence[int], max_image_pixels: int | None) -> Dataset: ...

    def collate(self, batch: list[Any]) -> Any: ...

    def pixels(self, batch: Any, device: torch.device) -> Pixels: ...


_DECODERS: dict[str, Callable[[Any], Decoder]] = {}


def register_decoder(name: str, factory: Callable[[Any], Decoder]) -> None:
    """Make ``--decode name`` build ``factory(model)``; the factory raises ClipbenchError for a
    model it cannot serve."""
    _DECODERS[name] = factory


def decoder_names() -> list[str]:
    return sorted(_DECODERS)


def decoder_for(name: str, model: Any) -> Decoder:
    """The decoder ``--decode name`` gives ``model``.

    Raises:
        ClipbenchError: an unknown name (listing the close ones), or a model whose preprocessing
            the decoder cannot reproduce.
    """
    if name not in _DECODERS:
        close = difflib.get_close_matches(name, decoder_names(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ClipbenchError(f"--decode {name!r} is unknown{hint}; choose from {', '.join(decoder_names())}.")
    return _DECODERS[name](model)


# -- pil ---------------------------------------------------------------------------------------
@dataclass
class PilDecoder:
    """Pillow in the workers, then ``model.preprocess`` there too (what clipbench always did)."""

    preprocess: Any
    name: str = "pil"

    def dataset(self, samples: Any, indices: Sequence[int], max_image_pixels: int | None) -> Dataset:
        return _PreprocessedImages(samples, self.preprocess, indices, max_image_pixels)

    def collate(self, batch: list[Any]) -> Any:
        return _collate(batch)

    def pixels(self, batch: Any, device: torch.device) -> Pixels:
        pixels, positions, bad = batch
        return (None if pixels is None else pixels.to(device, non_blocking=True)), positions, bad


register_decoder("pil", lambda model: PilDecoder(model.preprocess))


# -- torchvision -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorPreprocess:
    """A model's eval transform as tensor operations: ``Resize(resize_size, interpolation,
    max_size)`` (antialiased, on uint8 like Pillow's), ``CenterCrop(crop_size)`` (None: none),
    scaling to [0, 1] and ``Normalize(mean, std)``."""

    resize_size: Any
    interpolation: Any
    max_size: int | None
    crop_size: tuple[int, ...] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 on any device -> (3, h, w) float32 normalized, on that device."""
        from torchvision.transforms.v2 import functional as F

        image = F.resize(image, self.resize_size, interpolation=self.interpolation, max_size=self.max_size,
                         antialias=True)
        if self.crop_size is not None:
            image = F.center_crop(image, list(self.crop_size))
        return F.normalize(image.float().div_(255), list(self.mean), list(self.std))


def tensor_preprocess(preprocess: Any, model_name: str) -> TensorPreprocess:
    """The :class:`TensorPreprocess` of a torchvision ``Compose`` of ``Resize`` (bicubic or
    bilinear), optionally ``CenterCrop``, an RGB conversion, ``ToTensor`` and ``Normalize``, in
    that order (open_clip's, timm's and torchvision's eval transforms of CLIP-style models).

    Raises:
        ClipbenchError: any other preprocessing, naming the model and the way out (``--decode pil``).
    """
    from torchvision import transforms as T

    steps = list(preprocess.transforms) if isinstance(preprocess, T.Compose) else []
    # the workers' images are RGB already: an RGB conversion step is a no-op here
    rest = [s for s in steps if not (type(s).__name__ == "MaybeConvertMode" and s.mode == "RGB")
            and getattr(s, "__name__", "") != "_convert_to_rgb"]
    has_crop = len(rest) == 4 and isinstance(rest[1], T.CenterCrop)
    ok = (len(rest) == 3 or has_crop) and len(rest) in (3, 4) and isinstance(rest[0], T.Resize) \
        and rest[0].interpolation in (T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR) \
        and rest[0].antialias is not False \
        and (isinstance(rest[-2], T.ToTensor) or type(rest[-2]).__name__ == "MaybeToTensor") \
        and isinstance(rest[-1], T.Normalize)
    if not ok:
        raise ClipbenchError(
            f"--decode torchvision cannot reproduce the preprocessing of {model_name}: it handles a "
            "torchvision Compose of Resize (bicubic or bilinear, antialiased), an optional CenterCrop, "
            "an RGB conversion, ToTensor and Normalize, and this model's is "
            f"{' '.join(repr(preprocess).split())[:300]}. Run this model with --decode pil (the "
            "default), which applies its own preprocessing."
        )
    resize = rest[0]
    normalize = rest[-1]
    return TensorPreprocess(resize.size, resize.interpolation, resize.max_size,
                            tuple(rest[1].size) if has_crop else None,
                            tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std))


_JPEG_MAGIC = b"\xff\xd8\xff"


def device_decodable(data: bytes) -> bool:
    """Whether ``decode_jpeg`` gives what Pillow gives for ``data``: a JPEG in RGB or grayscale
    without an EXIF orientation to apply. Reads the header only; Pillow's decompression-bomb guard
    applies (an image over the limit raises, as under ``--decode pil``)."""
    if data[:3] != _JPEG_MAGIC:
        return False
    with Image.open(io.BytesIO(data)) as img:
        return img.format == "JPEG" and img.mode in ("RGB", "L") \
            and img.getexif().get(ExifTags.Base.Orientation, 1) == 1


class _RawImages(Dataset):
    """Worker side of ``--decode torchvision``: yields (("jpeg", bytes as uint8) or ("rgb", (3, H, W)
    uint8 decoded by the format's loader), position, None), or (None, position, reason)."""

    def __init__(self, samples: Any, indices: Sequence[int], max_image_pixels: int | None):
        self.samples = samples
        self.indices = list(indices)
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        with pixel_limit(self.max_image_pixels):
            try:
                read = getattr(self.samples, "load_bytes", None)
                data = read(index) if read is not None else None
                if data is not None and device_decodable(data):
                    return ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), position, None
                rgb = np.asarray(self.samples.load_image(index), dtype=np.uint8)
                return ("rgb", torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()), position, None
            except Exception as exc:  # this sample's failure, not the run's
                return None, position, _reason(exc)


@dataclass
class TorchvisionDecoder:
    """JPEG decode and the model's resize, crop and normalization on its device (module docstring)."""

    transform: TensorPreprocess
    name: str = "torchvision"

    @classmethod
    def for_model(cls, model: Any) -> "TorchvisionDecoder":
        return cls(tensor_preprocess(model.preprocess, getattr(model, "name", type(model).__name__)))

    def dataset(self, samples: Any, indices: Sequence[int], max_image_pixels: int | None) -> Dataset:
        return _RawImages(samples, indices, max_image_pixels)

    def collate(self, batch: list[Any]) -> Any:
        good = [(item, position) for item, position, reason in batch if reason is None]
        bad = {position: reason for _, position, reason in batch if reason is not None}
        return good, bad

    def pixels(self, batch: Any, device: torch.device) -> Pixels:
        from torchvision.io import ImageReadMode, decode_jpeg

        good, bad = batch
        jpegs = [n for n, ((kind, _), _) in enumerate(good) if kind == "jpeg"]
        decoded: dict[int, torch.Tensor] = {}
        if jpegs:
            data = [good[n][0][1] for n in jpegs]
            try:  # one call for the batch (nvJPEG batches it on CUDA)
                decoded = dict(zip(jpegs, decode_jpeg(data, mode=ImageReadMode.RGB, device=device)))
            except RuntimeError:  # a damaged file fails the whole call: decode one by one to find it
                for n, one in zip(jpegs, data):
                    try:
                        decoded[n] = decode_jpeg(one, mode=ImageReadMode.RGB, device=device)
                    except RuntimeError as exc:
                        bad[good[n][1]] = _reason(exc)
        images, positions = [], []
        for n, ((kind, tensor), position) in enumerate(good):
            if kind == "jpeg" and n not in decoded:
                continue
            image = decoded[n] if kind == "jpeg" else tensor.to(device, non_blocking=True)
            images.append(self.transform(image))
            positions.append(position)
        return (torch.stack(images) if images else None), positions, dict(sorted(bad.items()))


register_decoder("torchvision", TorchvisionDecoder.for_model)
