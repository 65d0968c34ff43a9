"""Commands that need no model stay light: `clipbench --help`, every subcommand's `--help`,
`clipbench datasets`, and loading `clipbench report` must not import torch, pandas or the other heavy
libraries (each one is seconds of start-up on a loaded machine); `clipbench models` imports
open_clip, whose pretrained tags it lists, and nothing heavier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "pandas", "pyarrow", "sklearn", "transformers", "datasets", "matplotlib", "scipy", "open_clip")

#: what importing open_clip itself pulls in (its package __init__ builds every model class)
OPEN_CLIP_NEEDS = ("torch", "transformers", "open_clip")

_PROBE = """
import json, sys
{code}
print(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))
"""

# runs one command line as the `clipbench` entry point does, in this interpreter
_COMMAND = """
import contextlib, io
from clipbench.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({argv!r})
    except SystemExit:
        pass
"""


def imported(code: str, names: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``names`` a fresh interpreter has imported after running ``code``."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(code=code, names=names)], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(out.splitlines()[-1])


def imported_by(argv: list[str], names: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``names`` `clipbench ARGV` imports."""
    return imported(_COMMAND.format(argv=argv), names)


def test_cli_and_report_import_no_heavy_library():
    # the modules of `clipbench report` and `clipbench compare` (pandas and figures are imported
    # only when a table or plot is made)
    assert imported("import clipbench.report, clipbench.compare, clipbench.results, clipbench.render") == []


def test_help_of_every_command_is_light():
    # one interpreter for all of them: what each imports adds up, so a heavy import anywhere shows
    commands = ["--help", "run --help", "datasets --help", "models --help", "report --help", "compare --help"]
    code = "\n".join(_COMMAND.format(argv=c.split()) for c in commands)
    assert imported(code) == []


def test_datasets_command_is_light(tmp_path):
    assert imported_by(["datasets", "--data-root", str(tmp_path), "--cache-dir", str(tmp_path)]) == []
    assert imported_by(["datasets", "--json", "--data-root", str(tmp_path)]) == []


@pytest.mark.slow  # importing open_clip takes seconds
def test_models_command_imports_open_clip_and_nothing_heavier():
    assert imported_by(["models"]) == sorted(OPEN_CLIP_NEEDS)


def test_the_probe_sees_an_import():
    # the check itself can fail: a module the code imports is reported, one it does not is not
    assert imported("import tabulate", ("tabulate", "torch")) == ["tabulate"]
    assert imported_by(["run", "--help"], ("argparse", "torch")) == ["argparse"]


def test_pandas_is_imported_when_a_report_needs_it(tmp_path):
    # the lazy stand-in does import pandas on use: a report built from records works
    code = ("from clipbench.report import summary_table; "
            "summary_table([{'model': 'm', 'pretrained': 'p', 'dataset': 'd', 'task': 'zeroshot', "
            "'primary_metric': 'accuracy', 'metrics': {'accuracy': 0.5}}])")
    assert imported(code, ("pandas",)) == ["pandas"]


def test_the_cli_makes_idle_openmp_threads_sleep_unless_the_environment_says_otherwise():
    code = ("import os, sys; from clipbench.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert unset.stderr.strip().endswith("PASSIVE")
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                            capture_output=True, text=True, check=True)
    assert chosen.stderr.strip().endswith("ACTIVE")
