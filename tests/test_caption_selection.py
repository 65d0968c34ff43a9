"""Caption selection and Winoground: the metrics against hand cases (ties) and brute force, and
records through the pipeline on tiny SugarCrepe- and Winoground-layout data against a direct
numpy computation from the model's own encoders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipbench import specs, synthetic
from clipbench.compare import paired_samples
from clipbench.errors import ClipbenchError
from clipbench.models import load_model
from clipbench.pipeline import Evaluator, RunConfig
from clipbench.results import record_path
from clipbench.sidecars import read_sample_outputs, recompute_metrics, sidecar_path
from clipbench.tasks.caption_selection import selection_correct
from clipbench.tasks.winoground import winoground_scores

# ----------------------------------------------------------------------------- the metrics


def test_selection_accuracy_hand_cases_ties_are_wrong():
    # image 0: caption 0.9 > negatives 0.5, 0.8 -> right; image 1: caption ties a negative -> wrong;
    # image 2: caption 0.1 < negative 0.2 -> wrong; image 3: two captions, the worse one (0.6) still
    # above the negative (0.55) -> right
    scores = np.array([0.9, 0.5, 0.8, 0.7, 0.7, 0.1, 0.2, 0.9, 0.6, 0.55])
    owner = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    positive = np.array([1, 0, 0, 1, 0, 1, 0, 1, 1, 0], dtype=bool)
    assert selection_correct(scores, owner, positive, 4).tolist() == [True, False, False, True]


def test_selection_refuses_an_image_without_a_negative():
    with pytest.raises(ValueError, match="lack a caption or a negative"):
        selection_correct(np.array([0.5, 0.4, 0.3]), np.array([0, 0, 1]), np.array([True, False, True]), 2)


def _brute_force(s: np.ndarray) -> dict[str, list[bool]]:
    """Winoground's definitions written out per example; s[e][i][c] = s(caption c, image i)."""
    out = {"text_score": [], "image_score": [], "group_score": []}
    for m in s:
        f = lambda c, i: m[i][c]  # noqa: E731  the paper's f(C, I)
        text = f(0, 0) > f(1, 0) and f(1, 1) > f(0, 1)
        image = f(0, 0) > f(0, 1) and f(1, 1) > f(1, 0)
        out["text_score"].append(text)
        out["image_score"].append(image)
        out["group_score"].append(text and image)
    return out


def test_winoground_scores_equal_brute_force_on_random_matrices():
    rng = np.random.default_rng(0)
    # small integers make ties frequent; floats never tie
    for s in (rng.integers(0, 3, size=(500, 2, 2)).astype(float), rng.normal(size=(500, 2, 2))):
        got = winoground_scores(s)
        expected = _brute_force(s)
        for name in expected:
            assert got[name].tolist() == expected[name], name


def test_winoground_hand_cases_with_ties():
    s = np.array([
        [[0.9, 0.1], [0.2, 0.8]],  # both diagonals win: text, image, group
        [[0.9, 0.85], [0.7, 0.8]],  # each image prefers its caption; caption 1 prefers image 0
        [[0.5, 0.5], [0.2, 0.8]],  # image 0 ties its two captions: no text score
        [[0.5, 0.1], [0.5, 0.8]],  # caption 0 ties the two images: no image score
        [[0.1, 0.9], [0.8, 0.2]],  # all wrong
    ])
    got = winoground_scores(s)
    assert got["text_score"].tolist() == [True, True, False, True, False]
    assert got["image_score"].tolist() == [True, False, True, False, False]
    assert got["group_score"].tolist() == [True, False, False, False, False]


# ----------------------------------------------------------------------------- spec fields


def test_caption_set_specs_validate_their_metric_and_tasks(tmp_path):
    base = {"name": "x", "title": "x", "source": {"type": "table", "path": "x", "negative_column": "neg"},
            "splits": {"test": "t.jsonl"}}
    with pytest.raises(ClipbenchError, match="primary_metric.*group_score"):
        specs.parse_spec({**base, "tasks": ["winoground"], "primary_metric": "accuracy"}, tmp_path / "x.yaml")
    with pytest.raises(ClipbenchError, match="only caption-set tasks"):
        specs.parse_spec({**base, "tasks": ["caption_selection", "zeroshot"], "primary_metric": "accuracy"},
                         tmp_path / "x.yaml")
    spec = specs.parse_spec({**base, "tasks": ["caption_selection"], "primary_metric": "accuracy"}, tmp_path / "x.yaml")
    assert spec.has_caption_sets and spec.num_classes is None


