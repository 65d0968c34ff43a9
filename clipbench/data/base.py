"""The sample sequence every adapter returns, and helpers shared by adapters."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from clipbench.errors import ClipbenchError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class Samples:
    """A split of a dataset: ``samples[i] -> (PIL.Image RGB, target)``.

    Exactly one of ``targets`` / ``captions`` is set:
      - ``targets``: ``(N,)`` int64 class indices, or ``(N, C)`` uint8 for multi-label data;
      - ``captions``: ``N`` lists of caption strings (retrieval, caption sets); the target of item i is i.
    Caption-set data (caption selection, Winoground, WinoGAViL) also set ``negatives``: ``N`` lists
    of negative captions, texts that do not describe the image; and, where images are scored
    jointly, ``examples``: ``N`` example ids (Winoground: the two images of one example share one,
    image 0 first; WinoGAViL: an example's candidate images, in order, each with the cue as its
    caption if it is an association, else as its negative).
    ``load_image(i)`` returns the i-th image; it must be picklable for DataLoader workers.
    ``groups``: ``(N,)`` int64 group label of each sample (a metadata column the spec names,
    ``source.group_column``: region, income group), or None; worst-group metrics read it.
    ``load_bytes(i)``, when the format stores each image as an encoded file (JPEG, PNG, ...), returns
    those bytes, for decoders that decode on their own (``--decode torchvision``); None: the format
    has no such bytes (decoded arrays, video frames) and every image is read with ``load_image``.
    ``ids`` are stable per-sample identifiers (file names, row ids) used in sidecars and digests.
    ``fingerprint()`` is a digest of the stored bytes behind the split (see :class:`FileStats`),
    set by the storage format; it is computed on first use and shared by subsets.
    """

    load_image: Callable[[int], Image.Image]
    size: int
    targets: np.ndarray | None = None
    captions: list[list[str]] | None = None
    ids: Sequence[str] | None = None
    negatives: list[list[str]] | None = None
    examples: Sequence[str] | None = None
    description: str = ""
    fingerprint: Callable[[], str] | None = None
    groups: np.ndarray | None = None
    load_bytes: Callable[[int], bytes] | None = None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, Any]:
        if index < 0 or index >= self.size:
            raise IndexError(index)
        image = self.load_image(index)
        target = self.targets[index] if self.targets is not None else index
        return image, target

    def id_of(self, index: int) -> str:
        """How messages and records name sample ``index``: its id, else ``#index``."""
        return str(self.ids[index]) if self.ids is not None else f"#{index}"

    def subset(self, indices: np.ndarray, description: str | None = None) -> "Samples":
        """A new :class:`Samples` over ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        return Samples(
            load_image=_IndexedLoader(self.load_image, indices),
            size=len(indices),
            targets=self.targets[indices] if self.targets is not None else None,
            captions=[self.captions[i] for i in indices] if self.captions is not None else None,
            ids=[self.ids[i] for i in indices] if self.ids is not None else None,
            negatives=[self.negatives[i] for i in indices] if self.negatives is not None else None,
            examples=[self.examples[i] for i in indices] if self.examples is not None else None,
            description=description or self.description,
            fingerprint=self.fingerprint,
            groups=self.groups[indices] if self.groups is not None else None,
            load_bytes=_IndexedLoader(self.load_bytes, indices) if self.load_bytes is not None else None,
        )

    def content_digest(self, captions: bool = True) -> str:
        """Digest of the listing and of the stored content (the fingerprint): the feature-cache key
        part. ``captions=False`` leaves the captions out (they change no image feature)."""
        h = hashlib.sha256(self.listing_digest(captions).encode())
        if self.fingerprint is not None:
            h.update(self.fingerprint().encode())
        return h.hexdigest()[:16]

    def listing_digest(self, captions: bool = True) -> str:
        """Digest of the sample ids and targets (or captions and negatives, unless
        ``captions=False``; examples), not of the stored bytes."""
        h = hashlib.sha256(str(self.size).encode())
        if self.ids is not None:
            h.update("\n".join(map(str, self.ids)).encode())
        if self.targets is not None:
            h.update(np.ascontiguousarray(self.targets).tobytes())
        if captions and self.captions is not None:
            h.update("\x1f".join("\x1e".join(c) for c in self.captions).encode())
        if self.groups is not None:  # only then: the digests of ungrouped splits are unchanged
            h.update(b"groups" + np.ascontiguousarray(self.groups, dtype=np.int64).tobytes())
        if captions and self.negatives is not None:  # absent for other data, so their digests are unchanged
            h.update(b"negatives\x1d" + "\x1f".join("\x1e".join(c) for c in self.negatives).encode())
        if self.examples is not None:
            h.update(b"examples\x1d" + "\x1f".join(map(str, self.examples)).encode())
        return h.hexdigest()[:16]


class FileStats:
    """Fingerprint of files by (path, size, mtime_ns): cheap (one ``stat`` per file, no reads),
    computed once per instance and picklable. A file rewritten with the same size within the
    filesystem's mtime granularity goes unnoticed.

    ``paths`` are files, or directories whose files (recursively) count.
    """

    def __init__(self, paths: Sequence[Path | str], relative_to: Path | str | None = None):
        self.paths = [str(p) for p in paths]
        self.relative_to = str(relative_to) if relative_to is not None else None
        self._value: str | None = None

    def _files(self):
        for path in self.paths:
            if os.path.isdir(path):
                for folder, _, names in os.walk(path):
                    yield from (os.path.join(folder, n) for n in names)
            else:
                yield path

    def __call__(self) -> str:
        if self._value is None:
            lines = []
            prefix = os.path.join(self.relative_to, "") if self.relative_to else None
            for path in self._files():
                try:
                    st = os.stat(path)
                    stat = f"{st.st_size}\0{st.st_mtime_ns}"
                except FileNotFoundError:
                    # listed but absent (a table row naming a deleted image): its sample fails to
                    # load and --on-bad-image decides; restoring the file changes the fingerprint
                    stat = "missing"
                except OSError as exc:
                    raise ClipbenchError(f"Cannot read {path} ({exc.strerror}): restore the file or "
                                         "remove it from the dataset.") from None
                if prefix is None:
                    name = path
                elif path.startswith(prefix):  # the common case, without relpath's cost
                    name = path[len(prefix):]
                else:
                    name = os.path.relpath(path, self.relative_to)
                lines.append(f"{name}\0{stat}")
            self._value = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
        return self._value


def text_list(value: Any) -> list[str]:
    """A table cell as a list of texts: a list, a JSON list in a string, or one string."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
                if isinstance(parsed, list):
                    return [str(v) for v in parsed]
            except json.JSONDecodeError:
                pass
        return [value]
    raise ClipbenchError(f"caption value {value!r} is neither a string nor a list of strings")


