"""The synthetic shapes world: clipbench's offline default datasets.

Every image shows one coloured shape (circle, cross, …) of one size at one position on a textured,
noisy background whose colour is never a shape colour, and comes with captions that describe it in
words. Everything is a pure function of ``(seed, stream, index)``: a ``numpy`` Generator is seeded per
image, so any image can be regenerated on its own and the same arguments always give the same bytes.

Streams keep data sets apart: each split of each materialised data set and the tiny CLIP's training
data (``TRAIN_STREAM``) draw from different streams, so evaluation images are never training images.

``materialize(name, root)`` writes a data set in the on-disk formats that clipbench's standard
adapters read (``imagefolder`` for ``synthetic-shapes`` / ``synthetic-colors``, ``table`` for
``synthetic-captions`` and the caption-selection set ``synthetic-composition``), atomically and
idempotently.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from clipbench.errors import ClipbenchError

log = logging.getLogger(__name__)

#: Bumped whenever rendering or captions change, so stale materialised copies are rebuilt.
GENERATOR_VERSION = 1
#: The world's seed (the CLIP paper's arXiv date); every data set and the training stream derive from it.
WORLD_SEED = 20210226
IMAGE_SIZE = 64
#: Supersampling factor for anti-aliased shape edges.
_SUPERSAMPLE = 4

# Alphabetical, so that sorted class folders and the classnames files agree on class indices.
SHAPES: tuple[str, ...] = ("circle", "cross", "diamond", "square", "star", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "blue": (35, 75, 225),
    "green": (35, 175, 45),
    "orange": (250, 135, 20),
    "purple": (145, 45, 185),
    "red": (225, 30, 30),
    "yellow": (240, 225, 35),
}
# Background colours are disjoint from the shape colours, so a shape never blends into its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "brown": (115, 80, 50),
    "grey": (128, 128, 128),
    "white": (235, 235, 235),
}
TEXTURES: tuple[str, ...] = ("noisy", "striped", "checkered", "dotted")
SIZES: dict[str, tuple[float, float]] = {"small": (6.0, 8.0), "large": (12.0, 14.0)}  # radius range, px
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "top left": ("in the top left", "in the top left corner", "at the upper left"),
    "top right": ("in the top right", "in the top right corner", "at the upper right"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the lower left"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the lower right"),
    "center": ("in the center", "in the middle"),
}
# Every template names the shape and its colour; most add size, position or background.
_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {pos}",
    "a {color} {shape}",
    "{pos_label}: a {size} {color} {shape} on a {bg} background",
    "a {color} {shape} on a {texture} {bg} background",
    "a picture of a {size} {color} {shape} {pos}",
    "there is a {color} {shape} {pos}",
    "the {shape} is {color} and {size}",
    "a drawing of a {color} {shape} on {bg}",
    "a {bg} image with a {size} {color} {shape} {pos}",
)
CAPTIONS_PER_IMAGE = 5

#: Zero-shot prompt templates of the classification data sets (templates/<name>/templates.txt holds the same).
CLASS_TEMPLATES: dict[str, tuple[str, ...]] = {
    "synthetic-shapes": ("a {c}.", "a photo of a {c}.", "a drawing of a {c} shape."),
    "synthetic-colors": ("something {c}.", "the shape is {c}.", "a drawing of something {c}."),
}
CLASSNAMES: dict[str, tuple[str, ...]] = {
    "synthetic-shapes": SHAPES,
    "synthetic-colors": tuple(COLORS),
}
#: Images per class per split of the classification data sets (small: the offline default must be fast).
CLASS_SPLIT_SIZES: dict[str, int] = {"train": 50, "val": 20, "test": 50}
#: Images (each with CAPTIONS_PER_IMAGE captions) in synthetic-captions' test split.
RETRIEVAL_IMAGES = 1000
#: Images (each with one caption and one negative caption) in synthetic-composition's test split.
COMPOSITION_IMAGES = 300
#: synthetic-composition's caption names size, colour and shape; its negative replaces one of
#: them (image i: attribute i % 3), SugarCrepe's replace-attribute / replace-object in this world
COMPOSITION_TEMPLATE = "a {size} {color} {shape}"
COMPOSITION_REPLACED = ("color", "shape", "size")
#: The stream that clipbench-tiny is trained on; no materialised data set uses it.
TRAIN_STREAM = "clipbench-tiny/train"
DATASET_NAMES: tuple[str, ...] = ("synthetic-shapes", "synthetic-colors", "synthetic-captions",
                                   "synthetic-composition")
_MARKER = ".clipbench-synthetic.json"


@dataclass(frozen=True)
class Scene:
    """The attributes of one synthetic image (names from SHAPES, COLORS, SIZES, POSITIONS, ...)."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    texture: str


