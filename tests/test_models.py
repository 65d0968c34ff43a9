"""clipbench.models: name resolution, the QuickGELU guard, checkpoints, digests, precision and
the offline error. Models are ViT-S-32-alt (or clipbench-tiny) with random weights saved by the
tests; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from clipbench import models
from clipbench.errors import ClipbenchError

ARCH = "ViT-S-32-alt"
TEXTS = ["a photo of a dog", "a red square", "two circles"]


def _uses_quick_gelu(module: torch.nn.Module) -> bool:
    return any(isinstance(m, QuickGELU) for m in module.modules())


def _reference_outputs(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = open_clip.get_tokenizer(ARCH)(TEXTS)
    with torch.inference_mode():
        return (F.normalize(model.encode_image(pixels), dim=-1),
                F.normalize(model.encode_text(tokens), dim=-1))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, pixels):
    """A random ViT-S-32-alt state dict on disk, and the outputs of the same weights built with
    GELU (the config default) and with QuickGELU."""
    torch.manual_seed(0)
    gelu = open_clip.create_model(ARCH).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit-s-32-alt.pt"
    torch.save(gelu.state_dict(), path)
    quick = open_clip.create_model(ARCH, force_quick_gelu=True).eval()
    quick.load_state_dict(gelu.state_dict())
    return {
        "path": path,
        "state_dict": gelu.state_dict(),
        "quick_model": quick,
        "gelu": _reference_outputs(gelu, pixels),
        "quick": _reference_outputs(quick, pixels),
    }


@pytest.fixture(scope="module")
def loaded(checkpoint, tmp_path_factory) -> models.ClipModel:
    """The checkpoint loaded through clipbench (fp32, CPU), shared by the read-only tests."""
    cache = tmp_path_factory.mktemp("cache")
    return models.load_model(ARCH, str(checkpoint["path"]), device="cpu", precision="fp32",
                             cache_dir=cache)


def _outputs(model: models.ClipModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's image and text features; the text on the full context, as the references are
    (the trimmed context agrees only to float rounding: tests/test_text_context.py)."""
    projected, _ = model.encode_images(pixels)
    return projected, dataclasses.replace(model, text_context="full").encode_texts(TEXTS)


def _load(name: str, pretrained: str | None, tmp_path: Path, **kwargs) -> models.ClipModel:
    return models.load_model(name, pretrained, device="cpu", precision=kwargs.pop("precision", "fp32"),
                             cache_dir=tmp_path / "cache", **kwargs)


# ------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("alias, arch", [
    ("ViT-B/32", "ViT-B-32"), ("ViT-B/16", "ViT-B-16"), ("ViT-L/14", "ViT-L-14"),
    ("ViT-L/14@336px", "ViT-L-14-336"), ("RN50", "RN50"), ("RN101", "RN101"),
    ("RN50x4", "RN50x4"), ("RN50x16", "RN50x16"), ("RN50x64", "RN50x64"),
])
def test_openai_aliases_resolve_to_openai_weights_with_quick_gelu(alias, arch):
    source = models.resolve_model(alias)
    assert (source.name, source.pretrained, source.kind) == (arch, "openai", "tag")
    assert source.quick_gelu is True
    assert source.tag_cfg["hf_hub"] == open_clip.get_pretrained_cfg(arch, "openai")["hf_hub"]


def test_names_match_case_insensitively():
    assert models.resolve_model("vit-b/32").name == "ViT-B-32"
    assert models.resolve_model("vit-s-32-alt", "none").name == ARCH


def test_single_tag_is_the_default_and_several_must_be_chosen():
    single = [m for m in open_clip.list_models() if len(open_clip.list_pretrained_tags_by_model(m)) == 1]
    assert single
    for name in single[:5]:
        assert models.resolve_model(name).pretrained == open_clip.list_pretrained_tags_by_model(name)[0]
    assert models.resolve_model("clipbench-tiny").pretrained == "synthetic"
    with pytest.raises(ClipbenchError, match="several pretrained weights") as info:
        models.resolve_model("ViT-B-32")
    assert "openai" in str(info.value) and "laion2b_s34b_b79k" in str(info.value)


