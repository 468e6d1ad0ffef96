"""Load the components of a Stable Diffusion pipeline for DDPO.

:func:`load_sd_components` loads the UNet, VAE, text encoder, tokenizer and scheduler of a
diffusers pipeline (a hub id such as ``runwayml/stable-diffusion-v1-5`` or a local directory
written by ``StableDiffusionPipeline.save_pretrained``), each with its own diffusers/transformers
class and ``subfolder=``. The scheduler is always a :class:`~diffusers.DDIMScheduler` built from
the pipeline's scheduler config (SD ships a PNDM config), with ``set_alpha_to_one=False`` so that
the last DDIM step keeps a non-zero standard deviation and its log-probability is defined.

The VAE and the text encoder are frozen (``requires_grad_(False)``, ``eval()``); the UNet is
returned trainable, in ``unet_dtype`` (fp32 by default), ready for full fine-tuning or for
:func:`ddpo_rl.lora.apply_lora`.

When the weights cannot be found, :class:`PretrainedWeightsNotFoundError` says which path was
tried and how to fix it, in one line (``hf download`` is huggingface_hub's CLI; older releases
call it ``huggingface-cli download``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ddpo_rl.hub import PretrainedWeightsNotFoundError, looks_like_local_path

DEFAULT_SD_MODEL = "runwayml/stable-diffusion-v1-5"
"""The pipeline the DDPO paper fine-tunes (v1.4 in the paper; v1.5 in the reference code)."""

_PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion pipeline that DDPO uses.

    Attributes:
        unet: the denoiser (trainable).
        vae: the latent autoencoder (frozen, eval).
        text_encoder: the CLIP text encoder (frozen, eval).
        tokenizer: the CLIP tokenizer.
        scheduler: a DDIMScheduler with ``set_alpha_to_one=False``.
        source: the hub id or directory the components came from.
        image_size: image side in pixels; ``None`` uses the UNet's native size,
            ``unet.config.sample_size * vae_scale_factor`` (512 for SD v1), as diffusers does.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str | None = None
    image_size: int | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD v1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side in pixels: ``image_size`` or the UNet's native size."""
        if self.image_size is not None:
            return int(self.image_size)
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a latent at :attr:`resolution`."""
        side = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder embeddings [B, L, D] of ``prompts``, padded to the tokenizer's max length
        (an empty string gives the unconditional embedding used by classifier-free guidance)."""
        from ddpo_rl.text import encode_prompts

        return encode_prompts(self.tokenizer, self.text_encoder, prompts)


def _fix_hint(pretrained: str) -> str:
    return (
        f"download it with `hf download {pretrained} --local-dir <dir>` and pass that "
        "directory, or, offline, pass a local diffusers pipeline directory "
        "(set HF_HUB_OFFLINE=1 to use the local cache only)"
    )


def check_pipeline_dir(
    path: str,
    subfolders: Sequence[str] = _PIPELINE_SUBFOLDERS,
    *,
    what: str = "Stable Diffusion",
    example: str = DEFAULT_SD_MODEL,
    pipeline_class: str = "StableDiffusionPipeline",
) -> None:
    """Raise :class:`PretrainedWeightsNotFoundError` unless ``path`` is a diffusers pipeline
    directory (``model_index.json`` plus the listed component subfolders). ``what``, ``example``
    (a hub id) and ``pipeline_class`` name the model family in the message."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise PretrainedWeightsNotFoundError(
            f"{what} weights not found: '{path}' is not a directory; pass a hub id such as "
            f"'{example}' or a directory written by {pipeline_class}.save_pretrained."
        )
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise PretrainedWeightsNotFoundError(
            f"'{path}' is not a diffusers pipeline directory (no model_index.json); point at the "
            f"directory that `hf download {example} --local-dir <dir>` or "
            f"{pipeline_class}.save_pretrained(<dir>) wrote."
        )
    missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise PretrainedWeightsNotFoundError(
            f"diffusers pipeline directory '{path}' lacks the component folder(s) {missing}; "
            "re-download or re-save the full pipeline."
        )


def pretrained_source(
    pretrained, revision: str | None, local_files_only: bool | None, check: Callable[[str], None]
) -> tuple[str, bool, dict[str, Any]]:
    """Where a pipeline's components load from: ``(directory or hub id, whether it is a directory,
    the keyword arguments of every component's from_pretrained)``. A directory has its ``~``
    expanded and is checked first (``check(path)``: a one-line error before any weight is read);
    ``revision`` applies to hub ids only."""
    pretrained = str(pretrained)
    local = looks_like_local_path(pretrained)
    if local:
        pretrained = os.path.expanduser(pretrained)
        check(pretrained)
    common: dict[str, Any] = {}
    if not local and revision is not None:
        common["revision"] = revision
    if local_files_only is not None:
        common["local_files_only"] = local_files_only
    return pretrained, local, common


def weights_not_found(
    err: Exception, pretrained: str, local: bool, what: str = "Stable Diffusion"
) -> PretrainedWeightsNotFoundError:
    """The one-line error for a failed ``from_pretrained`` of a pipeline component (raise it
    ``from err``): where it looked, the first line of the cause, and how to fix it."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = f"directory '{pretrained}'" if local else f"hub id '{pretrained}'"
    return PretrainedWeightsNotFoundError(
        f"could not load {what} weights from {where} ({first_line[:200]}); "
        + (_fix_hint(pretrained) if not local else "re-save the pipeline with save_pretrained")
        + "."
    )