def indefinite_article(text: str) -> str:
    """``"A <text>"`` or ``"An <text>"`` (text lower-cased; "An" before a, e, i, o, u): DataComp's
    prompt for a WinoGAViL cue (``get_clip_prompt`` in its ``eval_utils/wino_eval.py``)."""
    text = text.lower()
    return f"An {text}" if text[:1] in ("a", "e", "i", "o", "u") else f"A {text}"


#: ``source.caption_prompt``: how caption-set texts are turned into the prompts the text tower sees
CAPTION_PROMPTS: dict[str, Callable[[str], str]] = {
    "none": lambda text: text,
    "indefinite_article": indefinite_article,
}


def caption_prompt(name: str | None, where: str) -> Callable[[str], str]:
    """The :data:`CAPTION_PROMPTS` entry ``name`` (None: texts as stored).

    Raises:
        ClipbenchError: an unknown name; the message lists the known ones.
    """
    if name is None:
        return CAPTION_PROMPTS["none"]
    if name not in CAPTION_PROMPTS:
        raise ClipbenchError(f"{where}: source.caption_prompt {name!r} is not one of {sorted(CAPTION_PROMPTS)}. "
                             "Fix it in the spec.")
    return CAPTION_PROMPTS[name]


@dataclass(frozen=True)
class CandidateColumns:
    """Caption-set rows of one text against a set of candidate images (WinoGAViL).

    candidates: the column of each row's candidates (a list: image paths in a table; names in a
        Hugging Face row, whose images are in ``images``);
    associations: the column listing the candidates the row's text describes;
    images: the column of the candidate images (a list, parallel to ``candidates``), or None when
        ``candidates`` are themselves the image paths.
    """

    candidates: str
    associations: str
    images: str | None = None


def candidate_columns(options: Any, where: str) -> CandidateColumns | None:
    """The candidate-rows columns a format's options name (``candidate_column``,
    ``association_column``, ``candidate_image_column`` where the format has it), or None.

    Raises:
        ClipbenchError: one of candidate_column / association_column without the other.
    """
    candidates, associations = options.candidate_column, options.association_column
    if candidates is None and associations is None:
        return None
    if candidates is None or associations is None:
        raise ClipbenchError(f"{where}: source.candidate_column and source.association_column go together "
                             "(each row's candidates and the ones its text describes); set both in the spec.")
    return CandidateColumns(candidates, associations, getattr(options, "candidate_image_column", None))