def test_quick_gelu_follows_the_registry_for_every_tag():
    assert models.resolve_model("ViT-B-32", "openai").quick_gelu is True
    assert models.resolve_model("ViT-B-32", "laion400m_e32").quick_gelu is True
    assert models.resolve_model("ViT-B-32", "laion2b_s34b_b79k").quick_gelu is False
    # Configs that declare QuickGELU themselves (roberta-ViT-B-32) carry no per-tag flag.
    assert models.resolve_model("roberta-ViT-B-32", "laion2b_s12b_b32k").quick_gelu is True
    for name, tag in open_clip.list_pretrained():
        expected = (bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
                    or bool(open_clip.get_model_config(name).get("quick_gelu", False)))
        assert models.resolve_model(name, tag).quick_gelu is expected, (name, tag)


def test_explicit_choices_that_contradict_the_weights_are_refused():
    with pytest.raises(ClipbenchError, match="trained with QuickGELU"):
        models.resolve_model("ViT-B/32", quick_gelu=False)
    with pytest.raises(ClipbenchError, match="trained with standard GELU"):
        models.resolve_model("ViT-B-32-quickgelu", "laion2b_s34b_b79k")
    with pytest.raises(ClipbenchError, match="trained with standard GELU"):
        models.resolve_model("ViT-B-32", "laion2b_s34b_b79k", quick_gelu=True)
    with pytest.raises(ClipbenchError, match="uses QuickGELU"):
        models.resolve_model("RN50-quickgelu", "none", quick_gelu=False)


def test_unknown_model_and_tag_messages_name_close_matches(tmp_path):
    with pytest.raises(ClipbenchError) as info:
        models.resolve_model("ViT-B-33")
    assert "ViT-B-32" in str(info.value)
    with pytest.raises(ClipbenchError) as info:
        models.resolve_model("vit-b32")
    assert "ViT-B-32" in str(info.value)
    with pytest.raises(ClipbenchError) as info:
        models.resolve_model("ViT-B-32", "opnai")
    message = str(info.value)
    assert "Closest: openai" in message and "laion2b_s34b_b79k" in message
    with pytest.raises(ClipbenchError, match="does not exist"):
        models.resolve_model(ARCH, str(tmp_path / "missing.pt"))


def test_bad_precision_and_device(tmp_path):
    with pytest.raises(ClipbenchError, match="Unknown precision"):
        _load(ARCH, "none", tmp_path, precision="fp8")
    with pytest.raises(ClipbenchError, match="Unknown device"):
        models.load_model(ARCH, "none", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ClipbenchError, match="no CUDA GPU"):
            models.load_model(ARCH, "none", device="cuda")


def test_model_table_and_list():
    pairs = models.list_models()
    assert ("ViT-B-32", "openai") in pairs and ("clipbench-tiny", "synthetic") in pairs
    rows = {row.name: row for row in models.model_table()}
    assert rows["ViT-B-32"].aliases == ("ViT-B/32",)
    assert "openai" in rows["ViT-B-32"].tags
    assert rows["ViT-L-14-336"].aliases == ("ViT-L/14@336px",)
    assert rows[ARCH].tags == ()


# ------------------------------------------------------------------------------- checkpoints


def test_local_checkpoint_reproduces_the_saved_model(checkpoint, loaded, pixels):
    model = loaded
    assert not model.quick_gelu and not _uses_quick_gelu(model.model)
    assert not model.model.training
    image, text = _outputs(model, pixels)
    assert torch.equal(image, checkpoint["gelu"][0])
    assert torch.equal(text, checkpoint["gelu"][1])
    expected = hashlib.sha256(checkpoint["path"].read_bytes()).hexdigest()
    assert model.weights_digest == f"sha256:{expected}"
    assert model.pretrained == str(checkpoint["path"].resolve())


def test_quickgelu_state_dict_loads_into_the_quickgelu_config(checkpoint, pixels, tmp_path):
    model = _load(f"{ARCH}-quickgelu", str(checkpoint["path"]), tmp_path)
    assert model.quick_gelu and _uses_quick_gelu(model.model)
    image, text = _outputs(model, pixels)
    assert torch.equal(image, checkpoint["quick"][0])
    assert torch.equal(text, checkpoint["quick"][1])
    # The trap this guards against: same weights, other activation, different embeddings.
    assert (image - checkpoint["gelu"][0]).abs().max() > 1e-3


