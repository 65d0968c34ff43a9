"""Storage format ``huggingface``: a local `save_to_disk` folder, a local folder of parquet or
imagefolder files, or a hub id (downloaded into the data root's HF cache when allowed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipbench.data.base import (
    CandidateColumns,
    CaptionSetRows,
    FileStats,
    Samples,
    candidate_columns,
    caption_prompt,
    caption_set_rows,
    to_rgb,
)
from clipbench.data.formats import SourceFormat, register_format
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HuggingFaceOptions:
    config: str | None = None          # the hub dataset's config name
    image_column: str | None = None    # None: the first column of the `Image` feature type
    label_column: str | None = None    # classification
    caption_column: str | None = None  # retrieval: a string (one caption per line) or a list
    negative_column: str | None = None  # caption sets: a row's negative captions (string or list)
    image_columns: tuple[str, ...] = ()    # caption sets in paired rows (Winoground): image j ...
    caption_columns: tuple[str, ...] = ()  # ... is described by caption j
    candidate_column: str | None = None    # caption sets of one text vs candidate images (WinoGAViL): names (list)
    association_column: str | None = None  # ... the candidates the row's text (caption_column) describes (list)
    candidate_image_column: str | None = None  # ... the candidate images (list, parallel to candidate_column)
    caption_prompt: str | None = None      # caption sets: a CAPTION_PROMPTS name applied to every text [none]


@register_format
class HuggingFaceFormat(SourceFormat):
    type = "huggingface"
    options_class = HuggingFaceOptions

    def automatic_hint(self, spec: "DatasetSpec", target: Path) -> str:
        hub_id = spec.source.path
        return (
            f"run once with network access (clipbench downloads the hub dataset '{hub_id}'), or save it "
            f"with `datasets.load_dataset('{hub_id}').save_to_disk('{target}')` on a machine with "
            f"network and copy it there (or pass --data-root DIR)"
        )

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        options: HuggingFaceOptions = spec.source.options
        split = str(spec.split(role))
        root = self.locate(spec, data_root)
        if root is not None:
            dataset = open_local(root, split, options.config)
        else:
            reason = self.may_download(spec, allow_download)
            if reason:
                raise self.missing(spec, role, data_root, reason)
            dataset = open_hub(spec.source.path, split, options.config, data_root / "hf-cache")
        if spec.has_caption_sets:
            return caption_sets_from_dataset(dataset, options, description=f"{spec.name}:{split}")
        return samples_from_dataset(
            dataset,
            image_column=options.image_column,
            label_column=None if spec.is_retrieval else options.label_column,
            caption_column=options.caption_column if spec.is_retrieval else None,
            num_classes=spec.num_classes,
            multilabel=spec.multilabel,
            description=f"{spec.name}:{split}",
        )


class HFImageLoader:
    """``loader(i)`` decodes row i's image column only (picklable for DataLoader workers)."""

    def __init__(self, dataset: Any, column: str):
        self.dataset = dataset
        self.column = column

    def __call__(self, i: int):
        return to_rgb(self.dataset[int(i)][self.column])


class HFCellLoader:
    """``loader(i)`` decodes the image in cell ``cells[i]`` = (row, column, position): paired rows
    hold several image columns, candidate rows a list of images, whose ``position``-th element alone
    is decoded (picklable for DataLoader workers)."""

    def __init__(self, dataset: Any, cells: list[tuple[int, str, int | None]]):
        self.dataset = dataset
        self.cells = cells
        self._lists: dict[str, Any] = {}

    def __call__(self, i: int):
        row, column, position = self.cells[int(i)]
        if position is None:
            return to_rgb(self.dataset[row][column])
        if column not in self._lists:
            # the column alone, undecoded: reading one candidate must not decode the row's others
            self._lists[column] = self.dataset.select_columns([column]).with_format("arrow")
        cell = self._lists[column][row].column(column)[0][position].as_py()
        return to_rgb(cell)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lists": {}}


class HFFingerprint:
    """A Hugging Face dataset's stored content: its ``_fingerprint`` (which the library changes with
    every transform and slice) and (path, size, mtime_ns) of its Arrow files (picklable)."""

    def __init__(self, dataset: Any):
        self.fingerprint = str(getattr(dataset, "_fingerprint", ""))
        self.files = FileStats([f["filename"] for f in getattr(dataset, "cache_files", ())])

    def __call__(self) -> str:
        return f"{self.fingerprint}:{self.files()}"


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def open_local(path: Path, split: str, config: str | None = None):
    """Open ``split`` of a local HF dataset folder (save_to_disk, parquet or imagefolder files)."""
    import datasets

    if is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            base, _, _ = split.partition("[")
            if base not in loaded:
                raise ClipbenchError(
                    f"Split '{base}' is not in the saved dataset {path} (it has {list(loaded)}). "
                    "Fix the spec's splits."
                )
            return loaded[base] if base == split else datasets.load_from_disk(str(path / base))
        return loaded
    try:
        return datasets.load_dataset(str(path), name=config, split=split)
    except ValueError as exc:
        raise ClipbenchError(f"Could not read split '{split}' of the local dataset {path}: {exc}") from None


def open_hub(hub_id: str, split: str, config: str | None, cache_dir: Path):
    """Download (or reuse from cache) a hub dataset split."""
    import datasets

    log.info("loading %s (%s) split %s from the Hugging Face hub", hub_id, config, split)
    return datasets.load_dataset(hub_id, name=config, split=split, cache_dir=str(cache_dir))


def _guess_image_column(dataset: Any) -> str:
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ClipbenchError(
        f"No image column found among {list(dataset.features)}; set source.image_column in the spec."
    )


