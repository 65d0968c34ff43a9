"""Tables of clipbench results against the CLIP paper (Radford et al. 2021), its baselines and
open_clip's published DataComp results.

Records read by `clipbench.results.load_records` become model × dataset tables (`report_tables`)
beside the paper's numbers (`clipbench.reference`) and open_clip's (`clipbench.openclip_reference`),
rendered by `clipbench.render` (`build_report`),
and figures drawn by `clipbench.plots` (`write_plots`). `register_cli` adds `clipbench report`.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tabulate import tabulate

from clipbench.datacomp import datacomp_table
from clipbench.errors import ClipbenchError
from clipbench.lazy import pandas as pd
from clipbench.metrics import parse_recall_metric
from clipbench.openclip_reference import (
    OPENCLIP_PRECISION,
    OPENCLIP_PROTOCOL,
    Comparison,
    OpenClipReference,
    load_openclip_reference,
)
from clipbench.reference import (
    DEFAULT_BASELINE,
    DatasetInfo,
    DatasetLookup,
    PaperReference,
    dataset_info,
    load_paper_reference,
    normalized_name,
    paper_model,
)
from clipbench.render import (
    CROSS_PROTOCOL_MARK,
    FORMATS,
    SKIPPED_MARK,
    ReportTable,
    check_format,
    format_cell,
    render_tables,
)
from clipbench.results import load_records, records_frame, safe_name
from clipbench.tasks import CAPTION_SET_METRICS

log = logging.getLogger(__name__)

CLASSIFICATION_TASKS = ("zeroshot", "linear_probe")
#: the paper's protocol per task, for the notes of tables beside its numbers
PAPER_PROTOCOLS = {
    "zeroshot": "prompt ensembles, the paper's metric per dataset (Table 9)",
    "linear_probe": "L-BFGS logistic regression on image features (Appendix A.3), the paper's metric per "
                    "dataset (Table 9)",
}
#: caption-set tasks: one table each of the primary metric per dataset and the group means
#: (SugarCrepe's mean over its seven subsets is the ``mean (sugar_crepe)`` column)
SELECTION_TASKS = tuple(CAPTION_SET_METRICS)


def task_title(name: str) -> str:
    """How reports name a task: its registered title (a task no longer registered: its name)."""
    from clipbench.tasks import get_task

    try:
        return get_task(name).title
    except KeyError:
        return name


# --------------------------------------------------------------------------- tables


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


def skipped_note(counts: Mapping[str, int]) -> str | None:
    """The footnote of values computed with unreadable images skipped (``counts``: label -> n)."""
    shown = {label: n for label, n in counts.items() if n}
    if not shown:
        return None
    listed = ", ".join(f"{label} {n}" for label, n in shown.items())
    return (f"{SKIPPED_MARK}: n images skipped as unreadable (--on-bad-image skip; the records list "
            f"them): {listed}.")


def _score_table(sub: pd.DataFrame, task: str, infos: Mapping[str, DatasetInfo], ref: PaperReference) -> ReportTable:
    names = _ordered_datasets(sub["dataset"], infos, ref.datasets)
    labels = [infos[n].label for n in names]
    means = _mean_columns([infos[n] for n in names], ref.datasets)
    rows, lows, highs, marks, skipped = [], [], [], [], {}
    paper_rows = 0
    for (model, pretrained), group in sub.groupby(["model", "pretrained"], sort=True):
        label = _model_label(model, pretrained)
        by_label = group.assign(label=[infos[d].label for d in group["dataset"]]).set_index("label")
        ours = by_label["value"].reindex(labels).astype(float)
        rows.append({"model": label, "row": "ours", **ours.to_dict(), **_means(ours, means)})
        lows.append(by_label["ci_low"].reindex(labels).astype(float).to_dict())
        highs.append(by_label["ci_high"].reindex(labels).astype(float).to_dict())
        counts = (by_label["skipped"] if "skipped" in by_label else pd.Series(0, by_label.index)
                  ).reindex(labels).fillna(0).astype(int)
        marks.append((counts > 0).to_dict())
        skipped.update({f"{lab}, {label}": int(n) for lab, n in counts.items() if n})
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
        marks.extend([{}, {}])
    columns = ["model", "row", *labels, *means]
    frame = pd.DataFrame(rows, columns=columns)
    notes = [f"Primary metric per dataset, percent. {len(names)} datasets."]
    if paper_rows:
        table_name = "Table 11" if task == "zeroshot" else "Table 10"
        notes.append(f"paper: Radford et al. 2021 (arXiv:2103.00020v1) {table_name}, {PAPER_PROTOCOLS[task]}; "
                     "diff = ours - paper.")
    ci_low = pd.DataFrame(lows, columns=columns).reindex(frame.index)
    ci_high = pd.DataFrame(highs, columns=columns).reindex(frame.index)
    has_ci = ci_low[labels].notna().to_numpy().any()
    if has_ci:
        notes.append("[low, high]: confidence interval of our value, as recorded.")
    note = skipped_note(skipped)
    if note:
        notes.append(note)
    return ReportTable(
        title=task_title(task),
        task=task,
        frame=frame,
        percent_columns=[*labels, *means],
        notes=notes,
        ci_low=ci_low if has_ci else None,
        ci_high=ci_high if has_ci else None,
        marked=pd.DataFrame(marks, columns=columns).reindex(frame.index) if note else None,
    )


def baseline_differences(values: pd.Series, baseline: pd.Series) -> pd.Series:
    """Per-dataset difference `values - baseline` over the datasets both have (fractions), as in Figure 5."""
    common = [c for c in values.index if c in baseline.index and pd.notna(values[c]) and pd.notna(baseline[c])]
    return (values[common].astype(float) - baseline[common].astype(float)).rename("difference")


@dataclass(frozen=True)
class Baseline:
    """The linear-probe row the report's Figure-5-style tables subtract.

    `values` are fractions keyed by dataset label (the paper's column where there is one);
    `source` is `paper` (a row of Table 10) or `measured` (clipbench linear_probe records);
    `model` is the measured model's label in the records (None for the paper).
    """

    label: str
    values: pd.Series
    source: str
    origin: str
    model: str | None = None

    @property
    def row_name(self) -> str:
        return f"{self.label} (paper, Table 10)" if self.source == "paper" else f"{self.label} (measured)"


def _measured_baseline(df: pd.DataFrame, label: str, origin: str,
                       infos: Mapping[str, DatasetInfo]) -> Baseline:
    probe = df[(df["task"] == "linear_probe") & df["k"].isna()]
    rows = probe[[_model_label(m, p) == label for m, p in zip(probe["model"], probe["pretrained"])]]
    if rows.empty:
        raise ClipbenchError(
            f"The baseline {label!r} ({origin}) has no linear_probe records. Measure it with "
            f"`clipbench run --model MODEL --tasks linear_probe` on the same datasets first."
        )
    values = pd.Series({infos[d].label: v for d, v in zip(rows["dataset"], rows["value"])}, dtype=float)
    return Baseline(label, values, "measured", origin, model=label)


def _labels_in(df: pd.DataFrame) -> dict[str, str]:
    """Each model's label (`model (pretrained)`), and its bare model name where that is unique."""
    labels = {_model_label(m, p): _model_label(m, p)
              for m, p in df[["model", "pretrained"]].drop_duplicates().itertuples(index=False)}
    bare = df[["model", "pretrained"]].drop_duplicates()["model"].value_counts()
    for model in bare[bare == 1].index:
        (pretrained,) = df[df["model"] == model]["pretrained"].unique()
        labels.setdefault(model, _model_label(model, pretrained))
    return labels


def resolve_baseline(baseline: str, df: pd.DataFrame, ref: PaperReference,
                     datasets: DatasetLookup | None = None) -> Baseline:
    """The baseline `--baseline` names: a results folder (its one linear-probed model), a model
    label of the records in `df` (`torchvision:resnet50 (IMAGENET1K_V1)`, or the bare model name
    when it is unique), else a row of the paper's Table 10 (`ResNet-50`).

    Raises:
        ClipbenchError: none of those, or a folder holding several probed models or none.
    """
    folder = Path(baseline).expanduser()
    if folder.is_dir():
        measured = load_records([folder])
        probed = measured[(measured["task"] == "linear_probe") & measured["k"].isna()] if not measured.empty else measured
        labels = sorted(_labels_in(probed).values()) if not probed.empty else []
        if len(set(labels)) != 1:
            raise ClipbenchError(
                f"--baseline {baseline}: the folder holds linear_probe records of "
                f"{len(set(labels))} models ({', '.join(sorted(set(labels))) or 'none'}); a baseline folder "
                f"needs exactly one. Pass the results of one model, or name the model with --baseline LABEL "
                f"and give its folder among the RESULTS_DIRs."
            )
        infos = _dataset_infos(measured["dataset"], datasets)
        return _measured_baseline(measured, labels[0], f"records in {folder}", infos)
    labels = _labels_in(df) if not df.empty else {}
    if baseline in labels:
        return _measured_baseline(df, labels[baseline], "records among the reported results",
                                  _dataset_infos(df["dataset"], datasets))
    paper_rows = list(ref.linear_probe["model"])
    if baseline.lower() not in (r.lower() for r in paper_rows):
        close = difflib.get_close_matches(baseline, [*labels, *paper_rows], n=3)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ClipbenchError(
            f"Unknown baseline {baseline!r}: not a results folder, not a model of the reported results "
            f"({', '.join(sorted(set(labels.values()))) or 'none'}) and not a row of the paper's Table 10 "
            f"(reference/linear_probe.csv: {', '.join(paper_rows)}).{hint} Pass one of those to --baseline."
        )
    row_id, values = ref.baseline_row(baseline)
    return Baseline(row_id, values, "paper", "paper Table 10 (reference/linear_probe.csv)")


def _baseline_table(sub: pd.DataFrame, task: str, infos: Mapping[str, DatasetInfo], ref: PaperReference,
                    baseline: Baseline) -> ReportTable | None:
    base = baseline.values
    names = [n for n in _ordered_datasets(sub["dataset"], infos, ref.datasets)
             if infos[n].label in base.index and pd.notna(base[infos[n].label])]
    if not names:
        return None
    labels = [infos[n].label for n in names]
    rows = [{"model": baseline.row_name, "row": "baseline", **base[labels].to_dict()}]
    for (model, pretrained), group in sub.groupby(["model", "pretrained"], sort=True):
        if task == "linear_probe" and _model_label(model, pretrained) == baseline.model:
            continue  # the baseline itself: a row of zeros
        ours = pd.Series({infos[d].label: v for d, v in zip(group["dataset"], group["value"])}, dtype=float)
        diff = baseline_differences(ours.reindex(labels), base)
        rows.append({"model": _model_label(model, pretrained), "row": f"diff vs {baseline.label}", **diff.to_dict(),
                     "wins": int((diff > 0).sum()), "datasets": int(diff.size)})
    frame = pd.DataFrame(rows, columns=["model", "row", *labels, "wins", "datasets"])
    frame[["wins", "datasets"]] = frame[["wins", "datasets"]].astype("Int64")
    title = f"{task_title(task)} vs baseline {baseline.label}"
    return ReportTable(
        title=title if baseline.source == "paper" else f"{title} (measured)",
        task=task,
        frame=frame,
        percent_columns=labels,
        notes=[f"baseline ({baseline.source}): linear probe {baseline.label!r}, {baseline.origin}; "
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
        title=task_title("few_shot"), task="few_shot", frame=frame, percent_columns=labels,
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


PROMPT_STUDY_COLUMNS = ("templates", "min", "median", "max", "ensemble")


def _prompt_study_rows(group: pd.DataFrame, infos: Mapping[str, DatasetInfo],
                       ref: PaperReference) -> list[tuple[str, dict]]:
    """(dataset label, prompt_study record row) of one model's records, in the paper's column order."""
    by_name = {name: row for name, row in zip(group["dataset"], group.to_dict("records"))}
    return [(infos[name].label, by_name[name]) for name in _ordered_datasets(by_name, infos, ref.datasets)]


def _prompt_study_tables(df: pd.DataFrame, infos: Mapping[str, DatasetInfo], ref: PaperReference) -> list[ReportTable]:
    """Per model: per dataset, the spread of the primary metric over single templates and the ensemble."""
    sub = df[df["task"] == "prompt_study"]
    tables = []
    for (model, pretrained), group in sub.groupby(["model", "pretrained"], sort=True):
        label = _model_label(model, pretrained)
        rows = [{"model": label, "row": dataset, "templates": len(row["details"].get("per_template", ())),
                 **{c: row["metrics"].get(f"template_{c}", math.nan) for c in ("min", "median", "max")},
                 "ensemble": row["value"]}
                for dataset, row in _prompt_study_rows(group, infos, ref)]
        frame = pd.DataFrame(rows, columns=["model", "row", *PROMPT_STUDY_COLUMNS])
        frame["templates"] = frame["templates"].astype("Int64")
        tables.append(ReportTable(
            title=f"{task_title('prompt_study')}: {label}", task="prompt_study", frame=frame,
            percent_columns=list(PROMPT_STUDY_COLUMNS[1:]),
            notes=["Primary metric per dataset, percent: min / median / max over each prompt template used "
                   "alone (class weight = that template's embedding), and the ensemble of all of them (the "
                   "zero-shot number); templates = how many."],
        ))
    return tables


def _retrieval_key(info: DatasetInfo) -> str | None:
    name = normalized_name(info.paper_name or info.name)
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
        metrics[name] |= {m for m in record_metrics if parse_recall_metric(m)}

    def order(metric: str) -> tuple[int, int]:
        direction, k = parse_recall_metric(metric)
        return (0 if direction == "image_to_text" else 1, k)

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
        title=task_title("retrieval"), task="retrieval",
        frame=pd.DataFrame(rows, columns=["model", "row", *labels]), percent_columns=labels,
        notes=["recall@k, percent; image_to_text = text retrieval, text_to_image = image retrieval; "
               "paper: Table 13 (CLIP = ViT-L/14@336px), Flickr30k 1k and MSCOCO 5k test sets, "
               "the paper's zero-shot protocol."],
    )


@dataclass(frozen=True)
class _OpenClipCell:
    """One record's value beside open_clip's: where it goes and what was compared."""

    task: str
    dataset: str  # the dataset's label
    label: str  # the column heading: the dataset's label, with the metric where it has several columns
    model: str
    comparison: Comparison
    skipped: int


def _openclip_cells(df: pd.DataFrame, infos: Mapping[str, DatasetInfo],
                    oc: OpenClipReference) -> tuple[list[_OpenClipCell], dict[str, tuple[str, str]], list[str]]:
    """Every comparable (model, record, open_clip column), the open_clip row of each matched model
    label, and the labels of models with records open_clip covers but no published row."""
    cells, matched, unmatched = [], {}, []
    for (model, pretrained), group in df[df["k"].isna()].groupby(["model", "pretrained"], sort=True):
        label = _model_label(model, pretrained)
        records = [(r, oc.columns_of(r["dataset"], r["task"])) for r in group.to_dict("records")]
        records = [(r, columns) for r, columns in records if columns]
        if not records:
            continue  # nothing open_clip publishes: no reason to mention the model
        key = oc.row_key(model, pretrained)
        if key is None:
            unmatched.append(label)
            continue
        matched[label] = key
        for r, columns in records:
            name = infos[r["dataset"]].label
            found = [c for c in (oc.compare(key, column, r["metrics"], r["primary_metric"]) for column in columns)
                     if c is not None]
            if any(not c.cross_protocol for c in found):  # a matching metric: no cross-metric stand-in
                found = [c for c in found if not c.cross_protocol]
            for comparison in found:
                heading = name if len(columns) == 1 else f"{name} {comparison.column.metric}"
                cells.append(_OpenClipCell(r["task"], name, heading, label, comparison, int(r["skipped"] or 0)))
    return cells, matched, unmatched


def _precision_note(df: pd.DataFrame, models: Sequence[str]) -> str:
    """Which precision each model's records ran at, against open_clip's fp32."""
    labels = [_model_label(m, p) for m, p in zip(df["model"], df["pretrained"])]
    by_model = df.assign(label=labels).groupby("label")["precision"].agg(lambda p: sorted(set(p)))
    parts, differs = [], False
    for model in models:
        precisions = [p or "not recorded" for p in by_model.get(model, [""])]
        parts.append(f"{model} {'/'.join(precisions)}")
        differs |= precisions != [OPENCLIP_PRECISION]
    note = f"Precision of ours (records' config.precision): {'; '.join(parts)}."
    if differs:
        note += (f" Where it is not {OPENCLIP_PRECISION}, the differences also cross protocols "
                 f"(open_clip ran at {OPENCLIP_PRECISION}).")
    return note


def _openclip_tables(df: pd.DataFrame, infos: Mapping[str, DatasetInfo], ref: PaperReference,
                     oc: OpenClipReference) -> tuple[list[ReportTable], list[str]]:
    """Per task: ours, open_clip's published value and the difference, for each model open_clip
    published; and the labels of models it did not publish (for one note)."""
    cells, matched, unmatched = _openclip_cells(df, infos, oc)
    column_order = {c: i for i, c in enumerate(oc.columns)}
    dataset_order = {infos[n].label: i for i, n in enumerate(_ordered_datasets(df["dataset"], infos, ref.datasets))}
    tables = []
    for task in sorted({c.task for c in cells}, key=lambda t: (t != "zeroshot", t)):
        mine = sorted((c for c in cells if c.task == task),
                      key=lambda c: (dataset_order[c.dataset], column_order[c.comparison.column]))
        labels = list(dict.fromkeys(c.label for c in mine))
        models = sorted({c.model for c in mine})
        columns = ["model", "row", *labels]
        rows, cross, skipped_marks, skipped = [], [], [], {}
        for model in models:
            by_label = {c.label: c for c in mine if c.model == model}
            rows += [{"model": model, "row": "ours", **{k: c.comparison.ours for k, c in by_label.items()}},
                     {"model": model, "row": "open_clip", **{k: c.comparison.published for k, c in by_label.items()}},
                     {"model": model, "row": "diff vs open_clip", **{k: c.comparison.diff for k, c in by_label.items()}}]
            flags = {k: c.comparison.cross_protocol for k, c in by_label.items()}
            cross += [flags, {}, flags]
            skipped_marks += [{k: c.skipped > 0 for k, c in by_label.items()}, {}, {}]
            skipped.update({f"{k}, {model}": c.skipped for k, c in by_label.items()})
        frame = pd.DataFrame(rows, columns=columns)
        unnamed = {c.label: c.comparison.column.metric for c in mine if c.label == c.dataset}
        notes = [f"{OPENCLIP_PROTOCOL}. ours: clipbench's protocol (its templates: the paper's prompt ensembles "
                 "where the paper has them), the metric named per column. diff = ours - open_clip, percent."]
        if unnamed:
            notes.append("Metric per column (DataComp's, by clipbench's name): "
                         + ", ".join(f"{label} {metric}" for label, metric in unnamed.items()) + ".")
        renamed = [f"{model} = {key[0]}/{key[1]}" for model, key in matched.items()
                   if model in models and _model_label(*key) != model]
        if renamed:
            notes.append(f"open_clip rows: {', '.join(renamed)}.")
        crossed = sorted({f"{c.label} (ours {c.comparison.ours_metric}, open_clip {c.comparison.column.metric})"
                          for c in mine if c.comparison.cross_protocol})
        if crossed:
            notes.append(f"{CROSS_PROTOCOL_MARK}: cross-protocol, different metrics: the record lacks open_clip's "
                         f"metric, so ours is its primary metric: {'; '.join(crossed)}.")
        notes.append(_precision_note(df[df["task"] == task], models))
        note = skipped_note(skipped)
        if note:
            notes.append(note)
        tables.append(ReportTable(
            title=f"{task_title(task)} vs open_clip", task=task, frame=frame, percent_columns=labels, notes=notes,
            cross_protocol=pd.DataFrame(cross, columns=columns).reindex(frame.index),
            marked=pd.DataFrame(skipped_marks, columns=columns).reindex(frame.index) if note else None,
        ))
    return tables, unmatched


def _own_language(dataset: str) -> str:
    """The language a dataset spec is written in (its records without a stated language)."""
    from clipbench.specs import DEFAULT_LANGUAGE, find_spec

    try:
        spec = find_spec(dataset)
    except ClipbenchError:
        spec = None
    return spec.base_language if spec is not None else DEFAULT_LANGUAGE


def _language_table(df: pd.DataFrame) -> ReportTable | None:
    """Per model and language, the primary metric of each dataset evaluated in several languages
    (zero-shot and retrieval records of ``DATASET@LANG`` beside the dataset's own)."""
    sub = df[df["task"].isin(["zeroshot", "retrieval"]) & df["k"].isna()]
    if sub.empty:
        return None
    base = sub["dataset"].str.partition("@")[0]
    sub = sub.assign(base=base, language=[lang or _own_language(name) for lang, name in zip(sub["language"], base)])
    several = sub.groupby("base")["language"].nunique()
    sub = sub[sub["base"].isin(several[several > 1].index)]
    if sub.empty:
        return None
    columns = sorted({(b, t, m) for b, t, m in zip(sub["base"], sub["task"], sub["primary_metric"])})
    labels = [f"{b} {t} {m}" for b, t, m in columns]
    rows = []
    for (model, pretrained, language), group in sub.groupby(["model", "pretrained", "language"], sort=True):
        by_key = {(b, t): v for b, t, v in zip(group["base"], group["task"], group["value"])}
        rows.append({"model": _model_label(model, pretrained), "row": language,
                     **{label: by_key.get((b, t), math.nan) for label, (b, t, _) in zip(labels, columns)}})
    return ReportTable(
        title="By language", task="multilingual",
        frame=pd.DataFrame(rows, columns=["model", "row", *labels]), percent_columns=labels,
        notes=["Primary metric per dataset and text language (row), percent: the same images scored with the "
               "captions, class names and templates of each language (`clipbench run --language`). The paper "
               "reports English only."],
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
    paper's models) and the difference to `baseline` (see `resolve_baseline`: a results folder, a
    model label of `df`, or a Table 10 row); few-shot mean ± std per k and
    the crossing with zero-shot; caption selection and Winoground per dataset with group means;
    per model with prompt_study records, the spread over templates; retrieval recall@k against
    Table 13; per task, the models open_clip publishes results for beside those
    (`clipbench.openclip_reference`; one note names the models it does not have); DataComp's
    average and group means of the records made under ``--protocol datacomp``
    (:func:`clipbench.datacomp.datacomp_table`).
    """
    ref = load_paper_reference()
    resolved = resolve_baseline(baseline, df, ref, datasets)  # fails early on an unknown baseline
    infos = _dataset_infos(df["dataset"], datasets)
    tables: list[ReportTable] = []
    for task in CLASSIFICATION_TASKS:
        sub = df[(df["task"] == task) & df["k"].isna()]
        if sub.empty:
            continue
        tables.append(_score_table(sub, task, infos, ref))
        table = _baseline_table(sub, task, infos, ref, resolved)
        if table is not None:
            tables.append(table)
    for task in SELECTION_TASKS:
        sub = df[df["task"] == task]
        if not sub.empty:
            tables.append(_score_table(sub, task, infos, ref))
    tables.extend(_few_shot_tables(df, infos, ref))
    tables.extend(_prompt_study_tables(df, infos, ref))
    retrieval = _retrieval_table(df, infos, ref)
    if retrieval is not None:
        tables.append(retrieval)
    openclip, unmatched = _openclip_tables(df, infos, ref, load_openclip_reference())
    tables.extend(openclip)
    if unmatched and tables:
        note = (f"open_clip reference: no published results for {', '.join(unmatched)} "
                "(reference/openclip_results.csv has none for that model and pretrained tag).")
        log.info(note)
        (openclip or tables)[0].notes.append(note)
    datacomp = datacomp_table(df)
    if datacomp is not None:
        tables.append(datacomp)
    multilingual = _language_table(df)
    if multilingual is not None:
        tables.append(multilingual)
    return tables


def build_report(df: pd.DataFrame, baseline: str = DEFAULT_BASELINE, fmt: str = "markdown",
                 datasets: DatasetLookup | None = None) -> str:
    """The full report of `df` (from `load_records`) in format `fmt` (markdown, csv, latex or html)."""
    check_format(fmt)
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
    rows, skipped = [], {}
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
        std = r["std"] if pd.notna(r["k"]) else None
        diff = r["value"] - paper if paper is not None else None
        value = format_cell(r["value"], "", True, r["ci_low"], r["ci_high"], std)
        if r["skipped"]:
            value += f" {SKIPPED_MARK}"
            skipped[f"{r['dataset']}/{r['task']}"] = int(r["skipped"])
        rows.append([r["model"], r["pretrained"], r["dataset"], r["task"], metric, value,
                     format_cell(paper, "", True), format_cell(diff, "diff", True)])
    headers = ["model", "pretrained", "dataset", "task", "metric", "value (%)", "paper (%)", "diff"]
    if rows and all(row[-2] == "" for row in rows):  # nothing the paper evaluated: no empty columns
        headers, rows = headers[:-2], [row[:-2] for row in rows]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    note = skipped_note(skipped)
    return f"{table}\n\n{note}" if note else table


# --------------------------------------------------------------------------- plots and CLI


def write_plots(df: pd.DataFrame, out_dir: Path, baseline: str = DEFAULT_BASELINE,
                datasets: DatasetLookup | None = None) -> list[Any]:
    """Write the report's figures (PNG) to `out_dir`; returns the `clipbench.plots.Plot` of each.

    Per classification task and model: the Figure-5-style difference to `baseline`; per model with
    few-shot records: the few-shot curves with zero-shot lines; per task with several models: a
    per-dataset comparison; per model with prompt_study records: each template's score per dataset,
    the ensemble marked.
    """
    from clipbench import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    ref = load_paper_reference()
    resolved = resolve_baseline(baseline, df, ref, datasets)
    row_id, base = resolved.label, resolved.values
    infos = _dataset_infos(df["dataset"], datasets)
    written = []
    for task in CLASSIFICATION_TASKS:
        sub = df[(df["task"] == task) & df["k"].isna()]
        for (model, pretrained), group in sub.groupby(["model", "pretrained"], sort=True):
            if task == "linear_probe" and _model_label(model, pretrained) == resolved.model:
                continue
            ours = pd.Series({infos[d].label: v for d, v in zip(group["dataset"], group["value"])}, dtype=float)
            diff = baseline_differences(ours, base)
            if diff.empty:
                continue
            path = out_dir / safe_name(f"{task}_vs_{row_id}__{model}__{pretrained}.png")
            written.append(plots.plot_baseline_differences(
                diff, path, title=f"{task_title(task)} {_model_label(model, pretrained)} vs {row_id} linear probe",
                xlabel=f"{task_title(task)} score - {row_id} linear probe (percentage points)"))
        if sub[["model", "pretrained"]].drop_duplicates().shape[0] > 1:
            wide = sub.assign(model_label=[_model_label(m, p) for m, p in zip(sub["model"], sub["pretrained"])],
                              label=[infos[d].label for d in sub["dataset"]])
            values = wide.pivot(index="label", columns="model_label", values="value")
            values = values.reindex([infos[n].label for n in _ordered_datasets(sub["dataset"], infos, ref.datasets)])
            path = out_dir / safe_name(f"{task}_models.png")
            written.append(plots.plot_model_comparison(values, path, title=f"{task_title(task)} by dataset"))
    few = df[df["task"] == "few_shot"]
    zs = df[df["task"] == "zeroshot"]
    for (model, pretrained), group in few.groupby(["model", "pretrained"], sort=True):
        labelled = group.assign(label=[infos[d].label for d in group["dataset"]])
        curves = labelled.pivot(index="k", columns="label", values="value").sort_index()
        stds = labelled.pivot(index="k", columns="label", values="std").sort_index()
        zero = zs[(zs["model"] == model) & (zs["pretrained"] == pretrained)]
        zero_shot = pd.Series({infos[d].label: v for d, v in zip(zero["dataset"], zero["value"])}, dtype=float)
        path = out_dir / safe_name(f"few_shot__{model}__{pretrained}.png")
        written.append(plots.plot_few_shot(curves, path, zero_shot=zero_shot, std=stds,
                                           title=f"Few-shot linear probe, {_model_label(model, pretrained)}"))
    for (model, pretrained), group in df[df["task"] == "prompt_study"].groupby(["model", "pretrained"], sort=True):
        rows = _prompt_study_rows(group, infos, ref)
        per_template = {dataset: [entry["value"] for entry in row["details"].get("per_template", ())]
                        for dataset, row in rows}
        ensemble = pd.Series({dataset: row["value"] for dataset, row in rows}, dtype=float)
        path = out_dir / safe_name(f"prompt_study__{model}__{pretrained}.png")
        written.append(plots.plot_prompt_spread(per_template, ensemble, path,
                                                title=f"Prompt sensitivity, {_model_label(model, pretrained)}"))
    return written


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `clipbench report RESULTS_DIR ... [--format] [--out] [--plot] [--baseline]`; handler in `handler`."""
    parser = subparsers.add_parser(
        "report", help="tables of results against the CLIP paper, a baseline and open_clip's published results",
        description="Read result records (clipbench or clip_benchmark JSON) found under RESULTS_DIR and print "
                    "model x dataset tables beside the CLIP paper's numbers, a Table 10 baseline and "
                    "open_clip's published DataComp results.")
    parser.add_argument("results_dirs", nargs="+", type=Path, metavar="RESULTS_DIR")
    parser.add_argument("--format", choices=FORMATS, default="markdown", dest="fmt",
                        help="markdown, LaTeX or HTML tables (percent), or csv: one tidy table of fractions, "
                             "one row per table x model x row x column, with the flags skipped (marked †) "
                             "and cross_protocol (marked ‡)")
    parser.add_argument("--out", type=Path, default=None, help="write the report to FILE instead of stdout")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR", help="also write PNG figures to DIR")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, metavar="DIR_OR_LABEL",
                        help="the linear probe the Figure-5-style tables subtract: a results folder of one "
                             "measured model (e.g. `clipbench run --model torchvision:resnet50 --tasks "
                             "linear_probe`), a model label of the reported results, or a model of the "
                             "paper's Table 10 (default: %(default)s, ImageNet-supervised, quoted from the paper)")
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
