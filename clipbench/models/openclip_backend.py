"""The open_clip backend: builds a resolved :class:`~clipbench.models.openclip_names.ModelSource`
into an :class:`OpenClipModel` (the :class:`~clipbench.models.base.ImageTextModel` contract).

Names, tags and the QuickGELU decision live in :mod:`clipbench.models.openclip_names`; weights
files, digests and the offline guard in :mod:`clipbench.models.weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer
from open_clip.utils import to_2tuple

from clipbench.errors import ClipbenchError
from clipbench.models import base, weights
from clipbench.models.openclip_names import ModelSource, resolve_model

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class OpenClipModel:
    """An open_clip model in eval mode, with its preprocessing and tokenizer.

    Attributes:
        name, pretrained, device, precision, preprocess, weights_digest, pre_projection_kind:
            see :class:`~clipbench.models.base.ImageTextModel`.
        model: the open_clip module (eval mode, on ``device``).
        tokenizer: list of strings -> int64 token tensor (T, context_length).
        seed: the seed of a random initialisation, else None.
        quick_gelu: whether the model uses QuickGELU activations.
        logit_scale: the multiplier of cosine similarities, ``exp`` of the learned log scale
            (100.0 for OpenAI's CLIP).
        logit_bias: SigLIP-style additive logit bias, None for CLIP models.
        embed_dim: width D of the projected (shared) embedding.
        pre_projection_dim: width P of the pre-projection image feature.
        image_size: model input (H, W) in pixels.
        text_context: ``'trimmed'``: each text batch runs on the context up to its longest
            prompt's pooled token (:class:`TextTower`), or ``'full'``: the tokenizer's whole
            context (77 for CLIP), where the tower is not causal or pools a fixed position.
    """

    name: str
    pretrained: str
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: str
    precision: str
    weights_digest: str
    seed: int | None
    quick_gelu: bool
    logit_scale: float
    logit_bias: float | None
    embed_dim: int
    pre_projection_dim: int
    pre_projection_kind: str
    image_size: tuple[int, int]
    text_context: str

    supports_text = True  # not a field: every open_clip model has a text tower
    backend = "open_clip"

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype pixels are cast to before the image tower (the weights' dtype when cast)."""
        return base.weights_dtype(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for ``amp`` (fp16 on CUDA, bf16 on CPU); a no-op otherwise."""
        return base.autocast(self.precision, self.device)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of preprocessed images in one forward pass of the image tower.

        Args:
            pixels: (B, 3, H, W) float tensor from ``preprocess``, on any device.

        Returns:
            (projected, pre_projection): (B, D) float32 L2-normalised embeddings and (B, P)
            float32 pre-projection features (see ``pre_projection_kind``), on ``device``.
        """
        pixels = pixels.to(self.device, dtype=self.input_dtype, non_blocking=True)
        visual = self.model.visual
        with torch.inference_mode(), self.autocast():
            if self.pre_projection_kind == "before_projection":
                with _without_projection(visual) as proj:
                    pre = _first(visual(pixels))
                projected = pre @ proj
            else:
                projected = self.model.encode_image(pixels)
                pre = projected
        return F.normalize(projected.float(), dim=-1), pre.float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Tokenize and encode ``texts`` as one batch; returns (T, D) float32 L2-normalised."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        if self.text_context == "trimmed":
            tower = TextTower.of(self.model)
            tokens = tokens[:, :tower.trim_length(tokens)]
            trimmed = tower.context(tokens.shape[1])
        else:
            trimmed = contextlib.nullcontext()
        with trimmed, torch.inference_mode(), self.autocast():
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)

    def identity(self) -> dict[str, Any]:
        return base.identity(self.name, self.pretrained, self.weights_digest, self.precision)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "open_clip_version": open_clip.__version__,
            **base.precision_description(self.precision, self.device),
            "quick_gelu": self.quick_gelu,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "embed_dim": self.embed_dim,
            "pre_projection_dim": self.pre_projection_dim,
            "pre_projection_kind": self.pre_projection_kind,
            "image_size": list(self.image_size),
            "text_context": self.text_context,
        }


