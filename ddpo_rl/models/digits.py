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

Two objectives, the same network and data (``DigitsConfig.objective``):

* ``"epsilon"`` (``digits-v1``, ``--model digits``): DDPM's noise prediction, sampled by DDIM; the
  policy is :class:`~ddpo_rl.policy.DiffusionPolicy` (DDPO's eta-DDIM steps).
* ``"flow"`` (``digits-flow-v1``, ``--model digits-flow``): the rectified-flow velocity
  ``v = epsilon - x_0`` of ``x_t = (1 - t) x_0 + t epsilon`` (notation: :mod:`ddpo_rl.models.flow_digits`),
  SD3's logit-normal training times, a ``FlowMatchEulerDiscreteScheduler`` (shift 1); the policy is
  :class:`~ddpo_rl.flow_policy.FlowMatchingPolicy` (Flow-GRPO's SDE steps). The UNet is called with
  ``timestep = 1000 t``. Fine-tuned for JPEG compressibility it keeps its digits far longer than the
  epsilon model (README, "What the default run shows"; docs/results/digits_flow.md).

Modules: this one holds the model, its building, saving and loading, and the cache lookup
(:func:`load_or_train_digits_model`); ``digits_data`` the dataset; ``digits_pretrain`` the
pretraining loop and a reference sampler; ``embedded`` what this model shares with flow-digits-v1
(the text encoder's building, the directory layout, the lookup). Their public names are
importable from here too.

Directory layout (written by :func:`save_digits_model`)::

    digits-v1/
      model_index.json       components and their classes, plus the metadata of DigitsModel
      unet/                  UNet2DConditionModel.save_pretrained
      text_encoder/          CLIPTextModel.save_pretrained
      scheduler/             DDIMScheduler.save_pretrained (FlowMatchEulerDiscreteScheduler: digits-flow-v1)
      tokenizer/             optional, CLIPTokenizer.save_pretrained
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ddpo_rl.models import embedded
from ddpo_rl.models.digits_data import load_digits_dataset
from ddpo_rl.models.digits_pretrain import TrainResult, pretrain_loop, sample_digits, train_digits_model
from ddpo_rl.models.embedded import (  # noqa: F401  (CACHE_ENV_VAR, write_model_dir: importable from here too)
    CACHE_ENV_VAR,
    MODEL_INDEX,
    PROMPT_TEMPLATE,
    UNCONDITIONAL_PROMPT,
    write_model_dir,
)

__all__ = [
    "DigitsConfig", "DigitsModel", "TrainResult", "build_digits_model", "default_cache_dir", "is_digits_model_dir",
    "load_digits_dataset", "load_digits_model", "load_or_train_digits_model", "packaged_model_dir", "pretrain_loop",
    "objective_of_scheduler", "sample_digits", "saved_objective", "save_digits_model", "train_digits_model", "write_model_dir",
]

MODEL_NAME = "digits-v1"
"""Name of the cache subdirectory; bump it when the architecture or the data change."""
FLOW_MODEL_NAME = "digits-flow-v1"
"""The same for the flow-matching objective's model (``objective="flow"``)."""
OBJECTIVES = {"epsilon": MODEL_NAME, "flow": FLOW_MODEL_NAME}
"""Pretraining objective -> the name of its embedded model (cache and asset subdirectory)."""
_SCHEDULER_CLASSES = {"epsilon": "DDIMScheduler", "flow": "FlowMatchEulerDiscreteScheduler"}
INDEX_CLASS_NAME = "DDPODigitsModel"
"""``_class_name`` in the saved directory's model_index.json: what marks it as this model."""
REQUIRED_ENTRIES = (MODEL_INDEX, "unet", "text_encoder", "scheduler")
"""What a saved digits model directory must hold (the tokenizer is optional)."""

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


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
    objective: str = "epsilon"
    """"epsilon" (noise prediction, DDIM) or "flow" (rectified-flow velocity, flow-matching Euler
    scheduler with shift 1; module docstring)."""


@dataclass
class DigitsModel:
    """The components of the digits model and what a pipeline needs to know about it.

    Attributes:
        unet: ``UNet2DConditionModel`` predicting epsilon (or, objective "flow", the velocity) for
            [B, channels, 8, 8] samples.
        text_encoder: frozen ``CLIPTextModel``; ``last_hidden_state`` is the UNet's context.
        tokenizer: the 49408-token ``CLIPTokenizer`` (padded to ``max_length`` 77).
        scheduler: ``DDIMScheduler`` (see the module docstring for its settings), or
            ``FlowMatchEulerDiscreteScheduler`` for the flow-matching objective.
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

    @property
    def objective(self) -> str:
        """``"flow"`` for a flow-matching scheduler (velocity prediction), else ``"epsilon"``."""
        from ddpo_rl.flow_sde import is_flow_matching_scheduler

        return "flow" if is_flow_matching_scheduler(self.scheduler) else "epsilon"

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
    """A randomly initialised digits model (untrained UNet, frozen random text encoder), with the
    scheduler of ``config.objective``."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ddpo_rl.models.tokenizer import build_clip_tokenizer

    cfg = config or DigitsConfig()
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {cfg.objective!r}")
    torch.manual_seed(seed)
    text_encoder = embedded.build_text_encoder(
        CLIPTextModel, hidden_size=cfg.text_hidden_size, num_layers=cfg.text_layers, num_heads=cfg.text_heads,
        max_length=cfg.max_length,
    )
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
    if cfg.objective == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=1.0)
    else:
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
    return embedded.default_cache_dir(name)


def packaged_model_dir(objective: str = "epsilon") -> Path | None:
    """The checkpoint committed inside the package (``ddpo_rl/assets/digits-v1``, or
    ``digits-flow-v1`` for ``objective="flow"``), if any."""
    path = _ASSETS / OBJECTIVES[objective]
    return path if is_digits_model_dir(path) else None


def objective_of_scheduler(class_name: object) -> str | None:
    """``"epsilon"`` for ``"DDIMScheduler"``, ``"flow"`` for ``"FlowMatchEulerDiscreteScheduler"``, else None."""
    return {v: k for k, v in _SCHEDULER_CLASSES.items()}.get(class_name) if isinstance(class_name, str) else None


def saved_objective(path: str | os.PathLike) -> str | None:
    """The objective (``"epsilon"`` or ``"flow"``) of the digits model saved in ``path``, read from its
    scheduler's config without loading anything; None if that is missing or names another scheduler."""
    try:
        with open(Path(path) / "scheduler" / "scheduler_config.json") as f:
            return objective_of_scheduler(json.load(f).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def is_digits_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete saved digits model."""
    return embedded.is_model_dir(path, REQUIRED_ENTRIES)


def save_digits_model(
    model: DigitsModel,
    path: str | os.PathLike,
    *,
    save_tokenizer: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save ``model`` in the diffusers directory layout (see the module docstring), atomically.

    Each component goes through its own ``save_pretrained`` (safetensors). The tokenizer is
    left out unless ``save_tokenizer`` (it is rebuilt offline at load time). ``dtype`` (e.g.
    ``torch.float16``) stores the weights in that precision, halving the files; the in-memory
    model is not changed, and :func:`load_digits_model` casts back to float32. An interrupted
    save never leaves a half-written model that would later be loaded
    (:func:`~ddpo_rl.models.embedded.write_model_dir`).
    """
    components = {"unet": model.unet, "text_encoder": model.text_encoder, "scheduler": model.scheduler}
    return embedded.save_model_dir(
        path, components, model.tokenizer, class_name=INDEX_CLASS_NAME, name=OBJECTIVES[model.objective],
        metadata=model.metadata(), save_tokenizer=save_tokenizer, dtype=dtype,
    )


def load_digits_model(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitsModel:
    """Load a saved digits model (either objective: the scheduler saved with it says which) with each
    component's ``from_pretrained``.

    Args:
        path: directory written by :func:`save_digits_model`.
        device, dtype: where to put the UNet and the text encoder (default CPU, float32).
    """
    import diffusers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    if not is_digits_model_dir(path):
        raise FileNotFoundError(
            f"{path} is not a saved digits model (expected {MODEL_INDEX}, unet/, text_encoder/, scheduler/)"
        )
    objective = saved_objective(path)
    if objective is None:
        raise FileNotFoundError(
            f"{path}: scheduler/scheduler_config.json is missing or names no scheduler of a digits model "
            f"(expected one of {sorted(_SCHEDULER_CLASSES.values())})"
        )
    model = DigitsModel(**embedded.load_model_dir(
        path, denoiser=("unet", UNet2DConditionModel), encoder_class=CLIPTextModel,
        scheduler_class=getattr(diffusers, _SCHEDULER_CLASSES[objective]), dtype=dtype,
    ))
    if device is not None:
        model.to(device)
    return model


def load_or_train_digits_model(
    cache_dir: str | os.PathLike | None = None,
    *,
    device: torch.device | str | None = None,
    use_packaged: bool = True,
    train_if_missing: bool = True,
    progress: bool = True,
    save_tokenizer: bool = False,
    objective: str = "epsilon",
    **train_kwargs,
) -> DigitsModel:
    """The pretrained digits model of ``objective`` (``"epsilon"``: digits-v1, ``"flow"``:
    digits-flow-v1): loaded if saved, else trained (a few CPU minutes) and saved.

    Lookup order (``<name>`` = ``digits-v1`` or ``digits-flow-v1``):

    1. ``cache_dir`` (default :func:`default_cache_dir`: ``$DDPO_RL_CACHE/<name>`` or
       ``~/.cache/ddpo_rl/<name>``);
    2. the checkpoint committed in the package (``ddpo_rl/assets/<name>``), if
       ``use_packaged`` and it exists;
    3. otherwise train with :func:`train_digits_model` (``train_kwargs`` passed on), save the
       result to ``cache_dir`` and return it. A message says so before training starts.

    Raises:
        FileNotFoundError: nothing saved was found and ``train_if_missing`` is False.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    name = OBJECTIVES[objective]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(name)
    flow = objective == "flow"
    return embedded.load_or_train_model(
        cache, label="digits-flow" if flow else "digits",
        pretrain_script="pretrain_digits.py --objective flow" if flow else "pretrain_digits.py",
        is_dir=is_digits_model_dir, load=load_digits_model, packaged=lambda: packaged_model_dir(objective),
        build=lambda seed: build_digits_model(DigitsConfig(objective=objective), seed=seed), train=train_digits_model,
        save=lambda model, path: save_digits_model(model, path, save_tokenizer=save_tokenizer),
        device=device, use_packaged=use_packaged, train_if_missing=train_if_missing, progress=progress,
        train_kwargs=train_kwargs,
    )
