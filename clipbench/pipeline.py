"""Wires specs -> data -> features -> tasks -> records; the only module that does.

:func:`run` is a whole `clipbench run`: it resolves the settings, loads each model in turn (once
per process, also under ``torchrun``), and evaluates every requested task on every dataset, keeping
the run alive when one model, dataset or task fails. :class:`Evaluator` does the per-dataset work for one
loaded model: it asks each task (:mod:`clipbench.tasks`) what it needs, computes those features
(cached), hands the task numpy arrays, and writes the record, skipping a stored record only when
it was computed under the same settings.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from clipbench import results
from clipbench.atomic import remove_stale_temporaries
from clipbench.config import ModelChoice, RunConfig
from clipbench.data import Samples, load_split, source_prompts
from clipbench.errors import ClipbenchError
from clipbench.features import (
    LENGTH_ADAPTIVE_CONTEXTS,
    FeatureCache,
    ImageFeatures,
    image_features,
    text_context,
    text_features,
)
from clipbench.specs import DatasetSpec, read_classnames, read_lines
from clipbench.tasks import Task, get_task
from clipbench.tasks.base import Captions, CaptionSets, ClassPrompts, FeatureSplit, TaskInputs
from clipbench.tasks.zeroshot import build_prompts, has_placeholder

log = logging.getLogger(__name__)

__all__ = ["run", "RunResult", "Failure", "Evaluator", "RunConfig", "prompts_for", "language_runs"]


def language_runs(spec: DatasetSpec, languages: list[str] | None) -> list[tuple[DatasetSpec, bool]]:
    """The spec in each requested language it offers, each with whether its text tasks run.

    ``languages`` None: the spec alone, every task. Tasks without text (probes) depend on no
    language: they run once, on the spec in its own language, which is therefore always first (its
    text tasks only when its language was requested). A requested language the spec lacks is left
    out with one warning.
    """
    if languages is None or spec.language != spec.base_language:
        return [(spec, True)]  # no choice, or one made in --datasets (DATASET@LANG)
    offered = [code for code in languages if code in spec.available_languages]
    missing = [code for code in languages if code not in offered]
    if missing:
        log.warning("%s: no text in %s (it offers %s); its text tasks run in %s only", spec.name,
                    ", ".join(missing), ", ".join(spec.available_languages), ", ".join(offered) or "no language")
    runs = [(spec, spec.base_language in offered)]
    runs += [(spec.for_language(code), True) for code in offered if code != spec.base_language]
    return runs


def prompts_for(spec: DatasetSpec, config: RunConfig, data_root: Path) -> tuple[list[str], list[str], str]:
    """Classnames, templates and where the templates came from (said in the record)."""
    spec_classnames, spec_templates, spec_origin = spec.prompts()  # in the spec's language
    classnames = list(spec_classnames or ())
    templates = list(spec_templates or ())
    origin = spec_origin or "dataset spec"
    if not classnames or not templates:
        data_classes, data_templates, data_origin = source_prompts(spec, data_root)
        classnames = classnames or list(data_classes or ())
        if not templates and data_templates:
            templates, origin = list(data_templates), data_origin
    if config.classnames_file:
        classnames = read_classnames(config.classnames_file)
    if config.templates_file:
        templates, origin = read_lines(config.templates_file), f"user file {config.templates_file}"
        bad = [t for t in templates if not has_placeholder(t)]
        if bad:
            raise ClipbenchError(
                f"Template {bad[0]!r} in {config.templates_file} has no class-name placeholder; write "
                "`{c}` where the class name goes, e.g. 'a photo of a {c}.'"
            )
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


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Evaluator:
    """Runs the requested tasks of one loaded model over dataset specs, writing one record each.

    ``config`` is completed with :meth:`RunConfig.resolved` (its ``model`` fields are ignored:
    ``model`` is the loaded one). ``encoder``, when given, encodes a split's images on a cache
    miss; it is called as ``encoder(model, samples, spec=, role=, batch_size=, workers=, desc=,
    max_image_pixels=, indices=)`` (``indices``: the range of one chunk of a split larger than one
    chunk, else absent) and returns what :func:`clipbench.features.encode_image_batches` does
    (``torchrun`` runs pass :meth:`clipbench.distributed.DistContext.encode`, which shards the split
    across ranks).
    """

    def __init__(self, model: Any, config: RunConfig, *, encoder: Callable | None = None):
        self.model = model
        self.config = config.resolved()
        self.cache = FeatureCache(Path(self.config.cache_dir) / "features")
        self.encoder = encoder
        self._current: dict[tuple[str, str], tuple[ImageFeatures, Samples]] = {}
        self.versions = results.package_versions()

    # -- data and features -------------------------------------------------------------------
    def _text_batch_size(self) -> int:
        if self.config.text_batch_size:
            return self.config.text_batch_size
        return 1024 if str(self.model.device).startswith("cuda") else 256  # why: RunConfig.text_batch_size

    def load_samples(self, spec: DatasetSpec, role: str) -> Samples:
        """The samples of one split (distributed ranks load theirs through this too)."""
        return load_split(spec, role, Path(self.config.data_root), Path(self.config.cache_dir),
                          allow_download=self.config.allow_download)

    def split_features(self, spec: DatasetSpec, role: str) -> tuple[ImageFeatures, Samples]:
        """Features of one split; kept while the dataset's tasks run (the probe and the few-shot
        probe share them) instead of reloading the split and re-reading the cache per task."""
        key = (spec.record_name, role)  # a language's own captions: not shared across languages
        if key not in self._current:
            samples = self.load_samples(spec, role)
            feats = image_features(self.model, spec, role, samples, self.cache,
                                   batch_size=self.config.batch_size, workers=self.config.workers,
                                   encoder=functools.partial(self.encoder, spec=spec, role=role)
                                   if self.encoder is not None else None,
                                   on_bad_image=self.config.on_bad_image,
                                   max_image_pixels=self.config.max_image_pixels,
                                   decode=self.config.decode)
            if feats.kept is not None:  # --on-bad-image skip left samples out: the split is the rest
                samples = samples.subset(feats.kept)
            self._current[key] = (feats, samples)
        return self._current[key]

    # -- orchestration -----------------------------------------------------------------------
    def _eligible(self, spec: DatasetSpec) -> list[Task]:
        return [task for task in map(get_task, self.config.tasks) if task.spec_task in spec.tasks]

    def tasks_for(self, spec: DatasetSpec, text: bool = True) -> list[Task]:
        """The requested tasks that apply to ``spec`` and the model, in request order (an
        image-only model has no text encoder for zero-shot or retrieval). ``text`` False leaves the
        tasks that need text out; a spec in another language than its own has only those
        (:func:`language_runs`)."""
        with_text = text and getattr(self.model, "supports_text", True)
        without_text = spec.language == spec.base_language
        return [task for task in self._eligible(spec) if (with_text if task.needs(spec).text else without_text)]

    def run(self, specs: list[DatasetSpec]) -> list[results.Record]:
        """Every applicable task on every spec; the first failure raises."""
        records: list[results.Record] = []
        for base in (s.for_protocol(self.config.protocol) for s in specs):
            for spec, text in language_runs(base, self.config.languages):
                self.start_dataset(spec)
                records.extend(self.run_task(spec, task) for task in self.tasks_for(spec, text))
        return records

    def start_dataset(self, spec: DatasetSpec) -> None:
        """Forget the previous dataset's features (one dataset at a time bounds the memory held)."""
        self.end_dataset()
        supports_text = getattr(self.model, "supports_text", True)
        for task in [t for t in self._eligible(spec) if t.needs(spec).text and not supports_text]:
            log.warning("%s/%s: skipped, the task needs text features and %s is an image-only model",
                        spec.name, task.name, self.model.name)
        if not self._eligible(spec):
            log.warning("%s: none of the tasks %s apply (it supports %s); skipped",
                        spec.name, self.config.tasks, list(spec.tasks))

    def end_dataset(self) -> None:
        """Release the current dataset's features."""
        self._current = {}

    def roles_to_encode(self, spec: DatasetSpec, text: bool = True) -> set[str]:
        """The split roles of ``spec`` whose image features :meth:`run_task` will use: those of the
        applicable tasks (:meth:`tasks_for`) without a reusable record."""
        roles: set[str] = set()
        for task in self.tasks_for(spec, text):
            try:
                reused = self._reuses(self._stored(spec, task), self.record_settings(spec, task))
            except (ClipbenchError, ValueError, TypeError):
                reused = False  # the task fails in run_task, which reports why
            if not reused:
                roles.update(role for role in task.needs(spec).roles
                             if role == "test" or spec.split(role) is not None)
        return roles

    def _stored(self, spec: DatasetSpec, task: Task) -> results.Record | None:
        return results.existing_record(self.config.output, self.model.name, self.model.pretrained,
                                       spec.record_name, task.name)

    def _reuses(self, existing: results.Record | None, settings: dict[str, Any]) -> bool:
        """Whether the stored record ``existing`` stands for a task computed under ``settings``."""
        return (existing is not None and not self.config.force
                and existing.config.get("settings_digest") == settings["settings_digest"])

    def record_settings(self, spec: DatasetSpec, task: Task) -> dict[str, Any]:
        """The record ``config`` entries that determine the task's numbers, and their digest."""
        settings: dict[str, Any] = dict(task.settings(self.config))
        settings["precision"] = self.model.precision  # what the model ran at, not what was asked
        settings["weights_digest"] = self.model.weights_digest
        settings["model_identity_digest"] = _digest(self.model.identity())
        settings["dataset_spec"] = {"file": spec.origin, "data_digest": spec.data_digest(),
                                    "eval_digest": spec.eval_digest()}
        settings["metric_version"] = results.METRIC_VERSION
        if self.config.protocol != RunConfig.default("protocol"):
            # off the default only, so the digests of records made before --protocol stay valid
            settings["protocol"] = self.config.protocol
        if spec.language != spec.base_language:
            # its own record name already; also digested so that a record says what it measured
            settings["language"] = spec.language
        if self.config.on_bad_image != RunConfig.default("on_bad_image"):
            # skipping changes which samples are scored (and the pixel limit, which are skipped), so
            # such a record is never reused under the other policy; added only off the default so the
            # digests of records made before the option existed stay valid
            settings["on_bad_image"] = self.config.on_bad_image
            settings["max_image_pixels"] = self.config.max_image_pixels
        if self.config.decode != RunConfig.default("decode"):
            settings["decode"] = self.config.decode  # other pixels; likewise only off the default
        if task.needs(spec).text is not None and text_context(self.model) in LENGTH_ADAPTIVE_CONTEXTS:
            # prompts in batches as long as their longest one, in order of length, differ in their
            # last bits from what earlier versions encoded, so such records are not reused; records
            # of fixed-length batches keep their digests
            settings["text_context"] = text_context(self.model)
        if task.needs(spec).text == "class_prompts":
            classnames, templates, _ = prompts_for(spec, self.config, Path(self.config.data_root))
            settings["prompts_digest"] = _digest([classnames, templates])
        settings["settings_digest"] = _digest({"task": task.name, **settings})
        return settings

    def run_task(self, spec: DatasetSpec, task: Task) -> results.Record:
        """One record: the stored one when its settings match, else computed and written."""
        settings = self.record_settings(spec, task)
        path = results.record_path(self.config.output, self.model.name, self.model.pretrained,
                                   spec.record_name, task.name)
        existing = self._stored(spec, task)
        if self._reuses(existing, settings):
            log.info("%s/%s: record exists with the same settings, skipped (--force recomputes)",
                     spec.record_name, task.name)
            return existing
        old = existing.config.get("settings_digest") if existing is not None else None
        start = time.perf_counter()
        record, output, sample_ids = self._compute(spec, task, settings)
        record.seconds["total"] = round(time.perf_counter() - start, 3)
        if existing is not None and old != settings["settings_digest"]:
            # moved aside only once its replacement exists: a failed task leaves it in place
            kept = results.supersede(path, old or "unknown")
            log.warning("%s/%s: the stored record was computed under other settings (%s); "
                        "recomputed, the earlier record is kept as %s", spec.record_name, task.name,
                        results.changed_settings(existing.config, settings), kept.name)
        written = results.write_record(record, self.config.output, output.per_class,
                                       output.per_sample, sample_ids)
        log.info("wrote %s", written)
        return record

    def _language_entry(self, spec: DatasetSpec) -> dict[str, str]:
        """The record's ``language`` when the run chose languages or the spec is in another than its
        own (then it is in the settings digest too); left out otherwise, so records of runs without
        --language are as before."""
        if self.config.languages is None and spec.language == spec.base_language:
            return {}
        return {"language": spec.language}

    def _compute(self, spec: DatasetSpec, task: Task, settings: dict[str, Any]):
        needs = task.needs(spec)
        t0 = time.perf_counter()
        images, feature_seconds, test_samples, skipped = {}, 0.0, None, {}
        for role in needs.roles:
            if role != "test" and spec.split(role) is None:
                continue  # e.g. no val split: the task carves one from train
            held = (spec.record_name, role) in self._current  # encoded (or read) for an earlier task
            feats, samples = self.split_features(spec, role)
            skipped.update(dict.fromkeys(feats.skipped))  # ordered, each id once
            images[role] = FeatureSplit(feats.projected, feats.pre_projection, feats.targets,
                                        feats.pre_projection_kind, groups=samples.groups)
            feature_seconds += 0.0 if held else feats.seconds  # what this record spent
            test_samples = samples if role == "test" else test_samples
        t1 = time.perf_counter()
        class_prompts = captions = caption_sets = None
        if needs.text == "class_prompts":
            classnames, templates, origin = prompts_for(spec, self.config, Path(self.config.data_root))
            encoded = text_features(self.model, build_prompts(classnames, templates), self.cache,
                                    batch_size=self._text_batch_size())
            class_prompts = ClassPrompts(classnames, templates, origin, encoded)
            # where overriding prompts came from (their content is in prompts_digest)
            settings = {**settings, "templates_file": self.config.templates_file,
                        "classnames_file": self.config.classnames_file}
        elif needs.text == "captions":
            per_image = test_samples.captions or []
            flat = [c for caps in per_image for c in caps]
            owner = np.repeat(np.arange(len(per_image)), [len(c) for c in per_image])
            encoded = text_features(self.model, flat, self.cache, batch_size=self._text_batch_size())
            captions = Captions(encoded, owner)
        elif needs.text == "caption_sets":
            # each image's captions then its negatives; cached by content like every text list, so
            # other negatives are other cache entries
            groups = [(caps, negs) for caps, negs in zip(test_samples.captions, test_samples.negatives)]
            flat = [t for caps, negs in groups for t in (*caps, *negs)]
            owner = np.repeat(np.arange(len(groups)), [len(c) + len(n) for c, n in groups])
            positive = np.concatenate([np.arange(len(c) + len(n)) < len(c) for c, n in groups])
            encoded = text_features(self.model, flat, self.cache, batch_size=self._text_batch_size())
            examples = tuple(test_samples.examples) if test_samples.examples is not None else None
            caption_sets = CaptionSets(encoded, owner, positive, examples)
        t2 = time.perf_counter()
        inputs = TaskInputs(spec=spec, settings=task.settings(self.config), images=images,
                            class_prompts=class_prompts, captions=captions, caption_sets=caption_sets,
                            device=str(self.model.device),
                            jobs=self.config.probe_jobs)
        output = task.run(inputs)
        seconds = {"features": round(feature_seconds, 3)}
        if needs.text:
            seconds["text"] = round(t2 - t1, 3)
        seconds["task"] = round(time.perf_counter() - t2, 3)
        log.debug("%s/%s: inputs ready in %.2f s", spec.name, task.name, t2 - t0)
        record = results.Record(
            model=self.model.name, pretrained=self.model.pretrained, dataset=spec.record_name, task=task.name,
            split="test", metrics=output.metrics, primary_metric=output.primary_metric or spec.primary_metric,
            n_samples=output.n_samples, skipped=list(skipped),
            confidence_intervals={k: list(v) for k, v in output.confidence_intervals.items()},
            details=output.details,
            config={**output.config, **settings, **self._language_entry(spec), "decode": self.config.decode,
                    "model": self.model.describe()},
            versions=self.versions,
            seconds=seconds,
        )
        ids = test_samples.ids if test_samples is not None and test_samples.ids is not None else None
        if ids is None and test_samples is not None:
            ids = [f"#{i}" for i in range(len(test_samples))]  # a format without ids: positions
        return record, output, ids


