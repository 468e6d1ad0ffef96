"""The embedded digits model: a tiny text-conditioned pixel-space diffusion model.

It is built from Stable Diffusion's component classes (``UNet2DConditionModel``,
``CLIPTextModel``, the CLIP tokenizer, ``DDIMScheduler``), is pretrained by the project on
scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``), and is
saved and loaded in the diffusers directory layout, so the main DDPO job has a real
text-to-image model to fine-tune on a CPU with no model hub.

Pixel space, one channel, 8x8, values in [-1, 1]; prompts ``"a handwritten digit N"`` and ``""``
(unconditional, for classifier-free guidance); a small CLIP text encoder trained with the UNet,
then frozen; a ``DDIMScheduler`` with DDPM's linear betas and ``set_alpha_to_one=False``. Why each
choice: docs/digits_model.md.

Modules: this one holds the model, its building, saving and loading, and the cache lookup
(:func:`load_or_train_digits_model`); ``digits_data`` the dataset; ``digits_pretrain`` the
pretraining loop and a reference sampler. Their public names are importable from here too.

Directory layout (written by :func:`save_digits_model`)::

    digits-v1/
      model_index.json       components and their classes, plus the metadata of DigitsModel
      unet/                  UNet2DConditionModel.save_pretrained
      text_encoder/          CLIPTextModel.save_pretrained
      scheduler/             DDIMScheduler.save_pretrained
      tokenizer/             optional, CLIPTokenizer.save_pretrained
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ddpo_rl._version import __version__
from ddpo_rl.models.digits_data import load_digits_dataset
from ddpo_rl.models.digits_pretrain import TrainResult, pretrain_loop, sample_digits, train_digits_model

__all__ = [
    "DigitsConfig", "DigitsModel", "TrainResult", "build_digits_model", "default_cache_dir", "is_digits_model_dir",
    "load_digits_dataset", "load_digits_model", "load_or_train_digits_model", "packaged_model_dir", "pretrain_loop",
    "sample_digits", "save_digits_model", "train_digits_model", "write_model_dir",
]

MODEL_NAME = "digits-v1"
"""Name of the cache subdirectory; bump it when the architecture or the data change."""
INDEX_CLASS_NAME = "DDPODigitsModel"
"""``_class_name`` in the saved directory's model_index.json: what marks it as this model."""
PROMPT_TEMPLATE = "a handwritten digit {}"
UNCONDITIONAL_PROMPT = ""
CACHE_ENV_VAR = "DDPO_RL_CACHE"
"""Root cache directory of ddpo_rl (default ``~/.cache/ddpo_rl``)."""
MODEL_INDEX = "model_index.json"
REQUIRED_ENTRIES = (MODEL_INDEX, "unet", "text_encoder", "scheduler")
"""What a saved digits model directory must hold (the tokenizer is optional)."""

_PACKAGED_DIR = Path(__file__).resolve().parent.parent / "assets" / MODEL_NAME