def samples_from_dataset(
    dataset: Any,
    *,
    image_column: str | None,
    label_column: str | None,
    caption_column: str | None,
    num_classes: int | None,
    multilabel: bool,
    description: str,
) -> Samples:
    """Wrap an HF ``Dataset`` as :class:`Samples` (labels or captions read column-wise, no decoding)."""
    columns = list(dataset.features)
    image_column = image_column or _guess_image_column(dataset)
    for col in (image_column, label_column, caption_column):
        if col and col not in columns:
            raise ClipbenchError(
                f"Column '{col}' is not in {description} (columns: {columns}). Fix source.*_column in the spec."
            )
    loader = HFImageLoader(dataset, image_column)
    fingerprint = HFFingerprint(dataset)
    if caption_column:
        captions = []
        for value in dataset[caption_column]:
            if isinstance(value, str):
                # webdataset mirrors store several captions in one text field, one per line
                value = [v for v in value.split("\n") if v.strip()]
            captions.append([str(v) for v in value])
        return Samples(loader, len(dataset), captions=captions, ids=[str(i) for i in range(len(dataset))],
                       description=description, fingerprint=fingerprint)
    if not label_column:
        raise ClipbenchError(f"{description}: set source.label_column (or caption_column) in the spec.")
    raw = dataset[label_column]
    if multilabel:
        if num_classes is None:
            raise ClipbenchError(f"{description}: a multi-label dataset needs num_classes.")
        targets = np.zeros((len(raw), num_classes), dtype=np.uint8)
        for i, labels in enumerate(raw):
            targets[i, list(labels)] = 1
    else:
        targets = np.asarray(raw, dtype=np.int64)
    return Samples(loader, len(dataset), targets=targets, ids=[str(i) for i in range(len(dataset))],
                   description=description, fingerprint=fingerprint)


def caption_sets_from_dataset(dataset: Any, options: HuggingFaceOptions, *, description: str) -> Samples:
    """Caption-set samples of an HF ``Dataset``, laid out by :func:`clipbench.data.base.caption_set_rows`
    (Winoground: ``image_columns: [image_0, image_1]``, ``caption_columns: [caption_0, caption_1]``);
    text columns are read column-wise and images decoded only when loaded."""
    candidates = candidate_columns(options, description)
    if candidates is not None:
        return _candidate_sets_from_dataset(dataset, options, candidates, description)
    paired = bool(options.image_columns or options.caption_columns)
    image_column = None if paired else options.image_column or _guess_image_column(dataset)
    images = list(options.image_columns) if paired else [image_column]
    if not paired and not options.caption_column:
        raise ClipbenchError(f"{description}: set source.caption_column (each row's caption) and "
                             "source.negative_column, or source.image_columns and source.caption_columns "
                             "(paired rows), in the spec.")
    texts = [*options.caption_columns] if paired else [options.caption_column]
    texts += [options.negative_column] if options.negative_column else []
    missing = [c for c in images + texts if c not in dataset.features]
    if missing:
        raise ClipbenchError(f"Column(s) {missing} are not in {description} (columns: {list(dataset.features)}). "
                             "Fix source.*_column(s) in the spec.")
    columns = {c: dataset[c] for c in texts}
    rows = [{**{c: columns[c][i] for c in texts}, **dict.fromkeys(images)} for i in range(len(dataset))]
    laid = caption_set_rows(rows, _row_ids(dataset), image_column=image_column or "", caption_column=options.caption_column or "",
                            negative_column=options.negative_column, image_columns=options.image_columns,
                            caption_columns=options.caption_columns, where=description,
                            prompt=caption_prompt(options.caption_prompt, description))
    return _caption_set_samples(dataset, laid, description)


def _candidate_sets_from_dataset(dataset: Any, options: HuggingFaceOptions, candidates: CandidateColumns,
                                 description: str) -> Samples:
    """Candidate rows (WinoGAViL: ``cue``, ``candidates``, ``associations``, ``candidate_images``)."""
    if candidates.images is None:
        raise ClipbenchError(f"{description}: set source.candidate_image_column (the column of each row's "
                             "candidate images, a list parallel to source.candidate_column) in the spec.")
    texts = [options.caption_column or "", candidates.candidates, candidates.associations]
    missing = [c for c in [*texts, candidates.images] if c not in dataset.features]
    if missing:
        raise ClipbenchError(f"Column(s) {missing} are not in {description} (columns: {list(dataset.features)}). "
                             "Fix source.caption_column / candidate_column / association_column / "
                             "candidate_image_column in the spec.")
    columns = {c: dataset[c] for c in texts}
    rows = [{**{c: columns[c][i] for c in texts}, candidates.images: None} for i in range(len(dataset))]
    laid = caption_set_rows(rows, _row_ids(dataset), image_column="", caption_column=texts[0], negative_column=None,
                            image_columns=(), caption_columns=(), where=description, candidates=candidates,
                            prompt=caption_prompt(options.caption_prompt, description))
    return _caption_set_samples(dataset, laid, description)


def _row_ids(dataset: Any) -> list[str]:
    """A row's id: its ``id`` (or ``ID``) column, else its index."""
    for column in ("id", "ID"):
        if column in dataset.features:
            return [str(v) for v in dataset[column]]
    return [str(i) for i in range(len(dataset))]


def _caption_set_samples(dataset: Any, laid: CaptionSetRows, description: str) -> Samples:
    return Samples(HFCellLoader(dataset, laid.images), len(laid.images), captions=laid.captions,
                   negatives=laid.negatives, examples=laid.examples, ids=laid.ids, description=description,
                   fingerprint=HFFingerprint(dataset))
