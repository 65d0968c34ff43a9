"""The Hugging Face transformers backend (``--model hf:...``) on tiny random models saved locally:
features equal direct transformers calls, the pipeline end to end, offline fail-fast, and the
same zero-shot predictions as the open_clip backend on the same (converted) weights."""

from __future__ import annotations

import gzip
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from clipbench import specs  # noqa: E402
from clipbench.errors import ClipbenchError  # noqa: E402
from clipbench.models import load_model  # noqa: E402
from clipbench.paths import OFFLINE_ENV_VARS  # noqa: E402
from clipbench.pipeline import Evaluator, RunConfig  # noqa: E402

from conftest import COLOURS_SPEC, make_image, write_imagefolder  # noqa: E402

KINDS = ("clip", "siglip", "siglip2")
PROMPTS = ["a photo of a red.", "a big green picture.", "A  BLUE circle, isn't it?"]
#: The full OpenAI BPE: 256 bytes, 256 bytes + </w>, 48894 merges, then start and end of text.
FULL_MERGES = 49152 - 256 - 2
#: Merges of the tiny models' tokenizer (a prefix of the BPE's: a small vocabulary that loads fast).
TINY_MERGES = 1000


def openai_bpe_tokenizer(n_merges: int = FULL_MERGES) -> transformers.CLIPTokenizer:
    """The OpenAI CLIP BPE (open_clip's packaged vocabulary), or its first ``n_merges`` merges, as
    a transformers CLIPTokenizer built offline; in full it is openai/clip-vit-base-patch32's. The
    vocabulary is ordered as open_clip orders it (bytes, bytes</w>, one token per merge), so a
    prefix of the merges keeps the ids of every token it can produce."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:n_merges + 1]
    vocab = {token: i for token, i in SimpleTokenizer().encoder.items() if i < 512 + n_merges}
    vocab.update({"<|startoftext|>": 512 + n_merges, "<|endoftext|>": 513 + n_merges})
    return transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])


def vocab_size(n_merges: int) -> int:
    return 514 + n_merges


EOT = vocab_size(FULL_MERGES) - 1


def text_config(**kw) -> dict:
    size = vocab_size(TINY_MERGES)
    return dict(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=size - 1, **kw)


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def save_tiny(folder: Path, kind: str) -> Path:
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text_config(max_position_embeddings=77),
                                         vision_config=VISION, projection_dim=16)
        model = transformers.CLIPModel(config)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                    crop_size={"height": 32, "width": 32})
    elif kind == "siglip2":  # native aspect ratio: patches, patch mask and spatial shape per image
        vision = {k: v for k, v in VISION.items() if k != "image_size"}
        config = transformers.Siglip2Config(text_config=text_config(max_position_embeddings=16),
                                            vision_config=dict(vision, num_patches=16))
        model = transformers.Siglip2Model(config)
        processor = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    else:
        config = transformers.SiglipConfig(text_config=text_config(max_position_embeddings=16),
                                           vision_config=VISION)
        model = transformers.SiglipModel(config)
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    openai_bpe_tokenizer(TINY_MERGES).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_tiny(root / kind, kind) for kind in KINDS}


def sample_images():
    """Odd sizes and aspect ratios, so that resizing and cropping do something."""
    return [make_image(label, i, size=32).resize((32 + 9 * i, 32 + 5 * label)) for label in range(3) for i in range(2)]


@pytest.mark.parametrize("kind", KINDS)
def test_features_equal_direct_transformers_calls(tiny_folders, kind):
    folder = tiny_folders[kind]
    model = load_model(f"hf:{folder}", device="cpu", precision="fp32")
    images = sample_images()
    pixels = torch.stack([model.preprocess(image) for image in images])
    projected, pre = model.encode_images(pixels)
    texts = model.encode_texts(PROMPTS)

    net = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    direct_inputs = dict(processor(images=images, return_tensors="pt"))
    padding = "longest" if kind == "clip" else "max_length"
    tokens = tokenizer(PROMPTS, padding=padding, truncation=True, max_length=net.config.text_config.max_position_embeddings,
                       return_tensors="pt")
    with torch.no_grad():
        direct_image = net.get_image_features(**direct_inputs).pooler_output
        direct_text = net.get_text_features(**tokens).pooler_output
        # CLIP: the vision tower's pooled output; SigLIP: no projection, the embedding itself
        direct_pre = (net.vision_model(pixel_values=direct_inputs["pixel_values"]).pooler_output
                      if kind == "clip" else direct_image)
    unpacked = model.preprocess.unpack(pixels)
    assert set(unpacked) == set(direct_inputs)
    differences = {
        "pixels": max((unpacked[k].float() - direct_inputs[k].float()).abs().max().item() for k in unpacked),
        "image": (projected - F.normalize(direct_image, dim=-1)).abs().max().item(),
        "pre_projection": (pre - direct_pre).abs().max().item(),
        "text": (texts - F.normalize(direct_text, dim=-1)).abs().max().item(),
    }
    print(kind, differences)
    assert max(differences.values()) <= 1e-5, differences
    assert model.pre_projection_kind == ("before_projection" if kind == "clip" else "embedding")
    if kind == "clip":  # the pre-projection feature is what visual_projection maps to the embedding
        assert pre.shape[1] == 32 and projected.shape[1] == 16
        with torch.no_grad():
            torch.testing.assert_close(F.normalize(net.visual_projection(pre.clone()), dim=-1), projected,
                                       atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(F.normalize(pre, dim=-1), projected, atol=1e-6, rtol=0)
    # SigLIP (1 and 2) pads every text to the maximum length, CLIP to the batch's longest. (For
    # siglip2 transformers 5 overrides the saved tokenizer_class with its Gemma-style
    # Siglip2Tokenizer, MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS: other ids, the same comparison.)
    lengths = [len(tokenizer(t)["input_ids"]) for t in PROMPTS]
    widths = [model.tokenize([t])["input_ids"].shape[1] for t in PROMPTS] + [model.tokenize(PROMPTS)["input_ids"].shape[1]]
    if kind == "clip":
        assert len(set(lengths)) == 3 and widths == [*lengths, max(lengths)]
    else:
        assert widths == [16] * 4
    # DataLoader workers get a pickled copy of the preprocessing
    copy = pickle.loads(pickle.dumps(model.preprocess))
    assert torch.equal(copy(images[0]), pixels[0]) and repr(copy) == repr(model.preprocess)


def test_describe_states_logit_scale_bias_and_pre_projection(tiny_folders):
    clip = load_model(f"hf:{tiny_folders['clip']}", device="cpu", precision="fp32")
    siglip = load_model(f"hf:{tiny_folders['siglip']}", device="cpu", precision="fp32")
    net = transformers.AutoModel.from_pretrained(tiny_folders["siglip"])
    assert clip.describe()["logit_scale"] == pytest.approx(float(np.exp(np.log(1 / 0.07))), rel=1e-4)
    assert clip.describe()["logit_bias"] is None
    described = siglip.describe()
    assert described["logit_scale"] == pytest.approx(net.logit_scale.exp().item())
    assert described["logit_bias"] == pytest.approx(net.logit_bias.item())
    assert "no ranking metric" in described["logits_note"]
    assert described["pre_projection_kind"] == "embedding" and "no separate projection" in described["pre_projection_note"]
    assert clip.pretrained == "local" and clip.name == f"hf:{tiny_folders['clip']}"
    assert clip.weights_digest.startswith("sha256:") and clip.weights_digest != siglip.weights_digest


def test_weights_digest_follows_the_files(tmp_path):
    folder = save_tiny(tmp_path / "clip", "clip")
    first = load_model(f"hf:{folder}", device="cpu", precision="fp32").weights_digest
    assert load_model(f"hf:{folder}", device="cpu", precision="fp32").weights_digest == first
    net = transformers.CLIPModel.from_pretrained(folder)
    with torch.no_grad():
        net.logit_scale.add_(1.0)
    net.save_pretrained(folder)
    assert load_model(f"hf:{folder}", device="cpu", precision="fp32").weights_digest != first


def direct_zeroshot_predictions(folder: Path, image_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """transformers' own processor, tokenizer and get_*_features, numpy prompt ensembling, argmax."""
    from PIL import Image

    net = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    files = sorted((image_root / "test").rglob("*.png"))
    labels = np.array([["a_red", "b_green", "c_blue"].index(p.parent.name) for p in files])
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in files], return_tensors="pt")
        image = net.get_image_features(**pixels).pooler_output.numpy()
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        weights = []
        for name in ("red", "green", "blue"):
            tokens = tokenizer([f"a photo of a {name}.", f"a {name} picture."], padding=True, truncation=True,
                               max_length=77, return_tensors="pt")
            t = net.get_text_features(**tokens).pooler_output.numpy()
            t /= np.linalg.norm(t, axis=1, keepdims=True)
            w = t.mean(0)
            weights.append(w / np.linalg.norm(w))
    return (image @ np.stack(weights).T).argmax(1), labels