@contextlib.contextmanager
def _without_projection(visual: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Run ``visual``'s public forward without its final projection and yield the projection.

    Every open_clip ``VisionTransformer.forward`` skips ``proj`` when it is None (the hook open_clip
    itself uses to prune the head), so this reaches the pooled pre-projection feature without the
    private, version-specific helpers the forward is built from.
    """
    proj = visual.proj
    visual.proj = None
    try:
        yield proj
    finally:
        visual.proj = proj


@dataclasses.dataclass(frozen=True)
class TextTower:
    """Where an open_clip model keeps its text tower's context: ``holder`` owns the
    ``positional_embedding`` and ``attn_mask`` (the model itself for ``CLIP``, its ``text``
    ``TextTransformer`` for ``CustomTextCLIP``: EVA, MobileCLIP, PE-Core, ViTamin, SigLIP), and
    how the tower pools (``pool_type``, ``eos_id``), as open_clip's ``text_global_pool`` reads them."""

    holder: torch.nn.Module
    pool_type: str
    eos_id: int | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> TextTower | None:
        if isinstance(model, open_clip.CLIP):
            return cls(model, model.text_pool_type, getattr(model, "text_eos_id", None))
        text = getattr(model, "text", None)
        if isinstance(model, open_clip.CustomTextCLIP) and isinstance(text, TextTransformer):
            return cls(text, text.pool_type, getattr(text, "eos_id", None))
        return None  # CoCa, Hugging Face text towers

    @property
    def trimmable(self) -> bool:
        """Whether cutting the context after a batch's last pooled token leaves every pooled
        feature the same: a causal tower (no position attends to a later one) that pools the EOT
        token, without a CLS token appended at the end (CoCa's). SigLIP's towers attend both ways
        and pool the last position: they run on the full context."""
        return (getattr(self.holder, "attn_mask", None) is not None
                and getattr(self.holder, "cls_emb", None) is None
                and self.pool_type in ("argmax", "eos"))

    def trim_length(self, tokens: torch.Tensor) -> int:
        """1 + the last position any row of ``tokens`` (T, context) pools."""
        if not len(tokens):
            return tokens.shape[1]
        if self.pool_type == "eos":
            pooled = (tokens == self.eos_id).int().argmax(dim=-1)
        else:
            pooled = tokens.argmax(dim=-1)
        return int(pooled.max()) + 1

    @contextlib.contextmanager
    def context(self, length: int) -> Iterator[None]:
        """Run open_clip's own ``encode_text`` on the first ``length`` context positions: the
        positional embedding and causal mask, cut to ``length``, stand in for the full ones meanwhile.

        Prompts are ~10-26 tokens of CLIP's 77, so this makes the text tower ~5-7x faster on CPU;
        the features agree with the full context's to float rounding (the kernels see other shapes)."""
        holder = self.holder
        position, mask = holder.positional_embedding, holder.attn_mask
        if length == position.shape[0]:
            yield
            return
        holder.positional_embedding = torch.nn.Parameter(position[:length], requires_grad=False)
        holder.attn_mask = None if mask is None else mask[:length, :length]
        try:
            yield
        finally:
            holder.positional_embedding, holder.attn_mask = position, mask


def trimmable(model: torch.nn.Module) -> bool:
    """Whether ``model``'s text batches can run on a trimmed context (:attr:`TextTower.trimmable`)."""
    tower = TextTower.of(model)
    return tower is not None and tower.trimmable


def _first(output: Any) -> torch.Tensor:
    # A tower built with output_tokens=True returns (pooled, tokens).
    return output[0] if isinstance(output, tuple) else output


# ---------------------------------------------------------------------------------------------
# building


def _seeded(seed: int) -> contextlib.AbstractContextManager:
    """Seed the random initialisation without touching the caller's RNG state."""
    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    return scope()


def _load_openai_weights(model: torch.nn.Module, path: Path) -> None:
    """Load an OpenAI-format checkpoint strictly, minus its metadata entries and the buffers
    (``attn_mask``) that TorchScript saves but the open_clip module rebuilds itself."""
    if weights.is_torchscript(path):
        with warnings.catch_warnings():
            # OpenAI released TorchScript; torch's deprecation notice is not actionable here.
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = open_clip.factory.load_state_dict(str(path))
    expected = model.state_dict()
    rebuilt = {name for name, _ in model.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in weights.OPENAI_METADATA_KEYS and k not in rebuilt}
    model.load_state_dict(state, strict=True)


def _preprocess_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    # open_clip merges a tag's preprocessing only when it downloads the tag itself; clipbench
    # passes the file, so it hands the same keys over (size always follows the model).
    return {k: v for k, v in merge_preprocess_dict({}, cfg).items() if k != "size"}


def _build(source: ModelSource, device: str, precision: str, seed: int, hub_cache_dir: Path | None,
           cache_dir: Path, allow_download: bool) -> tuple[torch.nn.Module, Any, str]:
    """(open_clip model, tokenizer, weights digest) for a resolved source."""
    oc_precision = "fp32" if precision == "amp" else precision
    common = dict(precision=oc_precision, device=device, force_quick_gelu=bool(source.quick_gelu))
    if source.kind == "random":
        with _seeded(seed):
            model = open_clip.create_model(source.arch, pretrained=None, **common)
        return model, open_clip.get_tokenizer(source.arch), f"random:{seed}"
    if source.kind == "hf-hub":
        return _build_hf_hub(source, oc_precision, device, hub_cache_dir, allow_download)
    if source.kind == "tag":
        path, file_digest = weights.tag_checkpoint(source.tag_cfg, source.name, source.pretrained,
                                                   hub_cache_dir, allow_download)
        digest = f"{source.name}:{source.pretrained}:{file_digest}"
        overrides = _preprocess_overrides(source.tag_cfg)
    else:
        path = Path(source.pretrained)
        digest = f"sha256:{weights.file_sha256(path, cache_dir)}"
        overrides = {}
    torchscript = weights.is_torchscript(path)
    state_dict_file = not torchscript and path.suffix not in (".npz", ".npy")  # .npz: big_vision weights
    if source.kind == "tag" and state_dict_file:
        weights.checkpoint_shapes(path)  # a damaged download: a clear error (a file was checked by resolve_model)
    try:
        if source.openai_format or torchscript:
            with _seeded(seed):
                model = open_clip.create_model(source.arch, pretrained=None, **common)
            _load_openai_weights(model, path)
        else:
            model = open_clip.create_model(source.arch, pretrained=str(path),
                                           force_preprocess_cfg=overrides, **common)
    except (RuntimeError, KeyError, ValueError) as error:
        raise _unfit_checkpoint(source, path, state_dict_file, error) from None
    return model, open_clip.get_tokenizer(source.arch), digest


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence open_clip's "initialized randomly" warning for a model built only to be compared."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _unfit_checkpoint(source: ModelSource, path: Path, state_dict_file: bool,
                      error: Exception) -> ClipbenchError:
    """The error for a readable checkpoint the architecture refused: which parameters differ
    (compared with a fresh model of the architecture), else the loader's first line."""
    found = ""
    if state_dict_file:
        shapes = weights.checkpoint_shapes(path)
        with _seeded(0), _quiet():
            fresh = open_clip.create_model(source.arch, pretrained=None, device="cpu")
        expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        found = weights.describe_mismatch(expected, shapes)
    if not found:
        found = str(error).strip().splitlines()[0][:300]
    return ClipbenchError(
        f"Checkpoint {path} does not fit architecture {source.arch!r}: {found}. Pass the --model "
        f"the checkpoint was trained with (`clipbench models` lists them), or a checkpoint of "
        f"{source.arch}."
    )