def test_openai_format_checkpoints_get_quick_gelu(checkpoint, pixels, tmp_path):
    with_metadata = dict(checkpoint["state_dict"])
    with_metadata.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                         vocab_size=torch.tensor(49408))
    state_path = tmp_path / "openai-state.pt"
    torch.save(with_metadata, state_path)
    script_path = tmp_path / "openai-jit.pt"
    with pytest.warns(FutureWarning):  # torch marks jit.script as deprecated; OpenAI shipped it
        torch.jit.save(torch.jit.script(checkpoint["quick_model"]), str(script_path))
    for path in (state_path, script_path):
        model = _load(ARCH, str(path), tmp_path)
        assert model.quick_gelu and _uses_quick_gelu(model.model), path
        image, text = _outputs(model, pixels)
        torch.testing.assert_close(image, checkpoint["quick"][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(text, checkpoint["quick"][1], rtol=0, atol=1e-6)
    with pytest.raises(ClipbenchError, match="trained with QuickGELU"):
        models.resolve_model(ARCH, str(state_path), quick_gelu=False)


def _fake_hub_file(hub: Path, repo: str, filename: str, source: Path) -> str:
    """Lay out ``source`` the way huggingface_hub caches a downloaded LFS file."""
    data = source.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / sha).write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(Path("../../blobs") / sha)
    return sha


def test_openai_tag_from_the_hub_cache_builds_quick_gelu(checkpoint, pixels, tmp_path, monkeypatch):
    repo = "clipbench-test/vit_small_patch32.openai"
    mean = (0.25, 0.5, 0.75)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, ARCH, {
        "openai": {"hf_hub": f"{repo}/", "quick_gelu": True, "mean": mean, "std": (0.5, 0.5, 0.5),
                   "interpolation": "bicubic", "resize_mode": "shortest"},
    })
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = _fake_hub_file(tmp_path / "hub", repo, "open_clip_pytorch_model.bin", checkpoint["path"])
    model = _load(ARCH, "openai", tmp_path, hub_cache_dir=tmp_path / "hub")
    assert model.quick_gelu and _uses_quick_gelu(model.model)
    image, text = _outputs(model, pixels)
    assert torch.equal(image, checkpoint["quick"][0])
    assert torch.equal(text, checkpoint["quick"][1])
    assert model.weights_digest == f"{ARCH}:openai:sha256={sha}"
    normalize = [t for t in model.preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(normalize.mean) == mean


def test_packaged_registry_entry(tmp_path, monkeypatch, pixels):
    torch.manual_seed(1)
    tiny = open_clip.create_model("clipbench-tiny").eval()
    weights = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), weights)
    monkeypatch.setitem(models.LOCAL_PRETRAINED, "clipbench-tiny",
                        {"synthetic": {"file": str(weights), "quick_gelu": False}})
    model = _load("clipbench-tiny", None, tmp_path)
    assert (model.name, model.pretrained, model.image_size) == ("clipbench-tiny", "synthetic", (64, 64))
    small = F.interpolate(pixels, size=(64, 64))
    with torch.inference_mode():
        expected = F.normalize(tiny.encode_image(small), dim=-1)
    assert torch.equal(model.encode_images(small)[0], expected)
    assert model.weights_digest.startswith("clipbench-tiny:synthetic:sha256=")
    monkeypatch.setitem(models.LOCAL_PRETRAINED, "clipbench-tiny",
                        {"synthetic": {"file": str(tmp_path / "gone.pt"), "quick_gelu": False}})
    with pytest.raises(ClipbenchError, match="gone.pt"):
        _load("clipbench-tiny", "synthetic", tmp_path)


# ------------------------------------------------------------------------------- digests


