"""Storage format ``jsonl_captions``: one JSON object per image, holding captions per language.

Crossmodal-3600's layout (google/crossmodal-3600 ``captions.jsonl``, as clip_benchmark's
``crossmodal3600.py`` reads it): each line has the image's key (``image/key``) and, per language
code, an object whose ``caption`` list holds that language's captions. The split value is the JSONL
file, relative to the dataset folder; ``image_path`` turns a key into the image's file. By default
the first caption of each image is used, as clip_benchmark does (``captions_per_image: 0`` keeps all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipbench.data.base import FileImageLoader, FileStats, Samples
from clipbench.data.formats import SourceFormat, register_format
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec


@dataclass(frozen=True)
class JsonlCaptionsOptions:
    image_key: str = "image/key"        # the field naming the image
    image_path: str = "images/{}.jpg"   # its file relative to the dataset folder; {} is the key
    caption_key: str = "en"             # the field holding this language's captions
    caption_field: str = "caption"      # the list of captions inside it ("" : the field is the list)
    captions_per_image: int = 1         # the first n captions of each image; 0: all of them


def _captions(row: dict[str, Any], options: JsonlCaptionsOptions, where: str) -> list[str]:
    value = row.get(options.caption_key)
    if options.caption_field and isinstance(value, dict):
        value = value.get(options.caption_field)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        field = f"{options.caption_key}.{options.caption_field}" if options.caption_field else options.caption_key
        raise ClipbenchError(f"{where}: no list of captions at '{field}' (got {value!r}); check the spec's "
                             "source.caption_key / caption_field for this language.")
    return value[:options.captions_per_image] if options.captions_per_image else value


@register_format
class JsonlCaptionsFormat(SourceFormat):
    type = "jsonl_captions"
    options_class = JsonlCaptionsOptions

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        root = self.require_local(spec, role, data_root)
        options: JsonlCaptionsOptions = spec.source.options
        table = root / str(spec.split(role))
        if not table.is_file():
            raise ClipbenchError(f"The caption file {table} does not exist; the dataset spec's manual steps "
                                 "say which files go where (`clipbench datasets` shows them).")
        names, captions = [], []
        with table.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{table}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ClipbenchError(f"{where}: not valid JSON ({exc}).") from None
                if not isinstance(row, dict) or options.image_key not in row:
                    raise ClipbenchError(f"{where}: no '{options.image_key}' field (source.image_key).")
                names.append(options.image_path.format(row[options.image_key]))
                captions.append(_captions(row, options, where))
        paths = [root / name for name in names]
        return Samples(
            load_image=FileImageLoader(paths),
            size=len(names),
            captions=captions,
            ids=names,
            description=f"{spec.name} [{spec.language}] {table.name}",
            fingerprint=FileStats(paths, relative_to=root),
        )