class Failure(NamedTuple):
    """A dataset/task that failed (``task`` ``"load"`` and ``dataset`` ``"*"``: the model could not
    be loaded), its message, and the model as the run named it (``name[,pretrained]``)."""

    dataset: str
    task: str
    message: str
    model: str = ""


@dataclass
class RunResult:
    """What a run produced: records in order, and a :class:`Failure` for each failure."""

    records: list[results.Record] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def run(config: RunConfig) -> RunResult:
    """A whole `clipbench run`: every requested task of every model on every selected dataset.

    Each model is loaded once. Consecutive models with the same preprocessing are kept loaded
    together while the device has room (:mod:`clipbench.shared_decode`) and run dataset by
    dataset, each split's images decoded once for all of them; any other model runs every
    dataset alone and is released before the next one loads (``config.shared_decode`` False:
    always so). Every record is the one a separate run of its model writes. A model that cannot
    be loaded (unknown name, missing weights, out of memory), or a dataset or task that fails
    (missing data, a bad spec value, a metric undefined on the data), is reported in
    :attr:`RunResult.failures` and the run goes on; a failure of the distributed exchange ends
    it. Under ``torchrun``/``srun`` every rank goes through the models in the same order over
    one process group (a model that rank 0 cannot load is skipped by all ranks; one that only
    another rank cannot load ends the job, as with a single model).

    Raises:
        ClipbenchError: invalid settings, no dataset selected, or an output directory that cannot
            be written.
    """
    from clipbench import specs
    from clipbench.distributed import DistContext

    config.validate()
    config = config.resolved()
    selected = [spec.for_protocol(config.protocol) for spec in specs.select(config.datasets)]
    if not selected:
        raise ClipbenchError(f"No datasets matched {config.datasets}; `clipbench datasets` lists them.")
    for flag, directory in (("--output", config.output), ("--cache-dir", config.cache_dir)):
        results.ensure_writable(directory, flag)
        remove_stale_temporaries(Path(directory))
    # torchrun / srun: rank 0 runs the pipeline, the other ranks encode shards of its splits.
    dist_ctx = DistContext.from_env(config.device)
    outcome = RunResult()
    try:
        for group in _model_groups(config, dist_ctx, outcome):
            _evaluate_group(group, config, selected, dist_ctx, outcome)
            group.clear()  # the group's models are out of scope: free them before the next ones load
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        dist_ctx.close()
    return outcome


