"""Storage format ``table``: an image table: a CSV or JSONL file with an image path column and labels or captions.

Rows name an image path relative to the table file (or to ``image_root`` beside it). Retrieval
tables give one or more captions per image: a caption column holding a list (JSONL, or a JSON list
in a CSV cell) or a string; rows that repeat an image path add captions to that image
(first-appearance order is kept). Caption-set tables (caption selection, Winoground, WinoGAViL)
are read row by row, as :func:`clipbench.data.base.caption_set_rows` lays them out. A ``.json`` file holding one
object whose values are row objects (SugarCrepe's annotation files) is read as those rows, each
named by its key.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipbench.data.base import (
    FileImageLoader,
    FileStats,
    Samples,
    candidate_columns,
    caption_prompt,
    caption_set_rows,
    text_list,
)
from clipbench.data.formats import SourceFormat, register_format
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec


@dataclass(frozen=True)
class TableOptions:
    image_column: str = "image"       # image path, relative to the table file
    label_column: str = "label"       # classification: a class index (multi-label: a list of them)
    caption_column: str = "captions"  # retrieval, caption sets: a string or a list of strings
    image_root: str = ""              # folder the image paths are relative to, relative to the table
    negative_column: str | None = None  # caption sets: a row's negative captions (string or list)
    image_columns: tuple[str, ...] = ()    # caption sets in paired rows (Winoground): image j ...
    caption_columns: tuple[str, ...] = ()  # ... is described by caption j
    candidate_column: str | None = None    # caption sets of one text vs candidate images (WinoGAViL): image paths (list)
    association_column: str | None = None  # ... the candidates the row's text (caption_column) describes (list)
    caption_prompt: str | None = None      # caption sets: a CAPTION_PROMPTS name applied to every text [none]


@register_format
class TableFormat(SourceFormat):
    type = "table"
    options_class = TableOptions

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        return self.read(spec, role, self.require_local(spec, role, data_root), spec.source.options)

    @staticmethod
    def read(spec: "DatasetSpec", role: str, root: Path, options: TableOptions) -> Samples:
        """The split (a table file under ``root``) as labels or captions (also used for generated data)."""
        if spec.has_caption_sets:
            return load_caption_set_table(root / str(spec.split(role)), options)
        return load_table(
            root / str(spec.split(role)),
            image_column=options.image_column,
            label_column=None if spec.is_retrieval else options.label_column,
            caption_column=options.caption_column if spec.is_retrieval else None,
            num_classes=spec.num_classes,
            multilabel=spec.multilabel,
        )


def _read_rows(path: Path) -> list[dict]:
    return _read_keyed_rows(path)[0]


def _read_keyed_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a table file and their ids: a keyed ``.json`` object's keys, else row numbers."""
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            whole = None  # JSON lines under a .json name
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
            return list(whole.values()), [str(k) for k in whole]
    rows = _read_plain_rows(path)
    return rows, [str(i) for i in range(len(rows))]


def _read_plain_rows(path: Path) -> list[dict]:
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ClipbenchError(f"{path}:{line_no}: not valid JSON ({exc}).") from None
        return rows
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    raise ClipbenchError(f"Unsupported table format {path.suffix} for {path}: use .csv, .tsv or .jsonl.")


def load_table(
    table: Path,
    *,
    image_column: str,
    label_column: str | None,
    caption_column: str | None,
    num_classes: int | None,
    multilabel: bool,
) -> Samples:
    """Load a classification (``label_column``) or retrieval (``caption_column``) table.

    Multi-label tables hold a list of class indices per row (a JSON list in a CSV cell); targets are
    then an (N, num_classes) 0/1 matrix.
    """
    if not table.is_file():
        raise ClipbenchError(f"Table file {table} does not exist.")
    rows = _read_rows(table)
    if not rows:
        raise ClipbenchError(f"Table {table} has no rows.")
    columns = set(rows[0])
    needed = [image_column, label_column or caption_column]
    missing = [c for c in needed if c and c not in columns]
    if missing or not (label_column or caption_column):
        raise ClipbenchError(
            f"Table {table} lacks column(s) {missing or ['label_column/caption_column']}; it has "
            f"{sorted(columns)}. Set source.image_column and source.label_column (classification) "
            "or source.caption_column (retrieval) in the spec."
        )
    base = table.parent
    if caption_column:
        order: dict[str, list[str]] = {}
        for row in rows:
            order.setdefault(str(row[image_column]), []).extend(text_list(row[caption_column]))
        names = list(order)
        return Samples(
            load_image=(loader := FileImageLoader([base / n for n in names])),
            load_bytes=loader.read_bytes,
            size=len(names),
            captions=[order[n] for n in names],
            ids=names,
            description=f"table {table}",
            fingerprint=FileStats([base / n for n in names], relative_to=base),
        )
    names = [str(row[image_column]) for row in rows]
    try:
        if multilabel:
            if num_classes is None:
                raise ClipbenchError(f"{table}: a multi-label table needs the spec's num_classes.")
            labels = np.zeros((len(rows), num_classes), dtype=np.uint8)
            for i, row in enumerate(rows):
                value = row[label_column]
                indices = json.loads(value) if isinstance(value, str) else value
                labels[i, [int(v) for v in indices]] = 1
        else:
            labels = np.asarray([int(row[label_column]) for row in rows], dtype=np.int64)
    except (TypeError, ValueError, IndexError):
        kind = "lists of class indices" if multilabel else "integer class indices"
        raise ClipbenchError(f"Column '{label_column}' of {table} must hold {kind} below num_classes.") from None
    return Samples(
        load_image=(loader := FileImageLoader([base / n for n in names])),
        load_bytes=loader.read_bytes,
        size=len(names),
        targets=labels,
        ids=names,
        description=f"table {table}",
        fingerprint=FileStats([base / n for n in names], relative_to=base),
    )


def load_caption_set_table(table: Path, options: TableOptions) -> Samples:
    """A caption-set table (module docstring): a sample per row, or per image of a paired row."""
    if not table.is_file():
        raise ClipbenchError(f"Table file {table} does not exist.")
    rows, row_ids = _read_keyed_rows(table)
    if not rows:
        raise ClipbenchError(f"Table {table} has no rows.")
    where = f"Table {table}"
    laid = caption_set_rows(rows, row_ids, image_column=options.image_column,
                            caption_column=options.caption_column, negative_column=options.negative_column,
                            image_columns=options.image_columns, caption_columns=options.caption_columns,
                            where=where, candidates=candidate_columns(options, where),
                            prompt=caption_prompt(options.caption_prompt, where))
    base = table.parent / options.image_root
    paths = [base / str(rows[r][column] if j is None else text_list(rows[r][column])[j])
             for r, column, j in laid.images]
    return Samples(
        load_image=FileImageLoader(paths),
        size=len(paths),
        captions=laid.captions,
        negatives=laid.negatives,
        examples=laid.examples,
        ids=laid.ids,
        description=f"table {table}",
        fingerprint=FileStats(sorted(set(paths)), relative_to=base),
    )
