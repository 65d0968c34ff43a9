"""Validation on read: specs, classnames, checkpoints, records and cache entries that are bad end in
one clear message naming the file (or are skipped / recomputed with one warning), never a traceback."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from clipbench import models, results, specs
from clipbench.cli import main
from clipbench.config import RunConfig
from clipbench.errors import ClipbenchError
from clipbench.features import FeatureCache, text_features
from clipbench.paths import specs_dir
from clipbench.pipeline import prompts_for

ARCH = "ViT-S-32-alt"


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- specs

LAUGHS = "\n".join(
    [f'{key}: &{key} [{", ".join([f"*{prev}"] * 9)}]' for prev, key in zip("abcdefgh", "bcdefghi")]
)
BOMBS = {
    # the classic billion laughs: 9**9 strings once expanded
    "classnames": 'name: bomb\nx: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
                  + LAUGHS + "\nclassnames: *i\n",
    "kwargs": 'name: bomb\nsource:\n  type: torchvision\n  path: CIFAR10\n  kwargs: {a: &a [lol, lol, lol]}\n'
              '  other: [*a, *a]\n',
    "notes": "name: bomb\nnotes: &n lol\ntitle: *n\n",
}


@pytest.mark.parametrize("where", sorted(BOMBS))
def test_yaml_aliases_are_refused_before_they_expand(tmp_path, where):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS[where])
    start = time.perf_counter()
    with pytest.raises(ClipbenchError) as info:
        specs.load_spec(path)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert str(path) in message and "line " in message and "Write the list or value out in full" in message


@pytest.mark.parametrize("text, key, line, first", [
    ("name: dup\ntitle: x\nclassnames: [a, b]\nnotes: y\nclassnames: [c]\n", "classnames", 5, 3),
    ("name: dup\nsource:\n  type: imagefolder\n  path: x\n  type: table\n", "type", 5, 3),
])
def test_duplicate_yaml_keys_are_refused_with_key_file_and_line(tmp_path, text, key, line, first):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ClipbenchError) as info:
        specs.load_spec(path)
    message = str(info.value)
    assert f"{path}, line {line}" in message and f"key {key!r} appears twice" in message
    assert f"first on line {first}" in message


def test_an_alias_bomb_through_the_cli_is_exit_2_without_traceback(capsys, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS["classnames"])
    code, err = cli(capsys, "run", "--datasets", str(path), "--output", str(tmp_path / "o"),
                    "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and "Traceback" not in err and str(path) in err and "aliases" in err


def test_every_packaged_spec_still_loads_with_the_strict_loader():
    for path in specs_dir().glob("*.yaml"):
        assert specs.load_spec_file(path).file == path


def _user_copy(tmp_path, name="synthetic-shapes"):
    path = tmp_path / f"{name}.yaml"
    shutil.copy(specs_dir() / f"{name}.yaml", path)
    return path


def test_a_user_spec_named_like_a_packaged_one_wins_and_says_so(tmp_path, caplog):
    user = _user_copy(tmp_path)
    with caplog.at_level(logging.WARNING, logger="clipbench.specs"):
        alone = specs.select([str(user)])
    assert [s.file for s in alone] == [user]
    assert "like the packaged spec" in caplog.text and str(user) in caplog.text
    for order in (["synthetic-shapes", str(user)], [str(user), "synthetic-shapes"], ["synthetic", str(user)]):
        chosen = {s.name: s.file for s in specs.select(order)}
        assert chosen["synthetic-shapes"] == user, order


def test_the_packaged_record_is_superseded_not_reused_for_a_shadowing_spec(tmp_path):
    model = models.load_model("clipbench-tiny", "none", device="cpu", precision="fp32", cache_dir=tmp_path / "c")
    from clipbench.pipeline import Evaluator
    from clipbench.tasks import get_task

    evaluator = Evaluator(model, RunConfig(output=tmp_path / "o", cache_dir=tmp_path / "c", workers=0))
    packaged = specs.load_spec("synthetic-shapes")
    user = specs.load_spec(_user_copy(tmp_path))
    for task in ("zeroshot", "linear_probe"):
        stored = evaluator.record_settings(packaged, get_task(task))
        mine = evaluator.record_settings(user, get_task(task))
        assert stored["dataset_spec"]["file"] != mine["dataset_spec"]["file"]
        assert stored["settings_digest"] != mine["settings_digest"]  # run_task recomputes and supersedes


# ----------------------------------------------------------------------------- classnames vs templates

SPEC = """
name: mixup
tasks: [zeroshot]
primary_metric: accuracy
num_classes: 2
source: {{type: imagefolder, path: x}}
splits: {{test: test}}
classnames: {classnames}
templates: ["a photo of a {{c}}."]
"""


@pytest.mark.parametrize("lines", [["a photo of a {c}.", "a drawing of a {c}."], ["itap of a {}.", "a {} photo."]])
def test_a_templates_file_given_as_spec_classnames_is_refused(tmp_path, lines):
    wrong = tmp_path / "templates.txt"
    wrong.write_text("\n".join(lines) + "\n")
    spec = tmp_path / "mixup.yaml"
    spec.write_text(SPEC.format(classnames="templates.txt"))
    with pytest.raises(ClipbenchError) as info:
        specs.load_spec(spec)
    message = str(info.value)
    assert "field 'classnames'" in message and str(wrong) in message and "templates file given as classnames" in message


def test_an_inline_classnames_list_with_a_placeholder_is_refused(tmp_path):
    spec = tmp_path / "mixup.yaml"
    spec.write_text(SPEC.format(classnames='["a {c}", "b"]'))
    with pytest.raises(ClipbenchError, match="holds a template placeholder"):
        specs.load_spec(spec)


def test_classnames_and_templates_flags_refuse_the_other_kind_of_file(tmp_path):
    spec_path = tmp_path / "mixup.yaml"
    spec_path.write_text(SPEC.format(classnames="[cat, dog]"))
    spec = specs.load_spec(spec_path)
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {c}.\na {c}.\n")
    classnames = tmp_path / "c.txt"
    classnames.write_text("cat\ndog\n")
    with pytest.raises(ClipbenchError) as info:
        prompts_for(spec, RunConfig(classnames_file=templates), tmp_path)
    assert str(templates) in str(info.value) and "templates file given as classnames" in str(info.value)
    with pytest.raises(ClipbenchError, match="has no class-name placeholder"):
        prompts_for(spec, RunConfig(templates_file=classnames), tmp_path)
    assert prompts_for(spec, RunConfig(classnames_file=classnames, templates_file=templates), tmp_path)[:2] == (
        ["cat", "dog"], ["a photo of a {c}.", "a {c}."])


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def state(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors_bytes(state) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def _mismatched(state):
    bad = {k: v for k, v in state.items() if k != "visual.proj"}
    bad["extra.weight"] = torch.zeros(2)
    bad["text_projection"] = torch.zeros(3, 5)
    return bad


GARBAGE = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


class _RunsCode:
    """Unpickling this would create a file: proof that no code from a checkpoint runs."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


