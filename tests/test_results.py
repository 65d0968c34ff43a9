"""Result records: schema, strict JSON, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clipbench import results

from conftest import COLOURS_SPEC


def make_record(**overrides) -> results.Record:
    fields = dict(model="ViT-B/32", pretrained="openai", dataset="cifar10", task="zeroshot", split="test",
                  metrics={"accuracy": np.float32(0.5), "top5_accuracy": 0.9}, primary_metric="accuracy",
                  n_samples=np.int64(10), confidence_intervals={"accuracy": (0.4, 0.6)})
    fields.update(overrides)
    return results.Record(**fields)


def test_record_round_trip_and_layout(tmp_path):
    path = results.write_record(make_record(), tmp_path, per_class={"per_class": [1.0, None]})
    assert path == tmp_path / "ViT-B-32__openai" / "cifar10" / "zeroshot.json"
    data = json.loads(path.read_text())
    for key in ("model", "pretrained", "dataset", "task", "split", "metrics", "primary_metric",
                "n_samples", "config", "versions", "seconds", "created", "schema_version"):
        assert key in data
    assert data["metrics"]["accuracy"] == 0.5 and data["confidence_intervals"]["accuracy"] == [0.4, 0.6]
    assert json.loads((path.parent / "zeroshot.per_class.json").read_text()) == {"per_class": [1.0, None]}
    again = results.existing_record(tmp_path, "ViT-B/32", "openai", "cifar10", "zeroshot")
    assert again is not None and again.primary_value == 0.5


def test_nan_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        results.write_record(make_record(metrics={"accuracy": float("nan")}), tmp_path)
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.tmp"))


def test_failure_mid_write_keeps_the_old_record_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = results.write_record(make_record(), tmp_path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        results.write_record(make_record(metrics={"accuracy": 0.9}), tmp_path)
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["zeroshot.json"]


def test_unreadable_record_counts_as_missing(tmp_path):
    path = results.record_path(tmp_path, "m", "p", "d", "zeroshot")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert results.existing_record(tmp_path, "m", "p", "d", "zeroshot") is None


def test_stale_temporaries_of_interrupted_writes_are_removed_and_live_ones_kept(tmp_path):
    from clipbench.atomic import STALE_AFTER_S, remove_stale_temporaries

    (tmp_path / "m" / "d").mkdir(parents=True)
    stale = tmp_path / "m" / "d" / ".zeroshot.json.ab3_x9zq.tmp"
    fresh = tmp_path / "m" / "d" / ".zeroshot.json.k2jd81mm.tmp"
    other = tmp_path / "m" / "d" / ".notes.tmp"  # not a name atomic_open makes
    for path in (stale, fresh, other):
        path.write_text("{")
    old = os.stat(stale).st_mtime - STALE_AFTER_S - 1
    for path in (stale, other):
        os.utime(path, (old, old))
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists() and other.exists()


def test_a_run_clears_stale_temporaries_from_output_and_feature_cache(tmp_path):
    from clipbench.atomic import STALE_AFTER_S
    from clipbench.config import RunConfig
    from clipbench.pipeline import run

    left = [tmp_path / "out" / "m" / ".zeroshot.json.aaaaaaaa.tmp",
            tmp_path / "cache" / "features" / "image" / "ab" / ".abcd.npz.bbbbbbbb.tmp"]
    for path in left:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"PK")
        old = os.stat(path).st_mtime - STALE_AFTER_S - 1
        os.utime(path, (old, old))
    spec = tmp_path / "colours.yaml"  # its data is missing: the run fails after cleaning up
    spec.write_text(COLOURS_SPEC.format(root=tmp_path / "absent"))
    outcome = run(RunConfig(model="clipbench-tiny", datasets=[str(spec)], tasks=["zeroshot"],
                            output=tmp_path / "out", cache_dir=tmp_path / "cache"))
    assert not outcome.records and "absent" in outcome.failures[0][2]
    assert [p.exists() for p in left] == [False, False]