def test_sugar_crepe_group_and_winoground_specs():
    groups = specs.all_groups()
    assert sorted(groups["sugar_crepe"]) == sorted(
        f"sugar_crepe_{s}" for s in ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att",
                                     "add_obj", "add_att"))
    for name in groups["sugar_crepe"]:
        spec = specs.load_spec(name)
        assert spec.tasks == ("caption_selection",) and spec.source.manual
        assert spec.split("test") == name.removeprefix("sugar_crepe_") + ".json"
    wino = specs.load_spec("winoground")
    assert wino.tasks == ("winoground",) and wino.primary_metric == "group_score" and wino.source.manual


# ----------------------------------------------------------------------------- through the pipeline


@pytest.fixture(scope="module")
def tiny():
    return load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")


def _config(root: Path, tasks: list[str]) -> RunConfig:
    return RunConfig(data_root=root / "data", output=root / "out", cache_dir=root / "cache", tasks=tasks,
                     batch_size=8, workers=0, device="cpu", precision="fp32", n_bootstrap=50)


def _encode(model, images, texts):
    pixels = torch.stack([model.preprocess(image) for image in images])
    with torch.inference_mode():
        return (model.encode_images(pixels)[0].numpy().astype(np.float64),
                model.encode_texts(list(texts)).numpy().astype(np.float64))


def _scenes(n: int):
    return [synthetic.generate("tests/caption-selection", i) for i in range(n)]


def _sugar_crepe_layout(root: Path, negatives: dict[int, str]) -> list[dict]:
    """<root>/sugar_crepe/add_att.json (keyed, non-contiguous keys, one image used twice) and val2017/."""
    examples = _scenes(6)
    folder = root / "sugar_crepe" / "val2017"
    folder.mkdir(parents=True, exist_ok=True)
    for i, e in enumerate(examples):
        e.image.save(folder / f"{i:012d}.jpg", quality=95)
    entries = []
    for k, image in enumerate([0, 1, 2, 3, 4, 5, 2]):
        scene = examples[image].scene
        entries.append({"filename": f"{image:012d}.jpg", "caption": f"a {scene.color} {scene.shape} {scene.position}",
                        "negative_caption": negatives.get(k, f"a {scene.color} {scene.shape} in the center")})
    keyed = {str(3 * k + 1): entry for k, entry in enumerate(entries)}
    (root / "sugar_crepe" / "add_att.json").write_text(json.dumps(keyed))
    return entries


def _direct_selection(model, root: Path, entries: list[dict]) -> np.ndarray:
    from PIL import Image

    images = [Image.open(root / "sugar_crepe" / "val2017" / e["filename"]).convert("RGB") for e in entries]
    texts = [t for e in entries for t in (e["caption"], e["negative_caption"])]
    image_f, text_f = _encode(model, images, texts)
    pos, neg = text_f[0::2], text_f[1::2]
    return np.array([image_f[i] @ pos[i] > image_f[i] @ neg[i] for i in range(len(entries))])


def test_sugar_crepe_layout_record_equals_direct_computation(tiny, tmp_path):
    data = tmp_path / "data"
    entries = _sugar_crepe_layout(data, {})
    spec = specs.load_spec("sugar_crepe_add_att")
    config = _config(tmp_path, ["caption_selection"])
    (record,) = Evaluator(tiny, config).run([spec])
    expected = _direct_selection(tiny, data, entries)
    assert 0 < expected.mean() < 1  # a case where the number is not trivially 0 or 1
    assert record.metrics["accuracy"] == pytest.approx(expected.mean(), abs=1e-12)
    assert record.n_samples == len(entries)
    path = record_path(config.output, tiny.name, tiny.pretrained, spec.name, "caption_selection")
    outputs = read_sample_outputs(sidecar_path(path))
    assert outputs.ids == [str(3 * k + 1) for k in range(len(entries))]
    assert outputs.arrays["correct"][:, 0].astype(bool).tolist() == expected.tolist()
    assert recompute_metrics(outputs) == record.metrics
    assert paired_samples(outputs, outputs, "accuracy").value({"value": expected.astype(float)}) == expected.mean()

    # other negatives, same feature cache: their texts are encoded afresh and the recomputed record
    # follows them (--force: a stored record is reused by its settings, which name no data file)
    changed = {k: f"a {synthetic.generate('tests/caption-selection', i).scene.color} thing" for k, i in
               enumerate([0, 1, 2, 3, 4, 5, 2])}
    entries = _sugar_crepe_layout(data, changed)
    (again,) = Evaluator(tiny, dataclasses.replace(config, force=True)).run([spec])
    assert again.metrics["accuracy"] == pytest.approx(_direct_selection(tiny, data, entries).mean(), abs=1e-12)