def _model_groups(config: RunConfig, dist_ctx: Any, outcome: RunResult) -> Iterator[list[tuple[ModelChoice, Any]]]:
    """The run's models, loaded, in groups evaluated together (:mod:`clipbench.shared_decode`):
    consecutive models with the same preprocessing while the device has room for them; one model
    per group under ``torchrun`` or without ``config.shared_decode``. A model that cannot be
    loaded is a failure in ``outcome``. The caller empties each group before taking the next."""
    from clipbench.shared_decode import device_memory, model_bytes, room_for_another, same_preprocessing

    together = config.shared_decode and not dist_ctx.distributed
    group: list[tuple[ModelChoice, Any]] = []
    for index, choice in enumerate(config.models):
        if group:
            memory = device_memory(str(group[0][1].device))
            if memory is None or not room_for_another(*memory, max(model_bytes(m) for _, m in group)):
                log.info("no room on %s for another model beside %d: evaluating those first",
                         group[0][1].device, len(group))
                yield group
                group = []
        model = _load_model(choice, config, dist_ctx, outcome)
        if model is None:
            continue
        if group and not same_preprocessing(group[0][1], model):
            yield group
            group = []
        group.append((choice, model))
        del model  # held by the group alone, which the caller empties
        if not together:
            yield group
            group = []
            if index < len(config.models) - 1:
                dist_ctx.next_model()  # serving ranks load the next model with rank 0
    if group:
        yield group


