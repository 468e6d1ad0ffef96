"""Turn what a policy samples into images a reward function can score.

A reward function takes float images [B, 3, H, W] in [0, 1] (see :mod:`ddpo_rl.rewards.base`).
The reward transform calls a decoder on the final sample first:

- :class:`VaeDecoder` for latent diffusion (Stable Diffusion): VAE-decode the latent;
- :class:`PixelDecoder` for pixel-space models: rescale to [0, 1], grey to RGB, optional
  nearest-neighbour upscaling (tiny images are hard to see and to score).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class VaeDecoder(nn.Module):
    """Decode latents with a diffusers VAE into images in [0, 1].

    The latent is un-scaled first: ``z / vae.config.scaling_factor (+ shift_factor)``, the inverse
    of what ``StableDiffusionPipeline`` does after encoding. The VAE is not trained here: decoding
    runs under ``torch.no_grad()`` unless ``requires_grad=True`` (for reward-backprop methods).

    Args:
        vae: an ``AutoencoderKL`` (or any model with ``.decode(z).sample`` and the config fields).
        batch_size: decode at most this many latents at once (the SD VAE at 512 px is memory
            hungry); ``None`` decodes the whole batch.
        requires_grad: keep the autograd graph through the decoder.
        output_dtype: dtype of the returned images.
    """

    def __init__(
        self,
        vae: nn.Module,
        batch_size: int | None = None,
        requires_grad: bool = False,
        output_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.vae = vae
        self.batch_size = batch_size
        self.requires_grad = requires_grad
        self.output_dtype = output_dtype

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1]."""
        cfg = self.vae.config
        z = latents / self.scaling_factor
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:
            z = z + shift
        param = next(self.vae.parameters())
        z = z.to(device=param.device, dtype=param.dtype)
        ctx = contextlib.nullcontext() if self.requires_grad else torch.no_grad()
        with ctx:
            chunks = z.split(self.batch_size) if self.batch_size else (z,)
            images = torch.cat([self.vae.decode(c).sample for c in chunks])
        return (images / 2 + 0.5).clamp(0, 1).to(self.output_dtype)


class PixelDecoder(nn.Module):
    """Map a pixel-space sample to images in [0, 1] with 3 channels.

    Args:
        value_range: the (low, high) range of the model's samples; (-1, 1) for diffusion models.
        upscale: integer nearest-neighbour upscaling factor (1: none).
    """

    def __init__(self, value_range: tuple[float, float] = (-1.0, 1.0), upscale: int = 1):
        super().__init__()
        low, high = value_range
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        if int(upscale) != upscale or upscale < 1:
            raise ValueError(f"upscale must be a positive integer, got {upscale}")
        self.value_range = (float(low), float(high))
        self.upscale = int(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Samples [B, C, H, W] (C = 1 or 3) -> images [B, 3, H * upscale, W * upscale] in [0, 1]."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected samples [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
        low, high = self.value_range
        images = ((x.float() - low) / (high - low)).clamp(0, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.upscale > 1:
            images = F.interpolate(images, scale_factor=self.upscale, mode="nearest")
        return images.contiguous()
