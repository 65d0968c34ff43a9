"""Storage format ``imagefolder``: a plain image folder, ``<root>/<split>/<class folder>/<image>``.

Every class must have its folder and every folder at least one image: a class without images would
vanish from the metrics (accuracy over the other classes, a mean per-class recall over fewer
classes) without a word, so a missing or empty class folder, or a folder count other than the
spec's ``num_classes``, is refused with the folders named rather than warned about.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from clipbench.data.base import IMAGE_EXTENSIONS, FileImageLoader, FileStats, Samples, class_key
from clipbench.data.formats import SourceFormat, register_format
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec


@dataclass(frozen=True)
class ImageFolderOptions:
    #: folder names in class-index order (a file or an inline list); None: sorted folder names
    class_folders: tuple[str, ...] | None = None


@register_format
class ImageFolderFormat(SourceFormat):
    type = "imagefolder"
    options_class = ImageFolderOptions

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        return self.read(spec, role, self.require_local(spec, role, data_root), spec.source.options)

    @staticmethod
    def read(spec: "DatasetSpec", role: str, root: Path, options: ImageFolderOptions) -> Samples:
        """The split of an image folder at ``root`` (also used for generated data)."""
        return load_imagefolder(root, str(spec.split(role)), options.class_folders, spec.classnames,
                                num_classes=spec.num_classes)


def folder_order(present: Sequence[str], classnames: Sequence[str] | None, split_dir: Path) -> list[str]:
    """The class folders in class-index order when the spec gives no ``class_folders``.

    Without classnames: sorted folder names. With them, folders map to classes by name (compared
    with :func:`~clipbench.data.base.class_key`), so folder ``eight`` is class ``eight`` whatever
    the sort order; folders that are not the class names are refused rather than mapped by sort
    order, which would silently score one class as another.
    """
    if classnames is None:
        return list(present)
    keys = {class_key(name): index for index, name in enumerate(classnames)}
    by_key = {class_key(folder): folder for folder in present}
    if len(keys) == len(classnames) and len(by_key) == len(present) and set(by_key) == set(keys):
        return [by_key[class_key(name)] for name in classnames]
    raise ClipbenchError(
        f"The class folders of {split_dir} ({_preview(present)}) are not the spec's class names "
        f"({_preview(classnames)}), so clipbench cannot tell which folder is which class. Folders "
        "named like the class names (case, '_', '-' and spaces aside) are matched by name; otherwise "
        "declare the folder of each class in class-index order with source.class_folders (a list or a "
        "file, one folder name per line, in the order of the classnames)."
    )


def _preview(names: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(map(repr, names[:n]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def load_imagefolder(
    root: Path, split: str, class_folders: Sequence[str] | None = None,
    classnames: Sequence[str] | None = None, *, num_classes: int | None = None,
) -> Samples:
    """Read ``root/split/<class>/*``; class index = position in ``class_folders``, else the folders
    matched to ``classnames`` by name (:func:`folder_order`), else sorted folder names.

    Files are taken in sorted order within each class, so the sample order is deterministic.

    Raises:
        ClipbenchError: a class folder missing or without images, or ``num_classes`` classes
            declared over another number of class folders.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise ClipbenchError(
            f"Split folder {split_dir} does not exist. An imagefolder dataset is laid out as "
            f"{root}/<split>/<class>/<image files>."
        )
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    folders = list(class_folders) if class_folders is not None else folder_order(present, classnames, split_dir)
    unknown = sorted(set(present) - set(folders))
    if unknown:
        raise ClipbenchError(
            f"{split_dir} has class folders that the spec's class list lacks: {unknown[:5]}. "
            "Add them to source.class_folders or remove them."
        )
    if num_classes is not None and len(folders) != num_classes:
        raise ClipbenchError(
            f"The spec declares {num_classes} classes but {split_dir} has {len(folders)} class folders "
            f"({_preview(folders)}). Add the missing class folders, or correct num_classes (and the "
            "classnames / source.class_folders) in the spec."
        )
    paths: list[Path] = []
    labels: list[int] = []
    absent, empty = [], []
    for index, folder in enumerate(folders):
        class_dir = split_dir / folder
        if not class_dir.is_dir():
            absent.append(folder)
            continue
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            empty.append(folder)
        paths.extend(files)
        labels.extend([index] * len(files))
    if not paths:
        raise ClipbenchError(f"No images found under {split_dir} (extensions {IMAGE_EXTENSIONS}).")
    if absent or empty:
        what = "; ".join(part for part in (
            f"missing class folders {_preview(absent)}" if absent else "",
            f"class folders without images ({', '.join(IMAGE_EXTENSIONS)}) {_preview(empty)}" if empty else "",
        ) if part)
        raise ClipbenchError(
            f"{split_dir}: {what}. Their classes would silently drop out of the metrics. Put the "
            "class's images there, or remove the class from the spec (classnames, num_classes, "
            "source.class_folders)."
        )
    return Samples(
        load_image=(loader := FileImageLoader(paths)),
        load_bytes=loader.read_bytes,
        size=len(paths),
        targets=np.asarray(labels, dtype=np.int64),
        ids=[str(p.relative_to(root)) for p in paths],
        description=f"imagefolder {split_dir}",
        fingerprint=FileStats(paths, relative_to=root),
    )
