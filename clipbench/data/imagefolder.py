"""Storage format ``imagefolder``: a plain image folder, ``<root>/<split>/<class folder>/<image>``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from clipbench.data.base import IMAGE_EXTENSIONS, FileImageLoader, Samples
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
        return load_imagefolder(root, str(spec.split(role)), options.class_folders)


def load_imagefolder(
    root: Path, split: str, class_folders: Sequence[str] | None = None
) -> Samples:
    """Read ``root/split/<class>/*``; class index = position in ``class_folders`` (else sorted names).

    Files are taken in sorted order within each class, so the sample order is deterministic.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise ClipbenchError(
            f"Split folder {split_dir} does not exist. An imagefolder dataset is laid out as "
            f"{root}/<split>/<class>/<image files>."
        )
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    folders = list(class_folders) if class_folders is not None else present
    unknown = sorted(set(present) - set(folders))
    if unknown:
        raise ClipbenchError(
            f"{split_dir} has class folders that the spec's class list lacks: {unknown[:5]}. "
            "Add them to source.class_folders or remove them."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for index, folder in enumerate(folders):
        class_dir = split_dir / folder
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths.extend(files)
        labels.extend([index] * len(files))
    if not paths:
        raise ClipbenchError(f"No images found under {split_dir} (extensions {IMAGE_EXTENSIONS}).")
    return Samples(
        load_image=FileImageLoader(paths),
        size=len(paths),
        targets=np.asarray(labels, dtype=np.int64),
        ids=[str(p.relative_to(root)) for p in paths],
        description=f"imagefolder {split_dir}",
    )