CHECKPOINTS = {
    # name: (file name, bytes builder, phrase in the message)
    "truncated .pt": ("w.pt", lambda s, t: _torch_bytes(s)[: len(_torch_bytes(s)) // 2], "damaged zip archive"),
    "garbage .bin": ("w.bin", lambda s, t: GARBAGE, "not a readable PyTorch checkpoint"),
    # random bytes also fail torch's safe unpickler with IndexError, KeyError, UnicodeDecodeError
    "garbage: empty pickle stack": ("w.bin", lambda s, t: b"\x80\x02.", "garbage: IndexError"),
    "garbage: unknown memo": ("w.bin", lambda s, t: b"\x80\x02h\x05.", "garbage: KeyError"),
    "garbage: not UTF-8": ("w.bin", lambda s, t: b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", "garbage: UnicodeDecodeError"),
    "empty file": ("w.pt", lambda s, t: b"", "is empty (0 bytes)"),
    "zip that is no checkpoint": ("w.pt", None, "zip archive but not a PyTorch checkpoint"),
    "pickle holding code": ("w.pt", lambda s, t: _torch_bytes({"x": _RunsCode(t / "ran")}), "holds Python objects"),
    "a list, not a state dict": ("w.pt", lambda s, t: _torch_bytes([1, 2]), "holds a list, not a state dict"),
    "truncated .safetensors": ("w.safetensors", lambda s, t: _safetensors_bytes(s)[:5000], "not a valid safetensors file"),
    "garbage .safetensors": ("w.safetensors", lambda s, t: GARBAGE, "not a valid safetensors file"),
    "keys and shapes of another architecture": (
        "w.pt", lambda s, t: _torch_bytes(_mismatched(s)), "does not fit architecture 'ViT-S-32-alt'"),
    "a directory": ("weights", None, "is a directory"),
}


def _write_checkpoint(case: str, state, tmp_path) -> pathlib.Path:
    name, build, _ = CHECKPOINTS[case]
    path = tmp_path / name
    if case == "a directory":
        path.mkdir()
    elif case == "zip that is no checkpoint":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    else:
        path.write_bytes(build(state, tmp_path))
    return path


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_a_bad_checkpoint_is_one_clear_error(case, state, tmp_path):
    path = _write_checkpoint(case, state, tmp_path)
    with pytest.raises(ClipbenchError) as info:
        models.load_model(ARCH, str(path), device="cpu", precision="fp32", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(path) in message and CHECKPOINTS[case][2] in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert not (tmp_path / "ran").exists()


def test_a_mismatched_checkpoint_lists_what_differs(state, tmp_path):
    path = _write_checkpoint("keys and shapes of another architecture", state, tmp_path)
    with pytest.raises(ClipbenchError) as info:
        models.load_model(ARCH, str(path), device="cpu", precision="fp32", cache_dir=tmp_path / "cache")
    message = str(info.value)
    expected = list(state["text_projection"].shape)
    assert "missing from the file (visual.proj)" in message and "(extra.weight)" in message
    assert f"text_projection: file [3, 5], architecture {expected}" in message


def test_the_good_files_the_bad_ones_are_made_from_load(state, tmp_path):
    for name, payload in (("w.pt", _torch_bytes(state)), ("w.safetensors", _safetensors_bytes(state))):
        (tmp_path / name).write_bytes(payload)
        loaded = models.load_model(ARCH, str(tmp_path / name), device="cpu", precision="fp32",
                                   cache_dir=tmp_path / "cache")
        assert torch.equal(loaded.model.state_dict()["visual.proj"], state["visual.proj"])


def test_a_damaged_file_behind_a_pretrained_tag_is_one_clear_error(monkeypatch, tmp_path):
    tiny = models.load_model("clipbench-tiny", "none", device="cpu", precision="fp32", cache_dir=tmp_path / "c")
    damaged = tmp_path / "tiny.pt"
    damaged.write_bytes(_torch_bytes(tiny.model.state_dict())[:1000])
    monkeypatch.setitem(models.LOCAL_PRETRAINED, "clipbench-tiny",
                        {"synthetic": {"file": str(damaged), "quick_gelu": False}})
    with pytest.raises(ClipbenchError) as info:
        models.load_model("clipbench-tiny", "synthetic", device="cpu", precision="fp32", cache_dir=tmp_path / "c")
    assert str(damaged) in str(info.value) and "damaged zip archive" in str(info.value)


@pytest.mark.parametrize("case", ["pickle holding code", "truncated .safetensors"])
def test_a_bad_checkpoint_through_the_cli_is_exit_2_without_traceback(capsys, case, state, tmp_path):
    path = _write_checkpoint(case, state, tmp_path)
    code, err = cli(capsys, "run", "--model", ARCH, "--pretrained", str(path), "--datasets", "synthetic-colors",
                    "--device", "cpu", "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and "Traceback" not in err and str(path) in err
    assert "weights_only=False" not in err and not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- records


def _record(**overrides) -> dict:
    record = dict(model="m", pretrained="p", dataset="d", task="zeroshot", split="test",
                  metrics={"accuracy": 0.5}, primary_metric="accuracy", n_samples=10,
                  confidence_intervals={}, details={}, config={}, versions={}, seconds={}, created="",
                  schema_version=results.SCHEMA_VERSION)
    record.update(overrides)
    return record


BAD_RECORDS = {
    # case: (record text, phrase of the reason)
    "schema_version 999": (json.dumps(_record(schema_version=999)), "schema_version 999"),
    "metrics a string": (json.dumps(_record(metrics="0.5")), "metrics is a str"),
    "metrics a list": (json.dumps(_record(metrics=[0.5])), "metrics is a list"),
    "NaN metric": (json.dumps(_record(metrics={"accuracy": float("nan")})), "not a finite number"),
    "Infinity metric": (json.dumps(_record(metrics={"accuracy": 0.5, "x": float("inf")})), "metric x is inf"),
    "string metric value": (json.dumps(_record(metrics={"accuracy": "high"})), "metric accuracy is 'high'"),
    "primary metric absent": (json.dumps(_record(metrics={"top5_accuracy": 0.9})), "primary metric accuracy"),
    "no dataset field": (json.dumps({k: v for k, v in _record().items() if k != "dataset"}), "dataset missing"),
    "bad interval": (json.dumps(_record(confidence_intervals={"accuracy": [0.4]})), "confidence_intervals"),
    "few-shot k without mean": (json.dumps(_record(task="few_shot", metrics={}, details={"k": {"1": {"std": 0.1}}})),
                                "details.k"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_an_invalid_record_is_skipped_by_reports_with_one_warning(case, tmp_path, caplog):
    text, reason = BAD_RECORDS[case]
    good = results.record_path(tmp_path, "m", "p", "d2", "zeroshot")
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps(_record(dataset="d2")))
    bad = results.record_path(tmp_path, "m", "p", "d", "zeroshot")
    bad.parent.mkdir(parents=True)
    bad.write_text(text)
    with caplog.at_level(logging.WARNING, logger="clipbench.results"):
        frame = results.load_records([tmp_path])
    assert list(frame["dataset"]) == ["d2"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(bad) in warnings[0] and reason in warnings[0]


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_an_invalid_stored_record_counts_as_absent_for_a_run(case, tmp_path, caplog):
    text, reason = BAD_RECORDS[case]
    record = json.loads(text)
    path = results.record_path(tmp_path, "m", "p", "d", record["task"])
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="clipbench.results"):
        assert results.existing_record(tmp_path, "m", "p", "d", record["task"]) is None
    assert len(caplog.records) == 1 and str(path) in caplog.text and reason in caplog.text


def test_a_record_with_an_unknown_field_is_not_reused(tmp_path, caplog):
    path = results.record_path(tmp_path, "m", "p", "d", "zeroshot")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_record(surprise=1)))
    with caplog.at_level(logging.WARNING, logger="clipbench.results"):
        assert results.existing_record(tmp_path, "m", "p", "d", "zeroshot") is None
    assert "unknown field(s) surprise" in caplog.text


def _clipbench(*args: str) -> subprocess.CompletedProcess:
    """The real command line (its own logging setup, as a user sees it)."""
    return subprocess.run([sys.executable, "-m", "clipbench", *args], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parents[1], timeout=120)


@pytest.mark.slow
def test_report_through_the_cli_skips_an_invalid_record(tmp_path):
    good = results.record_path(tmp_path, "m", "p", "d2", "zeroshot")
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps(_record(dataset="d2")))
    bad = results.record_path(tmp_path, "m", "p", "d", "zeroshot")
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(_record(metrics="0.5")))
    done = _clipbench("report", str(tmp_path))
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert f"WARNING clipbench.results: Skipping {bad}: not a valid result record (metrics is a str" in done.stderr
    assert "d2" in done.stdout and "| d " not in done.stdout and "| d |" not in done.stdout
    bad.write_text(json.dumps(_record(schema_version=999)))
    good.unlink()
    done = _clipbench("report", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(bad) in done.stderr


# ----------------------------------------------------------------------------- feature cache entries

EXPECTED = {"projected": (4, None), "pre_projection": (4, None)}
GOOD = {"projected": np.arange(12, dtype=np.float32).reshape(4, 3),
        "pre_projection": np.ones((4, 5), np.float32)}


def _entry(cache: FeatureCache, arrays=GOOD, meta=None) -> pathlib.Path:
    cache.save("image", "ab" * 16, arrays, {"n": 4} if meta is None else meta)
    return cache._path("image", "ab" * 16)


CACHE_CASES = {
    # case: (damage applied to the good entry, phrase of the reason)
    "zero bytes": (lambda p, c: p.write_bytes(b""), "unreadable"),
    "truncated": (lambda p, c: p.write_bytes(p.read_bytes()[:200]), "unreadable"),
    "text named .npz": (lambda p, c: p.write_text("not an archive"), "unreadable"),
    "missing array": (lambda p, c: _entry(c, {"projected": GOOD["projected"]}), "no array 'pre_projection'"),
    "rows differ from n": (lambda p, c: _entry(c, {k: v[:3] for k, v in GOOD.items()}, {"n": 3}),
                           "projected has shape (3, 3), expected (4, '*')"),
    "float64": (lambda p, c: _entry(c, {k: v.astype(np.float64) for k, v in GOOD.items()}), "float64"),
    "one dimension": (lambda p, c: _entry(c, {k: v.ravel()[:4] for k, v in GOOD.items()}), "shape (4,)"),
    "meta disagrees": (lambda p, c: _entry(c, GOOD, {"n": 7}), "says 7 rows"),
    "meta garbage": (lambda p, c: p.with_suffix(".json").write_text("{nope"), "metadata ab"),
}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_a_bad_cache_entry_is_ignored_with_one_warning(case, tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    path = _entry(cache)
    loaded = cache.load("image", "ab" * 16, EXPECTED)
    assert all(np.array_equal(loaded[k], GOOD[k]) for k in GOOD)
    damage, reason = CACHE_CASES[case]
    damage(path, cache)
    with caplog.at_level(logging.WARNING, logger="clipbench.features"):
        assert cache.load("image", "ab" * 16, EXPECTED) is None
    assert len(caplog.records) == 1 and str(path) in caplog.text and reason in caplog.text


@pytest.mark.parametrize("damage", ["zero bytes", "truncated"])
def test_text_features_recompute_a_damaged_entry_and_replace_it(model, tmp_path, caplog, damage):
    cache = FeatureCache(tmp_path)
    texts = ["a photo of a red thing.", "a photo of a blue thing.", "a green thing."]
    first = text_features(model, texts, cache)
    (entry,) = (tmp_path / "text").rglob("*.npz")
    CACHE_CASES[damage][0](entry, cache)
    with caplog.at_level(logging.WARNING, logger="clipbench.features"):
        again = text_features(model, texts, cache)
    np.testing.assert_array_equal(again, first)
    assert str(entry) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipbench.features"):
        np.testing.assert_array_equal(text_features(model, texts, cache), first)
    assert not caplog.records  # the rewritten entry is read back without a warning


@pytest.mark.slow
@pytest.mark.parametrize("damage", [{"metrics": "0.5"}, {"schema_version": 999}])
def test_a_run_recomputes_an_invalid_stored_record_and_replaces_it(capsys, caplog, tmp_path, damage):
    args = ["run", "--datasets", "synthetic-colors", "--tasks", "zeroshot", "--workers", "0", "--bootstrap", "0",
            "--device", "cpu", "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    path = next((tmp_path / "o").rglob("zeroshot.json"))
    first = json.loads(path.read_text())
    path.write_text(json.dumps({**first, **damage}))  # same settings digest: only validation catches it
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="clipbench.results"):
        code = main(args)
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    assert len(caplog.records) == 1 and str(path) in caplog.text and "recomputing it" in caplog.text
    again = json.loads(path.read_text())
    assert again["metrics"] == first["metrics"] and again["schema_version"] == results.SCHEMA_VERSION
    # replaced in place: nothing superseded, no temp file left
    assert sorted(p.name for p in path.parent.iterdir()) == ["zeroshot.json", "zeroshot.per_class.json", "zeroshot.samples.npz"]


def test_a_packaged_spec_is_named_the_same_on_every_installation(tmp_path):
    packaged = specs.load_spec("synthetic-shapes")
    assert packaged.origin == "packaged:synthetic-shapes.yaml"
    user = specs.load_spec(_user_copy(tmp_path))
    assert user.origin == str(user.file) and str(tmp_path) in user.origin
