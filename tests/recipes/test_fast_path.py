"""The recipe's speed and memory options: the sampler choice gives the same run, the options
reach the components, LoRA keeps float32 trainable weights under a low-precision frozen base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import read_jsonl

TIMING_FIELDS = ("seconds", "sampling_seconds", "training_seconds")


def _run(tmp_path, name, **overrides):
    from ddpo_rl.config import preset_config
    from recipes.ddpo_recipe import run

    out = tmp_path / name
    run(preset_config("tiny", epochs=3, output_dir=str(out), progress=False, **overrides))
    return out


@pytest.mark.parametrize("use_lora", [False, True])
def test_env_and_graphed_samplers_give_the_same_run(use_lora, tmp_path):
    """3 epochs (training and evaluation sampling) with each sampler: the same metrics.jsonl
    (timing fields aside), eval.jsonl and final weights, bitwise (CPU: the graphed sampler runs
    its static-buffer step eagerly)."""
    runs = {s: _run(tmp_path, s, sampler=s, use_lora=use_lora) for s in ("env", "graphed")}
    metrics = {s: [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in read_jsonl(out / "metrics.jsonl")]
               for s, out in runs.items()}
    assert [m["epoch"] for m in metrics["env"]] == [1, 2, 3]
    assert metrics["env"] == metrics["graphed"]
    assert read_jsonl(runs["env"] / "eval.jsonl") == read_jsonl(runs["graphed"] / "eval.jsonl")
    name = "pytorch_lora_weights.safetensors" if use_lora else "unet/diffusion_pytorch_model.safetensors"
    weights = {s: load_file(str(out / "final" / name)) for s, out in runs.items()}
    assert weights["env"].keys() == weights["graphed"].keys()
    for key, value in weights["env"].items():
        assert torch.equal(value, weights["graphed"][key]), key
    if use_lora:  # trained: LoRA up (B) starts at zero
        assert any(v.abs().sum() > 0 for k, v in weights["env"].items() if "lora.up" in k)


def test_speed_options_reach_the_components(tmp_path):
    from ddpo_rl.config import preset_config
    from ddpo_rl.sampling import EnvSampler, FastSampler
    from recipes.ddpo_recipe import DDPORecipe

    cfg = preset_config("tiny", output_dir=str(tmp_path / "x"), progress=False, optimizer_impl="for-loop",
                        sampler="graphed", threads=1, use_lora=True, kl_coef=0.1, kl_sigma_scale=0.3)
    recipe = DDPORecipe(cfg).setup()
    try:
        assert torch.get_num_threads() == 1 and recipe.threads.fixed
        assert recipe.loss.sigma_scale == 0.3 and recipe.loss.reference == "adapters"
        assert recipe.mixed_precision == "no"  # "auto" on CPU
        assert recipe.optimizer.defaults["foreach"] is False and not recipe.optimizer.defaults.get("fused")
        assert all(p.dtype == torch.float32 for p in recipe.params)
        traj = recipe._sample(recipe.env, 1)
        assert isinstance(recipe._samplers[id(recipe.env)], FastSampler)
        assert traj.batch_size == torch.Size([cfg.sample_batch_size, cfg.num_inference_steps])
    finally:
        recipe.cleanup()
    cfg = preset_config("tiny", output_dir=str(tmp_path / "y"), progress=False)
    recipe = DDPORecipe(cfg).setup()
    try:
        recipe._sample(recipe.env, 1)
        assert isinstance(recipe._samplers[id(recipe.env)], EnvSampler)  # "auto" on CPU
    finally:
        recipe.cleanup()


def test_lora_under_a_bf16_frozen_base_trains_float32_weights():
    """What the recipe does on CUDA with mixed precision, run here on CPU: the frozen UNet base
    in bf16, the LoRA weights and AdamW's state in float32, forward and backward under autocast."""
    from ddpo_rl import precision
    from ddpo_rl.lora import apply_lora
    from tests.helpers import make_policy, prompt_encoder

    enc = prompt_encoder()
    policy = make_policy(steps=2, guidance=2.0, encoder=enc)
    unet = policy.noise_model
    apply_lora(unet, rank=2)
    precision.cast_frozen_params(unet, torch.bfloat16)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = precision.make_adamw(trainable, lr=1e-3)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([900, 900])
    emb = enc(["a cat", "a dog"])
    with precision.autocast("bf16", "cpu"):
        mean, std = policy.head(x, t, emb)
    assert mean.dtype == torch.float32  # the DDIM step is computed in float32
    mean.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_and_env_samplers_agree_on_cuda(tmp_path):
    """On CUDA (float32, no autocast) the graphed run follows the env run to round-off."""
    runs = {s: _run(tmp_path, s, sampler=s, device="cuda", mixed_precision="no") for s in ("env", "graphed")}
    a, b = (read_jsonl(out / "metrics.jsonl") for out in runs.values())
    for ma, mb in zip(a, b):
        assert ma["reward_mean"] == pytest.approx(mb["reward_mean"], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("mode, scaled", [("fp16", True), ("bf16", False), ("auto", False)])
def test_fp16_training_gets_a_grad_scaler(mode, scaled, tmp_path):
    from ddpo_rl.config import preset_config
    from recipes.ddpo_recipe import DDPORecipe

    recipe = DDPORecipe(preset_config("tiny", output_dir=str(tmp_path / mode), progress=False, mixed_precision=mode)).setup()
    try:
        scaler = recipe.trainer.grad_scaler
        assert (scaler is not None and scaler.is_enabled()) == scaled
    finally:
        recipe.cleanup()