def _load_model(choice: ModelChoice, config: RunConfig, dist_ctx: Any, outcome: RunResult) -> Any:
    """``choice`` loaded on this rank's device, or None (a failure in ``outcome``) when it cannot be."""
    from clipbench.models import load_model

    attempted = []  # ranks > 0 load only once rank 0 has loaded: a failure then is theirs alone

    def load() -> Any:
        attempted.append(True)
        return load_model(choice.name, choice.pretrained, device=dist_ctx.device(config.device),
                          precision=config.precision, cache_dir=config.cache_dir,
                          allow_download=config.allow_download)

    try:
        model = dist_ctx.main_first(load)
    except Exception as exc:  # any loading error (a backend's own, out of memory) is this model's alone
        if not dist_ctx.is_main and attempted:
            raise  # this rank alone cannot load what rank 0 loaded: the job ends
        # rank 0 failed and told every rank: all of them go on to the next model
        if dist_ctx.is_main:
            outcome.failures.append(Failure("*", "load", str(exc) or type(exc).__name__, choice.label))
            log.error("%s: could not be loaded: %s", choice.label, exc)
            log.debug("%s: loading failed here", choice.label, exc_info=True)  # -vv
        return None
    dist_ctx.check_same_model(model)
    if config.decode != RunConfig.default("decode"):
        from clipbench.decode import decoder_for

        try:  # a preprocessing the decoder cannot reproduce: this model fails before any data is read
            decoder_for(config.decode, model)
        except ClipbenchError as exc:
            if dist_ctx.is_main:
                outcome.failures.append(Failure("*", "load", str(exc), choice.label))
                log.error("%s: %s", choice.label, exc)
            return None
    return model


