"""Run paths of `clipbench run` beyond plain zero-shot: few-shot, prompt overrides, class subsets,
probe feature and solver choices, multi-label data.

Each test drives the command line (``clipbench.cli.main`` with flags), reads the JSON records it
writes under ``--output``, and compares them with an independent computation on the same image
files: open_clip's own model (built here, not by clipbench), its ``encode_image``/``encode_text``,
numpy, and scikit-learn ``LogisticRegression`` (``conftest.reference_sweep``). clipbench is used
on the reference side only to pick sample indices (the validation carve and the few-shot shot
sets), which are not what these tests check.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score

from clipbench.cli import main
from clipbench.tasks.linear_probe import sample_few_shot, stratified_val_split

from conftest import reference_ap_11point, reference_protocol, reference_sweep, write_imagefolder

ARCH = "ViT-S-32-alt"
FOLDERS = ("a_red", "b_green", "c_blue")  # the imagefolder fixture's classes, in label order
PROMPTS = {"classnames": ["red", "green", "blue"], "templates": ["a photo of a {c}.", "a {c} picture."]}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip():
    """``--pretrained none`` as open_clip itself builds it: random init under seed 0 (the weights
    digest clipbench records is ``random:0``), with open_clip's eval transform and tokenizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None, precision="fp32",
                                                                     device="cpu")
    return model.eval(), preprocess, open_clip.get_tokenizer(ARCH)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The imagefolder fixture's images, once for the module."""
    return write_imagefolder(tmp_path_factory.mktemp("colours") / "folder")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature cache for the module's runs: each image split is encoded by clipbench once
    (a cache hit returns what that encoding stored; caching has its own tests)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def direct(clip, folder) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split -> (projected, pre-projection, labels) computed by open_clip from the files."""
    out = {}
    for split in ("train", "test"):
        files, labels = split_files(folder, split)
        out[split] = (*encode_images(clip, files), labels)
    return out


def split_files(root: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """An imagefolder split's files and labels: class folders in label order, files sorted."""
    files, labels = [], []
    for label, folder in enumerate(FOLDERS):
        found = sorted((root / split / folder).glob("*.png"))
        files += found
        labels += [label] * len(found)
    return files, np.array(labels)


def encode_images(clip, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalized projected embeddings, pre-projection features) from open_clip's forward."""
    model, preprocess, _ = clip
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in files])
    # the tower's own forward without its final projection gives the pooled pre-projection feature
    visual = copy.deepcopy(model.visual)
    visual.proj = None
    with torch.no_grad():
        projected = model.encode_image(pixels, normalize=True).numpy()
        pre = visual(pixels).numpy()
    return projected, pre


def zeroshot_weights(clip, classnames: list[str], templates: list[str]) -> np.ndarray:
    """(D, C) prompt-ensembled classifier: mean of unit prompt embeddings per class, renormalized."""
    model, _, tokenizer = clip
    columns = []
    with torch.no_grad():
        for name in classnames:
            text = model.encode_text(tokenizer([t.replace("{c}", name) for t in templates])).numpy()
            mean = (text / np.linalg.norm(text, axis=1, keepdims=True)).mean(0)
            columns.append(mean / np.linalg.norm(mean))
    return np.stack(columns, axis=1)


def per_class_recall(predictions: np.ndarray, labels: np.ndarray, n: int) -> list[float]:
    return [float(np.mean(predictions[labels == c] == c)) for c in range(n)]


def write_spec(tmp_path: Path, name: str, **fields) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "title": name, **fields}))  # JSON is YAML
    return path


def folder_spec(tmp_path: Path, root: Path, tasks: list[str], **fields) -> Path:
    return write_spec(tmp_path, "colours", tasks=tasks, primary_metric="accuracy", num_classes=3,
                      source={"type": "imagefolder", "path": str(root), "class_folders": list(FOLDERS)},
                      splits={"train": "train", "test": "test"}, **{**PROMPTS, **fields})


def clipbench_run(tmp_path: Path, cache: Path, spec: Path, *flags: str) -> dict[str, dict]:
    """`clipbench run` on one spec with ViT-S-32-alt, random weights, fp32 on CPU; returns the
    records it wrote (task -> JSON) and the sidecars (``<task>.per_class`` -> JSON)."""
    out = tmp_path / "out"
    code = main(["run", "--model", ARCH, "--pretrained", "none", "--datasets", str(spec),
                 "--output", str(out), "--cache-dir", str(cache), "--workers", "0",
                 "--device", "cpu", "--precision", "fp32", "--batch-size", "8", "--bootstrap", "50", *flags])
    assert code == 0
    folder = out / f"{ARCH}__none" / spec.stem
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in folder.glob("*.json")}


def accuracy_of(model, x, y) -> float:
    return accuracy_score(y, model.predict(x))


