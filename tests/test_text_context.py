"""Text batches on a trimmed context: the same features as open_clip's full 77-token context (to
float rounding), only where that is exact in arithmetic, and kept apart in caches and records."""

from __future__ import annotations

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from clipbench import specs
from clipbench.features import FeatureCache, text_features
from clipbench.models import load_model
from clipbench.models.openclip_backend import TextTower, trimmable
from clipbench.pipeline import Evaluator, RunConfig
from clipbench.tasks import get_task

ARCH = "ViT-S-32-alt"
PROMPTS = ["a photo of a dog.", "itap of a spotted river warbler lighthouse espresso.", "a cat",
           "a bad photo of the " + "very " * 20 + "small trombone."]


@pytest.fixture(scope="module")
def model():
    return load_model(ARCH, "none", device="cpu", precision="fp32")


def _by_hand(module: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP text path written out on the first L positions, L = 1 + the last EOT."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    with torch.inference_mode():
        x = module.token_embedding(tokens) + module.positional_embedding[:length]
        x = module.ln_final(module.transformer(x, attn_mask=module.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, "argmax") @ module.text_projection
    return F.normalize(x, dim=-1)


def test_trimmed_batches_equal_the_written_out_path_and_the_full_context(model):
    assert model.text_context == "trimmed" and model.describe()["text_context"] == "trimmed"
    tokens = model.tokenizer(PROMPTS)
    trimmed = model.encode_texts(PROMPTS)
    assert torch.equal(trimmed, _by_hand(model.model, tokens))
    with torch.inference_mode():
        full = F.normalize(model.model.encode_text(tokens), dim=-1)
    assert torch.equal(dataclasses.replace(model, text_context="full").encode_texts(PROMPTS), full)
    # the same features, not the same bits: the kernels see a 26- instead of a 77-token context
    assert (trimmed - full).abs().max() < 1e-5
    # the model is left as it was: full context again after a trimmed batch
    assert model.model.positional_embedding.shape[0] == 77 and model.model.attn_mask.shape == (77, 77)


def test_a_prompt_does_not_depend_on_the_longest_one_in_its_batch(model):
    alone = model.encode_texts(PROMPTS[:1])
    beside_long = model.encode_texts([PROMPTS[0], PROMPTS[3]])[:1]
    assert (alone - beside_long).abs().max() < 1e-5


def test_a_prompt_that_fills_the_context_runs_on_all_of_it(model):
    long = ["word " * 200]  # truncated by the tokenizer: its EOT sits at position 76
    assert int(model.tokenizer(long).argmax(dim=-1)) == 76
    with torch.inference_mode():
        full = F.normalize(model.model.encode_text(model.tokenizer(long)), dim=-1)
    assert torch.equal(model.encode_texts(long), full)


def _tiny_clip(cls=open_clip.CLIP, **text_cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=16, width=32, layers=1, head_width=16)
    text = dict(context_length=16, vocab_size=64, width=32, heads=2, layers=2, **text_cfg)
    return cls(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def _tokens() -> torch.Tensor:
    """Two prompts of 3 and 5 tokens (EOT 63, the largest id; 3 as an EOS id), padded with 0."""
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[0, :3], tokens[1, :6] = torch.tensor([5, 7, 63]), torch.tensor([5, 60, 3, 62, 63, 9])
    return tokens


def _trimmed_and_full(module: torch.nn.Module, tokens: torch.Tensor, length: int):
    with torch.inference_mode():
        full = module.encode_text(tokens)
        with TextTower.of(module).context(length):
            cut = module.encode_text(tokens[:, :length])
    return cut, full


@pytest.mark.parametrize("cls", [open_clip.CLIP, open_clip.CustomTextCLIP])
def test_only_causal_towers_that_pool_the_eot_token_are_trimmed(cls):
    assert trimmable(_tiny_clip(cls))
    assert trimmable(_tiny_clip(cls, pool_type="eos", eos_id=3))
    # a later position changes every earlier one without a causal mask; "last" pools a fixed position
    assert not trimmable(_tiny_clip(cls, no_causal_mask=True))
    assert not trimmable(_tiny_clip(cls, pool_type="last"))
    assert not trimmable(_tiny_clip(cls, pool_type="first"))
    if cls is open_clip.CustomTextCLIP:
        # SigLIP's text tower as open_clip configures it; CoCa-style CLS token appended at the end
        assert not trimmable(_tiny_clip(cls, no_causal_mask=True, pool_type="last"))
        assert not trimmable(_tiny_clip(cls, embed_cls=True))


@pytest.mark.parametrize("cls", [open_clip.CLIP, open_clip.CustomTextCLIP])
@pytest.mark.parametrize("pool_type, length", [("argmax", 5), ("eos", 3)])
def test_a_trimmable_tower_gives_the_full_contexts_features(cls, pool_type, length):
    module = _tiny_clip(cls, pool_type=pool_type, eos_id=3)
    tower = TextTower.of(module)
    # argmax: the EOT 63 of row 1 at position 4; eos: the first 3, at position 2 of row 1
    assert tower.trim_length(_tokens()) == length
    cut, full = _trimmed_and_full(module, _tokens(), length)
    assert (cut - full).abs().max() < 1e-5
    assert tower.holder.positional_embedding.shape[0] == 16  # restored


@pytest.mark.parametrize("cls", [open_clip.CLIP, open_clip.CustomTextCLIP])
def test_trimming_a_tower_without_a_causal_mask_would_change_its_features(cls):
    # why trimmable() refuses it: without the mask the padding after the EOT reaches the EOT
    cut, full = _trimmed_and_full(_tiny_clip(cls, no_causal_mask=True), _tokens(), 5)
    assert (cut - full).abs().max() > 1e-3


def test_trimmed_features_have_their_own_cache_key_and_record_digest(model, tmp_path):
    cache = FeatureCache(tmp_path / "features")
    trimmed = text_features(model, PROMPTS, cache, batch_size=2)
    full_model = dataclasses.replace(model, text_context="full")
    full = text_features(full_model, PROMPTS, cache, batch_size=2)
    assert len(list((tmp_path / "features").rglob("*.json"))) == 2  # two entries, not one reused
    assert not np.array_equal(trimmed, full) and np.abs(trimmed - full).max() < 1e-5

    spec = specs.select(["synthetic-shapes"])[0]
    config = RunConfig(output=tmp_path / "out", cache_dir=tmp_path / "cache", data_root=tmp_path / "data")
    zeroshot = Evaluator(model, config).record_settings(spec, get_task("zeroshot"))
    assert zeroshot["text_context"] == "trimmed"
    assert "text_context" not in Evaluator(model, config).record_settings(spec, get_task("linear_probe"))
    at_full = Evaluator(full_model, config).record_settings(spec, get_task("zeroshot"))
    assert "text_context" not in at_full
    assert at_full["settings_digest"] != zeroshot["settings_digest"]


def test_prompts_are_encoded_in_order_of_length_and_returned_in_their_own(model, tmp_path):
    texts = [f"{prompt} {'x' * (i % 5)}" for i, prompt in enumerate(PROMPTS * 3)]
    got = text_features(model, texts, FeatureCache(tmp_path), batch_size=4)
    # the batches written out: sorted by character count, ties in the given order
    by_length = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    expected = np.empty_like(got)
    for start in range(0, len(texts), 4):
        rows = by_length[start:start + 4]
        expected[rows] = model.encode_texts([texts[i] for i in rows]).numpy()
    assert np.array_equal(got, expected)
    # each row is its own prompt's: encoded alone, it agrees to float rounding
    alone = np.concatenate([model.encode_texts([t]).numpy() for t in texts])
    assert np.abs(got - alone).max() < 1e-5
    # a fixed-length layout keeps the given order
    full = dataclasses.replace(model, text_context="full")
    in_order = np.concatenate([full.encode_texts(texts[s:s + 4]).numpy() for s in range(0, len(texts), 4)])
    assert np.array_equal(text_features(full, texts, FeatureCache(tmp_path), batch_size=4), in_order)
