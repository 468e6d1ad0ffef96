"""One entry point from a config's ``model`` string to the pieces a DDPO run needs.

- ``"digits"``: the embedded digits model (ddpo_rl.models.digits; trained on first use), or a
  directory written by ``save_digits_model`` (e.g. ``recipes/pretrain_digits.py --out DIR``);
- ``"digits-flow"``: the same UNet and text encoder pretrained with the flow-matching objective
  (ddpo_rl.models.digits, ``objective="flow"``), or such a directory (its scheduler says which);
- ``"tiny"``: a randomly initialised tiny Stable Diffusion (tests, smoke runs);
- ``"flow-digits"``: the embedded flow-matching digits model (ddpo_rl.models.flow_digits; an
  SD3-style transformer, trained on first use if the committed checkpoint is missing), or a
  directory written by ``save_flow_digits_model``;
- a Stable Diffusion 3 / 3.5 pipeline, by hub id or local directory (ddpo_rl.models.sd3),
  recognised by its ``model_index.json`` or its hub id (:func:`ddpo_rl.models.sd3.is_sd3_pipeline`);
- anything else: a Stable Diffusion pipeline, by hub id or local directory
  (ddpo_rl.models.stable_diffusion).

Flow-matching models (``kind`` "digits-flow", "flow-digits" or "sd3") have a
``FlowMatchEulerDiscreteScheduler`` and a velocity network in ``unet`` called as
``unet(x, encoder_hidden_states=..., [pooled_projections=...,] timestep=1000 t).sample``. SD3-style
ones ("flow-digits", "sd3") have an ``encode_prompts`` that returns ``{KEYS.prompt_embeds: [N, L, D],
KEYS.pooled_prompt_embeds: [N, P]}`` (the env carries both keys; the flow policy passes the pooled one
as ``pooled_projections``); the digits-flow UNet takes the token embeddings alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass
class DiffusionModel:
    """A text-to-image diffusion model, as DDPO sees it."""

    unet: nn.Module
    """The denoising network (the policy's trainable part): a noise-prediction UNet, or for
    flow-matching models a velocity-prediction SD3 transformer."""
    scheduler: object
    """A diffusers DDIMScheduler, or a FlowMatchEulerDiscreteScheduler for flow-matching models."""
    encode_prompts: Callable[[Sequence[str]], torch.Tensor | dict[str, torch.Tensor]]
    """Prompts -> embeddings [N, L, D] (frozen text encoder); SD3-style models return
    ``{KEYS.prompt_embeds: [N, L, D], KEYS.pooled_prompt_embeds: [N, P]}``."""
    decode: Callable[[torch.Tensor], torch.Tensor]
    """Final latents -> images [B, 3, H, W] in [0, 1]."""
    latent_shape: tuple[int, int, int]
    """(C, H, W) of one latent."""
    kind: str
    """"digits", "tiny", "sd", or (flow matching) "digits-flow", "flow-digits", "sd3"."""
    frozen: tuple[nn.Module, ...] = ()
    """Modules that are never trained (text encoder, VAE), for device/dtype moves."""

    def negative_prompt_embeds(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """The empty prompt's embedding [1, L, D] (a mapping like ``encode_prompts``'s for SD3-style
        models), the unconditional branch of CFG."""
        return self.encode_prompts([""])


EMBEDDED_MODELS = ("digits", "digits-flow", "flow-digits", "tiny")
"""Model names that need no weights from outside the package."""
DIGIT_FAMILIES = ("digits", "digits-flow", "flow-digits")
"""The families of the project's 8x8 digit models (the digit rewards and monitors apply to them)."""


def model_family(name: str) -> str | None:
    """The project's own model family that ``name`` is: ``"digits"``, ``"digits-flow"``, ``"flow-digits"``
    or ``"tiny"`` for the embedded models' names and for a local directory saved by ``save_digits_model`` /
    ``save_flow_digits_model`` (recognised by its model_index.json's ``_class_name``, and a digits model's
    objective by the scheduler class the index names); None for a Stable Diffusion / SD3 hub id or
    pipeline directory. Reads one small JSON file; loads nothing."""
    from ddpo_rl.models import digits, flow_digits

    if name in EMBEDDED_MODELS:
        return name
    index = os.path.join(os.path.expanduser(str(name)), digits.MODEL_INDEX)
    try:
        with open(index) as f:
            entries = json.load(f)
        class_name = entries.get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    if class_name == digits.INDEX_CLASS_NAME:  # the index names the scheduler: [library, class]
        scheduler = entries.get("scheduler")
        flow = isinstance(scheduler, list) and digits.objective_of_scheduler(scheduler[-1]) == "flow"
        return "digits-flow" if flow else "digits"
    return {flow_digits.INDEX_CLASS_NAME: "flow-digits"}.get(class_name)


FLOW_MATCHING_KINDS = ("digits-flow", "flow-digits", "sd3")
"""The model kinds that sample with a flow-matching scheduler (the others with DDIM)."""


def model_kind(name: str) -> str:
    """The ``kind`` :func:`load_model` gives the model ``name`` ("digits", "digits-flow", "flow-digits", "tiny", "sd3" or
    "sd"), decided as it decides, without loading anything: the project's models by name or saved
    directory, then SD3 by its model_index.json or hub id (:func:`ddpo_rl.models.sd3.is_sd3_pipeline`),
    else Stable Diffusion."""
    from ddpo_rl.models.sd3 import is_sd3_pipeline

    family = model_family(name)
    if family is not None:
        return family
    return "sd3" if is_sd3_pipeline(name) else "sd"


