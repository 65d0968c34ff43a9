"""Atomic file writes: a file is either complete or absent, never half-written.

Content goes to a temporary file in the target's directory, is flushed to disk, and is renamed over
the target (``os.replace`` is atomic on POSIX and Windows within one filesystem). A process killed
mid-write leaves its temporary file behind; :func:`remove_stale_temporaries` clears those on the
next run.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

log = logging.getLogger(__name__)

#: A temporary file untouched this long belongs to no live writer: writers stream into theirs,
#: so its mtime advances until the rename (another run or rank may own a younger one).
STALE_AFTER_S = 3600.0

_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_open's mkstemp names look like


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file for writing (``mode`` "w" or "wb") that replaces ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(root: Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files of interrupted :func:`atomic_open` writes under ``root``.

    Only names of the form ``.<target>.<8 random characters>.tmp`` untouched for ``max_age_s``
    seconds are removed. Returns the removed paths.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    now, removed = time.time(), []
    for path in root.rglob(".*.tmp"):
        try:
            if _TEMPORARY.match(path.name) and path.is_file() and now - path.stat().st_mtime >= max_age_s:
                path.unlink()
                removed.append(path)
        except OSError:  # gone already, or not ours to delete: leave it
            continue
    if removed:
        log.info("removed %d temporary file(s) of interrupted writes under %s", len(removed), root)
    return removed
