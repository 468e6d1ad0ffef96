"""load_sd3_components on a tiny SD3 pipeline saved by diffusers, LoRA on its transformer
round-tripped through StableDiffusion3Pipeline.load_lora_weights, and the loader's errors."""

import ddpo_rl  # noqa: F401  (first: torchvision shim)
import json
import os

import pytest
import torch

from ddpo_rl.keys import KEYS
from ddpo_rl.lora import (
    DEFAULT_SD3_LORA_TARGETS,
    LORA_WEIGHT_NAME,
    apply_lora,
    load_lora_weights,
    lora_parameters,
    save_lora_weights,
)
from ddpo_rl.models.sd3 import (
    SD3SamplingDefaults,
    is_sd3_pipeline,
    load_sd3_components,
)
from ddpo_rl.models.stable_diffusion import PretrainedWeightsNotFoundError
from ddpo_rl.models.tiny import build_tiny_sd3_pipeline_dir
from tests.helpers import build_tiny_sd_pipeline_dir


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_sd3_pipeline_dir(tmp_path_factory.mktemp("tiny_sd3") / "pipe")


@pytest.fixture(scope="module")
def pipeline(pipeline_dir):
    from diffusers import StableDiffusion3Pipeline

    # a pipeline saved without T5 must be told so when loaded back
    return StableDiffusion3Pipeline.from_pretrained(pipeline_dir, text_encoder_3=None, tokenizer_3=None)


def _velocity(transformer, embeds, pooled):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return transformer(
            x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=torch.tensor([900.0, 30.0])
        ).sample