@dataclass(frozen=True)
class CaptionSetRows:
    """Rows of caption-set data laid out as samples (what :func:`caption_set_rows` returns).

    images: per sample, (row index, column, position) to read its image from: the cell
        ``rows[row][column]``, or its ``position``-th element when the cell is a list (candidate
        rows), else position None.
    """

    images: list[tuple[int, str, int | None]]
    captions: list[list[str]]
    negatives: list[list[str]]
    ids: list[str]
    examples: list[str] | None


def caption_set_rows(rows: Sequence[Any], row_ids: Sequence[str], *, image_column: str, caption_column: str,
                     negative_column: str | None, image_columns: Sequence[str], caption_columns: Sequence[str],
                     where: str, candidates: CandidateColumns | None = None,
                     prompt: Callable[[str], str] = CAPTION_PROMPTS["none"]) -> CaptionSetRows:
    """Caption-set samples from table rows (mappings), shared by the table and Hugging Face formats.
    ``prompt`` turns each stored text into the text encoded (:data:`CAPTION_PROMPTS`).

    Three layouts:

    - one image per row (SugarCrepe): ``image_column``, its captions in ``caption_column`` and its
      negatives in ``negative_column`` (each a string or a list); a sample per row, id = the row id;
    - paired rows (Winoground): ``image_columns`` [image_0, image_1, ...] and ``caption_columns``
      [caption_0, caption_1, ...]; caption j describes image j and is a negative of every other
      image of the row (plus ``negative_column``'s texts, when set). A row is one example: a sample
      per image, in column order, id ``<row id>/<j>``, example id = the row id;
    - candidate rows (WinoGAViL, ``candidates`` set): one text (``caption_column``, the cue) against
      the row's candidate images; a sample per candidate, in order, id ``<row id>/<candidate>``,
      example id = the row id; the text is the caption of each candidate listed in the
      associations column and the negative of every other.

    Raises:
        ClipbenchError: a named column is missing, the column lists differ in length, or a candidate
            row's lists disagree (an association that is not a candidate, no association).
    """
    if candidates is not None:
        return _candidate_rows(rows, row_ids, caption_column, candidates, where, prompt)
    paired = bool(image_columns or caption_columns)
    if paired and (len(image_columns) != len(caption_columns) or len(image_columns) < 2):
        raise ClipbenchError(
            f"{where}: source.image_columns {list(image_columns)} and source.caption_columns "
            f"{list(caption_columns)} must list the same number (two or more) of columns: caption j "
            "describes image j. Fix them in the spec.")
    needed = [*image_columns, *caption_columns] if paired else [image_column, caption_column]
    needed += [negative_column] if negative_column else []
    if not paired and not negative_column:
        raise ClipbenchError(f"{where}: caption-set data need negative captions: set source.negative_column "
                             "(one image per row) or source.image_columns and source.caption_columns "
                             "(paired rows, Winoground) in the spec.")
    columns = set(rows[0]) if rows else set()
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ClipbenchError(f"{where} lacks column(s) {missing}; it has {sorted(columns)}. Fix the "
                             "spec's source.*_column(s) fields.")
    out = CaptionSetRows([], [], [], [], [] if paired else None)
    for r, (row, row_id) in enumerate(zip(rows, row_ids)):
        extra = [prompt(t) for t in text_list(row[negative_column])] if negative_column else []
        if not paired:
            out.images.append((r, image_column, None))
            out.captions.append([prompt(t) for t in text_list(row[caption_column])])
            out.negatives.append(extra)
            out.ids.append(str(row_id))
            continue
        texts = [prompt(str(row[c])) for c in caption_columns]
        for j, column in enumerate(image_columns):
            out.images.append((r, column, None))
            out.captions.append([texts[j]])
            out.negatives.append([t for k, t in enumerate(texts) if k != j] + extra)
            out.ids.append(f"{row_id}/{j}")
            out.examples.append(str(row_id))
    return out


