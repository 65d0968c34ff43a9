"""Storage formats: the base class every source type derives from, and the registry of them.

A storage format (``source.type`` in a spec) is one :class:`SourceFormat` subclass with its own
options dataclass (only the ``source:`` fields that format reads), registered once with
:func:`register_format`. Specs validate their ``source:`` block through it and
:func:`clipbench.data.load_split` loads through it, so a new format touches no other module.

The logic every format shares lives here once: where local data may sit, whether a download may
start, and the one message a user gets when data is missing.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, TypeVar

from clipbench.data.base import Samples
from clipbench.errors import ClipbenchError
from clipbench.paths import network_reachable, offline

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec

__all__ = [
    "DataStatus", "NoOptions", "SourceFormat", "SpecReader", "get_format", "known_types",
    "parse_options", "register_format", "unregister_format",
]

#: The ``source:`` fields every format has; specs.py reads them, the format reads the rest.
COMMON_FIELDS = ("type", "path", "download", "manual")

#: (classnames, templates, where the templates came from), each None when the data has none
Prompts = tuple[list[str] | None, list[str] | None, str | None]


@dataclass(frozen=True)
class DataStatus:
    """Whether a dataset's data is present locally, where, and how to get it when it is not."""

    present: bool
    location: str
    how_to_get: str


@dataclass(frozen=True)
class NoOptions:
    """Options of a format that reads no ``source:`` field beyond the common ones."""


class SpecReader(Protocol):
    """What a format's options parser gets from the spec loader (``specs._Errors``)."""

    def add(self, field_name: str, expected: str, got: Any = None) -> None:
        """Record one invalid field."""

    def load_list(self, value: Any, field_name: str) -> list[str] | None:
        """An inline list, or the lines of a file relative to the spec or the templates folder."""


# option kind -> (accepted YAML value types, how an error line describes it); "list" options are
# read by the spec loader (an inline list or a file), as classnames are
_KINDS: dict[str, tuple[type, str]] = {
    "str": (str, "a string"),
    "bool": (bool, "true or false"),
    "int": (int, "an integer"),
    "mapping": (dict, "a mapping"),
}


