"""The CLIP paper's tables (Radford et al. 2021, arXiv:2103.00020v1) and how clipbench names map onto them.

The numbers are data under `reference/` at the top of a checkout (shipped as `clipbench.reference`),
never typed into code: Table 10 (linear probe), Table 11 (zero-shot), Table 13 (retrieval) and
Figure 5's labels. Models map to the tables' rows (`paper_model`), datasets to their columns
(`dataset_info`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping

from clipbench.errors import ClipbenchError
from clipbench.lazy import pandas as pd
from clipbench.metrics import parse_recall_metric
from clipbench.paths import reference_dir

log = logging.getLogger(__name__)

DEFAULT_BASELINE = "ResNet-50"  # Table 10's ImageNet-supervised ResNet-50 row, the baseline of Figure 5

#: OpenAI's model names (the ``clip`` package, and the paper's tables) -> open_clip architecture;
#: their pretrained tag is ``openai``.
OPENAI_ALIASES: dict[str, str] = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}
# open_clip model name (pretrained tag `openai`) -> the model id of Table 11 (zero_shot.csv);
# Table 10 (linear_probe.csv) prefixes the same ids with "CLIP-".
PAPER_MODELS = {arch: paper_id for paper_id, arch in OPENAI_ALIASES.items()}
# Table 13 has one CLIP row; "CLIP" there means ViT-L/14@336px.
PAPER_RETRIEVAL_ROWS = {"ViT-L/14@336px": "CLIP (ViT-L/14@336px)"}


def load_reference(table: str) -> pd.DataFrame:
    """Load one of the paper's tables: `zero_shot`, `linear_probe`, `zero_shot_vs_rn50_probe`, `retrieval`.

    Values are percentages as printed in the paper (not fractions).
    """
    path = reference_dir() / f"{table}.csv"
    if not path.is_file():
        raise ClipbenchError(
            f"The paper's reference table {path} is missing. It ships with clipbench (reference/ in the "
            "repository, clipbench/reference/ when installed); reinstall clipbench or restore that file."
        )
    return pd.read_csv(path)


@dataclass(frozen=True)
class PaperReference:
    """The paper's tables as loaded by `load_paper_reference` (percentages, as printed)."""

    zero_shot: pd.DataFrame
    linear_probe: pd.DataFrame
    retrieval: pd.DataFrame

    @property
    def datasets(self) -> list[str]:
        """The 27 dataset columns in the paper's order (Tables 10 and 11)."""
        return [c for c in self.zero_shot.columns if c not in ("model", "group", "paper_row_label")]

    def classification_row(self, task: str, paper_model_id: str) -> pd.Series | None:
        """Table 11 (zeroshot) or Table 10 (linear_probe) row of a CLIP model, as fractions."""
        if task == "zeroshot":
            table, row_id = self.zero_shot, paper_model_id
        elif task == "linear_probe":
            table, row_id = self.linear_probe, f"CLIP-{paper_model_id}"
        else:
            return None
        return _row(table, row_id)

    def baseline_row(self, name: str) -> tuple[str, pd.Series]:
        """Table 10 row `name` (case-insensitive `model` column), as fractions; returns (row id, values)."""
        matches = self.linear_probe[self.linear_probe["model"].str.lower() == name.lower()]
        if matches.empty:
            raise ClipbenchError(
                f"Unknown baseline {name!r}. The baseline is a row of the paper's Table 10 "
                f"(reference/linear_probe.csv); pass --baseline with one of: "
                f"{', '.join(self.linear_probe['model'])}."
            )
        row_id = str(matches["model"].iloc[0])
        return row_id, _row(self.linear_probe, row_id)

    def retrieval_value(self, paper_model_id: str, dataset_key: str, metric: str) -> float | None:
        """Table 13 zero-shot value (fraction) for a clipbench retrieval metric, or None."""
        row_id = PAPER_RETRIEVAL_ROWS.get(paper_model_id)
        parsed = parse_recall_metric(metric)
        if row_id is None or parsed is None:
            return None
        direction, k = parsed
        # Table 13: "text retrieval" = image→text, "image retrieval" = text→image.
        prefix = "text" if direction == "image_to_text" else "image"
        column = f"{prefix}_{dataset_key}_R@{k}"
        rows = self.retrieval[(self.retrieval["model"] == row_id) & (self.retrieval["setting"] == "zero-shot")]
        if rows.empty or column not in rows.columns or pd.isna(rows[column].iloc[0]):
            return None
        return float(rows[column].iloc[0]) / 100.0


