"""The packaged evaluation suite: every spec validates and agrees with the paper's Table 9."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from clipbench.paths import templates_dir
from clipbench.specs import all_groups, list_specs, load_spec

ROOT = Path(__file__).resolve().parents[1]
TABLE9 = ROOT / "reference" / "datasets.csv"
# Table 9 misprints these class counts; the specs carry the datasets' real counts.
TABLE9_MISPRINTS = {"food101": (102, 101), "fer2013": (8, 7)}

SUITE = [s for s in list_specs() if not s.name.startswith("synthetic")]
ZEROSHOT = [s for s in SUITE if "zeroshot" in s.tasks]


def _table9() -> dict[str, dict[str, str]]:
    with TABLE9.open(newline="", encoding="utf-8") as f:
        return {row["clipbench_name"]: row for row in csv.DictReader(f)}


def test_table9_copy_matches_the_shared_reference():
    shared = Path("/work/shared/reference/datasets.csv")
    if not shared.is_file():
        pytest.skip("shared reference not present on this machine")
    with shared.open(newline="", encoding="utf-8") as f:
        original = list(csv.DictReader(f))
    with TABLE9.open(newline="", encoding="utf-8") as f:
        copy = list(csv.DictReader(f))
    assert [{k: r[k] for k in original[0]} for r in copy] == original


def test_paper_group_is_exactly_the_27_datasets_of_table9():
    table = _table9()
    assert len(table) == 27
    assert sorted(all_groups()["paper"]) == sorted(table)


@pytest.mark.parametrize("name", sorted(_table9()))
def test_spec_matches_table9(name):
    row = _table9()[name]
    spec = load_spec(name)
    assert spec.paper_name == row["name"]
    assert spec.primary_metric == row["clipbench_metric"]
    printed = int(row["classes"])
    expected = TABLE9_MISPRINTS[name][1] if name in TABLE9_MISPRINTS else printed
    if name in TABLE9_MISPRINTS:
        assert printed == TABLE9_MISPRINTS[name][0]
    assert spec.num_classes == expected
    assert "zeroshot" in spec.tasks and "linear_probe" in spec.tasks


@pytest.mark.parametrize("spec", SUITE, ids=lambda s: s.name)
def test_spec_file_is_complete(spec):
    assert spec.file.stem == spec.name
    assert spec.notes, "every suite spec says how it follows (or deviates from) the paper"
    if spec.source.type in ("imagefolder", "table", "video") or not spec.source.download:
        assert spec.source.manual, "data that cannot be downloaded needs manual steps"
    class_folders = getattr(spec.source.options, "class_folders", None)  # imagefolder only
    if class_folders is not None:
        assert len(class_folders) == spec.num_classes
        assert len(set(class_folders)) == spec.num_classes


@pytest.mark.parametrize("spec", ZEROSHOT, ids=lambda s: s.name)
def test_zeroshot_specs_have_prompts_of_the_right_length(spec):
    if spec.templates is None and spec.classnames is None:
        # DataComp's WILDS / fairness copies: both come from the webdataset folder, as DataComp reads them
        assert spec.source.type == "webdataset" and spec.source.path.startswith("djghosh/wds_")
        assert "classnames.txt" in spec.templates_origin
        assert "zeroshot_classification_templates.txt" in spec.templates_origin
        return
    assert spec.templates and all("{c}" in t for t in spec.templates)
    assert len(set(spec.templates)) == len(spec.templates)
    assert spec.templates_origin
    if spec.classnames is None:  # read from the clip_benchmark webdataset folder (ObjectNet)
        assert spec.source.type == "webdataset" and "classnames.txt" in spec.templates_origin
        return
    assert all(name.strip() == name and name for name in spec.classnames)
    if spec.class_subset is not None:
        assert len(spec.class_subset) == spec.num_classes
        assert list(spec.class_subset) == sorted(set(spec.class_subset))
        assert max(spec.class_subset) < len(spec.classnames)
    else:
        assert len(spec.classnames) == spec.num_classes
        if spec.raw["classnames"] != "imagenet/classnames.txt":  # ImageNet repeats 'missile', 'sunglasses'
            assert len(set(spec.classnames)) == len(spec.classnames)


def test_imagenet_prompts_are_the_papers_80_templates_and_1000_classes():
    spec = load_spec("imagenet")
    assert len(spec.templates) == 80 and len(spec.classnames) == 1000
    assert spec.classnames[0] == "tench" and spec.classnames[-1] == "toilet paper"
    assert "itap of a {c}." in spec.templates
    for shift in ("imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch"):
        other = load_spec(shift)
        assert other.classnames == spec.classnames and other.templates == spec.templates


def test_imagenet_r_and_a_subsets_hold_known_classes():
    names = load_spec("imagenet").classnames
    r = {names[i] for i in load_spec("imagenet_r").class_subset}
    a = {names[i] for i in load_spec("imagenet_a").class_subset}
    assert {"goldfish", "great white shark", "hammerhead shark"} <= r
    assert {"stingray", "cheeseburger", "volcano"} <= a  # members of the 200 ImageNet-A classes
    assert "tench" not in a  # class 0 is not one of ImageNet-A's classes


def test_label_orders_follow_the_sources():
    # torchvision OxfordIIITPet uses the official (case-insensitive alphabetical) class ids
    pets = load_spec("oxford_pets").classnames
    assert list(pets) == sorted(pets, key=str.lower) and pets[1] == "american bulldog"
    # VTAB's count-all labels are count - 3
    assert load_spec("clevr_counts").classnames == tuple(str(n) for n in range(3, 11))
    # FER2013 ids: 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral
    assert load_spec("fer2013").classnames == ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
    # EuroSAT folder order: AnnualCrop, Forest, HerbaceousVegetation, Highway, ...
    assert load_spec("eurosat").classnames[:3] == ("annual crop land", "forest", "brushland or shrubland")
    # Caltech101 via TFDS: lower-cased sorted folder names, background_google among them
    assert load_spec("caltech101").classnames[4] == "background"
    ucf = load_spec("ucf101").classnames
    assert ucf[0] == "Apply Eye Makeup" and ucf[-1] == "Yo Yo"
    kinetics = load_spec("kinetics700").classnames
    assert list(kinetics) == sorted(kinetics) and kinetics[0] == "abseiling" and kinetics[-1] == "zumba"


def test_class_folders_spell_the_classnames():
    for name in ("birdsnap", "sun397"):
        spec = load_spec(name)
        assert [f.replace("_", " ") for f in spec.source.options.class_folders] == list(spec.classnames)


def test_fer2013_synonyms_start_with_the_classnames():
    lines = (templates_dir() / "fer2013" / "classname_synonyms.txt").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines] == list(load_spec("fer2013").classnames)


def test_groups_and_retrieval_specs():
    groups = all_groups()
    assert sorted(groups["imagenet-shifts"]) == ["imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2",
                                                 "objectnet"]
    assert sorted(groups["retrieval"]) == ["flickr30k", "mscoco"]
    assert set(groups["vtab"]) < set(groups["paper"])
    for name in ("flickr30k", "mscoco"):
        spec = load_spec(name)
        assert spec.tasks == ("retrieval",) and spec.primary_metric == "text_to_image_R@1"
        assert spec.split("test") == "test" and spec.source.options.caption_column


@pytest.mark.parametrize("spec", [s for s in list_specs() if s.source.type in ("imagefolder", "synthetic")],
                         ids=lambda s: s.name)
def test_packaged_folder_specs_keep_their_class_order(spec):
    """Image folders without class_folders map folders to classes by name (and refuse otherwise):
    every packaged one either declares the order or has folders that sort like its class names,
    so that rule changes no packaged dataset's labels."""
    if spec.source.type == "imagefolder":
        assert spec.source.options.class_folders is not None
        return
    from clipbench.synthetic import CLASSNAMES

    if spec.is_captioned:  # retrieval and caption-set data: tables, no class folders
        assert spec.name not in CLASSNAMES
        return
    # the generator names each class folder by its class name (synthetic._write_classification)
    assert spec.classnames == CLASSNAMES[spec.name] == tuple(sorted(spec.classnames))
