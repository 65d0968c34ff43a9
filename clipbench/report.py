"""Tables of clipbench results against the CLIP paper (Radford et al. 2021) and its baselines.

Result records (JSON, see docs/architecture.md) and clip_benchmark result files are read into one
DataFrame (`load_records`), turned into model × dataset tables (`report_tables`) and rendered as
markdown, CSV, LaTeX or HTML (`build_report`). The paper's numbers are data under
`reference/` (shipped as `clipbench.reference`), never typed into code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
from tabulate import tabulate

from clipbench.errors import ClipbenchError
from clipbench.paths import reference_dir

log = logging.getLogger(__name__)

FORMATS = ("markdown", "csv", "latex", "html")
DEFAULT_BASELINE = "ResNet-50"  # Table 10's ImageNet-supervised ResNet-50 row, the baseline of Figure 5
CLASSIFICATION_TASKS = ("zeroshot", "linear_probe")
TASK_TITLES = {
    "zeroshot": "Zero-shot",
    "linear_probe": "Linear probe",
    "few_shot": "Few-shot linear probe",
    "retrieval": "Zero-shot retrieval",
}

# open_clip model name (pretrained tag `openai`) -> the model id of Table 11 (zero_shot.csv);
# Table 10 (linear_probe.csv) prefixes the same ids with "CLIP-".
PAPER_MODELS = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B-32": "ViT-B/32",
    "ViT-B-16": "ViT-B/16",
    "ViT-L-14": "ViT-L/14",
    "ViT-L-14-336": "ViT-L/14@336px",
}
# Table 13 has one CLIP row; "CLIP" there means ViT-L/14@336px.
PAPER_RETRIEVAL_ROWS = {"ViT-L/14@336px": "CLIP (ViT-L/14@336px)"}

# clip_benchmark names -> clipbench names.
CLIP_BENCHMARK_TASKS = {
    "zeroshot_classification": "zeroshot",
    "linear_probe": "linear_probe",
    "zeroshot_retrieval": "retrieval",
}
CLIP_BENCHMARK_DATASETS = {
    "imagenet1k": "imagenet",
    "cars": "stanford_cars",
    "pets": "oxford_pets",
    "flowers": "flowers102",
    "clevr_count_all": "clevr_counts",
    "kitti_closest_vehicle_distance": "kitti_distance",
    "imagenet-a": "imagenet_a",
    "imagenet-r": "imagenet_r",
    "renderedsst2": "rendered_sst2",
    "mscoco_captions": "mscoco",
}
# In clip_benchmark, "image retrieval" ranks images per caption (text→image) and "text retrieval"
# ranks captions per image (image→text); see clip_benchmark/metrics/zeroshot_retrieval.py.
_CLIP_BENCHMARK_METRICS = {"acc1": "accuracy", "acc5": "top5_accuracy"}
_CLIP_BENCHMARK_RECALL = re.compile(r"^(image|text)_retrieval_recall@(\d+)$")
_RECALL = re.compile(r"^(text_to_image|image_to_text)_R@(\d+)$")

_FRAME_COLUMNS = [
    "model", "pretrained", "dataset", "task", "primary_metric", "value", "ci_low", "ci_high",
    "n_samples", "k", "std", "metrics", "origin", "source",
]


# --------------------------------------------------------------------------- reference data


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
        match = _RECALL.match(metric)
        if row_id is None or match is None:
            return None
        # Table 13: "text retrieval" = image→text, "image retrieval" = text→image.
        prefix = "text" if match.group(1) == "image_to_text" else "image"
        column = f"{prefix}_{dataset_key}_R@{match.group(2)}"
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


# --------------------------------------------------------------------------- dataset metadata


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


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _paper_column_aliases() -> dict[str, str]:
    """Normalized spelling -> paper column: the columns themselves and Figure 5's labels."""
    figure5 = load_reference("zero_shot_vs_rn50_probe")
    aliases = {_normalize(label): column for column, label in zip(figure5["dataset"], figure5["figure5_label"])}
    aliases.update({_normalize(column): column for column in figure5["dataset"]})
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
    column = _paper_column_aliases().get(_normalize(name))
    return DatasetInfo(name=name, paper_name=column, groups=("paper",) if column else ())


# --------------------------------------------------------------------------- records


