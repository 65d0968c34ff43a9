"""Commands that need no model stay light: building the CLI and loading `clipbench report` must not
import torch or the other heavy libraries (each one is seconds of start-up on a loaded machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "sklearn", "transformers", "datasets", "matplotlib", "scipy", "open_clip")

_PROBE = """
import json, sys
{code}
print(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))
"""


def imported(code: str, names: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``names`` a fresh interpreter has imported after running ``code``."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(code=code, names=names)], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(out.splitlines()[-1])


def test_cli_and_report_import_no_heavy_library():
    # what `clipbench --help` / `clipbench run --help` do before any command runs, and the modules of
    # `clipbench report` and `clipbench compare` (figures import matplotlib only when asked for)
    code = "from clipbench.cli import _build_parser; _build_parser(); import clipbench.report, clipbench.compare"
    assert imported(code) == []


def test_the_probe_sees_an_import():
    # the check itself can fail: a module the code imports is reported, one it does not is not
    assert imported("import tabulate", ("tabulate", "torch")) == ["tabulate"]