@dataclass(frozen=True)
class Example:
    """One rendered image: ``image`` is an RGB PIL image of IMAGE_SIZE × IMAGE_SIZE pixels."""

    image: Image.Image
    scene: Scene
    captions: tuple[str, ...]


def _seed_sequence(stream: str, index: int, seed: int) -> np.random.SeedSequence:
    if index < 0:
        raise ClipbenchError(f"Synthetic image index must be >= 0, got {index}.")
    # crc32 is stable across processes and platforms, unlike hash().
    return np.random.SeedSequence([seed, zlib.crc32(stream.encode("utf-8")), index])


def sample_scene(
    rng: np.random.Generator, shape: Optional[str] = None, color: Optional[str] = None
) -> Scene:
    """Draw a scene uniformly from the world; ``shape`` / ``color`` fix that attribute instead."""
    if shape is not None and shape not in SHAPES:
        raise ClipbenchError(f"Unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}.")
    if color is not None and color not in COLORS:
        raise ClipbenchError(f"Unknown synthetic colour {color!r}; choose one of {', '.join(COLORS)}.")
    drawn = Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=tuple(COLORS)[rng.integers(len(COLORS))],
        size=tuple(SIZES)[rng.integers(len(SIZES))],
        position=tuple(POSITIONS)[rng.integers(len(POSITIONS))],
        background=tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
    )
    return Scene(
        shape=shape or drawn.shape,
        color=color or drawn.color,
        size=drawn.size,
        position=drawn.position,
        background=drawn.background,
        texture=drawn.texture,
    )


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float64 background in [0, 255]: base colour × texture + pixel noise."""
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64) + rng.normal(0.0, 6.0, size=3)
    if scene.texture == "striped":
        angle = rng.uniform(0.0, np.pi)
        period = rng.uniform(5.0, 10.0)
        pattern = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif scene.texture == "checkered":
        cell = int(rng.integers(4, 9))
        pattern = (((xx // cell) + (yy // cell)) % 2) * 2.0 - 1.0
    elif scene.texture == "dotted":
        pattern = np.where(rng.random((n, n)) < 0.08, 1.0, -0.1)
    else:  # noisy: plain colour, only the pixel noise below
        pattern = np.zeros((n, n))
    # Textures lighten dark backgrounds and darken light ones, so they stay visible on both.
    direction = 1.0 if base.mean() < 128 else -1.0
    img = base[None, None, :] + direction * 22.0 * pattern[:, :, None]
    return img + rng.normal(0.0, 7.0, size=(n, n, 3))


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices (x, y) of a polygonal shape of circumradius ``r`` rotated by ``rot`` radians."""
    if shape == "square":
        angles, radii = np.pi / 4 + np.arange(4) * np.pi / 2, np.full(4, r)
    elif shape == "triangle":
        angles, radii = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3, np.full(3, r)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
    elif shape == "diamond":
        # Narrower than tall, so it is not merely a rotated square.
        angles = np.arange(4) * np.pi / 2
        radii = np.array([0.7 * r, r, 0.7 * r, r])
    elif shape == "cross":
        t = 0.36 * r
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t),
               (-r, t), (-r, -t), (-t, -t)]
        c, s = np.cos(rot), np.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ClipbenchError(f"Shape {shape!r} has no polygon.")
    angles = angles + rot
    return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]


