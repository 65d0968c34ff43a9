"""The timm and torchvision backends against direct library calls on the same images, the pipeline
end to end on an image-only model, and the offline fail-fast lookups of pretrained weights."""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipbench.errors import ClipbenchError
from clipbench.models import load_model

from conftest import COLOURS_SPEC, make_image

timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")

TIMM_ARCH = "test_resnet"  # timm's own ~0.5M-parameter test net, with a pretrained tag r160_in1k
TIMM_TAG = "r160_in1k"
TV_ARCH = "resnet18"
TOLERANCE = 1e-5


def images(n: int = 3) -> list[Image.Image]:
    return [make_image(i % 3, i, size=48) for i in range(n)]


@pytest.fixture(scope="module")
def timm_state(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A seeded random test_resnet's state dict, and that dict saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    path = tmp_path_factory.mktemp("timm") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state, path


@pytest.fixture(scope="module")
def tv_state(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A seeded random resnet18's state dict, and that dict saved with torch.save."""
    torch.manual_seed(2)
    state = tvm.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(state, path)
    return state, path


def direct_timm_features(state: dict[str, torch.Tensor], pil: list[Image.Image]) -> np.ndarray:
    """Independent path: timm's headless model (num_classes=0) and timm's own eval transform."""
    from timm.data import create_transform, resolve_data_config

    net = timm.create_model(f"{TIMM_ARCH}.{TIMM_TAG}", pretrained=False, num_classes=0).eval()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not missing and set(unexpected) == {"fc.weight", "fc.bias"}
    transform = create_transform(**resolve_data_config({}, model=net), is_training=False)
    with torch.no_grad():
        return net(torch.stack([transform(im) for im in pil])).numpy()


def direct_torchvision_features(state: dict[str, torch.Tensor], pil: list[Image.Image]) -> np.ndarray:
    """Independent path: torchvision's feature extractor at the `flatten` node (the fc input)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    net = tvm.resnet18(weights=None)
    net.load_state_dict(state)
    extractor = create_feature_extractor(net.eval(), {"flatten": "features"})
    transform = tvm.ResNet18_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        return extractor(torch.stack([transform(im) for im in pil]))["features"].numpy()


def clipbench_features(model, pil: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    projected, pre = model.encode_images(torch.stack([model.preprocess(im) for im in pil]))
    return projected.numpy(), pre.numpy()


def check_equal(model, direct: np.ndarray, pil: list[Image.Image]) -> float:
    projected, pre = clipbench_features(model, pil)
    difference = float(np.abs(pre - direct).max())
    assert pre.shape == direct.shape and difference <= TOLERANCE
    normalised = direct / np.linalg.norm(direct, axis=1, keepdims=True)
    assert np.abs(projected - normalised).max() <= TOLERANCE
    return difference


def test_timm_checkpoint_features_equal_timm_headless_model(timm_state):
    state, path = timm_state
    model = load_model(f"timm:{TIMM_ARCH}.{TIMM_TAG}", str(path), device="cpu", precision="fp32")
    assert model.supports_text is False and model.pre_projection_kind == "embedding"
    assert model.feature_dim == 96 and model.image_size == (160, 160)
    difference = check_equal(model, direct_timm_features(state, images()), images())
    logging.getLogger(__name__).info("timm max abs feature difference %.3g", difference)
    assert model.describe()["preprocessing"]["input_size"] == [3, 160, 160]
    pickle.loads(pickle.dumps(model.preprocess))  # DataLoader workers receive it


@pytest.mark.slow
def test_torchvision_checkpoint_features_equal_the_fc_input(tv_state):
    state, path = tv_state
    model = load_model(f"torchvision:{TV_ARCH}", str(path), device="cpu", precision="fp32")
    assert model.feature_dim == 512 and model.describe()["weights"] == "file"
    difference = check_equal(model, direct_torchvision_features(state, images()), images())
    logging.getLogger(__name__).info("torchvision max abs feature difference %.3g", difference)
    pickle.loads(pickle.dumps(model.preprocess))


def test_checkpoint_with_a_fine_tuned_head_loads_and_a_wrong_architecture_is_refused(tmp_path, timm_state):
    torch.manual_seed(3)
    net = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=7)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "seven.pth")
    model = load_model(f"timm:{TIMM_ARCH}", str(tmp_path / "seven.pth"), device="cpu", precision="fp32")
    headless = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0).eval()
    headless.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})
    pixels = torch.stack([model.preprocess(im) for im in images(2)])
    with torch.no_grad():
        assert torch.allclose(model.encode_images(pixels)[1], headless(pixels), atol=TOLERANCE)
    with pytest.raises(ClipbenchError, match="does not fit torchvision:resnet18: size mismatch"):
        load_model(f"torchvision:{TV_ARCH}", str(timm_state[1]), device="cpu")


@pytest.mark.slow
def test_cached_tag_and_enum_load_offline_from_the_local_caches(tmp_path, monkeypatch, timm_state, tv_state):
    # a hub cache holding the tag's repo (the layout huggingface_hub writes), and a torch hub
    # cache holding the enum's file: both load offline and equal the direct computation
    snapshot = tmp_path / "hub" / f"models--timm--{TIMM_ARCH}.{TIMM_TAG}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(timm_state[1].read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]).write_bytes(tv_state[1].read_bytes())

    tagged = load_model(f"timm:{TIMM_ARCH}.{TIMM_TAG}", device="cpu", precision="fp32",
                        hub_cache_dir=tmp_path / "hub", allow_download=False)
    assert (tagged.name, tagged.pretrained) == (f"timm:{TIMM_ARCH}", TIMM_TAG)
    assert tagged.weights_digest.startswith(f"timm:{TIMM_ARCH}.{TIMM_TAG}:size=")
    check_equal(tagged, direct_timm_features(timm_state[0], images(3)), images(3))
    enum = load_model(f"torchvision:{TV_ARCH}", "IMAGENET1K_V1", device="cpu", precision="fp32",
                      allow_download=False)
    assert (enum.name, enum.pretrained) == (f"torchvision:{TV_ARCH}", "IMAGENET1K_V1")
    check_equal(enum, direct_torchvision_features(tv_state[0], images(3)), images(3))
    # the same file passed as a path: the same sha256, but the record says where it came from
    from_file = load_model(f"torchvision:{TV_ARCH}", str(tv_state[1]), device="cpu", precision="fp32")
    assert enum.identity()["weights"] != from_file.identity()["weights"]
    assert enum.weights_digest.endswith(from_file.weights_digest.removeprefix("sha256:"))


@pytest.mark.parametrize("name, pretrained, needed", [
    (f"timm:{TIMM_ARCH}.{TIMM_TAG}", None, f"timm/{TIMM_ARCH}.{TIMM_TAG}"),
    (f"timm:{TIMM_ARCH}", None, f"timm/{TIMM_ARCH}.{TIMM_TAG}"),  # the default tag
    (f"torchvision:{TV_ARCH}", "IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("torchvision:resnet50", None, "IMAGENET1K_V2"),  # the enum's DEFAULT
])
def test_offline_missing_weights_fail_within_seconds_saying_what_where_and_how(
        name, pretrained, needed, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    options = {"hub_cache_dir": tmp_path / "hub"} if name.startswith("timm:") else {}
    start = time.perf_counter()
    with pytest.raises(ClipbenchError) as error:
        load_model(name, pretrained, device="cpu", **options)
    elapsed = time.perf_counter() - start
    message = str(error.value)
    logging.getLogger(__name__).info("%s: offline failure after %.2f s", name, elapsed)
    assert elapsed < 5
    assert "not on this machine" in message and "HF_HUB_OFFLINE=1" in message and needed in message
    assert str(tmp_path) in message and "--pretrained PATH" in message and "\n" not in message


def test_bad_names_and_weights_list_the_close_choices(tmp_path):
    with pytest.raises(ClipbenchError, match="Unknown timm model 'resnet5O'.*resnet50"):
        load_model("timm:resnet5O", device="cpu")
    with pytest.raises(ClipbenchError, match="no pretrained tag 'zzz'.*a1_in1k"):
        load_model("timm:resnet50.zzz", device="cpu")
    with pytest.raises(ClipbenchError, match="neither a checkpoint file nor 'none'.*timm:resnet50.TAG"):
        load_model("timm:resnet50", "a1_in1k", device="cpu")
    with pytest.raises(ClipbenchError, match="Unknown torchvision classification model 'resnet5'.*resnet50"):
        load_model("torchvision:resnet5", device="cpu")
    with pytest.raises(ClipbenchError, match="IMAGENET1K_V1, IMAGENET1K_V2, or DEFAULT"):
        load_model("torchvision:resnet50", "IMAGENET_V3", device="cpu")
    with pytest.raises(ClipbenchError, match="does not exist"):
        load_model("torchvision:resnet18", str(tmp_path / "missing.pth"), device="cpu")


def test_identity_separates_weights_and_preprocessing(timm_state):
    random0 = load_model(f"timm:{TIMM_ARCH}", "none", device="cpu", precision="fp32")
    random1 = load_model(f"timm:{TIMM_ARCH}", "none", device="cpu", precision="fp32", seed=1)
    filed = load_model(f"timm:{TIMM_ARCH}", str(timm_state[1]), device="cpu", precision="fp32")
    amp = load_model(f"timm:{TIMM_ARCH}", str(timm_state[1]), device="cpu", precision="amp")
    identities = [m.identity() for m in (random0, random1, filed, amp)]
    assert len({json.dumps(i, sort_keys=True) for i in identities}) == 4
    assert amp.describe()["autocast_dtype"] == "bfloat16"
    with pytest.raises(TypeError, match="image-only"):
        random0.encode_texts(["a photo"])


@pytest.mark.slow
def test_pipeline_probes_an_image_only_model_and_says_why_zero_shot_was_skipped(
        timm_state, imagefolder_root, tmp_path, caplog):
    from clipbench.config import RunConfig
    from clipbench.pipeline import run
    from clipbench.tasks.linear_probe import linear_probe

    spec_file = tmp_path / "colours.yaml"
    spec_file.write_text(COLOURS_SPEC.format(root=imagefolder_root))
    config = RunConfig(model=f"timm:{TIMM_ARCH}", pretrained=str(timm_state[1]), datasets=[str(spec_file)],
                       tasks=["zeroshot", "linear_probe"], data_root=tmp_path / "data", output=tmp_path / "out",
                       cache_dir=tmp_path / "cache", batch_size=4, workers=0, device="cpu", precision="fp32",
                       n_bootstrap=0)
    with caplog.at_level(logging.WARNING):
        outcome = run(config)
    assert [r.task for r in outcome.records] == ["linear_probe"] and not outcome.failures
    skipped = [r.getMessage() for r in caplog.records if "zeroshot: skipped" in r.getMessage()]
    assert len(skipped) == 1 and "image-only" in skipped[0] and "text features" in skipped[0]
    (folder,) = (tmp_path / "out").iterdir()
    assert not list(folder.rglob("zeroshot.json"))
    record = json.loads(next(folder.rglob("linear_probe.json")).read_text())
    assert record["model"] == f"timm:{TIMM_ARCH}" and record["details"]["feature_kind"] == "embedding"
    assert record["config"]["model"]["backend"] == "timm" and record["config"]["model"]["weights"] == "file"

    # the same probe on features computed by timm directly, the pipeline's carved validation split
    from clipbench import specs
    from clipbench.data import load_split
    from clipbench.tasks.linear_probe import stratified_val_split

    spec = specs.load_spec(str(spec_file))
    arrays = {}
    for role in ("train", "test"):
        samples = load_split(spec, role, tmp_path / "data", tmp_path / "cache")
        pil = [samples.load_image(i) for i in range(len(samples))]
        arrays[role] = (direct_timm_features(timm_state[0], pil), samples.targets)
    (tx, ty), (sx, sy) = arrays["train"], arrays["test"]
    tr, va = stratified_val_split(ty, spec.val_fraction, config.seed)
    direct = linear_probe(tx[tr], ty[tr], tx[va], ty[va], sx, sy, "accuracy", num_classes=3,
                          n_jobs=RunConfig.default("probe_jobs"))
    assert record["metrics"] == direct.metrics and record["details"]["C"] == direct.C


@pytest.mark.slow
def test_cli_runs_a_torchvision_checkpoint_and_reports_it_as_the_measured_baseline(
        tv_state, spec_file, tmp_path, capsys):
    from clipbench.cli import main

    out = tmp_path / "out"
    argv = ["run", "--model", f"torchvision:{TV_ARCH}", "--pretrained", str(tv_state[1]), "--datasets",
            str(spec_file), "--tasks", "linear_probe", "--output", str(out), "--cache-dir", str(tmp_path / "c"),
            "--data-root", str(tmp_path / "d"), "--device", "cpu", "--precision", "fp32", "--workers", "0",
            "--bootstrap", "0"]
    assert main(argv) == 0
    (record_file,) = out.rglob("linear_probe.json")
    record = json.loads(record_file.read_text())
    assert record["model"] == f"torchvision:{TV_ARCH}" and record["config"]["model"]["feature_dim"] == 512

    # another model's records (copies with other numbers) reported against the measured baseline
    from test_report import markdown_section, row_of

    other = tmp_path / "other" / "ViT-S-32-alt__none" / "colours"
    other.mkdir(parents=True)
    for task, accuracy in (("linear_probe", 0.5), ("zeroshot", 0.25)):
        copy = {**record, "model": "ViT-S-32-alt", "pretrained": "none", "task": task,
                "metrics": {**record["metrics"], "accuracy": accuracy}, "confidence_intervals": {}}
        (other / f"{task}.json").write_text(json.dumps(copy))
    measured = record["metrics"]["accuracy"]
    for baseline, results_dirs in ((str(out), [tmp_path / "other"]),
                                   (f"torchvision:{TV_ARCH}", [tmp_path / "other", out])):
        capsys.readouterr()
        assert main(["report", *map(str, results_dirs), "--baseline", baseline]) == 0
        text = capsys.readouterr().out
        for task, accuracy in (("Linear probe", 0.5), ("Zero-shot", 0.25)):
            label = f"torchvision:{TV_ARCH} ({tv_state[1]})"
            header, body = markdown_section(text, f"{task} vs baseline {label} (measured)")
            base = row_of(body, header, f"{label} (measured)", "baseline")
            assert base["colours"] == f"{100 * measured:.1f}"
            diff = row_of(body, header, "ViT-S-32-alt (none)", f"diff vs {label}")
            assert float(diff["colours"]) == pytest.approx(100 * (accuracy - measured), abs=0.05)
            assert len(body) == 2  # the baseline is not compared with itself
        assert "baseline (measured)" in text and "(paper, Table 10)" not in text
    assert main(["report", str(out), "--baseline", "torchvision:resnet19"]) == 2
    message = capsys.readouterr().err
    assert "Unknown baseline 'torchvision:resnet19'" in message and "Close names: torchvision:resnet18" in message
