"""Languages: XTD10 / Crossmodal-3600 layouts, DATASET@LANG records, --language, multilingual prompts.

Numbers are checked against a direct numpy computation from the embedded clipbench-tiny model's own
encoders on the same images and captions (tiny data: 6 images of 32 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipbench import specs
from clipbench.cli import _build_parser as build_parser
from clipbench.cli import config_from_args
from clipbench.config import RunConfig
from clipbench.data import load_split
from clipbench.errors import ClipbenchError
from clipbench.pipeline import run
from clipbench.report import report_tables
from clipbench.results import load_records
from clipbench.tasks.zeroshot import has_placeholder

from conftest import make_image

CAPTIONS = {
    "en": ["a red square", "a green circle", "a blue triangle", "a red circle", "a green square", "a blue circle"],
    "de": ["ein rotes Quadrat", "ein grüner Kreis", "ein blaues Dreieck", "ein roter Kreis", "ein grünes Quadrat",
           "ein blauer Kreis"],
    "ja": ["赤い四角", "緑の円", "青い三角", "赤い円", "緑の四角", "青い円"],
}
FILES = {"en": "XTD10/test_1kcaptions_en.txt", "de": "MIC/test_1kcaptions_de.txt", "ja": "STAIR/test_1kcaptions_jp.txt"}


def write_xtd10(root: Path) -> list[str]:
    """XTD10's layout: images/, XTD10/test_image_names.txt and the per-language caption files."""
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(6)]
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(names):
        make_image(i % 3, i).save(root / "images" / name, quality=95)
    for folder in ("XTD10", "MIC", "STAIR"):
        (root / folder).mkdir()
    (root / "XTD10" / "test_image_names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    for language, lines in CAPTIONS.items():
        (root / FILES[language]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return names


def config_for(tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(model="clipbench-tiny", pretrained="synthetic", data_root=tmp_path / "data",
                     output=tmp_path / "out", cache_dir=tmp_path / "cache", batch_size=4, workers=0,
                     device="cpu", precision="fp32", n_bootstrap=0, **kw)


def normalized(x: torch.Tensor) -> np.ndarray:
    x = x.float().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def direct_recalls(model, paths: list[Path], captions: list[str]) -> dict[str, float]:
    """One caption per image, caption i of image i: recall@k of both directions by stable argsort."""
    net = model.model
    with torch.no_grad():
        images = normalized(net.encode_image(torch.stack([model.preprocess(Image.open(p).convert("RGB"))
                                                          for p in paths])))
        texts = normalized(net.encode_text(model.tokenizer(captions)))
    scores = texts @ images.T
    t2i = np.array([np.where(np.argsort(-row, kind="stable") == i)[0][0] + 1 for i, row in enumerate(scores)])
    i2t = np.array([np.where(np.argsort(-col, kind="stable") == i)[0][0] + 1 for i, col in enumerate(scores.T)])
    return {**{f"text_to_image_R@{k}": float(np.mean(t2i <= k)) for k in (1, 5)},
            **{f"image_to_text_R@{k}": float(np.mean(i2t <= k)) for k in (1, 5)}}


@pytest.fixture(scope="module")
def tiny():
    from clipbench.models import load_model

    return load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32")


def test_xtd10_per_language_recalls_match_numpy(tmp_path, tiny, one_torch_thread):
    root = tmp_path / "data" / "xtd10"
    names = write_xtd10(root)
    outcome = run(config_for(tmp_path, datasets=["xtd10"], tasks=["retrieval"], languages=["en", "de", "jp"],
                             recall_k=[1, 5]))
    assert not outcome.failures
    model_dir = tmp_path / "out" / "clipbench-tiny__synthetic"
    for language, dataset in (("en", "xtd10"), ("de", "xtd10@de"), ("ja", "xtd10@ja")):
        record = json.loads((model_dir / dataset / "retrieval.json").read_text(encoding="utf-8"))
        assert record["dataset"] == dataset and record["config"]["language"] == language
        expected = direct_recalls(tiny, [root / "images" / n for n in names], CAPTIONS[language])
        for metric, value in expected.items():
            assert record["metrics"][metric] == pytest.approx(value, abs=1e-9), (language, metric)
    # the captions differ, the images are the same: one image encoding serves every language
    assert len(list((tmp_path / "cache" / "features" / "image").rglob("*.npz"))) == 1
    assert len(list((tmp_path / "cache" / "features" / "text").rglob("*.npz"))) == 3
    # the report: one row per language
    tables = {t.title: t for t in report_tables(load_records([tmp_path / "out"]))}
    by_language = tables["By language"].frame
    assert list(by_language["row"]) == ["de", "en", "ja"]
    column = "xtd10 retrieval text_to_image_R@1"
    de = json.loads((model_dir / "xtd10@de" / "retrieval.json").read_text(encoding="utf-8"))
    assert by_language.set_index("row").loc["de", column] == de["metrics"]["text_to_image_R@1"]


def write_color_spec(tmp_path: Path) -> Path:
    """An image-folder classification spec with German prompts beside its English ones."""
    from conftest import write_imagefolder

    write_imagefolder(tmp_path / "data" / "colors")
    spec = tmp_path / "colors.yaml"
    spec.write_text(
        "name: colors\ntasks: [zeroshot, linear_probe]\nprimary_metric: accuracy\nnum_classes: 3\n"
        "source: {type: imagefolder, path: colors, class_folders: [a_red, b_green, c_blue]}\nsplits: {train: train, test: test}\n"
        "classnames: [red, green, blue]\ntemplates: ['a photo of a {c}.', 'a {c} picture.']\n"
        "languages:\n  de:\n    classnames: [rot, grün, blau]\n    templates: ['ein Foto von {c}.']\n"
        "    templates_origin: test\n", encoding="utf-8")
    return spec


def test_language_changes_text_features_not_image_features(tmp_path, tiny, one_torch_thread):
    spec_file = write_color_spec(tmp_path)
    plain = run(config_for(tmp_path, datasets=[str(spec_file)], tasks=["zeroshot", "linear_probe"]))
    model_dir = tmp_path / "out" / "clipbench-tiny__synthetic"
    english = json.loads((model_dir / "colors" / "zeroshot.json").read_text(encoding="utf-8"))
    assert "language" not in english["config"]  # a run without --language writes what it wrote before
    cache = tmp_path / "cache" / "features"
    images_before = sorted(p.name for p in (cache / "image").rglob("*.npz"))

    both = run(config_for(tmp_path, datasets=[str(spec_file)], tasks=["zeroshot", "linear_probe"],
                          languages=["en", "de"]))
    assert not plain.failures and not both.failures
    # the English records are reused (same settings digest); German adds zero-shot only
    assert json.loads((model_dir / "colors" / "zeroshot.json").read_text(encoding="utf-8")) == english
    assert sorted(p.name for p in (model_dir / "colors@de").glob("*.json")) == ["zeroshot.json",
                                                                                "zeroshot.per_class.json"]
    assert sorted(p.name for p in (cache / "image").rglob("*.npz")) == images_before
    assert len(list((cache / "text").rglob("*.npz"))) == 2
    german = json.loads((model_dir / "colors@de" / "zeroshot.json").read_text(encoding="utf-8"))
    assert german["config"]["language"] == "de" and german["config"]["templates_origin"] == "test"
    assert german["config"]["settings_digest"] != english["config"]["settings_digest"]
    assert german["config"]["prompts_digest"] != english["config"]["prompts_digest"]

    # the German accuracy from the model's own encoders, prompts averaged per class
    files = sorted((tmp_path / "data" / "colors" / "test").rglob("*.png"))
    labels = np.array([["a_red", "b_green", "c_blue"].index(p.parent.name) for p in files])
    net = tiny.model
    with torch.no_grad():
        images = normalized(net.encode_image(torch.stack([tiny.preprocess(Image.open(p).convert("RGB"))
                                                          for p in files])))
        weights = normalized(torch.stack([
            torch.from_numpy(normalized(net.encode_text(tiny.tokenizer([f"ein Foto von {c}."])))).mean(0)
            for c in ("rot", "grün", "blau")]))
    assert german["metrics"]["accuracy"] == pytest.approx(np.mean((images @ weights.T).argmax(1) == labels))


def test_image_key_ignores_language_captions(tmp_path, tiny):
    from clipbench.features import FeatureCache, image_cache_key, text_features

    write_xtd10(tmp_path / "data" / "xtd10")
    base = specs.load_spec("xtd10")
    keys, texts = set(), set()
    cache = FeatureCache(tmp_path / "cache")
    for language in ("en", "de"):
        spec = base.for_language(language)
        samples = load_split(spec, "test", tmp_path / "data", tmp_path / "cache", allow_download=False)
        assert [c[0] for c in samples.captions] == CAPTIONS[language]
        keys.add(FeatureCache.digest(image_cache_key(tiny, spec, "test", samples)))
        texts.add(text_features(tiny, [c[0] for c in samples.captions], cache, batch_size=8).tobytes())
    assert len(keys) == 1 and len(texts) == 2


def test_crossmodal3600_layout(tmp_path):
    root = tmp_path / "data" / "crossmodal3600"
    (root / "images").mkdir(parents=True)
    rows = []
    for i, key in enumerate(["a1", "b2", "c3"]):
        make_image(i, i).save(root / "images" / f"{key}.jpg")
        rows.append({"image/key": key, "en": {"caption": [f"photo {i}", f"second {i}"]},
                     "de": {"caption": [f"Foto {i}"]}})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    spec = specs.load_spec("crossmodal3600")
    assert len(spec.available_languages) == 36 and spec.available_languages[0] == "en"
    english = load_split(spec, "test", tmp_path / "data", tmp_path, allow_download=False)
    german = load_split(spec.for_language("de"), "test", tmp_path / "data", tmp_path, allow_download=False)
    assert english.captions == [["photo 0"], ["photo 1"], ["photo 2"]]  # the first, as clip_benchmark
    assert german.captions == [["Foto 0"], ["Foto 1"], ["Foto 2"]]
    assert english.ids == german.ids == ["images/a1.jpg", "images/b2.jpg", "images/c3.jpg"]
    with pytest.raises(ClipbenchError, match="no list of captions at 'fr.caption'"):
        load_split(spec.for_language("fr"), "test", tmp_path / "data", tmp_path, allow_download=False)


@pytest.mark.parametrize("language", ["zh", "it", "ja", "ar"])
def test_imagenet_prompts_per_language(language):
    spec = specs.load_spec(f"imagenet@{language}")
    assert spec.record_name == f"imagenet@{language}" and spec.paper_name is None
    classnames, templates, origin = spec.prompts()
    assert len(classnames) == 1000 and not any(has_placeholder(c) for c in classnames)
    assert templates and all("{c}" in t for t in templates)
    assert templates != specs.load_spec("imagenet").templates and classnames != spec.classnames
    assert "CLIP_benchmark@acf0c7da908e6c995578da0e7ef2482055767f84" in origin
    # ImageNet-R/A keep their 200-class restriction in every language
    assert specs.load_spec(f"imagenet_r@{language}").class_subset == specs.load_spec("imagenet_r").class_subset
    assert max(specs.load_spec(f"imagenet_a@{language}").class_subset) < len(classnames)


def test_language_input_errors(tmp_path):
    with pytest.raises(ClipbenchError, match="offers en, zh, it, ja, ar"):
        specs.load_spec("imagenet@de")
    with pytest.raises(ClipbenchError, match=r"languages.de.source.captions_fil'.*did you mean 'captions_file'"):
        bad = tmp_path / "x.yaml"
        bad.write_text("name: x\ntasks: [retrieval]\nprimary_metric: text_to_image_R@1\n"
                       "source: {type: aligned_captions, path: x, captions_file: a.txt}\nsplits: {test: list.txt}\n"
                       "languages: {de: {source: {captions_fil: b.txt}}}\n", encoding="utf-8")
        specs.load_spec(bad)
    with pytest.raises(ClipbenchError, match="--language EN is invalid"):
        RunConfig(languages=["EN"]).validate()
    args = build_parser().parse_args(["run", "--language", "en", "de,cn"])
    assert config_from_args(args).resolved().languages == ["en", "de", "zh"]
    assert config_from_args(build_parser().parse_args(["run"])).languages is None


def test_clip_benchmark_language_results_read_as_language_records():
    from clipbench.interop import from_clip_benchmark
    from clipbench.results import records_frame

    base = {"model": "ViT-B-32", "pretrained": "openai", "task": "zeroshot_classification",
            "metrics": {"acc1": 0.5, "acc5": 0.75}}
    chinese = from_clip_benchmark({**base, "dataset": "imagenet1k", "language": "cn"})
    english = from_clip_benchmark({**base, "dataset": "imagenet1k", "language": "en"})
    german = from_clip_benchmark({"model": "m", "pretrained": "p", "dataset": "multilingual_mscoco_captions",
                                  "task": "zeroshot_retrieval", "language": "de",
                                  "metrics": {"image_retrieval_recall@1": 0.25}})
    assert (chinese["dataset"], english["dataset"], german["dataset"]) == ("imagenet@zh", "imagenet", "xtd10@de")
    frame = records_frame([{**r, "n_samples": 1} for r in (chinese, english, german)])
    assert list(frame["language"]) == ["zh", "", "de"]