def carved_validation(train_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stratified validation carve the spec's default val_fraction (0.2) and seed 0 ask for."""
    return stratified_val_split(train_y, 0.2, seed=0)


# --------------------------------------------------------------------------------- few-shot


@pytest.mark.slow
def test_few_shot_record_equals_scikit_learn_on_the_same_shot_sets(clip, folder, cache, direct, tmp_path):
    spec = folder_spec(tmp_path, folder, ["zeroshot", "linear_probe"])
    records = clipbench_run(tmp_path, cache, spec, "--tasks", "few_shot", "--few-shot", "1,2", "--few-shot-seeds", "2")
    assert set(records) == {"few_shot"}
    record = records["few_shot"]

    (_, train_x, train_y), (_, test_x, test_y) = direct["train"], direct["test"]
    pool, val = carved_validation(train_y)
    expected = {}
    for k in (1, 2):
        scores, log10_c = [], []
        for seed in (0, 1):
            shots = pool[sample_few_shot(train_y[pool], k, seed)]
            chosen, _, fitted = reference_sweep(train_x[shots], train_y[shots], train_x[val], train_y[val],
                                                accuracy_of)
            # few-shot scores the shot-set model at the chosen C: no refit with validation data
            scores.append(accuracy_of(fitted[chosen], test_x.astype(np.float64), test_y))
            log10_c.append(chosen)
        expected[k] = scores, log10_c

    details = record["details"]
    assert details["val_source"] == "stratified 0.2 of train (seed 0)" and details["n_val"] == len(val)
    assert details["feature_kind"] == "before_projection" and details["primary_is_largest_k"] == 2
    for k, (scores, log10_c) in expected.items():
        entry = details["k"][str(k)]
        assert entry["seeds"] == pytest.approx(scores, abs=1e-12)
        assert [math.log10(c) for c in entry["C"]] == pytest.approx(log10_c, abs=1e-9)
        assert record["metrics"][f"accuracy@{k}shot"] == pytest.approx(np.mean(scores), abs=1e-12)
        assert entry["std"] == pytest.approx(np.std(scores, ddof=1), abs=1e-12)
    assert record["metrics"]["accuracy"] == record["metrics"]["accuracy@2shot"]
    assert record["config"]["few_shot_k"] == [1, 2] and record["config"]["few_shot_seeds"] == 2


# ------------------------------------------------------------------------- prompt overrides


def test_templates_and_classnames_files_replace_the_spec_prompts(clip, folder, cache, direct, tmp_path):
    spec = folder_spec(tmp_path, folder, ["zeroshot"])
    templates = tmp_path / "templates.txt"
    templates.write_text("itap of a {c}.\na blurry photo of the {c}.\n{c}\n")
    classnames = tmp_path / "classnames.txt"
    classnames.write_text("crimson\nemerald\nnavy\n")
    records = clipbench_run(tmp_path, cache, spec, "--tasks", "zeroshot", "--templates", str(templates),
                            "--classnames", str(classnames))
    record, sidecar = records["zeroshot"], records["zeroshot.per_class"]

    image, _, labels = direct["test"]
    predicted = (image @ zeroshot_weights(clip, ["crimson", "emerald", "navy"],
                                          ["itap of a {c}.", "a blurry photo of the {c}.", "{c}"])).argmax(1)
    with_spec_prompts = (image @ zeroshot_weights(clip, **PROMPTS)).argmax(1)
    # the override must be visible in what the record reports, or this test could not tell
    assert per_class_recall(predicted, labels, 3) != per_class_recall(with_spec_prompts, labels, 3)

    assert record["metrics"]["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    assert [c["recall"] for c in sidecar["per_class"]] == pytest.approx(per_class_recall(predicted, labels, 3))
    assert sidecar["classnames"] == ["crimson", "emerald", "navy"]
    assert record["details"]["n_templates"] == 3
    assert record["config"]["templates_origin"] == f"user file {templates}"
    assert record["config"]["templates_file"] == str(templates)
    assert record["config"]["classnames_file"] == str(classnames)


# ----------------------------------------------------------------------------- class subset


def test_class_subset_restricts_the_logits_end_to_end(clip, folder, cache, direct, tmp_path):
    """ImageNet-R/A style: the classifier has more classes than the data; labels index the subset."""
    # A random model's names are arbitrary labels. These put the random classifier's favourite
    # classes (grey, black) outside the subset and let the subset win for two of the three colours.
    full = ["grey", "yellow", "black", "purple", "red"]
    subset = [1, 3, 4]  # the fixture's labels 0, 1, 2 are these positions of the full list
    spec = folder_spec(tmp_path, folder, ["zeroshot"], classnames=full, class_subset=subset)
    records = clipbench_run(tmp_path, cache, spec, "--tasks", "zeroshot")
    record, sidecar = records["zeroshot"], records["zeroshot.per_class"]

    image, _, labels = direct["test"]
    logits = image @ zeroshot_weights(clip, full, PROMPTS["templates"])
    restricted = logits[:, subset].argmax(1)
    unrestricted = np.array([subset.index(w) if w in subset else -1 for w in logits.argmax(1)])
    # some images prefer a class outside the subset, so the restriction shows in the record
    assert per_class_recall(unrestricted, labels, 3) != per_class_recall(restricted, labels, 3)
    assert 0 < np.mean(restricted == labels) < 1

    assert record["metrics"]["accuracy"] == pytest.approx(np.mean(restricted == labels), abs=1e-12)
    assert [c["recall"] for c in sidecar["per_class"]] == pytest.approx(per_class_recall(restricted, labels, 3))
    assert sidecar["classnames"] == ["yellow", "purple", "red"]
    assert record["details"]["logits_restricted_to_class_subset"] == 3


# ------------------------------------------------------------------ probe features and solver


def probe_reference(train_x, train_y, test_x, test_y) -> tuple[float, float]:
    """(test accuracy, C) of the paper's probe in scikit-learn with the carved validation split."""
    fit, val = carved_validation(train_y)
    C, _, final = reference_protocol(train_x[fit], train_y[fit], train_x[val], train_y[val], accuracy_of)
    return accuracy_of(final, test_x.astype(np.float64), test_y), C


def test_linear_probe_on_projected_features_equals_scikit_learn(clip, folder, cache, direct, tmp_path):
    spec = folder_spec(tmp_path, folder, ["zeroshot", "linear_probe"])
    record = clipbench_run(tmp_path, cache, spec, "--tasks", "linear_probe", "--probe-features", "projected")["linear_probe"]

    (train_x, _, train_y), (test_x, _, test_y) = direct["train"], direct["test"]
    accuracy, C = probe_reference(train_x, train_y, test_x, test_y)
    assert record["details"]["feature_kind"] == "projected" and record["config"]["probe_features"] == "projected"
    assert record["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert record["details"]["C"] == pytest.approx(C, rel=1e-12)
    assert (record["details"]["n_train"], record["details"]["n_val"], record["n_samples"]) == (12, 3, 9)


def test_torch_solver_through_the_pipeline_agrees_with_scikit_learn(clip, folder, cache, direct, tmp_path):
    spec = folder_spec(tmp_path, folder, ["zeroshot", "linear_probe"])
    record = clipbench_run(tmp_path, cache, spec, "--tasks", "linear_probe", "--probe-solver", "torch")["linear_probe"]

    (_, train_x, train_y), (_, test_x, test_y) = direct["train"], direct["test"]
    accuracy, C = probe_reference(train_x, train_y, test_x, test_y)
    assert record["details"]["solver"] == "torch" and record["details"]["feature_kind"] == "before_projection"
    # test_linear_probe.py's tolerance for the torch solver: predictions agree (all 9 here), C
    # within a quarter decade
    assert record["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert abs(math.log10(record["details"]["C"]) - math.log10(C)) <= 0.25


# ------------------------------------------------------------------------------ multi-label


def test_multilabel_table_zeroshot_map_equals_voc_11point_ap(clip, folder, cache, direct, tmp_path):
    """VOC2007's shape: a table whose label column holds lists of class indices, 11-point mAP."""
    files, colours = split_files(folder, "test")
    targets = np.zeros((len(files), 3), dtype=np.uint8)
    targets[np.arange(len(files)), colours] = 1
    targets[::2, 2] = 1  # every other image also shows something blue
    table = tmp_path / "table" / "test.jsonl"
    table.parent.mkdir()
    table.write_text("".join(json.dumps({"image": str(p), "labels": np.flatnonzero(row).tolist()}) + "\n"
                             for p, row in zip(files, targets)))
    spec = write_spec(tmp_path, "multi", tasks=["zeroshot"], primary_metric="map_11point", num_classes=3,
                      multilabel=True, splits={"test": "test.jsonl"}, **PROMPTS,
                      source={"type": "table", "path": str(table.parent), "image_column": "image",
                              "label_column": "labels"})
    records = clipbench_run(tmp_path, cache, spec, "--tasks", "zeroshot")
    record, sidecar = records["zeroshot"], records["zeroshot.per_class"]

    logits = direct["test"][0] @ zeroshot_weights(clip, **PROMPTS)  # the table lists the same files
    ap = [reference_ap_11point(logits[:, c].tolist(), targets[:, c].tolist()) for c in range(3)]
    assert record["primary_metric"] == "map_11point" and record["n_samples"] == len(files)
    assert record["metrics"]["map_11point"] == pytest.approx(np.mean(ap), abs=1e-9)
    assert [c["ap"] for c in sidecar["per_class"]] == pytest.approx(ap, abs=1e-9)
    assert [c["n"] for c in sidecar["per_class"]] == targets.sum(0).tolist()
