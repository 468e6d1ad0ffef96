"""One entry point from a config's ``model`` string to the pieces a DDPO run needs.

- ``"digits"``: the embedded digits model (ddpo_rl.models.digits; trained on first use);
- ``"tiny"``: a randomly initialised tiny Stable Diffusion (tests, smoke runs);
- anything else: a Stable Diffusion pipeline, by hub id or local directory
  (ddpo_rl.models.stable_diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass
class DiffusionModel:
    """A text-to-image diffusion model, as DDPO sees it."""

    unet: nn.Module
    """The noise-prediction network (the policy's trainable part)."""
    scheduler: object
    """A diffusers DDIMScheduler."""
    encode_prompts: Callable[[Sequence[str]], torch.Tensor]
    """Prompts -> embeddings [N, L, D] (frozen text encoder)."""
    decode: Callable[[torch.Tensor], torch.Tensor]
    """Final latents -> images [B, 3, H, W] in [0, 1]."""
    latent_shape: tuple[int, int, int]
    """(C, H, W) of one latent."""
    kind: str
    """"digits", "tiny" or "sd"."""
    frozen: tuple[nn.Module, ...] = ()
    """Modules that are never trained (text encoder, VAE), for device/dtype moves."""

    def negative_prompt_embeds(self) -> torch.Tensor:
        """The empty prompt's embedding [1, L, D], the unconditional branch of CFG."""
        return self.encode_prompts([""])


def build_model(name: str, device: torch.device, revision: str | None = None, frozen_dtype=None) -> DiffusionModel:
    """Load or build the model named ``name`` on ``device``.

    ``frozen_dtype`` casts the frozen parts (text encoder, VAE) to a low precision on GPU.
    """
    if name == "digits":
        from ddpo_rl.models.digits import load_or_train_digits_model

        m = load_or_train_digits_model().to(device)
        return DiffusionModel(
            unet=m.unet,
            scheduler=m.scheduler,
            encode_prompts=m.encode_prompts,
            decode=m.decode,
            latent_shape=(m.channels, m.sample_size, m.sample_size),
            kind="digits",
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
    from ddpo_rl.models.stable_diffusion import load_sd_components

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
