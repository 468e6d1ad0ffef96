import ddpo_rl  # noqa: F401
import pytest
import torch
from torch import nn

from ddpo_rl.precision import (
    autocast,
    cast_frozen_params,
    enable_gradient_checkpointing,
    grad_scaler,
    low_precision_dtype,
    set_tf32,
)
from tests.helpers import tf32_enabled


def test_modes():
    assert low_precision_dtype("no") is None and low_precision_dtype(None) is None
    assert low_precision_dtype("fp16") == torch.float16
    assert low_precision_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="mixed_precision"):
        low_precision_dtype("fp8")


def test_autocast_context():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("no", "cpu"):
        assert (a @ b).dtype == torch.float32
    assert grad_scaler("fp16", "cpu").is_enabled() and not grad_scaler("bf16", "cpu").is_enabled()


def test_cast_frozen_keeps_trainable_fp32():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    trainable = model[2].weight
    cast_frozen_params(model, torch.float16)
    assert model[0].weight.dtype == torch.float16 and model[1].running_mean.dtype == torch.float16
    assert model[2].weight.dtype == torch.float32 and model[2].weight is trainable
    cast_frozen_params(model, None)  # no-op
    assert model[0].weight.dtype == torch.float16


def test_tf32_switch():
    before = tf32_enabled()
    try:
        set_tf32(True)
        assert tf32_enabled()
        set_tf32(False)
        assert not tf32_enabled()
    finally:
        set_tf32(before)


def test_gradient_checkpointing():
    from ddpo_rl.models.tiny import tiny_unet

    unet = enable_gradient_checkpointing(tiny_unet())
    assert unet.is_gradient_checkpointing
    with pytest.raises(TypeError):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_use_sdpa_attention_replaces_only_the_classic_processor():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from ddpo_rl.models.tiny import tiny_unet
    from ddpo_rl.precision import use_sdpa_attention

    unet = tiny_unet()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=c).sample
        unet.set_attn_processor(AttnProcessor())
        assert use_sdpa_attention(unet) == len(unet.attn_processors) > 0
        assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=c).sample, ref, atol=1e-5, rtol=1e-4)
    assert use_sdpa_attention(unet) == 0  # nothing left to replace
    assert use_sdpa_attention(nn.Linear(2, 2)) == 0
