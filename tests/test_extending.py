"""Executes docs/extending.md: each extension module verbatim, loaded the way the guide says
(`$CLIPBENCH_PLUGINS`), and checked against an independent computation."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def modules_in_guide() -> dict[str, str]:
    """``# name.py``-headed python blocks of the guide, by module name."""
    blocks = re.findall(r"```python\n# (\w+)\.py\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return {name: body for name, body in blocks}


def commands_in_guide() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """The guide's modules written to a directory on sys.path; registries restored afterwards."""
    from clipbench import tasks

    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, body in modules_in_guide().items():
        (folder / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(folder))
    saved_tasks = dict(tasks._REGISTRY)
    yield folder
    tasks._REGISTRY.clear()
    tasks._REGISTRY.update(saved_tasks)
    for name in modules_in_guide():
        sys.modules.pop(name, None)


def run_guide_command(argv: list[str], tmp_path: Path, monkeypatch) -> int:
    """A `VAR=value clipbench ...` line of the guide, in this process, writing under tmp_path."""
    from clipbench.cli import main

    while "=" in argv[0]:
        var, value = argv.pop(0).split("=", 1)
        monkeypatch.setenv(var, value)
    assert argv[0] == "clipbench"
    return main([*argv[1:], "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                 "--workers", "0", "--device", "cpu", "--precision", "fp32", "--bootstrap", "0"])


def test_guide_task_runs_through_the_cli_and_equals_a_direct_computation(plugin_dir, tmp_path, monkeypatch):
    (command,) = [c for c in commands_in_guide() if "nearest_mean" in " ".join(c)]
    assert run_guide_command(command, tmp_path, monkeypatch) == 0
    folder = tmp_path / "out" / "clipbench-tiny__synthetic" / "synthetic-shapes"
    record = json.loads((folder / "nearest_mean.json").read_text())
    assert (folder / "zeroshot.json").is_file()

    # independent: the cached features of the same run, class means and argmax in numpy
    from clipbench import specs
    from clipbench.config import RunConfig
    from clipbench.models import load_model
    from clipbench.pipeline import Evaluator

    model = load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")
    evaluator = Evaluator(model, RunConfig(cache_dir=tmp_path / "cache", workers=0, device="cpu"))
    spec = specs.load_spec("synthetic-shapes")
    (train, _), (test, _) = evaluator.split_features(spec, "train"), evaluator.split_features(spec, "test")
    assert train.from_cache and test.from_cache
    means = np.stack([train.projected[train.targets == c].mean(0) for c in range(spec.num_classes)])
    predicted = np.argmax(test.projected @ means.T, axis=1)
    assert record["metrics"]["accuracy"] == pytest.approx(np.mean(predicted == test.targets), abs=1e-12)
    assert record["n_samples"] == len(test.targets)
    # far above chance (1/6) for the trained tiny CLIP
    assert record["metrics"]["accuracy"] > 0.5