def _is_clipbench_record(obj: Any) -> bool:
    return isinstance(obj, dict) and {"model", "dataset", "task", "metrics"} <= obj.keys() and (
        "schema_version" in obj or "primary_metric" in obj
    )


def _is_clip_benchmark_result(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and {"model", "pretrained", "dataset", "task", "metrics"} <= obj.keys()
        and obj["task"] in CLIP_BENCHMARK_TASKS
        and isinstance(obj["metrics"], dict)
    )


def clip_benchmark_dataset(name: str) -> str:
    """clipbench dataset name of a clip_benchmark one (`wds/vtab/eurosat` -> `eurosat`, `imagenet1k` -> `imagenet`)."""
    short = name
    for prefix in ("wds/", "vtab/"):
        short = short[len(prefix):] if short.startswith(prefix) else short
    short = short.replace("/", "_")
    return CLIP_BENCHMARK_DATASETS.get(short, short)


def from_clip_benchmark(obj: Mapping[str, Any], datasets: DatasetLookup | None = None) -> dict[str, Any]:
    """Convert a clip_benchmark result (`dataset`, `model`, `pretrained`, `task`, `metrics`) to a record dict.

    Metric names become clipbench's (`acc1` -> `accuracy`, `image_retrieval_recall@5` ->
    `text_to_image_R@5`); the primary metric is the dataset's (from its metadata) when present.
    """
    metrics: dict[str, float] = {}
    for key, value in obj["metrics"].items():
        recall = _CLIP_BENCHMARK_RECALL.match(key)
        if recall:
            direction = "text_to_image" if recall.group(1) == "image" else "image_to_text"
            metrics[f"{direction}_R@{recall.group(2)}"] = value
        else:
            metrics[_CLIP_BENCHMARK_METRICS.get(key, key)] = value
    task = CLIP_BENCHMARK_TASKS[obj["task"]]
    dataset = clip_benchmark_dataset(str(obj["dataset"]))
    wanted = dataset_info(dataset, datasets).primary_metric
    if wanted in metrics:
        primary = wanted
    elif task == "retrieval":
        recalls = sorted((int(m.group(2)), key) for key in metrics if (m := _RECALL.match(key)))
        primary = recalls[0][1] if recalls else next(iter(metrics), None)
    else:
        primary = "accuracy" if "accuracy" in metrics else next(iter(metrics), None)
    return {
        "model": obj["model"],
        "pretrained": obj["pretrained"],
        "dataset": dataset,
        "task": task,
        "metrics": metrics,
        "primary_metric": primary,
        "details": {},
    }


