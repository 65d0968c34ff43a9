"""open_clip's published zero-shot results (the DataComp evaluation) as a second reference.

The numbers are open_clip's own files, shipped unchanged under `reference/`
(`openclip_results.csv`: DataComp's main metric on its 38 tasks; `openclip_retrieval_results.csv`:
recall@k of Flickr and MSCOCO), from mlfoundations/open_clip at commit :data:`OPENCLIP_COMMIT`.
Which clipbench dataset and metric each column holds is data too (`reference/openclip_columns.csv`),
so a new dataset spec is one row there, never a code branch.

Protocol of these numbers (DataComp's `evaluate.py`): zero-shot, fp32 without autocast,
clip_benchmark's class names and templates, DataComp's metric per task (`tasklist.yml`
`main_metric`, default top-1 accuracy). That is not the paper's protocol in every respect, so a
comparison says which metric each side used and flags a mismatch (:class:`Comparison`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

from clipbench.errors import ClipbenchError
from clipbench.lazy import pandas as pd
from clipbench.paths import reference_dir
from clipbench.reference import OPENAI_ALIASES

OPENCLIP_REPOSITORY = "https://github.com/mlfoundations/open_clip"
OPENCLIP_COMMIT = "89fb801f1e6087880e951fc8354b8a2077b79c6d"
#: the mapping of open_clip's columns to clipbench datasets and metrics
COLUMNS_FILE = "openclip_columns.csv"
#: the file of DataComp's main metric per task; its columns fall back to a record's primary
#: metric (marked cross-protocol) when the record lacks the column's metric
MAIN_FILE = "openclip_results.csv"
#: precision DataComp evaluates at
OPENCLIP_PRECISION = "fp32"
#: one-line statement of the protocol, for report notes
OPENCLIP_PROTOCOL = (
    f"open_clip: published zero-shot results ({OPENCLIP_REPOSITORY} docs/, commit {OPENCLIP_COMMIT[:7]}), "
    "measured with the DataComp evaluation: fp32 without autocast, clip_benchmark's class names and "
    "templates, DataComp's metric per task (tasklist.yml)"
)
#: metrics a record may lack but that follow from metrics it has: name -> the values averaged
#: (DataComp's retrieval `mean_recall@1` is the mean of text and image retrieval R@1, retr_eval.py)
DERIVED_METRICS: dict[str, tuple[str, ...]] = {
    "mean_recall@1": ("image_to_text_R@1", "text_to_image_R@1"),
}


@dataclass(frozen=True)
class OpenClipColumn:
    """One value column of open_clip's files and what it holds.

    `dataset`/`metric` are clipbench's spec and metric names; `task` the clipbench task whose
    records it compares with (empty: any task of that dataset); `datacomp_task`/`datacomp_metric`
    DataComp's names (tasklist.yml, the metric keys of its evaluation).
    """

    file: str
    column: str
    dataset: str
    task: str
    metric: str
    datacomp_task: str
    datacomp_metric: str

    @property
    def main(self) -> bool:
        """True for DataComp's main metric of the task (a column of `openclip_results.csv`)."""
        return self.file == MAIN_FILE


def record_metric(metrics: Mapping[str, float], metric: str) -> float | None:
    """`metric` from a record's metrics, or derived from them (:data:`DERIVED_METRICS`); else None."""
    value = metrics.get(metric)
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    parts = DERIVED_METRICS.get(metric)
    if parts and all(metrics.get(p) is not None for p in parts):
        return sum(float(metrics[p]) for p in parts) / len(parts)
    return None


@dataclass(frozen=True)
class Comparison:
    """A record's value beside open_clip's published one (fractions).

    `ours_metric` is the metric of `ours`: the column's own metric when the record has it, else
    the record's primary metric, and then `cross_protocol` is True (different metrics).
    """

    column: OpenClipColumn
    published: float
    ours: float
    ours_metric: str

    @property
    def cross_protocol(self) -> bool:
        return self.ours_metric != self.column.metric

    @property
    def diff(self) -> float:
        return self.ours - self.published


