import ddpo_rl  # noqa: F401
import pytest
import torch

from ddpo_rl.models.decoders import PixelDecoder, VaeDecoder
from ddpo_rl.models.tiny import tiny_vae


def test_vae_decoder_unscales_and_maps_to_unit_range():
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.5)
    z = torch.randn(3, 4, 8, 8)
    images = VaeDecoder(vae)(z)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        expected = (vae.decode(z / 0.5).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected)
    # chunked decoding gives the same images
    torch.testing.assert_close(VaeDecoder(vae, batch_size=2)(z), images, rtol=1e-5, atol=1e-5)
    assert not images.requires_grad


def test_vae_decoder_can_keep_graph():
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    VaeDecoder(vae, requires_grad=True)(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_pixel_decoder():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    out = PixelDecoder(upscale=2)(x)
    assert out.shape == (1, 3, 4, 4)
    torch.testing.assert_close(out[0, 0, ::2, ::2], torch.tensor([[0.0, 0.5], [1.0, 1.0]]))
    assert torch.equal(out[:, 0], out[:, 2])
    rgb = PixelDecoder(value_range=(0, 255))(torch.full((2, 3, 4, 4), 255.0))
    assert torch.equal(rgb, torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError):
        PixelDecoder(upscale=0)
    with pytest.raises(ValueError):
        PixelDecoder()(torch.zeros(1, 2, 4, 4))
