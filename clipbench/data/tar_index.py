"""Index of webdataset tar shards: which member of which sample lies where, read once with ``tarfile``.

Members are grouped into samples exactly as the Hugging Face ``webdataset`` builder (and the
``webdataset`` library it copies ``base_plus_ext`` from) does: regular files only, basenames starting
with ``.`` or ``__`` skipped, key = the member path up to the first dot of its basename, field = the
rest (``a/b.seg.png`` -> key ``a/b``, field ``seg.png``), and a new sample starts whenever the key
differs from the previous member's. Small text members (``.cls``, ``.txt``, ``.json``, ...) are read
into the index; images stay in the shard and are read later by (offset, size).

The index of a shard can be cached as JSON under ``<cache-dir>/webdataset-index/``, keyed by the
shard's absolute path, size and mtime_ns, so a rerun does not rescan the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from clipbench.atomic import atomic_open
from clipbench.errors import ClipbenchError

log = logging.getLogger(__name__)

INDEX_VERSION = 1
#: members whose content goes into the index (the text and integer decoders of the HF builder)
TEXT_EXTENSIONS = frozenset({"txt", "text", "transcript", "cls", "cls2", "index", "inx", "id", "json", "jsn"})
_MAX_TEXT_BYTES = 1 << 20
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclass
class ShardSample:
    """One sample of a shard: ``members[field] = (offset, size)`` of every member, ``text[field]`` the
    UTF-8 content of its small text members."""

    key: str
    members: dict[str, tuple[int, int]]
    text: dict[str, str]


def split_key(name: str) -> tuple[str, str] | None:
    """(key, field) of a member path, or None for a path without an extension."""
    match = _KEY_FIELD.match(name)
    return (match.group(1), match.group(2)) if match else None


def _bad_shard(path: Path, problem: str) -> ClipbenchError:
    return ClipbenchError(
        f"Webdataset shard {path} {problem}. Re-download the shard (or remove it from the split's "
        "folder if it does not belong there)."
    )


def _read_text(f, path: Path, key: str, field: str, offset: int, size: int) -> str:
    f.seek(offset)
    data = f.read(size)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_shard(path, f"has member '{key}.{field}' that is not UTF-8 text") from None


def scan_shard(path: Path) -> list[ShardSample]:
    """Read the tar headers of ``path`` (and its small text members); :class:`ClipbenchError` for a
    file that is not an uncompressed tar, is empty, is truncated or holds a sample twice."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
    except OSError as exc:
        raise _bad_shard(path, f"cannot be read ({exc.strerror})") from None
    if file_size == 0:
        raise _bad_shard(path, "is empty (0 bytes)")
    samples: list[ShardSample] = []
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isreg() or os.path.basename(info.name).startswith((".", "__")):
                    continue
                parts = split_key(info.name)
                if parts is None:
                    continue
                key, field = parts
                if info.offset_data + info.size > file_size:
                    raise _bad_shard(path, f"is truncated: member '{info.name}' needs {info.size} bytes "
                                           f"at offset {info.offset_data}, the file has {file_size}")
                if not samples or samples[-1].key != key:
                    samples.append(ShardSample(key, {}, {}))
                sample = samples[-1]
                if field in sample.members:
                    raise _bad_shard(path, f"holds field '{field}' of sample '{key}' twice")
                sample.members[field] = (info.offset_data, info.size)
                if field.rsplit(".", 1)[-1].lower() in TEXT_EXTENSIONS and info.size <= _MAX_TEXT_BYTES:
                    sample.text[field] = _read_text(f, path, key, field, info.offset_data, info.size)
            end = tar.offset
            # tarfile stops quietly at a header cut short; what follows the last member must be the
            # end-of-archive marker (zero blocks), or the file was truncated or damaged there
            f.seek(end)
            clean, tail = True, 0
            while chunk := f.read(1 << 20):
                clean, tail = clean and not chunk.strip(b"\0"), tail + len(chunk)
    except tarfile.ReadError as exc:
        raise _bad_shard(path, f"is not a readable uncompressed tar file ({exc})") from None
    if not clean or tail < 2 * tarfile.BLOCKSIZE:
        raise _bad_shard(path, f"is truncated or damaged after offset {end} (no end-of-archive marker there)")
    if not samples:
        raise _bad_shard(path, "holds no samples (no member named <key>.<extension>)")
    return samples


def _cache_path(index_dir: Path, path: Path) -> Path:
    st = path.stat()
    digest = hashlib.sha256(f"{INDEX_VERSION}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return index_dir / f"{digest.hexdigest()[:32]}.json"


def _load_cached(cache: Path) -> list[ShardSample] | None:
    try:
        raw = json.loads(cache.read_text(encoding="utf-8"))
        return [ShardSample(key, {f: (int(o), int(s)) for f, (o, s) in members.items()}, dict(text))
                for key, members, text in raw["samples"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the damaged webdataset index %s (%s); rescanning the shard", cache, exc)
        return None


def index_shard(path: Path, index_dir: Path | None = None) -> list[ShardSample]:
    """:func:`scan_shard`, through a JSON cache in ``index_dir`` when given."""
    path = Path(path)
    if index_dir is None:
        return scan_shard(path)
    try:
        cache = _cache_path(index_dir, path)
    except OSError as exc:
        raise _bad_shard(path, f"cannot be read ({exc.strerror})") from None
    samples = _load_cached(cache)
    if samples is None:
        samples = scan_shard(path)
        try:
            with atomic_open(cache) as f:
                json.dump({"version": INDEX_VERSION, "shard": str(path),
                           "samples": [[s.key, s.members, s.text] for s in samples]}, f)
        except OSError as exc:  # a read-only cache dir costs a rescan next time, nothing else
            log.warning("could not write the webdataset index %s (%s)", cache, exc)
    return samples