@dataclass
class DigitsConfig:
    """Architecture of the digits model (sizes, not training hyper-parameters)."""

    sample_size: int = 8
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden_size: int = 16
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 77
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class DigitsModel:
    """The components of the digits model and what a pipeline needs to know about it.

    Attributes:
        unet: ``UNet2DConditionModel`` predicting epsilon for [B, channels, 8, 8] samples.
        text_encoder: frozen ``CLIPTextModel``; ``last_hidden_state`` is the UNet's context.
        tokenizer: the 49408-token ``CLIPTokenizer`` (padded to ``max_length`` 77).
        scheduler: ``DDIMScheduler`` (see the module docstring for its settings).
        sample_size: image side in pixels (8).
        channels: image channels (1, grayscale; :meth:`decode` makes RGB).
        prompt_template: ``"a handwritten digit {}"``, formatted with the digit.
        unconditional_prompt: ``""``, the CFG negative/unconditional prompt.
        source: where the model came from ("trained", or the directory it was loaded from).
    """

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    sample_size: int = 8
    channels: int = 1
    prompt_template: str = PROMPT_TEMPLATE
    unconditional_prompt: str = UNCONDITIONAL_PROMPT
    source: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        """The ten training prompts, digit 0 to 9."""
        return [self.prompt_template.format(d) for d in range(10)]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device=None, dtype=None) -> "DigitsModel":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:  # a dtype=None argument makes diffusers warn about float32 modules
            self.unet.to(**kwargs)
            self.text_encoder.to(**kwargs)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder embeddings of ``prompts``: [B, 77, hidden] on the model's device."""
        from ddpo_rl.text import encode_prompts

        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

    @staticmethod
    def decode(samples: torch.Tensor) -> torch.Tensor:
        """Samples in [-1, 1], [B, 1, H, W] -> RGB images in [0, 1], [B, 3, H, W] (the reward input)."""
        images = (samples.float() / 2 + 0.5).clamp(0, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return images

    def metadata(self) -> dict:
        return {
            "sample_size": self.sample_size,
            "channels": self.channels,
            "prompt_template": self.prompt_template,
            "unconditional_prompt": self.unconditional_prompt,
            "value_range": [-1.0, 1.0],
            "space": "pixel",
            **self.extra,
        }


# ----------------------------------------------------------------------------- building


def build_digits_model(config: DigitsConfig | None = None, seed: int = 0) -> DigitsModel:
    """A randomly initialised digits model (untrained UNet, frozen random text encoder)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddpo_rl.models.tokenizer import build_clip_tokenizer

    cfg = config or DigitsConfig()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cfg.text_hidden_size,
            intermediate_size=2 * cfg.text_hidden_size,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_length,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()
    text_encoder.requires_grad_(False)
    n = len(cfg.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(32, cfg.block_out_channels[0]),
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return DigitsModel(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(model_max_length=cfg.max_length),
        scheduler=scheduler,
        sample_size=cfg.sample_size,
        channels=cfg.channels,
    )


# ----------------------------------------------------------------------------- save / load


def default_cache_dir(name: str = MODEL_NAME) -> Path:
    """``$DDPO_RL_CACHE/<name>``, or ``~/.cache/ddpo_rl/<name>`` when the variable is unset
    (``name`` defaults to ``digits-v1``)."""
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path("~/.cache/ddpo_rl").expanduser()
    return base / name


def packaged_model_dir() -> Path | None:
    """The checkpoint committed inside the package (``ddpo_rl/assets/digits-v1``), if any."""
    return _PACKAGED_DIR if is_digits_model_dir(_PACKAGED_DIR) else None


def is_digits_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete saved digits model."""
    p = Path(path)
    return all((p / f).exists() for f in REQUIRED_ENTRIES)


def save_digits_model(
    model: DigitsModel,
    path: str | os.PathLike,
    *,
    save_tokenizer: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save ``model`` in the diffusers directory layout (see the module docstring).

    Each component goes through its own ``save_pretrained`` (safetensors). The tokenizer is
    left out unless ``save_tokenizer`` (it is rebuilt offline at load time). ``dtype`` (e.g.
    ``torch.float16``) stores the weights in that precision, halving the files; the in-memory
    model is not changed, and :func:`load_digits_model` casts back to float32. Files are
    written to a temporary sibling directory and moved into place, so an interrupted save
    never leaves a half-written model that would later be loaded.
    """
    unet, text_encoder = model.unet, model.text_encoder
    if dtype is not None:
        unet = copy.deepcopy(unet).to(dtype)
        text_encoder = copy.deepcopy(text_encoder).to(dtype)
    components = {
        "unet": ["diffusers", type(model.unet).__name__],
        "text_encoder": ["transformers", type(model.text_encoder).__name__],
        "scheduler": ["diffusers", type(model.scheduler).__name__],
    }
    writers = {
        "unet": unet.save_pretrained,
        "text_encoder": text_encoder.save_pretrained,
        "scheduler": model.scheduler.save_pretrained,
    }
    if save_tokenizer:
        writers["tokenizer"] = model.tokenizer.save_pretrained
        components["tokenizer"] = ["transformers", type(model.tokenizer).__name__]
    else:
        components["tokenizer"] = ["ddpo_rl", "build_clip_tokenizer"]
    index = {"_class_name": INDEX_CLASS_NAME, "name": MODEL_NAME, **components, "metadata": model.metadata()}
    return write_model_dir(path, writers, index)


def write_model_dir(path: str | os.PathLike, writers: dict[str, Callable[[Path], object]], index: dict) -> Path:
    """Write a model directory atomically: ``writers[name](tmp / name)`` for each component, then
    ``model_index.json`` (``index`` plus the package version), into a temporary sibling directory
    that is then moved into place, so an interrupted save never leaves a half-written model."""
    import shutil


    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for name, write in writers.items():
        write(tmp / name)
    index = {"_class_name": index["_class_name"], "_ddpo_rl_version": __version__, **index}
    (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_digits_model(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitsModel:
    """Load a saved digits model with each component's ``from_pretrained``.

    Args:
        path: directory written by :func:`save_digits_model`.
        device, dtype: where to put the UNet and the text encoder (default CPU, float32).
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    if not is_digits_model_dir(path):
        raise FileNotFoundError(
            f"{path} is not a saved digits model (expected {MODEL_INDEX}, unet/, text_encoder/, scheduler/)"
        )
    index = json.loads((path / MODEL_INDEX).read_text())
    meta = dict(index.get("metadata", {}))
    dtype = dtype or torch.float32
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    text_encoder, tokenizer = load_text_encoder_and_tokenizer(path, CLIPTextModel, dtype)
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    unet.eval()
    text_encoder.eval().requires_grad_(False)
    model = DigitsModel(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        sample_size=int(meta.pop("sample_size", unet.config.sample_size)),
        channels=int(meta.pop("channels", unet.config.in_channels)),
        prompt_template=meta.pop("prompt_template", PROMPT_TEMPLATE),
        unconditional_prompt=meta.pop("unconditional_prompt", UNCONDITIONAL_PROMPT),
        source=str(path),
        extra={k: v for k, v in meta.items() if k not in ("value_range", "space")},
    )
    if device is not None:
        model.to(device)
    return model


def load_text_encoder_and_tokenizer(path: Path, encoder_class, dtype: torch.dtype):
    """The frozen text encoder (``encoder_class`` from ``path/text_encoder``, without a progress bar)
    and its tokenizer (``path/tokenizer``, or the offline CLIP tokenizer) of an embedded model."""
    from transformers import CLIPTokenizer
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for a 1 MB encoder is noise in the recipe's output
    try:
        text_encoder = encoder_class.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if (path / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    else:
        from ddpo_rl.models.tokenizer import build_clip_tokenizer

        tokenizer = build_clip_tokenizer(model_max_length=text_encoder.config.max_position_embeddings)
    return text_encoder.eval().requires_grad_(False), tokenizer


def load_or_train_digits_model(
    cache_dir: str | os.PathLike | None = None,
    *,
    device: torch.device | str | None = None,
    use_packaged: bool = True,
    train_if_missing: bool = True,
    progress: bool = True,
    save_tokenizer: bool = False,
    **train_kwargs,
) -> DigitsModel:
    """The pretrained digits model: loaded if saved, else trained (a few CPU minutes) and saved.

    Lookup order:

    1. ``cache_dir`` (default :func:`default_cache_dir`: ``$DDPO_RL_CACHE/digits-v1`` or
       ``~/.cache/ddpo_rl/digits-v1``);
    2. the checkpoint committed in the package (``ddpo_rl/assets/digits-v1``), if
       ``use_packaged`` and it exists;
    3. otherwise train with :func:`train_digits_model` (``train_kwargs`` passed on), save the
       result to ``cache_dir`` and return it. A message says so before training starts.

    Raises:
        FileNotFoundError: nothing saved was found and ``train_if_missing`` is False.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_digits_model_dir(cache):
        return load_digits_model(cache, device=device)
    packaged = packaged_model_dir() if use_packaged else None
    if packaged is not None:
        return load_digits_model(packaged, device=device)
    if not train_if_missing:
        raise FileNotFoundError(
            f"no digits model in {cache}" + (" nor in the package" if use_packaged else "")
            + "; run recipes/pretrain_digits.py or pass train_if_missing=True"
        )
    _say(
        f"ddpo_rl: no pretrained digits model found in {cache}; training one now "
        f"(a few CPU minutes, once). It will be saved there.",
        progress,
    )
    model = build_digits_model(seed=train_kwargs.get("seed", 0))
    if device is not None:
        model.to(device)
    model, result = train_digits_model(model, progress=progress, **train_kwargs)
    save_digits_model(model, cache, save_tokenizer=save_tokenizer)
    _say(
        f"ddpo_rl: digits model trained in {result.seconds:.0f} s "
        f"(final loss {result.losses[-50:].mean():.4f}), saved to {cache}",
        progress,
    )
    model.source = "trained"
    return model


def _say(message: str, rich_console: bool) -> None:
    if rich_console:
        from rich.console import Console

        Console(stderr=True).print(message)
    else:
        import sys

        print(message, file=sys.stderr)