def _shape_mask(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float64 coverage in [0, 1] of the shape, anti-aliased by supersampling."""
    k = _SUPERSAMPLE
    cx, cy = POSITIONS[scene.position]
    cx = (cx + rng.uniform(-2.0, 2.0)) * k
    cy = (cy + rng.uniform(-2.0, 2.0)) * k
    r = rng.uniform(*SIZES[scene.size]) * k
    # Small rotations only: a square rotated by 45 degrees would look like a diamond.
    rot = rng.uniform(-0.2, 0.2)
    canvas = Image.new("L", (IMAGE_SIZE * k, IMAGE_SIZE * k), 0)
    draw = ImageDraw.Draw(canvas)
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r, rot), fill=255)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` as an RGB uint8 PIL image of IMAGE_SIZE × IMAGE_SIZE pixels."""
    background = _background(scene, rng)
    mask = _shape_mask(scene, rng)[:, :, None]
    colour = np.asarray(COLORS[scene.color], dtype=np.float64) + rng.normal(0.0, 10.0, size=3)
    fill = colour[None, None, :] + rng.normal(0.0, 4.0, size=background.shape)
    pixels = mask * fill + (1.0 - mask) * background
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def describe(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE) -> tuple[str, ...]:
    """``n`` captions (distinct templates, random synonyms) that each name the shape and its colour."""
    if not 1 <= n <= len(_CAPTION_TEMPLATES):
        raise ClipbenchError(f"Number of captions must be in 1..{len(_CAPTION_TEMPLATES)}, got {n}.")
    chosen = rng.choice(len(_CAPTION_TEMPLATES), size=n, replace=False)
    captions = []
    for t in chosen:
        size_words = _SIZE_WORDS[scene.size]
        phrases = _POSITION_PHRASES[scene.position]
        caption = _CAPTION_TEMPLATES[t].format(
            size=size_words[rng.integers(len(size_words))],
            color=scene.color,
            shape=scene.shape,
            pos=phrases[rng.integers(len(phrases))],
            pos_label=scene.position,
            bg=scene.background,
            texture=scene.texture,
        )
        captions.append(re.sub(r"\ba (?=[aeiou])", "an ", caption))
    return tuple(captions)


def generate(
    stream: str,
    index: int,
    *,
    shape: Optional[str] = None,
    color: Optional[str] = None,
    seed: int = WORLD_SEED,
    n_captions: int = CAPTIONS_PER_IMAGE,
) -> Example:
    """Image ``index`` of ``stream``: a pure function of its arguments (same arguments, same bytes)."""
    attributes, pixels, words = (
        np.random.default_rng(s) for s in _seed_sequence(stream, index, seed).spawn(3)
    )
    scene = sample_scene(attributes, shape=shape, color=color)
    return Example(image=render(scene, pixels), scene=scene, captions=describe(scene, words, n_captions))


def class_examples(name: str, split: str, n_per_class: int) -> Iterator[tuple[int, str, Example]]:
    """Yield ``(index, classname, example)`` for a classification data set's split.

    The split is class balanced: image ``index`` belongs to class ``index % num_classes``.
    """
    if name not in CLASSNAMES:
        raise ClipbenchError(
            f"{name!r} is not a synthetic classification data set; use one of {', '.join(CLASSNAMES)}."
        )
    classnames = CLASSNAMES[name]
    attribute = "shape" if name == "synthetic-shapes" else "color"
    for index in range(n_per_class * len(classnames)):
        classname = classnames[index % len(classnames)]
        yield index, classname, generate(f"{name}/{split}", index, **{attribute: classname})


def retrieval_examples(n_images: Optional[int] = None) -> Iterator[tuple[int, Example]]:
    """Yield ``(index, example)`` for the first ``n_images`` (default all) of synthetic-captions' test."""
    for index in range(RETRIEVAL_IMAGES if n_images is None else n_images):
        yield index, generate("synthetic-captions/test", index)


def composition_examples(n_images: Optional[int] = None) -> Iterator[tuple[int, Example, str, str]]:
    """Yield ``(index, example, caption, negative)`` for synthetic-composition's test split: the
    caption :data:`COMPOSITION_TEMPLATE` of the scene, the negative the same with one attribute
    (:data:`COMPOSITION_REPLACED`, by index) replaced by another value drawn at random."""
    values = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}
    stream = "synthetic-composition/test"
    for index in range(COMPOSITION_IMAGES if n_images is None else n_images):
        example = generate(stream, index)
        scene = {name: getattr(example.scene, name) for name in values}
        replaced = COMPOSITION_REPLACED[index % len(COMPOSITION_REPLACED)]
        others = [v for v in values[replaced] if v != scene[replaced]]
        rng = np.random.default_rng(_seed_sequence(f"{stream}/negatives", index, WORLD_SEED))
        negative = {**scene, replaced: others[rng.integers(len(others))]}
        yield index, example, COMPOSITION_TEMPLATE.format(**scene), COMPOSITION_TEMPLATE.format(**negative)


