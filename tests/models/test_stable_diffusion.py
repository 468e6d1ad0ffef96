"""load_sd_components on a tiny pipeline saved to disk, and its errors."""

import ddpo_rl  # noqa: F401  (first: torchvision shim)
import json
import os

import pytest
import torch

from ddpo_rl.hub import PretrainedWeightsNotFoundError
from ddpo_rl.models.stable_diffusion import load_sd_components
from tests.helpers import build_tiny_sd_pipeline_dir


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_sd_pipeline_dir(tmp_path_factory.mktemp("tiny_sd") / "pipe")


def test_tiny_pipeline_dir_is_a_diffusers_pipeline(pipeline_dir):
    with open(os.path.join(pipeline_dir, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(pipeline_dir, sub)), sub
    # stored like the real SD v1 pipelines: a PNDM scheduler config
    assert index["scheduler"][1] == "PNDMScheduler"


def test_load_components(pipeline_dir):
    from diffusers import DDIMScheduler

    c = load_sd_components(pipeline_dir)
    assert isinstance(c.scheduler, DDIMScheduler)
    assert c.scheduler.config.set_alpha_to_one is False
    assert c.scheduler.config.beta_schedule == "scaled_linear"
    # frozen VAE / text encoder, trainable UNet
    assert not any(p.requires_grad for p in c.vae.parameters()) and not c.vae.training
    assert not any(p.requires_grad for p in c.text_encoder.parameters()) and not c.text_encoder.training
    assert all(p.requires_grad for p in c.unet.parameters())
    assert len(c.tokenizer) == 49408
    assert c.vae_scale_factor == 2 and c.resolution == 16 and c.latent_shape == (4, 8, 8)

    emb = c.encode_prompts(["a cat", ""])
    assert emb.shape == (2, 77, 32)
    eps = c.unet(torch.randn(2, *c.latent_shape), torch.tensor([999, 1]), emb).sample
    assert eps.shape == (2, *c.latent_shape)


def test_loaded_weights_equal_saved(pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    c = load_sd_components(pipeline_dir)
    saved, loaded = pipe.unet.state_dict(), c.unet.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


def test_scheduler_always_keeps_last_step_stochastic(tmp_path):
    path = build_tiny_sd_pipeline_dir(tmp_path / "pipe", scheduler="ddim")
    cfg_path = os.path.join(path, "scheduler", "scheduler_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["set_alpha_to_one"] = True  # a pipeline whose last DDIM step would be deterministic
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    scheduler = load_sd_components(path).scheduler
    assert scheduler.config.set_alpha_to_one is False
    assert scheduler.final_alpha_cumprod < 1.0


def test_dtype_of_frozen_modules(pipeline_dir):
    c = load_sd_components(pipeline_dir, dtype=torch.bfloat16)
    assert next(c.vae.parameters()).dtype == torch.bfloat16
    assert next(c.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(c.unet.parameters()).dtype == torch.float32


def test_missing_directory_raises_clear_error(tmp_path):
    missing = str(tmp_path / "does" / "not" / "exist")
    with pytest.raises(PretrainedWeightsNotFoundError, match="not a directory") as info:
        load_sd_components(missing)
    assert missing in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, OSError)


def test_non_pipeline_directory_raises_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(PretrainedWeightsNotFoundError, match="model_index.json") as info:
        load_sd_components(str(tmp_path))
    assert "hf download" in str(info.value)


def test_unreachable_hub_id_raises_clear_error():
    name = "ddpo-rl-tests/no-such-pipeline"
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        load_sd_components(name, local_files_only=True)
    msg = str(info.value)
    assert name in msg and "hf download" in msg and "HF_HUB_OFFLINE" in msg
    assert "\n" not in msg
