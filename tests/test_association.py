"""Cue–image association (WinoGAViL): DataComp's Jaccard scores, the candidate-rows layout, the
pipeline end to end against DataComp's own procedure on the model's encoders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from clipbench import specs, synthetic
from clipbench.compare import compare_pair, paired_samples
from clipbench.data import load_split
from clipbench.data.base import indefinite_article
from clipbench.errors import ClipbenchError
from clipbench.models import load_model
from clipbench.pipeline import Evaluator, RunConfig
from clipbench.results import record_path
from clipbench.sidecars import read_sample_outputs, recompute_metrics, sidecar_path
from clipbench.tasks.association import SUBSETS, jaccard_index, subset_values


def _datacomp_jaccard(logits: np.ndarray, y_true: np.ndarray, kind: str | None = None) -> float:
    """DataComp's eval_utils/wino_eval.py, step for step: argsort, the last n, sklearn's Jaccard
    (``kind``: numpy's sort kind; DataComp leaves the default, whose order of ties varies)."""
    n_assoc = y_true.sum()
    topk_indices = np.argsort(logits, kind=kind)[-n_assoc:]
    y_pred = np.isin(np.arange(len(logits)), topk_indices)
    return jaccard_score(y_true, y_pred)


def test_jaccard_hand_cases():
    # picks {1, 2}; associated {1, 3}: 1 shared of 3
    assert jaccard_index([0.1, 0.9, 0.5, 0.3], [False, True, False, True]) == pytest.approx(1 / 3)
    assert jaccard_index([0.1, 0.9, 0.5, 0.3], [False, True, True, False]) == 1.0
    assert jaccard_index([0.9, 0.1, 0.2], [False, True, False]) == 0.0
    # ties: the later candidate wins (DataComp's ascending argsort, last n)
    assert jaccard_index([1.0, 1.0, 1.0, 1.0], [True, False, False, False]) == 0.0
    assert jaccard_index([1.0, 1.0, 1.0, 1.0], [False, False, False, True]) == 1.0
    assert jaccard_index([2.0, 1.0, 1.0], [True, True, False]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least one"):
        jaccard_index([0.1, 0.2], [False, False])
    with pytest.raises(ValueError):
        jaccard_index([0.1, 0.2], [True])


def test_jaccard_equals_datacomp_procedure_on_random_examples():
    rng = np.random.default_rng(0)
    for trial in range(600):
        k = int(rng.choice([5, 6, 10, 12]))
        y_true = np.zeros(k, dtype=bool)
        y_true[rng.choice(k, int(rng.integers(1, k)), replace=False)] = True
        distinct = rng.standard_normal(k).astype(np.float32)
        assert jaccard_index(distinct, y_true) == pytest.approx(_datacomp_jaccard(distinct, y_true), abs=1e-15)
        # integer scores in a small range: ties are frequent, and a stable sort decides them
        tied = rng.integers(0, 4, k).astype(np.float32)
        assert jaccard_index(tied, y_true) == pytest.approx(_datacomp_jaccard(tied, y_true, "stable"), abs=1e-15)


def test_subsets_follow_datacomp_groups():
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    sizes = np.array([5, 6, 10, 12, 5, 11])
    per = subset_values(values, sizes)
    means = {name: float(np.nanmean(v)) for name, v in per.items()}
    assert means["avg_jaccard_score"] == pytest.approx(values.mean())
    assert means["jaccard_score_5"] == pytest.approx(0.3)
    assert means["jaccard_score_6"] == pytest.approx(0.2)
    assert means["jaccard_score_10"] == pytest.approx(0.3)
    assert means["jaccard_score_12"] == pytest.approx(0.4)
    assert means["jaccard_score_5-6"] == pytest.approx((0.1 + 0.2 + 0.5) / 3)
    assert means["jaccard_score_10-12"] == pytest.approx((0.3 + 0.4 + 0.6) / 3)  # 11 counts: DataComp's >= 10
    assert set(per) == set(SUBSETS)


def test_indefinite_article_is_datacomps_prompt():
    assert indefinite_article("Werewolf") == "A werewolf"
    assert indefinite_article("Owl") == "An owl"
    assert indefinite_article("umbrella stand") == "An umbrella stand"
    assert indefinite_article("") == "A "


# ----------------------------------------------------------------------------- data layout and pipeline


@pytest.fixture(scope="module")
def tiny():
    return load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")


def _scenes(n: int):
    return [synthetic.generate("tests/association", i) for i in range(n)]


def _winogavil_rows(n_examples: int) -> dict[str, list]:
    """WinoGAViL's columns: a colour cue, candidates (5, 6, 10 or 12), the ones of that colour
    associated (odd examples: a random subset)."""
    scenes = _scenes(60)
    rng = np.random.default_rng(1)
    rows = {"ID": [], "cue": [], "candidates": [], "associations": [], "candidate_images": []}
    for e in range(n_examples):
        k = [5, 6, 10, 12][e % 4]
        chosen = rng.choice(len(scenes), k, replace=False)
        color = scenes[chosen[0]].scene.color
        names = [f"img{int(i)}" for i in chosen]
        associated = [n for n, i in zip(names, chosen) if scenes[i].scene.color == color]
        if e % 2:  # a random association set, which the model cannot find
            associated = [names[int(j)] for j in rng.choice(k, int(rng.integers(1, k)), replace=False)]
        rows["ID"].append(1000 + e)
        rows["cue"].append(f"{color.capitalize()} shape")
        rows["candidates"].append(names)
        rows["associations"].append(associated)
        rows["candidate_images"].append([scenes[i].image for i in chosen])
    return rows


def _save_winogavil(rows: dict[str, list], folder: Path) -> None:
    import datasets

    features = datasets.Features({"ID": datasets.Value("int64"), "cue": datasets.Value("string"),
                                  "candidates": datasets.List(datasets.Value("string")),
                                  "associations": datasets.List(datasets.Value("string")),
                                  "candidate_images": datasets.List(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))


def test_winogavil_layout_record_equals_datacomp_procedure(tiny, tmp_path):
    import datasets

    rows = _winogavil_rows(16)
    _save_winogavil(rows, tmp_path / "data" / "winogavil")
    spec = specs.load_spec("winogavil")
    config = RunConfig(data_root=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                       tasks=["association"], batch_size=8, workers=0, device="cpu", precision="fp32",
                       n_bootstrap=50)
    (record,) = Evaluator(tiny, config).run([spec])

    # DataComp's loop on the model's own encoders: each example's images in one batch, the cue prompt
    scores, sizes = [], []
    for e in range(16):
        images = [datasets.Image().decode_example(datasets.Image().encode_example(i))
                  for i in rows["candidate_images"][e]]
        pixels = torch.stack([tiny.preprocess(image.convert("RGB")) for image in images])
        with torch.inference_mode():
            image_f = tiny.encode_images(pixels)[0].numpy().astype(np.float64)
            text_f = tiny.encode_texts([indefinite_article(rows["cue"][e])]).numpy().astype(np.float64)
        y_true = np.isin(rows["candidates"][e], rows["associations"][e])
        scores.append(_datacomp_jaccard((text_f @ image_f.T)[0], y_true))
        sizes.append(len(images))
    scores, sizes = np.array(scores), np.array(sizes)
    assert 0 < scores.mean() < 1  # a case where the number is not trivially 0 or 1
    assert record.primary_metric == "jaccard_score_10-12" and record.n_samples == 16
    assert record.metrics["jaccard_score_10-12"] == pytest.approx(scores[sizes >= 10].mean(), abs=1e-9)
    assert record.metrics["jaccard_score_5-6"] == pytest.approx(scores[sizes <= 6].mean(), abs=1e-9)
    assert record.metrics["avg_jaccard_score"] == pytest.approx(scores.mean(), abs=1e-9)
    for k in (5, 6, 10, 12):
        assert record.metrics[f"jaccard_score_{k}"] == pytest.approx(scores[sizes == k].mean(), abs=1e-9)
    low, high = record.confidence_intervals["jaccard_score_10-12"]
    assert low <= record.metrics["jaccard_score_10-12"] <= high
    assert record.details["examples_by_candidates"] == {"5": 4, "6": 4, "10": 4, "12": 4}

    path = record_path(config.output, tiny.name, tiny.pretrained, "winogavil", "association")
    outputs = read_sample_outputs(sidecar_path(path))
    assert outputs.ids == [str(1000 + e) for e in range(16)]  # one unit per example
    assert recompute_metrics(outputs) == record.metrics
    # a second "model" that gets every 12-candidate example wrong: the paired difference is over the
    # examples of 10 or more candidates only
    worse = outputs.arrays["values"].copy()
    worse[sizes == 12] = np.where(np.isnan(worse[sizes == 12]), np.nan, 0.0)
    other = dataclasses.replace(outputs, arrays={**outputs.arrays, "values": worse})
    pair = paired_samples(outputs, other, "jaccard_score_10-12")
    assert pair.binary is None  # Jaccard indices are not 0/1: no McNemar
    result = compare_pair(outputs, other, "jaccard_score_10-12")
    expected_b = np.where(sizes == 12, 0.0, scores)[sizes >= 10].mean()
    assert result.value_a == pytest.approx(scores[sizes >= 10].mean(), abs=1e-9)
    assert result.difference == pytest.approx(expected_b - scores[sizes >= 10].mean(), abs=1e-9)
    assert result.test == "permutation" and result.low <= result.difference <= result.high


def test_candidate_rows_layout_and_errors(tmp_path):
    rows = _winogavil_rows(3)
    _save_winogavil(rows, tmp_path / "winogavil")
    spec = specs.load_spec("winogavil")
    samples = load_split(spec, "test", tmp_path, tmp_path / "cache")
    names = [n for row in rows["candidates"] for n in row]
    assert samples.ids == [f"{1000 + e}/{n}" for e in range(3) for n in rows["candidates"][e]]
    assert samples.examples == [str(1000 + e) for e in range(3) for _ in rows["candidates"][e]]
    first = rows["cue"][0]
    prompt = indefinite_article(first)
    for i, name in enumerate(rows["candidates"][0]):
        expected = ([prompt], []) if name in rows["associations"][0] else ([], [prompt])
        assert (samples.captions[i], samples.negatives[i]) == expected
    # each candidate's own image, decoded alone
    assert np.array_equal(np.asarray(samples.load_image(len(names) - 1)),
                          np.asarray(rows["candidate_images"][2][-1].convert("RGB")))

    bad = dict(rows, associations=[["nobody"], *rows["associations"][1:]])
    _save_winogavil(bad, tmp_path / "bad" / "winogavil")
    with pytest.raises(ClipbenchError, match="not among its candidates"):
        load_split(spec, "test", tmp_path / "bad", tmp_path / "cache")


def test_candidate_rows_in_a_table(tmp_path):
    scenes = _scenes(6)
    folder = tmp_path / "assoc"
    folder.mkdir()
    for i, s in enumerate(scenes):
        s.image.save(folder / f"{i}.png")
    lines = [json.dumps({"cue": "Red", "cands": ["0.png", "1.png", "2.png"], "assoc": ["1.png"]}),
             json.dumps({"cue": "orange", "cands": ["3.png", "4.png", "5.png"], "assoc": ["3.png", "5.png"]})]
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    spec = specs.parse_spec({"name": "assoc", "tasks": ["association"], "primary_metric": "avg_jaccard_score",
                             "source": {"type": "table", "path": str(folder), "caption_column": "cue",
                                        "candidate_column": "cands", "association_column": "assoc",
                                        "caption_prompt": "indefinite_article"},
                             "splits": {"test": "test.jsonl"}}, tmp_path / "assoc.yaml")
    samples = load_split(spec, "test", tmp_path, tmp_path / "cache")
    assert samples.ids == ["0/0.png", "0/1.png", "0/2.png", "1/3.png", "1/4.png", "1/5.png"]
    assert samples.captions == [[], ["A red"], [], ["An orange"], [], ["An orange"]]
    assert np.array_equal(np.asarray(samples.load_image(4)), np.asarray(scenes[4].image.convert("RGB")))

    unknown = specs.parse_spec({**spec.raw, "source": {**spec.raw["source"], "caption_prompt": "article"}},
                               tmp_path / "assoc.yaml")
    with pytest.raises(ClipbenchError, match="caption_prompt 'article'"):
        load_split(unknown, "test", tmp_path, tmp_path / "cache")


def test_a_run_with_a_model_runs_the_caption_set_tasks_on_their_datasets_unasked():
    resolved = RunConfig(model="ViT-B-32", datasets=["winogavil", "sugar_crepe"]).resolved()
    assert {"association", "caption_selection", "winoground", "zeroshot"} <= set(resolved.tasks)