def _read(name: str) -> pd.DataFrame:
    path = reference_dir() / name
    if not path.is_file():
        raise ClipbenchError(
            f"open_clip's reference file {path} is missing. It ships with clipbench (reference/ in the "
            "repository, clipbench/reference/ when installed); reinstall clipbench or restore that file."
        )
    return pd.read_csv(path, dtype={"name": str, "pretrained": str}, keep_default_na=False, na_values=[""])


@dataclass(frozen=True)
class OpenClipReference:
    """open_clip's result files (`tables`: file name -> frame, fractions as published) and the mapping."""

    tables: Mapping[str, pd.DataFrame]
    columns: tuple[OpenClipColumn, ...]

    @cached_property
    def _keys(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(lower-case name, lower-case tag) -> (name, tag) as open_clip spells them."""
        frame = self.tables[MAIN_FILE]
        return {(n.lower(), p.lower()): (n, p) for n, p in zip(frame["name"], frame["pretrained"])}

    def row_key(self, model: str, pretrained: str | None) -> tuple[str, str] | None:
        """open_clip's (name, pretrained) row for a record's model and tag, or None.

        Names match case-insensitively; OpenAI's names (`ViT-B/32`) are read as open_clip's
        (`ViT-B-32`). A local checkpoint or a random init has no row.
        """
        name = OPENAI_ALIASES.get(model, model)
        return self._keys.get((name.lower(), (pretrained or "").lower()))

    def columns_of(self, dataset: str, task: str) -> list[OpenClipColumn]:
        """The columns that hold `dataset` evaluated by `task` (columns with an empty task: any task)."""
        return [c for c in self.columns if c.dataset == dataset and c.task in (task, "")]

    def value(self, key: tuple[str, str], column: OpenClipColumn) -> float | None:
        """The published value (fraction) of column `column` in row `key` (from `row_key`), or None."""
        frame = self.tables[column.file]
        rows = frame[(frame["name"] == key[0]) & (frame["pretrained"] == key[1])]
        if rows.empty or pd.isna(rows[column.column].iloc[0]):
            return None
        return float(rows[column.column].iloc[0])

    def compare(self, key: tuple[str, str], column: OpenClipColumn, metrics: Mapping[str, float],
                primary_metric: str | None) -> Comparison | None:
        """A record's value (`metrics`, `primary_metric`) beside column `column` of row `key`, or None.

        The record's value of the column's metric when it has it; for DataComp's main metric
        (`column.main`) otherwise the record's primary metric, marked cross-protocol.
        """
        published = self.value(key, column)
        if published is None:
            return None
        ours = record_metric(metrics, column.metric)
        if ours is not None:
            return Comparison(column, published, ours, column.metric)
        if column.main and primary_metric and (ours := record_metric(metrics, primary_metric)) is not None:
            return Comparison(column, published, ours, primary_metric)
        return None


def load_openclip_reference() -> OpenClipReference:
    """Load open_clip's result files named by `reference/openclip_columns.csv`, with that mapping.

    Raises:
        ClipbenchError: a file is missing, or the mapping names a column its file lacks.
    """
    mapping = _read(COLUMNS_FILE).fillna("")
    columns = tuple(OpenClipColumn(**{k: str(v) for k, v in row.items()}) for row in mapping.to_dict("records"))
    tables = {name: _read(name) for name in sorted({c.file for c in columns} | {MAIN_FILE})}
    for column in columns:
        if column.column not in tables[column.file].columns:
            raise ClipbenchError(
                f"reference/{COLUMNS_FILE} maps column {column.column!r} of {column.file}, which that file "
                f"lacks. Correct the row in reference/{COLUMNS_FILE} to one of the file's columns."
            )
    return OpenClipReference(tables=tables, columns=columns)