def ddim_scheduler_from_config(config: dict, **overrides):
    """A :class:`~diffusers.DDIMScheduler` from any scheduler config of the pipeline (PNDM for SD),
    with ``set_alpha_to_one=False`` unless overridden."""
    from diffusers import DDIMScheduler

    kwargs = {"set_alpha_to_one": False}
    kwargs.update(overrides)
    return DDIMScheduler.from_config(config, **kwargs)


def load_sd_components(
    pretrained: str = DEFAULT_SD_MODEL,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    unet_dtype: torch.dtype | None = torch.float32,
    variant: str | None = None,
    local_files_only: bool | None = None,
    scheduler_overrides: dict | None = None,
) -> SDComponents:
    """Load the UNet, VAE, text encoder, tokenizer and a DDIM scheduler of a diffusers pipeline.

    Args:
        pretrained: a hub id (``"runwayml/stable-diffusion-v1-5"``) or a local pipeline directory
            (with ``model_index.json`` and one folder per component).
        revision: hub revision (branch, tag or commit); ignored for local directories.
        dtype: dtype of the frozen VAE and text encoder (e.g. ``torch.float16`` for inference);
            ``None`` keeps the stored dtype (fp32 for SD's main branch).
        device: where to put every module; ``None`` leaves them on the CPU.
        unet_dtype: dtype of the UNet. fp32 by default, which full fine-tuning needs; with LoRA the
            frozen UNet may be low precision (see :func:`ddpo_rl.precision.cast_frozen_params`).
            ``None`` keeps the stored dtype.
        variant: weight-file variant on the hub (``"fp16"``), passed to ``from_pretrained``.
        local_files_only: never touch the network (``from_pretrained``'s flag).
        scheduler_overrides: extra DDIMScheduler config entries.

    Raises:
        PretrainedWeightsNotFoundError: the path is not a pipeline directory, or the hub could not
            provide the weights (offline, wrong id).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pretrained, local, common = pretrained_source(pretrained, revision, local_files_only, check_pipeline_dir)

    try:
        # diffusers models take the dtype at load time (casting later with .to() warns about
        # modules that must stay fp32); transformers' keyword changed across versions, so the
        # text encoder is cast after loading.
        unet = UNet2DConditionModel.from_pretrained(
            pretrained, subfolder="unet", variant=variant, torch_dtype=unet_dtype, **common
        )
        vae = AutoencoderKL.from_pretrained(
            pretrained, subfolder="vae", variant=variant, torch_dtype=dtype, **common
        )
        text_encoder = CLIPTextModel.from_pretrained(
            pretrained, subfolder="text_encoder", variant=variant, **common
        )
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common)
        scheduler_config = _load_scheduler_config(pretrained, common)
    except PretrainedWeightsNotFoundError:
        raise
    except (OSError, ValueError) as err:
        # OSError: file/repo not found, no connection; ValueError: invalid repo id (HFValidationError).
        raise weights_not_found(err, pretrained, local) from err

    scheduler = ddim_scheduler_from_config(scheduler_config, **(scheduler_overrides or {}))

    if dtype is not None:
        text_encoder.to(dtype=dtype)
    for module in (vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    unet.train()
    if device is not None:
        for module in (unet, vae, text_encoder):
            module.to(device)
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        source=pretrained,
    )


def _load_scheduler_config(pretrained: str, common: dict) -> dict:
    """The pipeline's scheduler config as a dict (whatever scheduler class it names)."""
    if os.path.isdir(pretrained):
        with open(os.path.join(pretrained, "scheduler", "scheduler_config.json")) as f:
            return json.load(f)
    from diffusers import DDIMScheduler

    # load_config reads the file only; the class is irrelevant to the returned dict.
    return dict(DDIMScheduler.load_config(pretrained, subfolder="scheduler", **common))
