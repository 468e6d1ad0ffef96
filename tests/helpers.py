"""Small components shared by the tests: tiny models built from config, no download."""

from __future__ import annotations

import functools
import json
import os
import socket

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


# per-epoch training metrics every recipe run logs (compared across runs by the resume tests)
TRAIN_FIELDS = ("reward_mean", "reward_std", "loss", "kl_approx", "clip_fraction", "grad_norm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra) -> dict:
    """Environment of a recipe subprocess: one thread, OpenMP threads that sleep rather than spin
    while waiting (ddpo_rl/threads.py), unbuffered, the repo root importable. One thread is the
    choice that does not degrade when the suite shares a loaded machine (benchmarks/README.md,
    "CPU threads": 19 s per digits epoch at load 7.5, against 30 s with 2 passive threads and
    190 s with 2 spinning ones)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    """A free TCP port on localhost (for torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
