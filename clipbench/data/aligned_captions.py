"""Storage format ``aligned_captions``: an image list and a caption file aligned line by line.

XTD10's own layout (adobe-research/Cross-lingual-Test-Dataset-XTD10, as clip_benchmark's
``xtd10.py`` reads it): ``test_image_names.txt`` names one image per line, and each language's
``test_1kcaptions_<lang>.txt`` holds the caption of the image on the same line. The split value is
the image list, ``captions_file`` the caption file (a spec's ``languages:`` entries replace it), both
relative to the dataset's folder; images sit under ``image_dir``. One caption per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipbench.data.base import FileImageLoader, FileStats, Samples
from clipbench.data.formats import SourceFormat, register_format
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec


@dataclass(frozen=True)
class AlignedCaptionsOptions:
    image_dir: str = "images"  # folder of the images the list names, relative to the dataset folder
    captions_file: str = field(default="", metadata={"expected": "a caption file, one caption per line"})


def _lines(path: Path, what: str) -> list[str]:
    try:
        # str.splitlines, as clip_benchmark splits the downloaded files
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ClipbenchError(f"The {what} {path} does not exist; the dataset spec's manual steps say "
                             "which files go where (`clipbench datasets` shows them).") from None
    except UnicodeDecodeError as exc:
        raise ClipbenchError(f"The {what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


@register_format
class AlignedCaptionsFormat(SourceFormat):
    type = "aligned_captions"
    options_class = AlignedCaptionsOptions

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        root = self.require_local(spec, role, data_root)
        options: AlignedCaptionsOptions = spec.source.options
        if not options.captions_file:
            raise ClipbenchError(f"Dataset spec {spec.file}: source.captions_file names no caption file; "
                                 "set it to the file of one caption per line (relative to the dataset folder).")
        names = _lines(root / str(spec.split(role)), "image list")
        captions = _lines(root / options.captions_file, "caption file")
        if len(names) != len(captions):
            raise ClipbenchError(
                f"{root / options.captions_file} has {len(captions)} lines but the image list "
                f"{root / str(spec.split(role))} has {len(names)}; line i of the caption file describes "
                "image i of the list, so they must have as many lines (a caption with a line break in it?)."
            )
        paths = [root / options.image_dir / name for name in names]
        return Samples(
            load_image=FileImageLoader(paths),
            size=len(names),
            captions=[[caption] for caption in captions],
            ids=names,
            description=f"{spec.name} [{spec.language}] {options.captions_file}",
            fingerprint=FileStats(paths, relative_to=root),
        )
