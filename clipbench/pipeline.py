"""Wires specs -> data -> features -> tasks -> records for one model over many datasets.

This is the only module that calls adapters, the model and the tasks together; tasks themselves
see numpy arrays only.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import results
from .data import Samples, load_split, local_dir
from .errors import ClipbenchError
from .features import FeatureCache, ImageFeatures, image_features, text_features
from .specs import DatasetSpec

log = logging.getLogger(__name__)

#: The embedded offline default: a tiny CLIP trained on clipbench's synthetic world.
DEFAULT_MODEL = "clipbench-tiny"
DEFAULT_PRETRAINED = "synthetic"
DEFAULT_DATASETS = ("default",)


@dataclass
class RunConfig:
    """Everything `clipbench run` needs; ``model``/``pretrained`` None means the embedded default."""

    model: str | None = None
    pretrained: str | None = None
    datasets: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["zeroshot", "linear_probe", "retrieval"])
    data_root: Path = Path(".")
    output: Path = Path("results")
    cache_dir: Path = Path(".cache")
    batch_size: int = 256
    #: prompts per text-encoder batch; None: 1024 on GPU (2x faster than one class per batch on an
    #: H100), 128 on CPU (where large batches are slower; benchmarks/prompt_encoding.py)
    text_batch_size: int | None = None
    workers: int = 4
    device: str = "auto"
    precision: str = "amp"
    seed: int = 0
    force: bool = False
    allow_download: bool = True
    probe_solver: str = "sklearn"
    probe_features: str = "pre_projection"
    probe_jobs: int = field(default_factory=lambda: min(7, os.cpu_count() or 1))
    few_shot_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    few_shot_seeds: int = 3
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    n_bootstrap: int = 1000
    templates_file: Path | None = None
    classnames_file: Path | None = None

    def record_config(self) -> dict[str, Any]:
        """The settings that can change a number, stored in every record."""
        keep = ("precision", "seed", "probe_solver", "probe_features", "recall_k", "n_bootstrap",
                "few_shot_k", "few_shot_seeds", "templates_file", "classnames_file")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k in keep}


def _read_lines(path: Path) -> list[str]:
    try:
        return [l.rstrip("\n") for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    except FileNotFoundError:
        raise ClipbenchError(f"File {path} does not exist.") from None


def prompts_for(spec: DatasetSpec, config: RunConfig, data_root: Path) -> tuple[list[str], list[str], str]:
    """Classnames, templates and where the templates came from (said in the record)."""
    classnames = list(spec.classnames or ())
    templates = list(spec.templates or ())
    origin = spec.templates_origin or "dataset spec"
    if spec.source.type == "webdataset" and (not classnames or not templates):
        from .data.webdataset import read_wds_prompts

        root = local_dir(spec, data_root)
        wds_classes, wds_templates = read_wds_prompts(root) if root else (None, None)
        classnames = classnames or list(wds_classes or ())
        if not templates and wds_templates:
            templates, origin = list(wds_templates), "zeroshot_classification_templates.txt of the webdataset"
    if config.classnames_file:
        classnames = _read_lines(config.classnames_file)
    if config.templates_file:
        templates, origin = _read_lines(config.templates_file), f"user file {config.templates_file}"
    if not classnames or not templates:
        raise ClipbenchError(
            f"Dataset '{spec.name}' has no {'classnames' if not classnames else 'templates'} for "
            "zero-shot classification; give them in the spec or with --classnames/--templates FILE."
        )
    expected = max(spec.class_subset) + 1 if spec.class_subset else spec.num_classes
    if spec.class_subset is None and len(classnames) != expected:
        raise ClipbenchError(
            f"Dataset '{spec.name}' has {expected} classes but {len(classnames)} class names were given."
        )
    return classnames, templates, origin


class Evaluator:
    """Runs the requested tasks of one loaded model over dataset specs, writing one record each.

    ``encoder``, when given, encodes a split's images on a cache miss; it is called as
    ``encoder(model, samples, spec=, role=, batch_size=, workers=, desc=)`` and returns what
    :func:`clipbench.features.encode_image_batches` does (``torchrun`` runs pass
    :meth:`clipbench.distributed.DistContext.encode`, which shards the split across ranks).
    """

    def __init__(self, model: Any, config: RunConfig, *, encoder: Callable | None = None):
        self.model = model
        self.config = config
        self.cache = FeatureCache(Path(config.cache_dir) / "features")
        self.encoder = encoder
        self._current: dict[tuple[str, str], tuple[ImageFeatures, Samples]] = {}
        self.versions = results.package_versions()

    # -- data and features -------------------------------------------------------------------
    def _text_batch_size(self) -> int:
        if self.config.text_batch_size:
            return self.config.text_batch_size
        return 1024 if str(self.model.device).startswith("cuda") else 128

    def _samples(self, spec: DatasetSpec, role: str) -> Samples:
        return load_split(spec, role, Path(self.config.data_root), Path(self.config.cache_dir),
                          allow_download=self.config.allow_download)

    def _features(self, spec: DatasetSpec, role: str) -> tuple[ImageFeatures, Samples]:
        """Features of one split; kept while the dataset's tasks run (the probe and the few-shot
        probe share them) instead of reloading the split and re-reading the cache per task."""
        key = (spec.name, role)
        if key not in self._current:
            samples = self._samples(spec, role)
            feats = image_features(self.model, spec, role, samples, self.cache,
                                   batch_size=self.config.batch_size, workers=self.config.workers,
                                   encoder=functools.partial(self.encoder, spec=spec, role=role)
                                   if self.encoder is not None else None)
            self._current[key] = (feats, samples)
        return self._current[key]

    # -- orchestration -----------------------------------------------------------------------
    def tasks_for(self, spec: DatasetSpec) -> list[str]:
        supported = set(spec.tasks) | ({"few_shot"} if "linear_probe" in spec.tasks else set())
        return [t for t in self.config.tasks if t in supported]

    def run(self, specs: list[DatasetSpec]) -> list[results.Record]:
        records: list[results.Record] = []
        for spec in specs:
            self._current = {}  # one dataset's features at a time bounds the memory held
            tasks = self.tasks_for(spec)
            if not tasks:
                log.warning("%s: none of the tasks %s apply (it supports %s); skipped",
                            spec.name, self.config.tasks, list(spec.tasks))
                continue
            for task in tasks:
                existing = results.existing_record(self.config.output, self.model.name,
                                                   self.model.pretrained, spec.name, task)
                if existing is not None and not self.config.force:
                    log.info("%s/%s: record exists, skipped (use --force to recompute)", spec.name, task)
                    records.append(existing)
                    continue
                start = time.perf_counter()
                record, per_class = getattr(self, f"_run_{task}")(spec)
                record.seconds["total"] = round(time.perf_counter() - start, 3)
                path = results.write_record(record, self.config.output, per_class)
                log.info("wrote %s", path)
                records.append(record)
        return records

    def _record(self, spec: DatasetSpec, task: str, split: str, metrics: dict, n: int, **kw) -> results.Record:
        config = self.config.record_config()
        config.update(kw.pop("config", {}))
        config["dataset_spec"] = {"file": str(spec.file), "data_digest": spec.data_digest()}
        config["weights_digest"] = self.model.weights_digest
        return results.Record(
            model=self.model.name, pretrained=self.model.pretrained, dataset=spec.name, task=task,
            split=split, metrics=metrics, primary_metric=kw.pop("primary_metric", spec.primary_metric),
            n_samples=n, config=config, versions=self.versions, **kw,
        )

    # -- tasks -------------------------------------------------------------------------------
    def _run_zeroshot(self, spec: DatasetSpec):
        from .tasks import zeroshot

        classnames, templates, origin = prompts_for(spec, self.config, Path(self.config.data_root))
        feats, samples = self._features(spec, "test")
        t0 = time.perf_counter()
        prompts = zeroshot.build_prompts(classnames, templates)
        prompt_features = text_features(self.model, prompts, self.cache,
                                        batch_size=self._text_batch_size())
        weights = zeroshot.class_weights(prompt_features, len(classnames))
        t1 = time.perf_counter()
        result = zeroshot.evaluate(
            feats.projected, weights, feats.targets, spec.primary_metric, multilabel=spec.multilabel,
            class_subset=np.asarray(spec.class_subset) if spec.class_subset else None,
            n_bootstrap=self.config.n_bootstrap, seed=self.config.seed,
        )
        details = {"n_classes": spec.num_classes, "n_templates": len(templates)}
        if spec.class_subset:
            details["logits_restricted_to_class_subset"] = len(spec.class_subset)
        record = self._record(
            spec, "zeroshot", "test", result.metrics, len(samples),
            confidence_intervals={k: list(v) for k, v in result.confidence_intervals.items()},
            details=details,
            config={"templates_origin": origin},
            seconds={"features": round(feats.seconds, 3), "text": round(t1 - t0, 3),
                     "task": round(time.perf_counter() - t1, 3)},
        )
        per_class = {"classnames": classnames if not spec.class_subset
                     else [classnames[i] for i in spec.class_subset],
                     "per_class": result.per_class}
        return record, per_class

    def _probe_features(self, spec: DatasetSpec):
        """Train, val (None when the spec has no val split) and test features for probes."""
        pick = (lambda f: f.pre_projection) if self.config.probe_features == "pre_projection" else (
            lambda f: f.projected)
        train, _ = self._features(spec, "train")
        test, _ = self._features(spec, "test")
        val = self._features(spec, "val")[0] if spec.split("val") is not None else None
        seconds = train.seconds + test.seconds + (val.seconds if val is not None else 0.0)
        kind = self.config.probe_features
        if kind == "pre_projection":
            kind = train.pre_projection_kind  # "embedding" for towers without a separate projection
        arrays = {
            "train": (pick(train), train.targets),
            "val": (pick(val), val.targets) if val is not None else None,
            "test": (pick(test), test.targets),
        }
        return arrays, kind, seconds

    def _run_linear_probe(self, spec: DatasetSpec):
        from .tasks.linear_probe import linear_probe, stratified_val_split

        arrays, kind, feat_s = self._probe_features(spec)
        (tx, ty), (sx, sy) = arrays["train"], arrays["test"]
        if arrays["val"] is not None:
            (vx, vy), val_source = arrays["val"], "the dataset's validation split"
        else:
            tr, va = stratified_val_split(ty, spec.val_fraction, self.config.seed)
            tx, ty, vx, vy = tx[tr], ty[tr], tx[va], ty[va]
            val_source = f"stratified {spec.val_fraction:g} of train (seed {self.config.seed})"
        t0 = time.perf_counter()
        result = linear_probe(tx, ty, vx, vy, sx, sy, primary_metric=spec.primary_metric,
                              multilabel=spec.multilabel, solver=self.config.probe_solver,
                              device=str(self.model.device), num_classes=spec.num_classes,
                              n_jobs=self.config.probe_jobs)
        details = {**result.record_details(), "feature_kind": kind, "validation": val_source}
        record = self._record(
            spec, "linear_probe", "test", result.metrics, len(sy), details=details,
            seconds={"features": round(feat_s, 3), "task": round(time.perf_counter() - t0, 3)},
        )
        return record, None

    def _run_few_shot(self, spec: DatasetSpec):
        from .tasks.linear_probe import few_shot

        arrays, kind, feat_s = self._probe_features(spec)
        (tx, ty), (sx, sy) = arrays["train"], arrays["test"]
        vx, vy = arrays["val"] if arrays["val"] is not None else (None, None)
        t0 = time.perf_counter()
        result = few_shot(tx, ty, sx, sy, primary_metric=spec.primary_metric,
                          ks=tuple(self.config.few_shot_k), seeds=tuple(range(self.config.few_shot_seeds)),
                          val_x=vx, val_y=vy, val_fraction=spec.val_fraction, split_seed=self.config.seed,
                          solver=self.config.probe_solver, device=str(self.model.device),
                          num_classes=spec.num_classes, n_jobs=self.config.probe_jobs)
        metrics = {f"{spec.primary_metric}@{k}shot": r.mean for k, r in result.per_k.items()}
        metrics[spec.primary_metric] = result.per_k[max(result.per_k)].mean
        details = {**result.record_details(), "feature_kind": kind,
                   "primary_is_largest_k": int(max(result.per_k))}
        record = self._record(
            spec, "few_shot", "test", metrics, len(sy), details=details,
            seconds={"features": round(feat_s, 3), "task": round(time.perf_counter() - t0, 3)},
        )
        return record, None

    def _run_retrieval(self, spec: DatasetSpec):
        from .tasks.retrieval import recall_confidence_interval, retrieval_metrics

        feats, samples = self._features(spec, "test")
        captions = samples.captions or []
        flat = [c for caps in captions for c in caps]
        owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
        t0 = time.perf_counter()
        text = text_features(self.model, flat, self.cache, batch_size=self._text_batch_size())
        t1 = time.perf_counter()
        result = retrieval_metrics(feats.projected, text, owner, recall_k=tuple(self.config.recall_k),
                                   device=str(self.model.device))
        intervals = {}
        if self.config.n_bootstrap and spec.primary_metric in result.metrics and "_R@" in spec.primary_metric:
            intervals[spec.primary_metric] = list(recall_confidence_interval(
                result, owner, spec.primary_metric, self.config.n_bootstrap, seed=self.config.seed))
        record = self._record(
            spec, "retrieval", "test", result.metrics, len(samples), confidence_intervals=intervals,
            details={"n_images": int(len(captions)), "n_captions": int(len(flat)),
                     "bootstrap_unit": "image (with all its captions)"},
            seconds={"features": round(feats.seconds, 3), "text": round(t1 - t0, 3),
                     "task": round(time.perf_counter() - t1, 3)},
        )
        return record, None
