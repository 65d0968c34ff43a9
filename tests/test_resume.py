"""Resume respects the run's settings: a stored record is reused only when every setting that
changes its numbers is the same; otherwise it is recomputed and the earlier record is kept."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from clipbench import report, specs
from clipbench.config import RunConfig
from clipbench.pipeline import Evaluator


@pytest.fixture
def spec(spec_file):
    return specs.load_spec(str(spec_file))


def config(tmp_path: Path, **kw) -> RunConfig:
    settings = dict(data_root=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                    batch_size=4, workers=0, device="cpu", precision="fp32", n_bootstrap=50, tasks=["zeroshot"])
    return RunConfig(**{**settings, **kw})


def record_dir(tmp_path: Path) -> Path:
    return tmp_path / "out" / "ViT-S-32-alt__none" / "colours"


def test_same_settings_reuse_the_record(model, spec, tmp_path):
    (first,) = Evaluator(model, config(tmp_path)).run([spec])
    (again,) = Evaluator(model, config(tmp_path)).run([spec])
    assert again.created == first.created and again.config["settings_digest"] == first.config["settings_digest"]


def test_other_templates_recompute_and_keep_the_earlier_record(model, spec, tmp_path, caplog):
    (first,) = Evaluator(model, config(tmp_path)).run([spec])
    templates = tmp_path / "t.txt"
    templates.write_text("a blurry photo of a {c}.\n")
    with caplog.at_level(logging.WARNING):
        (second,) = Evaluator(model, config(tmp_path, templates_file=templates)).run([spec])
    # recomputed with the user's templates, not the stored record under the spec's
    assert second.config["templates_origin"] == f"user file {templates}"
    assert second.details["n_templates"] == 1 and first.details["n_templates"] == 2
    assert second.config["settings_digest"] != first.config["settings_digest"]
    stored = json.loads((record_dir(tmp_path) / "zeroshot.json").read_text())
    assert stored["config"]["settings_digest"] == second.config["settings_digest"]
    # the earlier record survives beside it, and the log says so in one line
    (kept,) = record_dir(tmp_path).glob("zeroshot.*.superseded.json")
    assert json.loads(kept.read_text())["config"]["settings_digest"] == first.config["settings_digest"]
    assert first.config["settings_digest"] in kept.name
    (line,) = [r.getMessage() for r in caplog.records if "other settings" in r.getMessage()]
    assert "prompts_digest" in line and kept.name in line
    # a report of the output shows the current record only
    frame = report.load_records([tmp_path / "out"])
    assert len(frame) == 1 and frame.iloc[0]["metrics"] == second.metrics


def test_other_bootstrap_count_or_seed_recompute(model, spec, tmp_path):
    (first,) = Evaluator(model, config(tmp_path)).run([spec])
    (second,) = Evaluator(model, config(tmp_path, n_bootstrap=60)).run([spec])
    (third,) = Evaluator(model, config(tmp_path, n_bootstrap=60, seed=1)).run([spec])
    digests = {r.config["settings_digest"] for r in (first, second, third)}
    assert len(digests) == 3
    assert len(list(record_dir(tmp_path).glob("zeroshot.*.superseded.json"))) == 2


def test_a_record_from_before_settings_digests_is_recomputed_not_reported(model, spec, tmp_path):
    (first,) = Evaluator(model, config(tmp_path)).run([spec])
    path = record_dir(tmp_path) / "zeroshot.json"
    old = json.loads(path.read_text())
    del old["config"]["settings_digest"]
    old["metrics"] = {"accuracy": 0.123}
    path.write_text(json.dumps(old))
    (again,) = Evaluator(model, config(tmp_path)).run([spec])
    assert again.metrics == first.metrics
    assert list(record_dir(tmp_path).glob("zeroshot.unknown.superseded.json"))


def test_record_states_the_precision_the_model_ran_at(model, spec, tmp_path):
    # the run asked for amp, but the model handed to the evaluator was loaded at fp32
    (record,) = Evaluator(model, dataclasses.replace(config(tmp_path), precision="amp")).run([spec])
    assert record.config["precision"] == "fp32" == model.precision


def test_task_registry_lists_every_builtin_with_its_spec_task():
    from clipbench import tasks

    names = tasks.task_names()
    assert names[:4] == ["zeroshot", "linear_probe", "few_shot", "retrieval"]
    for name, (_, spec_task) in tasks._BUILTIN.items():
        assert tasks.get_task(name).name == name and tasks.get_task(name).spec_task == spec_task
    assert tasks.spec_task_names()[:3] == ["zeroshot", "linear_probe", "retrieval"]
    with pytest.raises(KeyError, match="did you mean zeroshot"):
        tasks.get_task("zeroshots")
