"""Small components shared by the tests: tiny models built from config, no download."""

from __future__ import annotations

import functools

import torch
from torchrl.envs import TransformedEnv

from ddpo_rl.models.tiny import sd_ddim_scheduler, tiny_text_encoder, tiny_unet
from ddpo_rl.models.tokenizer import build_clip_tokenizer
from ddpo_rl.policy import DiffusionPolicy
from ddpo_rl.rewards.transform import RewardTransform
from ddpo_rl.text import PromptEncoder
from envs.denoising import DenoisingEnv

PROMPTS = ["a cat", "a dog", "a horse"]


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_clip_tokenizer()


def prompt_encoder(hidden: int = 32) -> PromptEncoder:
    return PromptEncoder(tokenizer(), tiny_text_encoder(hidden_size=hidden))


def to_images(latents: torch.Tensor) -> torch.Tensor:
    """A stand-in decoder: first 3 latent channels, [-1, 1] -> [0, 1]."""
    return (latents[:, :3] / 2 + 0.5).clamp(0, 1)


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def make_env(batch_size=4, steps=5, reward=brightness, prompts=PROMPTS, encoder=None, **kw):
    encoder = encoder or prompt_encoder()
    base = DenoisingEnv(prompts, encoder, sd_ddim_scheduler(), steps, (4, 8, 8), batch_size, **kw)
    return TransformedEnv(base, RewardTransform(reward, to_images))


def make_policy(steps=5, guidance=3.0, encoder=None, seed=0, **kw) -> DiffusionPolicy:
    encoder = encoder or prompt_encoder()
    return DiffusionPolicy(
        tiny_unet(seed=seed),
        sd_ddim_scheduler(),
        steps,
        guidance_scale=guidance,
        negative_prompt_embeds=encoder.negative_embeds() if guidance != 1.0 else None,
        **kw,
    )