def records_frame(
    records: Iterable[Mapping[str, Any]],
    sources: Sequence[str] | None = None,
    origins: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per record (few-shot records: one row per k) with the columns of `load_records`."""
    rows: list[dict[str, Any]] = []
    records = list(records)
    sources = list(sources) if sources is not None else [""] * len(records)
    origins = list(origins) if origins is not None else ["clipbench"] * len(records)
    for record, source, origin in zip(records, sources, origins):
        metric = record.get("primary_metric")
        metrics = dict(record.get("metrics") or {})
        ci = (record.get("confidence_intervals") or {}).get(metric) or (None, None)
        base = {
            "model": record["model"],
            "pretrained": record.get("pretrained") or "",
            "dataset": record["dataset"],
            "task": record["task"],
            "primary_metric": metric,
            "value": metrics.get(metric, math.nan),
            "ci_low": ci[0] if ci[0] is not None else math.nan,
            "ci_high": ci[1] if ci[1] is not None else math.nan,
            "n_samples": record.get("n_samples"),
            "k": pd.NA,
            "std": math.nan,
            "metrics": metrics,
            "origin": origin,
            "source": source,
        }
        shots = (record.get("details") or {}).get("k") if record["task"] == "few_shot" else None
        if shots:
            for k, stats in sorted(shots.items(), key=lambda item: int(item[0])):
                rows.append({**base, "k": int(k), "value": stats["mean"], "std": stats.get("std", math.nan),
                             "ci_low": math.nan, "ci_high": math.nan})
        else:
            rows.append(base)
    frame = pd.DataFrame(rows, columns=_FRAME_COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def _record_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ClipbenchError(
            f"Results path {path} does not exist. Pass the --output directory of `clipbench run` "
            "(or a clip_benchmark results directory, or a single result JSON file)."
        )
    return sorted(p for p in path.rglob("*.json") if not p.name.endswith(".per_class.json"))


def load_records(paths: Sequence[Path], datasets: DatasetLookup | None = None) -> pd.DataFrame:
    """Read every result record found (recursively) under `paths` into a DataFrame.

    Accepts clipbench records and clip_benchmark result files; `*.per_class.json` sidecars are
    skipped, other JSON files are skipped with a warning. Columns: model, pretrained, dataset, task,
    primary_metric, value (fraction), ci_low, ci_high, n_samples, k (few-shot shots per class, one row
    per k; <NA> otherwise), std (few-shot std over seeds), metrics (dict), origin, source (file path).
    When two files hold the same model × pretrained × dataset × task, the later path wins (warned).
    """
    records, sources, origins = [], [], []
    for root in paths:
        for path in _record_files(Path(root)):
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("Skipping %s: not valid JSON (%s)", path, exc)
                continue
            if _is_clipbench_record(obj):
                records.append(obj)
                origins.append("clipbench")
            elif _is_clip_benchmark_result(obj):
                records.append(from_clip_benchmark(obj, datasets))
                origins.append("clip_benchmark")
            else:
                log.warning("Skipping %s: not a clipbench or clip_benchmark result record", path)
                continue
            sources.append(str(path))
    frame = records_frame(records, sources, origins)
    key = ["model", "pretrained", "dataset", "task", "k"]
    duplicated = frame.duplicated(subset=key, keep="last")
    for _, row in frame[duplicated].iterrows():
        log.warning("Ignoring %s: a later file has the same %s result", row["source"],
                    "/".join(str(row[c]) for c in key[:4]))
    return frame[~duplicated].reset_index(drop=True)


# --------------------------------------------------------------------------- tables


@dataclass
class ReportTable:
    """One table of the report.

    `frame` has label columns `model` and `row`, then value columns. Columns in `percent_columns`
    hold fractions (rendered as percent, one decimal; rows named `diff ...` with a sign);
    `ci_low`/`ci_high`/`std` (same shape as `frame`, or None) hold the matching interval bounds and
    standard deviations. Other value columns are rendered as they are (counts, shots per class).
    """

    title: str
    task: str
    frame: pd.DataFrame
    percent_columns: list[str]
    notes: list[str] = field(default_factory=list)
    ci_low: pd.DataFrame | None = None
    ci_high: pd.DataFrame | None = None
    std: pd.DataFrame | None = None


def _model_label(model: str, pretrained: str) -> str:
    return f"{model} ({pretrained})" if pretrained else model


def _ordered_datasets(names: Iterable[str], infos: Mapping[str, DatasetInfo], paper: list[str]) -> list[str]:
    """Dataset names ordered as the paper's columns, datasets outside the paper after, alphabetically."""
    def key(name: str) -> tuple[int, int | str]:
        column = infos[name].paper_name
        return (0, paper.index(column)) if column in paper else (1, infos[name].label.lower())
    return sorted(set(names), key=key)


def _means(values: pd.Series, columns_by_group: Mapping[str, list[str]]) -> dict[str, float]:
    return {group: float(values[cols].mean()) if values[cols].notna().any() else math.nan
            for group, cols in columns_by_group.items()}


def _mean_columns(infos: Sequence[DatasetInfo], paper: list[str]) -> dict[str, list[str]]:
    """Mean column name -> dataset labels averaged: the paper's datasets present, then each other group."""
    groups: dict[str, list[str]] = {"mean (paper datasets)": [i.label for i in infos if i.paper_name in paper]}
    for info in infos:
        for group in info.groups:
            if group != "paper":
                groups.setdefault(f"mean ({group})", []).append(info.label)
    return {name: cols for name, cols in groups.items() if cols}


def _score_table(sub: pd.DataFrame, task: str, infos: Mapping[str, DatasetInfo], ref: PaperReference) -> ReportTable:
    names = _ordered_datasets(sub["dataset"], infos, ref.datasets)
    labels = [infos[n].label for n in names]
    means = _mean_columns([infos[n] for n in names], ref.datasets)
    rows, lows, highs = [], [], []
    paper_rows = 0
    for (model, pretrained), group in sub.groupby(["model", "pretrained"], sort=True):
        label = _model_label(model, pretrained)
        by_label = group.assign(label=[infos[d].label for d in group["dataset"]]).set_index("label")
        ours = by_label["value"].reindex(labels).astype(float)
        rows.append({"model": label, "row": "ours", **ours.to_dict(), **_means(ours, means)})
        lows.append(by_label["ci_low"].reindex(labels).astype(float).to_dict())
        highs.append(by_label["ci_high"].reindex(labels).astype(float).to_dict())
        model_id = paper_model(model, pretrained)
        paper_row = ref.classification_row(task, model_id) if model_id else None
        if paper_row is None:
            continue
        paper_rows += 1
        theirs = pd.Series({lab: paper_row.get(lab, math.nan) if pd.notna(ours[lab]) else math.nan
                            for lab in labels}, dtype=float)
        ours_means = _means(ours, means)
        # A paper mean is comparable only over the same datasets as ours: all of them in the paper.
        paper_means = {g: float(theirs[c].mean()) if theirs[c].notna().sum() == ours[c].notna().sum() > 0
                       else math.nan for g, c in means.items()}
        rows.append({"model": label, "row": "paper", **theirs.to_dict(), **paper_means})
        rows.append({"model": label, "row": "diff vs paper", **(ours - theirs).to_dict(),
                     **{g: ours_means[g] - paper_means[g] for g in means}})
        lows.extend([{}, {}])
        highs.extend([{}, {}])
    columns = ["model", "row", *labels, *means]
    frame = pd.DataFrame(rows, columns=columns)
    notes = [f"Primary metric per dataset, percent. {len(names)} datasets."]
    if paper_rows:
        table_name = "Table 11" if task == "zeroshot" else "Table 10"
        notes.append(f"paper: Radford et al. 2021 (arXiv:2103.00020v1) {table_name}; diff = ours - paper.")
    ci_low = pd.DataFrame(lows, columns=columns).reindex(frame.index)
    ci_high = pd.DataFrame(highs, columns=columns).reindex(frame.index)
    has_ci = ci_low[labels].notna().to_numpy().any()
    if has_ci:
        notes.append("[low, high]: confidence interval of our value, as recorded.")
    return ReportTable(
        title=TASK_TITLES[task],
        task=task,
        frame=frame,
        percent_columns=[*labels, *means],
        notes=notes,
        ci_low=ci_low if has_ci else None,
        ci_high=ci_high if has_ci else None,
    )


def baseline_differences(values: pd.Series, baseline: pd.Series) -> pd.Series:
    """Per-dataset difference `values - baseline` over the datasets both have (fractions), as in Figure 5."""
    common = [c for c in values.index if c in baseline.index and pd.notna(values[c]) and pd.notna(baseline[c])]
    return (values[common].astype(float) - baseline[common].astype(float)).rename("difference")


def _baseline_table(sub: pd.DataFrame, task: str, infos: Mapping[str, DatasetInfo], ref: PaperReference,
                    baseline: str) -> ReportTable | None:
    row_id, base = ref.baseline_row(baseline)
    names = [n for n in _ordered_datasets(sub["dataset"], infos, ref.datasets) if infos[n].paper_name in ref.datasets]
    if not names:
        return None
    labels = [infos[n].label for n in names]
    rows = [{"model": f"{row_id} (paper, Table 10)", "row": "baseline", **base[labels].to_dict()}]
    for (model, pretrained), group in sub.groupby(["model", "pretrained"], sort=True):
        ours = pd.Series({infos[d].label: v for d, v in zip(group["dataset"], group["value"])}, dtype=float)
        diff = baseline_differences(ours.reindex(labels), base)
        rows.append({"model": _model_label(model, pretrained), "row": f"diff vs {row_id}", **diff.to_dict(),
                     "wins": int((diff > 0).sum()), "datasets": int(diff.size)})
    frame = pd.DataFrame(rows, columns=["model", "row", *labels, "wins", "datasets"])
    frame[["wins", "datasets"]] = frame[["wins", "datasets"]].astype("Int64")
    return ReportTable(
        title=f"{TASK_TITLES[task]} vs baseline {row_id}",
        task=task,
        frame=frame,
        percent_columns=labels,
        notes=[f"baseline: linear probe {row_id!r}, paper Table 10 (reference/linear_probe.csv); "
               "diff = ours - baseline, as in the paper's Figure 5; wins = datasets with diff > 0."],
    )


def crossing_k(ks: Sequence[float], means: Sequence[float], zero_shot: float) -> float | None:
    """Shots per class at which a few-shot probe reaches zero-shot performance, or None if it never does.

    `ks` ascending, `means` the few-shot scores at each k (same units as `zero_shot`). Between the
    last k below zero-shot and the first at or above it, k is interpolated linearly in log(k), as the
    paper does for Figure 7; when the smallest k already matches zero-shot, that k is returned.
    """
    for i, (k, mean) in enumerate(zip(ks, means)):
        if mean >= zero_shot:
            if i == 0:
                return float(k)
            k0, m0 = ks[i - 1], means[i - 1]
            fraction = (zero_shot - m0) / (mean - m0)
            return float(math.exp(math.log(k0) + fraction * (math.log(k) - math.log(k0))))
    return None


def _few_shot_tables(df: pd.DataFrame, infos: Mapping[str, DatasetInfo], ref: PaperReference) -> list[ReportTable]:
    few = df[df["task"] == "few_shot"]
    if few.empty:
        return []
    names = _ordered_datasets(few["dataset"], infos, ref.datasets)
    labels = [infos[n].label for n in names]
    zs = df[df["task"] == "zeroshot"]
    rows, stds, crossings = [], [], []
    for (model, pretrained), group in few.groupby(["model", "pretrained"], sort=True):
        label = _model_label(model, pretrained)
        zero = zs[(zs["model"] == model) & (zs["pretrained"] == pretrained)]
        zero_by_label = {infos[d].label: v for d, v in zip(zero["dataset"], zero["value"])}
        if zero_by_label:
            rows.append({"model": label, "row": "zero-shot",
                         **{lab: zero_by_label.get(lab, math.nan) for lab in labels}})
            stds.append({})
        crossing = {"model": label, "row": "k to match zero-shot"}
        for k, at_k in group.groupby("k", sort=True):
            at_labels = [infos[d].label for d in at_k["dataset"]]
            rows.append({"model": label, "row": f"k={k}", **dict(zip(at_labels, at_k["value"]))})
            stds.append(dict(zip(at_labels, at_k["std"])))
        for name, curve in group.groupby("dataset"):
            zero_value = zero_by_label.get(infos[name].label)
            if zero_value is not None:
                curve = curve.sort_values("k")
                crossing[infos[name].label] = crossing_k(list(curve["k"]), list(curve["value"]), zero_value)
        if zero_by_label:
            crossings.append(crossing)
    columns = ["model", "row", *labels]
    frame = pd.DataFrame(rows, columns=columns)
    tables = [ReportTable(
        title=TASK_TITLES["few_shot"], task="few_shot", frame=frame, percent_columns=labels,
        std=pd.DataFrame(stds, columns=columns).reindex(frame.index),
        notes=["mean ± std over seeds of the primary metric, percent; zero-shot row from the zeroshot records."],
    )]
    if crossings:
        tables.append(ReportTable(
            title="Few-shot vs zero-shot crossing", task="few_shot",
            frame=pd.DataFrame(crossings, columns=columns).astype({lab: float for lab in labels}),
            percent_columns=[],
            notes=["labelled examples per class at which the few-shot probe reaches zero-shot, interpolated "
                   "log-linearly between evaluated k (paper Figure 7); empty: never reached."],
        ))
    return tables


def _retrieval_key(info: DatasetInfo) -> str | None:
    name = _normalize(info.paper_name or info.name)
    if "flickr30k" in name:
        return "flickr30k"
    if "coco" in name:
        return "mscoco5k"
    return None


def _retrieval_table(df: pd.DataFrame, infos: Mapping[str, DatasetInfo], ref: PaperReference) -> ReportTable | None:
    sub = df[df["task"] == "retrieval"]
    if sub.empty:
        return None
    names = _ordered_datasets(sub["dataset"], infos, ref.datasets)
    metrics: dict[str, set[str]] = {n: set() for n in names}
    for name, record_metrics in zip(sub["dataset"], sub["metrics"]):
        metrics[name] |= {m for m in record_metrics if _RECALL.match(m)}

    def order(metric: str) -> tuple[int, int]:
        match = _RECALL.match(metric)
        return (0 if match.group(1) == "image_to_text" else 1, int(match.group(2)))

    columns = [(n, m) for n in names for m in sorted(metrics[n], key=order)]
    labels = [f"{infos[n].label} {m}" for n, m in columns]
    rows = []
    for (model, pretrained), group in sub.groupby(["model", "pretrained"], sort=True):
        label = _model_label(model, pretrained)
        by_name = dict(zip(group["dataset"], group["metrics"]))
        ours = pd.Series([by_name.get(n, {}).get(m, math.nan) for n, m in columns], index=labels, dtype=float)
        rows.append({"model": label, "row": "ours", **ours.to_dict()})
        model_id = paper_model(model, pretrained)
        if model_id is None:
            continue
        theirs = pd.Series(
            [ref.retrieval_value(model_id, key, m) if (key := _retrieval_key(infos[n])) else None for n, m in columns],
            index=labels, dtype=float).where(ours.notna())
        if theirs.notna().any():
            rows.append({"model": label, "row": "paper", **theirs.to_dict()})
            rows.append({"model": label, "row": "diff vs paper", **(ours - theirs).to_dict()})
    return ReportTable(
        title=TASK_TITLES["retrieval"], task="retrieval",
        frame=pd.DataFrame(rows, columns=["model", "row", *labels]), percent_columns=labels,
        notes=["recall@k, percent; image_to_text = text retrieval, text_to_image = image retrieval; "
               "paper: Table 13 (CLIP = ViT-L/14@336px), Flickr30k 1k and MSCOCO 5k test sets."],
    )


def _dataset_infos(names: Iterable[str], datasets: DatasetLookup | None) -> dict[str, DatasetInfo]:
    """Metadata per dataset name; when several names claim one paper column, the first keeps it."""
    infos: dict[str, DatasetInfo] = {}
    claimed: dict[str, str] = {}
    for name in sorted(set(names)):
        info = dataset_info(name, datasets)
        if info.paper_name is not None and info.paper_name in claimed:
            log.warning("Datasets %r and %r both map to the paper's %r; %r is reported under its own name",
                        claimed[info.paper_name], name, info.paper_name, name)
            info = DatasetInfo(info.name, None, info.primary_metric, info.groups, info.title)
        elif info.paper_name is not None:
            claimed[info.paper_name] = name
        infos[name] = info
    return infos


def report_tables(df: pd.DataFrame, baseline: str = DEFAULT_BASELINE,
                  datasets: DatasetLookup | None = None) -> list[ReportTable]:
    """All tables of the report for the records in `df` (the output of `load_records`).

    Per classification task: model × dataset scores (with the paper's and the difference for the
    paper's models) and the difference to `baseline` (a Table 10 row); few-shot mean ± std per k and
    the crossing with zero-shot; retrieval recall@k against Table 13.
    """
    ref = load_paper_reference()
    ref.baseline_row(baseline)  # fail early on an unknown baseline
    infos = _dataset_infos(df["dataset"], datasets)
    tables: list[ReportTable] = []
    for task in CLASSIFICATION_TASKS:
        sub = df[(df["task"] == task) & df["k"].isna()]
        if sub.empty:
            continue
        tables.append(_score_table(sub, task, infos, ref))
        table = _baseline_table(sub, task, infos, ref, baseline)
        if table is not None:
            tables.append(table)
    tables.extend(_few_shot_tables(df, infos, ref))
    retrieval = _retrieval_table(df, infos, ref)
    if retrieval is not None:
        tables.append(retrieval)
    return tables


# --------------------------------------------------------------------------- rendering


def _cell(value: Any, row: str, percent: bool, low: Any = None, high: Any = None, std: Any = None) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not percent:
        return f"{value:.1f}" if isinstance(value, float) else str(value)
    text = f"{100 * value:+.1f}" if row.startswith("diff") else f"{100 * value:.1f}"
    if std is not None and pd.notna(std):
        text += f" ± {100 * std:.1f}"
    if low is not None and high is not None and pd.notna(low) and pd.notna(high):
        text += f" [{100 * low:.1f}, {100 * high:.1f}]"
    return text


def _display_rows(table: ReportTable) -> list[list[str]]:
    rows = []
    for i, record in table.frame.iterrows():
        cells = [str(record["model"]), str(record["row"])]
        for column in table.frame.columns[2:]:
            extra = {
                name: getattr(table, name).at[i, column]
                for name in ("ci_low", "ci_high", "std")
                if getattr(table, name) is not None and column in getattr(table, name).columns
            }
            cells.append(_cell(record[column], str(record["row"]), column in table.percent_columns,
                               extra.get("ci_low"), extra.get("ci_high"), extra.get("std")))
        rows.append(cells)
    return rows


def _tidy(tables: Sequence[ReportTable]) -> pd.DataFrame:
    """All tables as one long frame: one row per table × model × row × column, raw values."""
    columns = ["table", "task", "model", "row", "column", "value", "ci_low", "ci_high", "std"]
    parts = []
    for table in tables:
        rows = []
        for i, record in table.frame.iterrows():
            for column in table.frame.columns[2:]:
                if pd.isna(record[column]):
                    continue
                extra = {name: getattr(table, name).at[i, column] if getattr(table, name) is not None else math.nan
                         for name in ("ci_low", "ci_high", "std")}
                rows.append({"table": table.title, "task": table.task, "model": record["model"], "row": record["row"],
                             "column": column, "value": record[column], **extra})
        parts.append(pd.DataFrame(rows, columns=columns))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def render_tables(tables: Sequence[ReportTable], fmt: str = "markdown") -> str:
    """Render tables as markdown, LaTeX or HTML (percent, one decimal) or CSV (one tidy table, fractions)."""
    if fmt not in FORMATS:
        raise ClipbenchError(f"Unknown report format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if fmt == "csv":
        # 10 significant digits: exact for recorded values, hides binary noise of percent / 100
        return _tidy(tables).to_csv(index=False, float_format="%.10g")
    tablefmt = {"markdown": "github", "latex": "latex_booktabs", "html": "html"}[fmt]
    parts = []
    for table in tables:
        body = tabulate(_display_rows(table), headers=list(table.frame.columns), tablefmt=tablefmt,
                        disable_numparse=True)
        notes = " ".join(table.notes)
        if fmt == "markdown":
            parts.append(f"## {table.title}\n\n{body}\n\n{notes}\n")
        elif fmt == "latex":
            parts.append(f"% {table.title}: {notes}\n{body}\n")
        else:
            parts.append(f"<h2>{table.title}</h2>\n{body}\n<p>{notes}</p>\n")
    return "\n".join(parts)


def build_report(df: pd.DataFrame, baseline: str = DEFAULT_BASELINE, fmt: str = "markdown",
                 datasets: DatasetLookup | None = None) -> str:
    """The full report of `df` (from `load_records`) in format `fmt` (markdown, csv, latex or html)."""
    if fmt not in FORMATS:
        raise ClipbenchError(f"Unknown report format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if df.empty:
        raise ClipbenchError("No result records to report. Run `clipbench run --output DIR` first and pass DIR.")
    return render_tables(report_tables(df, baseline, datasets), fmt)


def summary_table(records: list[dict], datasets: DatasetLookup | None = None) -> str:
    """Markdown table of freshly written records (for the end of `clipbench run`).

    Columns: model, pretrained, dataset, task, metric, value (percent, with its confidence interval),
    the paper's number and the difference when the paper evaluated that model on that dataset.
    """
    frame = records_frame(records)
    ref = load_paper_reference()
    rows = []
    for _, r in frame.iterrows():
        info = dataset_info(r["dataset"], datasets)
        model_id = paper_model(r["model"], r["pretrained"])
        paper = None
        if model_id is not None and r["task"] in CLASSIFICATION_TASKS:
            paper_row = ref.classification_row(r["task"], model_id)
            if paper_row is not None and info.paper_name in paper_row.index:
                paper = float(paper_row[info.paper_name])
        elif model_id is not None and r["task"] == "retrieval" and (key := _retrieval_key(info)):
            paper = ref.retrieval_value(model_id, key, str(r["primary_metric"]))
        metric = str(r["primary_metric"]) + (f" (k={r['k']})" if pd.notna(r["k"]) else "")
        rows.append([r["model"], r["pretrained"], r["dataset"], r["task"], metric,
                     _cell(r["value"], "", True, r["ci_low"], r["ci_high"], r["std"] if pd.notna(r["k"]) else None),
                     _cell(paper, "", True), _cell(r["value"] - paper if paper is not None else None, "diff", True)])
    headers = ["model", "pretrained", "dataset", "task", "metric", "value (%)", "paper (%)", "diff"]
    if rows and all(row[-2] == "" for row in rows):  # nothing the paper evaluated: no empty columns
        headers, rows = headers[:-2], [row[:-2] for row in rows]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


# --------------------------------------------------------------------------- plots and CLI


def write_plots(df: pd.DataFrame, out_dir: Path, baseline: str = DEFAULT_BASELINE,
                datasets: DatasetLookup | None = None) -> list[Any]:
    """Write the report's figures (PNG) to `out_dir`; returns the `clipbench.plots.Plot` of each.

    Per classification task and model: the Figure-5-style difference to `baseline`; per model with
    few-shot records: the few-shot curves with zero-shot lines; per task with several models: a
    per-dataset comparison.
    """
    from clipbench import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    ref = load_paper_reference()
    row_id, base = ref.baseline_row(baseline)
    infos = _dataset_infos(df["dataset"], datasets)
    written = []
    for task in CLASSIFICATION_TASKS:
        sub = df[(df["task"] == task) & df["k"].isna()]
        for (model, pretrained), group in sub.groupby(["model", "pretrained"], sort=True):
            ours = pd.Series({infos[d].label: v for d, v in zip(group["dataset"], group["value"])}, dtype=float)
            diff = baseline_differences(ours, base)
            if diff.empty:
                continue
            path = out_dir / _safe(f"{task}_vs_{row_id}__{model}__{pretrained}.png")
            written.append(plots.plot_baseline_differences(
                diff, path, title=f"{TASK_TITLES[task]} {_model_label(model, pretrained)} vs {row_id} linear probe",
                xlabel=f"{TASK_TITLES[task]} score - {row_id} linear probe (percentage points)"))
        if sub[["model", "pretrained"]].drop_duplicates().shape[0] > 1:
            wide = sub.assign(model_label=[_model_label(m, p) for m, p in zip(sub["model"], sub["pretrained"])],
                              label=[infos[d].label for d in sub["dataset"]])
            values = wide.pivot(index="label", columns="model_label", values="value")
            values = values.reindex([infos[n].label for n in _ordered_datasets(sub["dataset"], infos, ref.datasets)])
            path = out_dir / _safe(f"{task}_models.png")
            written.append(plots.plot_model_comparison(values, path, title=f"{TASK_TITLES[task]} by dataset"))
    few = df[df["task"] == "few_shot"]
    zs = df[df["task"] == "zeroshot"]
    for (model, pretrained), group in few.groupby(["model", "pretrained"], sort=True):
        labelled = group.assign(label=[infos[d].label for d in group["dataset"]])
        curves = labelled.pivot(index="k", columns="label", values="value").sort_index()
        stds = labelled.pivot(index="k", columns="label", values="std").sort_index()
        zero = zs[(zs["model"] == model) & (zs["pretrained"] == pretrained)]
        zero_shot = pd.Series({infos[d].label: v for d, v in zip(zero["dataset"], zero["value"])}, dtype=float)
        path = out_dir / _safe(f"few_shot__{model}__{pretrained}.png")
        written.append(plots.plot_few_shot(curves, path, zero_shot=zero_shot, std=stds,
                                           title=f"Few-shot linear probe, {_model_label(model, pretrained)}"))
    return written


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `clipbench report RESULTS_DIR ... [--format] [--out] [--plot] [--baseline]`; handler in `handler`."""
    parser = subparsers.add_parser(
        "report", help="tables of results against the CLIP paper and a baseline",
        description="Read result records (clipbench or clip_benchmark JSON) found under RESULTS_DIR and print "
                    "model x dataset tables beside the CLIP paper's numbers and a Table 10 baseline.")
    parser.add_argument("results_dirs", nargs="+", type=Path, metavar="RESULTS_DIR")
    parser.add_argument("--format", choices=FORMATS, default="markdown", dest="fmt")
    parser.add_argument("--out", type=Path, default=None, help="write the report to FILE instead of stdout")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR", help="also write PNG figures to DIR")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help="a model of the paper's Table 10 (default: %(default)s, ImageNet-supervised)")
    parser.set_defaults(handler=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Handler of `clipbench report`: print or write the report (and figures); returns the exit code."""
    frame = load_records(args.results_dirs)
    text = build_report(frame, baseline=args.baseline, fmt=args.fmt)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        log.info("Wrote %s", args.out)
    else:
        print(text)
    if args.plot is not None:
        for plot in write_plots(frame, args.plot, baseline=args.baseline):
            log.info("Wrote %s", plot.path)
    return 0
