"""Storage format ``synthetic``: clipbench's generated shapes world (the offline default datasets).

The data is written on first use by :func:`clipbench.synthetic.materialize` under
``<data_root>/<name>/`` and then read exactly as the standard formats read it: a classification
set as an image folder, the retrieval set as a table (``test.jsonl`` with ``image`` and
``captions`` columns).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from clipbench.data.base import Samples
from clipbench.data.formats import SourceFormat, register_format
from clipbench.data.imagefolder import ImageFolderFormat, ImageFolderOptions
from clipbench.data.table import TableFormat, TableOptions

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec


@register_format
class SyntheticFormat(SourceFormat):
    type = "synthetic"

    def how_to_get(self, spec: "DatasetSpec", data_root: Path) -> str:
        return "generated automatically on first use"

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        from clipbench import synthetic

        # returns at once when complete; rebuilds data written by an older generator version
        root = synthetic.materialize(spec.name, data_root / spec.name)
        if spec.has_caption_sets:
            return TableFormat.read(spec, role, root, TableOptions(negative_column="negatives"))
        if spec.is_retrieval:
            return TableFormat.read(spec, role, root, TableOptions())
        return ImageFolderFormat.read(spec, role, root, ImageFolderOptions())
