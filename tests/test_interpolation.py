"""Weight interpolation towards the reference: theta_ref + lambda (theta - theta_ref), inside and after the block."""

import ddpo_rl  # noqa: F401  (first: torchvision shim)

import pytest
import torch

from ddpo_rl.interpolation import ReferenceInterpolation
from ddpo_rl.lora import apply_lora, lora_parameters
from ddpo_rl.models.tiny import tiny_unet


def _drift(params, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _values(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("coef", [0.25, 0.8])
def test_full_fine_tune_is_interpolated_inside_and_restored_bit_for_bit_after(coef):
    net = tiny_unet(seed=0)
    net.conv_in.requires_grad_(False)  # a frozen parameter is left alone
    ref = _values(net)
    interp = ReferenceInterpolation(net, coef)
    _drift(net.parameters())
    trained = _values(net)
    frozen = {f"conv_in.{n}" for n, _ in net.conv_in.named_parameters()}
    with interp.applied():
        inside = _values(net)
    for k, v in inside.items():
        if k in frozen:
            assert torch.equal(v, trained[k])
        else:
            torch.testing.assert_close(v, ref[k] + coef * (trained[k] - ref[k]), rtol=1e-6, atol=1e-7)
            assert not torch.equal(v, trained[k])
    assert all(torch.equal(v, trained[k]) for k, v in _values(net).items())  # exactly the trained weights again
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert interp.memory_bytes() == 4 * n_trainable


def test_the_trained_weights_come_back_when_the_block_raises():
    net = tiny_unet(seed=0)
    interp = ReferenceInterpolation(net, 0.5)
    _drift(net.parameters())
    trained = _values(net)
    with pytest.raises(RuntimeError, match="boom"):
        with interp.applied():
            raise RuntimeError("boom")
    assert all(torch.equal(v, trained[k]) for k, v in _values(net).items())


def test_lambda_one_copies_nothing_and_changes_nothing():
    net = tiny_unet(seed=0)
    interp = ReferenceInterpolation(net, 1.0)
    _drift(net.parameters())
    trained = _values(net)
    assert not interp.active and interp.memory_bytes() == 0
    with interp.applied():
        assert all(torch.equal(v, trained[k]) for k, v in _values(net).items())


def test_lora_scales_the_adapters_update_without_a_copy():
    unet = tiny_unet(seed=0)
    apply_lora(unet, rank=2, target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    interp = ReferenceInterpolation(unet, 0.3)
    assert interp.memory_bytes() == 0  # the reference is B = 0: nothing to copy
    _drift(lora_parameters(unet), 0.2)
    layers = {n: m for n, m in unet.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
    assert layers
    delta = {n: m.get_delta_weight("default").detach().clone() for n, m in layers.items()}
    base = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    trained = _values(unet)
    with interp.applied():  # W0 + lambda s B A: exactly lambda times the update, the base weight untouched
        for n, m in layers.items():
            torch.testing.assert_close(m.get_delta_weight("default"), 0.3 * delta[n], rtol=1e-6, atol=1e-8)
            assert torch.equal(m.base_layer.weight, base[n])
    assert all(torch.equal(v, trained[k]) for k, v in _values(unet).items())


def test_lambda_outside_zero_to_one_is_refused():
    net = tiny_unet(seed=0)
    for coef in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="reference_interpolation"):
            ReferenceInterpolation(net, coef)
