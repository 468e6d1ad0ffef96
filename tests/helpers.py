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
    """Environment of a recipe subprocess: one thread (``OMP_NUM_THREADS=1``: fixed, so runs that a
    test compares have the same float round-off, and it does not degrade when the suite shares a
    loaded machine: benchmarks/README.md "CPU threads"), unbuffered, the repo root importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def _not_json(name):
    raise ValueError(f"{name} is not JSON (a non-finite value must be written as null)")


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file, parsed strictly: NaN / Infinity, which Python writes and other
    readers refuse, fail the test."""
    with open(path) as f:
        return [json.loads(line, parse_constant=_not_json) for line in f if line.strip()]


def read_json(path):
    """A JSON file, parsed as strictly as :func:`read_jsonl`."""
    with open(path) as f:
        return json.load(f, parse_constant=_not_json)


def build_tiny_sd_pipeline_dir(path, **kwargs) -> str:
    """Save ``ddpo_rl.models.tiny.build_tiny_sd_pipeline(**kwargs)`` as a real diffusers pipeline
    directory at ``path`` (``model_index.json`` + one folder per component) and return the path.

    Tests load it back through :func:`ddpo_rl.models.stable_diffusion.load_sd_components`, the same
    code that loads ``runwayml/stable-diffusion-v1-5``.
    """
    from ddpo_rl.models.tiny import build_tiny_sd_pipeline

    path = os.fspath(path)
    build_tiny_sd_pipeline(**kwargs).save_pretrained(path)
    return path


def tf32_enabled() -> bool:
    """Whether float32 CUDA matmuls may use TF32."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)  # pragma: no cover


def free_port() -> int:
    """A free TCP port on localhost (for torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- flow matching (SD3-style): a tiny transformer, its scheduler, a stand-in for SD3's encoders -----


def tiny_sd3_transformer(seed: int = 0):
    """An SD3Transformer2DModel of ~80k parameters (sizes from /work/shared/STACK.md), 8x8x4 latents."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
    )


def flow_scheduler(**overrides):
    """SD3's scheduler config: FlowMatchEulerDiscreteScheduler with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **overrides})


class HashEncoder:
    """A stand-in for SD3's text encoders: each prompt gets fixed random prompt embeddings [L, 64] and a
    pooled embedding [64] (seeded by the prompt's CRC32); counts the prompts it encodes."""

    def __init__(self, length: int = 6, dim: int = 64, pooled: bool = True):
        self.length, self.dim, self.pooled = length, dim, pooled
        self.calls: list[int] = []

    def __call__(self, prompts):
        import zlib

        from ddpo_rl.keys import KEYS

        self.calls.append(len(prompts))
        rows = [torch.randn(self.length + 1, self.dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        emb = torch.stack([r[:-1] for r in rows])
        if not self.pooled:
            return emb
        return {KEYS.prompt_embeds: emb, KEYS.pooled_prompt_embeds: torch.stack([r[-1] for r in rows])}

    def negative(self):
        return self([""])


def make_flow_env(batch_size=4, steps=4, reward=brightness, prompts=PROMPTS, encoder=None, **kw):
    base = DenoisingEnv(prompts, encoder or HashEncoder(), flow_scheduler(), steps, (4, 8, 8), batch_size, **kw)
    return TransformedEnv(base, RewardTransform(reward, to_images))


def make_flow_policy(steps=4, guidance=3.0, encoder=None, seed=0, transformer=None, **kw):
    from ddpo_rl.flow_policy import FlowMatchingPolicy

    encoder = encoder or HashEncoder()
    return FlowMatchingPolicy(
        transformer if transformer is not None else tiny_sd3_transformer(seed),
        flow_scheduler(),
        steps,
        guidance_scale=guidance,
        negative_prompt_embeds=encoder.negative() if guidance != 1.0 else None,
        **kw,
    )


def train_with_a_stop_signal(recipe, during_epoch: int = 1) -> dict:
    """``recipe.train()`` (a set-up DDPORecipe) with SIGINT/SIGTERM's effect, the stop flag, raised
    while the ``during_epoch``-th epoch of this call trains; cleans up and returns the summary."""
    real_train, calls = recipe.trainer.train, []

    def train(batch):
        calls.append(1)
        if len(calls) == during_epoch:
            recipe._stop_requested = True  # what the signal handler does
        return real_train(batch)

    recipe.trainer.train = train
    try:
        return recipe.train()
    finally:
        recipe.cleanup()