def _evaluate_group(group: list[tuple[ModelChoice, Any]], config: RunConfig, selected: list[DatasetSpec],
                    dist_ctx: Any, outcome: RunResult) -> None:
    """Every applicable task of the loaded models of ``group`` on ``selected`` into ``outcome``,
    dataset by dataset, the models in order within each (other ranks: serve rank 0's requests)."""
    from clipbench.distributed import DistributedError
    from clipbench.shared_decode import SharedDecoder

    evaluators = [Evaluator(model, config, encoder=dist_ctx.encode if dist_ctx.distributed else None)
                  for _, model in group]
    if not dist_ctx.is_main:
        dist_ctx.serve(group[0][1], evaluators[0].load_samples)
        return
    shared = SharedDecoder([model for _, model in group], evaluators[0].cache) if len(group) > 1 else None
    for index, evaluator in enumerate(evaluators):
        if shared is not None:
            evaluator.encoder = shared.encoder(index)
    for spec, text in (run for base in selected for run in language_runs(base, config.languages)):
        if shared is not None:
            shared.start_dataset({index: ev.roles_to_encode(spec, text) for index, ev in enumerate(evaluators)})
        for index, ((choice, _), evaluator) in enumerate(zip(group, evaluators)):
            evaluator.start_dataset(spec)
            for task in evaluator.tasks_for(spec, text):
                try:
                    outcome.records.append(evaluator.run_task(spec, task))
                except DistributedError:
                    raise
                except (ClipbenchError, ValueError, TypeError) as exc:
                    outcome.failures.append(Failure(spec.record_name, task.name, str(exc), choice.label))
                    log.error("%s/%s: %s", spec.record_name, task.name, exc)
                    log.debug("%s/%s failed here", spec.record_name, task.name, exc_info=True)  # -vv
            evaluator.end_dataset()
            if shared is not None:
                shared.finished(index)