def _row(table: pd.DataFrame, row_id: str) -> pd.Series | None:
    rows = table[table["model"] == row_id]
    if rows.empty:
        return None
    values = rows.iloc[0].drop(labels=["model", "group", "paper_row_label"])
    return values.astype(float) / 100.0


def load_paper_reference() -> PaperReference:
    """Load Tables 10, 11 and 13 of the paper."""
    return PaperReference(
        zero_shot=load_reference("zero_shot"),
        linear_probe=load_reference("linear_probe"),
        retrieval=load_reference("retrieval"),
    )


def paper_model(model: str, pretrained: str | None) -> str | None:
    """The paper's model id (Table 11 spelling, e.g. `ViT-B/32`) of an open_clip model, or None.

    Only OpenAI's weights are the paper's models; `ViT-B/32`-style names are accepted as given.
    """
    if (pretrained or "").lower() != "openai":
        return None
    if model in PAPER_MODELS:
        return PAPER_MODELS[model]
    return model if model in PAPER_MODELS.values() else None



@dataclass(frozen=True)
class DatasetInfo:
    """What the report needs to know about a dataset.

    `paper_name` is the dataset's column in the paper's tables (e.g. `Food101`) or None;
    `groups` are free-form group names (`paper` = the paper's 27).
    """

    name: str
    paper_name: str | None = None
    primary_metric: str | None = None
    groups: tuple[str, ...] = ()
    title: str | None = None

    @property
    def label(self) -> str:
        """Column header: the paper's name where there is one, else the dataset name."""
        return self.paper_name or self.name


DatasetLookup = Mapping[str, DatasetInfo]


def normalized_name(name: str) -> str:
    """Lower case without punctuation, so that `Stanford-Cars` and `stanford_cars` meet."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _paper_column_aliases() -> dict[str, str]:
    """Normalized spelling -> paper column: the columns themselves and Figure 5's labels."""
    figure5 = load_reference("zero_shot_vs_rn50_probe")
    aliases = {normalized_name(label): column for column, label in zip(figure5["dataset"], figure5["figure5_label"])}
    aliases.update({normalized_name(column): column for column in figure5["dataset"]})
    return aliases


def _spec_info(name: str) -> DatasetInfo | None:
    try:
        from clipbench.specs import find_spec
    except ImportError:  # specs are optional for reading results
        return None
    try:
        spec = find_spec(name)
    except ClipbenchError as exc:  # a broken spec must not stop a report over finished results
        log.warning("Ignoring the dataset spec of %r: %s", name, exc)
        return None
    if spec is None:
        return None
    return DatasetInfo(
        name=spec.name,
        paper_name=getattr(spec, "paper_name", None),
        primary_metric=getattr(spec, "primary_metric", None),
        groups=tuple(getattr(spec, "groups", ()) or ()),
        title=getattr(spec, "title", None),
    )


def dataset_info(name: str, datasets: DatasetLookup | None = None) -> DatasetInfo:
    """Metadata of dataset `name`: from `datasets` when given, else from clipbench's dataset specs.

    When neither knows the dataset, its name is matched case-insensitively (ignoring punctuation)
    against the paper's columns and Figure 5's labels, so `stanford_cars` finds `StanfordCars`.
    """
    info = datasets.get(name) if datasets is not None else _spec_info(name)
    if info is not None:
        return info
    column = _paper_column_aliases().get(normalized_name(name))
    return DatasetInfo(name=name, paper_name=column, groups=("paper",) if column else ())

