"""Dataset spec loading and validation."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from clipbench import specs
from clipbench.errors import ClipbenchError

VALID = """
name: {name}
title: My set
tasks: [zeroshot, linear_probe]
primary_metric: accuracy
num_classes: 3
groups: [mine]
source:
  type: imagefolder
  path: /somewhere/folder
splits:
  train: train
  test: test
classnames: [red, green, blue]
templates: ["a photo of a {{c}}.", "a {{c}} thing."]
"""


def write(tmp_path: Path, text: str, name: str = "myset") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_spec_loads_from_a_path(tmp_path):
    path = write(tmp_path, VALID.format(name="myset"))
    spec = specs.load_spec(str(path))
    assert spec.name == "myset"
    assert spec.classnames == ("red", "green", "blue")
    assert spec.templates == ("a photo of a {c}.", "a {c} thing.")
    assert spec.split("val") is None and spec.split("test") == "test"
    assert spec.source.type == "imagefolder"
    assert spec.val_fraction == 0.2


def test_classnames_and_templates_from_files_relative_to_the_spec(tmp_path):
    (tmp_path / "names.txt").write_text("red\ngreen\n\nblue\n")
    (tmp_path / "tpl.txt").write_text("a {c}.\n")
    text = VALID.format(name="myset").replace("classnames: [red, green, blue]", "classnames: names.txt")
    text = text.replace('templates: ["a photo of a {c}.", "a {c} thing."]', "templates: tpl.txt")
    spec = specs.load_spec(write(tmp_path, text))
    assert spec.classnames == ("red", "green", "blue")
    assert spec.templates == ("a {c}.",)


def test_every_bad_field_is_reported_with_file_field_and_expectation(tmp_path):
    text = VALID.format(name="myset")
    text = text.replace("primary_metric: accuracy", "primary_metric: acc")
    text = text.replace("type: imagefolder", "type: folder")
    text = text.replace("num_classes: 3", "num_classes: 4\nclassnmes: [x]")
    path = write(tmp_path, text)
    with pytest.raises(ClipbenchError) as info:
        specs.load_spec(path)
    message = str(info.value)
    assert str(path) in message
    assert "field 'primary_metric'" in message and "'acc'" in message
    assert "field 'source.type'" in message and "'folder'" in message
    assert "field 'classnmes'" in message and "did you mean 'classnames'" in message
    assert "field 'classnames': expected 4 class names" in message


def test_name_must_match_file_and_templates_need_placeholder(tmp_path):
    text = VALID.format(name="other").replace('"a {c} thing."', '"no placeholder"')
    with pytest.raises(ClipbenchError) as info:
        specs.load_spec(write(tmp_path, text))
    assert "file name stem 'myset'" in str(info.value)
    assert "'{c}' placeholder" in str(info.value)


def test_class_subset_indexes_into_the_full_class_list(tmp_path):
    text = VALID.format(name="myset").replace("num_classes: 3", "num_classes: 2\nclass_subset: [0, 2]")
    spec = specs.load_spec(write(tmp_path, text))
    assert spec.class_subset == (0, 2)
    bad = VALID.format(name="myset").replace("num_classes: 3", "num_classes: 2\nclass_subset: [0, 5]")
    with pytest.raises(ClipbenchError, match="class_subset"):
        specs.load_spec(write(tmp_path, bad))


def test_data_digest_ignores_prompts_but_not_splits(tmp_path):
    a = specs.load_spec(write(tmp_path, VALID.format(name="myset")))
    b = specs.load_spec(write(tmp_path, VALID.format(name="myset").replace("a {c} thing.", "one {c}.")))
    c = specs.load_spec(write(tmp_path, VALID.format(name="myset").replace("test: test", "test: val2")))
    assert a.data_digest() == b.data_digest()
    assert a.data_digest() != c.data_digest()


def test_unknown_dataset_lists_close_names():
    names = list(specs.spec_files())
    if not names:
        pytest.skip("no packaged specs")
    target = names[0]
    typo = target[:-1] + ("x" if target[-1] != "x" else "y")
    with pytest.raises(ClipbenchError) as info:
        specs.load_spec(typo)
    assert target in str(info.value)


def test_select_resolves_groups_paths_and_dedupes(tmp_path):
    path = write(tmp_path, VALID.format(name="myset"))
    chosen = specs.select([f"{path},{path}"])
    assert [s.name for s in chosen] == ["myset"]
    groups = specs.all_groups()
    if groups:
        group, members = next(iter(groups.items()))
        assert [s.name for s in specs.select([group])] == members


def test_every_packaged_spec_validates():
    for spec in specs.list_specs():
        assert spec.name and spec.primary_metric


def test_primary_metric_must_fit_multilabel(tmp_path):
    # a mismatch used to pass validation and fail only when the dataset was evaluated
    for metric, multilabel in (("accuracy", "true"), ("map_11point", "false")):
        text = VALID.format(name="myset").replace("primary_metric: accuracy", f"primary_metric: {metric}")
        with pytest.raises(ClipbenchError) as info:
            specs.load_spec(write(tmp_path, text.replace("num_classes: 3", f"num_classes: 3\nmultilabel: {multilabel}")))
        assert "field 'primary_metric'" in str(info.value) and "map_11point for multi-label" in str(info.value)


RETRIEVAL = """
name: myset
tasks: [retrieval]
primary_metric: {metric}
source:
  type: webdataset
  path: /somewhere/wds
splits:
  test: test
"""


@pytest.mark.parametrize("metric", ["text_to_image_R@1", "image_to_text_R@10", "rsum"])
def test_retrieval_primary_metric_accepts_recall_and_rsum(tmp_path, metric):
    assert specs.load_spec(write(tmp_path, RETRIEVAL.format(metric=metric))).primary_metric == metric


@pytest.mark.parametrize("metric", ["text_to_image_mean_rank", "accuracy", "R@1"])
def test_retrieval_primary_metric_rejects_other_names(tmp_path, metric):
    with pytest.raises(ClipbenchError, match="a retrieval metric such as 'text_to_image_R@1'"):
        specs.load_spec(write(tmp_path, RETRIEVAL.format(metric=metric)))