@pytest.mark.slow
def test_pipeline_end_to_end_zeroshot_and_linear_probe(tiny_folders, tmp_path):
    root = write_imagefolder(tmp_path / "folder")
    spec_path = tmp_path / "colours.yaml"
    spec_path.write_text(COLOURS_SPEC.format(root=root))
    model = load_model(f"hf:{tiny_folders['clip']}", device="cpu", precision="fp32")
    config = RunConfig(data_root=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                       batch_size=4, workers=0, device="cpu", precision="fp32", n_bootstrap=50,
                       tasks=["zeroshot", "linear_probe"])
    zeroshot, probe = Evaluator(model, config).run([specs.load_spec(str(spec_path))])
    predictions, labels = direct_zeroshot_predictions(tiny_folders["clip"], root)
    assert zeroshot.n_samples == len(labels) == 9
    assert zeroshot.metrics["accuracy"] == pytest.approx(float((predictions == labels).mean()), abs=1e-12)
    assert zeroshot.config["model"]["backend"] == "transformers"
    assert probe.task == "linear_probe" and probe.details["feature_kind"] == "before_projection"
    assert 0.0 <= probe.metrics["accuracy"] <= 1.0 and probe.n_samples == 9
    record_dir = tmp_path / "out" / next(p.name for p in (tmp_path / "out").iterdir())
    assert json.loads((record_dir / "colours" / "zeroshot.json").read_text())["pretrained"] == "local"