def _candidate_rows(rows: Sequence[Any], row_ids: Sequence[str], cue_column: str, columns: CandidateColumns,
                    where: str, prompt: Callable[[str], str]) -> CaptionSetRows:
    """The candidate-rows layout of :func:`caption_set_rows`."""
    needed = [cue_column, columns.candidates, columns.associations, *([columns.images] if columns.images else [])]
    present = set(rows[0]) if rows else set()
    missing = [c for c in needed if c not in present]
    if missing:
        raise ClipbenchError(f"{where} lacks column(s) {missing}; it has {sorted(present)}. Fix the spec's "
                             "source.caption_column / candidate_column / association_column / "
                             "candidate_image_column fields.")
    out = CaptionSetRows([], [], [], [], [])
    image_column = columns.images or columns.candidates
    for r, (row, row_id) in enumerate(zip(rows, row_ids)):
        names = text_list(row[columns.candidates])
        associated = set(text_list(row[columns.associations]))
        strays = sorted(associated - set(names))
        if strays or not associated or len(set(names)) != len(names):
            problem = (f"lists association(s) {strays} that are not among its candidates" if strays else
                       "has no association" if not associated else "lists a candidate twice")
            raise ClipbenchError(f"{where}: row {row_id!r} {problem} (candidates {names}). Each row needs "
                                 "distinct candidates and one or more associations among them; fix the data "
                                 "or the spec's source.candidate_column / association_column.")
        cue = prompt(str(row[cue_column]))
        for j, name in enumerate(names):
            hit = name in associated
            out.images.append((r, image_column, j))
            out.captions.append([cue] if hit else [])
            out.negatives.append([] if hit else [cue])
            out.ids.append(f"{row_id}/{name}")
            out.examples.append(str(row_id))
    return out


def class_key(name: str) -> str:
    """A class or folder name compared by name: lower-case letters and digits only
    (``ApplyEyeMakeup`` = ``Apply Eye Makeup``, ``golden_retriever`` = ``golden-retriever``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


class _IndexedLoader:
    def __init__(self, load: Callable[[int], Any], indices: np.ndarray):
        self.load = load
        self.indices = indices

    def __call__(self, i: int) -> Any:
        return self.load(int(self.indices[i]))


class FileImageLoader:
    """Loads ``paths[i]`` as an RGB PIL image with :func:`to_rgb` (picklable)."""

    def __init__(self, paths: Sequence[Path | str]):
        self.paths = [str(p) for p in paths]

    def __call__(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as img:
            return to_rgb(img)

    def read_bytes(self, i: int) -> bytes:
        """The file of image ``i`` as stored (``Samples.load_bytes``)."""
        with open(self.paths[i], "rb") as f:
            return f.read()


#: 16-bit grayscale modes (PNG, TIFF)
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Any) -> Image.Image:
    """Coerce a decoded image value (PIL image, HF `datasets` dict of bytes or a path, numpy array)
    to an 8-bit RGB PIL image: the one conversion every storage format uses.

    - 16-bit grayscale (modes ``I;16*``, ``uint16`` arrays) is scaled to 8 bits (``round(v / 257)``:
      65535 -> 255), not clipped at 255 as ``Image.convert`` does; 32-bit integers (mode ``I``,
      wider integer arrays) are scaled the same way when a value exceeds 255, else taken as 8-bit;
    - float images (mode ``F``, float arrays) whose values lie in [0, 1] are scaled by 255, others
      are taken as [0, 255]; both are clipped to that range and rounded;
    - an alpha channel (``RGBA``, ``LA``, ``PA``, a palette with transparency) is dropped, as
      ``convert("RGB")`` in the CLIP, open_clip and clip_benchmark pipelines does, so numbers stay
      comparable with theirs; palette, CMYK, YCbCr, 1-bit and 8-bit grayscale images are converted
      by Pillow.
    """
    if isinstance(image, Image.Image):
        image.load()  # decode errors surface here, inside the caller's file context
        if image.mode in _16BIT_MODES:
            return _gray_to_rgb(np.asarray(image).astype(np.uint16))
        if image.mode in ("I", "F"):
            return _gray_to_rgb(np.asarray(image))
        return image.convert("RGB")
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            import io

            with Image.open(io.BytesIO(image["bytes"])) as img:
                return to_rgb(img)
        if image.get("path"):
            with Image.open(image["path"]) as img:
                return to_rgb(img)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 and image.ndim == 2:
            return _gray_to_rgb(image)
        if image.dtype != np.uint8:
            return Image.fromarray(_to_uint8(image)).convert("RGB")
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"cannot turn a {type(image).__name__} into an image")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Integer values wider than 8 bits scaled by 1/257 (16-bit range); floats per :func:`to_rgb`."""
    if np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 1.0
        return np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    if np.issubdtype(values.dtype, np.bool_):
        return values.astype(np.uint8) * 255
    if values.dtype != np.uint16 and (values.size == 0 or values.max() <= 255):
        return np.clip(values, 0, 255).astype(np.uint8)
    return np.clip(np.rint(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(_to_uint8(values)).convert("RGB")
