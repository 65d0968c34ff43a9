"""Executes docs/adding-a-dataset.md step by step: its spec block and its shell commands, verbatim."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clipbench.synthetic import generate

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "adding-a-dataset.md"


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_guide_runs_from_image_folder_to_report(tmp_path):
    guide = GUIDE.read_text()
    # step 1: "your" images, in the layout the guide shows (drawn by clipbench's synthetic renderer)
    for split, n in (("train", 12), ("test", 10)):
        for shape in ("circle", "square", "triangle"):
            folder = tmp_path / "my-data" / "my_shapes" / split / shape
            folder.mkdir(parents=True)
            for i in range(n):
                generate(f"guide/{split}", i, shape=shape).image.save(folder / f"{i:03d}.png")
    # step 2: the spec, verbatim
    (spec_text,) = fenced_blocks(guide, "yaml")
    (tmp_path / "my_shapes.yaml").write_text(spec_text)
    # steps 3 and 4: the commands, verbatim
    commands = [line for block in fenced_blocks(guide, "bash") for line in block.splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands] == [["clipbench", "run"], ["clipbench", "report"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CLIPBENCH_CACHE": str(tmp_path / "cache")}
    outputs = []
    for command in commands:
        argv = [sys.executable, "-m", "clipbench", *shlex.split(command)[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)

    records = tmp_path / "my-results" / "clipbench-tiny__synthetic" / "my_shapes"
    zeroshot = json.loads((records / "zeroshot.json").read_text())
    probe = json.loads((records / "linear_probe.json").read_text())
    assert zeroshot["n_samples"] == 30 and probe["n_samples"] == 30
    # the embedded model knows these shapes: far above chance (1/3)
    assert zeroshot["metrics"]["accuracy"] >= 0.8
    assert probe["metrics"]["accuracy"] >= 0.8
    assert "my_shapes" in outputs[1]