@pytest.fixture
def online_env(monkeypatch):
    """No offline variable set: only allow_download or the network probe can stop a download."""
    for name in OFFLINE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_missing_hub_model_offline_fails_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ClipbenchError) as info:
        load_model("hf:nobody/no-such-clip", device="cpu", precision="fp32", hub_cache_dir=tmp_path / "hub")
    message = str(info.value)
    assert time.perf_counter() - start < 5
    assert "nobody/no-such-clip" in message and str(tmp_path / "hub") in message
    assert "huggingface-cli download nobody/no-such-clip" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message


def test_missing_hub_model_without_downloads_gives_the_same_message(tmp_path, online_env):
    start = time.perf_counter()
    with pytest.raises(ClipbenchError, match=r"--no-download.*huggingface-cli download nobody/no-such-clip"):
        load_model("hf:nobody/no-such-clip", device="cpu", precision="fp32", hub_cache_dir=tmp_path / "hub",
                   allow_download=False)
    assert time.perf_counter() - start < 5


def test_cached_hub_snapshot_loads_offline(tiny_folders, tmp_path, monkeypatch):
    """A hub id whose files sit in the hub cache (snapshot layout) loads without the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_dir = tmp_path / "hub" / "models--someone--tiny-clip"
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for path in tiny_folders["clip"].iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    model = load_model("hf:someone/tiny-clip", device="cpu", precision="fp32", hub_cache_dir=tmp_path / "hub")
    local = load_model(f"hf:{tiny_folders['clip']}", device="cpu", precision="fp32")
    assert model.pretrained == "hf-hub" and model.name == "hf:someone/tiny-clip"
    assert model.weights_digest == local.weights_digest
    pixels = torch.stack([model.preprocess(image) for image in sample_images()])
    torch.testing.assert_close(model.encode_images(pixels)[0], local.encode_images(pixels)[0], atol=0, rtol=0)


def test_cli_run_with_a_missing_hub_model_stops_with_the_message(tmp_path, monkeypatch, capsys):
    from clipbench.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec_path = tmp_path / "colours.yaml"
    spec_path.write_text(COLOURS_SPEC.format(root=write_imagefolder(tmp_path / "folder")))
    start = time.perf_counter()
    code = main(["run", "--model", "hf:nobody/no-such-clip", "--datasets", str(spec_path), "--device", "cpu",
                 "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 10
    assert err.startswith("error: The Hugging Face model nobody/no-such-clip is not on this machine")
    assert "huggingface-cli download nobody/no-such-clip" in err and err.count("\n") == 1


@pytest.mark.parametrize("precision", ["bf16", "amp"])
def test_reduced_precision_runs_and_says_what_ran(tiny_folders, precision):
    fp32 = load_model(f"hf:{tiny_folders['clip']}", device="cpu", precision="fp32")
    low = load_model(f"hf:{tiny_folders['clip']}", device="cpu", precision=precision)
    pixels = torch.stack([fp32.preprocess(image) for image in sample_images()])
    (ref, _), (got, pre) = fp32.encode_images(pixels), low.encode_images(pixels)
    text = low.encode_texts(PROMPTS)
    assert got.dtype == pre.dtype == text.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)), atol=1e-5, rtol=0)
    assert (got - ref).abs().max() < 0.05  # bf16 keeps ~3 significant digits
    described = low.describe()
    assert described["precision"] == precision
    assert (described["weights_dtype"], described["autocast_dtype"]) == (
        ("bfloat16", None) if precision == "bf16" else ("float32", "bfloat16"))
    assert next(low.model.parameters()).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert low.identity() != fp32.identity()


def test_processor_whose_output_size_follows_the_image_is_refused(tiny_folders, tmp_path):
    folder = tmp_path / "uncropped"
    folder.mkdir()
    for path in tiny_folders["clip"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, do_center_crop=False).save_pretrained(folder)
    with pytest.raises(ClipbenchError, match="cannot be batched"):
        load_model(f"hf:{folder}", device="cpu", precision="fp32")


def test_bad_names_get_one_paragraph(tiny_folders, tmp_path):
    with pytest.raises(ClipbenchError, match="not a transformers save_pretrained folder"):
        load_model(f"hf:{tmp_path}", device="cpu", precision="fp32")
    with pytest.raises(ClipbenchError, match="no such folder"):
        load_model(f"hf:{tmp_path / 'absent'}", device="cpu", precision="fp32")
    with pytest.raises(ClipbenchError, match="Drop --pretrained"):
        load_model(f"hf:{tiny_folders['clip']}", "openai", device="cpu", precision="fp32")


# ---------------------------------------------------------------------------------------------
# same weights, same numbers: open_clip (OpenAI layout) converted to transformers' CLIPModel


def openclip_to_hf_state_dict(state: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict:
    """open_clip's CLIP keys (OpenAI's layout) -> transformers CLIPModel keys, as transformers'
    convert_clip_original_pytorch_to_hf.py maps them: fused in_proj split into q/k/v, projections
    transposed (open_clip multiplies x @ proj, nn.Linear computes x @ W.T)."""
    out = {}

    def blocks(src: str, dst: str, layers: int) -> None:
        for i in range(layers):
            s, d = f"{src}.resblocks.{i}", f"{dst}.encoder.layers.{i}"
            for part in ("weight", "bias"):
                q, k, v = state[f"{s}.attn.in_proj_{part}"].chunk(3, dim=0)
                out[f"{d}.self_attn.q_proj.{part}"], out[f"{d}.self_attn.k_proj.{part}"] = q, k
                out[f"{d}.self_attn.v_proj.{part}"] = v
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{d}.{b}.{part}"] = state[f"{s}.{a}.{part}"]

    blocks("visual.transformer", "vision_model", vision_layers)
    blocks("transformer", "text_model", text_layers)
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        for part in ("weight", "bias"):
            out[f"{b}.{part}"] = state[f"{a}.{part}"]
    out["visual_projection.weight"] = state["visual.proj"].T.contiguous()
    out["text_projection.weight"] = state["text_projection"].T.contiguous()
    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    out["logit_scale"] = state["logit_scale"]
    return out


def convert_to_hf(open_clip_model, folder: Path) -> Path:
    """save_pretrained a transformers CLIPModel holding ``open_clip_model``'s weights, with the
    OpenAI BPE tokenizer and open_clip's preprocessing settings (224 px, OpenAI mean/std)."""
    net = open_clip_model.model
    visual, vision_layers = net.visual, len(net.visual.transformer.resblocks)
    text_width, text_layers = net.transformer.width, len(net.transformer.resblocks)
    quick = open_clip_model.quick_gelu
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=net.vocab_size, hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=net.transformer.resblocks[0].attn.num_heads,
                         max_position_embeddings=net.context_length, hidden_act="quick_gelu" if quick else "gelu",
                         bos_token_id=49406, eos_token_id=EOT, pad_token_id=EOT, layer_norm_eps=1e-5),
        vision_config=dict(hidden_size=visual.transformer.width, intermediate_size=4 * visual.transformer.width,
                           num_hidden_layers=vision_layers, num_attention_heads=visual.transformer.resblocks[0].attn.num_heads,
                           image_size=visual.image_size[0], patch_size=visual.patch_size[0],
                           hidden_act="quick_gelu" if quick else "gelu", layer_norm_eps=1e-5),
        projection_dim=open_clip_model.embed_dim,
    )
    hf = transformers.CLIPModel(config).eval()
    hf.load_state_dict(openclip_to_hf_state_dict(net.state_dict(), vision_layers, text_layers), strict=True)
    hf.save_pretrained(folder)
    size = visual.image_size[0]
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(folder)
    openai_bpe_tokenizer().save_pretrained(folder)
    return folder