def check_model_reference(name: str) -> None:
    """A cheap check of ``name`` before anything is loaded: a local path must be a diffusers pipeline
    directory or a complete saved (flow-)digits model (a one-line ``PretrainedWeightsNotFoundError``
    naming ``model`` otherwise). Hub ids are only checked when loaded."""
    from ddpo_rl.hub import PretrainedWeightsNotFoundError, looks_like_local_path
    from ddpo_rl.models.stable_diffusion import check_pipeline_dir

    if name in EMBEDDED_MODELS or not looks_like_local_path(name):
        return
    path = os.path.expanduser(name)
    family = model_family(name)
    if family is not None:  # a saved (flow-)digits model: all its components must be there
        from ddpo_rl.models import digits, flow_digits

        required = {"digits": digits.REQUIRED_ENTRIES, "digits-flow": digits.REQUIRED_ENTRIES,
                    "flow-digits": flow_digits.REQUIRED_ENTRIES}[family]
        missing = [entry for entry in required if not os.path.exists(os.path.join(path, entry))]
        if missing:
            raise PretrainedWeightsNotFoundError(f"model: {path} is a saved {family} model without {', '.join(missing)}")
        return
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        return  # a pipeline directory: its family (SD or SD3) and components are checked when loaded
    if not os.path.isdir(path):  # whichever family was meant, the message names them all
        raise PretrainedWeightsNotFoundError(
            f"model: '{path}' is not a directory; pass one of {list(EMBEDDED_MODELS)}, a directory saved by "
            "recipes/pretrain_digits.py or recipes/pretrain_flow_digits.py (--out), a diffusers pipeline "
            "directory (Stable Diffusion 1.x or 3.x, save_pretrained or `hf download`), or a hub id"
        )
    try:
        check_pipeline_dir(path)
    except PretrainedWeightsNotFoundError as err:
        raise PretrainedWeightsNotFoundError(f"model: {err}") from err


def build_model(name: str, device: torch.device, revision: str | None = None, frozen_dtype=None) -> DiffusionModel:
    """Load or build the model named ``name`` on ``device``.

    ``frozen_dtype`` casts the frozen parts (text encoder, VAE) to a low precision on GPU.
    """
    family = model_family(name)
    if family in ("digits", "digits-flow"):
        from ddpo_rl.models.digits import load_digits_model, load_or_train_digits_model

        objective = "flow" if family == "digits-flow" else "epsilon"
        m = (
            load_or_train_digits_model(objective=objective) if name in EMBEDDED_MODELS
            else load_digits_model(os.path.expanduser(name))
        ).to(device)
        return DiffusionModel(
            unet=m.unet,
            scheduler=m.scheduler,
            encode_prompts=m.encode_prompts,
            decode=m.decode,
            latent_shape=(m.channels, m.sample_size, m.sample_size),
            kind=family,
            frozen=(m.text_encoder,),
        )
    if family == "flow-digits":
        from ddpo_rl.models.flow_digits import load_flow_digits_model, load_or_train_flow_digits_model

        m = (
            load_or_train_flow_digits_model() if name == "flow-digits" else load_flow_digits_model(os.path.expanduser(name))
        ).to(device)
        return DiffusionModel(
            unet=m.transformer,
            scheduler=m.scheduler,
            encode_prompts=m.encode_prompts,
            decode=m.decode,
            latent_shape=(m.channels, m.sample_size, m.sample_size),
            kind="flow-digits",
            frozen=(m.text_encoder,),
        )
    if name == "tiny":
        from ddpo_rl.models.decoders import VaeDecoder
        from ddpo_rl.models.tiny import sd_ddim_scheduler, tiny_text_encoder, tiny_unet, tiny_vae
        from ddpo_rl.models.tokenizer import build_clip_tokenizer
        from ddpo_rl.text import PromptEncoder

        encoder = PromptEncoder(build_clip_tokenizer(), tiny_text_encoder()).to(device)
        vae = tiny_vae().to(device).requires_grad_(False)
        return DiffusionModel(
            unet=tiny_unet().to(device),
            scheduler=sd_ddim_scheduler(),
            encode_prompts=encoder,
            decode=VaeDecoder(vae),
            latent_shape=(4, 8, 8),
            kind="tiny",
            frozen=(encoder, vae),
        )
    from ddpo_rl.models.decoders import VaeDecoder
    from ddpo_rl.hub import PretrainedWeightsNotFoundError
    from ddpo_rl.models.sd3 import is_sd3_pipeline, load_sd3_components
    from ddpo_rl.models.stable_diffusion import load_sd_components

    if is_sd3_pipeline(name):
        try:
            sd3 = load_sd3_components(name, revision=revision, device=device, dtype=frozen_dtype)
        except PretrainedWeightsNotFoundError as err:
            raise PretrainedWeightsNotFoundError(f"model: {err}") from err
        return DiffusionModel(
            unet=sd3.transformer,
            scheduler=sd3.scheduler,
            encode_prompts=sd3.encode_prompts,
            decode=VaeDecoder(sd3.vae, batch_size=8),
            latent_shape=tuple(sd3.latent_shape),
            kind="sd3",
            frozen=sd3.frozen,
        )
    try:
        sd = load_sd_components(name, revision=revision, device=device, dtype=frozen_dtype)
    except PretrainedWeightsNotFoundError as err:
        raise PretrainedWeightsNotFoundError(f"model: {err}") from err
    return DiffusionModel(
        unet=sd.unet,
        scheduler=sd.scheduler,
        encode_prompts=sd.encode_prompts,
        decode=VaeDecoder(sd.vae, batch_size=8),
        latent_shape=tuple(sd.latent_shape),
        kind="sd",
        frozen=(sd.text_encoder, sd.vae),
    )
