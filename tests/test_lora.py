"""LoRA on the UNet: only LoRA trains; save -> diffusers' load_lora_weights reproduces outputs."""

import ddpo_rl  # noqa: F401  (first: torchvision shim)
import os

import pytest
import torch

from ddpo_rl.lora import (
    DEFAULT_SD_LORA_TARGETS,
    LORA_WEIGHT_NAME,
    apply_lora,
    load_lora_weights,
    lora_parameters,
    save_lora_weights,
)
from ddpo_rl.models.stable_diffusion import load_sd_components
from tests.helpers import build_tiny_sd_pipeline_dir


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_sd_pipeline_dir(tmp_path_factory.mktemp("tiny_sd_lora") / "pipe")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([700, 20]),
        torch.randn(2, 77, 32, generator=g),
    )


@torch.no_grad()
def _eps(unet):
    x, t, c = _inputs()
    return unet(x, t, c).sample


def _perturb(params, scale=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_only_lora_parameters_train(pipeline_dir):
    unet = load_sd_components(pipeline_dir).unet
    n_base = sum(p.numel() for p in unet.parameters())
    before = _eps(unet)
    apply_lora(unet, rank=4)
    lora = lora_parameters(unet)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(lora) > 0 and {id(p) for p in lora} == {id(p) for p in trainable}
    assert all(p.dtype == torch.float32 for p in lora)
    # every trainable parameter is a LoRA factor of a targeted attention projection
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(any(f".{t}.lora_" in n for t in DEFAULT_SD_LORA_TARGETS) for n in names)
    assert sum(p.numel() for p in lora) < 0.05 * n_base
    # B starts at zero: the adapted UNet equals the base UNet
    torch.testing.assert_close(_eps(unet), before)
    # a gradient step reaches LoRA parameters only
    x, t, c = _inputs()
    unet(x, t, c).sample.square().mean().backward()
    assert all(p.grad is None for n, p in unet.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_round_trip_through_diffusers_pipeline(pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = load_sd_components(pipeline_dir).unet
    base = _eps(unet)
    apply_lora(unet, rank=4, alpha=8.0)
    _perturb(lora_parameters(unet))
    trained = _eps(unet)
    assert (trained - base).abs().max() > 1e-3  # the perturbation changes the output

    out_dir = save_lora_weights(unet, tmp_path / "lora")
    assert os.path.isfile(os.path.join(out_dir, LORA_WEIGHT_NAME))

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    torch.testing.assert_close(_eps(pipe.unet), base)
    pipe.load_lora_weights(out_dir)
    torch.testing.assert_close(_eps(pipe.unet), trained, rtol=1e-5, atol=1e-5)


def test_resume_into_adapted_and_fresh_unet(pipeline_dir, tmp_path):
    unet = load_sd_components(pipeline_dir).unet
    apply_lora(unet, rank=4, alpha=2.0)
    _perturb(lora_parameters(unet))
    trained = _eps(unet)
    save_lora_weights(unet, tmp_path)

    # resume: same config applied first, weights overwritten in place (optimizer stays valid)
    resumed = apply_lora(load_sd_components(pipeline_dir).unet, rank=4, alpha=2.0)
    params_before = [id(p) for p in lora_parameters(resumed)]
    load_lora_weights(resumed, tmp_path)
    assert [id(p) for p in lora_parameters(resumed)] == params_before
    torch.testing.assert_close(_eps(resumed), trained, rtol=1e-5, atol=1e-5)

    # fresh UNet: the adapter is created from the saved config (alpha kept)
    fresh = load_lora_weights(load_sd_components(pipeline_dir).unet, tmp_path)
    assert fresh.peft_config["default"].lora_alpha == 2.0
    assert len(lora_parameters(fresh)) == len(params_before)
    assert {id(p) for p in fresh.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(fresh)}
    torch.testing.assert_close(_eps(fresh), trained, rtol=1e-5, atol=1e-5)


def test_mismatched_rank_and_missing_weights_raise(pipeline_dir, tmp_path):
    unet = apply_lora(load_sd_components(pipeline_dir).unet, rank=4)
    save_lora_weights(unet, tmp_path / "r4")
    other = apply_lora(load_sd_components(pipeline_dir).unet, rank=2)
    with pytest.raises(ValueError, match="r=4"):
        load_lora_weights(other, tmp_path / "r4")
    other_alpha = apply_lora(load_sd_components(pipeline_dir).unet, rank=4, alpha=16)
    with pytest.raises(ValueError, match="lora_alpha=4"):
        load_lora_weights(other_alpha, tmp_path / "r4")
    with pytest.raises(FileNotFoundError):
        load_lora_weights(other, tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="apply_lora"):
        save_lora_weights(load_sd_components(pipeline_dir).unet, tmp_path / "x")
