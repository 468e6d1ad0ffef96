"""Tiny models of Stable Diffusion's component classes, built from config with no download.

Tests, the CPU benchmarks and the embedded digits model use these: the same classes
(UNet2DConditionModel, CLIPTextModel, AutoencoderKL, DDIMScheduler; for SD3
SD3Transformer2DModel, CLIPTextModelWithProjection, FlowMatchEulerDiscreteScheduler) as a real
pipeline, a few hundred thousand parameters each.
"""

from __future__ import annotations

import torch


def sd_ddim_scheduler(num_train_timesteps: int = 1000, **overrides):
    """A DDIMScheduler with Stable Diffusion's settings (scaled-linear betas, no sample clipping,
    ``set_alpha_to_one=False`` so the last step keeps a small non-zero std, steps_offset 1)."""
    from diffusers import DDIMScheduler

    cfg = dict(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    cfg.update(overrides)
    return DDIMScheduler(**cfg)


def tiny_unet(
    sample_size: int = 8,
    in_channels: int = 4,
    out_channels: int | None = None,
    cross_attention_dim: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
    seed: int = 0,
):
    """A UNet2DConditionModel with SD's structure (cross-attention blocks), ~0.8M parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def tiny_text_encoder(hidden_size: int = 32, num_layers: int = 2, max_position_embeddings: int = 77, seed: int = 0):
    """A CLIPTextModel sized for tests; vocabulary of the real CLIP tokenizer (49408)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg).eval()


def tiny_vae(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 32), seed: int = 0):
    """An AutoencoderKL that downsamples by 2 per extra block (x2 for the default)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def build_tiny_sd_pipeline(
    sample_size: int = 8,
    cross_attention_dim: int = 32,
    scheduler: str = "pndm",
    seed: int = 0,
):
    """A complete ``StableDiffusionPipeline`` of tiny components (no safety checker).

    The UNet works on ``sample_size`` x ``sample_size`` latents, the VAE decodes them to images
    twice that size. ``scheduler="pndm"`` stores a PNDM config, as the real SD v1 pipelines do,
    so loaders must convert it to DDIM; ``"ddim"`` stores :func:`sd_ddim_scheduler`.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from ddpo_rl.models.tokenizer import build_clip_tokenizer

    ddim = sd_ddim_scheduler()
    if scheduler == "pndm":
        sched = PNDMScheduler.from_config(ddim.config, skip_prk_steps=True)
    elif scheduler == "ddim":
        sched = ddim
    else:
        raise ValueError(f"scheduler must be 'pndm' or 'ddim', got {scheduler!r}")
    return StableDiffusionPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(hidden_size=cross_attention_dim, seed=seed),
        tokenizer=build_clip_tokenizer(),
        unet=tiny_unet(sample_size=sample_size, cross_attention_dim=cross_attention_dim, seed=seed),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd3_transformer(sample_size: int = 8, in_channels: int = 4, context_dim: int = 64, seed: int = 0):
    """An ``SD3Transformer2DModel`` sized for tests (~80k parameters); ``context_dim`` is both the
    token-embedding width (``joint_attention_dim``) and the pooled width."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=context_dim,
        caption_projection_dim=32,
        pooled_projection_dim=context_dim,
        pos_embed_max_size=sample_size // 2,
    )


def tiny_clip_with_projection(hidden_size: int = 32, seed: int = 0):
    """A ``CLIPTextModelWithProjection`` sized for tests (SD3's CLIP encoders give both the token
    embeddings and the pooled ``text_embeds``)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def build_tiny_sd3_pipeline(sample_size: int = 8, shift: float = 3.0, seed: int = 0):
    """A complete ``StableDiffusion3Pipeline`` of tiny components, without T5
    (``text_encoder_3=None``, as SD3 allows): two CLIP encoders of width 32 whose concatenation
    (64) is the transformer's context and pooled width, a 4-channel VAE with SD3's scaling and
    shift factors, and a ``FlowMatchEulerDiscreteScheduler`` with SD3's ``shift=3.0``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from ddpo_rl.models.tokenizer import build_clip_tokenizer

    vae = tiny_vae(seed=seed)
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE latent statistics
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(sample_size=sample_size, seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=tiny_clip_with_projection(seed=seed),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=tiny_clip_with_projection(seed=seed + 1),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def build_tiny_sd3_pipeline_dir(path, **kwargs) -> str:
    """Save :func:`build_tiny_sd3_pipeline` as a diffusers pipeline directory at ``path`` (what
    ``StableDiffusion3Pipeline.save_pretrained`` writes) and return the path."""
    import os

    path = os.fspath(path)
    build_tiny_sd3_pipeline(**kwargs).save_pretrained(path)
    return path