def _write_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _write_classification(name: str, tmp: Path) -> dict:
    counts = {}
    for split, n in CLASS_SPLIT_SIZES.items():
        for index, classname, example in class_examples(name, split, n):
            _write_png(example.image, tmp / split / classname / f"{index:05d}.png")
        counts[split] = n * len(CLASSNAMES[name])
    return counts


def _write_retrieval(tmp: Path) -> dict:
    with open(tmp / "test.jsonl", "w", encoding="utf-8") as f:
        for index, example in retrieval_examples():
            relative = f"images/{index:05d}.png"
            _write_png(example.image, tmp / relative)
            f.write(json.dumps({"image": relative, "captions": list(example.captions)}) + "\n")
    return {"test": RETRIEVAL_IMAGES}


def _write_composition(tmp: Path) -> dict:
    with open(tmp / "test.jsonl", "w", encoding="utf-8") as f:
        for index, example, caption, negative in composition_examples():
            relative = f"images/{index:05d}.png"
            _write_png(example.image, tmp / relative)
            f.write(json.dumps({"image": relative, "captions": [caption], "negatives": [negative]}) + "\n")
    return {"test": COMPOSITION_IMAGES}


_WRITERS = {"synthetic-captions": _write_retrieval, "synthetic-composition": _write_composition}


def _is_complete(root: Path) -> bool:
    try:
        marker = json.loads((root / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("generator_version") == GENERATOR_VERSION


def materialize(name: str, root: Path) -> Path:
    """Write synthetic data set ``name`` under ``root`` (its own directory) and return ``root``.

    Layouts: ``synthetic-shapes`` / ``synthetic-colors``: ``<root>/<split>/<classname>/<index>.png``
    for splits train, val and test (CLASS_SPLIT_SIZES per class); ``synthetic-captions``:
    ``<root>/test.jsonl`` with rows ``{"image": "images/00000.png", "captions": [5 strings]}``;
    ``synthetic-composition``: ``<root>/test.jsonl`` with rows ``{"image": ..., "captions": [caption],
    "negatives": [negative caption]}``.

    Atomic and idempotent: the data are written into a temporary directory beside ``root`` that is
    renamed to ``root`` when complete (a marker file records completion), so a crash never leaves a
    partial ``root`` and a second call returns at once. Leftover temporary directories of crashed
    runs are removed. A ``root`` written by an older generator version is rebuilt.
    """
    if name not in DATASET_NAMES:
        raise ClipbenchError(
            f"{name!r} is not a synthetic data set; clipbench.synthetic can write "
            f"{', '.join(DATASET_NAMES)}. Check the spec's name or give it another source type."
        )
    root = Path(root)
    if _is_complete(root):
        return root
    if root.exists():
        if (root / _MARKER).exists():
            log.info("Rebuilding %s: it was written by another generator version.", root)
            shutil.rmtree(root)
        elif root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        else:
            raise ClipbenchError(
                f"{root} exists but is not a complete clipbench synthetic data set (no {_MARKER} "
                f"marker), so clipbench will not overwrite it. Move or delete it, or point "
                f"--data-root elsewhere, and clipbench regenerates {name} there."
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{root.name}.partial-"
    for stale in root.parent.glob(prefix + "*"):
        # Only directories of dead processes: a concurrent writer (another rank) may own the rest.
        pid = stale.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root.parent))
    try:
        log.info("Generating synthetic data set %s into %s", name, root)
        writer = _WRITERS.get(name)
        counts = writer(tmp) if writer is not None else _write_classification(name, tmp)
        marker = {"name": name, "generator_version": GENERATOR_VERSION, "seed": WORLD_SEED, "counts": counts}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first; its copy is identical.
            if not _is_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

