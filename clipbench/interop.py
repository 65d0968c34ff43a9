"""Reading clip_benchmark (github.com/LAION-AI/CLIP_benchmark) result files as clipbench records.

clip_benchmark writes one JSON per run (`dataset`, `model`, `pretrained`, `task`, `metrics`) with its
own task, dataset and metric names; `from_clip_benchmark` renames them to clipbench's so that both
kinds of result sit in one report.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from clipbench.config import LANGUAGE_ALIASES
from clipbench.metrics import parse_recall_metric
from clipbench.reference import DatasetLookup, dataset_info

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
    # XTD10's captions of the same 1,000 COCO images, under clip_benchmark's older name
    "multilingual_mscoco_captions": "xtd10",
    "crossmodal3600": "crossmodal3600",
}
# In clip_benchmark, "image retrieval" ranks images per caption (text→image) and "text retrieval"
# ranks captions per image (image→text); see clip_benchmark/metrics/zeroshot_retrieval.py.
_CLIP_BENCHMARK_METRICS = {"acc1": "accuracy", "acc5": "top5_accuracy"}
_CLIP_BENCHMARK_RECALL = re.compile(r"^(image|text)_retrieval_recall@(\d+)$")


def is_clip_benchmark_result(obj: Any) -> bool:
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
    # clip_benchmark's `language` (default en) is clipbench's DATASET@LANG for other languages
    language = str(obj.get("language") or "en")
    language = LANGUAGE_ALIASES.get(language, language)
    wanted = dataset_info(dataset, datasets).primary_metric
    dataset = dataset if language == "en" else f"{dataset}@{language}"
    if wanted in metrics:
        primary = wanted
    elif task == "retrieval":
        recalls = sorted((p[1], key) for key in metrics if (p := parse_recall_metric(key)))
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