def _kind(hint: Any) -> str:
    """The option kinds a format may declare: str, bool, int, mapping, list (each optionally None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):
        return "list"
    if origin in (dict, Mapping):
        return "mapping"
    if hint in (str, bool, int):
        return hint.__name__
    raise TypeError(f"unsupported option type {hint!r}: use str, bool, int, dict[str, Any] or tuple[str, ...]")


def parse_options(options_class: type, raw: Mapping[str, Any], reader: SpecReader, prefix: str = "source") -> Any:
    """Build ``options_class`` from the ``raw`` mapping, checking each field against its type hint.

    A field that is absent or null keeps its default. Fields of ``raw`` that ``options_class`` lacks
    are ignored here (the caller reports them with the format's field list). A field's
    ``metadata["expected"]`` overrides the generic description in error lines.

    Returns:
        The options instance, or None when a field was invalid (the reader holds the errors).
    """
    hints = typing.get_type_hints(options_class)
    values: dict[str, Any] = {}
    ok = True
    for f in dataclasses.fields(options_class):
        value = raw.get(f.name)
        if value is None:
            continue
        kind, name = _kind(hints[f.name]), f"{prefix}.{f.name}"
        if kind == "list":
            items = reader.load_list(value, name)
            ok = ok and items is not None
            values[f.name] = tuple(items or ())
            continue
        accepted, generic = _KINDS[kind]
        if not isinstance(value, accepted) or (kind == "int" and isinstance(value, bool)):
            reader.add(name, f.metadata.get("expected", generic), value)
            ok = False
            continue
        values[f.name] = dict(value) if kind == "mapping" else value
    return options_class(**values) if ok else None


def option_names(options_class: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(options_class))


class SourceFormat:
    """One storage format. Subclasses set ``type`` and ``options_class`` and implement :meth:`load`.

    ``spec.source.options`` is an instance of ``options_class`` by the time any method runs.
    """

    type: ClassVar[str]
    #: The dataclass of this format's own ``source:`` fields (validated by :func:`parse_options`).
    options_class: ClassVar[type] = NoOptions
    #: True when the data itself carries classnames/templates, so a zero-shot spec may omit them.
    provides_prompts: ClassVar[bool] = False
    #: Why a missing local copy cannot be fetched, for formats that never download.
    no_download_reason: ClassVar[str] = "it has no download source"

    # ---------------------------------------------------------------- where the data is
    def candidate_dirs(self, spec: "DatasetSpec", data_root: Path) -> list[Path]:
        """Where local data may sit, in the order they are tried."""
        src = Path(spec.source.path).expanduser()
        dirs = [src] if src.is_absolute() else []
        dirs.append(data_root / spec.name)
        if not src.is_absolute():
            dirs.append(data_root / spec.source.path)
        return dirs

    def locate(self, spec: "DatasetSpec", data_root: Path) -> Path | None:
        """The first existing local directory for the spec's data, or None."""
        return next((d for d in self.candidate_dirs(spec, data_root) if d.is_dir()), None)

    def how_to_get(self, spec: "DatasetSpec", data_root: Path) -> str:
        """One sentence telling the user how to provide the data."""
        target = data_root / spec.name
        if spec.source.manual:
            return f"manual download: {spec.source.manual.strip()} Place it at {target} (or pass --data-root DIR)."
        return self.automatic_hint(spec, target)

    def automatic_hint(self, spec: "DatasetSpec", target: Path) -> str:
        """How to get data that needs no manual steps (formats that download say how)."""
        return (
            f"put the files at {target} in the layout of docs/architecture.md (source type {self.type}), "
            "or pass --data-root DIR"
        )

    def status(self, spec: "DatasetSpec", data_root: Path) -> DataStatus:
        found = self.locate(spec, data_root)
        if found is not None:
            return DataStatus(True, str(found), "")
        looked = ", ".join(str(d) for d in self.candidate_dirs(spec, data_root))
        return DataStatus(False, looked, self.how_to_get(spec, data_root))

    # ---------------------------------------------------------------- shared load steps
    @staticmethod
    def may_download(spec: "DatasetSpec", allow_download: bool) -> str | None:
        """None if a download may start now, else the reason it may not."""
        if not spec.source.download or spec.source.manual:
            return "this dataset cannot be downloaded automatically"
        if not allow_download:
            return "downloads are disabled (--no-download)"
        if offline():
            return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / CLIPBENCH_OFFLINE)"
        if not network_reachable():
            return "the network is unreachable"
        return None

    def missing(self, spec: "DatasetSpec", role: str, data_root: Path, reason: str) -> ClipbenchError:
        status = self.status(spec, data_root)
        return ClipbenchError(
            f"Data for dataset '{spec.name}' (split '{role}') is not available locally and {reason}. "
            f"Looked in: {status.location}. To get it: {status.how_to_get.rstrip('.')}."
        )

    def require_local(self, spec: "DatasetSpec", role: str, data_root: Path) -> Path:
        """The local data directory of a format that never downloads, or the missing-data error."""
        root = self.locate(spec, data_root)
        if root is None:
            raise self.missing(spec, role, data_root, self.no_download_reason)
        return root

    # ---------------------------------------------------------------- per format
    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        """The split playing ``role`` (the spec has it; :func:`clipbench.data.load_split` checked)."""
        raise NotImplementedError

    def prompts(self, spec: "DatasetSpec", data_root: Path) -> Prompts:
        """Classnames, templates and where the templates came from, when the data carries them."""
        return None, None, None


_FORMATS: dict[str, SourceFormat] = {}
F = TypeVar("F", bound=type)


def register_format(cls: F) -> F:
    """Register a :class:`SourceFormat` subclass under its ``type`` (usable as a class decorator).

    Raises:
        ValueError: another format already has that type, or the class is incomplete.
    """
    kind = getattr(cls, "type", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{cls.__name__} needs a class attribute `type` (the spec's source.type)")
    if kind in _FORMATS:
        raise ValueError(f"source type '{kind}' is already registered ({type(_FORMATS[kind]).__name__})")
    clash = set(option_names(cls.options_class)) & set(COMMON_FIELDS)
    if clash:
        raise ValueError(f"{cls.__name__}.options_class redefines the common source fields {sorted(clash)}")
    for f in dataclasses.fields(cls.options_class):
        _kind(typing.get_type_hints(cls.options_class)[f.name])  # fails now, not at the first spec
    _FORMATS[kind] = cls()
    return cls


def unregister_format(kind: str) -> None:
    """Remove a registered format (tests that register their own use this to clean up)."""
    _FORMATS.pop(kind, None)


def known_types() -> list[str]:
    return sorted(_FORMATS)


def get_format(kind: Any) -> SourceFormat:
    """The registered format for a ``source.type``.

    Raises:
        ClipbenchError: unknown type, with the close names and every known type.
    """
    found = _FORMATS.get(kind) if isinstance(kind, str) else None
    if found is not None:
        return found
    close = difflib.get_close_matches(str(kind), known_types(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ClipbenchError(
        f"Unknown source type {kind!r}.{hint} Known source types: {', '.join(known_types())}. "
        "Set source.type in the dataset spec to one of them (a new storage format is a SourceFormat "
        "subclass registered with clipbench.data.register_format)."
    )