def test_file_digest_is_cached_and_follows_changes(checkpoint, tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(checkpoint["path"].read_bytes())
    cache = tmp_path / "cache"
    first = models.file_sha256(path, cache)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    table = json.loads((cache / "weights_sha256.json").read_text())
    assert list(table.values()) == [first]
    # A remembered digest is trusted while path, size and mtime are unchanged.
    (key,) = table
    (cache / "weights_sha256.json").write_text(json.dumps({key: "remembered"}))
    assert models.file_sha256(path, cache) == "remembered"
    state = dict(checkpoint["state_dict"])
    state["logit_scale"] = state["logit_scale"] + 1.0
    torch.save(state, path)
    changed = models.file_sha256(path, cache)
    assert changed == hashlib.sha256(path.read_bytes()).hexdigest() != first


def test_random_init_is_seeded_and_digested(tmp_path):
    a = _load("clipbench-tiny", "none", tmp_path, seed=3)
    b = _load("clipbench-tiny", "none", tmp_path, seed=3)
    c = _load("clipbench-tiny", "none", tmp_path, seed=4)
    assert (a.weights_digest, a.seed, c.weights_digest) == ("random:3", 3, "random:4")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.encode_images(pixels)[0], b.encode_images(pixels)[0])
    assert not torch.equal(a.encode_images(pixels)[0], c.encode_images(pixels)[0])
    # The caller's RNG stream is left alone.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _load("clipbench-tiny", "none", tmp_path, seed=3)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------- encoding


def test_pre_projection_is_the_input_of_the_projection(loaded, pixels):
    model = loaded
    assert model.pre_projection_kind == "before_projection"
    projected, pre = model.encode_images(pixels)
    assert projected.dtype == pre.dtype == torch.float32
    assert pre.shape == (2, model.pre_projection_dim) == (2, 384)
    assert projected.shape == (2, model.embed_dim) == (2, 256)
    with torch.inference_mode():
        reference = F.normalize(model.model.encode_image(pixels), dim=-1)
    torch.testing.assert_close(F.normalize(pre @ model.model.visual.proj.detach(), dim=-1), reference,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(projected, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(2), rtol=0, atol=1e-5)
    assert model.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())


def test_bf16_and_amp_agree_with_fp32(checkpoint, loaded, pixels, tmp_path):
    bf16 = _load(ARCH, str(checkpoint["path"]), tmp_path, precision="bf16")
    # amp keeps the fp32 weights and only adds autocast (bf16 on CPU): the same module serves.
    amp = dataclasses.replace(loaded, precision="amp")
    for model in (bf16, amp):
        image, text = _outputs(model, pixels)
        assert image.dtype == text.dtype == torch.float32
        assert _relative_error(image, checkpoint["gelu"][0]) < 2e-2, model.precision
        assert _relative_error(text, checkpoint["gelu"][1]) < 2e-2, model.precision
        # ... but they are not fp32 computations.
        assert _relative_error(image, checkpoint["gelu"][0]) > 1e-5, model.precision


@pytest.mark.parametrize("precision, weights", [
    ("fp32", torch.float32), ("amp", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
])
def test_precision_sets_weight_dtype_and_autocast(tmp_path, precision, weights):
    model = _load("clipbench-tiny", "none", tmp_path, precision=precision)
    assert model.model.visual.conv1.weight.dtype == weights
    with model.autocast():
        assert torch.is_autocast_enabled("cpu") is (precision == "amp")
        if precision == "amp":
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16


# ------------------------------------------------------------------------------- offline


@pytest.mark.parametrize("env, reason", [
    ("HF_HUB_OFFLINE", "HF_HUB_OFFLINE=1"),
    ("CLIPBENCH_OFFLINE", "CLIPBENCH_OFFLINE=1"),
    (None, "clipbench-probe.invalid:443 could not be reached"),
    ("no-download", "--no-download"),
])
def test_missing_weights_offline_fail_fast_with_instructions(tmp_path, monkeypatch, env, reason):
    for var in models.OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    # With no variable set the TCP probe decides. A reserved never-resolving name makes this
    # machine-independent (on this project's machines huggingface.co is unreachable too).
    monkeypatch.setattr(models.weights, "PROBE_HOST", "clipbench-probe.invalid")
    if env in models.OFFLINE_ENV_VARS:
        monkeypatch.setenv(env, "1")
    start = time.perf_counter()
    with pytest.raises(ClipbenchError) as info:
        models.load_model("ViT-B/32", device="cpu", cache_dir=tmp_path, hub_cache_dir=tmp_path / "hub",
                          allow_download=env != "no-download")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert reason in message
    assert "timm/vit_base_patch32_clip_224.openai" in message
    assert str(tmp_path / "hub") in message
    assert "--pretrained PATH" in message and "network access" in message


def test_hf_hub_id_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipbenchError) as info:
        models.load_model("hf-hub:someone/some-clip", device="cpu", cache_dir=tmp_path,
                          hub_cache_dir=tmp_path / "hub")
    assert "https://huggingface.co/someone/some-clip" in str(info.value)
    assert str(tmp_path / "hub") in str(info.value)