def test_winoground_layout_record_equals_direct_computation(tiny, tmp_path):
    import datasets

    examples = _scenes(16)
    rows = {"id": [], "image_0": [], "image_1": [], "caption_0": [], "caption_1": []}
    for e in range(8):
        a, b = examples[2 * e], examples[2 * e + 1]
        rows["id"].append(100 + e)
        rows["image_0"].append(a.image)
        rows["image_1"].append(b.image)
        rows["caption_0"].append(f"a {a.scene.color} {a.scene.shape} {a.scene.position}")
        # odd examples: a caption that differs from caption 0 in one word only
        other = b.scene.color if e % 2 == 0 else a.scene.color
        rows["caption_1"].append(f"a {other} {b.scene.shape} {b.scene.position}")
    features = datasets.Features({"id": datasets.Value("int64"), "image_0": datasets.Image(),
                                  "image_1": datasets.Image(), "caption_0": datasets.Value("string"),
                                  "caption_1": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "data" / "winoground"))

    spec = specs.load_spec("winoground")
    config = _config(tmp_path, ["winoground"])
    (record,) = Evaluator(tiny, config).run([spec])

    images = [img for pair in zip(rows["image_0"], rows["image_1"]) for img in pair]
    texts = [t for pair in zip(rows["caption_0"], rows["caption_1"]) for t in pair]
    image_f, text_f = _encode(tiny, [datasets.Image().decode_example(datasets.Image().encode_example(i))
                                     for i in images], texts)
    s = np.einsum("eid,ecd->eic", image_f.reshape(8, 2, -1), text_f.reshape(8, 2, -1))  # s[e, i, c]
    expected = _brute_force(s)
    for name, values in expected.items():
        assert record.metrics[name] == pytest.approx(np.mean(values), abs=1e-12), name
    assert record.n_samples == 8 and record.primary_metric == "group_score"
    outputs = read_sample_outputs(sidecar_path(record_path(config.output, tiny.name, tiny.pretrained,
                                                           "winoground", "winoground")))
    assert outputs.ids == [str(100 + e) for e in range(8)]  # one unit per example
    assert recompute_metrics(outputs) == record.metrics


def test_paired_table_rows_are_examples(tmp_path):
    examples = _scenes(4)
    folder = tmp_path / "paired"
    folder.mkdir()
    lines = []
    for e in range(2):
        for j in range(2):
            examples[2 * e + j].image.save(folder / f"{e}_{j}.png")
        lines.append(json.dumps({"i0": f"{e}_0.png", "i1": f"{e}_1.png", "c0": f"first {e}", "c1": f"second {e}"}))
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    spec = specs.parse_spec({"name": "paired", "tasks": ["winoground"], "primary_metric": "group_score",
                             "source": {"type": "table", "path": str(folder), "image_columns": ["i0", "i1"],
                                        "caption_columns": ["c0", "c1"]},
                             "splits": {"test": "test.jsonl"}}, tmp_path / "paired.yaml")
    from clipbench.data import load_split

    samples = load_split(spec, "test", tmp_path, tmp_path / "cache")
    assert samples.ids == ["0/0", "0/1", "1/0", "1/1"] and samples.examples == ["0", "0", "1", "1"]
    assert samples.captions == [["first 0"], ["second 0"], ["first 1"], ["second 1"]]
    assert samples.negatives == [["second 0"], ["first 0"], ["second 1"], ["first 1"]]
    assert np.array_equal(np.asarray(samples[3][0]), np.asarray(examples[3].image))