def _build_hf_hub(source: ModelSource, precision: str, device: str, hub_cache_dir: Path | None,
                  allow_download: bool) -> tuple[torch.nn.Module, Any, str]:
    repo = source.name.removeprefix("hf-hub:")
    config = weights.from_hub_cache(repo, (weights.HF_CONFIG_FILE,), hub_cache_dir)
    files = weights.from_hub_cache(repo, weights.HF_WEIGHT_FILES, hub_cache_dir)
    if config is not None and files is not None:
        # Everything is local: load the snapshot folder, so nothing touches the network.
        identifier = f"local-dir:{config.parent}"
    else:
        reason = weights.offline_reason(weights.PROBE_HOST, allow_download)
        if reason is not None:
            raise ClipbenchError(
                f"The model {source.name} is not on this machine and cannot be downloaded: "
                f"{reason}. clipbench needs {weights.HF_CONFIG_FILE} and "
                f"{' or '.join(weights.HF_WEIGHT_FILES)} from https://huggingface.co/{repo} and "
                f"looked in the Hugging Face hub cache {weights.hub_cache_dir(hub_cache_dir)}. Run "
                f"the same command once with network access, or download the repo and pass its "
                f"weights with --pretrained PATH and the matching --model."
            )
        identifier = source.name
    cache = str(hub_cache_dir) if hub_cache_dir else None
    try:
        model = open_clip.create_model(identifier, precision=precision, device=device,
                                       cache_dir=cache, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(identifier, cache_dir=cache)
    except (RuntimeError, OSError, ValueError) as error:
        raise ClipbenchError(f"Could not load {source.name}: {error}") from error
    files = files or weights.from_hub_cache(repo, weights.HF_WEIGHT_FILES, hub_cache_dir)
    digest = f"{source.name}:{weights.cached_blob_digest(files)}" if files else source.name
    return model, tokenizer, digest


def _dims(model: torch.nn.Module, image_size: tuple[int, int], device: str,
          input_dtype: torch.dtype) -> tuple[int, int, str]:
    """(embed_dim, pre_projection_dim, pre_projection_kind) of the image tower."""
    visual = model.visual
    if isinstance(visual, VisionTransformer) and visual.proj is not None:
        width, dim = visual.proj.shape
        return int(dim), int(width), "before_projection"
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        with torch.inference_mode():
            dim = model.encode_image(torch.zeros(1, 3, *image_size, device=device,
                                                 dtype=input_dtype)).shape[-1]
    return int(dim), int(dim), "embedding"


def load_openclip(
    name: str,
    pretrained: str | None,
    *,
    device: str,
    precision: str,
    cache_dir: Path,
    allow_download: bool,
    quick_gelu: bool | None = None,
    seed: int = 0,
    hub_cache_dir: Path | None = None,
) -> OpenClipModel:
    """The open_clip backend's loader (see :func:`clipbench.models.load_model`; ``device`` and
    ``precision`` arrive checked)."""
    source = resolve_model(name, pretrained, quick_gelu, cache_dir)
    model, tokenizer, digest = _build(source, device, precision, seed, hub_cache_dir, cache_dir,
                                      allow_download)
    model.eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    image_size = tuple(int(s) for s in to_2tuple(model.visual.image_size))
    embed_dim, pre_dim, kind = _dims(model, image_size, device, base.weights_dtype(precision))
    bias = getattr(model, "logit_bias", None)
    quick = any(isinstance(m, QuickGELU) for m in model.modules())
    log.info("loaded %s (%s) on %s, %s, QuickGELU=%s, weights %s", source.name, source.pretrained,
             device, precision, quick, digest)
    return OpenClipModel(
        name=source.name,
        pretrained=source.pretrained,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        weights_digest=digest,
        seed=seed if source.kind == "random" else None,
        quick_gelu=quick,
        logit_scale=float(model.logit_scale.detach().float().exp().item()),
        logit_bias=None if bias is None else float(bias.detach().float().item()),
        embed_dim=embed_dim,
        pre_projection_dim=pre_dim,
        pre_projection_kind=kind,
        image_size=image_size,
        text_context="trimmed" if trimmable(model) else "full",
    )
