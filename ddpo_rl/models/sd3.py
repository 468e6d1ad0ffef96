"""Load the components of a Stable Diffusion 3 / 3.5 pipeline for flow-matching RL (Flow-GRPO).

:func:`load_sd3_components` loads the ``SD3Transformer2DModel``, the VAE, the two CLIP text
encoders (``CLIPTextModelWithProjection``) and, optionally, the T5 encoder of a diffusers
``StableDiffusion3Pipeline`` (a hub id such as ``stabilityai/stable-diffusion-3.5-medium`` or a
local directory written by ``StableDiffusion3Pipeline.save_pretrained``), each with its own
class and ``subfolder=``, and a ``FlowMatchEulerDiscreteScheduler`` from the pipeline's scheduler
config (SD3's ``shift=3.0`` included).

The VAE and the text encoders are frozen (``requires_grad_(False)``, ``eval()``); the text
encoders are stored in ``dtype`` (the recipe passes half precision on GPU, nothing on CPU, where
they stay fp32) and the VAE in ``vae_dtype`` (fp32 by default, as Flow-GRPO keeps it); the
transformer is returned trainable in ``transformer_dtype`` (fp32 by default), ready for full
fine-tuning or for :func:`ddpo_rl.lora.apply_lora` with
:data:`ddpo_rl.lora.DEFAULT_SD3_LORA_TARGETS`; :func:`ddpo_rl.lora.save_lora_weights` then writes
what ``StableDiffusion3Pipeline.load_lora_weights`` reads.

Prompt conditioning is SD3's own: :meth:`SD3Components.encode_prompts_pooled` calls diffusers'
``StableDiffusion3Pipeline.encode_prompt`` on a pipeline assembled from the loaded components
(no copy), so the embeddings are exactly the pipeline's: the CLIP-L and CLIP-G penultimate
hidden states concatenated and zero-padded to T5's width, followed along the sequence by T5's
embeddings (zeros when T5 is not loaded, as the pipeline does), [B, 77 + max_sequence_length,
joint_attention_dim] (``max_sequence_length`` 128, Flow-GRPO's, rather than the pipeline's
256), and the two CLIP ``text_embeds`` concatenated, [B, pooled_projection_dim].

When the weights cannot be found, :class:`~ddpo_rl.models.stable_diffusion.PretrainedWeightsNotFoundError`
says which path was tried and how to fix it, in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ddpo_rl.models.stable_diffusion import (
    PretrainedWeightsNotFoundError,
    _load_scheduler_config,
    check_pipeline_dir,
    pretrained_source,
    weights_not_found,
)

DEFAULT_SD3_MODEL = "stabilityai/stable-diffusion-3.5-medium"
"""The pipeline Flow-GRPO fine-tunes (SD3.5 Medium)."""

_SD3_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_WHAT = "Stable Diffusion 3"
_CHECK = dict(what=_WHAT, example=DEFAULT_SD3_MODEL, pipeline_class="StableDiffusion3Pipeline")


@dataclass
class SD3SamplingDefaults:
    """Flow-GRPO's sampling settings for SD3.5 Medium.

    Attributes:
        num_inference_steps: denoising steps per sample while training (the MDP horizon T);
            Flow-GRPO trains with 10 and evaluates with 40 (:attr:`eval_num_inference_steps`).
        eval_num_inference_steps: steps of the deterministic evaluation sampler.
        guidance_scale: classifier-free guidance weight.
        noise_level: Flow-GRPO's ``a`` in the SDE's ``sigma_t = a sqrt(t / (1 - t))``.
        resolution: image side in pixels; ``None`` uses the transformer's native size,
            ``transformer.config.sample_size * vae_scale_factor`` (1024 for SD3.5), as diffusers
            does. Flow-GRPO trains at 512.
    """

    num_inference_steps: int = 10
    eval_num_inference_steps: int = 40
    guidance_scale: float = 4.5
    noise_level: float = 0.7
    resolution: int | None = 512


@dataclass
class SD3Components:
    """The parts of a Stable Diffusion 3 pipeline that flow-matching RL uses.

    Attributes:
        transformer: the ``SD3Transformer2DModel`` velocity network (trainable).
        vae: the latent autoencoder (frozen, eval).
        text_encoder, text_encoder_2: CLIP-L and CLIP-G ``CLIPTextModelWithProjection`` (frozen).
        text_encoder_3: the T5 encoder (frozen), or ``None`` (its embeddings are then zeros).
        tokenizer, tokenizer_2, tokenizer_3: their tokenizers (``tokenizer_3`` None without T5).
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` with the pipeline's config.
        sampling: Flow-GRPO's sampling settings.
        max_sequence_length: T5 tokens per prompt (Flow-GRPO's 128; the pipeline's default is 256).
        source: the hub id or directory the components came from.
    """

    transformer: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    sampling: SD3SamplingDefaults = field(default_factory=SD3SamplingDefaults)
    max_sequence_length: int = 128
    source: str | None = None
    _pipeline: Any = field(default=None, init=False, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD3)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side in pixels: ``sampling.resolution`` or the transformer's native size."""
        if self.sampling.resolution is not None:
            return int(self.sampling.resolution)
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a latent at :attr:`resolution`."""
        side = self.resolution // self.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    @property
    def frozen(self) -> tuple[torch.nn.Module, ...]:
        """The frozen modules (VAE and text encoders), for device/dtype moves."""
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return (self.vae, *(e for e in encoders if e is not None))

    @property
    def pipeline(self):
        """A ``StableDiffusion3Pipeline`` made of these components (the same module objects)."""
        if self._pipeline is None:
            from diffusers import StableDiffusion3Pipeline

            self._pipeline = StableDiffusion3Pipeline(
                transformer=self.transformer,
                scheduler=self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                text_encoder_3=self.text_encoder_3,
                tokenizer_3=self.tokenizer_3,
            )
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    @torch.no_grad()
    def encode_prompts_pooled(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, 77 + max_sequence_length, D], pooled_prompt_embeds [B, P])`` of
        ``prompts``, by ``StableDiffusion3Pipeline.encode_prompt`` (``""`` gives the
        unconditional embeddings of classifier-free guidance)."""
        device = next(self.text_encoder.parameters()).device
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{KEYS.prompt_embeds: [B, L, D], KEYS.pooled_prompt_embeds: [B, P]}``, the condition the
        denoising env carries (see :meth:`encode_prompts_pooled`)."""
        from ddpo_rl.keys import KEYS

        embeds, pooled = self.encode_prompts_pooled(prompts)
        return {KEYS.prompt_embeds: embeds, KEYS.pooled_prompt_embeds: pooled}


def flow_scheduler_from_config(config: dict, **overrides):
    """A ``FlowMatchEulerDiscreteScheduler`` from the pipeline's scheduler config (with overrides,
    e.g. ``shift``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)


def pipeline_class_name(pretrained: str) -> str | None:
    """The ``_class_name`` of a local pipeline directory's ``model_index.json`` (e.g.
    ``"StableDiffusion3Pipeline"``); ``None`` for a hub id or an unreadable directory."""
    pretrained = os.path.expanduser(str(pretrained))
    try:
        with open(os.path.join(pretrained, "model_index.json")) as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError):
        return None


_SD3_NAME_MARKERS = ("stable-diffusion-3", "sd3")


def is_sd3_pipeline(pretrained: str) -> bool:
    """Whether ``pretrained`` names a Stable Diffusion 3 / 3.5 pipeline: a local directory whose
    ``model_index.json`` says ``StableDiffusion3*Pipeline``, or a hub id containing
    ``stable-diffusion-3`` or ``sd3`` (``stabilityai/stable-diffusion-3.5-medium``). Hub ids are
    not looked up (offline, that costs tens of seconds of retries); an SD3 fine-tune with another
    name is loaded from its downloaded directory."""
    name = pipeline_class_name(pretrained)
    if name is not None:
        return name.startswith("StableDiffusion3")
    return any(m in str(pretrained).lower() for m in _SD3_NAME_MARKERS)


def load_sd3_components(
    pretrained: str = DEFAULT_SD3_MODEL,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    transformer_dtype: torch.dtype | None = torch.float32,
    vae_dtype: torch.dtype | None = torch.float32,
    load_t5: bool = True,
    max_sequence_length: int = 128,
    variant: str | None = None,
    local_files_only: bool | None = None,
    sampling: SD3SamplingDefaults | None = None,
    scheduler_overrides: dict | None = None,
) -> SD3Components:
    """Load the transformer, VAE, text encoders, tokenizers and scheduler of an SD3 pipeline.

    Args:
        pretrained: a hub id (``"stabilityai/stable-diffusion-3.5-medium"``) or a local pipeline
            directory (``model_index.json`` and one folder per component).
        revision: hub revision (branch, tag or commit); ignored for local directories.
        dtype: dtype of the frozen text encoders (``torch.float16`` / ``bfloat16`` on GPU);
            ``None`` keeps them in fp32.
        device: where to put every module; ``None`` leaves them on the CPU.
        transformer_dtype: dtype of the transformer; fp32 by default (full fine-tuning; with
            LoRA the frozen base may be low precision, see
            :func:`ddpo_rl.precision.cast_frozen_params`). ``None`` keeps the stored dtype.
        vae_dtype: dtype of the VAE; fp32 by default (Flow-GRPO decodes in fp32); ``None``
            means ``dtype``.
        load_t5: load the T5 encoder (``text_encoder_3``) when the pipeline has one. Without it
            SD3 still works (its T5 embeddings are zeros, as in the pipeline with
            ``text_encoder_3=None``), with some loss of prompt following, and ~9 GB less memory.
        max_sequence_length: T5 tokens per prompt.
        variant: weight-file variant on the hub (``"fp16"``).
        local_files_only: never touch the network (``from_pretrained``'s flag).
        sampling: sampling settings to attach; defaults to Flow-GRPO's.
        scheduler_overrides: extra ``FlowMatchEulerDiscreteScheduler`` config entries.

    Raises:
        PretrainedWeightsNotFoundError: the path is not an SD3 pipeline directory, or the hub
            could not provide the weights (offline, wrong id, gated repo without a token).
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    pretrained, local, common = pretrained_source(
        pretrained, revision, local_files_only, lambda path: check_pipeline_dir(path, _SD3_SUBFOLDERS, **_CHECK)
    )

    try:
        transformer = SD3Transformer2DModel.from_pretrained(
            pretrained, subfolder="transformer", variant=variant, torch_dtype=transformer_dtype, **common
        )
        vae_dtype = vae_dtype or dtype
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, torch_dtype=vae_dtype, **common)
        encoders = [
            CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder=sub, variant=variant, **common)
            for sub in ("text_encoder", "text_encoder_2")
        ]
        tokenizers = [
            CLIPTokenizer.from_pretrained(pretrained, subfolder=sub, **common) for sub in ("tokenizer", "tokenizer_2")
        ]
        t5 = t5_tokenizer = None
        if load_t5 and _has_t5(pretrained, local, common):
            from transformers import T5EncoderModel, T5TokenizerFast

            t5 = T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_3", variant=variant, **common)
            t5_tokenizer = T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_3", **common)
        scheduler_config = _load_scheduler_config(pretrained, common)
    except PretrainedWeightsNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise weights_not_found(err, pretrained, local, _WHAT) from err

    scheduler = flow_scheduler_from_config(scheduler_config, **(scheduler_overrides or {}))
    frozen = [vae, *encoders] + ([t5] if t5 is not None else [])
    for module in frozen:
        if dtype is not None and module is not vae:
            module.to(dtype=dtype)
        module.requires_grad_(False)
        module.eval()
    transformer.train()
    if device is not None:
        for module in [transformer, *frozen]:
            module.to(device)
    return SD3Components(
        transformer=transformer,
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
        scheduler=scheduler,
        sampling=sampling or SD3SamplingDefaults(),
        max_sequence_length=max_sequence_length,
        source=pretrained,
    )


def _has_t5(pretrained: str, local: bool, common: dict) -> bool:
    """Whether the pipeline's ``model_index.json`` names a ``text_encoder_3``."""
    if local:
        with open(os.path.join(pretrained, "model_index.json")) as f:
            index = json.load(f)
    else:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(pretrained, **common)
    entry = index.get("text_encoder_3")
    return bool(entry) and entry[0] is not None
