"""Evaluation tasks: arrays in, metrics out (see :mod:`clipbench.tasks.base`).

The registry maps a task name to its :class:`~clipbench.tasks.base.Task`. Built-in tasks live one
per module and are imported on first use; another task is one module plus one
:func:`register_task` call (docs/extending.md). `--tasks`, spec validation, the pipeline's dispatch
and the report's titles all read this registry.
"""

from __future__ import annotations

import difflib
import importlib

from clipbench.tasks.base import Task, TaskInputs, TaskNeeds, TaskOutput

__all__ = ["Task", "TaskInputs", "TaskNeeds", "TaskOutput", "register_task", "get_task", "task_names",
           "all_tasks", "spec_task_names", "close_task_names", "builtin_task_names", "CAPTION_SET_METRICS"]

# name -> (module defining ``TASK``, its ``spec_task``): imported lazily, because some pull in
# torch or scikit-learn and spec validation needs only the spec task names
_BUILTIN = {
    "zeroshot": ("clipbench.tasks.zeroshot", "zeroshot"),
    "linear_probe": ("clipbench.tasks.linear_probe", "linear_probe"),
    "few_shot": ("clipbench.tasks.few_shot", "linear_probe"),
    "retrieval": ("clipbench.tasks.retrieval", "retrieval"),
    "prompt_study": ("clipbench.tasks.prompt_study", "zeroshot"),
    "caption_selection": ("clipbench.tasks.caption_selection", "caption_selection"),
    "winoground": ("clipbench.tasks.winoground", "winoground"),
    "association": ("clipbench.tasks.association", "association"),
}
#: spec task kinds whose data are caption sets (each image with its captions and negative
#: captions, not labels), and the metrics each one's tasks record (a spec's primary_metric is one);
#: association's are DataComp's WinoGAViL metrics (:data:`clipbench.tasks.association.SUBSETS`)
CAPTION_SET_METRICS: dict[str, tuple[str, ...]] = {
    "caption_selection": ("accuracy",),
    "winoground": ("group_score", "text_score", "image_score"),
    "association": ("jaccard_score_10-12", "jaccard_score_5-6", "avg_jaccard_score", "jaccard_score_5",
                    "jaccard_score_6", "jaccard_score_10", "jaccard_score_12"),
}
#: built-in tasks a run computes only when `--tasks` names them (the embedded default skips them)
OPT_IN = ("prompt_study",)
_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` under ``task.name`` (replacing a task of that name); returns it."""
    for attr in ("name", "title", "spec_task", "needs", "settings", "run"):
        if not hasattr(task, attr):
            raise TypeError(f"a task needs the attribute {attr!r} (see clipbench.tasks.base.Task)")
    _REGISTRY[task.name] = task
    return task


def _load_builtins() -> None:
    for name, (module, _) in _BUILTIN.items():
        if name not in _REGISTRY:
            register_task(importlib.import_module(module).TASK)


def builtin_task_names() -> list[str]:
    """The tasks that ship with clipbench and that the embedded default runs: all but :data:`OPT_IN`."""
    return [name for name in _BUILTIN if name not in OPT_IN]


def task_names() -> list[str]:
    """Every registered task name, built-ins first, in registration order."""
    return list(dict.fromkeys([*_BUILTIN, *_REGISTRY]))


def close_task_names(name: str) -> str:
    """" (did you mean ...?)" for a misspelt task name, or ""."""
    close = difflib.get_close_matches(name, task_names(), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        KeyError: no such task; the message lists the registered ones.
    """
    if name in _BUILTIN and name not in _REGISTRY:
        register_task(importlib.import_module(_BUILTIN[name][0]).TASK)
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}{close_task_names(name)}; registered tasks: "
                       f"{', '.join(task_names())}")
    return _REGISTRY[name]


def all_tasks() -> list[Task]:
    _load_builtins()
    return [_REGISTRY[name] for name in task_names()]


def spec_task_names() -> list[str]:
    """The names a dataset spec's ``tasks`` field may hold (a spec declares the data a task
    family needs; e.g. ``linear_probe`` enables both the linear and the few-shot probe)."""
    builtin = [spec_task for _, spec_task in _BUILTIN.values()]
    return list(dict.fromkeys([*builtin, *(task.spec_task for task in _REGISTRY.values())]))
