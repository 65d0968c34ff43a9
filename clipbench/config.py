"""The settings of one `clipbench run`: every default is stated here once.

`clipbench.cli` builds its flags' defaults from :class:`RunConfig`; `clipbench.pipeline.run` takes a
``RunConfig`` and fills the choices left open (``None``) with :meth:`RunConfig.resolved`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipbench.errors import ClipbenchError
from clipbench.paths import default_cache_dir, default_data_root

#: The embedded offline default: a tiny CLIP trained on clipbench's synthetic world.
EMBEDDED_MODEL = "clipbench-tiny"
EMBEDDED_PRETRAINED = "synthetic"
EMBEDDED_DATASETS = ("default",)
#: Tasks and datasets of a run with a user-chosen model. The caption-set tasks apply only to their
#: own datasets (SugarCrepe, Winoground, WinoGAViL), so `--datasets sugar_crepe` runs them unasked.
MODEL_DATASETS = ("paper", "retrieval")
MODEL_TASKS = ("zeroshot", "linear_probe", "retrieval", "caption_selection", "winoground", "association")
PRECISIONS = ("fp32", "fp16", "bf16", "amp")
DEVICES = ("auto", "cpu", "cuda")
PROBE_SOLVERS = ("sklearn", "torch")
PROBE_FEATURES = ("pre_projection", "projected")
#: --on-bad-image: a split with undecodable images fails (naming them), or leaves them out
BAD_IMAGE_POLICIES = ("fail", "skip")
#: --language accepts clip_benchmark's codes for its ImageNet prompts (cn, jp) as the ISO 639-1
#: codes clipbench's specs use
LANGUAGE_ALIASES = {"cn": "zh", "jp": "ja"}


@dataclass(frozen=True)
class EvalProtocol:
    """What an evaluation protocol (``--protocol``) sets. ``precision``: what the model runs at
    unless ``--precision`` says otherwise (and, with ``fixed_precision``, the only one allowed);
    the protocol's data, prompts and metrics are the ``protocols.<name>`` blocks of the dataset
    specs (:meth:`clipbench.specs.DatasetSpec.for_protocol`)."""

    name: str
    precision: str
    fixed_precision: bool
    description: str


#: --protocol choices; ``paper`` is the default and changes nothing.
PROTOCOLS = {
    "paper": EvalProtocol("paper", "amp", False,
                          "the CLIP paper's: each spec's own data, prompt ensembles and metrics"),
    # eval_utils/wds_eval.py: model.half() commented out, run_classification(..., amp=False)
    "datacomp": EvalProtocol("datacomp", "fp32", True,
                             "DataComp's 38-task evaluation (mlfoundations/datacomp eval_utils): fp32 "
                             "without autocast, its copies of the data with their class names and "
                             "templates, test splits only, its main metric per task"),
}


@dataclass(frozen=True)
class ModelChoice:
    """One model of a run: a name as ``--model`` takes it and its pretrained choice (None: the
    backend's default)."""

    name: str
    pretrained: str | None = None

    @property
    def label(self) -> str:
        """``name,pretrained`` (or ``name``): how a models file and ``--model`` write it."""
        return self.name if self.pretrained is None else f"{self.name},{self.pretrained}"


def parse_model_choice(text: str, pretrained: str | None = None, *, where: str = "--model") -> ModelChoice:
    """``model`` or ``model,pretrained`` (clip_benchmark's ``--pretrained_model`` syntax);
    ``pretrained`` is used when the text gives none.

    Raises:
        ClipbenchError: an empty model or pretrained part, or more than one comma; ``where`` names
            the flag or file line in the message.
    """
    name, sep, tag = (part.strip() for part in text.strip().partition(","))
    if not name or (sep and not tag) or "," in tag:
        raise ClipbenchError(
            f"{where}: {text.strip()!r} is not a model: write `model` or `model,pretrained` (one comma), "
            "e.g. `ViT-B-32,laion2b_s34b_b79k` or `clipbench-tiny`."
        )
    return ModelChoice(name, tag if sep else pretrained)


def read_models_file(path: Path | str, pretrained: str | None = None) -> list[ModelChoice]:
    """The models of a ``--models FILE``: one ``model[,pretrained]`` per line, blank lines and
    lines starting with ``#`` ignored (clip_benchmark's ``--pretrained_model`` files read as they are).
    ``pretrained`` is used for lines that give none.

    Raises:
        ClipbenchError: a missing, unreadable or empty file, or a malformed line (naming file and line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipbenchError(
            f"--models {path} cannot be read ({type(exc).__name__}: {exc}); pass a text file with one "
            "`model[,pretrained]` per line."
        ) from None
    choices = [parse_model_choice(line, pretrained, where=f"--models {path} line {number}")
               for number, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not choices:
        raise ClipbenchError(
            f"--models {path} names no model (only blank or # comment lines); write one "
            "`model[,pretrained]` per line, e.g. `ViT-B-32,openai`."
        )
    return choices


@dataclass
class RunConfig:
    """Everything `clipbench run` needs.

    ``model``/``pretrained`` None means the embedded default; ``datasets``/``tasks`` None mean the
    defaults for that model (:meth:`resolved`). ``models`` lists several models for one run
    instead (then ``model``/``pretrained`` stay None).
    """

    model: str | None = None
    pretrained: str | None = None
    #: the models of the run, evaluated one after another on every dataset; None: the one model of
    #: ``model``/``pretrained``. :meth:`resolved` always fills it.
    models: list[ModelChoice] | None = None
    datasets: list[str] | None = None
    tasks: list[str] | None = None
    data_root: Path | None = None
    output: Path = Path("results")
    cache_dir: Path | None = None
    batch_size: int = 256
    #: prompts per text-encoder batch; None: 1024 on GPU (2x faster than one class per batch on an
    #: H100), 256 on CPU (ViT-S-32-alt on 2 cores, trimmed context, amp: 2,030 prompts/s at 256,
    #: 1,914 at 128, 1,205 at 32; fp32: 771, 825, 805; benchmarks/prompt_encoding.py); the batch
    #: size is part of the text-feature cache key: it can change the last bits of a feature
    text_batch_size: int | None = None
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    device: str = "auto"
    #: requested precision (None: the protocol's, ``amp`` for the paper's); records state what
    #: the loaded model actually ran at
    precision: str | None = None
    #: evaluation protocol (:data:`PROTOCOLS`): ``paper``, or ``datacomp`` (fp32, DataComp's data,
    #: prompts and metrics where a spec has a ``protocols.datacomp`` block)
    protocol: str = "paper"
    seed: int = 0
    force: bool = False
    allow_download: bool = True
    probe_solver: str = "sklearn"
    probe_features: str = "pre_projection"
    #: threads for the probes' sweep points; changes speed only (sklearn solver: the
    #: numbers are bit-identical for any job or BLAS thread count, tasks/linear_probe.py)
    probe_jobs: int = field(default_factory=lambda: min(7, os.cpu_count() or 1))
    few_shot_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    few_shot_seeds: int = 3
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    n_bootstrap: int = 1000
    templates_file: Path | None = None
    classnames_file: Path | None = None
    #: an image that cannot be read (truncated, empty, not an image, missing, too large): "fail"
    #: fails its split with a message naming the files; "skip" leaves those samples out and every
    #: record computed from the split lists them (``Record.skipped``)
    on_bad_image: str = "fail"
    #: keep consecutive models with the same preprocessing loaded together and decode each image
    #: once for all of them (clipbench/shared_decode.py); changes speed and memory only
    shared_decode: bool = True
    #: Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``, which refuses an image of
    #: more than twice this many pixels); None keeps Pillow's own default, 0 removes the limit
    max_image_pixels: int | None = None
    #: the text languages to evaluate (``--language``): each dataset runs once per language of these
    #: that its spec offers; None: each dataset in its own language, as before languages existed
    languages: list[str] | None = None
    #: how images become model input (clipbench/decode.py): "pil" decodes with Pillow and applies
    #: the model's own transform in the DataLoader workers; "torchvision" decodes JPEGs with
    #: torchvision.io on the model's device and resizes there (slightly other pixels)
    decode: str = "pil"

    @classmethod
    def default(cls, name: str) -> Any:
        """The default value of field ``name`` (for argparse)."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    @property
    def embedded(self) -> bool:
        return self.model is None and self.models is None

    def resolved(self) -> "RunConfig":
        """A copy with every open choice filled in: model, datasets, tasks and directories."""
        embedded = self.embedded
        cache = Path(self.cache_dir or default_cache_dir()).expanduser()
        if self.data_root is not None:
            data_root = Path(self.data_root)
        elif os.environ.get("CLIPBENCH_DATA_ROOT") or self.cache_dir is None:
            data_root = default_data_root()
        else:  # an explicit --cache-dir keeps generated data beside the features
            data_root = cache / "data"
        from clipbench.tasks import builtin_task_names

        model = EMBEDDED_MODEL if embedded else self.model
        pretrained = EMBEDDED_PRETRAINED if embedded and self.pretrained is None else self.pretrained
        return dataclasses.replace(
            self,
            model=model,
            pretrained=pretrained,
            models=list(self.models) if self.models is not None else [ModelChoice(model, pretrained)],
            datasets=list(self.datasets or (EMBEDDED_DATASETS if embedded else MODEL_DATASETS)),
            tasks=list(self.tasks if self.tasks is not None else
                       (builtin_task_names() if embedded else MODEL_TASKS)),
            data_root=data_root.expanduser(),
            cache_dir=cache,
            output=Path(self.output).expanduser(),
            # an unknown protocol is refused by validate(); resolving it keeps the paper's precision
            precision=self.precision or PROTOCOLS.get(self.protocol, PROTOCOLS["paper"]).precision,
            languages=list(dict.fromkeys(LANGUAGE_ALIASES.get(code, code) for code in self.languages))
            if self.languages is not None else None,
        )

    def validate(self) -> None:
        """Refuse settings that cannot give a result, before anything is loaded or computed.

        Raises:
            ClipbenchError: naming the flag, the bad value and what is accepted.
        """
        from clipbench.tasks import close_task_names, task_names

        problems = []
        if self.tasks is not None:
            if not self.tasks:
                problems.append(f"--tasks names no task; choose from {', '.join(task_names())}")
            for name in self.tasks:
                if name not in task_names():
                    problems.append(f"unknown task {name!r}{close_task_names(name)}; choose from "
                                    f"{', '.join(task_names())}")
        checks = [
            ("--batch-size", self.batch_size, self.batch_size >= 1, "an integer >= 1"),
            ("--workers", self.workers, self.workers >= 0, "an integer >= 0 (0 loads data in the main process)"),
            ("--bootstrap", self.n_bootstrap, self.n_bootstrap >= 0, "an integer >= 0 (0 disables intervals)"),
            ("--few-shot-seeds", self.few_shot_seeds, self.few_shot_seeds >= 1, "an integer >= 1"),
            ("--few-shot", self.few_shot_k, bool(self.few_shot_k) and min(self.few_shot_k) >= 1,
             "shots per class >= 1, e.g. 1,2,4,8,16"),
            ("--recall-k", self.recall_k, bool(self.recall_k) and min(self.recall_k) >= 1,
             "k values >= 1, e.g. 1,5,10"),
            ("--precision", self.precision, self.precision is None or self.precision in PRECISIONS,
             f"one of {', '.join(PRECISIONS)}"),
            ("--protocol", self.protocol, self.protocol in PROTOCOLS, f"one of {', '.join(PROTOCOLS)}"),
            ("--probe-solver", self.probe_solver, self.probe_solver in PROBE_SOLVERS,
             f"one of {', '.join(PROBE_SOLVERS)}"),
            ("--probe-features", self.probe_features, self.probe_features in PROBE_FEATURES,
             f"one of {', '.join(PROBE_FEATURES)}"),
            ("--probe-jobs", self.probe_jobs, self.probe_jobs >= 1, "an integer >= 1"),
            ("--on-bad-image", self.on_bad_image, self.on_bad_image in BAD_IMAGE_POLICIES,
             f"one of {', '.join(BAD_IMAGE_POLICIES)}"),
        ]
        from clipbench.decode import decoder_names

        checks.append(("--decode", self.decode, self.decode in decoder_names(),
                       f"one of {', '.join(decoder_names())}"))
        if self.max_image_pixels is not None:
            checks.append(("--max-image-pixels", self.max_image_pixels, self.max_image_pixels >= 0,
                           "a pixel count >= 0 (0: no limit)"))
        if self.languages is not None:
            from clipbench.specs import LANGUAGE_RE

            bad = [code for code in self.languages if not LANGUAGE_RE.match(LANGUAGE_ALIASES.get(code, code))]
            if not self.languages or bad:
                problems.append(f"--language {' '.join(bad or self.languages) or '(none)'} is invalid: expected "
                                "lowercase language codes such as en de zh (`clipbench datasets` lists each "
                                "dataset's languages)")
        if self.text_batch_size is not None:
            checks.append(("text_batch_size", self.text_batch_size, self.text_batch_size >= 1, "an integer >= 1"))
        problems += [f"{flag} {value!r} is invalid: expected {expected}" for flag, value, ok, expected in checks
                     if not ok]
        protocol = PROTOCOLS.get(self.protocol)
        if protocol is not None and protocol.fixed_precision and self.precision not in (None, protocol.precision):
            problems.append(f"--precision {self.precision} contradicts --protocol {protocol.name}, which "
                            f"evaluates at {protocol.precision} ({protocol.description}); drop --precision "
                            f"or pass --precision {protocol.precision}")
        if self.models is not None:
            labels = [choice.label for choice in self.models]
            if not labels:
                problems.append("the model list is empty; name at least one model")
            single = (self.model, self.pretrained)
            if single != (None, None) and self.models != [ModelChoice(*single)]:
                problems.append(f"model/pretrained {single} are given beside the model list {labels}; "
                                "put each model with its pretrained choice in the list")
            twice = sorted({label for label in labels if labels.count(label) > 1})
            if twice:
                problems.append(f"the model list names {', '.join(twice)} more than once; name each model once")
        for flag, path in (("--output", self.output), ("--cache-dir", self.cache_dir)):
            if path is not None and Path(path).exists() and not Path(path).is_dir():
                problems.append(f"{flag} {path} is a file, not a directory; pass a directory")
        if problems:
            raise ClipbenchError("Invalid run settings: " + "; ".join(problems) + ".")
