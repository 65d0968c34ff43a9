"""Dataset specs: YAML files that describe a dataset as data (source, splits, metric, prompts).

A spec is loaded, validated field by field (every problem is reported with the file, the field and
what was expected) and frozen into a :class:`DatasetSpec`. The schema is documented in
``docs/architecture.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from clipbench.data.formats import COMMON_FIELDS, get_format, known_types, option_names, parse_options
from clipbench.errors import ClipbenchError
from clipbench.metrics import get_metric, is_retrieval_metric, metric_names
from clipbench.paths import specs_dir, templates_dir
from clipbench.tasks.zeroshot import has_placeholder

log = logging.getLogger(__name__)

SPLIT_ROLES = ("train", "val", "test")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")

_TOP_FIELDS = {
    "name", "title", "tasks", "primary_metric", "num_classes", "multilabel", "groups", "paper_name",
    "source", "splits", "val_fraction", "classnames", "templates", "templates_origin",
    "class_subset", "subsample", "notes", "protocols", "language", "languages",
}
#: what a ``protocols.<name>`` block may not replace: the identity of the spec
_PROTOCOL_FIXED = {"name", "protocols"}
#: The language of a spec's text (captions, class names, templates) when it states none.
DEFAULT_LANGUAGE = "en"
LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]+)?$")
#: What one entry of a spec's ``languages:`` mapping may replace: the text fields, and the
#: storage format's own ``source:`` options (e.g. which caption file or column to read).
LANGUAGE_FIELDS = ("classnames", "templates", "templates_origin", "source")
#: Separates a dataset name from a language in record names and ``--datasets`` (``xtd10@de``).
LANGUAGE_SEPARATOR = "@"


@dataclass(frozen=True)
class SourceSpec:
    """Where the data lives and how its storage format reads it (see docs/architecture.md).

    ``options`` is the format's own options dataclass (``clipbench.data`` formats'
    ``options_class``), holding the ``source:`` fields beyond the common four.
    """

    type: str
    path: str
    options: Any
    download: bool = True
    manual: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A validated dataset spec. ``classnames``/``templates`` are loaded from their files."""

    name: str
    title: str
    tasks: tuple[str, ...]
    primary_metric: str
    source: SourceSpec
    splits: dict[str, Any]
    file: Path
    num_classes: int | None = None
    multilabel: bool = False
    groups: tuple[str, ...] = ()
    paper_name: str | None = None
    val_fraction: float = 0.2
    classnames: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    templates_origin: str | None = None
    class_subset: tuple[int, ...] | None = None
    subsample: dict[str, int] | None = None
    notes: str | None = None
    #: protocol name -> the spec fields that protocol replaces (``protocols:`` in the YAML)
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    #: the language of this spec's text; ``base_language`` is the one the spec file itself
    #: describes, ``languages`` the others it offers (code -> the validated replacement fields)
    language: str = DEFAULT_LANGUAGE
    base_language: str = DEFAULT_LANGUAGE
    languages: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_retrieval(self) -> bool:
        return "retrieval" in self.tasks

    @property
    def available_languages(self) -> tuple[str, ...]:
        """The base language, then the others of ``languages:`` in spec order."""
        return (self.base_language, *self.languages)

    @property
    def record_name(self) -> str:
        """The dataset name records and reports use: ``name`` in the base language, else
        ``name@language`` (so that each language has its own record)."""
        if self.language == self.base_language:
            return self.name
        return f"{self.name}{LANGUAGE_SEPARATOR}{self.language}"

    def for_language(self, language: str) -> "DatasetSpec":
        """This spec with the text of ``language`` (the base language: the spec itself).

        The image side (name, source path, splits, ``raw``, hence ``data_digest``) is the base
        spec's: every language of a dataset shares its image features.

        Raises:
            ClipbenchError: the spec does not offer ``language`` (naming the ones it does).
        """
        if language == self.language:
            return self
        if language == self.base_language:
            return parse_spec(self.raw, self.file)  # raw is always the base spec's
        if language not in self.languages:
            raise ClipbenchError(
                f"Dataset '{self.name}' has no text in language '{language}'{_close_hint(language, self.available_languages)}; "
                f"it offers {', '.join(self.available_languages)} (its spec's `language:` and `languages:` fields)."
            )
        entry = self.languages[language]
        options = self.source.options
        if entry.get("source"):
            options = dataclasses.replace(options, **entry["source"])
        title = f"{self.title} [{language}]"
        return dataclasses.replace(
            self, language=language, title=title, paper_name=None,  # the paper measured English only
            source=dataclasses.replace(self.source, options=options),
        )

    def prompts(self) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, str | None]:
        """(class names, templates, their origin) in this spec's language. ``classnames`` itself
        stays the base language's: formats match class folders by it (images do not change)."""
        entry = self.languages.get(self.language, {}) if self.language != self.base_language else {}
        return (tuple(entry["classnames"]) if "classnames" in entry else self.classnames,
                tuple(entry["templates"]) if "templates" in entry else self.templates,
                entry.get("templates_origin", self.templates_origin))

    @property
    def origin(self) -> str:
        """Which file the spec is, as records name it (and their settings digests hold it):
        ``packaged:<name>.yaml`` for a spec shipped with clipbench, the same on every installation
        and machine, so records made elsewhere are reused; else the absolute path of the file (a
        user's copy of a packaged spec is another spec)."""
        try:
            return f"packaged:{Path(self.file).resolve().relative_to(specs_dir().resolve()).as_posix()}"
        except ValueError:
            return str(self.file)

    @property
    def has_caption_sets(self) -> bool:
        """Whether the data are caption sets: images with captions and negative captions."""
        from clipbench.tasks import CAPTION_SET_METRICS

        return any(task in CAPTION_SET_METRICS for task in self.tasks)

    @property
    def is_captioned(self) -> bool:
        """Whether the data are images with captions (retrieval, caption sets), not labels."""
        return self.is_retrieval or self.has_caption_sets

    def split(self, role: str) -> Any:
        """The adapter split value for a role (``train``/``val``/``test``), or None."""
        return self.splits.get(role)

    def for_protocol(self, protocol: str) -> "DatasetSpec":
        """The spec as ``protocol`` evaluates it: its ``protocols.<protocol>`` fields replace the
        spec's own (DataComp reads its own copy of a dataset, with that copy's class names and
        templates); the spec itself when it has no such block. The result has no ``protocols``."""
        override = self.protocols.get(protocol)
        if override is None:
            return self
        return parse_spec(_with_protocol(self.raw, override), self.file)

    def data_digest(self) -> str:
        """Digest of every field that changes which images (and labels) a split yields.

        Templates and classnames are left out: they change text features, not image features.
        """
        keys = ("name", "source", "splits", "subsample")
        payload = json.dumps({k: self.raw.get(k) for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def eval_digest(self) -> str:
        """Digest of every spec field that can change a task's numbers, with file references
        resolved to their content (class folders, class subset). Prompts are digested by the
        tasks that use them; title, notes, groups and paper name change no number."""
        # protocols: another protocol's fields change this spec's numbers only once applied
        # (for_protocol), and then they are part of the applied spec's own fields; the other
        # languages' text is digested when that language runs (language, prompts)
        cosmetic = {"title", "notes", "groups", "paper_name", "templates_origin", "classnames", "templates",
                    "protocols", "language", "languages"}
        payload = {k: v for k, v in self.raw.items() if k not in cosmetic}
        payload.update(source=repr(self.source), class_subset=self.class_subset)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _close_hint(word: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Errors:
    def __init__(self, file: Path):
        self.file = file
        self.items: list[str] = []

    def add(self, field_name: str, expected: str, got: Any = None) -> None:
        got_text = "" if got is None else f", got {got!r}"
        self.items.append(f"field '{field_name}': expected {expected}{got_text}")

    def load_list(self, value: Any, field_name: str) -> list[str] | None:
        return _load_list(value, field_name, self.file, self)

    def raise_if_any(self) -> None:
        if self.items:
            lines = "\n  - ".join(self.items)
            raise ClipbenchError(
                f"Invalid dataset spec {self.file}:\n  - {lines}\n"
                "Fix these fields (the schema is in docs/architecture.md) and run again."
            )


class SpecYAMLError(yaml.YAMLError):
    """A YAML construct dataset specs refuse (alias, anchor, duplicate key), with its line."""

    def __init__(self, message: str, mark: yaml.Mark):
        super().__init__(message)
        self.message = message
        self.line = mark.line + 1


class SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what a spec never needs and what silently changes one.

    Aliases and anchors are refused while the document is composed, before any alias is
    expanded, so an alias bomb ("billion laughs") fails at once instead of exhausting memory. A
    key repeated in one mapping is refused (plain YAML keeps the last value without a word).
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecYAMLError(f"the alias *{event.anchor} repeats an anchored value", event.start_mark)
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise SpecYAMLError(f"the anchor &{event.anchor} marks a value to repeat", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys: SafeLoader's own error
            if key in seen:
                raise SpecYAMLError(
                    f"the key {key!r} appears twice in one mapping (first on line {seen[key]}); YAML "
                    "would silently keep the last value. Keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_spec_yaml(path: Path) -> Any:
    """The parsed YAML of a spec file, read with :class:`SpecLoader`.

    Raises:
        ClipbenchError: missing, a directory, not UTF-8, not valid YAML, or a refused construct
            (alias, anchor, duplicate key), naming the file and the line.
    """
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=SpecLoader)  # noqa: S506 (safe loader)
    except FileNotFoundError:
        raise ClipbenchError(f"Dataset spec file {path} does not exist.") from None
    except IsADirectoryError:
        raise ClipbenchError(f"Dataset spec {path} is a directory; pass the spec's .yaml file.") from None
    except UnicodeDecodeError as exc:
        raise ClipbenchError(
            f"Dataset spec {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); a spec is a YAML file."
        ) from None
    except SpecYAMLError as exc:
        fix = "Write the list or value out in full: dataset specs do not accept YAML anchors (&) or aliases (*)." \
            if "alias" in exc.message or "anchor" in exc.message else ""
        raise ClipbenchError(f"Dataset spec {path}, line {exc.line}: {exc.message}. {fix}".rstrip()) from None
    except yaml.YAMLError as exc:
        raise ClipbenchError(f"Dataset spec {path} is not valid YAML: {exc}") from None


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (class names, templates, index lists).

    Raises:
        ClipbenchError: the file is missing, a directory, or not UTF-8 text.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClipbenchError(f"File {path} does not exist.") from None
    except IsADirectoryError:
        raise ClipbenchError(f"{path} is a directory; expected a text file with one entry per line.") from None
    except UnicodeDecodeError as exc:
        raise ClipbenchError(f"File {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    return [line for line in text.splitlines() if line.strip()]


def classnames_mixup(names: Iterable[str]) -> str | None:
    """The first class name that holds a template placeholder (``{c}``, ``{}``), or None: such a
    list is a templates file given as classnames, which a matching line count would let through."""
    return next((name for name in names if has_placeholder(name)), None)


def read_classnames(path: Path) -> list[str]:
    """:func:`read_lines` of a classnames file, refusing a templates file given in its place.

    Raises:
        ClipbenchError: as :func:`read_lines`, or a line holds a template placeholder.
    """
    names = read_lines(path)
    template = classnames_mixup(names)
    if template is not None:
        raise ClipbenchError(
            f"Classnames file {path} holds the template {template!r}: it looks like a templates file "
            "given as classnames (a class name has no '{c}' placeholder). Pass the class names, one "
            "per line, and the templates with --templates."
        )
    return names


def _resolve_file(value: str, spec_file: Path) -> Path | None:
    for base in (spec_file.parent, templates_dir()):
        candidate = (base / value).expanduser()
        if candidate.is_file():
            return candidate
    return None


def _load_list(value: Any, field_name: str, spec_file: Path, errors: _Errors) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    if isinstance(value, str):
        path = _resolve_file(value, spec_file)
        if path is None:
            errors.add(
                field_name,
                f"an inline list or a file relative to the spec or to {templates_dir()}",
                value,
            )
            return None
        return read_lines(path)
    errors.add(field_name, "an inline list of strings or a file path", value)
    return None


def _validate_source(raw: Any, errors: _Errors) -> SourceSpec | None:
    """The common source fields here; the format's own fields by its options class."""
    if not isinstance(raw, dict):
        errors.add("source", "a mapping with at least 'type' and 'path'", raw)
        return None
    kind = raw.get("type")
    fmt = get_format(kind) if kind in known_types() else None
    if fmt is None:
        errors.add("source.type", f"one of {known_types()}{_close_hint(kind, known_types())}", kind)
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        errors.add("source.path", "a non-empty string (hub id, torchvision class or directory)", path)
    download = raw.get("download", True)
    if not isinstance(download, bool):
        errors.add("source.download", "true or false", download)
    manual = raw.get("manual")
    if manual is not None and not isinstance(manual, str):
        errors.add("source.manual", "a string", manual)
    if fmt is None:
        return None
    known = [*COMMON_FIELDS, *option_names(fmt.options_class)]
    for key in sorted(set(raw) - set(known), key=str):
        errors.add(f"source.{key}", f"a field of source type '{fmt.type}'{_close_hint(key, known)}; "
                   f"its fields: {known}", key)
    options = parse_options(fmt.options_class, raw, errors)
    if options is None or not isinstance(path, str):
        return None
    return SourceSpec(type=fmt.type, path=path, options=options, download=bool(download), manual=manual)


def _validate_tasks(raw: dict, errors: _Errors) -> tuple[list[str], Any, Any, Any]:
    """(tasks, primary metric, num_classes, multilabel) and their consistency."""
    # the task registry says which spec tasks exist
    from clipbench.tasks import CAPTION_SET_METRICS, spec_task_names

    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks or any(t not in spec_task_names() for t in tasks):
        errors.add("tasks", f"a non-empty list drawn from {spec_task_names()}", tasks)
        tasks = []
    is_retrieval = "retrieval" in tasks
    if is_retrieval and len(tasks) > 1:
        errors.add("tasks", "retrieval datasets support only the retrieval task", tasks)
    caption_sets = [t for t in tasks if t in CAPTION_SET_METRICS]
    if caption_sets and len(caption_sets) != len(tasks):
        errors.add("tasks", f"caption-set datasets ({', '.join(CAPTION_SET_METRICS)}) support only "
                   "caption-set tasks", tasks)
    allowed = [m for t in caption_sets for m in CAPTION_SET_METRICS[t]]

    metric = raw.get("primary_metric")
    if caption_sets:
        if metric not in allowed:
            errors.add("primary_metric", f"one of {allowed} (the metrics of {caption_sets})", metric)
    elif is_retrieval:
        if not is_retrieval_metric(metric):
            errors.add("primary_metric", "a retrieval metric such as 'text_to_image_R@1'", metric)
    elif metric not in metric_names():
        errors.add("primary_metric", f"one of {list(metric_names())}", metric)

    num_classes = raw.get("num_classes")
    captioned = is_retrieval or bool(caption_sets)  # no classes: num_classes, label metrics do not apply
    if not captioned and (not isinstance(num_classes, int) or num_classes < 2):
        errors.add("num_classes", "an integer >= 2 for a classification dataset", num_classes)
    multilabel = raw.get("multilabel", False)
    if not isinstance(multilabel, bool):
        errors.add("multilabel", "true or false", multilabel)
    elif not captioned and metric in metric_names() and (get_metric(metric).kind == "multilabel") != multilabel:
        errors.add(
            "primary_metric",
            f"a {'multi' if multilabel else 'single'}-label metric to match multilabel: "
            f"{str(multilabel).lower()} ({', '.join(metric_names('multilabel'))} for multi-label datasets)",
            metric,
        )
    return tasks, metric, num_classes, multilabel


def _validate_splits(raw: dict, tasks: list[str], errors: _Errors) -> tuple[dict, Any, Any]:
    """(splits, val_fraction, subsample)."""
    splits = raw.get("splits")
    if not isinstance(splits, dict) or "test" not in splits or splits.get("test") is None:
        errors.add("splits", "a mapping with at least a 'test' split (and 'train'/'val')", splits)
        splits = {}
    for role in sorted(set(splits) - set(SPLIT_ROLES)):
        errors.add(f"splits.{role}", f"one of the split roles {list(SPLIT_ROLES)}", role)
    if "linear_probe" in tasks and splits.get("train") is None:
        errors.add("splits.train", "a train split for a dataset with the linear_probe task", None)

    val_fraction = raw.get("val_fraction", 0.2)
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        errors.add("val_fraction", "a fraction strictly between 0 and 1", val_fraction)

    subsample = raw.get("subsample")
    if subsample is not None:
        if not isinstance(subsample, dict) or not all(
            k in (*SPLIT_ROLES, "seed") and isinstance(v, int) and (v >= 0 if k == "seed" else v > 0)
            for k, v in subsample.items()
        ):
            errors.add("subsample", "a mapping {train|val|test: count, seed: int}", subsample)
    return splits, val_fraction, subsample


def _validate_classes(raw: dict, tasks: list[str], num_classes: Any, file: Path,
                      errors: _Errors) -> tuple[list[str] | None, list[str] | None, tuple[int, ...] | None]:
    """(classnames, templates, class subset), loaded from their files, checked against num_classes."""
    classnames = _load_list(raw.get("classnames"), "classnames", file, errors)
    template = classnames_mixup(classnames or ())
    if template is not None:
        where = f" in {_resolve_file(raw['classnames'], file)}" if isinstance(raw["classnames"], str) else ""
        errors.add("classnames", f"class names, not templates: the line {template!r}{where} holds a "
                   "template placeholder (a templates file given as classnames?)", raw["classnames"])
        classnames = None
    templates = _load_list(raw.get("templates"), "templates", file, errors)
    # formats whose data ships classnames and templates (webdataset) let the spec defer to them
    source_type = raw["source"].get("type") if isinstance(raw.get("source"), dict) else None
    defers = source_type in known_types() and get_format(source_type).provides_prompts
    if "zeroshot" in tasks and not defers:
        if classnames is None:
            errors.add("classnames", "a classnames file or list (needed by the zeroshot task)", None)
        if templates is None:
            errors.add("templates", "a templates file or list (needed by the zeroshot task)", None)
    if templates:
        bad = [t for t in templates if not has_placeholder(t)]
        if bad:
            errors.add("templates", "every template to contain the '{c}' placeholder", bad[0])
    class_subset = _load_list(raw.get("class_subset"), "class_subset", file, errors)
    subset_ints: tuple[int, ...] | None = None
    if class_subset is not None:
        try:
            subset_ints = tuple(int(v) for v in class_subset)
        except ValueError:
            errors.add("class_subset", "a list (or file) of integer class indices", class_subset[:3])
    if subset_ints is not None and isinstance(num_classes, int) and len(subset_ints) != num_classes:
        errors.add("class_subset", f"{num_classes} class indices (num_classes)", len(subset_ints))
    if classnames is not None and isinstance(num_classes, int):
        if subset_ints is not None:
            # the subset indexes into the full class list (ImageNet-R/A: 200 of ImageNet's 1,000)
            if subset_ints and max(subset_ints) >= len(classnames):
                errors.add("class_subset", f"indices below {len(classnames)} (the classnames)", max(subset_ints))
        elif len(classnames) != num_classes:
            errors.add("classnames", f"{num_classes} class names (num_classes)", len(classnames))
    return classnames, templates, subset_ints


def _validate_languages(raw: dict, source: SourceSpec | None, num_classes: Any, class_subset: Any,
                        file: Path, errors: _Errors) -> tuple[str, dict[str, dict[str, Any]]]:
    """(base language, other language -> its replacement fields, loaded and parsed)."""
    base = raw.get("language", DEFAULT_LANGUAGE)
    if not isinstance(base, str) or not LANGUAGE_RE.match(base):
        errors.add("language", "a lowercase language code such as 'en' or 'zh'", base)
        base = DEFAULT_LANGUAGE
    mapping = raw.get("languages") or {}
    if not isinstance(mapping, dict):
        errors.add("languages", "a mapping of language code -> the fields that language replaces", mapping)
        return base, {}
    languages: dict[str, dict[str, Any]] = {}
    for code, entry in mapping.items():
        where = f"languages.{code}"
        if not isinstance(code, str) or not LANGUAGE_RE.match(code) or code == base:
            errors.add("languages", f"language codes such as 'de' other than the base language '{base}'", code)
            continue
        if not isinstance(entry, dict) or not entry:
            errors.add(where, f"a mapping of the fields the language replaces, among {list(LANGUAGE_FIELDS)}", entry)
            continue
        for key in sorted(set(entry) - set(LANGUAGE_FIELDS), key=str):
            errors.add(f"{where}.{key}", f"one of {list(LANGUAGE_FIELDS)}{_close_hint(key, LANGUAGE_FIELDS)}", key)
        parsed: dict[str, Any] = {}
        for key in ("classnames", "templates"):
            if key in entry:
                items = _load_list(entry[key], f"{where}.{key}", file, errors)
                if items is not None:
                    parsed[key] = items
        if classnames_mixup(parsed.get("classnames", ())) is not None:
            errors.add(f"{where}.classnames", "class names, not templates (a line holds a placeholder)",
                       classnames_mixup(parsed["classnames"]))
        if any(not has_placeholder(t) for t in parsed.get("templates", ())):
            errors.add(f"{where}.templates", "every template to contain the '{c}' placeholder",
                       next(t for t in parsed["templates"] if not has_placeholder(t)))
        names = parsed.get("classnames")
        if names is not None and isinstance(num_classes, int):
            if class_subset is not None and class_subset and max(class_subset) >= len(names):
                errors.add(f"{where}.classnames", f"more than {max(class_subset)} class names (class_subset)", len(names))
            elif class_subset is None and len(names) != num_classes:
                errors.add(f"{where}.classnames", f"{num_classes} class names (num_classes)", len(names))
        origin = entry.get("templates_origin")
        if origin is not None:
            if isinstance(origin, str):
                parsed["templates_origin"] = origin
            else:
                errors.add(f"{where}.templates_origin", "a string", origin)
        replaced = entry.get("source")
        if replaced is not None and source is not None:
            fmt = get_format(source.type)
            known = option_names(fmt.options_class)
            if not isinstance(replaced, dict):
                errors.add(f"{where}.source", f"a mapping of source options of type '{source.type}': {list(known)}", replaced)
            else:
                for key in sorted(set(replaced) - set(known), key=str):
                    errors.add(f"{where}.source.{key}", f"a source option of type '{source.type}' "
                               f"(the data's path, type and splits are shared by every language){_close_hint(key, known)}; "
                               f"its options: {list(known)}", key)
                options = parse_options(fmt.options_class, replaced, errors, prefix=f"{where}.source")
                if options is not None:
                    parsed["source"] = {k: getattr(options, k) for k in replaced if k in known}
        languages[code] = parsed
    return base, languages


def parse_spec(raw: Any, file: Path) -> DatasetSpec:
    """Validate a parsed YAML mapping and build a :class:`DatasetSpec`.

    Raises:
        ClipbenchError: listing every invalid field (file, field, expected value).
    """
    errors = _Errors(file)
    if not isinstance(raw, dict):
        errors.add("(top level)", "a YAML mapping of spec fields", type(raw).__name__)
        errors.raise_if_any()
    for key in sorted(set(raw) - _TOP_FIELDS):
        errors.add(key, f"a known spec field{_close_hint(key, sorted(_TOP_FIELDS))}; "
                   f"known fields: {sorted(_TOP_FIELDS)}", key)

    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors.add("name", "a lowercase identifier of [a-z0-9_-]", name)
    if isinstance(name, str) and file.suffix in (".yaml", ".yml") and file.stem != name:
        errors.add("name", f"to equal the file name stem '{file.stem}'", name)
    title = raw.get("title", name)
    groups = raw.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        errors.add("groups", "a list of group names", groups)
        groups = []
    paper_name = raw.get("paper_name")
    if paper_name is not None and not isinstance(paper_name, str):
        errors.add("paper_name", "the dataset's column name in the paper's tables", paper_name)
    for key in ("title", "templates_origin", "notes"):
        value = title if key == "title" else raw.get(key)
        if value is not None and not isinstance(value, str):
            errors.add(key, "a string", value)

    tasks, metric, num_classes, multilabel = _validate_tasks(raw, errors)
    source = _validate_source(raw.get("source"), errors)
    splits, val_fraction, subsample = _validate_splits(raw, tasks, errors)
    classnames, templates, class_subset = _validate_classes(raw, tasks, num_classes, file, errors)
    protocols = _validate_protocols(raw, file, errors)
    if (source is not None and isinstance(metric, str) and metric in metric_names()
            and get_metric(metric).grouped and getattr(source.options, "group_column", None) is None):
        errors.add("source.group_column", f"the metadata member holding each sample's group (primary metric "
                   f"{metric} compares groups of samples), e.g. npy with group_index 0", None)
    base_language, languages = _validate_languages(raw, source, num_classes, class_subset, file, errors)
    errors.raise_if_any()
    assert source is not None
    return DatasetSpec(
        name=name,
        title=title,
        tasks=tuple(tasks),
        primary_metric=metric,
        source=source,
        splits=dict(splits),
        file=file,
        num_classes=num_classes,
        multilabel=multilabel,
        groups=tuple(groups),
        paper_name=paper_name,
        val_fraction=float(val_fraction),
        classnames=tuple(classnames) if classnames is not None else None,
        templates=tuple(templates) if templates is not None else None,
        templates_origin=raw.get("templates_origin"),
        class_subset=class_subset,
        subsample=dict(subsample) if subsample else None,
        notes=raw.get("notes"),
        protocols=protocols,
        language=base_language,
        base_language=base_language,
        languages=languages,
        raw=dict(raw),
    )


def _with_protocol(raw: dict, override: dict) -> dict:
    """The raw spec with a ``protocols.<name>`` block applied. The result has no ``protocols``, nor
    the spec's other ``languages`` unless the block gives its own: a protocol's copy of the data
    comes with its own text, which the spec's translations do not describe."""
    merged = {k: v for k, v in raw.items() if k not in ("protocols", "languages")}
    merged.update(override)
    return merged


def _validate_protocols(raw: dict, file: Path, errors: _Errors) -> dict[str, dict[str, Any]]:
    """``protocols``: protocol name -> spec fields it replaces; each applied spec must validate."""
    value = raw.get("protocols")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        errors.add("protocols", "a mapping of protocol name -> mapping of the spec fields it replaces",
                   value)
        return {}
    out = {}
    for protocol, override in value.items():
        for key in sorted(set(override) & _PROTOCOL_FIXED):
            errors.add(f"protocols.{protocol}.{key}", "a spec field a protocol may replace (not name or "
                       "protocols)", key)
        for key in sorted(set(override) - _TOP_FIELDS):
            errors.add(f"protocols.{protocol}.{key}", f"a known spec field{_close_hint(key, sorted(_TOP_FIELDS))}",
                       key)
        if set(override) & _PROTOCOL_FIXED or set(override) - _TOP_FIELDS:
            continue
        try:
            parse_spec(_with_protocol(raw, override), file)
        except ClipbenchError as exc:
            errors.add(f"protocols.{protocol}", "fields that make a valid spec once applied", str(exc))
            continue
        out[str(protocol)] = dict(override)
    return out


def load_spec_file(path: Path) -> DatasetSpec:
    path = Path(path)
    return parse_spec(read_spec_yaml(path), path)


def spec_files() -> dict[str, Path]:
    """Packaged spec files by dataset name."""
    return {p.stem: p for p in sorted(specs_dir().glob("*.yaml"))}


def list_specs() -> list[DatasetSpec]:
    """Every packaged spec, sorted by name."""
    return [load_spec_file(p) for p in spec_files().values()]


def _looks_like_path(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) or "/" in value or value.startswith(".")


def find_spec(name: str) -> DatasetSpec | None:
    """The packaged spec called ``name`` (case-insensitive), or None; ``name@language`` is that
    spec in one of its languages (:meth:`DatasetSpec.for_language`, which raises for a language
    the spec lacks)."""
    files = spec_files()
    key, _, language = name.lower().partition(LANGUAGE_SEPARATOR)
    if key in files:
        spec = load_spec_file(files[key])
        return spec.for_language(language) if language else spec
    return None


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """Load a spec by packaged name or by file path.

    Raises:
        ClipbenchError: unknown name (with the closest names) or invalid spec.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or _looks_like_path(text):
        spec = load_spec_file(Path(text).expanduser())
        packaged = spec_files().get(spec.name)
        if packaged is not None and packaged.resolve() != spec.file.resolve():
            log.warning("Dataset spec %s is named '%s' like the packaged spec %s; the file given wins "
                        "(its records, stored under that name, carry its own settings digest, so a "
                        "packaged spec's record is recomputed, not reused)", spec.file, spec.name, packaged)
        return spec
    spec = find_spec(text)
    if spec is None:
        names = list(spec_files())
        close = difflib.get_close_matches(text.lower(), names + list(all_groups()), n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ClipbenchError(
            f"Unknown dataset '{text}'.{hint} `clipbench datasets` lists every dataset; a path to "
            "a spec file (*.yaml) also works."
        )
    return spec


def all_groups() -> dict[str, list[str]]:
    """Group name -> sorted dataset names, over the packaged specs."""
    groups: dict[str, list[str]] = {}
    for spec in list_specs():
        for group in spec.groups:
            groups.setdefault(group, []).append(spec.name)
    return {g: sorted(v) for g, v in sorted(groups.items())}


def select(items: Iterable[str]) -> list[DatasetSpec]:
    """Resolve dataset names, group names, spec paths or comma-separated mixes, in order, once each."""
    chosen: dict[str, DatasetSpec] = {}
    groups = None
    for item in items:
        for token in (t.strip() for t in str(item).split(",")):
            if not token:
                continue
            if not _looks_like_path(token) and find_spec(token) is None:
                groups = groups if groups is not None else all_groups()
                if token in groups:
                    for name in groups[token]:
                        chosen.setdefault(name, load_spec(name))
                    continue
            spec = load_spec(token)
            if spec.name in chosen and _looks_like_path(token) and chosen[spec.name].file != spec.file:
                log.warning("%s and %s are both named '%s'; the file given by path wins",
                            chosen[spec.name].file, spec.file, spec.name)
                chosen[spec.name] = spec  # a spec given by path wins over a packaged one
            chosen.setdefault(spec.name, spec)
    return list(chosen.values())