# ------------------------------------------------------------------------------- backends


def test_the_open_clip_model_fulfils_the_contract(loaded):
    assert isinstance(loaded, models.ImageTextModel)
    assert loaded.supports_text is True
    # identity() feeds feature-cache keys: the same keys and values as before backends existed.
    assert loaded.identity() == {
        "model": ARCH, "pretrained": loaded.pretrained, "weights": loaded.weights_digest,
        "precision": "fp32"}
    described = loaded.describe()
    assert (described["backend"], described["precision"], described["weights_dtype"],
            described["autocast_dtype"]) == ("open_clip", "fp32", "float32", None)
    assert described["quick_gelu"] is False and described["logit_bias"] is None
    assert described["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert json.loads(json.dumps(described)) == described


@pytest.mark.parametrize("precision, weights_dtype, autocast_dtype", [
    ("amp", "float32", "bfloat16"), ("fp16", "float16", None), ("bf16", "bfloat16", None),
])
def test_describe_states_the_precision_that_ran(loaded, precision, weights_dtype, autocast_dtype):
    described = dataclasses.replace(loaded, precision=precision).describe()
    assert (described["precision"], described["weights_dtype"], described["autocast_dtype"]) == (
        precision, weights_dtype, autocast_dtype)


def test_pre_projection_leaves_the_projection_in_place(loaded, pixels):
    visual = loaded.model.visual
    proj = visual.proj
    keys = list(loaded.model.state_dict())
    loaded.encode_images(pixels)
    assert visual.proj is proj and list(loaded.model.state_dict()) == keys
    broken = torch.full((1, 3, 7, 7), float("nan"))  # wrong size: the forward raises
    with pytest.raises(RuntimeError):
        loaded.encode_images(broken)
    assert visual.proj is proj


def test_backend_prefix_selects_the_loader(tmp_path, monkeypatch):
    calls = []

    def toy(name, pretrained, **kwargs):
        calls.append((name, pretrained, kwargs))
        return name

    monkeypatch.setattr(models, "_BACKENDS", dict(models._BACKENDS))
    models.register_backend("toy", toy)
    assert models.load_model("toy:some/model", "w", device="cpu", precision="bf16",
                             cache_dir=tmp_path, allow_download=False, seed=7) == "some/model"
    assert calls == [("some/model", "w", {"device": "cpu", "precision": "bf16", "cache_dir": tmp_path,
                                          "allow_download": False, "seed": 7})]
    with pytest.raises(ValueError, match="already registered"):
        models.register_backend("toy", toy)
    assert models.backend_names()[0] == "open_clip" and "toy" in models.backend_names()
    # An explicit open_clip: prefix is the same as none; hf-hub: ids keep their prefix.
    assert models.select_backend("open_clip:ViT-B-32") == (models._BACKENDS["open_clip"], "ViT-B-32")
    assert models.select_backend("ViT-B-32") == (models._BACKENDS["open_clip"], "ViT-B-32")
    assert models.select_backend("hf-hub:org/repo")[1] == "hf-hub:org/repo"


def test_unknown_backend_prefix_names_the_close_ones():
    with pytest.raises(ClipbenchError) as info:
        models.load_model("tom:resnet50", device="cpu")
    message = str(info.value)
    assert "Unknown model backend 'tom'" in message and "open_clip:" in message
    with pytest.raises(ClipbenchError, match="Did you mean open_clip:"):
        models.load_model("openclip:ViT-B-32", device="cpu")


def test_open_clip_prefix_loads_the_same_model(tmp_path):
    plain = _load("clipbench-tiny", "none", tmp_path, seed=2)
    prefixed = _load("open_clip:clipbench-tiny", "none", tmp_path, seed=2)
    assert prefixed.identity() == plain.identity()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prefixed.encode_images(pixels)[0], plain.encode_images(pixels)[0])