def zeroshot_predictions(model, samples, classnames, templates) -> np.ndarray:
    from clipbench.features import encode_image_batches
    from clipbench.tasks.zeroshot import build_prompts, class_weights

    projected = encode_image_batches(model, samples, batch_size=8, workers=0).projected
    prompts = model.encode_texts(build_prompts(classnames, templates)).numpy()
    return (projected @ class_weights(prompts, len(classnames))).argmax(1)


@pytest.mark.slow
def test_converted_open_clip_weights_give_the_same_zeroshot_predictions(tmp_path, one_torch_thread):
    """The open_clip backend and the hf backend on the same random ViT-S-32-alt weights.

    Preprocessing: open_clip resizes PIL images with PIL's bicubic filter, transformers' default
    CLIPImageProcessor resizes tensors with torchvision's antialiased bicubic (and rounds a center
    crop's offset down where torchvision rounds it to nearest): they differ on resized images. The
    images here are written at the model's 224 px, so both resizes and crops are the identity and
    the two pipelines produce the same pixels (up to float rounding of rescale-then-normalize).
    """
    from clipbench.data import load_split

    torch.manual_seed(0)
    oc = load_model("ViT-S-32-alt", "none", device="cpu", precision="fp32")
    hf = load_model(f"hf:{convert_to_hf(oc, tmp_path / 'converted')}", device="cpu", precision="fp32")
    root = tmp_path / "folder"
    for split, n in (("test", 12),):
        for label, name in enumerate(("a_red", "b_green", "c_blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                make_image(label, 100 + i, size=224).save(root / split / name / f"{i:03d}.png")
    spec_path = tmp_path / "colours.yaml"
    spec_path.write_text(COLOURS_SPEC.format(root=root).replace("tasks: [zeroshot, linear_probe]", "tasks: [zeroshot]")
                         .replace("  train: train\n", ""))
    spec = specs.load_spec(str(spec_path))
    samples = load_split(spec, "test", tmp_path / "data", tmp_path / "cache", allow_download=False)

    # the same tokens up to the end of text (open_clip pads with 0, transformers with <|endoftext|>)
    oc_tokens = oc.tokenizer(PROMPTS)
    hf_tokens = hf.tokenize(PROMPTS)["input_ids"]
    assert torch.equal(hf_tokens, oc_tokens[:, :hf_tokens.shape[1]].where(hf_tokens != EOT, EOT))

    images = [samples.load_image(i) for i in range(len(samples))]
    pixels = torch.stack([oc.preprocess(image) for image in images])
    pixel_gap = (pixels - torch.stack([hf.preprocess(image) for image in images])).abs().max().item()
    (oc_proj, oc_pre), (hf_proj, hf_pre) = oc.encode_images(pixels), hf.encode_images(pixels)
    gaps = {"pixels": pixel_gap, "image": (oc_proj - hf_proj).abs().max().item(),
            "pre_projection": (oc_pre - hf_pre).abs().max().item(),
            "text": (oc.encode_texts(PROMPTS) - hf.encode_texts(PROMPTS)).abs().max().item()}
    classnames, templates = ["red", "green", "blue"], ["a photo of a {c}.", "a {c} picture."]
    oc_pred = zeroshot_predictions(oc, samples, classnames, templates)
    hf_pred = zeroshot_predictions(hf, samples, classnames, templates)
    counts = {"open_clip": np.bincount(oc_pred, minlength=3).tolist(), "hf": np.bincount(hf_pred, minlength=3).tolist()}
    print("cross-backend", gaps, counts)
    assert max(gaps.values()) <= 1e-5, gaps
    assert np.array_equal(oc_pred, hf_pred), counts
    config = RunConfig(data_root=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                       batch_size=8, workers=0, device="cpu", precision="fp32", n_bootstrap=0, tasks=["zeroshot"])
    (oc_record,) = Evaluator(oc, config).run([spec])
    (hf_record,) = Evaluator(hf, config).run([spec])
    assert oc_record.metrics == hf_record.metrics
    assert oc_record.metrics["accuracy"] == pytest.approx(float((oc_pred == samples.targets).mean()), abs=1e-12)


def test_models_command_lists_every_backend_and_its_naming(capsys):
    from clipbench.cli import main
    from clipbench.models import backends

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    registered = backends()
    assert {b.prefix for b in registered} >= {"open_clip", "hf-hub", "hf"}
    for backend in registered:
        assert backend.naming and f"- {backend.prefix}: {backend.naming}" in out
    assert "hf:/path/to/folder" in out and "ViT-B-32" in out
