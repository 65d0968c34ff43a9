"""DataComp's 38-task evaluation: which tasks, which metric each, and its average and group means.

The reference is mlfoundations/datacomp (commit 4a8df199): ``tasklist.yml`` lists the tasks and
each one's ``main_metric`` (``acc1`` when none is given), and ``aggregate_scores.py`` computes

* ``ImageNet``: the ImageNet 1k value;
* ``ImageNet dist. shifts``, ``VTAB``, ``Retrieval``: unweighted means over the groups of
  :data:`GROUPS` (its ``DATASET_GROUPS``);
* ``Average``: the unweighted mean of the 38 main metrics (FairFace and UTKFace have no main
  metric and are left out; the script refuses a results file with other than 38).

Here the values come from clipbench records made under ``--protocol datacomp`` (fp32, DataComp's
copies of the data, their class names and templates: the specs' ``protocols.datacomp`` blocks).
:func:`summarize` never calls a mean over fewer than the 38 the DataComp average: a partial set
gets :attr:`DataCompSummary.partial_mean`, and the group means only of complete groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clipbench.lazy import pandas as pd

if TYPE_CHECKING:
    from clipbench.render import ReportTable

#: the ``--protocol`` whose records are DataComp's numbers
PROTOCOL = "datacomp"


@dataclass(frozen=True)
class DataCompTask:
    """One of DataComp's 38 tasks.

    key: its ``tasklist.yml`` key; title: its name there (what ``aggregate_scores.py`` groups by);
    dataset, task, metric: the clipbench spec, task and record metric that hold its value (dataset
    None: clipbench has no spec for it); datacomp_metric: DataComp's ``main_metric``.
    """

    key: str
    title: str
    dataset: str | None
    task: str
    metric: str
    datacomp_metric: str


def _zs(key: str, title: str, dataset: str, metric: str = "accuracy", datacomp_metric: str = "acc1") -> DataCompTask:
    return DataCompTask(key, title, dataset, "zeroshot", metric, datacomp_metric)


#: The 38 tasks in ``tasklist.yml`` order.
TASKS: tuple[DataCompTask, ...] = (
    _zs("vtab/caltech101", "Caltech-101", "caltech101", "mean_per_class_recall", "mean_per_class_recall"),
    _zs("cifar10", "CIFAR-10", "cifar10"),
    _zs("vtab/cifar100", "CIFAR-100", "cifar100"),
    _zs("vtab/clevr_count_all", "CLEVR Counts", "clevr_counts"),
    _zs("vtab/clevr_closest_object_distance", "CLEVR Distance", "clevr_distance"),
    _zs("country211", "Country211", "country211"),
    _zs("vtab/dtd", "Describable Textures", "dtd"),
    _zs("vtab/eurosat", "EuroSAT", "eurosat"),
    _zs("fgvc_aircraft", "FGVC Aircraft", "fgvc_aircraft", "mean_per_class_recall", "mean_per_class_recall"),
    _zs("food101", "Food-101", "food101"),
    _zs("gtsrb", "GTSRB", "gtsrb"),
    _zs("imagenet1k", "ImageNet 1k", "imagenet"),
    _zs("imagenet_sketch", "ImageNet Sketch", "imagenet_sketch"),
    _zs("imagenetv2", "ImageNet v2", "imagenet_v2"),
    _zs("imagenet-a", "ImageNet-A", "imagenet_a"),
    _zs("imagenet-o", "ImageNet-O", "imagenet_o"),
    _zs("imagenet-r", "ImageNet-R", "imagenet_r"),
    _zs("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", "kitti_distance"),
    _zs("mnist", "MNIST", "mnist"),
    _zs("objectnet", "ObjectNet", "objectnet"),
    _zs("vtab/flowers", "Oxford Flowers-102", "flowers102", "mean_per_class_recall", "mean_per_class_recall"),
    _zs("vtab/pets", "Oxford-IIIT Pet", "oxford_pets", "mean_per_class_recall", "mean_per_class_recall"),
    _zs("voc2007", "Pascal VOC 2007", "voc2007"),
    _zs("vtab/pcam", "PatchCamelyon", "pcam"),
    _zs("renderedsst2", "Rendered SST2", "rendered_sst2"),
    _zs("vtab/resisc45", "RESISC45", "resisc45"),
    _zs("cars", "Stanford Cars", "stanford_cars"),
    _zs("stl10", "STL-10", "stl10"),
    _zs("sun397", "SUN397", "sun397"),
    _zs("vtab/svhn", "SVHN", "svhn"),
    DataCompTask("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", "flickr30k", "retrieval",
                 "mean_recall@1", "mean_recall@1"),
    DataCompTask("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mscoco", "retrieval",
                 "mean_recall@1", "mean_recall@1"),
    DataCompTask("misc/winogavil", "WinoGAViL", "winogavil", "association", "jaccard_score_10-12",
                 "jaccard_score_10-12"),
    _zs("wilds/iwildcam", "iWildCam", "iwildcam", "macro_f1", "F1-macro_all"),
    _zs("wilds/camelyon17", "Camelyon17", "camelyon17"),
    _zs("wilds/fmow", "FMoW", "fmow", "worst_group_accuracy", "acc_worst_region"),
    _zs("fairness/dollar_street", "Dollar Street", "dollar_street", "worst_group_top5_accuracy", "acc_top5_wg"),
    _zs("fairness/geode", "GeoDE", "geode", "worst_group_accuracy", "acc_wg"),
)

#: ``aggregate_scores.py``'s groups (by task title); ``ImageNet`` is the ImageNet 1k value alone.
GROUPS: dict[str, tuple[str, ...]] = {
    "ImageNet": ("ImageNet 1k",),
    "ImageNet dist. shifts": ("ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R",
                              "ObjectNet"),
    "VTAB": ("Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
             "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45",
             "SVHN", "SUN397"),
    "Retrieval": ("Flickr", "MSCOCO", "WinoGAViL"),
}


@dataclass(frozen=True)
class DataCompSummary:
    """The DataComp aggregate of one model's values.

    present / missing: task titles with and without a value; groups: group -> mean, None when a
    member is missing; average: the mean of all 38 (DataComp's ``Average``), None unless all 38
    are present; partial_mean: the mean of the tasks present (never the DataComp average).
    """

    present: tuple[str, ...]
    missing: tuple[str, ...]
    groups: dict[str, float | None]
    average: float | None
    partial_mean: float | None


def summarize(values: Mapping[str, float]) -> DataCompSummary:
    """DataComp's aggregates of ``values`` (task title -> main-metric value, fractions).

    Raises:
        ValueError: a title that is not one of the 38, or a value that is not finite.
    """
    titles = [task.title for task in TASKS]
    unknown = sorted(set(values) - set(titles))
    if unknown:
        raise ValueError(f"not DataComp task titles: {unknown}; the 38 are {titles}")
    bad = sorted(t for t, v in values.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"DataComp values must be finite numbers; {bad} are not")
    present = tuple(t for t in titles if t in values)
    groups = {name: float(np.mean([values[t] for t in members])) if all(t in values for t in members) else None
              for name, members in GROUPS.items()}
    return DataCompSummary(
        present=present,
        missing=tuple(t for t in titles if t not in values),
        groups=groups,
        average=float(np.mean([values[t] for t in titles])) if len(present) == len(titles) else None,
        partial_mean=float(np.mean([values[t] for t in present])) if present else None,
    )


def values_from_records(df: pd.DataFrame) -> dict[tuple[str, str], dict[str, float]]:
    """(model, pretrained) -> DataComp task title -> value, from ``load_records`` rows made under
    ``--protocol datacomp`` (the metric of :data:`TASKS`, read from each record's metrics)."""
    by_key = {(task.dataset, task.task): task for task in TASKS if task.dataset is not None}
    out: dict[tuple[str, str], dict[str, float]] = {}
    rows = df[(df["protocol"] == PROTOCOL) & df["k"].isna()]
    for model, pretrained, dataset, task_name, record_metrics in zip(
            rows["model"], rows["pretrained"], rows["dataset"], rows["task"], rows["metrics"]):
        task = by_key.get((dataset, task_name))
        if task is not None and task.metric in record_metrics:
            out.setdefault((model, pretrained), {})[task.title] = float(record_metrics[task.metric])
    return out


def other_protocol_records(df: pd.DataFrame) -> int:
    """How many records of DataComp's datasets and tasks were made under another protocol."""
    keys = {(task.dataset, task.task) for task in TASKS if task.dataset is not None}
    rows = df[df["protocol"] != PROTOCOL]
    return sum((d, t) in keys for d, t in zip(rows["dataset"], rows["task"]))


def datacomp_table(df: pd.DataFrame) -> ReportTable | None:
    """The report's DataComp table: per model, how many of the 38 tasks have a value, the group
    means and the DataComp average (only with all 38), else the mean of the tasks present under
    its own name; None when no record was made under ``--protocol datacomp``."""
    from clipbench.render import ReportTable

    values = values_from_records(df)
    if not values:
        return None
    columns = ["tasks", *GROUPS, "DataComp average", "mean of tasks present"]
    rows, notes = [], []
    for (model, pretrained), by_title in sorted(values.items()):
        summary = summarize(by_title)
        label = f"{model} ({pretrained})" if pretrained else model
        rows.append({"model": label, "row": "datacomp", "tasks": f"{len(summary.present)}/{len(TASKS)}",
                     **{g: math.nan if v is None else v for g, v in summary.groups.items()},
                     "DataComp average": math.nan if summary.average is None else summary.average,
                     "mean of tasks present": summary.partial_mean})
        if summary.missing:
            notes.append(f"{label}: {len(summary.present)} of {len(TASKS)} tasks; missing "
                         f"{', '.join(summary.missing)}. The DataComp average needs all {len(TASKS)} and "
                         "a group mean all its tasks; 'mean of tasks present' is not the DataComp average.")
    notes.append("DataComp (mlfoundations/datacomp aggregate_scores.py): unweighted means of each task's main "
                 "metric (tasklist.yml: acc1, or mean_per_class_recall, mean_recall@1, F1-macro_all, "
                 "acc_worst_region, acc_top5_wg, acc_wg, jaccard_score_10-12), percent; records of "
                 "--protocol datacomp only (fp32 without autocast, DataComp's data copies and prompts).")
    others = other_protocol_records(df)
    if others:
        notes.append(f"{others} records of these datasets were made under another protocol and are not "
                     "counted (their numbers are not DataComp's: other data copies, prompts or precision).")
    return ReportTable(title="DataComp (38 tasks)", task="datacomp",
                       frame=pd.DataFrame(rows, columns=["model", "row", *columns]),
                       percent_columns=[*GROUPS, "DataComp average", "mean of tasks present"], notes=notes)