def test_tiny_pipeline_dir_is_an_sd3_pipeline(pipeline_dir):
    with open(os.path.join(pipeline_dir, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None]
    assert index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert is_sd3_pipeline(pipeline_dir)


def test_load_components(pipeline_dir, pipeline):
    from diffusers import FlowMatchEulerDiscreteScheduler

    c = load_sd3_components(pipeline_dir)
    assert isinstance(c.scheduler, FlowMatchEulerDiscreteScheduler)
    assert c.scheduler.config.shift == 3.0  # the pipeline's config, SD3's shift
    assert c.sampling == SD3SamplingDefaults()
    assert c.text_encoder_3 is None and c.tokenizer_3 is None
    for m in c.frozen:
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert len(c.frozen) == 3
    assert c.transformer.training and all(p.requires_grad for p in c.transformer.parameters())
    assert c.vae_scale_factor == 2 and c.latent_shape == (4, 256, 256)  # Flow-GRPO's 512 px
    c.sampling.resolution = None
    assert c.resolution == 16 and c.latent_shape == (4, 8, 8)  # the transformer's native size

    # the weights are the saved ones
    for mine, theirs in ((c.transformer, pipeline.transformer), (c.text_encoder_2, pipeline.text_encoder_2)):
        saved, loaded = theirs.state_dict(), mine.state_dict()
        assert saved.keys() == loaded.keys()
        for name, tensor in saved.items():
            torch.testing.assert_close(loaded[name], tensor, msg=name)

    # prompt embeddings: diffusers' own encode_prompt, T5 part zeros, CLIP-L | CLIP-G concatenated
    embeds, pooled = c.encode_prompts_pooled(["a cat", ""])
    ref, _, ref_pooled, _ = pipeline.encode_prompt(
        "a cat", None, None, do_classifier_free_guidance=False, max_sequence_length=128
    )
    assert embeds.shape == (2, 77 + 128, 64) and pooled.shape == (2, 64)
    torch.testing.assert_close(embeds[:1], ref)
    torch.testing.assert_close(pooled[:1], ref_pooled)
    assert embeds[:, 77:].abs().max() == 0
    assert not torch.allclose(embeds[0], embeds[1])
    cond = c.encode_prompts(["a cat"])  # what the denoising env carries
    assert set(cond) == {KEYS.prompt_embeds, KEYS.pooled_prompt_embeds}
    torch.testing.assert_close(cond[KEYS.prompt_embeds], ref)
    torch.testing.assert_close(cond[KEYS.pooled_prompt_embeds], ref_pooled)
    assert _velocity(c.transformer, embeds, pooled).shape == (2, 4, 8, 8)


def test_frozen_dtype_and_max_sequence_length(pipeline_dir):
    c = load_sd3_components(pipeline_dir, dtype=torch.bfloat16, max_sequence_length=16)
    for m in (c.text_encoder, c.text_encoder_2):
        assert next(m.parameters()).dtype == torch.bfloat16
    assert next(c.vae.parameters()).dtype == torch.float32  # decoded in fp32, as Flow-GRPO does
    assert next(load_sd3_components(pipeline_dir, dtype=torch.bfloat16, vae_dtype=None).vae.parameters()).dtype == torch.bfloat16
    assert next(c.transformer.parameters()).dtype == torch.float32
    embeds, pooled = c.encode_prompts_pooled(["a dog"])
    assert embeds.shape == (1, 77 + 16, 64) and embeds.dtype == torch.bfloat16


def test_build_model_dispatches_to_sd3(pipeline_dir):
    from ddpo_rl.models.loading import build_model

    m = build_model(pipeline_dir, torch.device("cpu"))
    assert m.kind == "sd3" and type(m.unet).__name__ == "SD3Transformer2DModel"
    assert type(m.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    cond, negative = m.encode_prompts(["a cat"]), m.negative_prompt_embeds()
    assert cond[KEYS.prompt_embeds].shape == negative[KEYS.prompt_embeds].shape == (1, 77 + 128, 64)
    assert cond[KEYS.pooled_prompt_embeds].shape == negative[KEYS.pooled_prompt_embeds].shape == (1, 64)
    assert m.latent_shape == (4, 256, 256)  # 512 px, Flow-GRPO's resolution
    images = m.decode(torch.randn(2, 4, 8, 8))  # (a small latent: the tiny VAE is slow at 512 px on CPU)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_lora_round_trip_through_diffusers_sd3_pipeline(pipeline_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    c = load_sd3_components(pipeline_dir)
    embeds, pooled = c.encode_prompts_pooled(["a cat", "a dog"])
    base = _velocity(c.transformer, embeds, pooled)
    apply_lora(c.transformer, rank=4, alpha=8.0)  # the SD3 default targets
    assert set(c.transformer.peft_config["default"].target_modules) == set(DEFAULT_SD3_LORA_TARGETS)
    lora = lora_parameters(c.transformer)
    names = [n for n, p in c.transformer.named_parameters() if p.requires_grad]
    for target in DEFAULT_SD3_LORA_TARGETS:  # image and text streams' projections are adapted
        assert any(f".{target}.lora_" in n for n in names), target
    assert {id(p) for p in lora} == {id(p) for p in c.transformer.parameters() if p.requires_grad}
    torch.testing.assert_close(_velocity(c.transformer, embeds, pooled), base)  # B = 0 at init
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    trained = _velocity(c.transformer, embeds, pooled)
    assert (trained - base).abs().max() > 1e-3

    out_dir = save_lora_weights(c.transformer, tmp_path / "lora")
    assert os.path.isfile(os.path.join(out_dir, LORA_WEIGHT_NAME))

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, text_encoder_3=None, tokenizer_3=None)
    torch.testing.assert_close(_velocity(pipe.transformer, embeds, pooled), base)
    pipe.load_lora_weights(out_dir)
    torch.testing.assert_close(_velocity(pipe.transformer, embeds, pooled), trained, rtol=1e-5, atol=1e-5)

    # resume: into an adapter of the same config (in place), and into a fresh transformer
    resumed = apply_lora(load_sd3_components(pipeline_dir).transformer, rank=4, alpha=8.0,
                         target_modules=DEFAULT_SD3_LORA_TARGETS)
    before = [id(p) for p in lora_parameters(resumed)]
    load_lora_weights(resumed, out_dir)
    assert [id(p) for p in lora_parameters(resumed)] == before
    torch.testing.assert_close(_velocity(resumed, embeds, pooled), trained, rtol=1e-5, atol=1e-5)
    fresh = load_lora_weights(load_sd3_components(pipeline_dir).transformer, out_dir)
    assert fresh.peft_config["default"].lora_alpha == 8.0
    torch.testing.assert_close(_velocity(fresh, embeds, pooled), trained, rtol=1e-5, atol=1e-5)
    other = apply_lora(load_sd3_components(pipeline_dir).transformer, rank=2, target_modules=DEFAULT_SD3_LORA_TARGETS)
    with pytest.raises(ValueError, match="r=4"):
        load_lora_weights(other, out_dir)


def test_sd3_hub_ids_and_sd1_dirs_are_told_apart(tmp_path):
    assert is_sd3_pipeline("stabilityai/stable-diffusion-3.5-medium")
    assert is_sd3_pipeline("stabilityai/stable-diffusion-3-medium-diffusers")
    assert not is_sd3_pipeline("runwayml/stable-diffusion-v1-5")
    assert not is_sd3_pipeline(build_tiny_sd_pipeline_dir(tmp_path / "sd1"))


def test_missing_directory_raises_one_line_error(tmp_path):
    missing = str(tmp_path / "no" / "sd3")
    with pytest.raises(PretrainedWeightsNotFoundError, match="Stable Diffusion 3 weights not found") as info:
        load_sd3_components(missing)
    msg = str(info.value)
    assert missing in msg and "StableDiffusion3Pipeline" in msg and "\n" not in msg


def test_incomplete_directory_raises_one_line_error(pipeline_dir, tmp_path):
    import shutil

    broken = shutil.copytree(pipeline_dir, tmp_path / "broken")
    shutil.rmtree(broken / "transformer")
    with pytest.raises(PretrainedWeightsNotFoundError, match="transformer") as info:
        load_sd3_components(str(broken))
    assert "\n" not in str(info.value)
    (broken / "transformer").mkdir()  # present but empty: from_pretrained fails, wrapped in one line
    with pytest.raises(PretrainedWeightsNotFoundError, match="could not load Stable Diffusion 3 weights") as info:
        load_sd3_components(str(broken))
    assert "\n" not in str(info.value)


def test_unreachable_hub_id_raises_one_line_error():
    name = "ddpo-rl-tests/no-such-sd3-pipeline"
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        load_sd3_components(name, local_files_only=True)
    msg = str(info.value)
    assert name in msg and "hf download" in msg and "\n" not in msg


def test_sd35_settings_are_valid_configs():
    import inspect

    from ddpo_rl.config import FLOW_PRESETS, DDPOConfig
    from ddpo_rl.rewards.registry import get_reward_factory

    assert set(FLOW_PRESETS) == {"sd35-compressibility", "sd35-aesthetic"}
    for name, values in FLOW_PRESETS.items():
        cfg = DDPOConfig(**values, preset=name)
        cfg.validate()
        assert is_sd3_pipeline(cfg.model) and cfg.use_lora and (cfg.lora_rank, cfg.lora_alpha) == (32, 64.0)
        assert (cfg.num_inference_steps, cfg.guidance_scale, cfg.noise_level) == (10, 4.5, 0.7)
        assert cfg.sample_batch_size % cfg.group_size == 0
        inspect.signature(get_reward_factory(cfg.reward)).bind(**cfg.reward_kwargs)
